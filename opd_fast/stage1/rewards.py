"""The reward of a teach run and the images it scores.

Rewards come from opd_fast.evaluate.registry by name (pickscore, ocr, geneval, remote: an `opd-fast reward-server`
elsewhere, ...), plus `demo`, registered here: the demo world's task rewards (opd_fast.demo.world: composition,
glyph, aesthetic), cheap on a CPU, so a teacher can be trained and checked end to end in CI. Every reward scores
PIL images (Reward.score); the final states of a rollout become images through the task's `images` rule.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from opd_fast.config import ConfigError
from opd_fast.evaluate.base import Reward, RewardError, register


@register("demo")
class DemoReward(Reward):
    """The demo world's reward of `task` (composition | glyph | aesthetic), in [0, 1]; a prompt must be one of the
    task's (opd_fast.demo.world.task_prompts), whose attributes the reward checks."""

    def __init__(self, task: str | None = None, device: str | None = None, batch_size: int = 16):
        super().__init__("cpu", batch_size)
        from opd_fast.demo import world

        if task not in world.TASKS:
            raise RewardError(f"reward 'demo': option task must be one of {list(world.TASKS)}, got {task!r}")
        self.world, self.task = world, task
        self.rows = {row["prompt"]: row for row in world.task_prompts(task)}

    def score(self, images, prompts, metadata):
        scores = []
        for image, prompt in zip(images, prompts):
            row = self.rows.get(prompt)
            if row is None:
                raise RewardError(f"reward 'demo' ({self.task}): {prompt!r} is not a prompt of the task")
            pixels = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, np.float32)
            scores.append(self.world.reward(self.task, pixels / 255.0 if pixels.max() > 1 else pixels, row))
        return scores


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
    """Final states -> PIL images: `state` (the state is the image in [-1, 1]) or `vae` (the VAE of the pipeline at
    model.path, with its scaling and shift factors; 4-D latents: SD3's layout)."""

    def __init__(self, kind: str, model_path: str | None, device):
        self.kind, self.vae = kind, None
        if kind == "vae":
            if model_path is None or not (Path(model_path) / "vae" / "config.json").is_file():
                raise ConfigError(
                    f"task.images: 'vae' needs model.path to be a pipeline folder with vae/ (got {model_path}); "
                    "'state' if the state is the image itself"
                )
            from diffusers import AutoencoderKL

            self.vae = AutoencoderKL.from_pretrained(Path(model_path) / "vae", use_safetensors=True).to(device).eval()

    @torch.no_grad()
    def __call__(self, states: torch.Tensor) -> list:
        if self.vae is None:
            return to_pil(states)
        if states.dim() != 4:
            raise ConfigError(f"task.images: 'vae' decodes (B, C, H, W) latents, got {tuple(states.shape)}")
        config = self.vae.config
        latents = states.to(self.vae.dtype) / config.scaling_factor + (config.shift_factor or 0.0)
        return to_pil(self.vae.decode(latents, return_dict=False)[0])
