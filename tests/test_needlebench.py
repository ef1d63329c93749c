"""NeedleBench v2 and the needle scores of KV papers: metrics on hand-computed cases, the three kinds on fixture files
in NeedleBench's formats, the offline message, and needle grids end to end on kvbench-tiny (synthetic source)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from text_tokenizer import byte_bpe

from kvbench.metrics import score_prediction
from kvbench.metrics.needlebench import atc_postprocess
from kvbench.runner import run
from kvbench.tasks import load_samples
from kvbench.tasks import needlebench as nb
from kvbench.tasks.hub import DataMissingError

CONF = Path(__file__).resolve().parents[1] / "conf"
NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."


@pytest.fixture(scope="module")
def tok():
    """A byte-level BPE that round-trips text (haystacks are cut and decoded in token space)."""
    return byte_bpe()


# ------------------------------------------------------------------------------------------------ metrics


def test_needlebench_origin_is_a_case_sensitive_keyword_hit() -> None:
    assert score_prediction("The code is Dolores Park.", ["Dolores Park"], ["needlebench_origin"]) == {
        "needlebench_origin": 1.0}
    assert score_prediction("the code is dolores park.", ["Dolores Park"], ["needlebench_origin"]) == {
        "needlebench_origin": 0.0}


def test_needlebench_parallel_is_the_fraction_of_keywords_found() -> None:
    s = score_prediction("Alpha, gamma and Delta", ["Alpha", "Beta", "Gamma", "Delta"], ["needlebench_parallel"])
    assert s == {"needlebench_parallel": 0.5}


@pytest.mark.parametrize(("pred", "boxed", "score"), [
    ("So the oldest relative is \\boxed{Jasmine Lane}.", "Jasmine Lane", 1.0),
    ("first \\boxed{Kevin Le} then \\boxed{\\text{Jasmine  Lane}}", "Jasmine Lane", 1.0),
    ("\\boxed{{Jasmine Lane}}", "Jasmine Lane", 1.0),
    ("\\boxed{'Jasmine~Lane'}", "Jasmine Lane", 1.0),
    ("Jasmine Lane", "None", 0.0),  # no box: OpenCompass's "None"
    ("\\boxed{Jasmine Lane Smith}", "Jasmine Lane Smith", 0.0),
    ("\\boxed{Jasmine Lane} so \\boxed Kevin", "None", 0.0),  # the last \\boxed must be \\boxed{...}
    ("\\fbox{Jasmine Lane}", "None", 0.0),
])
def test_needlebench_atc_boxed_exact_match(pred, boxed, score) -> None:
    assert atc_postprocess(pred) == boxed
    assert score_prediction(pred, ["Jasmine Lane"], ["needlebench_atc"]) == {"needlebench_atc": score}


@pytest.mark.parametrize(("response", "rouge_x10", "recall"), [
    ("eat a sandwich and sit in Dolores Park on a sunny day.", 7.27, 1.0),
    (NEEDLE, 10.0, 1.0),
    ("Go to the Golden Gate Bridge.", 1.48, 0.0),
    ("eat a sandwich and sit in dolores park on a sunny day", 7.27, 10 / 11),
    ("Eat a sandwich in Dolores Park.", None, 5 / 11),
    ("", 0.0, 0.0),
])
def test_kv_paper_needle_scores(response, rouge_x10, recall) -> None:
    """KVCache-Factory: stored score = rouge1 F x 10; heatmap = unique-word recall of the 11-word answer."""
    s = score_prediction(response, ["eat a sandwich and sit in dolores park on a sunny day."],
                         ["needle_rouge1", "needle_word_recall"], needle=NEEDLE)
    if rouge_x10 is not None:
        assert round(10 * s["needle_rouge1"], 2) == rouge_x10
    assert s["needle_word_recall"] == pytest.approx(recall)


# ------------------------------------------------------------------------------------------------ fixtures


def write_fixtures(root: Path) -> None:
    """NeedleBench's files in their hub formats: JSONL haystack/needles, names.json."""
    essays = [{"text": f"Essay {i}. " + " ".join(f"Startups grow by solving problem {j} for users." for j in range(40))}
              for i in range(12)]
    (root / "PaulGrahamEssays.jsonl").write_text("\n".join(json.dumps(e) for e in essays) + "\n")
    needles = [{"needle": f"Hidden on the island of Tavi {i} is the rare gem Zorblax{i}.",
                "retrieval_question": f"What is the rare gem on the island of Tavi {i}? Please answer in the format "
                                      f"of 'The rare gem on the island of Tavi {i} is ______.'",
                "arg1": f"island {i}", "arg2": f"Zorblax{i}", "language": "English"} for i in range(15)]
    needles.append({"needle": "中文针", "retrieval_question": "问题？", "arg1": "zh", "arg2": "针",
                    "language": "Chinese"})
    (root / "needles.jsonl").write_text("\n".join(json.dumps(n, ensure_ascii=False) for n in needles) + "\n")
    names = {"English": ",".join(f"Person{i} Surname{i}" for i in range(30)), "Chinese": "张三,李四,王五"}
    (root / "names.json").write_text(json.dumps(names, ensure_ascii=False))


