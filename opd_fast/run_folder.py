"""The output folder of a run: checked before anything loads, claimed (run.json) once everything has loaded.

A folder holds one run. Starting a run into a folder that holds another run, or other files, is refused; --resume
continues a folder's run when the config differs from it only in keys that change speed or length, never results.
"""

from __future__ import annotations

import json
from pathlib import Path

from opd_fast.config import RunConfig
from opd_fast.distributed import DistInfo

# Keys a resumed run may change: they change how fast or how long it runs, not what a round computes.
RESUMABLE_CHANGES = {
    "train.rounds",
    "checkpoint.every",
    "checkpoint.keep_last",
    "logging.progress",
    "logging.tensorboard",
    "loss.backend",
    "engine.kind",
    "engine.zero_stage",
    "engine.offload",
    "engine.bf16",
    "engine.timeout_s",
    "engine.persistence_threshold",
    "teacher_runtime.stream",
    "teacher_runtime.mode",
    "teacher_runtime.cuda_graphs",
    "prompts.placement",
}


class OutputDirError(RuntimeError):
    """The output folder holds another run or other files."""


def flat_config(cfg: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: the dotted keys that --set and the error messages use."""
    out = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, name + "."))
        else:
            out[name] = value
    return out


def check_output_dir(cfg: RunConfig, out_dir: Path, resume: bool) -> None:
    """Refuse a folder this run cannot write into, before anything loads (minutes at full size)."""
    run_file = out_dir / "run.json"
    mine = flat_config(cfg.to_dict())
    if run_file.is_file():
        if not resume:
            raise OutputDirError(
                f"{out_dir} already holds a run ({run_file}); pass --resume to continue it or choose another --out"
            )
        theirs = flat_config(json.loads(run_file.read_text())["config"])
        changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        # the cosine schedule anneals over train.rounds: another length would change every rate still to come
        cosine = mine.get("optimizer.schedule") == "cosine"
        fatal = [k for k in changed if k not in RESUMABLE_CHANGES or (k == "train.rounds" and cosine)]
        if fatal:
            raise OutputDirError(
                f"{out_dir} holds a run with another config; differing keys: "
                + ", ".join(f"{k} ({theirs.get(k)!r} -> {mine.get(k)!r})" for k in fatal)
                + ("; with optimizer.schedule cosine, train.rounds cannot change" if "train.rounds" in fatal else "")
            )
    elif out_dir.is_dir() and any(p.name != "embeddings" for p in out_dir.iterdir()):
        # (OUT/embeddings alone is the prompt cache of a start of ours that failed before writing run.json)
        raise OutputDirError(
            f"{out_dir} is not empty and holds no run.json: refusing to write a run into it; choose an empty or new "
            "--out"
        )


def claim_output_dir(cfg: RunConfig, out_dir: Path, dist: DistInfo) -> None:
    """Mark the folder as this run's (rank 0), once everything loaded: a run that failed to start leaves no claim."""
    if not dist.is_main:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    run_file = out_dir / "run.json"
    tmp = run_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"config": cfg.to_dict()}, indent=2))
    tmp.replace(run_file)
