"""The reward of a teach run and the images it scores.

Rewards come from opd_fast.evaluate.registry by name (pickscore, ocr, geneval, remote: an `opd-fast reward-server`
elsewhere, ..., and `demo`: the demo world's task rewards, cheap on a CPU, so a teacher can be trained and checked
end to end in CI; opd_fast.evaluate.demo_reward). Every reward scores PIL images (Reward.score); the final states of
a rollout become images through the task's `images` rule.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from opd_fast.config import ConfigError
from opd_fast.evaluate.base import Reward


def build_task_reward(spec: dict, device) -> Reward:
    """The reward a task's `reward` mapping names, with its options."""
    from opd_fast.evaluate.registry import build_reward  # (loads every registered reward module)

    options = {k: v for k, v in spec.items() if k != "name"}
    if spec["name"] != "remote":
        options.setdefault("device", str(device))
    return build_reward(spec["name"], **options)


def to_pil(pixels: torch.Tensor) -> list:
    """(B, 3, H, W) in [-1, 1] -> PIL images."""
    from PIL import Image

    array = ((pixels.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in array]


class ImageDecoder:
    """Final states -> PIL images: `state` (the state is the image in [-1, 1]) or `vae`: what the family's pipeline
    makes of its last latents (Family.decode_latents: the pipeline's own VAE, unpacking and normalisation), with the
    pipeline folder's VAE and nothing else of it loaded. The pipeline folder is the evaluation's: eval.pipeline,
    else model.path."""

    def __init__(self, kind: str, pipeline: str | None, device, family, resolution: int):
        self.kind, self.family, self.resolution, self.pipe = kind, family, resolution, None
        if kind != "vae":
            return
        folder = Path(pipeline) if pipeline is not None else None
        if folder is None or not (folder / "vae" / "config.json").is_file():
            raise ConfigError(
                "task.images: 'vae' needs a pipeline folder with vae/ in eval.pipeline or model.path (got "
                f"{pipeline}); 'state' if the state is the image itself"
            )
        index = json.loads((folder / "model_index.json").read_text())
        skipped = {name: None for name in index if not name.startswith("_") and name not in ("vae", "scheduler")}
        self.pipe = family.pipeline_class.from_pretrained(folder, local_files_only=True, **skipped)
        self.pipe.vae.to(device).eval()

    @torch.no_grad()
    def __call__(self, states: torch.Tensor) -> list:
        if self.pipe is None:
            return to_pil(states)
        return self.family.decode_latents(self.pipe, states, self.resolution)
