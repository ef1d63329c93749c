"""NeedleBench v2 (OpenCompass): single/multi-needle retrieval and multi-needle reasoning in the model's tokens.

Source: open-compass/opencompass ``opencompass/datasets/needlebench_v2/`` (origin.py, parallel.py, multi.py).

Kinds (``kind=``), each over a context-length x depth grid:
  * ``single`` (single-needle retrieval, ``origin.py``): per repeat ``r`` the haystack lines are shuffled with seed
    ``r`` and a needle of the language is drawn with seed ``r``; the haystack is cut to ``length - length_buffer -
    needle tokens`` tokens and the needle (wrapped in newlines) is inserted at exactly ``int(n * depth / 100)``
    tokens, with no sentence snapping. Gold: the needle's keyword (``arg2``); metric ``needlebench_origin``.
  * ``multi_retrieval`` (``parallel.py``): one distinct needle at every depth of ``depths`` in one context, the
    questions merged with NeedleBench's answer-format request; gold: the keywords; metric ``needlebench_parallel``.
  * ``multi_reasoning`` (``multi.py``): a kinship chain of ``num_needles + 1`` names from ``names.json``; needle 1
    at ``depth``, each next one ``diff`` % of the haystack further; gold: the eldest name in ``\\boxed{}``;
    metric ``needlebench_atc``.

Prompts are NeedleBench's English/Chinese question-at-the-end prompts; the sample's context ends after
``</Document>\\n\\n`` and the question is the rest, so query-agnostic runs compress the document alone.

Data: ``PaulGrahamEssays.jsonl`` (haystack, field ``text``), ``needles.jsonl`` (``needle``, ``retrieval_question``,
``arg1``, ``arg2``, ``language``) and ``names.json`` from the hub dataset ``opencompass/NeedleBench``
(``scripts/prepare_data.py needlebench``), or ``data_dir`` pointing at a local copy; the JSONL files are read with
``datasets``' JSON builder (offline). ``source: synthetic`` (kind
``single`` only) uses the embedded suite instead: filler sentences and ``the code of <name> <codes> .`` needles with
a plain ``context + question`` prompt, so a needle grid runs offline on kvbench-tiny with no data at all.

``kind: kvcache_factory`` is the needle test of KV-compression papers (KVCache-Factory / PyramidKV
``run_needle_in_haystack.py``, adapted from FranxYao's): essays in file order, the fixed San Francisco needle snapped
back to the preceding period token, its raw prompt, scored with ``needle_rouge1`` (ROUGE-1 F; KVCache-Factory stores
10x), ``needle_word_recall`` (its heatmap score) and ``contains`` ("Dolores Park", case-insensitive). Its haystack is
NeedleBench's copy of the essays (KVCache-Factory reads the same essays as ``PaulGrahamEssays/*.txt`` in glob order).

Checked against OpenCompass's own ``needlebench_v2`` loaders (a5acc4b, run on the same files with the same
encoding): byte-identical prompts and gold answers for single-needle retrieval, multi-needle retrieval (with
OpenCompass's global ``random`` seeded as ``seed``) and multi-needle reasoning.

Deviations (documented, none changes what is scored):
  * ``length_tokenizer: tiktoken`` (the NeedleBench configs) counts lengths, cut points and depths in tiktoken's
    GPT-4 encoding as OpenCompass does (its encoding file is fetched by ``prepare_data.py needlebench``);
    ``length_tokenizer: model`` counts them in the evaluated model's tokens instead (contexts are then the same text
    units, not byte-identical to OpenCompass's).
  * ``multi_retrieval`` draws its needles with ``random.Random(seed)``; OpenCompass shuffles the needle file with
    the unseeded global ``random`` (not reproducible run to run).
  * v1's Levenshtein partial credit and the Chinese haystacks' ``zh_*.jsonl`` file list are not offered (v2 only;
    ``language: Chinese`` works with a haystack file given in ``haystack_files``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from kvbench.errors import UsageError
from kvbench.tasks import synthetic
from kvbench.tasks import synthetic_vocab as sv
from kvbench.tasks.base import Question, Sample
from kvbench.tasks.hub import DataMissingError, fetch_hub_files, load_local, missing_message

BENCHMARK = "needlebench"
#: OpenCompass loads these files from the hub at ``main`` (no revision) and no commit sha or checksum of them could
#: be found from this machine (no hub access); ``prepare`` records the commit ``main`` resolved to and each file's
#: SHA-256 in ``<data>/needlebench/source.json``. Set a sha here to pin it.
REPO, REVISION = "opencompass/NeedleBench", "main"
FILES = ["PaulGrahamEssays.jsonl", "needles.jsonl", "names.json"]
KINDS = ("single", "multi_retrieval", "multi_reasoning", "kvcache_factory")

#: KVCache-Factory / PyramidKV needle test (``run_needle_in_haystack.py``, LLaMA-3 / Mistral providers, raw prompt).
KVF_PROMPT = "<|im_start|> This is a very long story book: <book> {context} </book>.\n"
KVF_QUESTION = " Based on the content of the book, Question: {question}\nAnswer:"

PROMPT_EN = ("This is a test of long-text capability. You need to first read the long document below, and then "
             "answer the final question based on the information in the document.\nThe content of the long "
             "document is as follows\n\n<Document>\n{context}\n</Document>\n\n")
QUESTION_EN = "Based on the information in the document, now please answer: {question}\n"
PARALLEL_EN = ("This is a test of long-text capability. You need to first read the long document below, and then "
               "answer the final questions one by one based on the information in the document.\nThe content of the "
               "long document is as follows\n\n<Document>\n{context}\n</Document>\n\n")
PROMPT_ZH = ("这是一个长文本能力的测试，你需要首先阅读下面的长文档，然后根据文档中的信息回答最后的问题。"
             "\n长文档的内容如下\n\n<文档>\n{context}\n</文档>\n\n")
PARALLEL_ZH = ("这是一个长文本能力的测试，你需要首先阅读下面的长文档，然后根据文档中的信息，依次回答最后的问题。"
               "\n长文档的内容如下\n\n<文档>\n{context}\n</文档>\n\n")
QUESTION_ZH = "根据文档中的信息，现在请问：{question}\n"

#: The multi-needle reasoning prompt's examples and notes (``multi.py``, English, question at the end).
REASONING_EN = (  # follows QUESTION_EN, which ends with "\n"
    "\nFor example:\nExample 1: If James Hill's father is Jasmine Lane, and no further information about familial "
    "relationships is provided in the text, then the oldest relative James Hill can trace back to in the provided "
    "text is \\boxed{{Jasmine Lane}}.\nExample 2: If Andrew Williams's grandmother is Dan Newton, and Dan Newton's "
    "father is James Hill, and no further information about familial relationships is provided in the text, then "
    "the oldest relative Andrew Williams can trace back to in the provided text is \\boxed{{James Hill}}.\nExample "
    "3: If Jeff White's father is Kevin Le, Dan Newton's grandmother is Jeff White, and Jeff White's father is Kevin "
    "Le, and Shelley Mills is Dan Newton's great-granddaughter, and no further information about familial "
    "relationships is provided in the text, then the oldest relative Shelley Mills can trace back to in the "
    "provided text is \\boxed{{Kevin Le}}.\n\nNotes:\n1. You do not need to worry about the gender consistency of "
    "names in this test. For example, a name that is typically considered feminine can still be the father of "
    "another person. Our primary focus is on who is older.\n2. Ignore surname inheritance issues. For instance, "
    "Andrew Williams could still be the biological father of Christopher Baker. We only care about who is older and "
    "do not need to consider whether a child should inherit the father's or mother's surname.\n3. At the end of "
    "your response, remember to put your final answer within \\boxed{{}}. For example: \"So the oldest relative "
    "'{last_person}' can trace back to in the provided text is \\boxed{{(your answer here)}}.\"\n\n"
)

#: ``atc.py`` (imported by ``multi.py``): relationship templates and terms, English.
RELATION_TEMPLATES_EN = [
    "{A} is {B}'s {relationship}.",
    "{B}'s {relationship} is {A}.",
    "{A}, as {B}'s {relationship}, has a significant impact on {B}'s upbringing.",
    "{A} is not only {B}'s {relationship} but also {B}'s role model.",
    "During {B}'s upbringing, {A} was not only {B}'s {relationship}, but also {B}'s guardian.",
    "For {B}, {A} is not just a {relationship}, but also a friend.",
    "For {B}, {A} is more than just a {relationship}; {A} is a lifelong mentor of {B}.",
]
RELATION_TERMS_EN = ["father", "mother", "dad", "mom", "grandfather", "grandmother", "maternal grandmother",
                     "maternal grandfather", "paternal grandfather", "paternal grandmother"]


TIKTOKEN_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"  # gpt-4's encoding


def prepare(dest: Path, names: list[str] | None = None) -> list[Path]:
    """Download NeedleBench's haystack, needle and name files (pinned) and tiktoken's GPT-4 encoding into ``dest``."""
    files = fetch_hub_files(REPO, REVISION, [f for f in FILES if not names or f.split(".")[0] in names], dest,
                            BENCHMARK)
    if not names or "tiktoken" in names:
        import tiktoken

        with _tiktoken_cache(dest):
            tiktoken.encoding_for_model("gpt-4")  # fetched once, checked against tiktoken's pinned sha256
        files.append(_tiktoken_file(dest))
    return files


def _tiktoken_file(data_dir: str | Path) -> Path:
    """Where tiktoken caches the GPT-4 encoding under ``TIKTOKEN_CACHE_DIR=<data_dir>/tiktoken``."""
    return Path(data_dir) / "tiktoken" / hashlib.sha1(TIKTOKEN_URL.encode()).hexdigest()  # noqa: S324 - its key


@contextlib.contextmanager
def _tiktoken_cache(data_dir: str | Path) -> Iterator[None]:
    saved = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(Path(data_dir) / "tiktoken")
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TIKTOKEN_CACHE_DIR")
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = saved


class TiktokenTokenizer:
    """tiktoken's GPT-4 encoding behind the two tokenizer calls the builders use (NeedleBench's length unit)."""

    def __init__(self, data_dir: str) -> None:
        import tiktoken

        if not _tiktoken_file(data_dir).exists():  # never touch the network from a loader
            raise DataMissingError(missing_message(BENCHMARK, "tiktoken's GPT-4 encoding (cl100k_base)",
                                                   _tiktoken_file(data_dir), ["tiktoken"]))
        with _tiktoken_cache(data_dir):
            self.enc = tiktoken.encoding_for_model("gpt-4")

    def __call__(self, text: str, add_special_tokens: bool = False) -> SimpleNamespace:
        return SimpleNamespace(input_ids=self.enc.encode(text))

    def decode(self, ids: list[int], **_: Any) -> str:
        return self.enc.decode(ids)


def _file(data_dir: str, name: str) -> Path:
    path = Path(data_dir) / name
    if not path.exists():
        raise DataMissingError(missing_message(BENCHMARK, f"{REPO} {name}", path, [name.split(".")[0]]))
    return path


@cache
def _jsonl(path: str) -> list[dict]:
    """A JSONL file of NeedleBench read with ``datasets``' JSON builder (offline), as a list of records."""
    return load_local(path).to_list()


