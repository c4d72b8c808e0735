"""opd_step's log-probability (log_prob=True): the log-density of the next state under the student's Gaussian
transition, on the reference and the triton backend, against torch.distributions.Normal in float64 on odd shapes
and dtypes; its gradient against float64 autograd; exactly 1 as an on-policy importance ratio (bf16 included); the
cpp and cuda backends refuse it by name.

Triton runs under TRITON_INTERPRET=1 without a GPU (set here before the kernels are imported, as tests/conftest.py
does); its grids stay a handful of programs per case.
"""

import itertools
import os

import pytest
import torch

from opd_fast import ops
from opd_fast.ops.opd_step import fused, naive

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

GPU = torch.cuda.is_available()
SHAPES = [(3, 5, 7, 9), (2, 37, 24), (1, 4, 6, 6)]  # latents, packed tokens, B = 1
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
STEPS = {1: [(0.6, 0.3)], 2: [(1.0, 0.85), (0.25, 0.0)], 3: [(1.0, 0.85), (0.6, 0.3), (0.25, 0.0)]}
MODES = list(itertools.product(["sum", "mean"], [None, 4.5], ["own", "given"]))
CASES = [(SHAPES[(i + d) % 3], dtype, *mode) for d, dtype in enumerate(DTYPES) for i, mode in enumerate(MODES)]


def _device(backend):
    device = torch.device("cuda" if backend == "triton" and GPU else "cpu")
    if backend != "reference" and not fused.backend_available(backend, device):
        pytest.skip(f"backend {backend!r} unavailable: {fused.why_unavailable(backend, device)}")
    return device


def _inputs(shape, dtype, device, guidance, seed=0):
    gen = torch.Generator().manual_seed(seed)
    B = shape[0]

    def randn(rows, offset=0.0):
        return (torch.randn((rows,) + shape[1:], generator=gen) + offset).to(device=device, dtype=dtype)

    x, v_student = randn(B, 0.3), randn(2 * B if guidance is not None else B, 0.2)
    v_teacher, noise = randn(B, -0.1), randn(B, 0.1)
    sigma, sigma_next = torch.tensor(STEPS[B], device=device).unbind(1)
    return x, v_student, v_teacher, noise, sigma, sigma_next


def normal_truth(x, v_student, sample, sigma, sigma_next, noise_level, guidance, reduction):
    """sum (or mean) over elements of torch.distributions.Normal(mu_S, sbar).log_prob(sample), float64."""
    B = x.shape[0]
    x_coef, v_coef, sbar, _ = naive.transition_coefficients(sigma.cpu(), sigma_next.cpu(), noise_level)
    col = [c.double().view((B,) + (1,) * (x.dim() - 1)) for c in (x_coef, v_coef, sbar)]
    v_s = naive.apply_cfg(v_student.double().cpu(), guidance)
    mean = col[0] * x.double().cpu() + col[1] * v_s
    scale = col[2].expand_as(mean)
    lp = torch.distributions.Normal(mean, scale).log_prob(sample.double().cpu()).flatten(1)
    return lp.mean(1) if reduction == "mean" else lp.sum(1)


