"""Checkpoints: written atomically (a temp folder renamed into place), last K kept, resumable; and the final
export of the student LoRA in the diffusers layout that its family's pipeline `load_lora_weights` reads.

Everything is safetensors + JSON: the optimizer state is flattened into tensors, so resuming unpickles nothing. Each
checkpoint proves what it holds: manifest.json, written last, names the run (run_id), its recipe (config_hash), its
round, and every file with its size and sha256; a resume verifies all of it (verify_checkpoint) and takes the newest
checkpoint that holds up, saying which ones it skipped and why.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from opd_fast import faults
from opd_fast.config import first_line

if TYPE_CHECKING:
    from opd_fast.families.base import Family

log = logging.getLogger(__name__)
PREFIX = "step_"
MANIFEST, MANIFEST_FORMAT = "manifest.json", 1


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


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written (the disk is full...) or cannot be trusted on resume. Names it and why."""


def _why(e: BaseException) -> str:
    """An I/O error in words: the OS's reason ("No space left on device"), also from inside safetensors' message."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    m = re.search(r"I/O error: (.*?)(?: \(os error \d+\))?$", str(e))
    return m.group(1) if m else first_line(e)


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_files(paths: list[Path]) -> list[tuple[Path, str]]:
    """(path, sha256) of each file, the files hashed in parallel threads (hashlib lets go of the GIL on large
    blocks): a checkpoint's files (student, optimizer, EMA) cost about the largest one's time, not their sum."""
    with ThreadPoolExecutor(max_workers=max(1, min(len(paths), os.cpu_count() or 1, 8))) as pool:
        return list(zip(paths, pool.map(sha256_file, paths)))


def save_checkpoint(
    out_dir: Path,
    step: int,
    tensors: dict[str, dict[str, torch.Tensor]],
    meta: dict,
    keep_last: int,
    identity: dict | None = None,
) -> Path:
    """Write checkpoints/step_XXXXXXXX/{name}.safetensors for each entry of `tensors`, state.json, and last
    manifest.json (identity: run_id and config_hash; the round; every file with its size and sha256), atomically
    and durably (synced to the disk before the rename, the rename synced before older checkpoints go: a crash of
    the machine leaves the previous checkpoint or this whole one); then delete all but the newest `keep_last` (and
    the newest one before this, below).

    A write that fails (a full disk) removes its temporary folder and raises CheckpointError naming the file; the
    checkpoints already there are untouched."""
    final = checkpoint_path(out_dir, step)
    root = final.parent
    tmp = _tmp_name(final)
    writing = tmp
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name, group in tensors.items():
            writing = tmp / f"{name}.safetensors"
            save_file({k: v.detach().cpu().contiguous() for k, v in group.items()}, str(writing))
        writing = tmp / "state.json"
        writing.write_text(json.dumps({"step": step, **meta}, indent=2))
        files = {f.name: {"bytes": f.stat().st_size, "sha256": h} for f, h in sha256_files(sorted(tmp.iterdir()))}
        writing = tmp / MANIFEST
        manifest = {"format": MANIFEST_FORMAT, **(identity or {}), "round": step, "files": files}
        writing.write_text(json.dumps(manifest, indent=2))
        for f in [*tmp.iterdir(), tmp]:
            _fsync(f)
    except (OSError, SafetensorError) as e:  # safetensors reports a full disk as a SafetensorError
        shutil.rmtree(tmp, ignore_errors=True)
        last = latest_checkpoint(out_dir)
        raise CheckpointError(
            f"could not write the checkpoint of round {step}: {_why(e)} ({writing}); nothing of it was kept"
            + (f", and {last} is intact" if last else "")
            + ". Free space (or fix the folder) and restart with --resume"
        ) from None
    faults.point("checkpoint.written")
    replaced = None
    if final.exists():  # a re-save of the same step (e.g. the final save after a periodic one): swap, then delete
        replaced = final.with_name(f".{final.name}.old{os.getpid()}")
        os.rename(final, replaced)
    os.rename(tmp, final)
    _fsync(root)
    faults.point("checkpoint.renamed")
    if replaced is not None:
        shutil.rmtree(replaced)
    # The newest checkpoint before this one is kept too (it matters with keep_last 1): this round's finite loss was
    # computed at its weights, so it is the newest state known to be good while this one is not yet.
    found = list_checkpoints(out_dir)
    previous = [p for p in found if checkpoint_step(p) < step][-1:]
    for old in found[:-keep_last]:
        if old not in previous:
            shutil.rmtree(old)
            faults.point("checkpoint.pruning")
    return final


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Every checkpoint folder, oldest first (complete or not: verify_checkpoint says whether it can be trusted)."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and re.fullmatch(PREFIX + r"\d{8}", p.name)]
    return sorted(found, key=checkpoint_step)


def checkpoint_path(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"{PREFIX}{step:08d}"


def checkpoint_step(path: Path) -> int:
    return int(path.name[len(PREFIX) :])


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def verify_checkpoint(path: Path, identity: dict, required: tuple[str, ...], checksums: bool = True) -> dict:
    """The checkpoint's manifest, once the checkpoint proved it is this run's state at the round of its name:
    written by this run (run_id), under this recipe (config_hash), every file listed there with its size (and
    sha256 unless checksums=False), and the `required` tensor files ("student", "optimizer", "ema") among them.
    Raises CheckpointError saying what does not hold."""
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise CheckpointError(
            f"{path.name}: no {MANIFEST} (its writer died before finishing it, or an opd-fast "
            "before checkpoint manifests wrote it)"
        )
    try:
        manifest = json.loads(manifest_file.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{path.name}: {MANIFEST} is damaged") from None
    if manifest.get("run_id") != identity.get("run_id"):
        raise CheckpointError(
            f"{path.name}: written by another run (run_id {manifest.get('run_id')}, this run is "
            f"{identity.get('run_id')})"
        )
    if manifest.get("config_hash") != identity.get("config_hash"):
        raise CheckpointError(f"{path.name}: written under another config (its config_hash differs)")
    if manifest.get("round") != checkpoint_step(path):
        raise CheckpointError(f"{path.name}: holds round {manifest.get('round')}, not the round of its name")
    for name in ["state.json", *(f"{r}.safetensors" for r in required)]:
        if name not in files:
            raise CheckpointError(f"{path.name}: holds no {name}")
    for name, entry in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path.name}: {name} is missing")
        if f.stat().st_size != entry["bytes"]:
            raise CheckpointError(
                f"{path.name}: {name} has {f.stat().st_size} bytes, its manifest says "
                f"{entry['bytes']} (truncated or overwritten)"
            )
    if checksums:
        for f, digest in sha256_files([path / name for name in files]):
            if digest != files[f.name]["sha256"]:
                raise CheckpointError(
                    f"{path.name}: {f.name} fails its sha256 checksum (its bytes changed after writing)"
                )
    return manifest


def newest_verified(
    out_dir: Path, identity: dict, required: tuple[str, ...], checksums: bool = True, quiet: bool = False
) -> Path | None:
    """The newest checkpoint that verifies; each newer one that does not is skipped with a warning naming it and
    why. None when there is none at all; CheckpointError when there are checkpoints and none verifies (resuming
    from round 0 would silently throw a run away)."""
    found = list_checkpoints(out_dir)
    reasons = []
    for path in reversed(found):
        try:
            verify_checkpoint(path, identity, required, checksums)
        except CheckpointError as e:
            if not quiet:
                log.warning("resume: skipping checkpoint %s", e)
            reasons.append(str(e))
            continue
        return path
    if found:
        raise CheckpointError(
            f"no checkpoint in {Path(out_dir) / 'checkpoints'} can be resumed: "
            + "; ".join(reasons)
            + ". Move them away to start the run over"
        )
    return None


def load_checkpoint(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """A verified checkpoint's tensors and state.json; a file that does not parse is a CheckpointError naming it."""
    reading = path / "state.json"
    try:
        meta = json.loads(reading.read_text())
        tensors = {}
        for f in sorted(path.glob("*.safetensors")):
            reading = f
            tensors[f.stem] = load_file(str(f))
    except (OSError, ValueError, SafetensorError) as e:  # (JSONDecodeError is a ValueError)
        raise CheckpointError(f"{reading}: cannot be read ({first_line(e)})") from None
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
    try:
        family.save_lora(tmp, state, peft_config.to_dict())
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"could not export the LoRA to {out}: {_why(e)}; the checkpoints are intact: free space and run "
            "again with --resume (it exports again)"
        ) from None
    faults.point("export.written")
    if out.exists():
        shutil.rmtree(out)
    os.rename(tmp, out)
    return out / "pytorch_lora_weights.safetensors"
