"""One process: a torch AdamW over the trainable parameters, whose own state is already the full state."""

from __future__ import annotations

import contextlib
import math

import torch

from opd_fast.config import OptimizerConfig
from opd_fast.engine.base import load_optimizer_state, make_optimizer, trainable_parameters


class SingleEngine:
    """One process, a torch AdamW over the trainable parameters (see Engine for the contract of each member).

    The DDP engine keeps one of these per rank as its replica: the update and the state are the same there."""

    rank = 0
    world_size = 1
    params_are_shards = False

    def __init__(self, model: torch.nn.Module, opt_cfg: OptimizerConfig):
        self.model = model
        self.forward_model = model
        self.names, self.params = trainable_parameters(model)
        self.optimizer = make_optimizer(self.params, opt_cfg)
        self.max_grad_norm = opt_cfg.max_grad_norm

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float | None:
        max_norm = self.max_grad_norm if self.max_grad_norm is not None else math.inf
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        if not math.isfinite(norm):
            self.zero_grad()
            return None
        self.optimizer.step()
        self.zero_grad()
        return norm

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def average(self, t: torch.Tensor) -> torch.Tensor:
        return t

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = value

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in zip(self.names, self.params)}

    @torch.no_grad()
    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        for n, p in zip(self.names, self.params):
            p.copy_(state[n])

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        load_optimizer_state(self.optimizer, state)

    def gather(self, local: list[torch.Tensor]) -> list[torch.Tensor]:
        return local

    def shard(self, full: list[torch.Tensor]) -> list[torch.Tensor]:
        return full

    def gathered(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()
