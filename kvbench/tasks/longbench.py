"""LongBench (v1, 21 datasets) and LongBench-E (13 datasets, 0-4k / 4-8k / 8k+ buckets), official protocol.

Source: the authors' release ``data.zip`` of the hub dataset ``THUDM/LongBench`` (now ``zai-org/LongBench``;
``data/<name>.jsonl`` and ``data/<name>_e.jsonl``), downloaded at :data:`REVISION` and checked against its
published SHA-256 by ``python scripts/prepare_data.py longbench`` into
``<paths.data>/longbench/data/`` and read with ``datasets``' JSON builder. The hub's ``load_dataset
("THUDM/LongBench", name)`` goes through a loading script that ``datasets`` >= 4 refuses, so the release JSONL is
used instead (``data_dir`` may also point at a directory of ``<name>.jsonl`` or ``<name>.parquet`` files, e.g. a
parquet copy such as ``Xnhyacinth/LongBench``).

One JSONL line = one sample: ``input`` (question / query / few-shot cue / code prefix), ``context``, ``answers``
(list), ``length`` (words for English and code, characters for Chinese; LongBench-E buckets use it), ``dataset``,
``language``, ``all_classes`` (trec / lsht class names, else null), ``_id``.

Protocol (THUDM/LongBench ``LongBench/pred.py`` and ``eval.py`` @ 2e00731), set in each ``conf/task/longbench*``
YAML: the dataset's prompt from ``config/dataset2prompt.json`` verbatim (``str.format`` with the sample), the
dataset's ``max_new_tokens`` (``dataset2maxlen.json``), middle truncation of the prompt string to the model's
``max_length`` tokens before the chat template, no chat template for trec/triviaqa/samsum/lsht/lcc/repobench-p,
greedy decoding, samsum stopped at the first newline (and no EOS/newline as first token), the first-line cut of
eval.py for trec/triviaqa/samsum/lsht, scores ``round(100 * mean(max over answers), 2)``.

Deviation: ``all_classes`` is taken from the dataset's last line for every sample (eval.py takes it from the last
line of the prediction file, which is the same file in dataset order on one GPU).
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvbench.errors import UsageError
from kvbench.tasks import hub
from kvbench.tasks.base import Question, Sample
from kvbench.tasks.pinned import Checksum

BENCHMARK = "longbench"
#: The release's hub repository: ``THUDM/LongBench`` was renamed ``zai-org/LongBench`` (the hub redirects the old
#: name; commits are unchanged). Its loading script is refused by ``datasets`` >= 4, so kvbench downloads the
#: release archive ``data.zip`` (the JSONL files the official ``pred.py`` reads) at a pinned commit.
REPO_ID = "zai-org/LongBench"
#: The pinned commit, and the SHA-256 and size of its ``data.zip`` (21 LongBench + 13 LongBench-E JSONL files,
#: 8,418 rows). Both are what many independent public projects pin and check for this archive; kvbench checks every
#: download against them, and ``source.json`` records the digest it got.
REVISION = "5e628be450b7e67fb7ae6e201bd6d8f7056f7672"
ARCHIVE = "data.zip"
ARCHIVE_CHECKSUM = Checksum("cb45b11a4133c6bc1d6a44b0f8e701335ff1e543195db1103472e575857f7f64", 113_932_529)


@dataclass(frozen=True)
class Spec:
    """One LongBench dataset: official metric, max new tokens, language, category, chat template, first-line cut."""

    metric: str
    max_new_tokens: int
    language: str
    category: str
    chat: bool = True
    first_line: bool = False


_FEW = dict(chat=False, first_line=True)
DATASETS: dict[str, Spec] = {  # pred.py order
    "narrativeqa": Spec("qa_f1_score", 128, "en", "single_doc_qa"),
    "qasper": Spec("qa_f1_score", 128, "en", "single_doc_qa"),
    "multifieldqa_en": Spec("qa_f1_score", 64, "en", "single_doc_qa"),
    "multifieldqa_zh": Spec("qa_f1_zh_score", 64, "zh", "single_doc_qa"),
    "hotpotqa": Spec("qa_f1_score", 32, "en", "multi_doc_qa"),
    "2wikimqa": Spec("qa_f1_score", 32, "en", "multi_doc_qa"),
    "musique": Spec("qa_f1_score", 32, "en", "multi_doc_qa"),
    "dureader": Spec("rouge_zh_score", 128, "zh", "multi_doc_qa"),
    "gov_report": Spec("rouge_score", 512, "en", "summarization"),
    "qmsum": Spec("rouge_score", 512, "en", "summarization"),
    "multi_news": Spec("rouge_score", 512, "en", "summarization"),
    "vcsum": Spec("rouge_zh_score", 512, "zh", "summarization"),
    "trec": Spec("classification_score", 64, "en", "few_shot", **_FEW),
    "triviaqa": Spec("qa_f1_score", 32, "en", "few_shot", **_FEW),
    "samsum": Spec("rouge_score", 128, "en", "few_shot", **_FEW),
    "lsht": Spec("classification_score", 64, "zh", "few_shot", **_FEW),
    "passage_count": Spec("count_score", 32, "en", "synthetic"),
    "passage_retrieval_en": Spec("retrieval_score", 32, "en", "synthetic"),
    "passage_retrieval_zh": Spec("retrieval_zh_score", 32, "zh", "synthetic"),
    "lcc": Spec("code_sim_score", 64, "code", "code", chat=False),
    "repobench-p": Spec("code_sim_score", 64, "code", "code", chat=False),
}
LONGBENCH_E = ("qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec", "triviaqa",
               "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p")
#: Dataset lists: all 21; the 16 English + code datasets whose plain mean SnapKV / PyramidKV / CAKE report; E's 13.
SUBSETS: dict[str, tuple[str, ...]] = {
    "all21": tuple(DATASETS),
    "en16": tuple(n for n, s in DATASETS.items() if s.language != "zh"),
    "e13": LONGBENCH_E,
}
#: LongBench-E buckets over the ``length`` field: (name, exclusive upper bound).
BUCKETS: tuple[tuple[str, float], ...] = (("0-4k", 4000), ("4-8k", 8000), ("8k+", math.inf))


def length_bucket(length: int) -> str:
    return next(name for name, upper in BUCKETS if length < upper)


def _check(dataset: str, e: bool) -> None:
    names = LONGBENCH_E if e else tuple(DATASETS)
    if dataset not in names:
        raise UsageError(f"unknown LongBench{'-E' if e else ''} dataset {dataset!r}; choose from {', '.join(names)}")


def data_file(dataset: str, e: bool = False, root: str | Path | None = None, data_dir: str | Path | None = None
              ) -> Path:
    """``<data_dir>/<name>.jsonl`` (or ``.parquet``) if ``data_dir`` is set, else ``<root>/longbench/data/<name>
    .jsonl``; ``name`` is ``<dataset>_e`` for LongBench-E."""
    name = f"{dataset}_e" if e else dataset
    if data_dir is not None:
        base = Path(data_dir).expanduser()
        for suffix in (".jsonl", ".parquet"):
            if (base / f"{name}{suffix}").exists():
                return base / f"{name}{suffix}"
        return base / f"{name}.jsonl"
    return hub.data_root(root) / BENCHMARK / "data" / f"{name}.jsonl"


def prepare(dest: str | Path, names: Sequence[str] | None = None) -> list[Path]:
    """Download ``data.zip`` at :data:`REVISION` into ``dest``, check it against :data:`ARCHIVE_CHECKSUM`, and
    extract ``data/<name>[_e].jsonl`` (all 34 files, or those of ``names``); ``dest/source.json`` records the
    repository, revision, resolved commit and the archive's SHA-256."""
    for n in names or ():
        _check(n, False)
    dest = Path(dest)
    archive = hub.fetch_hub_files(REPO_ID, REVISION, [ARCHIVE], dest, benchmark=BENCHMARK,
                                  expected={ARCHIVE: ARCHIVE_CHECKSUM})[0]
    return extract(archive, dest, names)


