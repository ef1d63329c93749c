"""Video-MME (BradyFU/Video-MME): 900 videos x 3 multiple-choice questions, short / medium / long.

Data (``prepare_data.py videomme``): the hub dataset ``lmms-lab/Video-MME`` (:data:`REVISION`):
``videomme/test-00000-of-00001.parquet`` (``video_id``, ``duration``, ``domain``, ``sub_category``, ``videoID``,
``question_id``, ``task_type``, ``question``, ``options`` = 4 strings ``"A. ..."``, ``answer`` = letter),
``videos_chunked_*.zip`` (``data/<videoID>.mp4``) and ``subtitle.zip`` (``subtitle/<videoID>.srt``). ``data_dir``
may also be a folder with that parquet file (or a ``.jsonl`` copy) and the ``data/`` and ``subtitle/`` folders.

One sample per video (its 3 questions share the video, so ``protocol=query_agnostic`` compresses it once): the
context is the video placeholder with ``num_frames`` uniformly sampled frames (:mod:`kvbench.tasks.vision`;
ZipVL: 64 or 128 with LongVA-7B) and, with ``subtitles: true``, the official subtitle block restricted to the
subtitles shown at the sampled frames' times (the README's rule); the question is the official prompt
(``Select the best answer ... The best answer is:``). Scored by ``videomme_mc`` (the official letter extraction);
``score_by_category`` is per duration, and :func:`official_scores` gives the official accuracy (correct /
answered) overall, per duration, domain and task type, next to the plain mean.
"""

from __future__ import annotations

import re
import zipfile
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kvbench.errors import UsageError
from kvbench.metrics.videomme import extract_letter
from kvbench.tasks import hub
from kvbench.tasks.agentnetbench import record_files
from kvbench.tasks.base import VIDEO, Question, Sample
from kvbench.tasks.vision import VideoFrames

BENCHMARK = "videomme"
REPO_ID = "lmms-lab/Video-MME"
#: The snapshot directory of many public Video-MME downloads (not checked against the hub from here); ``prepare``
#: also records the commit the hub resolves it to and every file's SHA-256 in ``source.json``.
REVISION = "ead1408f75b618502df9a1d8e0950166bf0a2a0b"
PARQUET = "videomme/test-00000-of-00001.parquet"
DURATIONS = ("short", "medium", "long")
INSTRUCTION = ("Select the best answer to the following multiple-choice question based on the video. Respond with "
               "only the letter (A, B, C, or D) of the correct option.")
SUBTITLE_HEAD = "This video's subtitles are listed below:"


def _rows(data_dir: Path) -> list[dict[str, Any]]:
    for name in (PARQUET, "test-00000-of-00001.parquet", "videomme.parquet", "videomme.jsonl"):
        if (data_dir / name).exists():
            return list(hub.load_local(data_dir / name))
    raise hub.DataMissingError(hub.missing_message(BENCHMARK, "Video-MME", data_dir / PARQUET))


def video_path(data_dir: Path, video_id: str) -> Path:
    for folder in ("data", "videos", "video", "."):
        for ext in (".mp4", ".MP4", ".mkv", ".webm"):
            if (data_dir / folder / f"{video_id}{ext}").exists():
                return data_dir / folder / f"{video_id}{ext}"
    raise hub.DataMissingError(hub.missing_message(BENCHMARK, f"Video-MME video {video_id}",
                                                   data_dir / "data" / f"{video_id}.mp4"))


def _seconds(stamp: str) -> float:
    h, m, s = stamp.replace(",", ".").split(":")
    return 3600 * int(h) + 60 * int(m) + float(s)


def parse_srt(text: str) -> list[tuple[float, float, str]]:
    """``(start, end, text)`` of every SRT cue (tags removed, lines joined by spaces)."""
    cues = []
    for block in re.split(r"\n\s*\n", text.strip()):
        lines = block.strip().splitlines()
        times = next((i for i, ln in enumerate(lines) if "-->" in ln), None)
        if times is None:
            continue
        start, end = (_seconds(t.strip()) for t in lines[times].split("-->"))
        cues.append((start, end, re.sub(r"<[^>]+>", "", " ".join(lines[times + 1:])).strip()))
    return cues


def frame_subtitles(cues: Sequence[tuple[float, float, str]], times: Sequence[float]) -> list[str]:
    """The cues shown at the sampled frames' times, each once, in time order."""
    return [text for start, end, text in cues if text and any(start <= t <= end for t in times)]


