"""Flow-GRPO's objective (Liu et al. 2025, "Flow-GRPO: Training Flow Matching Models via Online RL"), per trained step
j of a rollout, for samples drawn in groups of G per prompt:

    advantage   A_i = (R_i - mean_group(R)) / (std(R) + 1e-4)      std over the group, or the round (global_std);
                population std, as Flow-GRPO's per-prompt stat tracker (numpy's default)
    ratio       rho = exp(log p_theta(x_j+1 | x_j) - log p_old(x_j+1 | x_j))      (opd_step's log_prob)
    loss        max(-A rho, -A clip(rho, 1 - eps, 1 + eps))   with A clipped to [-adv_clip_max, adv_clip_max]
    KL          + kl_beta KL(p_theta || p_ref), the closed form (opd_step's loss with the reference as teacher)

GRPO-Guard (Wang et al. 2025; the form verl-omni documents): the log-ratio's left shift b = ||mu_theta - mu_old||^2 /
(2 sbar^2) (the per-element mean or sum, as log p's reduction) is added back and the result scaled by sbar, so every
step's ratio sits around 1 with a comparable spread; the step's loss is divided by |dt| to even the steps' gradients.
"""

from __future__ import annotations

import torch

STD_EPS = 1e-4  # Flow-GRPO's


def group_advantages(rewards: torch.Tensor, group_size: int, global_std: bool = False) -> torch.Tensor:
    """(N,) float32 advantages of (N,) rewards laid out group by group (N = groups x group_size)."""
    r = rewards.double().view(-1, group_size)
    centred = r - r.mean(1, keepdim=True)
    std = r.std(unbiased=False) if global_std else r.std(1, keepdim=True, unbiased=False)
    return (centred / (std + STD_EPS)).flatten().float()


def clipped_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float, adv_clip_max: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss (B,), ratio (B,), clipped (B,) bool): PPO's clipped surrogate per sample, the ratio from log-probs."""
    adv = advantages.clamp(-adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped), ratio, (clipped > unclipped).detach()


def guard_log_ratio(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, mean_shift: torch.Tensor, sbar: torch.Tensor
) -> torch.Tensor:
    """GRPO-Guard's normalised log-ratio (log p - log p_old + b) sbar; mean_shift b = ||mu - mu_old||^2 / (2 sbar^2)."""
    return (log_prob - old_log_prob + mean_shift) * sbar


def mean_shift(
    v_coef: torch.Tensor, v: torch.Tensor, v_old: torch.Tensor, sbar: torch.Tensor, reduction: str
) -> torch.Tensor:
    """b (B,) = ||mu - mu_old||^2 / (2 sbar^2) with mu - mu_old = v_coef (v - v_old) (x is the same state)."""
    gap = (v.float() - v_old.float()).flatten(1).pow(2)
    gap = gap.mean(1) if reduction == "mean" else gap.sum(1)
    return v_coef**2 * gap / (2 * sbar**2)
