"""What the multi-process engines share: a round's backward calls counted, the wrapper's gradient sync armed for
the last of them, values averaged over the ranks, the learning rate set on the optimizer's groups."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from opd_fast import distributed
from opd_fast.config import RunConfig
from opd_fast.distributed import DistInfo
from opd_fast.engine.base import backwards_per_round


class RoutedForward:
    """The student as a family's velocity uses it: calls go through the engine's wrapper, attributes are the module's."""

    def __init__(self, module: torch.nn.Module, wrapper: torch.nn.Module):
        self.module, self.wrapper = module, wrapper

    def __call__(self, *args, **kwargs):
        return self.wrapper(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.module, name)


class AccumulatingEngine(ABC):
    """The round of DDPEngine and DeepSpeedEngine: `backwards_per_round` backward calls, then one step().

    The wrappers reduce the gradients across ranks only when told that a backward is the round's last (DDP reads
    its flag in the forward before it, DeepSpeed at the backward and again in step(), which updates only at such a
    boundary), so the engine counts the round's calls and keeps the sync armed from just before the last one
    through step(). A round with more calls, or a step() before the last one, would train on gradients that were
    never reduced: both raise, naming the counts. A subclass says how to tell its wrapper (`_set_sync`) and does
    the local work (`_backward`, `_step`, `_drop_gradients`) over its optimizer's `_param_groups`."""

    params_are_shards = False

    def __init__(self, cfg: RunConfig, info: DistInfo):
        self.info = info
        self.rank, self.world_size = info.rank, info.world_size
        self.backwards_per_round = backwards_per_round(cfg)
        self.backwards_done = 0

    @property
    def sync_armed(self) -> bool:
        """Whether the next backward is the round's last, or the last is done and step() is due."""
        return self.backwards_done >= self.backwards_per_round - 1

    def _arm_sync(self) -> None:
        # set before the forward (DDP) and the backward (DeepSpeed) it applies to, which run in the trainer
        self._set_sync(self.sync_armed)

    # -- the round -------------------------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        self.backwards_done += 1
        if self.backwards_done > self.backwards_per_round:
            raise RuntimeError(
                f"backward call {self.backwards_done} in one round; the engine was built for "
                f"{self.backwards_per_round} (trained steps x tasks x micro-batches)"
            )
        self._backward(loss)
        self._arm_sync()

    def step(self) -> float | None:
        if self.backwards_done != self.backwards_per_round:
            raise RuntimeError(
                f"step() after {self.backwards_done} backward calls; the engine was built for "
                f"{self.backwards_per_round} per round, so the gradient sync point was missed"
            )
        self.backwards_done = 0
        try:
            return self._step()
        finally:
            self._arm_sync()

    def zero_grad(self) -> None:
        self.backwards_done = 0
        self._arm_sync()
        self._drop_gradients()

    def average(self, t: torch.Tensor) -> torch.Tensor:
        return distributed.all_reduce(t, self.info) / self.world_size

    @property
    def lr(self) -> float:
        return self._param_groups()[0]["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        for group in self._param_groups():
            group["lr"] = value

    # -- what a subclass supplies ----------------------------------------------------------------------------------
    @abstractmethod
    def _set_sync(self, armed: bool) -> None:
        """Tell the wrapper whether the coming backward (and step) reduce the gradients across ranks."""

    @abstractmethod
    def _backward(self, loss: torch.Tensor) -> None:
        """Backpropagate `loss` through the wrapper (counted and armed already)."""

    @abstractmethod
    def _step(self) -> float | None:
        """Clip, step and drop the gradients; the pre-clip norm, or None (no step) when it is not finite."""

    @abstractmethod
    def _drop_gradients(self) -> None:
        """Drop the accumulated gradients without a step."""

    @abstractmethod
    def _param_groups(self) -> list[dict]:
        """The parameter groups whose "lr" the next step uses."""