class Builder:
    """Token-level haystack cutting and needle insertion in the evaluated model's tokens."""

    def __init__(self, tokenizer: Any, lines: list[str], length_buffer: int) -> None:
        self.tok, self.lines, self.buffer = tokenizer, lines, length_buffer

    def ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids

    def haystack(self, repeat: int, length: int, needles: list[str]) -> list[int]:
        """Shuffled lines (seed = repeat) accumulated to ``length - buffer - needle tokens`` tokens."""
        lines = list(self.lines)
        random.Random(repeat).shuffle(lines)
        target = max(length - self.buffer - sum(len(self.ids(n)) for n in needles), 0)
        tokens: list[int] = []
        for line in lines:
            tokens.extend(self.ids(line))
            if len(tokens) >= target:
                break
        return tokens[:target]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _synthetic_lines(seed: int) -> list[str]:
    rng = random.Random(f"needlebench-synthetic/{seed}")
    return [" ".join(s) for s in synthetic._filler(rng, 60_000)]


def _prompt(language: str, parallel: bool = False) -> tuple[str, str]:
    if language == "English":
        return (PARALLEL_EN if parallel else PROMPT_EN), QUESTION_EN
    if language == "Chinese":
        return (PARALLEL_ZH if parallel else PROMPT_ZH), QUESTION_ZH
    raise UsageError(f"language={language!r}; choose English or Chinese")


