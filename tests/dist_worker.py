"""One rank of the distributed tests: runs a list of training jobs in this process, one after the other, so the
imports and the process group are paid for once. Started by tests/dist_launch.py:

    python tests/dist_worker.py JOBS.json     # [{"out": DIR, "overrides": [...], "resume": false, "discard": [],
                                              #   "until": null}]

Before and after each job it writes what the tests inspect to OUT/probe_rank{R}.json: this rank's prompt indices,
how the student's tensors are partitioned, whether any teacher parameter was touched by ZeRO, the optimizer steps.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch

from opd_fast import distributed
from opd_fast.config import load_config
from opd_fast.engine import DeepSpeedEngine
from opd_fast.trainer import Trainer

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def partition(trainer: Trainer) -> dict:
    """Per trainable parameter: full size, this rank's share of the master weights, what the module holds now."""
    engine = trainer.engine
    out = {}
    for name, p in trainer.student.named_parameters():
        if p.requires_grad:
            out[name] = {
                "numel": int(getattr(p, "ds_numel", p.numel())),
                "held": p.data.numel(),
                "shard": p.ds_tensor.numel() if hasattr(p, "ds_tensor") else None,
                "persist": getattr(p, "ds_persist", None),
            }
    if isinstance(engine, DeepSpeedEngine):
        flat = sum(t.numel() for t in engine.master_partitions())
    else:
        flat = sum(t.numel() for g in engine.optimizer.param_groups for t in g["params"])
    return {"params": out, "optimizer_elements": flat}


def probe(trainer: Trainer, rounds: int) -> dict:
    engine = trainer.engine
    return {
        "rank": engine.rank,
        "world_size": engine.world_size,
        "start_round": trainer.round,
        "indices": {
            f"{r}/{t}": trainer.batch_indices(r, t).tolist()
            for r in range(rounds)
            for t in range(len(trainer.cfg.tasks))
        },
        "partition": partition(trainer),
        "teacher_params_under_zero": sum(
            hasattr(p, "ds_id") for t in trainer.teachers.values() for p in t.model.parameters()
        ),
        "stage": engine.stage if isinstance(engine, DeepSpeedEngine) else None,
    }


def discard_rounds(trainer: Trainer, rounds: list[int]) -> None:
    """Make the loss of these rounds NaN (as every rank sees it), so the trainer drops their gradients."""
    average = trainer.engine.average

    def poisoned(t: torch.Tensor) -> torch.Tensor:
        t = average(t)
        return torch.full_like(t, float("nan")) if trainer.round in rounds else t

    trainer.engine.average = poisoned


def main(jobs_file: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    for job in json.loads(Path(jobs_file).read_text()):
        cfg = load_config(CONFIG, job["overrides"])
        trainer = Trainer.build(cfg, job["out"], resume=job.get("resume", False), device="cpu")
        discard_rounds(trainer, job.get("discard", []))
        report = {"before": probe(trainer, cfg.train.rounds)}
        records = trainer.fit(until=job.get("until"))
        report["after"] = partition(trainer)
        report["rounds_trained"] = len(records)
        engine = trainer.engine
        report["optimizer_steps"] = engine.ds.global_steps if isinstance(engine, DeepSpeedEngine) else None
        Path(job["out"], f"probe_rank{trainer.engine.rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
    distributed.finish(0)  # what opd-fast's CLI does: a plain exit can abort a finished run (see its docstring)
