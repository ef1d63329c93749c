"""RULER: metrics on hand-computed cases, synthesis with the model's tokenizer, QA loaders on fixtures in the release
formats (SQuAD 2.0 dev, HotpotQA dev distractor), the offline message, and a run end to end on kvbench-tiny."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from transformers import AutoTokenizer

from kvbench.metrics import score_prediction
from kvbench.models import ASSETS
from kvbench.runner import run
from kvbench.tasks import load_samples, ruler
from kvbench.tasks.hub import DataMissingError

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(ASSETS / "kvbench-tiny")


def n_tokens(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False).input_ids)


# ------------------------------------------------------------------------------------------------ metrics


@pytest.mark.parametrize(("pred", "refs", "all_", "part"), [
    ("The special magic number is 1234567.", ["1234567"], 1.0, 1.0),
    ("1234567 and 7654321", ["1234567", "7654321", "1111111", "2222222"], 0.5, 1.0),
    ("VAR ABCDE, VAR FGHIJ", ["ABCDE", "FGHIJ", "KLMNO", "PQRST", "UVWXY"], 0.4, 1.0),
    ("12345678", ["1234567"], 1.0, 1.0),  # substring semantics: RULER's false positive kept
    ("Paris", ["paris", "Paris, France"], 0.5, 1.0),
    ("  \x00berlin\x1f ", ["Berlin"], 1.0, 1.0),
    ("", ["x"], 0.0, 0.0),
])
def test_string_match_all_and_part_as_ruler(pred, refs, all_, part) -> None:
    scores = score_prediction(pred, refs, ["string_match_all", "string_match_part"])
    assert scores == {"string_match_all": pytest.approx(all_), "string_match_part": part}


# ------------------------------------------------------------------------------------------------ synthesis


SYNTHETIC = [t for t in ruler.TASKS if not t.startswith("qa")]


@pytest.mark.parametrize("task", SYNTHETIC)
def test_every_synthetic_task_fits_the_length_and_contains_its_answers(tok, task) -> None:
    samples = ruler.make_samples(task, tok, [1024, 2048], n_samples=2, essay="synthetic")
    assert [s.id for s in samples] == [f"{task}-L{n}-{i}" for n in (1024, 2048) for i in range(2)]
    for s in samples:
        q = s.questions[0]
        total = n_tokens(tok, s.context + q.text + q.answer_prefix) + ruler.TEMPLATES[ruler.TASKS[task]["task"]][
            "tokens_to_generate"]
        assert total == s.meta["length"] <= s.meta["target_length"]
        prefix = ruler.TEMPLATES[ruler.TASKS[task]["task"]]["answer_prefix"]
        assert q.answer_prefix.startswith(prefix.split("{")[0].replace(" are", " is")[:12])
        assert prefix.split("{")[0][:12] not in q.text, "the answer prefix is not part of the question"
        if task != "fwe":  # fwe's answers are the most frequent coded words
            for answer in q.answers:
                assert answer in s.context
    for target in (1024, 2048):  # RULER shrinks an overlong sample by `incremental` units (500 essay words)
        assert max(s.meta["length"] for s in samples if s.meta["target_length"] == target) > 0.9 * target, \
            "the binary search fills the length"
    assert samples[0].context != samples[1].context, "samples differ"
    again = ruler.make_samples(task, tok, [2048], n_samples=1, essay="synthetic")
    assert again[0].context == samples[2].context, "a sample does not depend on the other lengths"


def test_niah_single_rewrites_the_template_to_singular_and_multi_keeps_plural(tok) -> None:
    single = ruler.make_samples("niah_single_1", tok, [1024], n_samples=1)[0]
    q = single.questions[0]
    assert single.context.startswith("A special magic number is hidden within the following text.")
    assert q.text.startswith("\nWhat is the special magic number for ")
    assert q.answer_prefix.startswith(" The special magic number for ") and q.answer_prefix.endswith(" is")
    key = re.search(r"for (\S+) mentioned", q.text).group(1)
    assert f"One of the special magic numbers for {key} is: {q.answers[0]}." in single.context
    assert single.context.count("The grass is green.") > 20  # noise haystack, newline-joined
    multi = ruler.make_samples("niah_multiquery", tok, [1024], n_samples=1, essay="synthetic")[0]
    mq = multi.questions[0]
    assert multi.context.startswith("Some special magic numbers are hidden")
    assert len(mq.answers) == 4 and ", and " in mq.text and mq.answer_prefix.endswith(" are")


def test_niah_multikey_inserts_distractor_keys_and_needle_haystacks(tok) -> None:
    mk1 = ruler.make_samples("niah_multikey_1", tok, [1024], n_samples=1, essay="synthetic")[0]
    assert mk1.context.count("One of the special magic numbers for ") == 4
    mk3 = ruler.make_samples("niah_multikey_3", tok, [1024], n_samples=1)[0]
    lines = mk3.context.split("\n")[1:]
    assert all(line.startswith("One of the special magic uuids for ") for line in lines[:-1])
    assert sum(mk3.questions[0].answers[0] in line for line in lines) == 1


def test_vt_chain_and_icl_example(tok) -> None:
    s = ruler.make_samples("vt", tok, [2048], n_samples=1)[0]
    q = s.questions[0]
    names = q.answers
    assert len(names) == 5 and all(len(n) == 5 and n.isupper() for n in names)
    value = re.search(r"assigned the value (\d+)", q.text).group(1)
    assert f"VAR {names[0]} = {value}" in s.context
    for a, b in zip(names, names[1:], strict=False):
        assert f"VAR {b} = VAR {a}" in s.context
    assert s.context.count("Memorize and track the chain(s)") == 2, "one in-context example precedes the task"
    assert "they are: " in q.answer_prefix and "5 variables are assigned the value" in q.answer_prefix


def test_cwe_and_fwe_counts(tok) -> None:
    cwe = ruler.make_samples("cwe", tok, [4096], n_samples=1)[0]
    task_list = cwe.context.split("Memorize the ones that appear most often.\n")[-1]
    counts = Counter(re.findall(r"\d+\. (\S+)", task_list))
    assert {w: counts[w] for w in cwe.questions[0].answers} == dict.fromkeys(cwe.questions[0].answers, 30)
    assert set(counts.values()) == {30, 3}
    fwe = ruler.make_samples("fwe", tok, [2048], n_samples=1)[0]
    words = Counter(fwe.context.split("coded words. ")[1].split())
    top = [w for w, _ in words.most_common(4)]
    assert top[0] == "..." and top[1:] == fwe.questions[0].answers
    assert ruler.zeta(2.0) == pytest.approx(1.6449340668482264, abs=1e-12)


# ------------------------------------------------------------------------------------------------ QA sources


def write_qa_fixtures(root: Path) -> None:
    """SQuAD 2.0 dev (``dev-v2.0.json``) and HotpotQA dev distractor files in their release formats."""
    paragraphs = [{"context": f"Paragraph {i} says the tower was built by Gustave {i}.",
                   "qas": [{"question": f"Who built tower {i}?", "id": f"id{i}",
                            "answers": [{"text": f"Gustave {i}", "answer_start": 35},
                                        {"text": f"Gustave {i}.", "answer_start": 35}],
                            "is_impossible": False},
                           {"question": "Unanswerable?", "id": f"u{i}", "answers": [], "plausible_answers": [],
                            "is_impossible": True}]} for i in range(6)]
    squad = {"version": "v2.0", "data": [{"title": "Tower", "paragraphs": paragraphs[:3]},
                                         {"title": "Other", "paragraphs": paragraphs[3:]}]}
    (root / "squad.json").write_text(json.dumps(squad))
    hotpot = [{"_id": f"h{i}", "answer": f"river {i}", "question": f"Which river flows past town {i}?",
               "supporting_facts": [[f"Town {i}", 0]], "type": "bridge", "level": "easy",
               "context": [[f"Town {i}", [f"Town {i} lies on the river {i}.", " It is old."]],
                           [f"Hill {i}", [f"Hill {i} is high."]]]} for i in range(5)]
    (root / "hotpotqa.json").write_text(json.dumps(hotpot))


def test_qa_tasks_read_the_release_files(tok, tmp_path) -> None:
    write_qa_fixtures(tmp_path)
    squad = ruler.make_samples("qa_1", tok, [512], n_samples=3, data_dir=str(tmp_path))
    assert len(squad) == 3
    for i, s in enumerate(squad):
        q = s.questions[0]
        assert q.text == f"\n\nAnswer the question based on the given documents. Only give me the answer and do not " \
                         f"output any other words.\n\nQuestion: Who built tower {i}?"
        assert q.answers == [f"Gustave {i}", f"Gustave {i}."] and q.answer_prefix == " Answer:"
        assert f"Paragraph {i} says" in s.context and "Document 1:\n" in s.context
    hotpot = ruler.make_samples("qa_2", tok, [512], n_samples=2, data_dir=str(tmp_path))
    assert hotpot[1].questions[0].answers == ["river 1"]
    assert "Town 1\nTown 1 lies on the river 1. It is old." in hotpot[1].context
    assert score_prediction(" river 1", ["river 1"], ["string_match_part"]) == {"string_match_part": 1.0}


def test_missing_files_offline_name_the_dataset_path_and_prepare_command(tok, tmp_path) -> None:
    with pytest.raises(DataMissingError, match=r"squad\.json.*prepare_data\.py ruler --only squad"):
        ruler.make_samples("qa_1", tok, [512], n_samples=1, data_dir=str(tmp_path))
    with pytest.raises(DataMissingError, match=r"PaulGrahamEssays\.jsonl.*prepare_data\.py ruler --only essay"):
        ruler.make_samples("niah_single_2", tok, [512], n_samples=1, data_dir=str(tmp_path))


def test_essay_from_needlebench_jsonl_copy(tok, tmp_path) -> None:
    lines = [{"text": f"Essay {i} starts here. It has several sentences about startups. The end of essay {i}."}
             for i in range(30)]
    (tmp_path / "PaulGrahamEssays.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    s = ruler.make_samples("niah_single_2", tok, [1024], n_samples=1, data_dir=str(tmp_path))[0]
    assert "It has several sentences about startups." in s.context and s.meta["essay"] == "file"


# ------------------------------------------------------------------------------------------------ configs and runs


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_thirteen_task_configs_with_official_generation_lengths_and_metrics() -> None:
    names = sorted(p.stem for p in (CONF / "task" / "ruler").glob("*.yaml"))
    assert names == sorted(ruler.TASKS) and len(names) == 13
    for name in names:
        task = composed(f"task=ruler/{name}").task
        kind = ruler.TASKS[name]["task"]
        assert task.name == f"ruler/{name}" and task.loader.task == name
        assert task.max_new_tokens == ruler.TEMPLATES[kind]["tokens_to_generate"]
        assert list(task.metrics) == (["string_match_part"] if kind == "qa" else ["string_match_all"])


def test_load_samples_passes_tokenizer_and_limit(tok) -> None:
    task = composed("task=ruler/niah_single_1", "task.loader.lengths=[1024]").task
    with pytest.raises(Exception, match="tokenizer"):
        load_samples(task, limit=1)
    assert len(load_samples(task, limit=2, tokenizer=tok)) == 2


def test_ruler_runs_end_to_end_on_the_embedded_model(tmp_path) -> None:
    cfg = composed("task=ruler/niah_single_1", "task.loader.lengths=[512]", "limit=2", "method=snapkv",
                   "budget=0.5", f"paths.results={tmp_path}", "progress=false", "task.max_new_tokens=4")
    metrics = run(cfg)
    assert metrics["n_questions"] == 2 and set(metrics["score"]) == {"string_match_all"}
    records = [json.loads(line) for line in (Path(cfg.run_dir) / "predictions.jsonl").read_text().splitlines()]
    assert all(r["question_tokens"] > 20 for r in records), "question + answer prefix are prompted"


def test_answer_prefix_follows_the_chat_template() -> None:
    """RULER: model_template.format(task_template) + answer_prefix, i.e. the prefix pre-fills the assistant turn."""
    from text_tokenizer import byte_bpe

    from kvbench.pipeline import encode
    from kvbench.prompt import encode_joint

    chat = byte_bpe().__class__(tokenizer_object=byte_bpe().backend_tokenizer, bos_token="<s>", eos_token="</s>")
    chat.chat_template = ("{% for m in messages %}[USER]{{ m['content'] }}[/USER]{% endfor %}"
                          "{% if add_generation_prompt %}[BOT]{% endif %}")
    s = ruler.make_samples("niah_single_1", chat, [512], n_samples=1)[0]
    q = s.questions[0]
    for ctx, q_ids in (encode(chat, s.context, q.text, True, None, q.answer_prefix),
                       encode_joint(chat, s.context, q.text, chat=True, max_length=None, truncation="context",
                                    answer_prefix=q.answer_prefix)):
        full = chat.decode(ctx + q_ids)
        assert full.endswith("mentioned in the provided text?[/USER][BOT]" + q.answer_prefix)
        assert full.startswith("[USER]A special magic number is hidden")


def test_prepare_fetches_essays_and_ruler_qa_release_files(monkeypatch, tmp_path) -> None:
    urls, hub = [], []
    monkeypatch.setattr(ruler, "download", lambda url, path, **kw: urls.append((url, path.name)) or path)
    monkeypatch.setattr(ruler, "fetch_hub_files",
                        lambda repo, rev, files, dest, bench, **kw: hub.append((repo, files)) or [])
    ruler.prepare(tmp_path, None)
    assert hub == [("opencompass/NeedleBench", ["PaulGrahamEssays.jsonl"])]
    assert urls == [("https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v2.0.json", "squad.json"),
                    (ruler.QA_FILES["hotpotqa"][1], "hotpotqa.json")]


def test_ruler_table_has_a_column_per_task_and_the_13_task_mean_only_when_complete(tmp_path) -> None:
    import sys

    import pandas as pd

    sys.path.insert(0, str(CONF.parent / "scripts"))
    from ruler_table import table

    rows = []
    for i, task in enumerate(ruler.TASKS):
        metric = "string_match_part" if task.startswith("qa") else "string_match_all"
        rows.append({"task.name": f"ruler/{task}", "model.name": "m", "method.name": "snapkv",
                     "allocator.name": "uniform", "protocol": "query_aware", "budget": 0.2,
                     f"score_by_length.4096.{metric}": float(i), f"score_by_length.8192.{metric}": 50.0})
    rows.append({**rows[0], "method.name": "h2o", "score_by_length.4096.string_match_all": 12.345})
    wide = table(pd.DataFrame(rows))
    snap4k = wide.loc[("m", "snapkv", "uniform", "query_aware", 0.2, 4096)]
    assert snap4k["niah_single_1"] == 0.0 and snap4k["qa_2"] == 12.0 and snap4k["avg_13"] == 6.0
    assert wide.loc[("m", "snapkv", "uniform", "query_aware", 0.2, 8192)]["avg_13"] == 50.0
    h2o = wide.loc[("m", "h2o", "uniform", "query_aware", 0.2, 4096)]
    assert h2o["niah_single_1"] == 12.35 and pd.isna(h2o["avg_13"])
