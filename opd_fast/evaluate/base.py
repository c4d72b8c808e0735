"""What every reward is: the `Reward` base class, `ClipReward` (a transformers CLIP both the CLIP-based rewards and
GenEval's color classifier use), `RewardError`, and `register`, the decorator a reward module puts on each class.

The reward modules (rewards.py, geneval.py) import this module and never each other; opd_fast.evaluate.registry
loads them all and builds rewards by name.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

REWARDS: dict[str, type[Reward]] = {}  # name -> class, filled by @register; complete once registry.py has loaded


class RewardError(ValueError):
    """A reward that cannot be built: unknown name or option, missing file or package. Names the reward."""


def register(name: str):
    """Class decorator: the reward answers to `name` in reward specs and `opd-fast eval --list`."""

    def add(cls):
        cls.name = name
        REWARDS[name] = cls
        return cls

    return add


class Reward:
    """Base class. Subclasses take their options as keyword arguments (paths, thresholds) plus device/batch_size."""

    name = ""
    requires: tuple[str, ...] = ()  # importable modules
    install_hint = ""

    def __init__(self, device: str | None = None, batch_size: int = 16):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size = batch_size

    @classmethod
    def unavailable(cls) -> str | None:
        """Why this reward cannot run here (a missing package, with the install hint), or None."""
        missing = [m for m in cls.requires if importlib.util.find_spec(m) is None]
        if missing:
            return f"reward {cls.name!r} needs the Python package(s) {missing} ({cls.install_hint})"
        return None

    def score(self, images: list, prompts: list[str], metadata: list[dict]) -> list[float]:
        raise NotImplementedError

    def aggregate(self, scores: list[float], metadata: list[dict]) -> float:
        """The number a results table reports for a whole prompt set."""
        return sum(scores) / len(scores)

    def _local(self, option: str, path, kind: str = "any") -> Path:
        if path is None:
            raise RewardError(f"reward {self.name!r}: option {option!r} is required (a local path)")
        path = Path(path)
        ok = path.is_dir() if kind == "dir" else path.is_file() if kind == "file" else path.exists()
        if not ok:
            raise RewardError(f"reward {self.name!r}: {option} {path} not found (models load from local files only)")
        return path

    def _batches(self, n: int):
        return (range(i, min(i + self.batch_size, n)) for i in range(0, n, self.batch_size))


# ---------------------------------------------------------------------------------------------------------------
# CLIP-based rewards (transformers)


def _features(out) -> torch.Tensor:
    """get_*_features returns the tensor in transformers 4 and an output with pooler_output in transformers 5."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipReward(Reward):
    """A transformers CLIPModel + its processor from local folders; unit-norm image and text embeddings."""

    def __init__(
        self, model: str | None = None, processor: str | None = None, device: str | None = None, batch_size: int = 16
    ):
        super().__init__(device, batch_size)
        from transformers import AutoProcessor, CLIPModel

        model_dir = self._local("model", model, "dir")
        processor_dir = self._local("processor", processor, "dir") if processor else model_dir
        self.model = CLIPModel.from_pretrained(model_dir, local_files_only=True).eval().to(self.device)
        self.processor = AutoProcessor.from_pretrained(processor_dir, local_files_only=True)

    @torch.no_grad()
    def image_embeds(self, images: list) -> torch.Tensor:
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        e = _features(self.model.get_image_features(pixel_values=pixels)).float()
        return e / e.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        max_length = self.model.config.text_config.max_position_embeddings
        tokens = self.processor(text=prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        e = _features(
            self.model.get_text_features(
                input_ids=tokens["input_ids"].to(self.device), attention_mask=tokens["attention_mask"].to(self.device)
            )
        ).float()
        return e / e.norm(dim=-1, keepdim=True)

    def cosines(self, images: list, prompts: list[str]) -> torch.Tensor:
        out = []
        for idx in self._batches(len(images)):
            img = self.image_embeds([images[i] for i in idx])
            txt = self.text_embeds([prompts[i] for i in idx])
            out.append((img * txt).sum(-1).cpu())
        return torch.cat(out)