def extract(archive: str | Path, dest: str | Path, names: Sequence[str] | None = None) -> list[Path]:
    """Extract the ``data/*.jsonl`` members of the release archive (those of ``names`` and their ``_e`` files)."""
    wanted = None if names is None else {f"data/{n}{s}.jsonl" for n in names for s in ("", "_e")}
    out = []
    with zipfile.ZipFile(archive) as zf:
        for member in zf.namelist():
            if member.startswith("data/") and member.endswith(".jsonl") and (wanted is None or member in wanted):
                zf.extract(member, dest)
                out.append(Path(dest) / member)
    if not out:
        raise UsageError(f"{archive} holds no data/<name>.jsonl files: not the LongBench release archive")
    return out


def _rows(path: Path, dataset: str, root: str | Path | None, data_dir: str | Path | None) -> list[dict[str, Any]]:
    if not path.exists() and data_dir is None and hub.hub_reachable():
        prepare(hub.data_root(root) / BENCHMARK)  # online and not prepared yet: fetch the release once
    hub.require(path, BENCHMARK, f"LongBench {path.stem}", [dataset])
    return list(hub.load_local(path))


def split_prompt(template: str) -> tuple[str, str]:
    """The template cut right after ``{context}``: the part that is compressed alone, and the question part."""
    if template.count("{context}") != 1:
        raise UsageError("a LongBench prompt template must contain {context} exactly once")
    i = template.index("{context}") + len("{context}")
    return template[:i], template[i:]


