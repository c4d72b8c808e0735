"""Experiment trackers: where a run's scalars, images and config show up besides OUT/metrics.jsonl.

metrics.jsonl stays the source of truth (opd_fast.metrics.MetricsWriter writes it); the trackers mirror what it
records, for people who read runs in TensorBoard or W&B. The run config names them:

    logging:
      trackers: [tensorboard, wandb]   # null: [tensorboard], or [] with the older `tensorboard: false`
      run_name: null                   # every tracker's run name; null: the output folder's name
      wandb: {project: null, entity: null, mode: null, tags: []}

Each tracker is a Tracker subclass registered by name (@register); a new one is a class here. Only rank 0 opens
them. What lands where: TensorBoard in OUT/tensorboard (scalars, images, the config and run as text at the run's
first step), W&B in OUT/wandb (its run holds the config, scalars and images; offline runs upload with `wandb sync`).
Every tracker gets the run's name, its config (cfg.to_dict()), the git revision of the working directory (None
outside a repository) and the opd-fast version.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import secrets
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from opd_fast import __version__
from opd_fast.config import ConfigError

if TYPE_CHECKING:
    from PIL.Image import Image

    from opd_fast.config import LoggingConfig, RunConfig

log = logging.getLogger(__name__)

TRACKERS: dict[str, type[Tracker]] = {}  # name -> class, filled by @register below


def register(name: str):
    """Class decorator: the tracker answers to `name` in logging.trackers."""

    def add(cls):
        cls.name = name
        TRACKERS[name] = cls
        return cls

    return add


@dataclass(frozen=True)
class RunInfo:
    """What identifies a run in every tracker, besides its config."""

    name: str
    git_revision: str | None  # HEAD of the working directory's repository; None outside one
    version: str  # opd-fast's


class Tracker:
    """One experiment tracker. open() builds it from the run config; the methods mirror what MetricsWriter records.
    Scalars and images of a step arrive in step order (a resumed run starts again after its checkpoint's step)."""

    name = ""
    requires: tuple[str, ...] = ()  # importable modules
    install_hint = ""

    @classmethod
    def unavailable(cls) -> str | None:
        """Why this tracker cannot run here (a missing package, with the install hint), or None."""
        missing = [m for m in cls.requires if importlib.util.find_spec(m) is None]
        if missing:
            return f"logging.trackers: {cls.name} needs the Python package(s) {', '.join(missing)} ({cls.install_hint})"
        return None

    @classmethod
    def open(cls, out_dir: Path, resume_step: int, settings: LoggingConfig, info: RunInfo) -> Tracker:
        raise NotImplementedError

    def log_config(self, config: dict, info: RunInfo) -> None:
        raise NotImplementedError

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        raise NotImplementedError

    def log_images(self, step: int, images: dict[str, Image], captions: dict[str, str]) -> None:
        """One image per name (a grid: image_grid); captions by name, where there is one."""
        raise NotImplementedError

    def close(self) -> None:
        pass


@register("tensorboard")
class TensorBoardTracker(Tracker):
    requires = ("tensorboard",)
    install_hint = "pip install tensorboard"

    def __init__(self, log_dir: Path, resume_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.resume_step = resume_step
        # purge_step: TensorBoard hides what a killed run logged after the checkpoint this run resumes from, as
        # metrics.jsonl drops those records
        self.writer = SummaryWriter(str(log_dir), purge_step=resume_step + 1)

    @classmethod
    def open(cls, out_dir, resume_step, settings, info):
        return cls(Path(out_dir) / "tensorboard", resume_step)

    def log_config(self, config, info):
        # at the step the run (re)starts from: a resumed run shows the config it went on with, beside the first one
        run = "\n".join(f"- {key}: {value}" for key, value in asdict(info).items())
        self.writer.add_text("run", run, self.resume_step)
        # indented: TensorBoard renders text as markdown, and an indented block keeps the JSON's layout
        as_json = json.dumps(config, indent=2)
        self.writer.add_text("config", "\n".join("    " + line for line in as_json.splitlines()), self.resume_step)

    def log_scalars(self, step, scalars):
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def log_images(self, step, images, captions):
        import numpy as np

        for name, image in images.items():
            self.writer.add_image(name, np.asarray(image.convert("RGB")), step, dataformats="HWC")
            if captions.get(name):  # TensorBoard images have no caption: it goes beside them as text
                self.writer.add_text(f"{name}/caption", captions[name], step)

    def close(self):
        self.writer.close()


@register("wandb")
class WandbTracker(Tracker):
    """A W&B run whose files live in OUT/wandb. Its id is kept in OUT/wandb/run-id, so --resume continues the same
    W&B run. W&B drops a step it has already seen: after a resume, the steps a killed run logged past its checkpoint
    keep the killed run's values there (metrics.jsonl and TensorBoard hold the resumed run's)."""

    requires = ("wandb",)
    install_hint = "pip install 'opd-fast[wandb]'"

    def __init__(self, run):
        self.run = run

    @classmethod
    def open(cls, out_dir, resume_step, settings, info):
        import wandb

        folder = Path(out_dir) / "wandb"
        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / "run-id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        options = settings.wandb
        try:
            run = wandb.init(
                # null: W&B's own environment variables, then this project's name (W&B's default is "uncategorized")
                project=options.project or os.environ.get("WANDB_PROJECT") or "opd-fast",
                entity=options.entity,  # null: WANDB_ENTITY, else the logged-in user's default entity
                mode=options.mode,  # null: WANDB_MODE, else online
                name=info.name,
                tags=list(options.tags) or None,
                dir=str(out_dir),
                id=run_id,
                resume="allow",
            )
        except wandb.errors.Error as e:
            raise ConfigError(
                f"logging.trackers: wandb could not start its run: {e} (log in with `wandb login`, or set "
                "logging.wandb.mode: offline and upload later with `wandb sync`)"
            ) from e
        return cls(run)

    def log_config(self, config, info):
        # opd_fast: a key no run config section has; allow_val_change: a resumed run may change its resumable keys
        self.run.config.update({**config, "opd_fast": asdict(info)}, allow_val_change=True)

    def log_scalars(self, step, scalars):
        self.run.log(scalars, step=step)

    def log_images(self, step, images, captions):
        import wandb

        self.run.log(
            {name: wandb.Image(image, caption=captions.get(name)) for name, image in images.items()}, step=step
        )

    def close(self):
        self.run.finish()


def git_revision(cwd: str | Path | None = None) -> str | None:
    """HEAD of the repository holding cwd (default: the working directory), or None: not a repository, no git, or git
    too slow (a hung network filesystem). A run never fails over it."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    revision = done.stdout.strip()
    return revision if done.returncode == 0 and revision else None


def check_trackers(settings: LoggingConfig) -> list[str]:
    """The run's tracker names, each known and installed here; ConfigError (with the install hint) otherwise. Cheap
    (no tracker package is imported): call it before the models load."""
    names = settings.active_trackers()
    for name in names:
        reason = TRACKERS[name].unavailable()
        if reason:
            raise ConfigError(reason)
    return names


def open_trackers(cfg: RunConfig, out_dir: str | Path, resume_step: int = 0) -> list[Tracker]:
    """The run's trackers, opened and given its config (rank 0 only). A tracker that fails to open closes the ones
    opened before it."""
    names = check_trackers(cfg.logging)
    if not names:
        return []
    out_dir = Path(out_dir)
    info = RunInfo(cfg.logging.run_name or out_dir.resolve().name, git_revision(), __version__)
    config = cfg.to_dict()
    opened: list[Tracker] = []
    try:
        for name in names:
            opened.append(TRACKERS[name].open(out_dir, resume_step, cfg.logging, info))
            opened[-1].log_config(config, info)
    except BaseException:
        with contextlib.suppress(Exception):  # (logged there) the failure to open is the one to raise
            close_all(opened)
        raise
    return opened


def close_all(trackers: list[Tracker]) -> None:
    """Close every tracker, even when one fails to; the first failure is raised after."""
    failure = None
    for tracker in trackers:
        try:
            tracker.close()
        except Exception as e:  # noqa: BLE001 - whatever one tracker raises, the others must still close
            log.warning("closing the %s tracker failed: %s", tracker.name, e)
            failure = failure or e
    if failure is not None:
        raise failure


def image_grid(images: list[Image], columns: int, background: str = "white") -> Image:
    """The images in rows of `columns` (row-major: images[r * columns + c] at row r, column c), each in a cell of the
    largest image's size; e.g. an evaluation's prompts x seeds, one row per prompt."""
    from PIL import Image as PILImage

    if not images:
        raise ValueError("image_grid: no images")
    if columns < 1:
        raise ValueError(f"image_grid: columns must be >= 1, got {columns}")
    rows = math.ceil(len(images) / columns)
    width = max(image.size[0] for image in images)
    height = max(image.size[1] for image in images)
    grid = PILImage.new("RGB", (columns * width, rows * height), background)
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((i % columns) * width, (i // columns) * height))
    return grid
