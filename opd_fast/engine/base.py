"""The engine contract (what the trainer, the EMA and checkpoints ask of the student update) and the helpers every
engine shares: the optimizer, the learning-rate schedule, the backward calls of a round."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch

from opd_fast.config import OptimizerConfig, RunConfig


@runtime_checkable
class Engine(Protocol):
    """The student update as the trainer drives it: a round calls backward(loss) many times (trained steps x tasks x
    micro-batches) and step() once.

    Checkpoints and exports see ONE layout whatever the engine: the FULL state on rank 0 (trainable_state() and
    state_dict()), which every load_* twin takes back. So a checkpoint written by ZeRO-3 on 8 GPUs resumes in one
    CPU process, and the reverse. Members marked "collective" must be called on every rank, in the same order.

    Attributes:
        rank, world_size: this process's place in the group (0 and 1 for one process).
        forward_model: the student as a family's velocity calls it. Calls go through the engine's wrapper, which acts in
            its forward (DDP decides there whether the next backward syncs; DeepSpeed advances its micro-step, without
            which ZeRO-3 overwrites instead of accumulating a round's gradients); attribute reads (config,
            parameters) reach the module.
        names: the trainable parameters' names, in the order of `params`, of trainable_state() and of the EMA.
        params: the tensors the EMA tracks: the trainable parameters, or under ZeRO-3 this rank's shards of them
            (gather() and shard() convert).
        params_are_shards: whether `params` are shards (ZeRO-3): then writing full values into them is not possible
            and the EMA can only be read through gather().
    """

    rank: int
    world_size: int
    forward_model: Callable[..., Any]
    names: list[str]
    params: list[torch.Tensor]
    params_are_shards: bool

    # -- the round -------------------------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        """Add d loss / d params to the round's gradient. A multi-process engine knows how many calls a round has
        (backwards_per_round) and reduces the gradients across ranks once, in the round's last call; one call more
        raises, naming the counts."""

    def step(self) -> float | None:
        """Clip to optimizer.max_grad_norm and take one optimizer step over the round's gradient (summed over the
        backward calls, and over the ranks), then drop it. Returns the gradient norm before clipping, or None when
        it is not finite: then no step is taken and the gradient is dropped all the same. A multi-process engine
        raises, naming the counts, when called before the round's last backward (its gradient sync was missed)."""

    def zero_grad(self) -> None:
        """Drop the round's gradient without a step (the trainer drops a whole round whose loss is not finite), and
        start counting a new round: the next round's gradient holds nothing of the dropped calls, whatever buffers
        the engine accumulates in (DeepSpeed ZeRO-1/2 keep their own: MasterCopyState.drop_accumulated)."""

    @property
    def lr(self) -> float:
        """The learning rate of the next step (the first parameter group's)."""

    @lr.setter
    def lr(self, value: float) -> None:
        """Set the learning rate of every parameter group."""

    def average(self, t: torch.Tensor) -> torch.Tensor:
        """`t` averaged over the ranks, as a new tensor (collective; `t` itself on one process)."""

    # -- the full state ---------------------------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """{name: full fp32 value} of the trainable parameters on rank 0, in the order of `names`; {} on other ranks,
        which only take part in gathering it (collective)."""

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Set the trainable parameters (the master copy and the compute copy) from full tensors, {name: tensor} as
        trainable_state() gives it. Every rank passes the same full tensors."""

    def state_dict(self) -> dict:
        """The optimizer state in torch AdamW's layout (state_dict() of a torch.optim.AdamW over the full trainable
        tensors in the order of `names`, one parameter group) on rank 0 (collective; other ranks get the groups and
        an empty "state"). Before the first step "state" is empty."""

    def load_state_dict(self, state: dict) -> None:
        """Take the optimizer state in state_dict()'s layout (every rank passes the same); an empty "state" (a
        checkpoint from before the first step) leaves the optimizer as new."""

    def gather(self, local: list[torch.Tensor]) -> list[torch.Tensor]:
        """Tensors shaped like `params` (e.g. the EMA's) as full tensors on rank 0, placeholders on other ranks
        (collective under ZeRO-3; `local` itself where `params` are full)."""

    def shard(self, full: list[torch.Tensor]) -> list[torch.Tensor]:
        """gather()'s inverse: this rank's part of each full tensor, shaped like `params`."""

    def gathered(self) -> contextlib.AbstractContextManager:
        """A context in which every parameter of the model holds its full value (collective under ZeRO-3, which
        gathers them; nothing to do elsewhere)."""


def make_optimizer(params, cfg: OptimizerConfig) -> torch.optim.AdamW:
    """torch AdamW; fused (one kernel for every tensor) when all the tensors are on a GPU, where the default
    per-tensor loop would launch several kernels per parameter (the official LoRA has ~380 of them). The CPU keeps
    torch's default, so CPU runs are bit for bit what they were."""
    params = list(params)
    fused = bool(params) and all(p.device.type == "cuda" and p.dtype.is_floating_point for p in params)
    return torch.optim.AdamW(
        params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, eps=cfg.eps, fused=fused or None
    )


IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable")  # how this machine runs the update, not the run's state


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """optimizer.load_state_dict, keeping this optimizer's implementation flags: torch restores them from the
    checkpoint, so a CPU run's checkpoint would switch a GPU resume off the fused kernel (and the reverse)."""
    flags = [{k: group[k] for k in IMPLEMENTATION_KEYS if k in group} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, kept in zip(optimizer.param_groups, flags):
        group.update(kept)


def lr_at(cfg: OptimizerConfig, round_idx: int, rounds: int) -> float:
    """The learning rate of round `round_idx` (0-based) of `rounds`: a function of the round alone, so a resumed run
    continues the schedule without saving it. cosine anneals towards 0 over the run: the last rounds average out the
    gradient noise that a constant rate leaves in the weights."""
    if cfg.schedule == "constant":
        return cfg.lr
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(round_idx / rounds, 1.0)))


def backwards_per_round(cfg: RunConfig) -> int:
    """The trainer's backward calls per round: every trained step of every micro-batch of every task, or with
    train.task_batching (the tasks' micro-batches in one batch) every trained step of the longest task."""
    steps = [cfg.trained_steps(task) for task in cfg.tasks]
    return (max(steps) if cfg.train.task_batching else sum(steps)) * cfg.train.micro_batches_per_task


def trainable_parameters(model: torch.nn.Module) -> tuple[list[str], list[torch.nn.Parameter]]:
    """(names, parameters) of the parameters that require a gradient, in the module's order."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the student has no trainable parameters")
    return [n for n, _ in named], [p for _, p in named]


@contextlib.contextmanager
def values_swapped_in(params: list[torch.Tensor], values: list[torch.Tensor]):
    """Temporarily copy `values` into `params` (same shapes); the parameters' own values are put back after."""
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, v in zip(params, saved):
                p.copy_(v)
