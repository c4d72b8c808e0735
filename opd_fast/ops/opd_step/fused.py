"""Fused backends of opd_step: one pass forward (x_next and the per-sample loss), one pass backward (dL/dv_student).

    triton  opd_fast.ops.opd_step.triton (triton.py beside this file): CUDA tensors; CPU tensors only under
            TRITON_INTERPRET=1 set before that module is imported (the interpreter is slow, so it is never picked
            automatically)
    cuda    opd_fast._C_cuda (csrc/opd_step_cuda.cu + csrc/opd_step_cuda_binding.cpp): CUDA tensors
    cpp     opd_fast._C (csrc/opd_step_cpu.cpp, OpenMP): CPU tensors; the fast path for CPU training

Each backend is a module (KERNEL_MODULES, imported on first use) with forward and backward launchers of one calling
convention. The per-sample scalars (x_coef, v_coef, sbar, w) are computed here in torch with naive.py's math, so
every backend shares one scalar math and the kernels only do the elementwise work and the per-sample reduction (see
OpdStep). The loss's modes arrive as one LossSpec (opd_fast/ops/opd_step/__init__.py). Every backend also computes
the log-density of the next state in the same pass when asked (OpdStep, log_prob_scalars).
"""

from __future__ import annotations

import functools
import importlib

import torch
from torch.autograd.function import once_differentiable

from opd_fast.ops.opd_step import naive

# backend -> the module of its kernels; each has forward(...) and backward(...) as documented at `launchers`
KERNEL_MODULES = {"triton": "opd_fast.ops.opd_step.triton", "cuda": "opd_fast._C_cuda", "cpp": "opd_fast._C"}
FUSED_BACKENDS = tuple(KERNEL_MODULES)
# Fused backends whose launchers also compute the log-density (sq, sq_partial, sample / x, sample, grad_sq keywords;
# their modules say so with HAS_LOG_PROB, which a stale build of a csrc extension lacks).
LOG_PROB_BACKENDS = ("triton", "cpp", "cuda")
# Fused backends whose forward stores x_next in any kernel dtype; cuda stores it in x's row dtype only (see OpdStep).
_ANY_OUT_DTYPE = ("triton", "cpp")
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BUILD_HINT = "run `pip install --no-build-isolation -e .` in the repository"

# Elements per (sample, chunk) program/task. Tests lower it to force several chunks and ragged ends.
_CHUNK_OVERRIDE: int | None = None
_CPP_CHUNK = 16384  # 64 KiB of fp32 per operand per task: enough tasks to balance threads, few partials
_INTERPRET_MAX_BLOCK = 1 << 16  # the interpreter costs milliseconds per program, little per element: few, big


