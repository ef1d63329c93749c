"""LongBench / LongBench-E: loaders on fixture files in the release format, the task configs, the official prompt
and truncation, the offline message, official aggregation, and end-to-end runs on the embedded model."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from kvbench.metrics import METRICS
from kvbench.prompt import encode_joint, postprocess_text, split_ids, truncate_prompt_text
from kvbench.runner import run
from kvbench.tasks import hub, load_samples
from kvbench.tasks import longbench as lb

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "longbench" / "data"
TASKS = [f"longbench/{n}" for n in lb.DATASETS] + [f"longbench_e/{n}" for n in lb.LONGBENCH_E]


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def fixture_rows(name: str) -> list[dict]:
    return [json.loads(x) for x in (FIXTURES / f"{name}.jsonl").read_text().splitlines()]


def test_dataset_lists_match_the_official_scripts() -> None:
    assert len(lb.DATASETS) == 21 and len(lb.LONGBENCH_E) == 13 and len(lb.SUBSETS["en16"]) == 16
    zh = {n for n, s in lb.DATASETS.items() if s.language == "zh"}
    assert zh == {"multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh"}
    assert {n for n, s in lb.DATASETS.items() if not s.chat} == {"trec", "triviaqa", "samsum", "lsht", "lcc",
                                                                 "repobench-p"}
    assert {n for n, s in lb.DATASETS.items() if s.first_line} == {"trec", "triviaqa", "samsum", "lsht"}
    assert set(lb.LONGBENCH_E) <= set(lb.SUBSETS["en16"])


@pytest.mark.parametrize("task", TASKS)
def test_task_config_follows_the_official_protocol(task: str) -> None:
    cfg = composed(f"task={task}").task
    spec = lb.DATASETS[cfg.loader.dataset]
    assert cfg.name == task and cfg.loader.e == task.startswith("longbench_e/")
    assert cfg.metrics == [spec.metric] and cfg.max_new_tokens == spec.max_new_tokens
    assert cfg.chat_template == ("auto" if spec.chat else "never")
    assert list(cfg.postprocess) == (["first_line"] if spec.first_line else [])
    assert cfg.tokenize == "joint" and cfg.truncation == "prompt_text" and list(cfg.stop) == []
    assert (list(cfg.eos_strings), cfg.min_new_tokens) == ((["\n"], 1) if spec is lb.DATASETS["samsum"] else ([], 0))
    assert cfg.loader.prompt.count("{context}") == 1
    assert ("{input}" in cfg.loader.prompt) == (cfg.loader.dataset not in
                                                 {"gov_report", "multi_news", "vcsum", "passage_count", "lcc"})


def test_prompts_keep_the_official_quirks() -> None:
    def prompt(name: str) -> str:
        return composed(f"task=longbench/{name}").task.loader.prompt

    assert "asconcisely" in prompt("narrativeqa") and "\n\n Answer the question" in prompt("qasper")
    assert prompt("multi_news").startswith("You are given several news passages. Write a one-page summary of all "
                                           "news. \n\nNews:\n")
    assert prompt("passage_count").endswith("The final answer is: ") and prompt("lcc").endswith("Next line of code:\n")
    assert prompt("repobench-p") == "Please complete the code given below. \n{context}{input}Next line of code:\n"
    assert prompt("dureader").endswith("问题：{input}\n回答：")


@pytest.mark.parametrize("task", TASKS)
def test_loader_reads_the_release_format(task: str) -> None:
    cfg = composed(f"task={task}", f"task.loader.data_dir={FIXTURES}").task
    samples = load_samples(cfg)
    name = cfg.loader.dataset + ("_e" if cfg.loader.e else "")
    rows = fixture_rows(name)
    assert len(samples) == len(rows)
    for s, row in zip(samples, rows, strict=True):
        q = s.questions[0]
        assert s.context + q.text == cfg.loader.prompt.format(**row)  # the official prompt, split after the context
        assert s.context.endswith(row["context"]) and q.answers == row["answers"] and s.id == row["_id"]
        assert s.meta["lb_length"] == row["length"] and s.meta["language"] == row["language"]
        if cfg.loader.e:
            assert s.meta["length_bucket"] == lb.length_bucket(row["length"])
        if lb.DATASETS[cfg.loader.dataset].metric == "classification_score":
            assert q.meta["metric_kwargs"]["all_classes"] == rows[-1]["all_classes"]


def test_e_buckets_by_the_length_field() -> None:
    assert [lb.length_bucket(n) for n in (0, 3999, 4000, 7999, 8000, 10**6)] == ["0-4k", "0-4k", "4-8k", "4-8k",
                                                                                   "8k+", "8k+"]
    samples = lb.load("qasper", "{context}{input}", e=True, data_dir=FIXTURES)
    assert [s.meta["length_bucket"] for s in samples] == ["0-4k", "4-8k", "8k+"]


def test_parquet_copy_is_read_too(tmp_path) -> None:
    hub.load_local(FIXTURES / "hotpotqa.jsonl").to_parquet(tmp_path / "hotpotqa.parquet")
    samples = lb.load("hotpotqa", "{context}|{input}", data_dir=tmp_path)
    assert samples[0].questions[0].text == "|" + fixture_rows("hotpotqa")[0]["input"]


def test_offline_without_data_is_one_message_with_the_prepare_command(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hub.DataMissingError) as err:
        lb.load("hotpotqa", "{context}{input}", root=tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "longbench" / "data" / "hotpotqa.jsonl") in msg and "LongBench hotpotqa" in msg
    assert "python scripts/prepare_data.py longbench --only hotpotqa" in msg
    with pytest.raises(hub.DataMissingError, match="nowhere"):
        lb.load("hotpotqa", "{context}{input}", data_dir=tmp_path / "nowhere")


def test_offline_cli_run_prints_the_message(tmp_path) -> None:
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "KVBENCH_DATA": str(tmp_path / "nodata")}
    res = subprocess.run([sys.executable, "-m", "kvbench", "task=longbench/trec", "progress=false",
                          f"paths.results={tmp_path / 'r'}", f"paths.logs={tmp_path / 'l'}"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "LongBench trec" in res.stderr and "prepare_data.py longbench --only trec" in res.stderr
    assert str(tmp_path / "nodata" / "longbench" / "data" / "trec.jsonl") in res.stderr


def test_prepare_extracts_the_pinned_release_archive(tmp_path, monkeypatch) -> None:
    archive = tmp_path / "dl" / "data.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(FIXTURES.glob("*.jsonl")):
            zf.write(p, f"data/{p.name}")
    calls = []
    monkeypatch.setattr(hub, "fetch_hub_files", lambda *a, **kw: calls.append((a, kw)) or [archive])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dest = tmp_path / "root" / "longbench"
    files = lb.prepare(dest, ["trec"])
    assert sorted(f.name for f in files) == ["trec.jsonl", "trec_e.jsonl"]
    (repo, rev, names, where), kw = calls[0]
    assert (repo, rev, names, where) == ("zai-org/LongBench", lb.REVISION, ["data.zip"], dest)
    assert kw["expected"] == {"data.zip": lb.ARCHIVE_CHECKSUM} and len(lb.REVISION) == 40
    assert len(lb.prepare(dest)) == 34
    assert len(lb.load("lsht", "{context}{input}", root=tmp_path / "root")) == 2  # the prepared layout loads


def test_official_scores_round_like_eval_py() -> None:
    recs = [{"scores": {"qa_f1_score": v}, "meta": {"length_bucket": b}}
            for v, b in ((1.0, "0-4k"), (0.5, "0-4k"), (1 / 3, "4-8k"))]
    task = {"metrics": ["qa_f1_score"], "chat_template": "auto"}
    out = lb.official_scores(recs, task)
    assert out["score"] == round(100 * (1.5 + 1 / 3) / 3, 2) == 61.11
    assert out["buckets"] == {"0-4k": 75.0, "4-8k": 33.33, "8k+": None} and out["bucket_n"]["8k+"] == 0
    assert out["fuzzy_backend"] in ("difflib", "python-Levenshtein") and out["protocol"]["chat_template"] == "auto"


def test_averages() -> None:
    scores = {n: float(i) for i, n in enumerate(lb.DATASETS)}
    assert lb.average(scores, "en16") == round(sum(scores[n] for n in lb.SUBSETS["en16"]) / 16, 2)
    # leaderboard: per category (code in both languages), then over the 6 categories
    cat = {"single_doc_qa": 39.8, "multi_doc_qa": 38.7, "summarization": 26.5, "few_shot": 67.1, "synthetic": 54.1,
           "code": 37.8}
    assert lb.category_average({n: cat[s.category] for n, s in lb.DATASETS.items()}) == pytest.approx(44.0, abs=0.01)
    with pytest.raises(Exception, match="missing: qasper"):
        lb.average({"narrativeqa": 1.0}, "e13")


# -- prompting ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bpe():
    """A small byte-level BPE tokenizer with a BOS (merges across spaces are possible, as in real models)."""
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    text = [(FIXTURES / f).read_text() for f in ("narrativeqa.jsonl", "hotpotqa.jsonl", "samsum.jsonl")]
    tk.train_from_iterator(text * 20, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<unk>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    from tokenizers.processors import TemplateProcessing

    tk.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_joint_encoding_is_the_official_tokenization_split_after_the_context(bpe) -> None:
    context, question = "Story: the dog walks to the bridge", "\n\nQuestion: who walks?\nAnswer:"
    ctx, q = encode_joint(bpe, context, question, chat=False, max_length=None)
    assert ctx + q == bpe(context + question).input_ids and ctx[0] == bpe.bos_token_id
    assert bpe.decode(ctx, skip_special_tokens=True) == context
    text = "the bridge walks"
    offsets = bpe(text, return_offsets_mapping=True).offset_mapping
    start, end = next((s, e) for s, e in offsets if e - s >= 3)
    ids, rest = split_ids(bpe, text, start + 1, True)  # a token straddling the cut stays in the first part
    assert bpe.decode(ids, skip_special_tokens=True) == text[:end]
    assert bpe.decode(ids + rest, skip_special_tokens=True) == text


def test_prompt_text_truncation_is_pred_py(bpe) -> None:
    context = "Story: " + " ".join(["the dog walks to the bridge ."] * 40)
    question = "\n\nQuestion: who walks?\nAnswer:"
    ids = bpe(context + question).input_ids
    text, cut = truncate_prompt_text(bpe, context + question, len(context), 64)
    half = 32
    assert text == bpe.decode(ids[:half], skip_special_tokens=True) + bpe.decode(ids[-half:], skip_special_tokens=True)
    assert text[cut:] == question
    ctx, q = encode_joint(bpe, context, question, chat=False, max_length=64, truncation="prompt_text")
    assert ctx + q == bpe(text).input_ids and bpe.decode(q) == question
    assert truncate_prompt_text(bpe, "short", 2, 64) == ("short", 2)


def test_chat_template_bos_and_template_kwargs(bpe) -> None:
    bpe.chat_template = ("{{ bos_token }}[INST] {{ messages[0]['content'] }} [/INST]"
                         "{% if enable_thinking is defined and not enable_thinking %}<nothink>{% endif %}")
    ctx, q = encode_joint(bpe, "the dog", " walks?", chat=True, max_length=None)
    assert ctx.count(bpe.bos_token_id) == 1 and bpe.decode(ctx + q) == "<s>[INST] the dog walks? [/INST]"
    ctx2, _ = encode_joint(bpe, "the dog", " walks?", chat=True, max_length=None, chat_special_tokens=True)
    assert ctx2[:2] == [bpe.bos_token_id, bpe.bos_token_id]  # the official script's (and CAKE's) double BOS
    _, q3 = encode_joint(bpe, "the dog", " walks?", chat=True, max_length=None,
                         chat_kwargs={"enable_thinking": False})
    assert bpe.decode(q3).endswith("[/INST]<nothink>")
    bpe.chat_template = None


def test_postprocess_steps() -> None:
    assert postprocess_text("\n\nType: Individual\nQuestion: x", ["first_line"]) == "Type: Individual"
    assert postprocess_text("  x  ", []) == "  x  " and postprocess_text("  x  ", ["strip"]) == "x"


# -- end to end on the embedded model ---------------------------------------------------------------------------------
def lb_config(tmp_path: Path, task: str, *overrides: str):
    return composed(f"task={task}", f"task.loader.data_dir={FIXTURES}", f"paths.results={tmp_path}",
                    "progress=false", "model=kvbench-tiny", *overrides)


@pytest.mark.parametrize("task", ["longbench/trec", "longbench/samsum", "longbench/lcc", "longbench_e/hotpotqa",
                                  "longbench/multifieldqa_zh"])
def test_end_to_end_scores_are_the_official_metric_of_the_predictions(tmp_path, task: str) -> None:
    cfg = lb_config(tmp_path, task, "method=snapkv", "budget=0.5")
    metrics = run(cfg)
    recs = [json.loads(x) for x in (Path(cfg.run_dir) / "predictions.jsonl").read_text().splitlines()]
    spec = lb.DATASETS[cfg.task.loader.dataset]
    rows = fixture_rows(cfg.task.loader.dataset + ("_e" if cfg.task.loader.e else ""))
    assert len(recs) == len(rows) and all(r["new_tokens"] <= spec.max_new_tokens for r in recs)
    total = 0.0
    for rec, row in zip(recs, rows, strict=True):
        pred = rec["raw_prediction"]
        if spec.first_line:
            pred = pred.lstrip("\n").split("\n")[0]
        assert rec["prediction"] == pred  # no strip: the official decode
        best = max(METRICS[spec.metric](pred, gt, all_classes=row["all_classes"]) for gt in row["answers"])
        assert rec["scores"][spec.metric] == best
        total += best
    official = metrics["official"]
    assert official["score"] == round(100 * total / len(rows), 2) and official["metric"] == spec.metric
    if cfg.task.loader.e:
        assert set(official["buckets"]) == {"0-4k", "4-8k", "8k+"} and set(metrics["score_by_length"]) == {
            "0-4k", "4-8k", "8k+"}


def test_samsum_newline_ends_decoding_but_never_as_first_token(bpe) -> None:
    """pred.py's samsum: eos_token_id=[eos, id of "\\n"] and min_length = prompt + 1 (so neither comes first)."""
    import torch

    from kvbench.pipeline import RunOptions, answer, eos_set

    nl = bpe.encode("\n", add_special_tokens=False)[-1]
    word = bpe.encode("dog", add_special_tokens=False)[0]
    opts = RunOptions(protocol="query_aware", max_new_tokens=8, stop=[], metrics=[], postprocess=["first_line"],
                      eos_strings=["\n"], min_new_tokens=1)
    assert eos_set(bpe, opts) == {bpe.eos_token_id, nl}

    class Greedy:  # replays fixed next-token preferences through the real answer() decoding loop
        def generate(self, logits, max_new, should_stop):
            tokens = [int(logits.argmax())]
            for nxt in (word, nl, word):
                if should_stop(tokens) or len(tokens) == max_new:
                    break
                tokens.append(nxt)
            return tokens, []

    first = torch.zeros(bpe.vocab_size)
    first[nl], first[bpe.eos_token_id], first[word] = 3.0, 2.0, 1.0  # newline and EOS preferred, but suppressed
    out = answer(Greedy(), bpe, first, opts)
    assert out["raw_prediction"] == "dogdog\n" and out["prediction"] == "dogdog" and out["new_tokens"] == 3