@pytest.fixture()
def data(tmp_path) -> Path:
    write_fixtures(tmp_path)
    return tmp_path


def test_single_needle_grid_in_needlebench_format(tok, data) -> None:
    samples = nb.make_samples("single", tok, [300, 600], [0, 50, 100], n_repeats=2, length_buffer=100,
                              data_dir=str(data))
    assert len(samples) == 12 and samples[0].id == "single-L300-d0-r0"
    for s in samples:
        q = s.questions[0]
        assert s.context.startswith("This is a test of long-text capability.")
        assert s.context.endswith("\n</Document>\n\n")
        assert q.text.startswith("Based on the information in the document, now please answer: What is the rare gem")
        assert q.answers[0] in s.context and q.answers == [q.meta["keyword"]]
        assert q.meta["metric_kwargs"]["needle"] in s.context
        doc = s.context.split("<Document>\n")[1].split("\n</Document>")[0]
        assert len(tok(doc, add_special_tokens=False).input_ids) <= s.meta["target_length"] - 100
    d0, d50, d100 = (s.context.split("<Document>\n")[1] for s in samples[:6:2])
    assert d0.index("Zorblax") < d50.index("Zorblax") < d100.index("Zorblax"), "depth moves the needle"
    # seed = repeat: the needle and the haystack order are drawn per repeat, the same for every cell
    assert samples[0].questions[0].answers == samples[2].questions[0].answers
    assert samples[0].questions[0].answers != samples[1].questions[0].answers or \
        samples[0].context != samples[1].context


def test_multi_retrieval_inserts_every_needle_and_merges_the_questions(tok, data) -> None:
    depths = [10, 50, 90]
    s = nb.make_samples("multi_retrieval", tok, [800], depths, n_repeats=3, length_buffer=100, data_dir=str(data))
    assert [x.id for x in s] == ["multi_retrieval-L800-r0", "multi_retrieval-L800-r1", "multi_retrieval-L800-r2"]
    q = s[0].questions[0]
    assert len(q.answers) == 3 and all(k in s[0].context for k in q.answers)
    assert "answer the final questions one by one" in s[0].context
    assert q.text.count("?、") == 2 and "Please answer in the format of 'The rare gem on the island of Tavi" in q.text
    positions = [s[0].context.index(k) for k in q.answers]
    assert positions == sorted(positions), "needle i goes to depth i"


def test_multi_reasoning_chain_and_boxed_prompt(tok, data) -> None:
    s = nb.make_samples("multi_reasoning", tok, [800], [20], n_repeats=2, num_needles=3, length_buffer=100,
                        data_dir=str(data))
    q = s[0].questions[0]
    story = q.meta["needles"]
    assert len(story) == 3 and all(sentence in s[0].context for sentence in story)
    eldest = q.answers[0]
    assert eldest.startswith("Person") and "\\boxed{Jasmine Lane}" in q.text and "\\boxed{{" not in q.text
    last = q.text.split("that '")[1].split("'")[0]
    assert last != eldest and any(last in sentence for sentence in story)
    assert score_prediction(f"... is \\boxed{{{eldest}}}.", q.answers, ["needlebench_atc"])["needlebench_atc"] == 1.0


def test_kvcache_factory_needle_snaps_to_a_period_and_uses_its_prompt(tok, data) -> None:
    task = composed("task=needlebench/kvcache_factory", f"task.loader.data_dir={data}").task
    s = load_samples(task, limit=11, tokenizer=tok)
    assert [x.id for x in s[:2]] == ["kvcache_factory-L1000-d0-r0", "kvcache_factory-L1000-d11-r0"]
    for x in s[1:9]:  # depths 11 ... 89
        assert x.context.startswith("<|im_start|> This is a very long story book: <book> ")
        assert x.context.endswith(" </book>.\n")
        before = x.context.split("\n" + NEEDLE + "\n")[0]
        assert before.endswith("."), "the needle starts right after a period"
    assert s[9].context.endswith(NEEDLE + "\n </book>.\n"), "depth 100 appends the needle"
    q = s[5].questions[0]
    assert q.text == " Based on the content of the book, Question: The best thing to do in San Francisco is: \nAnswer:"
    scores = score_prediction("eat a sandwich and sit in Dolores Park on a sunny day.", q.answers, list(task.metrics),
                              **q.meta["metric_kwargs"])
    assert round(10 * scores["needle_rouge1"], 2) == 7.27 and scores["needle_word_recall"] == 1.0
    assert scores["contains"] == 1.0


def test_missing_files_offline_are_one_clear_message(tok, tmp_path) -> None:
    with pytest.raises(DataMissingError, match=r"opencompass/NeedleBench PaulGrahamEssays\.jsonl.*prepare_data\.py "
                                               r"needlebench"):
        nb.make_samples("single", tok, [500], [0], data_dir=str(tmp_path))


