"""GenEval (Ghosh et al. 2023; djghosh13/geneval ``evaluation/evaluate_images.py`` and ``summary_scores.py``, MIT):
an image is correct when an instance detector finds the prompt's objects, counts, colours and relative positions.

The rules are the authors' (our code): per class, detections above ``threshold`` (``counting_threshold`` for the
counting tag), most confident first, at most ``max_objects``, optionally de-duplicated by IoU (``max_overlap`` 1 =
off); every ``include`` clause needs ``count`` objects (the most confident ones), of ``color`` when given (CLIP
zero-shot over GenEval's ten colours on the object's masked crop over a grey ``#999`` background, three templates),
and ``position`` relative to every object of an earlier clause's group (centre offset shrunk by
``position_threshold`` x the summed box sizes, then the direction within 60 degrees of an axis); any ``exclude``
clause met makes it wrong. The summary: accuracy per tag, their mean (GenEval's overall score), the fraction of
correct images and of prompts with at least one correct image.

Where we deviate (the packages the authors use need torchvision / mmcv, which this CPU torch has no build for):
* The detector is transformers' Mask2Former (``Mask2FormerForUniversalSegmentation``; default
  ``facebook/mask2former-swin-small-coco-instance``, the same Swin-S COCO-instance architecture) instead of
  mmdetection's ``mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco`` checkpoint: other weights, and transformers'
  post-processing (the same top-100 query x class scores times the mask score; masks at 384^2 resized nearest
  to the image, scores rounded to 1e-6, empty masks dropped). Boxes come from the masks as mmdetection's
  ``mask2bbox`` makes them (``[x0, y0, x1 + 1, y1 + 1]``). Scores are therefore close to, not equal to, the
  official ones.
* Colours with transformers' ``CLIPModel`` (``openai/clip-vit-large-patch14``, the weights of open_clip's
  ``ViT-L-14`` / ``openai``) and ``CLIPProcessor`` (the same resize, centre crop and normalisation), as
  clip_benchmark's zero-shot classifier builds it: mean of the normalised template embeddings, renormalised.
"""

from __future__ import annotations

import collections
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from kvbench.errors import UsageError

#: GenEval's class names in COCO's contiguous label order (``evaluation/object_names.txt``).
OBJECTS = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "computer mouse", "tv remote", "computer keyboard", "cell phone", "microwave", "oven", "toaster",
    "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush")
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
TEMPLATES = ("a photo of a {c} {o}", "a photo of a {c}-colored {o}", "a photo of a {c} object")

Box = np.ndarray  # (5,) x0, y0, x1, y1, score
Detection = tuple[Box, "np.ndarray | None"]  # a box and its (H, W) bool mask
Objects = dict[str, list[Detection]]
ColorsOf = Callable[[Image.Image, list[Detection], str], list[str]]


@dataclass(frozen=True)
class Settings:
    """The authors' ``--options`` and their defaults."""

    threshold: float = 0.3
    counting_threshold: float = 0.9
    max_objects: int = 16
    max_overlap: float = 1.0
    position_threshold: float = 0.1
    bgcolor: str = "#999"  # or "original": the crop keeps the whole image behind the mask
    crop: bool = True


def iou(a: Box, b: Box) -> float:
    """Box IoU with the authors' inclusive (+1) pixel areas."""
    def area(x: list[float]) -> float:
        return max(x[2] - x[0] + 1, 0) * max(x[3] - x[1] + 1, 0)

    inter = area([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])
    union = area(list(a)) + area(list(b)) - inter
    return inter / union if union else 0.0


def keep(found: Objects, tag: str, s: Settings) -> Objects:
    """Per class: above the tag's threshold, most confident first, at most ``max_objects``, IoU-deduplicated."""
    threshold = s.counting_threshold if tag == "counting" else s.threshold
    out: Objects = {}
    for name, dets in found.items():
        order = sorted((d for d in dets if d[0][4] > threshold), key=lambda d: -d[0][4])[: s.max_objects]
        kept: list[Detection] = []
        while order:
            best = order.pop(0)
            kept.append(best)
            order = [d for d in order if s.max_overlap == 1 or iou(best[0], d[0]) < s.max_overlap]
        if kept:
            out[name] = kept
    return out


