"""Long conversational QA (LongConvQA, as EpiCache evaluates it): LoCoMo, REALTALK and LongMemEval.

A sample is one conversation (sessions of dated turns) rendered as EpiCache renders it (apple/ml-epicache
``data/<dataset>/convert_<dataset>.py``); its many questions share the context, so the natural protocol is
``query_agnostic`` (the conversation is compressed once, every question is answered over the same compressed cache
and rolled back), which the task configs select. Each question keeps its category in ``Question.meta["category"]``
and the run's ``metrics.json`` reports ``score_by_category``. Metric: ``conv_f1`` (EpiCache's token F1);
generation: greedy, 50 new tokens (EpiCache ``model/wrapper.py``).

Checked against EpiCache's own converters (``build_conversation_context``, ``QA_PROMPT``) on the fixture files:
identical contexts and question prompts for the three datasets.

Sources (``scripts/prepare_data.py longconvqa``, or ``data_dir`` pointing at local copies), read as the authors'
JSON (nested per-conversation objects with a variable set of ``session_<n>`` keys, which ``datasets`` would flatten
into a union schema, so plain ``json`` is used):
  * LoCoMo: ``locomo10.json`` of snap-research/locomo at commit ``3eb6f2c``: a list of
    ``{sample_id, conversation: {speaker_a, speaker_b, session_<n>: [{speaker, dia_id, text, blip_caption?}],
    session_<n>_date_time}, qa: [{question, answer | adversarial_answer, evidence, category}]}``. Categories
    1 multi-hop, 2 temporal, 3 open-domain, 4 single-hop, 5 adversarial. As EpiCache: category 5 is dropped and
    temporal questions get " Use DATE of CONVERSATION to answer with an approximate date.".
  * REALTALK: danny911kr/REALTALK ``data/Chat_*.json`` at commit ``b903e06`` (EpiCache merges them, sorted, into
    ``realtalk10.json``; either form is read): ``{name: {speaker_1, speaker_2}, session_<n>: [{speaker, clean_text,
    date_time, dia_id, img_url, ...}], session_<n>_date_time, events_session_<n>, qa: [{question, answer, evidence,
    category}]}``.
  * LongMemEval: ``longmemeval_s_cleaned.json`` / ``longmemeval_oracle.json`` of the hub dataset
    ``xiaowu0162/longmemeval-cleaned`` at commit ``98d7416``: a list of ``{question_id, question_type, question,
    answer, question_date, haystack_session_ids, haystack_dates, haystack_sessions: [[{role, content,
    has_answer?}]], answer_session_ids}``; one sample per question (each question has its own history). Rendered
    with EpiCache's LongMemEval layout (TIMESTAMP / SESSION / User: / Assistant:). Deviations: EpiCache evaluates
    custom 20K/100K-token conversations it builds from LongMemEval's raw parts with several questions each (not
    published); kvbench uses the released benchmark, adds the question date (``Current Date: ...``, as LongMemEval's
    own prompt) so temporal questions are answerable, and scores token F1 instead of LongMemEval's GPT-4o judge
    (category = ``question_type``; abstention questions, ``_abs``, are flagged in ``meta["abstention"]``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvbench.errors import UsageError
from kvbench.tasks.base import Question, Sample
from kvbench.tasks.download import download
from kvbench.tasks.hub import DataMissingError, fetch_hub_files, missing_message
from kvbench.tasks.pinned import Checksum

BENCHMARK = "longconvqa"
#: LoCoMo's ``data/locomo10.json`` at a pinned commit of snap-research/locomo, with the SHA-256 and size public
#: projects pin for this file (it is the only LoCoMo release file; ``prepare`` checks the download against them).
LOCOMO_COMMIT = "3eb6f2c585f5e1699204e3c3bdf7adc5c28cb376"
LOCOMO_URL = f"https://raw.githubusercontent.com/snap-research/locomo/{LOCOMO_COMMIT}/data/locomo10.json"
LOCOMO_CHECKSUM = Checksum("79fa87e90f04081343b8c8debecb80a9a6842b76a7aa537dc9fdf651ea698ff4", 2_805_274)
#: REALTALK's ten conversations at a pinned commit of danny911kr/REALTALK; checksums computed from the git blobs of
#: that commit (read from a clone of the repository).
REALTALK_COMMIT = "b903e06a9770bf4e5fe9018c3e132889666d3b4a"
REALTALK_FILES = {
    "Chat_1_Emi_Elise": Checksum("4e947998a751a1ba2c3710fc873b90fbcbc234fda7a5e4e75db2b762e0f25a36", 236990),
    "Chat_2_Kevin_Elise": Checksum("4ac6e319c206731aa9a025c93325eb1edb43686cf39473f058c87ae7deb2d62a", 228327),
    "Chat_3_Kevin_Paola": Checksum("10c9208016538cbe7a28aafa6cfd72587b072677964c36ec242159fdf58961f2", 231570),
    "Chat_4_Emi_Paola": Checksum("80aa012ed6a918f5b317bd942b4d4811a158d27a6e07b7a5c6182994107a9367", 232501),
    "Chat_5_Nicolas_Nebraas": Checksum("32dd7c45786b1a26861dc1574a1bb698a855196fd2ae3fc0c091f3c9ab2d6d06", 466832),
    "Chat_6_Vanessa_Nicolas": Checksum("9d5ee072ab5a0667ef71d5644d7cd3a4c6777a1e6e2252bf306f310d982e40ac", 467008),
    "Chat_7_Nebraas_Vanessa": Checksum("b5716bb093217980e747dec0d98996829b569febc09587a025efc6b79806e9ce", 383849),
    "Chat_8_Akib_Muhhamed": Checksum("814f64ad7e8a46f0398f550fe84184e2ba495a292290b9ff96ffc95448280800", 364402),
    "Chat_9_Fahim_Akib": Checksum("05b9b4331bf0e25a2a64dc89c404622c83a61ab5e7c935fb7d844449caf6dd39", 400397),
    "Chat_10_Fahim_Muhhamed": Checksum("26135a9e3482f40bea4c71de570a2d994a361848111067e60587be1dd82a0127", 283618),
}
#: LongMemEval's cleaned release (September 2025) at a pinned commit of the hub dataset, with the SHA-256 and size
#: of each file as public projects pin them (the oracle file is byte-identical to the original release's).
LONGMEMEVAL_REPO = "xiaowu0162/longmemeval-cleaned"
LONGMEMEVAL_REVISION = "98d7416c24c778c2fee6e6f3006e7a073259d48f"
LONGMEMEVAL_FILES = {"s": "longmemeval_s_cleaned.json", "oracle": "longmemeval_oracle.json",
                     "m": "longmemeval_m_cleaned.json"}
LONGMEMEVAL_CHECKSUMS = {
    "longmemeval_s_cleaned.json": Checksum("d6f21ea9d60a0d56f34a05b609c79c88a451d2ae03597821ea3d5a9678c3a442",
                                           277_383_467),
    "longmemeval_oracle.json": Checksum("821a2034d219ab45846873dd14c14f12cfe7776e73527a483f9dac095d38620c",
                                        15_388_478),
    "longmemeval_m_cleaned.json": Checksum("9d79e5524794a2e6900a3aa9cb7d9152c5a3e8319c9a87c25494ba1eacee495f",
                                           2_737_100_077),
}

LOCOMO_CATEGORIES = {1: "multi_hop", 2: "temporal", 3: "open_domain", 4: "single_hop", 5: "adversarial"}
CONV_START = ("Below is a conversation between two people: {} and {}. The conversation takes place over multiple "
              "days and the date of each conversation is written at the beginning of the conversation.\n\n")
LOCOMO_QA = ("\nBased on the above conversations, write a short answer for the following question in a few words. "
             "Do not write complete and lengthy sentences. Answer with exact words from the conversations whenever "
             "possible.\n\nQuestion: {}\n")
REALTALK_QA = ("Based on the above context, write an answer in the form of a short phrase for the following "
               "question.\nIf the question is about a date, try to infer the approximate date (e.g., \"In the 1800s\", "
               "\"Before Jan 2021\", etc.).\n\nQuestion: {}\nAnswer:\n")
LONGMEMEVAL_START = ("Below is a conversation history between a user and an assistant. The conversation takes place "
                     "over multiple sessions and the timestamp of each session is provided.\n\n")
TEMPORAL_SUFFIX = " Use DATE of CONVERSATION to answer with an approximate date."


def prepare(dest: Path, names: list[str] | None = None) -> list[Path]:
    """Download LoCoMo, REALTALK and LongMemEval (``names``: locomo, realtalk, longmemeval_s, longmemeval_oracle,
    longmemeval_m; default all but the 2.7 GB longmemeval_m)."""
    wanted = names or ["locomo", "realtalk", "longmemeval_s", "longmemeval_oracle"]
    dest.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    if "locomo" in wanted:
        files.append(download(LOCOMO_URL, dest / "locomo10.json", expected=LOCOMO_CHECKSUM, root=dest))
    if "realtalk" in wanted:
        for name, checksum in REALTALK_FILES.items():
            url = f"https://raw.githubusercontent.com/danny911kr/REALTALK/{REALTALK_COMMIT}/data/{name}.json"
            files.append(download(url, dest / "realtalk" / f"{name}.json", expected=checksum, root=dest))
    lme = [LONGMEMEVAL_FILES[w.split("_", 1)[1]] for w in wanted if w.startswith("longmemeval_")]
    if lme:
        files += fetch_hub_files(LONGMEMEVAL_REPO, LONGMEMEVAL_REVISION, lme, dest, BENCHMARK,
                                 expected=LONGMEMEVAL_CHECKSUMS)
    return files


def _require(path: Path, dataset: str, name: str) -> Path:
    if not path.exists():
        raise DataMissingError(missing_message(BENCHMARK, dataset, path, [name]))
    return path


def _sessions(conv: dict[str, Any]) -> list[int]:
    """Session numbers of a LoCoMo / REALTALK conversation, sorted (``session_<n>`` keys)."""
    nums = []
    for key in conv:
        parts = key.split("_")
        if key.startswith("session_") and not key.endswith("_date_time") and len(parts) == 2 and parts[1].isdigit():
            nums.append(int(parts[1]))
    return sorted(nums)


def conversation_turns(conv: dict[str, Any], text_key: str = "text") -> list[dict[str, Any]]:
    """The structured turns kvbench's conversational methods read (``Sample.meta["turns"]``, the format of
    ``kvbench.tasks.conversation``): ``[{"session", "date", "speaker", "text"}]`` of a LoCoMo / REALTALK
    conversation, sessions in order, empty sessions skipped."""
    return [{"session": n, "date": conv.get(f"session_{n}_date_time", ""), "speaker": turn.get("speaker", "Unknown"),
             "text": turn.get(text_key, turn.get("text", ""))}
            for n, turns in _nonempty_sessions(conv) for turn in turns]


def _nonempty_sessions(conv: dict[str, Any]) -> list[tuple[int, list[dict[str, Any]]]]:
    """(session number, turns) of a LoCoMo / REALTALK conversation in order, empty sessions skipped."""
    return [(n, conv[f"session_{n}"]) for n in _sessions(conv) if conv[f"session_{n}"]]


def longmemeval_turns(item: dict[str, Any]) -> list[dict[str, Any]]:
    """LongMemEval's haystack as structured turns (speaker = "User" / "Assistant")."""
    return [{"session": i, "date": date, "speaker": turn["role"].capitalize(), "text": turn["content"]}
            for i, (date, session) in enumerate(zip(item["haystack_dates"], item["haystack_sessions"], strict=True))
            for turn in session if turn["role"] in ("user", "assistant")]


