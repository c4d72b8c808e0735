"""Checkpoints: written atomically (a temp folder renamed into place), last K kept, resumable; and the final
export of the student LoRA in the diffusers layout that its family's pipeline `load_lora_weights` reads.

Everything is safetensors + JSON: the optimizer state is flattened into tensors, so resuming unpickles nothing.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

if TYPE_CHECKING:
    from opd_fast.families.base import Family

PREFIX = "step_"


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def flatten_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """torch optimizer state_dict -> (tensors, JSON-able rest)."""
    tensors, scalars = {}, {}
    for idx, per_param in state["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(rest["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's entries to the disk (a rename is durable once its folder is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    out_dir: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], meta: dict, keep_last: int
) -> Path:
    """Write checkpoints/step_XXXXXXXX/{name}.safetensors for each entry of `tensors` plus state.json, atomically
    and durably (synced to the disk before the rename, the rename synced before older checkpoints go: a crash of
    the machine leaves the previous checkpoint or this whole one); then delete all but the newest `keep_last`."""
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = _tmp_name(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, group in tensors.items():
        save_file({k: v.detach().cpu().contiguous() for k, v in group.items()}, str(tmp / f"{name}.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, **meta}, indent=2))
    for f in [*tmp.iterdir(), tmp]:
        _fsync(f)
    replaced = None
    if final.exists():  # a re-save of the same step (e.g. the final save after a periodic one): swap, then delete
        replaced = final.with_name(f".{final.name}.old{os.getpid()}")
        os.rename(final, replaced)
    os.rename(tmp, final)
    _fsync(root)
    if replaced is not None:
        shutil.rmtree(replaced)
    for old in list_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(old)
    return final


def list_checkpoints(out_dir: Path) -> list[Path]:
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").is_file()]
    return sorted(done, key=checkpoint_step)


def checkpoint_step(path: Path) -> int:
    return int(path.name[len(PREFIX) :])


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def load_checkpoint(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    meta = json.loads((path / "state.json").read_text())
    tensors = {f.stem: load_file(str(f)) for f in path.glob("*.safetensors")}
    return tensors, meta


def export_diffusers_lora(
    model: torch.nn.Module, peft_config, family: Family, out: Path, lora_state: dict[str, torch.Tensor] | None = None
) -> Path:
    """Write OUT/pytorch_lora_weights.safetensors in the diffusers layout of `family`'s pipeline (`transformer.`
    prefix) with the adapter metadata, so the loader keeps alpha != r (without it an r=32/alpha=64 LoRA loads at
    half strength). Atomic: written into a temporary folder that replaces OUT."""
    from peft.utils import get_peft_model_state_dict

    state = lora_state if lora_state is not None else get_peft_model_state_dict(model)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    out = Path(out)
    tmp = _tmp_name(out)
    shutil.rmtree(tmp, ignore_errors=True)
    family.save_lora(tmp, state, peft_config.to_dict())
    if out.exists():
        shutil.rmtree(out)
    os.rename(tmp, out)
    return out / "pytorch_lora_weights.safetensors"
