"""GenEval (Ghosh et al. 2023): compositional correctness of an image against its prompt's metadata.

The rules follow GenEval's evaluation/evaluate_images.py: detections of each class above a confidence threshold
(0.3; 0.9 for the "counting" tag), at most 16 per class; every `include` entry needs `count` objects of its class,
of its color (CLIP zero-shot over 10 colors on the masked crop) and at its position relative to an earlier entry's
objects; every `exclude` entry needs fewer than `count`. An image scores 1 if all hold, else 0; a prompt set's
GenEval score is the mean over tags of the per-tag accuracy.

The detector is GenEval's Mask2Former through mmdet (2.x result lists or 3.x DetDataSample), detected at run time;
`detector` (a callable image -> {class: [(box (x1, y1, x2, y2, score), mask or None), ...]}) replaces it. The
color classifier is a transformers CLIP (GenEval uses CLIP ViT-L/14, i.e. the openai/clip-vit-large-patch14 folder).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from opd_fast.evaluate.base import ClipReward, Reward, RewardError, register

COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]
COLOR_TEMPLATES = [
    "a photo of a {color} {object}",
    "a photo of a {color}-colored {object}",
    "a photo of a {color} object",
]
THRESHOLD, COUNTING_THRESHOLD, MAX_OBJECTS, NMS_THRESHOLD, POSITION_THRESHOLD = 0.3, 0.9, 16, 1.0, 0.1


def _iou(a, b) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(x2 - x1, 0) * max(y2 - y1, 0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def select_objects(detections: dict[str, list], tag: str) -> dict[str, list]:
    """Keep, per class, the detections above the tag's confidence threshold, best first, at most MAX_OBJECTS
    (NMS at GenEval's threshold 1.0 keeps everything; kept for other thresholds)."""
    threshold = COUNTING_THRESHOLD if tag == "counting" else THRESHOLD
    objects = {}
    for name, dets in detections.items():
        ranked = sorted((d for d in dets if d[0][4] > threshold), key=lambda d: -d[0][4])[:MAX_OBJECTS]
        kept = []
        while ranked:
            best = ranked.pop(0)
            kept.append(best)
            ranked = [d for d in ranked if NMS_THRESHOLD == 1 or _iou(best[0], d[0]) < NMS_THRESHOLD]
        if kept:
            objects[name] = kept
    return objects


def relative_position(obj_a, obj_b) -> set[str]:
    """GenEval's relations of a to b from box centers, ignoring offsets within 10% of the summed box sizes."""
    boxes = np.array([obj_a[0][:4], obj_b[0][:4]], dtype=np.float64).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def evaluate(image, objects: dict[str, list], metadata: dict, classify_colors) -> tuple[bool, str]:
    """(correct, reasons) for one image; classify_colors(image, objects, class) -> one color name per object."""
    correct, reasons, matched_groups = True, [], []
    for req in metadata.get("include", []):
        name, count = req["class"], req["count"]
        matched = True
        found = objects.get(name, [])[:count]
        if len(found) < count:
            correct = matched = False
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        else:
            if "color" in req:
                colors = classify_colors(image, found, name)
                if colors.count(req["color"]) < count:
                    correct = matched = False
                    reasons.append(
                        f"expected {req['color']} {name}>={count}, found "
                        f"{colors.count(req['color'])} {req['color']}; and "
                        + ", ".join(f"{colors.count(c)} {c}" for c in COLORS if c in colors)
                    )
            if "position" in req and matched:
                relation, target = req["position"]
                if matched_groups[target] is None:
                    correct = matched = False
                    reasons.append(f"no target for {name} to be {relation}")
                else:
                    for obj in found:
                        for target_obj in matched_groups[target]:
                            actual = relative_position(obj, target_obj)
                            if relation not in actual:
                                correct = matched = False
                                reasons.append(
                                    f"expected {name} {relation} target, found "
                                    f"{' and '.join(sorted(actual)) or 'no relation'}"
                                )
                                break
                        if not matched:
                            break
        matched_groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        name, count = req["class"], req["count"]
        if len(objects.get(name, [])) >= count:
            correct = False
            reasons.append(f"expected {name}<{count}, found {len(objects[name])}")
    return correct, "\n".join(reasons)


class ColorClassifier:
    """CLIP zero-shot color of each object: the image composited over gray (#999) outside the object's mask,
    cropped to its box, against the mean of three templates per color (GenEval's classifier)."""

    def __init__(self, clip: ClipReward):
        self.clip = clip
        self.weights: dict[str, torch.Tensor] = {}  # class -> (D, colors)

    def _classifier(self, name: str) -> torch.Tensor:
        if name not in self.weights:
            columns = []
            for color in COLORS:
                e = self.clip.text_embeds([t.format(color=color, object=name) for t in COLOR_TEMPLATES]).mean(0)
                columns.append(e / e.norm())
            self.weights[name] = torch.stack(columns, 1)
        return self.weights[name]

    def __call__(self, image, objects: list, name: str) -> list[str]:
        from PIL import Image

        image = image.convert("RGB")
        blank = Image.new("RGB", image.size, "#999")
        crops = []
        for box, mask in objects:
            crop = image
            if mask is not None:
                crop = Image.composite(image, blank, Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255))
            crops.append(crop.crop(tuple(float(v) for v in box[:4])))
        logits = self.clip.image_embeds(crops) @ self._classifier(name)
        return [COLORS[i] for i in logits.argmax(1).tolist()]


