"""The exponential moving average of the student's trainable weights."""

from __future__ import annotations

import contextlib

import torch

from opd_fast.config import EMAConfig
from opd_fast.engine.base import Engine, values_swapped_in


class EMA:
    """The official schedule (Flow-GRPO's EMAModuleWrapper): called with s, the optimizer steps taken so far (the
    trainer calls it after each step: s = 1, 2, ...); when (s + 1) % update_every == 0,
    ema += (1 - d) (p - ema) with d = min((1 + s) / (10 + s), decay).

    `params` are the engine's (Engine.params), which may be shards (ZeRO-3): then `engine` gathers state_dict() to
    full tensors on rank 0, and load_state_dict() takes full tensors and keeps this rank's part. Without an engine
    the tensors are full and the state is theirs."""

    def __init__(self, params: list[torch.Tensor], cfg: EMAConfig, engine: Engine | None = None):
        self.params = params
        self.cfg = cfg
        self.engine = engine
        self.shadow = [p.detach().clone().float() for p in params]

    def decay(self, step: int) -> float:
        return min((1 + step) / (10 + step), self.cfg.decay)

    @torch.no_grad()
    def update(self, step: int) -> None:
        if (step + 1) % self.cfg.update_every:
            return
        # one multi-tensor kernel for all tensors (a lerp_ per tensor launches ~380 kernels on a GPU)
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1 - self.decay(step))

    @contextlib.contextmanager
    def swapped_in(self):
        """Temporarily put the EMA weights into the parameters (e.g. to evaluate them). Not when they are shards
        (ZeRO-3), whose modules also hold gathered copies of small parameters that this would not reach: export
        gathers instead."""
        if self.engine is not None and self.engine.params_are_shards:
            raise NotImplementedError(
                "EMA.swapped_in over sharded parameters (ZeRO-3): gather the EMA (state_dict) and load it instead"
            )
        with values_swapped_in(self.params, self.shadow):
            yield

    def state_dict(self) -> dict[str, torch.Tensor]:
        full = self.shadow if self.engine is None else self.engine.gather(self.shadow)
        return {str(i): s for i, s in enumerate(full)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        full = [state[str(i)] for i in range(len(self.shadow))]
        for s, value in zip(self.shadow, full if self.engine is None else self.engine.shard(full)):
            s.copy_(value)
