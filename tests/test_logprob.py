"""opd_step's log-probability (log_prob=True): the log-density of the next state under the student's Gaussian
transition, on the reference and every fused backend (triton, cpp, cuda), against torch.distributions.Normal in
float64 on odd shapes (N = 315, 888, 144, 35: ragged against every vector width) and dtypes; its gradient against
float64 autograd with a random upstream gradient; exactly 1 as an on-policy importance ratio (bf16 included); a
backend outside fused.LOG_PROB_BACKENDS refuses it by name.

Triton runs under TRITON_INTERPRET=1 without a GPU (set here before the kernels are imported, as tests/conftest.py
does); its grids stay a handful of programs per case. The cuda cases carry the `cuda` marker and skip on a machine
without a CUDA device (the GPU check's `tests` step runs them). Fused outputs are poisoned (NaN-filled), so an element
or a partial sum left unwritten fails.
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
SHAPES = [(3, 5, 7, 9), (2, 37, 24), (1, 4, 6, 6), (3, 5, 7)]  # latents, packed tokens, B = 1, N = 35 < any vector
NEEDS_CUDA = [pytest.mark.cuda, pytest.mark.skipif(not GPU, reason="needs a CUDA device (the cuda backend)")]
# every backend; cuda only where a CUDA device is visible (pytest.ini's `cuda` marker, bench/pytest_cuda.py)
BACKENDS = ["reference", "triton", "cpp", pytest.param("cuda", marks=NEEDS_CUDA)]
FUSED = BACKENDS[1:]
SMALL_CHUNK = {"triton": 256, "cpp": 64, "cuda": 2048}  # elements per chunk: several partial sums per sample
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
STEPS = {1: [(0.6, 0.3)], 2: [(1.0, 0.85), (0.25, 0.0)], 3: [(1.0, 0.85), (0.6, 0.3), (0.25, 0.0)]}
MODES = list(itertools.product(["sum", "mean"], [None, 4.5], ["own", "given"]))
# every dtype with every mode, every (shape, dtype) pair; half the cases in SMALL_CHUNK chunks (ragged last chunk)
CASES = [
    (SHAPES[(i + d) % len(SHAPES)], dtype, *mode, (i // 2 + d) % 2 == 1)
    for d, dtype in enumerate(DTYPES)
    for i, mode in enumerate(MODES)
]


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(
        fused, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)
    )


def _device(backend):
    device = torch.device("cuda" if backend == "cuda" or (backend == "triton" and GPU) else "cpu")
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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, dtype, reduction, guidance, which, chunked", CASES)
def test_log_prob_matches_normal(backend, shape, dtype, reduction, guidance, which, chunked, monkeypatch):
    device = _device(backend)
    if chunked and backend in SMALL_CHUNK:
        monkeypatch.setattr(fused, "_CHUNK_OVERRIDE", SMALL_CHUNK[backend])
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
    assert x_next.dtype == dtype and not lp.isnan().any() and not grad.isnan().any()
    if backend != "reference":
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


@pytest.mark.parametrize("backend", BACKENDS)
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_on_policy_ratio_is_exactly_one_with_mixed_dtypes(backend):
    """x in bf16 with fp32 noise: the step runs with fp32 rows but x_next is returned (and stored) in bf16, and the
    rollout's log-density is of that bf16 state (cuda, which stores x_next in the rows' dtype only, rounds it on
    the host and takes a second pass), so the recompute against it still gives a ratio of exactly 1."""
    device = _device(backend)
    x, v_student, _, noise, sigma, sigma_next = _inputs((3, 5, 7), torch.float32, device, None, seed=5)
    x = x.bfloat16()
    x_next, _, lp_rollout = ops.opd_step(
        x, v_student, None, noise, sigma, sigma_next, 0.7, backend=backend, log_prob=True
    )
    assert x_next.dtype == torch.bfloat16
    _, _, lp_train = ops.opd_step(
        x, v_student, None, noise, sigma, sigma_next, 0.7, backend=backend, log_prob=True, sample=x_next
    )
    assert torch.equal(lp_train, lp_rollout), lp_train - lp_rollout
    truth = normal_truth(x, v_student, x_next, sigma, sigma_next, 0.7, None, "sum")  # of the state it returned
    torch.testing.assert_close(lp_rollout.double().cpu(), truth, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("guidance", [None, 4.5])
def test_log_prob_gradient_alone(backend, guidance):
    """Only the log-density gets an upstream gradient (the loss is unused, its gradient None: the kernels take
    zeros for it), random per sample, against float64 autograd of torch.distributions.Normal."""
    device = _device(backend)
    x, v_student, v_teacher, noise, sigma, sigma_next = _inputs((2, 37, 24), torch.float32, device, guidance, seed=6)
    given = (x + 0.05 * noise).to(x.dtype)
    g = torch.randn(2, generator=torch.Generator().manual_seed(7)).to(device)
    kw = dict(student_guidance=guidance, log_prob=True, sample=given)
    grads = []
    for b in (backend, "reference"):
        leaf = v_student.detach().clone().requires_grad_(True)
        _, _, lp = ops.opd_step(x, leaf, v_teacher, noise, sigma, sigma_next, 0.7, backend=b, **kw)
        (g * lp).sum().backward()
        grads.append(leaf.grad)
    v64 = v_student.double().cpu().requires_grad_(True)
    truth = normal_truth(x, v64, given, sigma, sigma_next, 0.7, guidance, "sum")
    (g.double().cpu() * truth).sum().backward()
    _check(grads[0], grads[1], v64.grad, 1e-6 * v64.grad.abs().max().item())


def test_cpp_log_prob_is_the_same_on_any_number_of_threads(monkeypatch):
    """The log-density's sum is two-stage like the loss's: chunk boundaries from the caller, partials summed in
    chunk order, so one thread and several give the same bits."""
    device = _device("cpp")
    monkeypatch.setattr(fused, "_CHUNK_OVERRIDE", SMALL_CHUNK["cpp"])
    x, v_student, v_teacher, noise, sigma, sigma_next = _inputs((2, 37, 24), torch.float32, device, None)
    args = (x, v_student, v_teacher, noise, sigma, sigma_next, 0.7)
    threads = torch.get_num_threads()
    runs = []
    for n in (1, 2):
        torch.set_num_threads(n)
        try:
            runs.append(ops.opd_step(*args, backend="cpp", log_prob=True)[2])
        finally:
            torch.set_num_threads(threads)
    assert torch.equal(runs[0], runs[1])


def test_a_backend_without_log_prob_refuses_it_by_name(monkeypatch):
    """The guard for a fused backend that does not compute the log-density (none today): by name, with the ones
    that do, and "auto" steps around it."""
    monkeypatch.setattr(fused, "LOG_PROB_BACKENDS", ("triton", "cuda"))
    x, v_student, v_teacher, noise, sigma, sigma_next = _inputs((2, 4, 6, 6), torch.float32, "cpu", None)
    with pytest.raises(ValueError, match="the cpp backend does not compute log_prob; use one of 'reference', 'triton'"):
        ops.opd_step(x, v_student, v_teacher, noise, sigma, sigma_next, 0.7, backend="cpp", log_prob=True)
    with pytest.raises(ValueError, match="the cpp backend does not compute log_prob"):
        ops.LossSpec(0.7, backend="cpp", log_prob=True)
    assert ops.LossSpec.resolve(0.7, "cpu", log_prob=True).backend == "reference"


def test_a_stale_build_without_log_prob_is_refused(monkeypatch):
    """A csrc extension built before the log-density (an old in-place build) lacks HAS_LOG_PROB: asked for it, the
    op says to rebuild instead of failing on an unknown keyword."""
    _device("cpp")
    real_import = fused._import
    stale = type("StaleC", (), {"forward": None, "backward": None})
    monkeypatch.setattr(fused, "_import", lambda m: (stale, None) if m == "opd_fast._C" else real_import(m))
    x, v_student, v_teacher, noise, sigma, sigma_next = _inputs((2, 4, 6, 6), torch.float32, "cpu", None)
    with pytest.raises(RuntimeError, match=r"opd_fast._C was built before it computed log_prob: run `pip install"):
        ops.opd_step(x, v_student, v_teacher, noise, sigma, sigma_next, 0.7, backend="cpp", log_prob=True)


def test_auto_picks_a_backend_that_computes_log_prob():
    spec = ops.LossSpec.resolve(0.7, "cpu", log_prob=True)
    want = "cpp" if fused.backend_available("cpp", torch.device("cpu")) else "reference"
    assert spec.backend == want and spec.log_prob  # cpp, CPU's default, computes it in the step's pass
    if GPU and fused.backend_available("triton", torch.device("cuda")):
        assert ops.LossSpec.resolve(0.7, "cuda", log_prob=True).backend == "triton"


def test_sample_without_log_prob_is_refused():
    x, v_student, v_teacher, noise, sigma, sigma_next = _inputs((2, 4, 6, 6), torch.float32, "cpu", None)
    with pytest.raises(ValueError, match="pass log_prob=True"):
        ops.opd_step(x, v_student, v_teacher, noise, sigma, sigma_next, 0.7, backend="reference", sample=x)