def relative_position(a: Detection, b: Detection, threshold: float) -> set[str]:
    """Where A is relative to B: the centre offset, each axis shrunk by ``threshold`` x (A's + B's size)."""
    boxes = np.array([a[0][:4], b[0][:4]], dtype=float).reshape(2, 2, 2)  # (object, corner, xy)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - threshold * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rel = {"left of": dx < -0.5, "right of": dx > 0.5, "above": dy < -0.5, "below": dy > 0.5}
    return {k for k, v in rel.items() if v}


def _position_ok(found: list[Detection], group: list[Detection] | None, relation: str, s: Settings,
                 name: str) -> str | None:
    """None if every found object has ``relation`` to every object of the target group, else the reason."""
    if group is None:
        return f"no target for {name} to be {relation}"
    for obj in found:
        for target in group:
            rels = relative_position(obj, target, s.position_threshold)
            if relation not in rels:
                return f"expected {name} {relation} target, found {' and '.join(rels)} target"
    return None


def evaluate(image: Image.Image, objects: Objects, meta: dict[str, Any], colors_of: ColorsOf,
             s: Settings) -> tuple[bool, list[str]]:
    """(correct, reasons) of one image's kept detections against its metadata (the authors' ``evaluate``)."""
    correct, reasons, groups = True, [], []
    for req in meta.get("include", []):
        name, count = req["class"], req["count"]
        found = objects.get(name, [])[:count]
        reason = f"expected {name}>={count}, found {len(found)}" if len(found) < count else None
        if reason is None and "color" in req:
            colors = colors_of(image, found, name)
            if colors.count(req["color"]) < count:
                reason = (f"expected {req['color']} {name}>={count}, found {colors.count(req['color'])} "
                          f"{req['color']}; and " + ", ".join(f"{colors.count(c)} {c}" for c in COLORS if c in colors))
        if reason is None and "position" in req:
            relation, target = req["position"]
            reason = _position_ok(found, groups[target], relation, s, name)
        groups.append(found if reason is None else None)
        if reason is not None:
            correct = False
            reasons.append(reason)
    for req in meta.get("exclude", []):
        if len(objects.get(req["class"], [])) >= req["count"]:
            correct = False
            reasons.append(f"expected {req['class']}<{req['count']}, found {len(objects[req['class']])}")
    return correct, reasons


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """GenEval's summary of per-image rows (``tag``, ``prompt``, ``correct``): overall = mean of the tag scores."""
    by_tag: dict[str, list[bool]] = collections.defaultdict(list)
    by_prompt: dict[str, list[bool]] = collections.defaultdict(list)
    for r in rows:
        by_tag[r["tag"]].append(r["correct"])
        by_prompt[r["prompt"]].append(r["correct"])
    tags = {t: statistics.fmean(v) for t, v in by_tag.items()}
    return {"overall": statistics.fmean(tags.values()), "by_tag": tags, "images": len(rows),
            "correct_images": statistics.fmean(r["correct"] for r in rows),
            "correct_prompts": statistics.fmean(any(v) for v in by_prompt.values())}


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """mmdetection's ``mask2bbox``: ``[x0, y0, x1 + 1, y1 + 1]`` of a non-empty (H, W) mask."""
    ys, xs = np.nonzero(mask)
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