def _mmdet_detector(config: Path, checkpoint: Path, device: torch.device, class_names: list[str] | None):
    """image -> {class: [(box5, mask)]} through mmdet 2.x (lists per class) or 3.x (DetDataSample)."""
    from mmdet.apis import inference_detector, init_detector

    model = init_detector(str(config), str(checkpoint), device=str(device))
    names = class_names or list(getattr(model, "CLASSES", None) or model.dataset_meta["classes"])

    def detect(image) -> dict[str, list]:
        result = inference_detector(model, np.asarray(image.convert("RGB"))[..., ::-1].copy())  # mmdet takes BGR
        out = defaultdict(list)
        if hasattr(result, "pred_instances"):  # mmdet 3.x
            inst = result.pred_instances
            masks = inst.masks.cpu().numpy() if "masks" in inst else None
            boxes = torch.cat([inst.bboxes, inst.scores[:, None]], 1).cpu().numpy()
            for k, label in enumerate(inst.labels.tolist()):
                out[names[label]].append((boxes[k], None if masks is None else masks[k]))
        else:  # mmdet 2.x: (bbox lists, segm lists) per class
            bbox, segm = result if isinstance(result, tuple) else (result, None)
            for c, boxes in enumerate(bbox):
                for k in range(len(boxes)):
                    out[names[c]].append((boxes[k], None if segm is None else segm[c][k]))
        return dict(out)

    return detect


@register("geneval")
class GenEval(Reward):
    """options: detector_config / detector_checkpoint (GenEval's mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.py
    and .pth), clip_model (a CLIP folder for colors), class_names (GenEval's object_names.txt, when the detector's
    class names differ from the prompts'), or detector (a callable) instead of the mmdet pair."""

    requires = ("mmdet",)
    install_hint = "GenEval's stack: mmcv-full 1.x + mmdet 2.x built for your torch/CUDA; see the GenEval README"

    @classmethod
    def unavailable(cls) -> str | None:
        return None  # checked in __init__: an injected detector needs no mmdet

    def __init__(
        self,
        clip_model: str | None = None,
        detector_config: str | None = None,
        detector_checkpoint: str | None = None,
        class_names: str | None = None,
        detector=None,
        device: str | None = None,
        batch_size: int = 16,
    ):
        super().__init__(device, batch_size)
        self.colors = ColorClassifier(ClipReward(clip_model, device=device, batch_size=batch_size))
        if detector is not None:
            self.detect = detector
            return
        reason = super().unavailable()
        if reason:
            raise RewardError(reason)
        names = None
        if class_names is not None:
            names = [
                ln.strip()
                for ln in self._local("class_names", class_names, "file").read_text().splitlines()
                if ln.strip()
            ]
        self.detect = _mmdet_detector(
            self._local("detector_config", detector_config, "file"),
            self._local("detector_checkpoint", detector_checkpoint, "file"),
            self.device,
            names,
        )

    def judge(self, image, metadata: dict) -> tuple[bool, str]:
        objects = select_objects(self.detect(image), metadata.get("tag", ""))
        return evaluate(image, objects, metadata, self.colors)

    def score(self, images, prompts, metadata):
        if not metadata or any("include" not in m for m in metadata):
            raise RewardError(
                "reward 'geneval': every prompt needs GenEval metadata (tag, include); sample from "
                "the geneval .jsonl prompt set"
            )
        return [float(self.judge(image, meta)[0]) for image, meta in zip(images, metadata)]

    def aggregate(self, scores, metadata):
        """GenEval's overall score: the mean over tags of each tag's accuracy."""
        by_tag = defaultdict(list)
        for score, meta in zip(scores, metadata):
            by_tag[meta.get("tag", "")].append(score)
        return sum(sum(v) / len(v) for v in by_tag.values()) / len(by_tag)