def _empty(shape, dtype, device) -> torch.Tensor:
    """Allocates every kernel output. Tests swap in a NaN-filled allocator so an element left unwritten fails."""
    return torch.empty(shape, dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------- availability


@functools.cache
def _import(module: str):
    """(module, None) or (None, the import error as text). Cached: a failed import is not retried per call."""
    try:
        return importlib.import_module(module), None
    except Exception as exc:  # noqa: BLE001 - whatever breaks the import (a .so built against another torch, a
        # triton that fails with this numpy) makes the backend unavailable, with the reason, instead of crashing
        return None, f"{type(exc).__name__}: {exc}"


def backend_order(device: torch.device) -> list[str]:
    """Fused backends worth trying on `device`, fastest first (before availability is checked)."""
    device = torch.device(device)
    if device.type == "cuda":
        return ["triton", "cuda"]  # triton first until measured otherwise: bench/gpu_check.py times both
    if device.type == "cpu":
        return ["cpp"]  # triton on CPU is the interpreter: correct but slow, tests only, never picked automatically
    return []


def backend_available(name: str, device: torch.device) -> bool:
    return _reason(name, torch.device(device)) is None


def why_unavailable(name: str, device: torch.device | None = None) -> str:
    """Why backend `name` cannot run (on `device`, when given; otherwise what it needs)."""
    reason = _reason(name, None if device is None else torch.device(device))
    return reason if reason is not None else f"{name} is available on {device}"


def _reason(name: str, device: torch.device | None) -> str | None:
    if name not in KERNEL_MODULES:
        return f"unknown fused backend {name!r}; fused backends are {FUSED_BACKENDS}"
    module = KERNEL_MODULES[name]
    if name == "cpp":
        if _import(module)[0] is None:
            return f"{module} is not built: {_BUILD_HINT} (needs a C++ compiler); {_import(module)[1]}"
        if device is None or device.type != "cpu":
            return f"the cpp backend ({module}) runs on CPU tensors only"
        return None
    if name == "cuda":
        if torch.version.cuda is None:
            return f"{module} needs a CUDA build of torch (this torch {torch.__version__} is CPU-only)"
        if _import(module)[0] is None:
            return (
                f"{module} is not built: {_BUILD_HINT} with CUDA_HOME pointing at a CUDA toolkit; {_import(module)[1]}"
            )
        if not torch.cuda.is_available():
            return "no CUDA device is visible"
        if device is None or device.type != "cuda":
            return f"the cuda backend ({module}) runs on CUDA tensors only"
        return None
    kernels, err = _import(module)  # triton
    if kernels is None:
        return f"triton is not installed or {module} failed to import ({err})"
    if kernels.INTERPRETED:
        return None  # the interpreter takes CPU and CUDA tensors
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        return None
    return (
        f"triton on CPU tensors needs TRITON_INTERPRET=1 set before {module} (and triton.jit) is imported; "
        "compiled triton runs on CUDA tensors only"
    )


# ---------------------------------------------------------------------------------------------- backends


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _gpu_chunk(B: int, N: int, device: torch.device, largest: int, smallest: int) -> int:
    """Largest power-of-2 multiple of `smallest` up to `largest` that still gives >= 4 programs per SM (when it can):
    big programs amortise index math, but a (4, 16, 64, 64) batch at 4096 per program would leave SMs idle."""
    target = 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    chunk = largest
    while chunk > smallest and B * -(-N // chunk) < target:
        chunk //= 2
    return chunk


def _triton_chunk(B: int, N: int, device: torch.device) -> int:
    import triton

    if _CHUNK_OVERRIDE is not None:
        return triton.next_power_of_2(_CHUNK_OVERRIDE)
    if device.type != "cuda":
        return min(triton.next_power_of_2(N), _INTERPRET_MAX_BLOCK)
    return _gpu_chunk(B, N, device, largest=min(4096, triton.next_power_of_2(N)), smallest=512)


def _cuda_chunk(B: int, N: int, device: torch.device) -> int:
    quantum = _import(KERNEL_MODULES["cuda"])[0].CHUNK_QUANTUM
    if _CHUNK_OVERRIDE is not None:
        return -(-_CHUNK_OVERRIDE // quantum) * quantum
    return _gpu_chunk(B, N, device, largest=4 * quantum, smallest=quantum)


def _cpp_chunk(B: int, N: int, device: torch.device) -> int:
    return _CHUNK_OVERRIDE if _CHUNK_OVERRIDE is not None else _CPP_CHUNK


_CHUNK_RULES = {"triton": _triton_chunk, "cuda": _cuda_chunk, "cpp": _cpp_chunk}


def launchers(name: str):
    """(chunk(B, N, device), forward, backward) of fused backend `name` (available: see backend_available). The
    launchers of every backend share one calling convention, on (rows, N) contiguous tensors, outputs preallocated:
        forward(x, v_student, v_teacher, noise | None, coef, student_guidance, teacher_guidance, x_next, partial,
                loss, chunk, *, sq=None, sq_partial=None, sample=None)
        backward(v_student, v_teacher, coef, grad_loss, student_guidance, teacher_guidance, grad, chunk, *, x=None,
                 sample=None, grad_sq=None)
    The keywords are the log-density's (LOG_PROB_BACKENDS): sq (B,) and sq_partial (like partial) float32 outputs
    of sum_n (x' - mu_S)^2, x' = sample or x_next as stored; grad_sq (B,) float32 its upstream gradient."""
    kernels = _import(KERNEL_MODULES[name])[0]
    return _CHUNK_RULES[name], kernels.forward, kernels.backward


def _kernel_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """One storage dtype for a pair of operands (x and noise; v_student and v_teacher). Anything outside
    fp32/bf16/fp16 (float64) runs as fp32, which is what the reference (naive.py) computes in anyway."""
    dtype = torch.promote_types(a, b)
    return dtype if dtype in _KERNEL_DTYPES else torch.float32


def _as_rows(t: torch.Tensor, rows: int, dtype: torch.dtype) -> torch.Tensor:
    """(rows, N) contiguous view of t in dtype: free when t already is contiguous in that dtype."""
    return t.detach().to(dtype).contiguous().view(rows, -1)


class OpdStep(torch.autograd.Function):
    """Fused OPD step. Per sample b, with v_s, v_t the velocities (CFG-guided in registers when a guidance is set:
    v = v_u + gw (v_c - v_u) from a (2B, ...) = [uncond; cond] input) and coef = (x_coef, v_coef, sbar, w) (4, B):

        x_next[b] = x_coef[b] x[b] + v_coef[b] v_s[b] + sbar[b] noise[b]        (x.dtype, no gradient)
        loss[b]   = w[b] sum_n (v_s[b] - v_t[b])^2                              (float32)
        dL/dv_s   = 2 w[b] g[b] (v_s[b] - v_t[b]);   with CFG: dv_u = (1 - gw) dv_s, dv_c = gw dv_s

    All arithmetic in fp32 whatever the storage dtype. noise=None means it is not read (ODE: every sbar is 0).
    Only v_student gets a gradient (the teacher is a constant; x's terms cancel in mu_S - mu_T).

    With log_prob_scalars = (scale, const) (B,) float32 (naive.log_prob_scalars) a third output is returned:

        log_prob[b] = scale[b] sum_n (x'[b] - mu_S[b])^2 + const[b]        x' = sample, or x_next as stored
        dL/dv_s    += g_lp[b] scale[b] (-2 v_coef[b]) (x'[b] - mu_S[b])
    """

    @staticmethod
    def forward(
        ctx,
        x,
        v_student,
        v_teacher,
        noise,
        coef,
        backend,
        student_guidance,
        teacher_guidance,
        log_prob_scalars=None,
        sample=None,
    ):
        chunk_fn, forward, _ = launchers(backend)
        B, device = x.shape[0], x.device
        x_dtype = _kernel_dtype(x.dtype, x.dtype if noise is None else noise.dtype)
        v_dtype = _kernel_dtype(v_student.dtype, v_teacher.dtype)
        x_rows = _as_rows(x, B, x_dtype)
        N = x_rows.shape[1]
        v_student_rows = _as_rows(v_student, v_student.shape[0], v_dtype)
        v_teacher_rows = _as_rows(v_teacher, v_teacher.shape[0], v_dtype)
        noise_rows = None if noise is None else _as_rows(noise, B, x_dtype)
        chunk = chunk_fn(B, N, device)

        log_prob = log_prob_scalars is not None
        if log_prob and not getattr(_import(KERNEL_MODULES[backend])[0], "HAS_LOG_PROB", False):
            raise RuntimeError(f"{KERNEL_MODULES[backend]} was built before it computed log_prob: {_BUILD_HINT}")
        # log_prob: x_next is written in the dtype it is returned in, so the residual of the log-density is taken
        # against exactly the state a caller keeps and later passes back as `sample`
        out_dtype = x.dtype if log_prob and x.dtype in _KERNEL_DTYPES else x_dtype
        sample_rows = None if sample is None else _as_rows(sample, B, x_dtype)  # x' as a rollout would have stored it
        partial = _empty((B, -(-N // chunk)), torch.float32, device)
        loss = _empty((B,), torch.float32, device)
        step = (x_rows, v_student_rows, v_teacher_rows, noise_rows, coef, student_guidance, teacher_guidance)
        if out_dtype != x_dtype and backend not in _ANY_OUT_DTYPE:
            # cuda stores x_next in x's row dtype only (here x is 16-bit, its noise fp32): a first pass makes x_next,
            # rounded here to the dtype it is returned in, and the log-density is taken against that as a given
            # sample. A mixed-dtype corner: its second pass is cheaper than a kernel per output dtype.
            out_dtype = x_dtype
            if sample_rows is None:
                first = _empty((B, N), x_dtype, device)
                forward(*step, first, partial, loss, chunk)
                sample_rows = first.to(x.dtype).to(x_dtype)
        x_next = _empty((B, N), out_dtype, device)
        extra = {}
        if log_prob:
            extra = dict(
                sq=_empty((B,), torch.float32, device),
                sq_partial=_empty(partial.shape, torch.float32, device),
                sample=sample_rows,
            )
        forward(*step, x_next, partial, loss, chunk, **extra)

        saved = [v_student_rows, v_teacher_rows, coef]  # the backward re-reads the velocities
        if log_prob:  # ... and for the log-density the state, x' and the scale
            saved += [x_rows, x_next if sample_rows is None else sample_rows, log_prob_scalars[0]]
        ctx.save_for_backward(*saved)
        ctx.backend, ctx.chunk, ctx.log_prob = backend, chunk, log_prob
        ctx.guidance = (student_guidance, teacher_guidance)
        ctx.v_student_meta = (v_student.shape, v_student.dtype)
        ctx.set_materialize_grads(False)
        x_next = x_next.view(x.shape).to(x.dtype)
        ctx.mark_non_differentiable(x_next)
        if not log_prob:
            return x_next, loss
        scale, const = log_prob_scalars
        return x_next, loss, scale * extra["sq"] + const

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_x_next, grad_loss, grad_log_prob=None):
        none = (None,) * 10
        if (grad_loss is None and grad_log_prob is None) or not ctx.needs_input_grad[1]:
            return none
        _, _, backward = launchers(ctx.backend)
        v_student_rows, v_teacher_rows, coef = ctx.saved_tensors[:3]
        B = coef.shape[1]
        if grad_loss is None:
            grad_loss = torch.zeros(B, device=coef.device)
        extra = {}
        if ctx.log_prob and grad_log_prob is not None:
            x_rows, sample_rows, scale = ctx.saved_tensors[3:]
            extra = dict(x=x_rows, sample=sample_rows, grad_sq=(grad_log_prob.float() * scale).contiguous())
        grad = _empty(v_student_rows.shape, v_student_rows.dtype, v_student_rows.device)
        # grad_loss keeps its strides: loss.sum() gives a stride-0 expand of ones, which the kernels read as is.
        backward(v_student_rows, v_teacher_rows, coef, grad_loss.float(), *ctx.guidance, grad, ctx.chunk, **extra)
        shape, dtype = ctx.v_student_meta
        return (None, grad.view(shape).to(dtype)) + none[2:]


_COEF_CACHE: dict[tuple, torch.Tensor] = {}
_COEF_CACHE_SIZE = 256


def step_coefficients(spec, sigma, sigma_next, numel, cache=True):
    """(4, B) float32 = x_coef, v_coef, sbar, w with naive.py's math (transition_coefficients, loss_weight) under
    the modes of `spec` (a LossSpec): the one scalar math of all backends.

    For CPU sigmas the result is memoised by value: a sampling grid has a handful of distinct steps, and these ~15
    tiny torch ops cost as much as the fused CPU kernel itself at 512 px. CUDA sigmas are recomputed every time
    (reading their values would synchronise the device). The cached tensor is only ever read.
    """
    key = None
    if cache and sigma.device.type == "cpu" and sigma_next.device.type == "cpu":
        key = (tuple(sigma.tolist()), tuple(sigma_next.tolist()), float(spec.noise_level), numel)
        key += (spec.kl_normalization, spec.reduction)
        if (coef := _COEF_CACHE.get(key)) is not None:
            return coef
    x_coef, v_coef, sbar, std_t = naive.transition_coefficients(sigma, sigma_next, spec.noise_level)
    w = naive.loss_weight(v_coef, sbar, std_t, numel, spec.kl_normalization, spec.reduction)
    coef = torch.stack([x_coef, v_coef, sbar, w]).contiguous()
    if key is not None:
        if len(_COEF_CACHE) >= _COEF_CACHE_SIZE:
            _COEF_CACHE.clear()
        _COEF_CACHE[key] = coef
    return coef


_LOG_PROB_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def log_prob_scalars(spec, coef, numel):
    """naive.log_prob_scalars of this step's sbar (coef[2]) under `spec`'s reduction. Memoised by value for CPU
    coefficients, like step_coefficients: its ~10 tiny torch ops cost as much as the cpp kernel's log-density at
    512 px (measured: 23 of the 39 us the log-density added per call). The cached tensors are only ever read."""
    key = None
    if coef.device.type == "cpu":
        key = (tuple(coef[2].tolist()), numel, spec.reduction)
        if (scalars := _LOG_PROB_CACHE.get(key)) is not None:
            return scalars
    scalars = naive.log_prob_scalars(coef[2], numel, spec.reduction)
    if key is not None:
        if len(_LOG_PROB_CACHE) >= _COEF_CACHE_SIZE:
            _LOG_PROB_CACHE.clear()
        _LOG_PROB_CACHE[key] = scalars
    return scalars


def opd_step_fused(
    spec,
    x,
    v_student,
    v_teacher,
    noise,
    sigma,
    sigma_next,
    *,
    student_guidance=None,
    teacher_guidance=None,
    coef=None,
    log_prob=False,
    sample=None,
):
    """opd_step on the fused backend and with the modes of `spec` (a LossSpec whose backend opd_step's dispatch
    resolved, availability checked). coef: the (4, B) per-sample scalars when the caller has them
    (LossSpec.coefficient_table); else computed here. v_teacher None: the student's own velocity stands in (the
    loss is then exactly 0). log_prob: a third output, the log-density (OpdStep)."""
    if spec.backend not in KERNEL_MODULES:
        raise ValueError(f"unknown fused backend {spec.backend!r}; fused backends are {FUSED_BACKENDS}")
    if coef is None:
        coef = step_coefficients(spec, sigma.to(x.device), sigma_next.to(x.device), x[0].numel())
    if v_teacher is None:
        v_teacher, teacher_guidance = v_student.detach(), student_guidance
    # noise_level == 0 makes every sbar exactly 0: skip reading noise (a fifth of the forward's traffic)
    noise = noise if float(spec.noise_level) != 0 else None
    scalars = log_prob_scalars(spec, coef, x[0].numel()) if log_prob else None
    args = (x, v_student, v_teacher, noise, coef, spec.backend, student_guidance, teacher_guidance)
    if not log_prob:
        return OpdStep.apply(*args)
    return OpdStep.apply(*args, scalars, sample)