class Mask2FormerDetector:
    """transformers' Mask2Former instance segmentation: an image -> ``{class name: [(box, mask)]}`` (all scores)."""

    def __init__(self, path: str, device: torch.device | str = "cpu") -> None:
        from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

        try:
            self.model = Mask2FormerForUniversalSegmentation.from_pretrained(path).to(device).eval()
            self.processor = AutoImageProcessor.from_pretrained(path)
        except OSError as err:
            raise UsageError(f"task metric geneval needs an instance detector: task.geneval_detector={path!r} could "
                             "not be loaded (download facebook/mask2former-swin-small-coco-instance into the hub "
                             f"cache or give a local folder): {err}") from err
        if self.model.config.num_labels != len(OBJECTS):
            raise UsageError(f"{path}: a COCO instance model with {len(OBJECTS)} classes is needed, this one has "
                             f"{self.model.config.num_labels}")

    @torch.no_grad()
    def __call__(self, image: Image.Image) -> Objects:
        inputs = self.processor(images=image, return_tensors="pt").to(self.model.device)
        out = self.model(**inputs)
        res = self.processor.post_process_instance_segmentation(
            out, threshold=0.0, target_sizes=[image.size[::-1]], return_binary_maps=True)[0]
        found: Objects = collections.defaultdict(list)
        for info, mask in zip(res["segments_info"], res["segmentation"] if res["segments_info"] else [], strict=True):
            m = mask.bool().cpu().numpy()
            found[OBJECTS[info["label_id"]]].append((np.array([*mask_box(m), info["score"]]), m))
        return dict(found)


class ClipColors:
    """GenEval's colour classifier with transformers' CLIP: one zero-shot head per object class, cached."""

    def __init__(self, clip: tuple[Any, Any], s: Settings) -> None:
        self.model, self.processor = clip
        self.s, self.heads = s, {}

    @torch.no_grad()
    def head(self, name: str) -> Tensor:
        """(dim, colours): per colour the mean of its normalised template embeddings, renormalised."""
        if name not in self.heads:
            texts = [t.format(c=c, o=name) for c in COLORS for t in TEMPLATES]
            tok = self.processor(text=texts, return_tensors="pt", padding=True).to(self.model.device)
            emb = self.model.text_projection(self.model.text_model(**tok).pooler_output)
            emb = torch.nn.functional.normalize(emb, dim=-1).view(len(COLORS), len(TEMPLATES), -1).mean(1)
            self.heads[name] = torch.nn.functional.normalize(emb, dim=-1).T
        return self.heads[name]

    def crop(self, image: Image.Image, det: Detection) -> Image.Image:
        """The object's pixels over the grey background (its mask), cropped to its box, as the authors do."""
        box, mask = det
        blank = image.copy() if self.s.bgcolor == "original" else Image.new("RGB", image.size, color=self.s.bgcolor)
        out = image if mask is None else Image.composite(image, blank, Image.fromarray(mask))
        return out.crop(tuple(box[:4])) if self.s.crop else out

    @torch.no_grad()
    def __call__(self, image: Image.Image, found: list[Detection], name: str) -> list[str]:
        pixels = self.processor(images=[self.crop(image, d) for d in found], return_tensors="pt").pixel_values
        feats = self.model.visual_projection(self.model.vision_model(pixel_values=pixels.to(self.model.device))
                                             .pooler_output)
        logits = torch.nn.functional.normalize(feats, dim=-1) @ self.head(name)  # (objects, colours)
        return [COLORS[i] for i in logits.argmax(1).tolist()]


@dataclass
class GenEval:
    """A detector, a colour classifier and the settings: :meth:`score` rates one image."""

    detector: Callable[[Image.Image], Objects]
    colors_of: ColorsOf
    settings: Settings

    def score(self, image: Tensor, meta: dict[str, Any]) -> dict[str, Any]:
        """One (3, H, W) image in [0, 1] against its metadata line: the authors' result row."""
        pil = Image.fromarray(image.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy())
        objects = keep(self.detector(pil), meta["tag"], self.settings)
        correct, reasons = evaluate(pil, objects, meta, self.colors_of, self.settings)
        return {"tag": meta["tag"], "prompt": meta["prompt"], "correct": correct, "reason": "\n".join(reasons),
                "details": {k: [d[0].tolist() for d in v] for k, v in objects.items()}}


def load_geneval(detector: str, clip: tuple[Any, Any], settings: dict[str, Any] | None = None,
                 device: torch.device | str = "cpu") -> GenEval:
    s = Settings(**(settings or {}))
    return GenEval(Mask2FormerDetector(detector, device), ClipColors(clip, s), s)
