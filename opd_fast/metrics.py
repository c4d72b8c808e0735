"""Per-round metrics: one JSON object per optimizer step in OUT/metrics.jsonl, TensorBoard scalars alongside."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


class MetricsWriter:
    def __init__(self, out_dir: Path, tensorboard: bool, resume_step: int = 0):
        self.path = Path(out_dir) / "metrics.jsonl"
        self._truncate_after(resume_step)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"), purge_step=resume_step + 1)

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
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
