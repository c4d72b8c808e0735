"""The plain PyTorch opd_step (backend "reference"): the readable twin every fast backend is tested against, and
the per-step scalars (transition_coefficients, loss_weight) that the fused backends share.

All math runs in float32 (bf16 overflows in the SDE coefficients). Notation (SPEC section 1), per sample b:

    dt      = sigma_next - sigma                                   (< 0: sampling runs sigma 1 -> 0)
    std_t   = a * sqrt(sigma / (1 - sigma'))       sigma' = sigma, except sigma == 1 uses sigma_next
    mu      = x * x_coef + v * v_coef
    x_coef  = 1 + std_t^2 / (2 sigma) * dt
    v_coef  = (1 + std_t^2 (1 - sigma) / (2 sigma)) * dt
    sbar    = std_t * sqrt(-dt)                                    (std of the Gaussian transition)
    x_next  = mu_S + sbar * noise

sigma' == sigma_next at sigma == 1 reproduces Flow-GRPO's `sigma_max = sigmas[1]` without passing the grid in:
the only state at sigma == 1 is step 0, whose sigma_next is sigmas[1].

Loss per sample (mu_S - mu_T = v_coef (v_S - v_T), the x terms cancel):
    SDE exact     ||mu_S - mu_T||^2 / (2 sbar^2)       the closed-form KL of two Gaussians with one covariance
    SDE official  ||mu_S - mu_T||^2 / (2 std_t^2)      the released code's denominator (= KL * |dt|)
    ODE           0.5 ||mu_S - mu_T||^2                chosen per sample by sbar == 0, never by a flag
reduction "mean" divides by the number of latent elements per sample (the released code's mean over C, H, W).

Log-probability (log_prob=True; Flow-GRPO's per-step log-likelihood, the PPO-style estimator's rho), per sample:
    log p   = -||x' - mu_S||^2 / (2 sbar^2) - N log sbar - N/2 log(2 pi)     N = latent elements, "sum"
    x'      = `sample` when given (a stored rollout state, under a policy that may since have moved), else the
              op's own x_next AS STORED (rounded to x.dtype): the rollout's value and a later recompute against the
              stored state then agree exactly, so the importance ratio is exactly 1 on-policy in bf16 too (the
              official code compared a bf16-rounded state with an fp32 one and drifted off 1)
    "mean"  divides the whole sum, constants included, by N: Flow-GRPO's mean over C, H, W
    ODE     sbar == 0: log p = 0 and no gradient (a deterministic step carries no likelihood; its ratio is 1)
Gradient (x' is a constant): d log p / d v_S = v_coef (x' - mu_S) / sbar^2 (/ N for "mean"), through CFG as the KL's.
"""

from __future__ import annotations

import math

import torch

KL_NORMALIZATIONS = ("exact", "official")
REDUCTIONS = ("sum", "mean")
ESTIMATORS = ("closed_form", "ppo")