# ------------------------------------------------------------------------------------------------ configs and runs


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("name", ["single_4k", "multi_retrieval_4k", "multi_reasoning_4k", "kvcache_factory"])
def test_needlebench_configs_load_from_a_data_dir(tok, data, name) -> None:
    extra = ["task.loader.length_tokenizer=model"] if name.endswith("_4k") else []
    task = composed(f"task=needlebench/{name}", f"paths.data={data.parent}", f"task.loader.data_dir={data}",
                    *extra).task
    samples = load_samples(task, limit=3, tokenizer=tok)
    assert len(samples) == 3 and task.name == f"needlebench/{name}"


def test_synthetic_needle_grid_runs_offline_on_the_embedded_model(tmp_path) -> None:
    cfg = composed("task=needlebench/single_synthetic", "task.loader.lengths=[512]", "task.loader.depths=[0,50,100]",
                   "method=fullkv", "budget=1.0", f"paths.results={tmp_path}", "progress=false")
    metrics = run(cfg)
    assert metrics["n_questions"] == 3
    assert metrics["score"]["needlebench_origin"] == 100.0, "the full cache finds every needle"
    assert metrics["score"]["needle_word_recall"] == 100.0
    streaming = run(composed("task=needlebench/single_synthetic", "task.loader.lengths=[1024]",
                             "task.loader.depths=[10,50]", "method=streamingllm", "budget=0.1",
                             f"paths.results={tmp_path}", "progress=false"))
    assert streaming["score"]["needlebench_origin"] == 0.0, "a mid-context needle is evicted by StreamingLLM"


def test_needle_heatmap_pivots_depth_by_length(tmp_path) -> None:
    import sys

    sys.path.insert(0, str(CONF.parent / "scripts"))
    from needle_heatmap import heatmap

    cfg = composed("task=needlebench/single_synthetic", "task.loader.lengths=[512,1024]",
                   "task.loader.depths=[0,50,100]", "method=fullkv", "budget=1.0", f"paths.results={tmp_path}",
                   "progress=false")
    run(cfg)
    pivot, overall, metric = heatmap(cfg.run_dir)
    assert metric == "needlebench_origin" and overall == 100.0
    assert list(pivot.index) == [0, 50, 100] and list(pivot.columns) == [512, 1024]
    assert heatmap(cfg.run_dir, "needle_word_recall")[0].shape == (3, 2)


def test_lengths_in_tiktoken_gpt4_tokens_as_needlebench(tok, data, monkeypatch) -> None:
    """The configs count in tiktoken's GPT-4 encoding; offline without the cached encoding: the one message."""
    import tiktoken

    task = composed("task=needlebench/single_4k", f"task.loader.data_dir={data}").task
    assert task.loader.length_tokenizer == "tiktoken"
    with pytest.raises(DataMissingError, match=r"tiktoken's GPT-4 encoding.*prepare_data\.py needlebench --only "
                                               r"tiktoken"):
        load_samples(task, limit=1, tokenizer=tok)
    # a byte-level stand-in for cl100k_base (the real file cannot be fetched here): the wiring, not the vocabulary
    byte_level = tiktoken.Encoding("bytes", pat_str=r"\S+|\s+", mergeable_ranks={bytes([i]): i for i in range(256)},
                                   special_tokens={})
    monkeypatch.setattr(tiktoken, "encoding_for_model", lambda name: byte_level if name == "gpt-4" else None)
    nb._tiktoken_file(data).parent.mkdir()
    nb._tiktoken_file(data).write_bytes(b"")
    samples = nb.make_samples("single", tok, [600], [50], n_repeats=1, length_buffer=100, data_dir=str(data),
                              length_tokenizer="tiktoken")
    doc = samples[0].context.split("<Document>\n")[1].split("\n</Document>")[0]
    assert len(doc.encode()) == 600 - 100, "one byte per token: haystack + needle = length - buffer"
    assert samples[0].meta["length_tokenizer"] == "tiktoken"


def test_prepare_fetches_the_hub_files_and_caches_the_gpt4_encoding(monkeypatch, tmp_path) -> None:
    import os

    import tiktoken

    hub, caches = [], []
    monkeypatch.setattr(nb, "fetch_hub_files",
                        lambda repo, rev, files, dest, bench, **kw: hub.append((repo, files)) or [])
    monkeypatch.setattr(tiktoken, "encoding_for_model", lambda name: caches.append(os.environ["TIKTOKEN_CACHE_DIR"]))
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    files = nb.prepare(tmp_path, None)
    assert hub == [("opencompass/NeedleBench", ["PaulGrahamEssays.jsonl", "needles.jsonl", "names.json"])]
    assert caches == [str(tmp_path / "tiktoken")] and files == [nb._tiktoken_file(tmp_path)]
    assert "TIKTOKEN_CACHE_DIR" not in os.environ, "the cache location is set only while preparing"
