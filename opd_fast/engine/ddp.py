"""torch DistributedDataParallel: every rank holds the weights and a torch AdamW over them."""

from __future__ import annotations

import contextlib

import torch
from torch.nn.parallel import DistributedDataParallel

from opd_fast.config import RunConfig
from opd_fast.distributed import DistInfo
from opd_fast.engine.accumulate import AccumulatingEngine, RoutedForward
from opd_fast.engine.single import SingleEngine


class DDPEngine(AccumulatingEngine):
    """Data parallel over replicas: each rank's update and state are a SingleEngine's (the full state is its own);
    DDP all-reduces the gradients once per round, overlapped with the round's last backward (every other backward
    runs without sync: what no_sync() does)."""

    def __init__(self, model: torch.nn.Module, cfg: RunConfig, info: DistInfo):
        super().__init__(cfg, info)
        self.replica = SingleEngine(model, cfg.optimizer)
        self.model, self.names, self.params = model, self.replica.names, self.replica.params
        self.optimizer = self.replica.optimizer
        # DDP broadcasts rank 0's weights at construction. find_unused_parameters: a parameter may get no gradient
        # (e.g. a full-parameter student's unused output layers); DDP looks only in a syncing forward, once a round.
        self.ddp = DistributedDataParallel(
            model,
            device_ids=[info.device.index] if info.device.type == "cuda" else None,
            broadcast_buffers=False,
            find_unused_parameters=True,
        )
        self.forward_model = RoutedForward(model, self.ddp)
        self._arm_sync()

    def _set_sync(self, armed: bool) -> None:
        self.ddp.require_backward_grad_sync = armed  # what no_sync() toggles; DDP reads it in the next forward

    def _backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def _step(self) -> float | None:
        return self.replica.step()

    def _drop_gradients(self) -> None:
        self.replica.zero_grad()

    def _param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    # -- full state: every rank's replica holds it -----------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        return self.replica.trainable_state()

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        self.replica.load_trainable_state(state)

    def state_dict(self) -> dict:
        return self.replica.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.replica.load_state_dict(state)

    def gather(self, local: list[torch.Tensor]) -> list[torch.Tensor]:
        return local

    def shard(self, full: list[torch.Tensor]) -> list[torch.Tensor]:
        return full

    def gathered(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()