def transition_coefficients(sigma: torch.Tensor, sigma_next: torch.Tensor, noise_level: float):
    """Per-sample scalars of one step, float32, each (B,): (x_coef, v_coef, sbar, std_t)."""
    sigma = sigma.float()
    sigma_next = sigma_next.float()
    dt = sigma_next - sigma
    sigma_prime = torch.where(sigma == 1, sigma_next, sigma)
    std_t = noise_level * torch.sqrt(sigma / (1 - sigma_prime))
    x_coef = 1 + std_t**2 / (2 * sigma) * dt
    v_coef = (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
    sbar = std_t * torch.sqrt(-dt)
    return x_coef, v_coef, sbar, std_t


def loss_weight(v_coef, sbar, std_t, numel: int, kl_normalization: str = "exact", reduction: str = "sum"):
    """w (B,) with loss = w * ||v_S - v_T||^2: folds v_coef^2, the KL denominator and the reduction."""
    if kl_normalization not in KL_NORMALIZATIONS:
        raise ValueError(f"kl_normalization must be one of {KL_NORMALIZATIONS}, got {kl_normalization!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    var = sbar**2 if kl_normalization == "exact" else std_t**2
    sde = sbar > 0
    inv_two_var = torch.where(sde, 0.5 / torch.where(sde, var, torch.ones_like(var)), torch.full_like(var, 0.5))
    w = v_coef**2 * inv_two_var
    return w / numel if reduction == "mean" else w


def log_prob_scalars(sbar: torch.Tensor, numel: int, reduction: str = "sum"):
    """(scale, const) (B,) float32 with log p = scale * ||x' - mu_S||^2 + const; both 0 where sbar == 0 (ODE)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    sde = sbar > 0
    safe = torch.where(sde, sbar, torch.ones_like(sbar))
    per = 1.0 / numel if reduction == "mean" else 1.0
    scale = torch.where(sde, -0.5 / safe**2 * per, torch.zeros_like(sbar))
    const = torch.where(sde, -(torch.log(safe) + 0.5 * math.log(2 * math.pi)) * (numel * per), torch.zeros_like(sbar))
    return scale, const


def apply_cfg(v: torch.Tensor, guidance: float | None) -> torch.Tensor:
    """v is (2B, ...) = [unconditional; conditional] when guidance is set: v_u + w (v_c - v_u)."""
    if guidance is None:
        return v
    v_uncond, v_cond = v.chunk(2)
    return v_uncond + guidance * (v_cond - v_uncond)


def opd_step_reference(
    x,
    v_student,
    v_teacher,
    noise,
    sigma,
    sigma_next,
    noise_level: float,
    *,
    kl_normalization: str = "exact",
    reduction: str = "sum",
    student_guidance: float | None = None,
    teacher_guidance: float | None = None,
    estimator: str = "closed_form",
    log_prob: bool = False,
    sample: torch.Tensor | None = None,
):
    """Reference opd_step: returns (x_next detached in x.dtype, loss (B,) float32 with grad to v_student), and with
    log_prob=True also log p(x' | x) (B,) float32 with grad to v_student (module docstring). v_teacher=None: no
    teacher (a stage-1 rollout): the loss is 0."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    v_s = apply_cfg(v_student, student_guidance).float()
    no_teacher = v_teacher is None
    if no_teacher:
        if estimator != "closed_form":
            raise ValueError(f"estimator={estimator!r} needs a teacher (v_teacher is None)")
        v_teacher, teacher_guidance = v_s, None
    v_t = apply_cfg(v_teacher, teacher_guidance).float().detach()
    xf = x.float()
    B = x.shape[0]
    shape = (B,) + (1,) * (x.dim() - 1)
    x_coef, v_coef, sbar, std_t = transition_coefficients(sigma, sigma_next, noise_level)
    student_mean = x_coef.view(shape) * xf + v_coef.view(shape) * v_s
    teacher_mean = x_coef.view(shape) * xf + v_coef.view(shape) * v_t
    x_next = (student_mean + sbar.view(shape) * noise.float()).detach()

    numel = x[0].numel()
    w = loss_weight(v_coef, sbar, std_t, numel, kl_normalization, reduction)
    mean_gap = (student_mean - teacher_mean).flatten(1)
    if kl_normalization == "exact" and reduction == "sum":
        # written as the textbook KL rather than through w, so the reference checks loss_weight too
        var = torch.where(sbar > 0, sbar**2, torch.ones_like(sbar))
        kl = torch.where(sbar > 0, mean_gap.pow(2).sum(1) / (2 * var), 0.5 * mean_gap.pow(2).sum(1))
    else:
        kl = w * (v_s - v_t).flatten(1).pow(2).sum(1)

    if estimator == "ppo":
        # -KL_j as a dense reward with importance ratio rho = p_theta(x_next | x) / p_old(x_next | x) (= 1 on-policy):
        # the surrogate rho * KL adds the score-function term KL * grad log p to the closed-form gradient.
        if bool((sbar <= 0).any()):
            raise ValueError("estimator='ppo' needs an SDE step (noise_level > 0): log p is undefined for the ODE")
        ppo_log_prob = -(x_next.flatten(1) - student_mean.flatten(1)).pow(2).sum(1) / (2 * sbar**2)
        ratio = torch.exp(ppo_log_prob - ppo_log_prob.detach())
        kl = ratio * kl
    if no_teacher:
        kl = torch.zeros_like(sbar)
    if not log_prob:
        return x_next.to(x.dtype), kl
    stored = x_next.to(x.dtype) if sample is None else sample.detach()
    scale, const = log_prob_scalars(sbar, numel, reduction)
    residual = (stored.float() - student_mean).flatten(1)
    return x_next.to(x.dtype), kl, scale * residual.pow(2).sum(1) + const