def _single(b: Builder, needles: list[dict], length: int, depth: float, repeat: int, language: str, raw: bool
            ) -> tuple[str, Question]:
    pick = random.Random(repeat).choice(needles)
    needle = pick["needle"] if raw else "\n" + pick["needle"] + "\n"
    tokens = b.haystack(repeat, length, [needle])
    cut = int(len(tokens) * depth / 100)
    text = b.decode(tokens[:cut] + b.ids(needle) + tokens[cut:])
    meta = {"depth": depth, "needle": pick["needle"].strip(), "keyword": pick["arg2"],
            "metric_kwargs": {"needle": pick["needle"].strip()}}
    if raw:  # embedded suite: the question ends where the answer starts
        return text + " ", Question("q0", pick["retrieval_question"], [pick["arg2"]], meta)
    head, question = _prompt(language)
    return head.format(context=text), Question("q0", question.format(question=pick["retrieval_question"]),
                                               [pick["arg2"]], meta)


def _kvcache_factory(b: Builder, needle: dict, length: int, depth: float) -> tuple[str, Question]:
    """KVCache-Factory's ``run_needle_in_haystack.py``: haystack in file order (repeated), cut to ``length - buffer -
    needle`` tokens, the needle inserted after the nearest period token at or before the depth (appended at 100)."""
    text = "\n" + needle["needle"] + "\n"
    need = b.ids(text)
    target = max(length - b.buffer - len(need), 0)
    tokens: list[int] = []
    if not any(b.ids(line) for line in b.lines[:50]):
        raise UsageError("the needle haystack is empty")
    while len(tokens) < target:  # the essays are repeated until long enough
        for line in b.lines:
            tokens.extend(b.ids(line))
            if len(tokens) >= target:
                break
    tokens = tokens[:target]
    if depth >= 100:
        tokens = tokens + need
    else:
        at = int(len(tokens) * depth / 100)
        while at > 0 and b.decode(tokens[at - 1 : at]).strip() != ".":  # the needle starts a sentence
            at -= 1
        tokens = tokens[:at] + need + tokens[at:]
    meta = {"depth": depth, "needle": needle["needle"], "keyword": needle["keyword"],
            "metric_kwargs": {"needle": needle["needle"], "needle_answer": needle["answer"]}}
    context = KVF_PROMPT.format(context=b.decode(tokens))
    return context, Question("q0", KVF_QUESTION.format(question=needle["retrieval_question"]), [needle["keyword"]],
                             meta)