def render_locomo(conv: dict[str, Any]) -> str:
    """EpiCache's LoCoMo context (``build_conversation_context``), including its caption placement."""
    text = CONV_START.format(conv.get("speaker_a", "Speaker A"), conv.get("speaker_b", "Speaker B"))
    for n, turns in _nonempty_sessions(conv):
        if f"session_{n}_date_time" in conv:
            text += f"\nDATE: {conv[f'session_{n}_date_time']}\n"
        text += "CONVERSATION:\n"
        for turn in turns:
            line = f'{turn.get("speaker", "Unknown")} said, "{turn.get("text", "")}"\n'
            if "blip_caption" in turn:
                line += f' and shared {turn["blip_caption"]}.'
            text += line + "\n"
    return text


def render_realtalk(conv: dict[str, Any]) -> str:
    """EpiCache's REALTALK context (``clean_text`` when present, image captions on their own line)."""
    names = conv.get("name", {})
    text = CONV_START.format(names.get("speaker_1", "Speaker 1"), names.get("speaker_2", "Speaker 2"))
    for n, turns in _nonempty_sessions(conv):
        if f"session_{n}_date_time" in conv:
            text += f"DATE: {conv[f'session_{n}_date_time']}\n"
        text += "CONVERSATION:\n"
        for turn in turns:
            speaker = turn.get("speaker", "Unknown")
            line = f'{speaker} said, "{turn.get("clean_text", turn.get("text", ""))}"'
            if "blip_caption" in turn:
                line += f'\n{speaker} shared, an image of "{turn["blip_caption"]}".'
            text += line + "\n"
        text += "\n"
    return text


