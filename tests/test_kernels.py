"""Every fused opd_step backend (cpp, triton, cuda) against a float64 twin of the reference (opd_step's naive.py).

TRITON_INTERPRET: on a machine without a CUDA device TRITON_INTERPRET=1 is set (by tests/conftest.py, and again
here at import so the module also runs alone) before anything imports opd_fast.ops.opd_step.triton, so the Triton
kernels run on CPU tensors in the interpreter. What matters is the moment `triton.jit` decorates the kernels (it
reads the variable then, triton 3.7), i.e. the first import of opd_fast.ops.opd_step.triton: importing torch, triton
or opd_fast earlier is harmless, since nothing in opd_fast imports the kernels on CPU unless the triton backend is
asked for. If some
earlier test did import them in compiled mode, the triton cases skip and say why. On a GPU machine the variable is
left alone and the compiled kernels run on CUDA tensors.

Tolerances follow flash-attention's rule: a backend may be at most twice as far from the float64 truth as the
reference computed in the same low dtype, plus a small floor relative to the output's scale.
Every kernel output is poisoned (allocated NaN-filled via fused._empty), so an element left unwritten fails.
"""

import itertools
import os
import zlib

import pytest
import torch

from opd_fast import ops
from opd_fast.ops.opd_step import fused, naive  # imports no triton: the kernels load on first use of "triton"

if not torch.cuda.is_available():  # tests/conftest.py does the same; repeated so this module also runs on its own
    os.environ.setdefault("TRITON_INTERPRET", "1")

GPU = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = {"cpp": "cpu", "triton": "cuda" if GPU else "cpu", "cuda": "cuda"}
SHAPES = [(3, 5, 7, 9), (2, 37, 24), (1, 4, 6, 6)]  # latents, packed FLUX-style tokens, B=1; N = 315, 888, 144
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NOISE_LEVELS = [0.7, 0.0]  # SDE, ODE
NORMS = list(naive.KL_NORMALIZATIONS)
REDUCTIONS = list(naive.REDUCTIONS)
GUIDANCE = [(None, None), (4.5, None), (None, 3.0), (4.5, 3.0)]  # (student, teacher)
# mixed per-sample steps (sigma, sigma_next) by batch size: sigma == 1 (first step), sigma_next == 0 (last step)
STEPS = {1: [(1.0, 0.0)], 2: [(1.0, 0.85), (0.25, 0.0)], 3: [(1.0, 0.85), (0.6, 0.3), (0.25, 0.0)]}
SMALL_CHUNK = {"cpp": 64, "triton": 256, "cuda": 2048}  # elements per chunk in "-chunked" cases (interpreter: few)
ATOL_REL = {"x_next": 1e-6, "loss": 1e-5, "grad": 1e-6, "log_prob": 1e-5}  # floor, relative to max |truth|

FULL = list(itertools.product(SHAPES, DTYPES, NOISE_LEVELS, NORMS, REDUCTIONS, GUIDANCE))
# The interpreter costs ~5 ms per program, so triton on CPU gets a covering subset: every dtype with every
# (noise, norm, reduction, guidance) combination, and every (shape, dtype) pair.
_MODES = list(itertools.product(NOISE_LEVELS, NORMS, REDUCTIONS, GUIDANCE))
COVERING = [
    (SHAPES[(i + d) % len(SHAPES)], dtype) + mode for d, dtype in enumerate(DTYPES) for i, mode in enumerate(_MODES)
]


def _case_id(backend, shape, dtype, noise_level, norm, red, guidance):
    cfg = "".join(s for s, g in zip("st", guidance) if g is not None) or "none"
    sde = "sde" if noise_level else "ode"
    return f"{backend}-{'x'.join(map(str, shape))}-{str(dtype)[6:]}-{sde}-{norm}-{red}-cfg_{cfg}"


