"""Per-round metrics: one JSON object per optimizer step in OUT/metrics.jsonl, the source of truth, mirrored to the
run's experiment trackers (opd_fast.trackers: TensorBoard, W&B); images (an evaluation's grids) go to the trackers
alone."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from opd_fast.trackers import TensorBoardTracker, Tracker, close_all, image_grid, open_trackers

if TYPE_CHECKING:
    from PIL.Image import Image

    from opd_fast.config import RunConfig

log = logging.getLogger(__name__)


class MetricsWriter:
    """Rank 0's writer of the run's records. tensorboard=True adds a TensorBoard tracker in OUT/tensorboard (the
    switch from before trackers); MetricsWriter.for_run opens the trackers the run config names."""

    def __init__(
        self, out_dir: Path, tensorboard: bool = False, resume_step: int = 0, *, trackers: Sequence[Tracker] = ()
    ):
        self.path = Path(out_dir) / "metrics.jsonl"
        self._truncate_after(resume_step)
        self.trackers = list(trackers)
        if tensorboard:
            self.trackers.append(TensorBoardTracker(Path(out_dir) / "tensorboard", resume_step))

    @classmethod
    def for_run(cls, cfg: RunConfig, out_dir: Path, resume_step: int = 0) -> MetricsWriter:
        """The writer of the run `cfg` into out_dir, with the trackers of cfg.logging (given the run's config)."""
        trackers = open_trackers(cfg, out_dir, resume_step)
        try:
            return cls(out_dir, resume_step=resume_step, trackers=trackers)
        except BaseException:
            close_all(trackers)
            raise

    def _truncate_after(self, step: int) -> None:
        """Drop records a killed run wrote after its last checkpoint, so a resumed run's log has each step once;
        and a last line the kill cut short. Rewritten atomically: a kill now leaves the old log or the new one."""
        if not self.path.is_file():
            return
        lines = self.path.read_text().splitlines()
        kept = []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                if record["step"] <= step:
                    kept.append(line)
            elif number < len(lines):  # not ours to judge: kept as it is
                log.warning("%s:%d is not a metrics record; kept as it is", self.path, number)
                kept.append(line)
            # else: the last line, torn by the kill (it was written after the checkpoint)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        """One round's record: a line of metrics.jsonl, and its numbers (not step, flags or names) to the trackers."""
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {
            key: value
            for key, value in record.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        for tracker in self.trackers:
            tracker.log_scalars(record["step"], scalars)

    def log_images(
        self, step: int, images: dict[str, Image | list[Image]], captions: dict[str, str] | None = None
    ) -> None:
        """Images to the trackers, by name (e.g. "samples/ocr"): one image each, or a list shown as one row."""
        images = {name: image_grid(v, len(v)) if isinstance(v, list) else v for name, v in images.items()}
        for tracker in self.trackers:
            tracker.log_images(step, images, captions or {})

    def log_image_grid(
        self, step: int, name: str, images: list[Image], columns: int, caption: str | None = None
    ) -> Image:
        """The images as one grid of `columns` per row (an evaluation's prompts x seeds: one row per prompt, one
        column per seed), logged under `name`; returns the grid (to save it too)."""
        grid = image_grid(images, columns)
        self.log_images(step, {name: grid}, {name: caption} if caption else None)
        return grid

    def close(self) -> None:
        close_all(self.trackers)
