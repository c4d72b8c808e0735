"""The output folder of a run: one writer, checked before anything loads, claimed (run.json) once everything loaded.

A folder holds one run, written by one process. Rank 0 takes an exclusive lock on OUT/run.lock before anything else
and holds it for the whole run, --resume included: a second start into the folder (a job launched twice, a requeued
job starting while the old one still writes) is refused with the holder's host and pid. The lock is the operating
system's (flock), so it dies with its process: a killed run never leaves a stale lock behind.

Starting a run into a folder that holds another run, or other files, is refused; --resume continues a folder's run
when the config differs from it only in keys that change speed or length, never results. run.json names the run
(run_id), and every checkpoint carries that id and the config's hash (opd_fast.checkpoint), so a checkpoint of
another run is never resumed.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path

import torch

from opd_fast import distributed
from opd_fast.config import ConfigError, RunConfig, config_from_dict
from opd_fast.distributed import DistInfo

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
# What a folder may hold besides a run and still take a new one: the lock of a start that failed before claiming
# the folder, and the prompt cache it filled.
UNCLAIMED_OK = {LOCK_NAME, "embeddings"}
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
# Whole sections a resumed run may change: where its signals go and how it is evaluated, never what it trains.
RESUMABLE_SECTIONS = ("logging.", "eval.")


def resumable(key: str) -> bool:
    return key in RESUMABLE_CHANGES or key.startswith(RESUMABLE_SECTIONS)


# A writer's temporary folder (opd_fast.checkpoint: ".NAME.tmpPID" while written, ".NAME.oldPID" while replaced)
_TEMP = re.compile(r"^\.(?P<final>.+)\.(?P<kind>tmp|old)(?P<pid>\d+)$")
_OS_HINTS = {
    errno.EROFS: "it is on a read-only filesystem",
    errno.ELOOP: "a symbolic link loop",
    errno.EACCES: "permission denied",
    errno.ENOSPC: "no space left on the device",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.ENOENT: "a symbolic link to nothing",
}


class OutputDirError(RuntimeError):
    """The output folder holds another run or other files, is in use by another process, or cannot be written."""


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


def config_hash(cfg: RunConfig) -> str:
    """sha256 of every key that changes what a round computes (not RESUMABLE_CHANGES): a checkpoint written under
    another hash holds the state of another run's recipe."""
    kept = {k: v for k, v in flat_config(cfg.to_dict()).items() if not resumable(k)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def os_problem(path: Path, e: OSError) -> str:
    """One line for an OSError on `path`: what, where, and the cause in words."""
    why = _OS_HINTS.get(e.errno, e.strerror or type(e).__name__)
    return f"{path}: {why}" + (f" ({e.filename})" if e.filename and str(e.filename) != str(path) else "")


# A process may open the same folder twice (tests, notebooks): flock would refuse the second open file of the same
# process, so the lock is held once per process and counted.
_HELD: dict[Path, list] = {}  # resolved folder -> [file object, users]


class RunLock:
    """The exclusive lock on OUT/run.lock, taken by the one process that writes the folder (rank 0)."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.held = False

    def acquire(self) -> None:
        out = self.out_dir
        if out.exists() and not out.is_dir():
            raise OutputDirError(f"--out {out} is a file, not a folder; choose a folder")
        try:
            if out.is_symlink() and not out.exists():  # a loop, or a link to nothing: say which, not "File exists"
                os.stat(out)
            out.mkdir(parents=True, exist_ok=True)
            key = out.resolve()
            if key in _HELD:
                _HELD[key][1] += 1
                self.held = True
                return
            f = open(out / LOCK_NAME, "a+")  # noqa: SIM115  (held open for the whole run: the lock lives with it)
        except OSError as e:
            raise OutputDirError(f"--out {os_problem(out, e)}; cannot write the run there") from None
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "a process that has not written its name yet"
            f.close()
            raise OutputDirError(
                f"{out} is in use by another run ({holder}): one process writes a run folder. Wait for it to end "
                "(or stop it), or choose another --out"
            ) from None
        except OSError as e:
            f.close()
            raise OutputDirError(f"--out {out}: cannot lock {LOCK_NAME} ({os_problem(out, e)})") from None
        f.seek(0)
        f.truncate()
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        f.write(f"host {socket.gethostname()}, pid {os.getpid()}, since {since}\n")
        f.flush()
        _HELD[key] = [f, 1]
        self.held = True

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        key = self.out_dir.resolve()
        entry = _HELD.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _HELD[key]
            entry[0].close()  # closing the file releases the lock; the file stays (deleting it would race)


class RunFolder:
    """OUT for one run: locked (rank 0), checked, cleaned of dead writers' leftovers, then claimed."""

    def __init__(self, out_dir: str | Path, dist: DistInfo):
        self.out_dir = Path(out_dir)
        self.dist = dist
        self.lock = RunLock(self.out_dir)
        self.run_id: str | None = None

    def open(self, cfg: RunConfig, resume: bool, check: bool = True) -> RunFolder:
        """Lock (rank 0), check (every rank: a refusal is the same on all), agree: a rank that failed says why, the
        others that another rank failed, and none waits on a collective the failed one never joins."""
        error = None
        try:
            if self.dist.is_main:
                self.lock.acquire()
            if check:
                check_output_dir(cfg, self.out_dir, resume)
        except OutputDirError as e:
            error = e
        if self.dist.world_size > 1 and torch.distributed.is_initialized():
            failed = distributed.all_reduce(torch.tensor([int(error is not None)]), self.dist, "max").item()
            if failed and error is None:
                error = OutputDirError(f"another rank could not open {self.out_dir} (its error says why)")
        if error is not None:
            self.lock.release()
            raise error
        self.run_id = read_run_id(self.out_dir)
        if self.dist.is_main:
            clean_stale_temps(self.out_dir)
        return self

    def claim(self, cfg: RunConfig) -> None:
        """Mark the folder as this run's (rank 0), once everything loaded: a run that failed to start leaves no
        claim. A new run gets its run_id here; a resumed one keeps its own."""
        if self.run_id is None:
            self.run_id = uuid.uuid4().hex
        if not self.dist.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        run_file = self.out_dir / "run.json"
        tmp = run_file.with_name(f".run.json.tmp{os.getpid()}")
        tmp.write_text(json.dumps({"run_id": self.run_id, "config": cfg.to_dict()}, indent=2))
        tmp.replace(run_file)

    def release(self) -> None:
        self.lock.release()


def read_run_id(out_dir: Path) -> str | None:
    run_file = Path(out_dir) / "run.json"
    if not run_file.is_file():
        return None
    try:
        return json.loads(run_file.read_text()).get("run_id")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise OutputDirError(f"{run_file} is damaged (not a JSON object); it names the run in {out_dir}") from None


def check_output_dir(cfg: RunConfig, out_dir: Path, resume: bool) -> None:
    """Refuse a folder this run cannot write into, before anything loads (minutes at full size)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputDirError(f"--out {out_dir} is a file, not a folder; choose a folder")
    run_file = out_dir / "run.json"
    mine = flat_config(cfg.to_dict())
    if run_file.is_file():
        if not resume:
            raise OutputDirError(
                f"{out_dir} already holds a run ({run_file}); pass --resume to continue it or choose another --out"
            )
        try:
            recorded = json.loads(run_file.read_text())["config"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise OutputDirError(
                f"{run_file} is damaged (no config in it); it describes the run in {out_dir}"
            ) from None
        try:  # with the defaults of keys added since it was written, which are not changes
            recorded = config_from_dict(recorded).to_dict()
        except (ConfigError, TypeError):
            pass  # (a key since removed: compared as written, and named below)
        theirs = flat_config(recorded)
        changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        # the cosine schedule anneals over train.rounds: another length would change every rate still to come
        cosine = mine.get("optimizer.schedule") == "cosine"
        fatal = [k for k in changed if not resumable(k) or (k == "train.rounds" and cosine)]
        if fatal:
            raise OutputDirError(
                f"{out_dir} holds a run with another config; differing keys: "
                + ", ".join(f"{k} ({theirs.get(k)!r} -> {mine.get(k)!r})" for k in fatal)
                + ("; with optimizer.schedule cosine, train.rounds cannot change" if "train.rounds" in fatal else "")
            )
    elif out_dir.is_dir() and any(p.name not in UNCLAIMED_OK for p in out_dir.iterdir()):
        raise OutputDirError(
            f"{out_dir} is not empty and holds no run.json: refusing to write a run into it; choose an empty or new "
            "--out"
        )


def clean_stale_temps(out_dir: Path) -> list[Path]:
    """Remove the temporary folders and files of writers that are gone (the caller holds the lock, so every writer
    of this folder is); a checkpoint that was being replaced when its writer died (only `.NAME.oldPID` left) is put
    back instead. Returns what was removed."""
    removed = []
    for parent in (out_dir, out_dir / "checkpoints"):
        if not parent.is_dir():
            continue
        for p in sorted(parent.iterdir()):
            m = _TEMP.match(p.name)
            if m is None:
                continue
            final = parent / m["final"]
            if m["kind"] == "old" and not final.exists():
                os.rename(p, final)
                log.warning("restored %s from %s (its writer died while replacing it)", final, p.name)
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
            log.warning("removed %s, left by a writer that is gone (pid %s)", p, m["pid"])
    return removed
