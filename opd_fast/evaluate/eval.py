"""Score sample folders (written by `opd-fast sample`) with the rewards of each task, and tabulate like the paper:
one row per model, one column per task metric, and their average.

The reward spec (YAML) says which rewards score which task's samples; options are the reward's (local paths):

    rewards:
      geneval:   [{name: geneval, clip_model: /m/clip-vit-large-patch14, detector_config: /m/mask2former.py,
                   detector_checkpoint: /m/mask2former.pth}]
      ocr:       [{name: ocr, det_model_dir: /m/ppocr_det, rec_model_dir: /m/ppocr_rec}]
      pickscore: [{name: pickscore, model: /m/PickScore_v1, processor: /m/CLIP-ViT-H-14-laion2B-s32B-b79K}]
      "*":       [{name: aesthetic, model: /m/clip-vit-large-patch14, head: /m/sac+logos+ava1-l14-linearMSE.pth}]

("*" applies to every task.) Every reward is built before any image is scored, so a missing package or file fails
at once. Output: results.json, results.md, and scores/<model>/<task>.jsonl with every image's scores.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from opd_fast.evaluate.base import Reward, RewardError
from opd_fast.evaluate.registry import build_reward

log = logging.getLogger(__name__)
CHUNK = 64  # images held in memory at once


@dataclass
class SampleFolder:
    path: Path
    label: str  # the table row: the model
    task: str
    records: list[dict]  # samples.jsonl lines: index, prompt, seed, file, metadata


def load_sample_folder(spec: str | Path) -> SampleFolder:
    """`FOLDER` or `LABEL=FOLDER`; the label defaults to the sampled model (student, ema, teacher:ocr, ...)."""
    spec = str(spec)
    label, _, folder = spec.partition("=") if "=" in spec and not Path(spec).exists() else ("", "", spec)
    path = Path(folder)
    if not (path / "samples.jsonl").is_file() or not (path / "sample.json").is_file():
        raise RewardError(f"{path}: not a sample folder (expected samples.jsonl and sample.json from opd-fast sample)")
    settings = json.loads((path / "sample.json").read_text())
    with open(path / "samples.jsonl") as f:
        records = [json.loads(line) for line in f if line.strip()]
    task = settings.get("task") or Path(settings.get("extra", {}).get("prompts", "") or path.name).stem
    return SampleFolder(path, label or settings.get("model", path.name), task, records)


def load_reward_spec(path: str | Path) -> dict[str, list[dict]]:
    path = Path(path)
    if not path.is_file():
        raise RewardError(f"reward spec not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    rewards = data.get("rewards") if isinstance(data, dict) else None
    if not isinstance(rewards, dict) or not rewards:
        raise RewardError(f"{path}: expected a mapping 'rewards: {{task: [{{name: ..., options...}}]}}'")
    for task, entries in rewards.items():
        if not isinstance(entries, list) or not all(
            isinstance(e, dict) and isinstance(e.get("name"), str) for e in entries
        ):
            raise RewardError(f"{path}: rewards.{task} must be a list of {{name: ..., options...}}")
    return rewards


def column(task: str, reward: str) -> str:
    return reward if task == reward else f"{task}/{reward}"


def _images(folder: SampleFolder, records: list[dict]) -> list:
    from PIL import Image

    out = []
    for r in records:
        with Image.open(folder.path / r["file"]) as image:
            out.append(image.convert("RGB"))
    return out


def score_folder(folder: SampleFolder, rewards: dict[str, Reward]) -> dict[str, list[float]]:
    """Every image's score under each reward, reading the images CHUNK at a time."""
    scores = {name: [] for name in rewards}
    for start in range(0, len(folder.records), CHUNK):
        records = folder.records[start : start + CHUNK]
        images = _images(folder, records)
        prompts = [r["prompt"] for r in records]
        metadata = [r.get("metadata") or {} for r in records]
        for name, reward in rewards.items():
            values = reward.score(images, prompts, metadata)
            if len(values) != len(records):
                raise RewardError(f"reward {name!r} returned {len(values)} scores for {len(records)} images")
            scores[name].extend(float(v) for v in values)
    return scores


def evaluate_folders(
    folder_specs: list,
    reward_spec: dict[str, list[dict]],
    out_dir: str | Path,
    device: str | None = None,
    batch_size: int = 16,
) -> dict:
    """Score each folder with its task's rewards; write results.json, results.md, scores/. Returns the results."""
    folders = [load_sample_folder(s) for s in folder_specs]
    built: dict[str, Reward] = {}
    per_task: dict[str, dict[str, Reward]] = {}
    for folder in folders:  # build every reward (once) before scoring anything
        entries = reward_spec.get(folder.task, []) + reward_spec.get("*", [])
        if not entries:
            raise RewardError(
                f"{folder.path}: no reward for task {folder.task!r} in the reward spec (tasks there: "
                f"{', '.join(reward_spec)})"
            )
        per_task.setdefault(folder.task, {})
        for entry in entries:
            options = {k: v for k, v in entry.items() if k != "name"}
            key = json.dumps(entry, sort_keys=True)
            if key not in built:
                built[key] = build_reward(entry["name"], device=device, batch_size=batch_size, **options)
            per_task[folder.task][entry["name"]] = built[key]

    out_dir = Path(out_dir)
    results: dict[str, dict[str, dict]] = {}
    for folder in folders:
        log.info("scoring %s (%s, task %s, %d images)", folder.path, folder.label, folder.task, len(folder.records))
        scores = score_folder(folder, per_task[folder.task])
        metadata = [r.get("metadata") or {} for r in folder.records]
        row = results.setdefault(folder.label, {})
        for name, values in scores.items():
            row[column(folder.task, name)] = {
                "score": per_task[folder.task][name].aggregate(values, metadata),
                "n": len(values),
                "folder": str(folder.path),
            }
        safe = re.sub(r"[^\w.-]+", "_", folder.label)
        score_file = out_dir / "scores" / safe / f"{folder.task}.jsonl"
        score_file.parent.mkdir(parents=True, exist_ok=True)
        lines = [
            {
                "index": r["index"],
                "file": r["file"],
                "prompt": r["prompt"],
                **{name: values[i] for name, values in scores.items()},
            }
            for i, r in enumerate(folder.records)
        ]
        score_file.write_text("".join(json.dumps(line) + "\n" for line in lines))
    columns = sorted({c for row in results.values() for c in row})
    report = {"columns": columns, "results": results}
    (out_dir / "results.json").write_text(json.dumps(report, indent=2))
    (out_dir / "results.md").write_text(results_table(results, columns))
    return report


def results_table(results: dict[str, dict[str, dict]], columns: list[str]) -> str:
    """Markdown: a row per model, a column per task metric, and the average (only for rows that have them all)."""
    lines = ["| model | " + " | ".join(columns) + " | avg |", "|---" * (len(columns) + 2) + "|"]
    for label, row in results.items():
        values = [row[c]["score"] if c in row else None for c in columns]
        cells = ["" if v is None else f"{v:.4f}" for v in values]
        complete = [v for v in values if v is not None]
        avg = f"{sum(complete) / len(complete):.4f}" if len(complete) == len(values) and values else ""
        if any(v is not None and math.isnan(v) for v in values):
            avg = ""
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {avg} |")
    return "\n".join(lines) + "\n"