def subtitle_block(data_dir: Path, video_id: str, video: VideoFrames) -> str:
    srt = data_dir / "subtitle" / f"{video_id}.srt"
    if not srt.exists():  # 744 of the 900 videos have subtitles (all long ones)
        return ""
    import av

    with av.open(str(video.path)) as container:
        rate = float(container.streams.video[0].average_rate or 1)
    lines = frame_subtitles(parse_srt(srt.read_text(errors="replace")), [i / rate for i in video.indices()])
    return f"{SUBTITLE_HEAD}\n" + "\n".join(lines) + "\n" if lines else ""


def to_questions(rows: Sequence[Mapping[str, Any]]) -> list[Question]:
    out = []
    for r in rows:
        text = f"{INSTRUCTION}\n{r['question']}\n" + "\n".join(r["options"]) + "\nThe best answer is:"
        meta = {"category": r["duration"], "domain": r["domain"], "sub_category": r["sub_category"],
                "task_type": r["task_type"], "question_id": r["question_id"]}
        out.append(Question(id=str(r["question_id"]), text=text, answers=[str(r["answer"]).strip()], meta=meta))
    return out


def load(data_dir: str | Path, num_frames: int = 64, subtitles: bool = False,
         durations: Sequence[str] = DURATIONS, limit: int | None = None) -> list[Sample]:
    """One sample per video (its questions in order), for the chosen durations."""
    if any(d not in DURATIONS for d in durations):
        raise UsageError(f"task.loader.durations={list(durations)}; choose among {', '.join(DURATIONS)}")
    data_dir = Path(hub.require(data_dir, BENCHMARK, "Video-MME"))
    by_video: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in _rows(data_dir):
        if row["duration"] in durations:
            by_video[str(row["videoID"])].append(row)
    samples = []
    for vid, rows in list(by_video.items())[:limit]:
        video = VideoFrames(str(video_path(data_dir, vid)), int(num_frames))
        subs = subtitle_block(data_dir, vid, video) if subtitles else ""
        samples.append(Sample(id=vid, context=VIDEO + "\n" + subs, questions=to_questions(rows), frames=video,
                              meta={"video_id": rows[0]["video_id"], "duration": rows[0]["duration"],
                                    "num_frames": int(num_frames), "subtitles": bool(subs)}))
    return samples


def prepare(dest: str | Path, names: Sequence[str] | None = None) -> list[Path]:
    """Download the parquet file, the subtitles and the video archives (``names``: ``meta`` for the parquet and
    subtitles only), extract the archives, record every file's SHA-256."""
    from huggingface_hub import snapshot_download

    dest = Path(dest)
    if not hub.hub_reachable():
        raise hub.DataMissingError(hub.missing_message(BENCHMARK, f"{REPO_ID}@{REVISION}", dest / PARQUET))
    patterns = [PARQUET, "subtitle.zip"] + ([] if names and "meta" in names else ["videos_chunked_*.zip"])
    snapshot_download(REPO_ID, repo_type="dataset", revision=REVISION, local_dir=dest, allow_patterns=patterns)
    for archive in sorted(dest.glob("*.zip")):
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(dest)
    return record_files(dest, REPO_ID, REVISION)


def _acc(rows: Sequence[tuple[str, str]]) -> dict[str, Any]:
    answered = [(e, a) for e, a in rows if e]
    correct = sum(e == a for e, a in answered)
    return {"accuracy": 100 * correct / len(answered) if answered else 0.0,
            "accuracy_all": 100 * correct / len(rows) if rows else 0.0, "answered": len(answered), "n": len(rows)}


def official_scores(records: list[dict[str, Any]], task: Mapping[str, Any]) -> dict[str, Any]:
    """The official numbers (``accuracy`` = correct / answered, x100), overall and per duration, domain and task
    type; ``accuracy_all`` divides by every question."""
    rows = [(extract_letter(r["prediction"]), r["references"][0], r["meta"]) for r in records]

    def group(key: str) -> dict[str, Any]:
        keys = sorted({m[key] for _, _, m in rows})
        return {k: _acc([(e, a) for e, a, m in rows if m[key] == k]) for k in keys}

    return {**_acc([(e, a) for e, a, _ in rows]), "by_duration": group("category"), "by_domain": group("domain"),
            "by_task_type": group("task_type")}
