"""ScreenSpot-v2 and ScreenSpot-Pro: single-screenshot GUI grounding (click inside the target element's box).

Releases (``prepare_data.py screenspot``):

* **ScreenSpot-v2** (OS-Atlas; hub dataset ``OS-Copilot/ScreenSpot-v2`` at :data:`V2_REVISION`): ``screenspot_
  {mobile,desktop,web}_v2.json`` with ``img_filename``, ``bbox`` = ``[x, y, w, h]`` in pixels, ``instruction``,
  ``data_type`` (text / icon), ``data_source``; screenshots in ``screenspotv2_image.zip`` (extracted to
  ``screenspotv2_image/``).
* **ScreenSpot-Pro** (hub dataset ``likaixin/ScreenSpot-Pro``): ``annotations/<application>_<platform>.json``
  with ``img_filename``, ``bbox`` = ``[x1, y1, x2, y2]`` in pixels, ``img_size`` ``[w, h]``, ``instruction``,
  ``ui_type``, ``platform``, ``application``, ``group``, ``id``; screenshots under ``images/``.

One sample per instruction: the screenshot is the context, the prompt the question (GUI-KV's drivers: UI-TARS's
``GROUNDING_DOUBAO`` prompt, OpenCUA's system sentence + newline + instruction), scored by ``screenspot_click``
(:mod:`kvbench.metrics.screenspot`). ``Question.meta["category"]`` is ``<platform>/<text|icon>`` (v2:
``<split>/<data_type>``), so ``score_by_category`` gives the SeeClick table; :func:`official_scores` adds the
overall accuracy, text / icon accuracy, and GUI-KV's macro average (mean over splits of (text + icon) / 2).
Deviation: GUI-KV's ScreenSpot-Pro driver reads Pro's ``[x1, y1, x2, y2]`` boxes as ``[x, y, w, h]`` (too-large
boxes); kvbench uses the release's corner format, as the official evaluator does. Pro's negative (refusal)
instructions and Chinese instructions are not included (the official default is positive, English).
"""

from __future__ import annotations

import json
import zipfile
import zlib
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kvbench.errors import UsageError
from kvbench.tasks import hub
from kvbench.tasks.agentnetbench import record_files
from kvbench.tasks.base import IMAGE, Question, Sample
from kvbench.tasks.vision import image_size

BENCHMARK = "screenspot"
V2_REPO, PRO_REPO = "OS-Copilot/ScreenSpot-v2", "likaixin/ScreenSpot-Pro"
#: ScreenSpot-v2's hub commit as pinned by other public projects (not independently checked from here; no
#: published checksums: ``source.json`` records each file's SHA-256).
V2_REVISION = "5efbb1f1b5463a575f2eb7bc30fe29e49c15f93c"
PRO_REVISION = "main"  # no commit found from here: prepare records the one it resolved
V2_SPLITS = ("mobile", "desktop", "web")
VERSIONS = ("v2", "pro")
GROUNDING_UITARS = (
    "You are a GUI agent. You are given a task and your action history, with screenshots. You need to perform the "
    "next action to complete the task. \n\n## Output Format\n\nAction: ...\n\n\n## Action Space\n"
    "click(point='<point>x1 y1</point>'')\n\n## User Instruction\n{instruction}"
)
GROUNDING_OPENCUA = ("You are a GUI agent. You are given a task and a screenshot of the screen. You need to perform a "
                     "series of pyautogui actions to complete the task.\n{instruction}")
PROMPTS = {"uitars": GROUNDING_UITARS, "opencua": GROUNDING_OPENCUA}


def _v2_items(data_dir: Path, splits: Sequence[str]) -> list[tuple[str, dict[str, Any], Path]]:
    out = []
    for split in splits:
        path = hub.require(data_dir / f"screenspot_{split}_v2.json", BENCHMARK, f"ScreenSpot-v2 {split}", ["v2"])
        out += [(split, item, data_dir / "screenspotv2_image" / item["img_filename"])
                for item in json.loads(path.read_text())]
    return out


def _pro_items(data_dir: Path, splits: Sequence[str] | None) -> list[tuple[str, dict[str, Any], Path]]:
    folder = hub.require(data_dir / "annotations", BENCHMARK, "ScreenSpot-Pro annotations", ["pro"])
    files = sorted(folder.glob("*.json")) if not splits else [folder / f"{s}.json" for s in splits]
    return [(f.stem, item, data_dir / "images" / item["img_filename"])
            for f in files for item in json.loads(hub.require(f, BENCHMARK, f"ScreenSpot-Pro {f.stem}").read_text())]