def _parallel(b: Builder, needles: list[dict], length: int, depths: list[float], repeat: int, language: str
              ) -> tuple[str, Question]:
    chosen = list(needles)
    random.Random(repeat).shuffle(chosen)
    texts = ["\n" + n["needle"] + "\n" for n in chosen]
    tokens = b.haystack(repeat, length, texts)
    points = [int(len(tokens) * d / 100) for d in depths]
    shift = 0
    for point, text in zip(points, texts, strict=True):
        at = min(point + shift, len(tokens))
        ids = b.ids(text)
        tokens = tokens[:at] + ids + tokens[at:]
        shift += len(ids)
    if language == "English":
        questions = "、".join(n["retrieval_question"].split("?")[0] + "?" for n in chosen)
        fmt = "、".join(n["retrieval_question"].split("'")[1].split(".")[0] for n in chosen)
        asked = questions + "Please answer in the format of '" + fmt + "'"
    else:
        questions = "、".join(n["retrieval_question"].split("？")[0] + "？" for n in chosen)
        fmt = "、".join(n["retrieval_question"].split("'")[1].split("。")[0] for n in chosen)
        asked = questions + "请按照'" + fmt + "'的格式回答。"
    head, question = _prompt(language, parallel=True)
    meta = {"depths": list(depths), "keywords": [n["arg2"] for n in chosen]}
    return head.format(context=b.decode(tokens)), Question("q0", question.format(question=asked),
                                                           [n["arg2"] for n in chosen], meta)