def test_every_longbench_task_runs_end_to_end_on_its_fixtures(tmp_path) -> None:
    for task in TASKS:
        cfg = lb_config(tmp_path, task, "method=snapkv", "budget=0.5", "limit=1", "task.max_new_tokens=4")
        metrics = run(cfg)
        assert metrics["n_questions"] == 1 and 0 <= metrics["official"]["score"] <= 100, task


def test_cli_runs_a_longbench_task_offline(tmp_path) -> None:
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "kvbench", "task=longbench/passage_retrieval_en",
                          f"task.loader.data_dir={FIXTURES}", "model=kvbench-tiny", "method=adakv", "budget=0.5",
                          "progress=false", f"paths.results={tmp_path / 'r'}", f"paths.logs={tmp_path / 'l'}"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    done = list((tmp_path / "r").rglob("metrics.json"))
    assert [p.parent.relative_to(tmp_path / "r").parts[:2] for p in done] == [("longbench", "passage_retrieval_en")]
    assert json.loads(done[0].read_text())["official"]["metric"] == "retrieval_score"


def test_query_agnostic_compresses_the_context_part_alone(tmp_path) -> None:
    cfg = lb_config(tmp_path, "longbench/hotpotqa", "method=snapkv", "budget=0.5", "protocol=query_agnostic")
    run(cfg)
    for rec in (json.loads(x) for x in (Path(cfg.run_dir) / "predictions.jsonl").read_text().splitlines()):
        assert rec["compressed_tokens"] == rec["context_tokens"] and rec["question_tokens"] > 0


def test_table_pivots_runs_and_averages_complete_rows(tmp_path) -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    from longbench_table import table

    from kvbench.results import load_results

    for task in ("longbench/trec", "longbench/lcc", "longbench_e/trec"):
        run(lb_config(tmp_path, task, "method=snapkv", "budget=0.5", "task.max_new_tokens=4"))
    df = load_results(tmp_path)
    wide = table(df, "en16")
    assert list(wide.columns) == ["lcc", "trec", "avg_en16"] and wide["avg_en16"].isna().all()  # 2 of 16 datasets
    trec = json.loads(next(tmp_path.glob("longbench/trec/**/metrics.json")).read_text())["official"]["score"]
    assert wide["trec"].iloc[0] == trec
    assert list(table(df, e=True).columns) == ["trec 0-4k", "trec 4-8k", "trec 8k+"]