def target_box(version: str, item: Mapping[str, Any], size: tuple[int, int]) -> list[float]:
    """The normalised ``[x1, y1, x2, y2]`` box (v2 stores ``[x, y, w, h]``, Pro ``[x1, y1, x2, y2]``)."""
    x, y, a, b = (float(v) for v in item["bbox"])
    x2, y2 = (x + a, y + b) if version == "v2" else (a, b)
    return [x / size[0], y / size[1], x2 / size[0], y2 / size[1]]


def to_sample(version: str, split: str, item: Mapping[str, Any], image: Path, action_format: str) -> Sample:
    image = hub.require(image, BENCHMARK, f"ScreenSpot-{version} screenshot", [version])
    size = image_size(image)
    ui = item.get("data_type", item.get("ui_type", ""))
    platform = split if version == "v2" else item.get("platform", "")
    meta = {"category": f"{platform}/{ui}", "ui_type": ui, "split": split, "group": item.get("group"),
            "application": item.get("application"), "source": item.get("data_source"),
            "metric_kwargs": {"action_format": action_format, "image_size": list(size)}}
    q = Question(id="0", text=PROMPTS[action_format].format(instruction=item["instruction"]),
                 answers=[json.dumps(target_box(version, item, size))], meta=meta)
    crc = zlib.crc32(item["instruction"].encode())
    ident = item.get("id") or f"{split}-{Path(item['img_filename']).stem}-{crc:08x}"
    return Sample(id=str(ident), context=IMAGE, questions=[q], images=[str(image)],
                  meta={"version": version, "split": split})


def load(version: str, data_dir: str | Path, action_format: str = "uitars", splits: Sequence[str] | None = None,
         limit: int | None = None) -> list[Sample]:
    """Every instruction of the release (``splits``: v2 platforms, or Pro annotation file stems)."""
    if version not in VERSIONS:
        raise UsageError(f"task.loader.version={version!r}; choose one of {', '.join(VERSIONS)}")
    if action_format not in PROMPTS:
        raise UsageError(f"task.loader.action_format={action_format!r}; choose one of {', '.join(PROMPTS)}")
    data_dir = Path(data_dir)
    hub.require(data_dir, BENCHMARK, f"ScreenSpot-{version}", [version])
    items = _v2_items(data_dir, list(splits or V2_SPLITS)) if version == "v2" else _pro_items(data_dir, splits)
    samples = [to_sample(version, s, it, img, action_format) for s, it, img in items[:limit]]
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):  # v2 has no ids: number repeated (image, instruction) pairs
        for i, s in enumerate(samples):
            s.id = f"{i}-{s.id}"
    return samples


def prepare(dest: str | Path, names: Sequence[str] | None = None) -> list[Path]:
    """Download ScreenSpot-v2 (``dest/v2``) and ScreenSpot-Pro (``dest/pro``), or those of ``names``."""
    from huggingface_hub import snapshot_download

    chosen = list(names or VERSIONS)
    if any(n not in VERSIONS for n in chosen):
        raise UsageError(f"screenspot: choose from {', '.join(VERSIONS)}, got {chosen}")
    dest, out = Path(dest), []
    for name in chosen:
        repo, rev = (V2_REPO, V2_REVISION) if name == "v2" else (PRO_REPO, PRO_REVISION)
        if not hub.hub_reachable():
            raise hub.DataMissingError(hub.missing_message(BENCHMARK, f"{repo}@{rev}", dest / name, [name]))
        snapshot_download(repo, repo_type="dataset", revision=rev, local_dir=dest / name)
        for archive in (dest / name).glob("*.zip"):
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(dest / name)
        out += record_files(dest / name, repo, rev)
    return out


def official_scores(records: list[dict[str, Any]], task: Mapping[str, Any]) -> dict[str, Any]:
    """Overall, text and icon accuracy (x100, the official ``calc_metric_for_result_list``), per split, and GUI-KV's
    macro average over splits of (text + icon) / 2."""
    name = task["metrics"][0]
    by: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in records:
        by[(r["meta"]["split"], r["meta"]["ui_type"])].append(r["scores"][name])

    def acc(keys: Sequence[tuple[str, str]]) -> float:
        vals = [v for k in keys for v in by[k]]
        return 100 * sum(vals) / len(vals) if vals else 0.0

    splits = sorted({s for s, _ in by})
    per_split = {s: {"text": acc([(s, "text")]), "icon": acc([(s, "icon")])} for s in splits}
    return {"accuracy": acc(list(by)), "text_accuracy": acc([k for k in by if k[1] == "text"]),
            "icon_accuracy": acc([k for k in by if k[1] == "icon"]), "by_split": per_split,
            "guikv_macro": sum((v["text"] + v["icon"]) / 2 for v in per_split.values()) / len(per_split)}