def kinship_chain(repeat: int, all_names: list[str], num_needles: int) -> tuple[list[str], str, str]:
    """``get_random_needles``: shuffled relation sentences, the eldest name (answer) and the last person."""
    rng = random.Random(repeat)
    names = rng.sample(all_names, num_needles + 1)
    story = []
    for i in range(len(names) - 1):
        template, term = rng.choice(RELATION_TEMPLATES_EN), rng.choice(RELATION_TERMS_EN)
        story.append(template.format(A=names[i], B=names[i + 1], relationship=term))
    rng.shuffle(story)
    return story, names[0], names[-1]


def _reasoning(b: Builder, all_names: list[str], length: int, depth: float, repeat: int, num_needles: int,
               diff: float) -> tuple[str, Question]:
    story, eldest, last = kinship_chain(repeat, all_names, num_needles)
    texts = ["\n" + s + "\n" for s in story]
    tokens = b.haystack(repeat, length, texts)
    needle_ids = [b.ids(t) for t in texts]
    total, points = len(tokens), []
    for i in range(len(needle_ids)):
        point = int(total * depth / 100) if i == 0 else int(points[-1] + len(needle_ids[i - 1]) + total * diff / 100)
        points.append(min(point, total + sum(len(n) for n in needle_ids[:i])))
    for i, ids in enumerate(needle_ids):
        tokens = tokens[: points[i]] + ids + tokens[points[i] :]
        points[i + 1 :] = [p + len(ids) for p in points[i + 1 :]]
    asked = (f"Given the context described above, who is the eldest relative that '{last}' can trace back to in "
             "the context?")
    text = QUESTION_EN.format(question=asked) + REASONING_EN.format(last_person=last)
    meta = {"depth": depth, "num_needles": num_needles, "needles": story}
    return PROMPT_EN.format(context=b.decode(tokens)), Question("q0", text, [eldest], meta)


