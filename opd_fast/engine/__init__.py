"""The student update: gradient accumulation over a round, clipping, one optimizer step, EMA.

Every engine fulfils one contract, `Engine` (base.py), which the trainer is typed against:

- SingleEngine (single.py): one process, torch AdamW.
- DDPEngine (ddp.py): torch DistributedDataParallel; the gradients are all-reduced once per round.
- DeepSpeedEngine (deepspeed.py): ZeRO stage 0-3, optional CPU offload, bf16; a ZeroState per stage translates its
  weights and optimizer state to the engines' one full-state layout.

The two multi-process engines share their round (accumulate.py): they count its backward calls and arm their
wrapper's gradient sync for the last one. The EMA (ema.py) asks the engine whether its tensors are shards.
"""

from __future__ import annotations

import torch

from opd_fast import distributed
from opd_fast.config import RunConfig
from opd_fast.distributed import DistInfo
from opd_fast.engine.base import (
    Engine,
    backwards_per_round,
    load_optimizer_state,
    lr_at,
    make_optimizer,
    values_swapped_in,
)
from opd_fast.engine.ddp import DDPEngine
from opd_fast.engine.deepspeed import DeepSpeedEngine
from opd_fast.engine.ema import EMA
from opd_fast.engine.single import SingleEngine

__all__ = [
    "EMA",
    "DDPEngine",
    "DeepSpeedEngine",
    "Engine",
    "SingleEngine",
    "backwards_per_round",
    "load_optimizer_state",
    "lr_at",
    "make_engine",
    "make_optimizer",
    "values_swapped_in",
]


def make_engine(cfg: RunConfig, model: torch.nn.Module, info: DistInfo | None = None) -> Engine:
    """The engine `cfg.engine.kind` names, over `model`'s trainable parameters; `info` from distributed.setup()
    (which joins the launcher's process group; called here when not given)."""
    info = info if info is not None else distributed.setup(cfg.engine)
    if cfg.engine.kind == "single":
        return SingleEngine(model, cfg.optimizer)
    if cfg.engine.kind == "ddp":
        return DDPEngine(model, cfg, info)
    return DeepSpeedEngine(model, cfg, info)
