"""The reference opd_step against diffusers' own scheduler, an independent float64 computation, a Monte-Carlo KL
and the PPO-style surrogate's gradient statistics."""

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from opd_fast.ops import opd_step
from opd_fast.ops.opd_step.naive import apply_cfg, transition_coefficients


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def test_ode_step_equals_diffusers_scheduler_step():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(10)
    x = _rand(2, 4, 8, 8, seed=1)
    for i, t in enumerate(sched.timesteps):
        v = _rand(2, 4, 8, 8, seed=10 + i)
        expected = sched.step(v, t, x, return_dict=False)[0]
        sigma, sigma_next = sched.sigmas[i].expand(2), sched.sigmas[i + 1].expand(2)
        ours, _ = opd_step(x, v, v + 0.1, _rand(2, 4, 8, 8, seed=99), sigma, sigma_next, 0.0, backend="reference")
        torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
        x = expected


def _sde_float64(x, v, noise, s, s_next, a):
    """Flow-GRPO's sde_step_with_logprob, written out in float64 numpy (sigma_max = the grid's sigmas[1])."""
    dt = s_next - s
    sigma_max = s_next if s == 1 else s
    std = a * math.sqrt(s / (1 - sigma_max))
    mean = x * (1 + std**2 / (2 * s) * dt) + v * (1 + std**2 * (1 - s) / (2 * s)) * dt
    return mean, std * math.sqrt(-dt)


@pytest.mark.parametrize("a", [0.3, 0.7, 1.0])
def test_sde_mean_and_std_match_float64(a):
    sigmas = [1.0, 0.96, 0.7, 0.28, 0.0089]
    nexts = [0.96, 0.91, 0.6, 0.0089, 0.0]
    x, v, noise = _rand(5, 3, 4, 4, seed=2), _rand(5, 3, 4, 4, seed=3), _rand(5, 3, 4, 4, seed=4)
    out, _ = opd_step(x, v, v, noise, torch.tensor(sigmas), torch.tensor(nexts), a, backend="reference")
    for b, (s, s_next) in enumerate(zip(sigmas, nexts)):
        mean, sbar = _sde_float64(x[b].double().numpy(), v[b].double().numpy(), None, s, s_next, a)
        expected = mean + sbar * noise[b].double().numpy()
        np.testing.assert_allclose(out[b].double().numpy(), expected, rtol=2e-5, atol=2e-6)
    _, _, sbar, _ = transition_coefficients(torch.tensor(sigmas), torch.tensor(nexts), a)
    for b, (s, s_next) in enumerate(zip(sigmas, nexts)):
        assert sbar[b].item() == pytest.approx(_sde_float64(0.0, 0.0, None, s, s_next, a)[1], rel=1e-6)


def test_closed_form_kl_matches_monte_carlo():
    """KL(N(mu_S, sbar^2 I) || N(mu_T, sbar^2 I)) = E_{z ~ student}[log p_S(z) - log p_T(z)], D = 6."""
    D = 6
    x, v_s, v_t = _rand(1, D, seed=5), _rand(1, D, seed=6), _rand(1, D, seed=7)
    sigma, sigma_next, a = torch.tensor([0.7]), torch.tensor([0.6]), 0.8
    _, kl = opd_step(x, v_s, v_t, torch.zeros(1, D) + 1e-3, sigma, sigma_next, a, backend="reference")
    x_coef, v_coef, sbar, _ = transition_coefficients(sigma, sigma_next, a)
    mu_s = (x_coef * x + v_coef * v_s).double()
    mu_t = (x_coef * x + v_coef * v_t).double()
    z = mu_s + sbar.double() * torch.randn(400_000, D, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    log_ratio = (-(z - mu_s).pow(2).sum(1) + (z - mu_t).pow(2).sum(1)) / (2 * sbar.double() ** 2)
    mc, stderr = log_ratio.mean().item(), log_ratio.std().item() / math.sqrt(len(log_ratio))
    assert abs(kl.item() - mc) < 4 * stderr, (kl.item(), mc, stderr)
    assert kl.item() > 0.05  # not a degenerate comparison


def test_kl_normalizations_and_reductions():
    x, v_s, v_t, noise = _rand(3, 2, 5, seed=9), _rand(3, 2, 5, seed=10), _rand(3, 2, 5, seed=11), _rand(3, 2, 5)
    sigma, sigma_next = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.8, 0.4, 0.0])
    a = 0.7
    _, exact = opd_step(x, v_s, v_t, noise, sigma, sigma_next, a, backend="reference")
    _, official = opd_step(x, v_s, v_t, noise, sigma, sigma_next, a, kl_normalization="official", backend="reference")
    _, mean = opd_step(x, v_s, v_t, noise, sigma, sigma_next, a, reduction="mean", backend="reference")
    # official denominator std_t^2 = sbar^2 / |dt|: official = exact * |dt|
    torch.testing.assert_close(official, exact * (sigma - sigma_next), rtol=1e-5, atol=0)
    torch.testing.assert_close(mean, exact / 10, rtol=1e-6, atol=0)