def _check(out, out_ref, truth, atol):
    if out.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        # the interpreter casts fp32 -> bf16 by truncation, compiled Triton rounds to nearest (tests/test_kernels.py)
        atol += 2.0**-7 * truth.abs().max().item()
    err = (out.double().cpu() - truth).abs().max().item()
    err_ref = (out_ref.double().cpu() - truth).abs().max().item()
    assert err <= 2 * err_ref + atol, f"max error {err:.3e} > 2 * {err_ref:.3e} (reference) + {atol:.3e}"


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("shape, dtype, reduction, guidance, which", CASES)
def test_log_prob_matches_normal(backend, shape, dtype, reduction, guidance, which):
    device = _device(backend)
    x, v_student, v_teacher, noise, sigma, sigma_next = _inputs(shape, dtype, device, guidance)
    given = (x + 0.05 * noise).to(dtype) if which == "given" else None  # an off-policy stored state
    g = torch.randn(shape[0], generator=torch.Generator().manual_seed(3)).to(device) + 0.5
    kw = dict(student_guidance=guidance, reduction=reduction, log_prob=True, sample=given)

    def run(b, v):
        leaf = v.detach().clone().requires_grad_(True)
        x_next, loss, lp = ops.opd_step(x, leaf, v_teacher, noise, sigma, sigma_next, 0.7, backend=b, **kw)
        (loss + g * lp).sum().backward()
        return x_next, lp, leaf.grad

    x_next, lp, grad = run(backend, v_student)
    x_ref, lp_ref, grad_ref = run("reference", v_student)
    assert lp.dtype == torch.float32 and lp.shape == (shape[0],) and grad.dtype == dtype
    if backend == "triton":
        assert type(lp.grad_fn).__name__ == "OpdStepBackward", "the fused op did not run"

    # each backend's log-density is of the state it returned (or the given one)
    v64 = v_student.double().cpu().requires_grad_(True)
    steps = (sigma, sigma_next, 0.7, guidance, reduction)
    truth = normal_truth(x, v64, x_next if given is None else given, *steps)
    truth_ref = normal_truth(x, v_student, x_ref if given is None else given, *steps)
    _check(lp, lp_ref, truth.detach(), 1e-5 * truth.abs().max().item())
    if dtype == torch.float32:  # (in 16 bits the reference's own CFG rounds: the 2x rule above covers it)
        torch.testing.assert_close(lp_ref.double().cpu(), truth_ref, rtol=1e-5, atol=1e-4)
    # gradient: the KL's plus g * d log p, against float64 autograd of the textbook forms
    _, v_coef, sbar, std_t = naive.transition_coefficients(sigma.cpu(), sigma_next.cpu(), 0.7)
    w = naive.loss_weight(v_coef, sbar, std_t, x[0].numel(), "exact", reduction).double()
    v_s = naive.apply_cfg(v64, guidance)
    kl64 = w * (v_s - v_teacher.double().cpu()).flatten(1).pow(2).sum(1)
    (kl64 + g.double().cpu() * truth).sum().backward()
    _check(grad, grad_ref, v64.grad, 1e-6 * v64.grad.abs().max().item())


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_on_policy_ratio_is_exactly_one(backend, dtype):
    """The rollout's log-prob of its own stored state and a recompute at the same weights against that stored state
    (what Flow-GRPO's ratio divides) agree bit for bit, in bf16 and fp16 too."""
    device = _device(backend)
    x, v_student, _, noise, sigma, sigma_next = _inputs((3, 5, 7, 9), dtype, device, None, seed=4)
    x_next, _, lp_rollout = ops.opd_step(
        x, v_student, None, noise, sigma, sigma_next, 0.7, backend=backend, log_prob=True
    )
    assert x_next.dtype == dtype
    leaf = v_student.detach().clone().requires_grad_(True)
    _, _, lp_train = ops.opd_step(
        x, leaf, None, noise, sigma, sigma_next, 0.7, backend=backend, log_prob=True, sample=x_next
    )
    ratio = torch.exp(lp_train - lp_rollout)
    assert torch.equal(lp_train.detach(), lp_rollout), lp_train - lp_rollout
    assert torch.equal(ratio.detach(), torch.ones_like(ratio))
    ratio.sum().backward()
    assert leaf.grad.abs().sum() > 0  # the ratio still carries the policy gradient


def test_ode_step_has_zero_log_prob_and_no_gradient():
    x, v_student, _, noise, sigma, sigma_next = _inputs((2, 4, 6, 6), torch.float32, "cpu", None)
    leaf = v_student.clone().requires_grad_(True)
    _, loss, lp = ops.opd_step(x, leaf, None, noise, sigma, sigma_next, 0.0, backend="reference", log_prob=True)
    assert torch.equal(lp, torch.zeros(2)) and torch.equal(loss, torch.zeros(2))


def test_without_a_teacher_the_loss_is_zero_and_x_next_unchanged():
    x, v_student, v_teacher, noise, sigma, sigma_next = _inputs((2, 4, 6, 6), torch.float32, "cpu", None)
    with_teacher, _ = ops.opd_step(x, v_student, v_teacher, noise, sigma, sigma_next, 0.7, backend="reference")
    alone, loss = ops.opd_step(x, v_student, None, noise, sigma, sigma_next, 0.7, backend="reference")
    assert torch.equal(alone, with_teacher) and torch.equal(loss, torch.zeros(2))


@pytest.mark.parametrize("backend", ["cpp", "cuda"])
def test_backends_without_log_prob_refuse_it_by_name(backend):
    x, v_student, v_teacher, noise, sigma, sigma_next = _inputs((2, 4, 6, 6), torch.float32, "cpu", None)
    with pytest.raises(ValueError, match=f"the {backend} backend does not compute log_prob; use backend 'triton'"):
        ops.opd_step(x, v_student, v_teacher, noise, sigma, sigma_next, 0.7, backend=backend, log_prob=True)
    with pytest.raises(ValueError, match=f"the {backend} backend does not compute log_prob"):
        ops.LossSpec(0.7, backend=backend, log_prob=True)


def test_auto_picks_a_backend_that_computes_log_prob():
    spec = ops.LossSpec.resolve(0.7, "cpu", log_prob=True)
    assert spec.backend == "reference" and spec.log_prob  # cpp is CPU's default, but has no log-prob
    if GPU and fused.backend_available("triton", torch.device("cuda")):
        assert ops.LossSpec.resolve(0.7, "cuda", log_prob=True).backend == "triton"


def test_sample_without_log_prob_is_refused():
    x, v_student, v_teacher, noise, sigma, sigma_next = _inputs((2, 4, 6, 6), torch.float32, "cpu", None)
    with pytest.raises(ValueError, match="pass log_prob=True"):
        ops.opd_step(x, v_student, v_teacher, noise, sigma, sigma_next, 0.7, backend="reference", sample=x)