def load(dataset: str, prompt: str, e: bool = False, root: str | Path | None = None,
         data_dir: str | Path | None = None) -> list[Sample]:
    """The samples of one LongBench (``e=False``) or LongBench-E dataset, prompts formatted with ``prompt``.

    ``Sample.context`` is the prompt up to and including the context, ``Question.text`` the rest (its
    concatenation is ``prompt.format(**row)``); metadata keeps ``dataset``, ``language``, ``_id``, the official
    ``lb_length`` and, for LongBench-E, its ``length_bucket``."""
    _check(dataset, e)
    rows = _rows(data_file(dataset, e, root, data_dir), dataset, root, data_dir)
    head, tail = split_prompt(prompt)
    classes = rows[-1].get("all_classes") if rows else None  # eval.py: the last line's all_classes
    kwargs = {"all_classes": list(classes)} if DATASETS[dataset].metric == "classification_score" else {}
    ids = [str(r["_id"]) for r in rows]
    unique = len(set(ids)) == len(ids)
    samples = []
    for i, row in enumerate(rows):
        meta = {"dataset": row["dataset"], "language": row["language"], "_id": row["_id"],
                "lb_length": int(row["length"])}
        if e:
            meta["length_bucket"] = length_bucket(int(row["length"]))
        question = Question(id="0", text=tail.format(**row), answers=[str(a) for a in row["answers"]],
                            meta={"metric_kwargs": kwargs} if kwargs else {})
        samples.append(Sample(id=ids[i] if unique else f"{i}-{ids[i]}", context=head.format(**row),
                              questions=[question], meta=meta))
    return samples


def official_scores(records: list[dict[str, Any]], task: Mapping[str, Any]) -> dict[str, Any]:
    """eval.py's numbers for one dataset: ``round(100 * sum / n, 2)`` of the per-sample scores (already the max
    over answers, after the first-line cut), per bucket for LongBench-E (``round(100 * mean, 2)``, an empty bucket
    is None where eval.py writes NaN), with the protocol settings and the fuzzywuzzy backend."""
    from kvbench.metrics.longbench import fuzzy_backend

    metric = task["metrics"][0]
    values = [r["scores"][metric] for r in records]
    out: dict[str, Any] = {"metric": metric, "n": len(values), "score": round(100 * sum(values) / len(values), 2)}
    if any("length_bucket" in r["meta"] for r in records):
        buckets: dict[str, list[float]] = {name: [] for name, _ in BUCKETS}
        for r, v in zip(records, values, strict=True):
            buckets[r["meta"]["length_bucket"]].append(v)
        out["buckets"] = {k: round(100 * sum(v) / len(v), 2) if v else None for k, v in buckets.items()}
        out["bucket_n"] = {k: len(v) for k, v in buckets.items()}
    out["protocol"] = {k: task.get(k) for k in ("chat_template", "tokenize", "truncation", "postprocess",
                                                "eos_strings", "min_new_tokens", "max_new_tokens")}
    out["fuzzy_backend"] = fuzzy_backend()
    return out


def average(scores: Mapping[str, float], subset: str = "en16") -> float:
    """Plain mean of the (already rounded) dataset scores of ``subset`` (``en16``: SnapKV / PyramidKV / CAKE's
    "avg"; ``all21``; ``e13``), rounded to 2 decimals as CAKE's ``eval.py --eval_avg``."""
    if subset not in SUBSETS:
        raise UsageError(f"unknown LongBench subset {subset!r}; choose from {', '.join(SUBSETS)}")
    missing = [n for n in SUBSETS[subset] if n not in scores]
    if missing:
        raise UsageError(f"the {subset} average needs every dataset; missing: {', '.join(missing)}")
    return round(sum(scores[n] for n in SUBSETS[subset]) / len(SUBSETS[subset]), 2)


def category_average(scores: Mapping[str, float], language: str = "en") -> float:
    """The LongBench README leaderboard average: mean over the 6 categories of the per-category means of the
    language's datasets (code counts for both languages)."""
    by_cat: dict[str, list[float]] = {}
    for name, spec in DATASETS.items():
        if spec.language in (language, "code"):
            if name not in scores:
                raise UsageError(f"the {language} category average needs {name}")
            by_cat.setdefault(spec.category, []).append(scores[name])
    return sum(sum(v) / len(v) for v in by_cat.values()) / len(by_cat)