def test_ode_branch_chosen_by_sbar_per_sample():
    """noise_level 0: 0.5 ||mu_S - mu_T||^2; the gradient reaches v_student only."""
    x, v_t, noise = _rand(2, 3, seed=12), _rand(2, 3, seed=13), _rand(2, 3, seed=14)
    v_s = _rand(2, 3, seed=15).requires_grad_()
    sigma, sigma_next = torch.tensor([1.0, 0.5]), torch.tensor([0.9, 0.25])
    _, loss = opd_step(x, v_s, v_t, noise, sigma, sigma_next, 0.0, backend="reference")
    dt = (sigma_next - sigma)[:, None]
    torch.testing.assert_close(loss, 0.5 * (dt * (v_s - v_t)).pow(2).sum(1))
    loss.sum().backward()
    torch.testing.assert_close(v_s.grad, dt**2 * (v_s - v_t).detach())


def test_cfg_stacked_halves():
    v_u, v_c = _rand(2, 3, seed=16), _rand(2, 3, seed=17)
    torch.testing.assert_close(apply_cfg(torch.cat([v_u, v_c]), 4.5), v_u + 4.5 * (v_c - v_u))
    x, noise = _rand(2, 3, seed=18), _rand(2, 3, seed=19)
    s, sn = torch.tensor([0.8, 0.8]), torch.tensor([0.6, 0.6])
    fused = opd_step(x, torch.cat([v_u, v_c]), v_c, noise, s, sn, 0.5, student_guidance=4.5, backend="reference")
    plain = opd_step(x, v_u + 4.5 * (v_c - v_u), v_c, noise, s, sn, 0.5, backend="reference")
    torch.testing.assert_close(fused, plain)


def test_shape_errors_name_the_argument():
    x = torch.ones(2, 3)
    with pytest.raises(ValueError, match="v_teacher has shape"):
        opd_step(x, x, torch.ones(3, 3), x, torch.ones(2) * 0.5, torch.ones(2) * 0.4, 0.0)
    with pytest.raises(ValueError, match=r"v_student has shape .*\[uncond; cond\]"):
        opd_step(x, x, x, x, torch.ones(2) * 0.5, torch.ones(2) * 0.4, 0.0, student_guidance=2.0)
    with pytest.raises(ValueError, match="sigma has shape"):
        opd_step(x, x, x, x, torch.ones(3), torch.ones(2), 0.0)


def test_ppo_gradient_same_mean_larger_variance():
    """A 3-step SDE rollout of a linear student v = A x against a linear teacher v = T x: over many noise draws the
    PPO-style surrogate's gradient has the closed-form gradient's mean and a larger variance."""
    D, steps, draws, a = 4, 3, 4000, 0.7
    A0, T = _rand(D, D, seed=20) * 0.5, _rand(D, D, seed=21) * 0.5
    sigmas = torch.tensor([1.0, 0.8, 0.5, 0.2])
    x0 = _rand(draws, D, seed=22)
    noise = _rand(steps, draws, D, seed=23)

    def grads(estimator):
        # one copy of A per draw, so a single backward gives every draw's own gradient
        A = A0.expand(draws, D, D).clone().requires_grad_()
        x, total = x0, 0
        for j in range(steps):
            s, sn = sigmas[j].expand(draws), sigmas[j + 1].expand(draws)
            v_student = torch.bmm(A, x[:, :, None])[..., 0]
            x_next, loss = opd_step(x, v_student, x @ T.T, noise[j], s, sn, a, estimator=estimator)
            total = total + loss
            x = x_next
        total.sum().backward()
        return A.grad.flatten(1)

    closed, ppo = grads("closed_form"), grads("ppo")
    stderr = (ppo - closed).std(0) / math.sqrt(draws)
    assert ((ppo.mean(0) - closed.mean(0)).abs() < 4 * stderr + 1e-6).all()
    ratio = (ppo.var(0).sum() / closed.var(0).sum()).item()
    print(f"PPO-style / closed-form gradient variance ratio: {ratio:.1f}x")
    assert ratio > 2


def test_ppo_refuses_ode():
    x = torch.ones(1, 2)
    with pytest.raises(ValueError, match="needs an SDE step"):
        opd_step(x, x, x, x, torch.tensor([0.5]), torch.tensor([0.4]), 0.0, estimator="ppo")
