"""Reading tensors without running code: safetensors, or torch.load(weights_only=True) where a format is pickle."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from safetensors.torch import load_file

from opd_fast.config import first_line

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


class UnsafeFileError(ValueError):
    """A pickle file that holds more than tensors and plain containers: refused, none of its code runs."""


def load_tensors(path: str | Path, what: str = "file") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: file not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    if path.suffix in PICKLE_SUFFIXES:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            first = first_line(e)
            raise UnsafeFileError(
                f"{what}: refusing to load {path}: it is a pickle that carries more than tensors ({first}); "
                "nothing in it was run. Convert it to safetensors from a trusted environment."
            ) from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{what}: {path} does not hold a flat name -> tensor mapping")
        return state
    raise ValueError(f"{what}: unsupported weight file {path} (expected .safetensors or {', '.join(PICKLE_SUFFIXES)})")