def render_longmemeval(item: dict[str, Any]) -> str:
    """EpiCache's LongMemEval layout over the released haystack (sessions in the file's order)."""
    parts = [LONGMEMEVAL_START]
    for sid, date, session in zip(item["haystack_session_ids"], item["haystack_dates"], item["haystack_sessions"],
                                  strict=True):
        parts += [f"TIMESTAMP: {date}", f"SESSION: {sid}", "CONVERSATION:"]
        for turn in session:
            if turn["role"] in ("user", "assistant"):
                parts.append(f"{turn['role'].capitalize()}: {turn['content']}")
        parts.append("")
    return "\n".join(parts)


def load_locomo(data_dir: str = "data/longconvqa", categories: list[int] | None = None,
                temporal_suffix: bool = True) -> list[Sample]:
    """LoCoMo: one sample per conversation, its questions (default categories 1-4, as EpiCache) in file order."""
    keep = set(categories or [1, 2, 3, 4])
    if 5 in keep:
        raise UsageError("LoCoMo category 5 (adversarial) has no gold answer string (only adversarial_answer); "
                         "EpiCache drops it and so does kvbench")
    path = _require(Path(data_dir) / "locomo10.json", "LoCoMo locomo10.json", "locomo")
    samples = []
    for i, item in enumerate(json.loads(path.read_text(encoding="utf-8"))):
        questions = []
        for j, qa in enumerate(item["qa"]):
            cat = qa.get("category", 0)
            if cat not in keep:
                continue
            text = qa["question"] + (TEMPORAL_SUFFIX if cat == 2 and temporal_suffix else "")
            meta = {"category": LOCOMO_CATEGORIES.get(cat, str(cat)), "category_id": cat,
                    "evidence": qa.get("evidence", [])}
            questions.append(Question(id=f"q{j}", text=LOCOMO_QA.format(text), answers=[str(qa["answer"])], meta=meta))
        if questions:
            sid = str(item.get("sample_id", f"conv-{i}"))
            samples.append(Sample(id=sid, context=render_locomo(item["conversation"]), questions=questions,
                                  meta={"dataset": "locomo", "sessions": len(_sessions(item["conversation"])),
                                        "turns": conversation_turns(item["conversation"]),
                                        "turn_format": '{speaker} said, "{text}"'}))
    return samples


