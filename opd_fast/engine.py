"""The student update: gradient accumulation over a round, clipping, one optimizer step, EMA.

SingleEngine is the plain single-process path (torch AdamW). Every engine exposes the same small surface the
trainer uses: backward(loss), step() -> grad norm (or None when skipped), zero_grad(), rank/world_size,
state_dict()/load_state_dict().
"""

from __future__ import annotations

import contextlib
import math

import torch

from opd_fast.config import EMAConfig, OptimizerConfig


def make_optimizer(params, cfg: OptimizerConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, eps=cfg.eps)


class EMA:
    """The official schedule: at optimization step s, when (s + 1) % update_every == 0,
    ema += (1 - d) (p - ema) with d = min((1 + s) / (10 + s), decay)."""

    def __init__(self, params: list[torch.nn.Parameter], cfg: EMAConfig):
        self.params = params
        self.cfg = cfg
        self.shadow = [p.detach().clone().float() for p in params]

    def decay(self, step: int) -> float:
        return min((1 + step) / (10 + step), self.cfg.decay)

    @torch.no_grad()
    def update(self, step: int) -> None:
        if (step + 1) % self.cfg.update_every:
            return
        one_minus_decay = 1 - self.decay(step)
        for shadow, p in zip(self.shadow, self.params):
            shadow.add_(one_minus_decay * (p.detach().float() - shadow))

    @contextlib.contextmanager
    def swapped_in(self):
        """Temporarily put the EMA weights into the parameters (e.g. to export or evaluate them)."""
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {str(i): s for i, s in enumerate(self.shadow)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for i, s in enumerate(self.shadow):
            s.copy_(state[str(i)])


class SingleEngine:
    """One process, a torch AdamW over the trainable parameters."""

    rank = 0
    world_size = 1

    def __init__(self, model: torch.nn.Module, opt_cfg: OptimizerConfig):
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the student has no trainable parameters")
        self.optimizer = make_optimizer(self.params, opt_cfg)
        self.max_grad_norm = opt_cfg.max_grad_norm

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float | None:
        """Clip and step; returns the pre-clip gradient norm, or None (no step taken) when it is not finite."""
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

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)
