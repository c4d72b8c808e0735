"""The reward of a teach run and the images it scores.

Rewards come from opd_fast.evaluate.registry by name (pickscore, ocr, geneval, remote: an `opd-fast reward-server`
elsewhere, ..., and `demo`: the demo world's task rewards, cheap on a CPU, so a teacher can be trained and checked
end to end in CI; opd_fast.evaluate.demo_reward). Every reward scores PIL images (Reward.score); the final states of
a rollout become images through the task's `images` rule.
"""

from __future__ import annotations

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