def _realtalk_records(data_dir: str) -> list[tuple[str, dict]]:
    root = Path(data_dir)
    merged = root / "realtalk10.json"
    if merged.exists():
        return [(f"conv-{i}", c) for i, c in enumerate(json.loads(merged.read_text(encoding="utf-8")))]
    folder = root / "realtalk"
    files = sorted(str(p) for p in folder.glob("*.json")) if folder.exists() else []  # EpiCache's merge order
    if not files:
        _require(folder / "Chat_1_Emi_Elise.json", "REALTALK data/Chat_*.json", "realtalk")
    return [(Path(f).stem, json.loads(Path(f).read_text(encoding="utf-8"))) for f in files]


def load_realtalk(data_dir: str = "data/longconvqa") -> list[Sample]:
    """REALTALK: one sample per chat, every question with a gold answer."""
    samples = []
    for sid, conv in _realtalk_records(data_dir):
        questions = [Question(id=f"q{j}", text=REALTALK_QA.format(qa["question"]), answers=[str(qa["answer"])],
                              meta={"category": str(qa.get("category", 0)), "evidence": qa.get("evidence", [])})
                     for j, qa in enumerate(conv["qa"]) if "answer" in qa]
        if questions:
            samples.append(Sample(id=sid, context=render_realtalk(conv), questions=questions,
                                  meta={"dataset": "realtalk", "sessions": len(_sessions(conv)),
                                        "turns": conversation_turns(conv, "clean_text"),
                                        "turn_format": '{speaker} said, "{text}"'}))
    return samples


def load_longmemeval(data_dir: str = "data/longconvqa", variant: str = "s") -> list[Sample]:
    """LongMemEval (cleaned release): one sample per question with its own session history."""
    if variant not in LONGMEMEVAL_FILES:
        raise UsageError(f"LongMemEval variant {variant!r}; choose one of {', '.join(LONGMEMEVAL_FILES)}")
    name = LONGMEMEVAL_FILES[variant]
    path = _require(Path(data_dir) / name, f"{LONGMEMEVAL_REPO} {name}", f"longmemeval_{variant}")
    samples = []
    for item in json.loads(path.read_text(encoding="utf-8")):
        qid = str(item["question_id"])
        text = LOCOMO_QA.format(item["question"]).replace("\nQuestion:", f"\nCurrent Date: {item['question_date']}"
                                                                          "\nQuestion:")
        q = Question(id="q0", text=text, answers=[str(item["answer"])],
                     meta={"category": item["question_type"], "abstention": qid.endswith("_abs")})
        samples.append(Sample(id=qid, context=render_longmemeval(item), questions=[q],
                              meta={"dataset": f"longmemeval_{variant}", "sessions": len(item["haystack_sessions"]),
                                    "turns": longmemeval_turns(item), "turn_format": "{speaker}: {text}"}))
    return samples