def make_samples(kind: str, tokenizer: Any, lengths: list[int], depths: list[float], n_repeats: int = 10,
                 length_buffer: int = 500, language: str = "English", data_dir: str = "data/needlebench",
                 source: str = "file", num_needles: int = 2, diff: float = 10, seed: int = 0,
                 needle: dict[str, str] | None = None, haystack_files: list[str] | None = None,
                 length_tokenizer: str = "model", limit: int | None = None) -> list[Sample]:
    """NeedleBench samples over ``lengths`` x ``depths`` x ``n_repeats`` (for ``multi_retrieval`` the depths are
    the needles' positions in every context, and the grid is lengths x repeats).

    Args:
        kind: ``single``, ``multi_retrieval`` or ``multi_reasoning``.
        tokenizer: the evaluated model's tokenizer (given by the runner); lengths are in its tokens.
        lengths: context lengths (NeedleBench 4k: 1000, 2000, 3000, 4000; 8k: 5000 ... 8000).
        depths: depth percents (v2: 0, 10, ..., 100).
        n_repeats: NeedleBench's ``num_repeats_per_file`` (10 single, 25 multi-retrieval).
        length_buffer: tokens left free for the prompt (v2: 500 English, 200 Chinese).
        data_dir: directory with NeedleBench's files; ``source: synthetic`` needs none (``single`` only).
        num_needles, diff: multi-needle reasoning chain length (2-5) and spacing in percent of the haystack.
        seed: the needle draw of ``multi_retrieval`` and the synthetic source.
        needle: ``kvcache_factory``'s fixed needle: ``needle``, ``retrieval_question``, ``keyword`` (the reference)
            and ``answer`` (the phrase of the word-recall score).
        haystack_files: haystack JSONL files (field ``text``) relative to ``data_dir`` or absolute (default
            NeedleBench's ``PaulGrahamEssays.jsonl``; e.g. the ``zh_*.jsonl`` files for Chinese).
        length_tokenizer: ``model`` (lengths and depths in the evaluated model's tokens) or ``tiktoken``
            (NeedleBench's own unit, tiktoken's GPT-4 encoding, cached by ``prepare_data.py needlebench``).
        limit: build only the first ``limit`` samples.
    """
    if length_tokenizer not in ("model", "tiktoken"):
        raise UsageError(f"length_tokenizer={length_tokenizer!r}; choose model or tiktoken")
    if kind not in KINDS:
        raise UsageError(f"unknown NeedleBench kind {kind!r}; choose one of {', '.join(KINDS)}")
    if source not in ("file", "synthetic") or (source == "synthetic" and kind != "single"):
        raise UsageError(f"source={source!r}: use file, or synthetic with kind=single")
    raw = source == "synthetic"
    if raw:
        lines, needles = _synthetic_lines(seed), _synthetic_needles(seed)
    else:
        lines = [r["text"] for f in haystack_files or [FILES[0]] for r in _jsonl(str(_file(data_dir, f)))]
        if kind == "kvcache_factory":
            if not needle or set(needle) < {"needle", "retrieval_question", "keyword", "answer"}:
                raise UsageError("kind=kvcache_factory needs needle: {needle, retrieval_question, keyword, answer}")
            needles = []
        elif kind != "multi_reasoning":
            needles = [n for n in _jsonl(str(_file(data_dir, FILES[1]))) if n.get("language") == language]
            if not needles:
                raise UsageError(f"no {language} needle in {Path(data_dir) / FILES[1]}")
    b = Builder(TiktokenTokenizer(data_dir) if length_tokenizer == "tiktoken" else tokenizer, lines, length_buffer)
    samples: list[Sample] = []
    cells = [(L, None) for L in lengths] if kind == "multi_retrieval" else [(L, d) for L in lengths for d in depths]
    if kind == "multi_retrieval":
        needles = _unique_needles(_jsonl(str(_file(data_dir, FILES[1]))), len(depths), seed, language)
    if kind == "multi_reasoning":
        names = json.loads(_file(data_dir, FILES[2]).read_text(encoding="utf-8"))[language].split(",")
    for length, depth in cells:
        for r in range(n_repeats):
            if limit is not None and len(samples) >= limit:
                return samples
            if kind == "single":
                context, q = _single(b, needles, length, depth, r, language, raw)
            elif kind == "multi_retrieval":
                context, q = _parallel(b, needles, length, depths, r, language)
            elif kind == "kvcache_factory":
                context, q = _kvcache_factory(b, dict(needle), length, depth)
            else:
                context, q = _reasoning(b, names, length, depth, r, num_needles, diff)
            cell = f"L{length}" + ("" if depth is None else f"-d{depth:g}")
            meta = {"kind": kind, "target_length": length, "repeat": r, "source": source, "language": language,
                    "length_tokenizer": length_tokenizer}
            samples.append(Sample(id=f"{kind}-{cell}-r{r}", context=context, questions=[q], meta=meta))
    return samples


def _unique_needles(entries: list[dict], n: int, seed: int, language: str) -> list[dict]:
    """``get_unique_entries``: the needle file's lines shuffled (``Random(seed)`` where OpenCompass uses the global,
    unseeded ``random``), then the first ``n`` of the language with distinct ``arg1`` and ``arg2``."""
    pool = list(entries)
    random.Random(seed).shuffle(pool)
    seen1, seen2, out = set(), set(), []
    for entry in (e for e in pool if e.get("language") == language):
        a1, a2 = entry.get("arg1", ""), entry.get("arg2", "")
        if a1 not in seen1 and a2 not in seen2:
            seen1.add(a1)
            seen2.add(a2)
            out.append(entry)
        if len(out) == n:
            return out
    raise UsageError(f"NeedleBench multi-needle retrieval needs {n} distinct needles; the file has {len(out)}")


def _synthetic_needles(seed: int) -> list[dict]:
    """Embedded-suite needles in NeedleBench's needle format (kvbench-tiny can retrieve these)."""
    rng = random.Random(f"needlebench-synthetic-needles/{seed}")
    out = []
    for name in sv.NAMES:
        codes = rng.sample(sv.CODES, 3)
        out.append({"needle": " ".join(synthetic.needle_words(name, codes)), "arg1": name,
                    "arg2": " ".join(codes), "retrieval_question": synthetic.question_text(name),
                    "language": "English"})
    return out