def _params():
    """(backend, case..., chunked): about half the cases (by a hash of the id, stable across runs) split rows into
    SMALL_CHUNK-element chunks: several partial sums per sample and a ragged last chunk."""
    per_backend = {"cpp": FULL, "triton": FULL if GPU else COVERING, "cuda": FULL if GPU else FULL[:1]}
    params = []
    for backend, cases in per_backend.items():
        for case in cases:
            name = _case_id(backend, *case)
            chunked = zlib.crc32(name.encode()) % 2 == 1
            params.append(pytest.param(backend, *case, chunked, id=name + ("-chunked" if chunked else "")))
    return params


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    def nan_filled(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(fused, "_empty", nan_filled)


def _device_for(backend):
    if backend in ("cuda",) and not GPU:
        pytest.skip("needs a CUDA device")
    device = torch.device(DEVICE[backend])
    if not fused.backend_available(backend, device):
        pytest.skip(f"backend {backend!r} unavailable: {fused.why_unavailable(backend, device)}")
    return device


def _inputs(shape, dtype, device, guidance, seed=0):
    """x, v_student, v_teacher, noise (CFG-stacked where guided), sigma, sigma_next; no zeros anywhere."""
    gen = torch.Generator().manual_seed(seed)
    B = shape[0]

    def randn(rows, offset):
        return (torch.randn((rows,) + shape[1:], generator=gen) + offset).to(device=device, dtype=dtype)

    x = randn(B, 0.3)
    v_student = randn(2 * B if guidance[0] is not None else B, 0.2)
    v_teacher = randn(2 * B if guidance[1] is not None else B, -0.1)
    noise = randn(B, 0.1)
    sigma, sigma_next = torch.tensor(STEPS[B], device=device).unbind(1)
    return x, v_student, v_teacher, noise, sigma, sigma_next


def truth(x, v_student, v_teacher, noise, sigma, sigma_next, noise_level, norm, red, guidance):
    """naive.opd_step_reference in float64 (the reference itself computes in fp32 whatever its inputs): the same
    fp32 per-sample scalars from naive.py, the elementwise work and the sums in float64."""
    B = x.shape[0]
    x_coef, v_coef, sbar, std_t = naive.transition_coefficients(sigma, sigma_next, noise_level)
    w = naive.loss_weight(v_coef, sbar, std_t, x[0].numel(), norm, red)
    col = [c.double().view((B,) + (1,) * (x.dim() - 1)) for c in (x_coef, v_coef, sbar)]
    v_s = naive.apply_cfg(v_student.double(), guidance[0])
    v_t = naive.apply_cfg(v_teacher.double(), guidance[1])
    x_next = col[0] * x.double() + col[1] * v_s + col[2] * noise.double()
    loss = w.double() * (v_s - v_t).flatten(1).pow(2).sum(1)
    return x_next, loss


def _leaf(t, dtype=None):
    return t.detach().to(dtype or t.dtype).requires_grad_(True)


def _check(name, out, out_pt, ref, backend):
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert not out.isnan().any(), f"{name}: NaN (an element left unwritten?)"
    err = (out.double() - ref).abs().max().item()
    err_pt = (out_pt.double() - ref).abs().max().item()
    atol = ATOL_REL[name] * ref.abs().max().item() + 1e-30
    if backend == "triton" and INTERPRETED and out.dtype == torch.bfloat16:
        # The Triton interpreter casts fp32 -> bf16 by truncation (triton 3.7.1, interpreter.py cast_impl), compiled
        # Triton rounds to nearest even: allow one more bf16 ulp at the output's scale, in the interpreter only.
        atol += 2.0**-7 * ref.abs().max().item()
    assert err <= 2 * err_pt + atol, f"{name}: max error {err:.3e} > 2 * {err_pt:.3e} (reference) + {atol:.3e}"


def _compare(backend, device, shape, dtype, noise_level, norm, red, guidance, upstream="random", seed=0):
    x, v_student, v_teacher, noise, sigma, sigma_next = _inputs(shape, dtype, device, guidance, seed)
    args = (noise_level,)
    kwargs = {
        "kl_normalization": norm,
        "reduction": red,
        "student_guidance": guidance[0],
        "teacher_guidance": guidance[1],
    }
    B = shape[0]
    g = torch.randn(B, generator=torch.Generator().manual_seed(seed + 1)).to(device) + 0.5
    if upstream == "ones":
        g = torch.ones(B, device=device)

    vs64 = _leaf(v_student, torch.float64)
    x_ref, loss_ref = truth(x, vs64, v_teacher, noise, sigma, sigma_next, noise_level, norm, red, guidance)
    (loss_ref * g.double()).sum().backward()

    vs_pt = _leaf(v_student)
    x_pt, loss_pt = naive.opd_step_reference(x, vs_pt, v_teacher, noise, sigma, sigma_next, *args, **kwargs)
    (loss_pt * g).sum().backward()

    vs = _leaf(v_student)
    x_out, loss = ops.opd_step(x, vs, v_teacher, noise, sigma, sigma_next, *args, backend=backend, **kwargs)
    assert type(loss.grad_fn).__name__ == "OpdStepBackward", "the fused op did not run"
    if upstream == "ones":
        loss.sum().backward()  # a stride-0 expanded gradient of ones
    else:
        (loss * g).sum().backward()
    assert x_out.dtype == x.dtype and loss.dtype == torch.float32 and vs.grad.dtype == v_student.dtype
    assert not x_out.requires_grad

    _check("x_next", x_out, x_pt, x_ref, backend)
    _check("loss", loss, loss_pt, loss_ref.detach(), backend)
    _check("grad", vs.grad, vs_pt.grad, vs64.grad, backend)


@pytest.mark.parametrize("backend, shape, dtype, noise_level, norm, red, guidance, chunked", _params())
def test_backend_matches_reference(backend, shape, dtype, noise_level, norm, red, guidance, chunked, monkeypatch):
    device = _device_for(backend)
    if chunked:
        monkeypatch.setattr(fused, "_CHUNK_OVERRIDE", SMALL_CHUNK[backend])
    _compare(backend, device, shape, dtype, noise_level, norm, red, guidance)


@pytest.mark.parametrize("backend", ["cpp", "triton", "cuda"])
def test_all_ones_upstream_gradient(backend):
    """loss.sum().backward() hands the op a stride-0 expand of ones (the common training case)."""
    device = _device_for(backend)
    _compare(backend, device, (3, 5, 7, 9), torch.float32, 0.7, "exact", "sum", (4.5, 3.0), upstream="ones")


@pytest.mark.parametrize("backend", ["cpp", "triton", "cuda"])
def test_large_rows_default_chunks(backend):
    """N = 20480 with the backend's own chunking: a full and a ragged chunk on cpp (16384 per chunk), several
    chunks and the 16-byte vectorised path on cuda. Kept under torch's 32768-element grain so the reference runs
    single-threaded (two OpenMP threads on a loaded 2-core runner can be 100x slower)."""
    device = _device_for(backend)
    _compare(backend, device, (1, 5, 64, 64), torch.bfloat16, 0.7, "exact", "mean", (None, None))


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpp_baseline_converters(dtype):
    """The CPU extension's baseline-ISA dtype converters, which an AVX2 machine otherwise never runs."""
    device = _device_for("cpp")
    ext = fused._import("opd_fast._C")[0]
    was = ext.simd_avx2()
    ext.simd_avx2(False)
    try:
        assert not ext.simd_avx2()
        _compare("cpp", device, (3, 5, 7, 9), dtype, 0.7, "exact", "sum", (4.5, 3.0))
        _compare_log_prob("cpp", device, (3, 5, 7, 9), dtype, 0.7, "sum", 4.5, own_sample=True)
    finally:
        ext.simd_avx2(was)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_loss_is_deterministic(backend, monkeypatch):
    device = _device_for(backend)
    monkeypatch.setattr(fused, "_CHUNK_OVERRIDE", SMALL_CHUNK[backend])
    x, v_s, v_t, noise, sigma, sigma_next = _inputs((2, 37, 24), torch.float32, device, (None, None))
    runs = [ops.opd_step(x, v_s, v_t, noise, sigma, sigma_next, 0.7, backend=backend)[1] for _ in range(2)]
    if backend == "cpp":  # chunk boundaries do not depend on the thread count, so neither does the sum order
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            runs.append(ops.opd_step(x, v_s, v_t, noise, sigma, sigma_next, 0.7, backend=backend)[1])
        finally:
            torch.set_num_threads(threads)
    assert all(torch.equal(runs[0], r) for r in runs[1:])


@pytest.mark.parametrize("backend", ["cpp", "triton", "cuda"])
def test_mixed_float64_and_strided_inputs(backend):
    """float64 runs as fp32 (as the reference does); x bf16 with fp32 noise; v_student bf16 with an fp32 v_teacher;
    a non-contiguous v_student; only v_student gets a gradient."""
    device = _device_for(backend)
    x, v_s, v_t, noise, sigma, sigma_next = _inputs((2, 4, 6, 6), torch.float32, device, (None, None))
    cases = [
        (x.double(), v_s.double(), v_t.double(), noise.double()),
        (x.bfloat16(), v_s, v_t.bfloat16(), noise),
        (x, v_s.bfloat16(), v_t, noise),  # a bf16 student under an fp32 teacher: the teacher is not rounded
        (x, v_s.transpose(2, 3).contiguous().transpose(2, 3), v_t, noise),
    ]
    for x_in, vs_in, vt_in, n_in in cases:
        vs_ref, vs_out, vt_out = _leaf(vs_in), _leaf(vs_in), _leaf(vt_in)
        x_ref, loss_ref = naive.opd_step_reference(x_in, vs_ref, vt_in, n_in, sigma, sigma_next, 0.7)
        x_out, loss = ops.opd_step(x_in, vs_out, vt_out, n_in, sigma, sigma_next, 0.7, backend=backend)
        loss_ref.sum().backward()
        loss.sum().backward()
        assert x_out.dtype == x_in.dtype and vs_out.grad.dtype == vs_in.dtype and vt_out.grad is None
        torch.testing.assert_close(x_out, x_ref, rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(loss, loss_ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(vs_out.grad, vs_ref.grad, rtol=1e-3, atol=1e-3)


def log_prob_truth(x, v_student, sample, sigma, sigma_next, noise_level, guidance, red):
    """The log-density of naive.py in float64 (fp32 per-sample scalars, as every backend uses): scale * sum (x' -
    mu_S)^2 + const; x' = sample. On x's device, differentiable in v_student."""
    B = x.shape[0]
    x_coef, v_coef, sbar, _ = naive.transition_coefficients(sigma, sigma_next, noise_level)
    scale, const = naive.log_prob_scalars(sbar, x[0].numel(), red)
    col = [c.double().view((B,) + (1,) * (x.dim() - 1)) for c in (x_coef, v_coef)]
    mean = col[0] * x.double() + col[1] * naive.apply_cfg(v_student.double(), guidance)
    return scale.double() * (sample.double() - mean).flatten(1).pow(2).sum(1) + const.double()


LOG_PROB_CASES = list(itertools.product(SHAPES + [(3, 5, 7)], DTYPES, NOISE_LEVELS, REDUCTIONS, [None, 4.5]))


def _log_prob_params():
    params = []
    for backend in ("cpp", "cuda"):
        for case in LOG_PROB_CASES if backend == "cpp" or GPU else LOG_PROB_CASES[:1]:
            shape, dtype, noise_level, red, guidance = case
            name = _case_id(backend, shape, dtype, noise_level, "lp", red, (guidance, None))
            chunked = zlib.crc32(name.encode()) % 2 == 1
            params.append(pytest.param(backend, *case, chunked, id=name + ("-chunked" if chunked else "")))
    return params


def _compare_log_prob(backend, device, shape, dtype, noise_level, red, guidance, own_sample, seed=0):
    """x_next, loss, log_prob and the gradient of loss + g * log_prob (random g) against the float64 truth, with the
    reference's distance from it in the same dtype as the yardstick (flash-attention's rule, _check)."""
    x, v_student, v_teacher, noise, sigma, sigma_next = _inputs(shape, dtype, device, (guidance, None), seed)
    sample = None if own_sample else (x + 0.05 * noise).to(dtype)  # an off-policy stored state
    B = shape[0]
    g = torch.randn(B, generator=torch.Generator().manual_seed(seed + 2)).to(device) + 0.5
    kw = dict(reduction=red, student_guidance=guidance, log_prob=True, sample=sample)

    def run(b):
        leaf = _leaf(v_student)
        x_next, loss, lp = ops.opd_step(x, leaf, v_teacher, noise, sigma, sigma_next, noise_level, backend=b, **kw)
        (loss + g * lp).sum().backward()
        return x_next, loss, lp, leaf

    x_out, loss, lp, vs = run(backend)
    x_pt, loss_pt, lp_pt, vs_pt = run("reference")
    assert type(lp.grad_fn).__name__ == "OpdStepBackward", "the fused op did not run"
    assert lp.dtype == torch.float32 and x_out.dtype == dtype and vs.grad.dtype == dtype

    vs64 = _leaf(v_student, torch.float64)
    x_ref, loss_ref = truth(x, vs64, v_teacher, noise, sigma, sigma_next, noise_level, "exact", red, (guidance, None))
    steps = (sigma, sigma_next, noise_level, guidance, red)
    lp_ref = log_prob_truth(x, vs64, x_out if own_sample else sample, *steps)  # the backend's own state, or the given
    ((loss_ref + lp_ref) * g.double()).sum().backward()
    # the reference's log-density is of its own x_next: its distance from the truth of that state is the yardstick
    lp_pt_err = lp_pt.double() - log_prob_truth(x, v_student, x_pt if own_sample else sample, *steps)
    _check("x_next", x_out, x_pt, x_ref, backend)
    _check("loss", loss, loss_pt, loss_ref.detach(), backend)
    _check("log_prob", lp, lp_ref.detach() + lp_pt_err, lp_ref.detach(), backend)
    _check("grad", vs.grad, vs_pt.grad, vs64.grad, backend)
    if noise_level == 0:  # an ODE step carries no likelihood
        assert torch.equal(lp, torch.zeros(B, device=device))


@pytest.mark.parametrize("backend, shape, dtype, noise_level, red, guidance, chunked", _log_prob_params())
def test_log_prob_matches_reference(backend, shape, dtype, noise_level, red, guidance, chunked, monkeypatch):
    """The log-density in the step's pass (log_prob=True) on cpp and cuda, of a given stored state, against the
    float64 truth; poisoned outputs catch an unwritten partial sum. tests/test_logprob.py holds every backend
    against torch.distributions.Normal and the exact on-policy ratio."""
    device = _device_for(backend)
    if chunked:
        monkeypatch.setattr(fused, "_CHUNK_OVERRIDE", SMALL_CHUNK[backend])
    _compare_log_prob(backend, device, shape, dtype, noise_level, red, guidance, own_sample=False)


@pytest.mark.parametrize("backend", ["cpp", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_log_prob_of_its_own_state_large_rows(backend, dtype):
    """N = 20480 with the backend's own chunking, x' = x_next as stored: on cuda the 16-byte vector path (N % 8 ==
    0) over several chunks, the rounding of x_next in registers; on cpp a full and a ragged chunk."""
    device = _device_for(backend)
    _compare_log_prob(backend, device, (1, 5, 64, 64), dtype, 0.7, "mean", 4.5, own_sample=True)


@pytest.mark.parametrize("norm, red", list(itertools.product(NORMS, REDUCTIONS)))
@pytest.mark.parametrize("noise_level", NOISE_LEVELS)
def test_truth_is_the_reference(noise_level, norm, red):
    """The float64 twin above agrees with naive.opd_step_reference (fp32) to fp32 accuracy."""
    guidance = (4.5, 3.0)
    x, v_s, v_t, noise, sigma, sigma_next = _inputs((3, 5, 7, 9), torch.float32, "cpu", guidance)
    kwargs = {"kl_normalization": norm, "reduction": red, "student_guidance": 4.5, "teacher_guidance": 3.0}
    x_pt, loss_pt = naive.opd_step_reference(x, v_s, v_t, noise, sigma, sigma_next, noise_level, **kwargs)
    x_ref, loss_ref = truth(x, v_s, v_t, noise, sigma, sigma_next, noise_level, norm, red, guidance)
    torch.testing.assert_close(x_pt.double(), x_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_pt.double(), loss_ref, rtol=1e-5, atol=1e-5)


def test_auto_uses_cpp_on_cpu():
    if not fused.backend_available("cpp", torch.device("cpu")):
        pytest.skip(f"opd_fast._C unavailable: {fused.why_unavailable('cpp', 'cpu')}")
    assert ops.resolve_backend("auto", "cpu") == "cpp"
    x, v_s, v_t, noise, sigma, sigma_next = _inputs((2, 4, 6, 6), torch.float32, "cpu", (None, None))
    _, loss = ops.opd_step(x, v_s.requires_grad_(), v_t, noise, sigma, sigma_next, 0.7)
    assert type(loss.grad_fn).__name__ == "OpdStepBackward"
    assert ops.resolve_backend("auto", "cpu", estimator="ppo") == "reference"


def test_unavailable_backend_raises_the_reason(monkeypatch):
    x, v_s, v_t, noise, sigma, sigma_next = _inputs((2, 4, 6, 6), torch.float32, "cpu", (None, None))
    if torch.version.cuda is None:
        with pytest.raises(RuntimeError, match="needs a CUDA build of torch"):
            ops.opd_step(x, v_s, v_t, noise, sigma, sigma_next, 0.7, backend="cuda")
    with pytest.raises(RuntimeError, match="runs on CUDA tensors only|needs a CUDA build of torch|not built"):
        ops.opd_step(x, v_s, v_t, noise, sigma, sigma_next, 0.7, backend="cuda")

    real_import = fused._import
    monkeypatch.setattr(
        fused, "_import", lambda m: (None, "ImportError: gone") if m == "opd_fast._C" else real_import(m)
    )
    with pytest.raises(RuntimeError, match=r"opd_fast._C is not built: run `pip install --no-build-isolation -e \.`"):
        ops.opd_step(x, v_s, v_t, noise, sigma, sigma_next, 0.7, backend="cpp")
    assert ops.resolve_backend("auto", "cpu") == "reference"

    kernels = real_import("opd_fast.ops.opd_step.triton")[0]
    if kernels is not None:
        monkeypatch.setattr(kernels, "INTERPRETED", False)
        with pytest.raises(RuntimeError, match="triton on CPU tensors needs TRITON_INTERPRET=1"):
            ops.opd_step(x, v_s, v_t, noise, sigma, sigma_next, 0.7, backend="triton")


@pytest.mark.parametrize("noise_level", NOISE_LEVELS)
@pytest.mark.parametrize("norm,red", [("exact", "sum"), ("official", "mean")])
def test_coefficient_table_holds_each_steps_scalars_bit_for_bit(noise_level, norm, red):
    """The trainer's table (made once per run on the host) is what step_coefficients computes at every step of the
    grid, first step (sigma == 1) and last (sigma_next == 0) included, for every sample of the batch."""
    from opd_fast.families import get_family
    from opd_fast.schedule import sigma_grid

    sigmas = sigma_grid(get_family("sd3"), 10, 3.0)
    spec = ops.LossSpec(noise_level, norm, red)
    table = spec.coefficient_table(sigmas, 4096, 3, "cpu")
    assert table.shape == (10, 4, 3) and table.is_contiguous()
    for j in range(10):
        want = fused.step_coefficients(spec, sigmas[j].expand(3), sigmas[j + 1].expand(3), 4096)
        torch.testing.assert_close(table[j], want, rtol=0, atol=0)


def test_fused_op_with_the_table_row_gives_the_op_without_it():
    if not fused.backend_available("cpp", torch.device("cpu")):
        pytest.skip(f"opd_fast._C unavailable: {fused.why_unavailable('cpp', 'cpu')}")
    from opd_fast.families import get_family
    from opd_fast.schedule import sigma_grid

    sigmas = sigma_grid(get_family("sd3"), 10, 3.0)
    spec = ops.LossSpec.resolve(0.7, "cpu", backend="cpp")
    x, v_s, v_t, noise, _, _ = _inputs((2, 4, 6, 6), torch.float32, "cpu", (None, None))
    table = spec.coefficient_table(sigmas, x[0].numel(), 2, "cpu")
    for j in (0, 4, 9):
        sigma, sigma_next = sigmas[j].expand(2), sigmas[j + 1].expand(2)
        plain = ops.opd_step(x, v_s, v_t, noise, sigma, sigma_next, 0.7, backend="cpp")
        tabled = spec.step(x, v_s, v_t, noise, sigma, sigma_next, coef=table[j])
        for a, b in zip(plain, tabled):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_loss_spec_refuses_unknown_modes_by_name():
    for kwargs, name in (
        ({"kl_normalization": "kl"}, "kl_normalization"),
        ({"reduction": "max"}, "reduction"),
        ({"estimator": "dpo"}, "estimator"),
        ({"backend": "auto"}, "backend"),
    ):
        with pytest.raises(ValueError, match=f"^{name} must be one of"):
            ops.LossSpec(0.7, **kwargs)
