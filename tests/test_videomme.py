"""Video-MME: the official letter extraction (quirks included), answered-denominator accuracy, uniform frames and
subtitles on the fixture (a tiny video written with PyAV). The extraction was also compared with the official
``extract_characters_regex`` on 20,000 random strings: identical."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kvbench.metrics.videomme import extract_letter
from kvbench.tasks import videomme
from kvbench.tasks.hub import DataMissingError
from kvbench.tasks.vision import VideoFrames, uniform_indices

FIX = Path(__file__).parent / "fixtures" / "videomme"


@pytest.mark.parametrize(("response", "letter"), [
    ("B", "B"), ("The best answer is: C.", "C"), ("(D) because", "D"), ("Answer: D", "D"),
    ("Apple pie", "A"),  # any capital A-D counts, as officially
    ("Best answer: D", "B"),  # "Best answer:" is no prefix of its own (the official list misses a comma)
    ("I do not know which of these options fits this video at all, sorry", ""),  # > 10 words, no A-D
    ("Bad", "B"),  # <= 10 words: the first capital A-D wins
    ("", ""),
])
def test_official_extraction(response: str, letter: str) -> None:
    assert extract_letter(response) == letter


def test_uniform_indices_linspace() -> None:
    assert uniform_indices(12, 4) == [0, 4, 7, 11]
    assert uniform_indices(3, 64) == [0, 1, 2]
    assert uniform_indices(1000, 64)[-1] == 999 and len(uniform_indices(1000, 64)) == 64


def test_fixture_video_decodes_the_planted_frame() -> None:
    video = VideoFrames(str(FIX / "data" / "fxa001.mp4"), 12)
    frames = [np.asarray(f, dtype=float) for f in video]
    assert len(frames) == 12 and frames[0].shape == (32, 32, 3)
    yellow = [f[20:28, 20:28].mean(axis=(0, 1)) for f in frames]
    assert [i for i, c in enumerate(yellow) if c[0] > 200 and c[1] > 200 and c[2] < 80] == [5]


def test_loader_questions_subtitles_and_official_scores() -> None:
    samples = videomme.load(FIX, num_frames=4, subtitles=True)
    assert [s.id for s in samples] == ["fxa001", "fxa002"] and all(len(s.questions) == 3 for s in samples)
    assert samples[0].context == ("<|kvbench_video|>\nThis video's subtitles are listed below:\n"
                                  "A red square appears.\nIt keeps moving.\n")  # frames at 0, 1, 1.75, 2.75 s
    assert samples[1].context == "<|kvbench_video|>\n" and len(samples[1].frames) == 4
    q = samples[0].questions[0]
    assert q.text.endswith("D. Yellow.\nThe best answer is:") and q.answers == ["A"] and q.meta["category"] == "short"
    assert videomme.load(FIX, num_frames=4, durations=["medium"])[0].id == "fxa002"
    recs = [{"prediction": p, "references": [a], "meta": {"category": d, "domain": "K", "task_type": "T"}}
            for p, a, d in (("A", "A", "short"), ("xyz", "B", "short"), ("C", "D", "medium"))]
    got = videomme.official_scores(recs, {})
    assert got["accuracy"] == 50 and got["answered"] == 2 and got["accuracy_all"] == pytest.approx(100 / 3)
    assert got["by_duration"]["short"]["accuracy"] == 100


def test_missing_data_is_one_message(tmp_path: Path) -> None:
    with pytest.raises(DataMissingError, match="prepare_data.py videomme"):
        videomme.load(tmp_path / "none")
