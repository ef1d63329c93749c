"""GenEval's prompts and their object specifications (djghosh13/geneval ``prompts/evaluation_metadata.jsonl``,
MIT): 553 prompts in six tags (single_object, two_object, counting, colors, position, color_attr), each line
``{"tag", "prompt", "include": [{"class", "count", "color"?, "position"?: [relation, group]}], "exclude"?: [...]}``.

Data: ``scripts/prepare_data.py geneval`` fetches the file at :data:`COMMIT`, checked against its SHA-256
(``<data>/geneval/evaluation_metadata.jsonl``). The scorer is :mod:`kvbench.var.geneval`; the task
``task=geneval`` (``conf/task/geneval.yaml``) generates GenEval's four images per prompt with Infinity.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvbench.errors import UsageError
from kvbench.tasks.download import download
from kvbench.tasks.hub import DataMissingError, prepare_command
from kvbench.tasks.pinned import Checksum

BENCHMARK = "geneval"
REPO = "djghosh13/geneval"
COMMIT = "af4902f24d3ca90ebbb446dd9891a59e0f82725f"
FILE = "evaluation_metadata.jsonl"
URL = f"https://raw.githubusercontent.com/{REPO}/{COMMIT}/prompts/{FILE}"
CHECKSUM = Checksum("5c48e0813e812e3c373fa5c8ed07a8f0a483be30272b4427b0559c8048e67c13", 85_209)
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def prepare(dest: Path, names: list[str] | None = None) -> list[Path]:
    """The metadata file into ``dest`` (``names`` unused: GenEval is one file)."""
    return [download(URL, Path(dest) / FILE, expected=CHECKSUM, root=dest)]


def metadata_file(task: Any) -> Path | None:
    """The metadata file of a GenEval task node (``task.loader.data_dir``), None for other tasks."""
    loader = task.get("loader") or {}
    return Path(str(loader["data_dir"])) / FILE if task.get("name") == BENCHMARK and loader.get("data_dir") else None


def load_metadata(path: str | Path) -> list[dict[str, Any]]:
    """The metadata lines of ``path``, checked: each has a known tag, a prompt and a non-empty include list."""
    if not Path(path).is_file():
        raise DataMissingError(f"GenEval's metadata {path} does not exist: run `{prepare_command(BENCHMARK)}` (it "
                               f"fetches {REPO}@{COMMIT[:7]}/prompts/{FILE} from GitHub) with KVBENCH_DATA (or "
                               "paths.data=...) pointing at the data root, or set task.loader.data_dir to the folder "
                               "that holds it")
    lines = Path(path).read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    bad = [i for i, r in enumerate(rows) if r.get("tag") not in TAGS or not r.get("prompt") or not r.get("include")]
    if bad or not rows:
        raise UsageError(f"{path}: not GenEval metadata (lines {bad[:5]} lack a known tag, a prompt or an include "
                         f"list; tags: {', '.join(TAGS)})")
    return rows
