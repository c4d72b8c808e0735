"""DiffusionNFT's objective (Zheng et al. 2025, "DiffusionNFT: Online Diffusion Reinforcement with Forward Process"),
as its released trainer computes it, per clean sample x0 of a rollout with advantage A, at a noise level t:

    r       = clip((clip(A, -m, m) / m) / 2 + 1/2, 0, 1)          the sample's optimality probability
    x_t     = (1 - t) x0 + t eps
    v+      = beta v_theta + (1 - beta) v_old                      the implicit positive policy
    v-      = (1 + beta) v_old - beta v_theta                      the implicit negative policy
    L+/-    = mean_elements((x_t - t v+/- - x0)^2) / w+/-,  w = mean_elements(|x_t - t v+/- - x0|) (no gradient,
              >= 1e-5): the adaptive weight
    loss    = m (r L+ + (1 - r) L-) / beta   (+ kl_beta mean_elements((v_theta - v_ref)^2))

v_old is the velocity of the policy that drew the samples (with one optimizer step per round, the current weights
detached). CFG-free: every velocity is the conditional one.
"""

from __future__ import annotations

import torch

WEIGHT_MIN = 1e-5


def optimality(advantages: torch.Tensor, adv_clip_max: float) -> torch.Tensor:
    """r in [0, 1] of each sample's advantage."""
    return ((advantages.clamp(-adv_clip_max, adv_clip_max) / adv_clip_max) / 2 + 0.5).clamp(0, 1)


def _weighted_x0_error(x0_pred: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    dims = tuple(range(1, x0.dim()))
    with torch.no_grad():
        weight = (x0_pred.double() - x0.double()).abs().mean(dims, keepdim=True).clamp(min=WEIGHT_MIN)
    return ((x0_pred - x0) ** 2 / weight.to(x0_pred.dtype)).mean(dims)


def nft_loss(
    v: torch.Tensor,
    v_old: torch.Tensor,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    beta: float,
    adv_clip_max: float,
) -> torch.Tensor:
    """(B,) float32 per-sample loss (module docstring); gradient to v only. t, r: (B,)."""
    v, v_old, x_t, x0 = v.float(), v_old.detach().float(), x_t.float(), x0.float()
    t = t.float().view((-1,) + (1,) * (x0.dim() - 1))
    positive = beta * v + (1 - beta) * v_old
    negative = (1 + beta) * v_old - beta * v
    loss_pos = _weighted_x0_error(x_t - t * positive, x0)
    loss_neg = _weighted_x0_error(x_t - t * negative, x0)
    return adv_clip_max * (r * loss_pos + (1 - r) * loss_neg) / beta
