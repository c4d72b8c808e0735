"""Triton kernels of the fused OPD step (one transition + its KL), forward and backward.

Each sample is one contiguous row of N elements (B, C, H, W latents and packed (B, tokens, D) FLUX latents look
the same here). Per-sample scalars come precomputed by the host as a (4, B) float32 tensor `coef` with rows
x_coef, v_coef, sbar, w (naive.transition_coefficients / loss_weight, via fused.step_coefficients), so every backend
shares the same scalar math. With v_s, v_t the (optionally CFG-guided) velocities, all in fp32 registers:

    forward   x_next[b]  = x_coef[b] * x + v_coef[b] * v_s + sbar[b] * noise        (stored in x's dtype)
              loss[b]    = w[b] * sum_n (v_s - v_t)^2                                (float32)
    backward  dv_s[b]    = 2 w[b] g[b] (v_s - v_t)                                   (v_student's dtype)
    CFG       v = v_u + gw (v_c - v_u), v given as (2B, N) = [uncond; cond]; dv_u = (1 - gw) dv, dv_c = gw dv
    log-prob  sq[b]      = sum_n (x' - mu_S)^2, mu_S = x_coef x + v_coef v_s         (LOG_PROB; float32)
              x' = the given sample, or x_next as stored (rounded to its dtype): a recompute against the stored
              state then sees the very residual the rollout saw; the host turns sq into log p (naive.py)
              dv_s[b] += gq[b] * (-2 v_coef[b]) (x' - mu_S)                          gq: the gradient of sq

The per-sample sum runs in two deterministic stages: the forward grid (chunks, B) writes one fp32 partial sum per
(sample, chunk), then a (B,) grid sums each row of partials in a fixed order. fp32 atomic_add into `loss` would
save that tiny second launch, but the sum order would then depend on scheduling and the loss (hence logged
numbers and the gradients downstream of it) would change from run to run; reproducibility wins.

Offsets are int64 (a (8, 16, 128, 128) bf16 latent is 2M elements per tensor, but a FLUX batch or a CFG-stacked
(2B, N) velocity can pass 2^31 elements). Block size is chosen by the host (no autotune: it needs a GPU to
benchmark and fails under TRITON_INTERPRET=1). Set TRITON_INTERPRET=1 before this module is imported to run the
kernels on CPU tensors: `triton.jit` decides compiled vs interpreted when it decorates (INTERPRETED says which).
The launchers `forward` and `backward` share their calling convention with the csrc extensions (fused.launchers).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _load_velocity(ptr, uncond_row, cond_row, offs, mask, guidance, CFG: tl.constexpr):
    """fp32 velocity of one tile: v_u + guidance * (v_c - v_u) when CFG, else the plain row."""
    v = tl.load(ptr + uncond_row + offs, mask=mask, other=0.0).to(tl.float32)
    if CFG:
        v_cond = tl.load(ptr + cond_row + offs, mask=mask, other=0.0).to(tl.float32)
        v = v + guidance * (v_cond - v)
    return v


@triton.jit
def opd_step_fwd_kernel(
    x_ptr,  # (B, N)
    v_student_ptr,  # (B, N), or (2B, N) when STUDENT_CFG
    v_teacher_ptr,  # (B, N), or (2B, N) when TEACHER_CFG
    noise_ptr,  # (B, N); not read when HAS_NOISE is False (ODE: every sbar is 0)
    coef_ptr,  # (4, B) float32: x_coef, v_coef, sbar, w
    x_next_ptr,  # (B, N) out
    partial_ptr,  # (B, num_chunks) float32 out: sum over the chunk of (v_s - v_t)^2
    sample_ptr,  # (B, N) x' of the log-density when LOG_PROB and not OWN_SAMPLE; else never read
    sq_partial_ptr,  # (B, num_chunks) float32 out when LOG_PROB: sum over the chunk of (x' - mu_S)^2
    B,
    N,
    num_chunks,
    student_guidance,
    teacher_guidance,
    STUDENT_CFG: tl.constexpr,
    TEACHER_CFG: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    LOG_PROB: tl.constexpr,
    OWN_SAMPLE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    chunk = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    row = b * N
    cond_row = (b + B) * N

    x_coef = tl.load(coef_ptr + b)
    v_coef = tl.load(coef_ptr + B + b)
    x = tl.load(x_ptr + row + offs, mask=mask, other=0.0).to(tl.float32)
    v_s = _load_velocity(v_student_ptr, row, cond_row, offs, mask, student_guidance, STUDENT_CFG)
    v_t = _load_velocity(v_teacher_ptr, row, cond_row, offs, mask, teacher_guidance, TEACHER_CFG)

    mean = x_coef * x + v_coef * v_s
    x_next = mean
    if HAS_NOISE:
        sbar = tl.load(coef_ptr + 2 * B + b)
        x_next += sbar * tl.load(noise_ptr + row + offs, mask=mask, other=0.0).to(tl.float32)
    stored = x_next.to(x_next_ptr.dtype.element_ty)
    tl.store(x_next_ptr + row + offs, stored, mask=mask)

    gap = v_s - v_t  # masked lanes load 0 for both: they add nothing
    tl.store(partial_ptr + b * num_chunks + chunk, tl.sum(gap * gap, axis=0))
    if LOG_PROB:
        if OWN_SAMPLE:
            target = stored.to(tl.float32)
        else:
            target = tl.load(sample_ptr + row + offs, mask=mask, other=0.0).to(tl.float32)
        residual = target - mean  # masked lanes: 0 - 0
        tl.store(sq_partial_ptr + b * num_chunks + chunk, tl.sum(residual * residual, axis=0))


@triton.jit
def opd_step_loss_kernel(
    partial_ptr,
    coef_ptr,
    loss_ptr,
    sq_partial_ptr,
    sq_ptr,
    B,
    num_chunks,
    LOG_PROB: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """loss[b] = w[b] * sum_c partial[b, c] (and sq[b] = sum_c sq_partial[b, c]), summed in a fixed order."""
    b = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_sq = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(0, num_chunks, BLOCK_C):
        offs = start + tl.arange(0, BLOCK_C)
        acc += tl.load(partial_ptr + b * num_chunks + offs, mask=offs < num_chunks, other=0.0)
        if LOG_PROB:
            acc_sq += tl.load(sq_partial_ptr + b * num_chunks + offs, mask=offs < num_chunks, other=0.0)
    w = tl.load(coef_ptr + 3 * B + b)
    tl.store(loss_ptr + b, w * tl.sum(acc, axis=0))
    if LOG_PROB:
        tl.store(sq_ptr + b, tl.sum(acc_sq, axis=0))


@triton.jit
def opd_step_bwd_kernel(
    v_student_ptr,
    v_teacher_ptr,
    coef_ptr,
    grad_loss_ptr,  # (B,) float32 upstream gradient, any stride (stride 0 when it came from loss.sum())
    grad_loss_stride,
    grad_ptr,  # out, shaped like v_student: (B, N) or (2B, N) when STUDENT_CFG
    x_ptr,  # (B, N) the step's state, read when LOG_PROB
    sample_ptr,  # (B, N) x' of the log-density, read when LOG_PROB
    grad_sq_ptr,  # (B,) float32 contiguous: the gradient of sq (LOG_PROB)
    B,
    N,
    student_guidance,
    teacher_guidance,
    STUDENT_CFG: tl.constexpr,
    TEACHER_CFG: tl.constexpr,
    LOG_PROB: tl.constexpr,
    BLOCK: tl.constexpr,
):
    chunk = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    row = b * N
    cond_row = (b + B) * N

    # The upstream gradient g[b] is folded into the per-row scalar once per program, so an all-ones g costs
    # exactly what a general g costs: there is no per-element multiply left to skip.
    scale = 2.0 * tl.load(coef_ptr + 3 * B + b) * tl.load(grad_loss_ptr + b * grad_loss_stride)
    v_s = _load_velocity(v_student_ptr, row, cond_row, offs, mask, student_guidance, STUDENT_CFG)
    v_t = _load_velocity(v_teacher_ptr, row, cond_row, offs, mask, teacher_guidance, TEACHER_CFG)
    grad = scale * (v_s - v_t)
    if LOG_PROB:
        x_coef = tl.load(coef_ptr + b)
        v_coef = tl.load(coef_ptr + B + b)
        x = tl.load(x_ptr + row + offs, mask=mask, other=0.0).to(tl.float32)
        target = tl.load(sample_ptr + row + offs, mask=mask, other=0.0).to(tl.float32)
        residual = target - (x_coef * x + v_coef * v_s)
        grad += (-2.0 * v_coef * tl.load(grad_sq_ptr + b)) * residual
    out_ty = grad_ptr.dtype.element_ty
    if STUDENT_CFG:
        tl.store(grad_ptr + row + offs, ((1.0 - student_guidance) * grad).to(out_ty), mask=mask)
        tl.store(grad_ptr + cond_row + offs, (student_guidance * grad).to(out_ty), mask=mask)
    else:
        tl.store(grad_ptr + row + offs, grad.to(out_ty), mask=mask)


# triton.jit returns an InterpretedFunction instead of a JITFunction when TRITON_INTERPRET=1 was set at decoration.
INTERPRETED = type(opd_step_fwd_kernel).__name__ == "InterpretedFunction"


def _num_warps(block: int) -> int:
    # >= 8 elements per thread, so bf16/fp16 get 16-byte accesses too; up to 8 warps to keep loads in flight.
    return max(1, min(8, block // 256))


HAS_LOG_PROB = True  # fused.LOG_PROB_BACKENDS: the launchers take the log-prob keywords below


def forward(
    x,
    v_student,
    v_teacher,
    noise,
    coef,
    student_guidance,
    teacher_guidance,
    x_next,
    partial,
    loss,
    block,
    *,
    sq=None,
    sq_partial=None,
    sample=None,
):
    """Launch the forward on (B, N) rows, `block` (a power of 2) elements per program. noise=None skips the noise
    read. Outputs are written in place: x_next (B, N), partial (B, cdiv(N, block)) float32, loss (B,) float32; with
    sq (B,) and sq_partial (like partial) given, also the log-density's sum of squares against `sample` (B, N), or
    against x_next as stored when sample is None."""
    B, N = x.shape
    num_chunks = triton.cdiv(N, block)
    assert partial.shape == (B, num_chunks) and block == triton.next_power_of_2(block)
    log_prob = sq is not None
    opd_step_fwd_kernel[(num_chunks, B)](
        x,
        v_student,
        v_teacher,
        x if noise is None else noise,  # never read when HAS_NOISE is False; any valid pointer will do
        coef,
        x_next,
        partial,
        x_next if sample is None else sample,  # any valid pointer when not read
        sq_partial if log_prob else partial,
        B,
        N,
        num_chunks,
        0.0 if student_guidance is None else float(student_guidance),
        0.0 if teacher_guidance is None else float(teacher_guidance),
        STUDENT_CFG=student_guidance is not None,
        TEACHER_CFG=teacher_guidance is not None,
        HAS_NOISE=noise is not None,
        LOG_PROB=log_prob,
        OWN_SAMPLE=sample is None,
        BLOCK=block,
        num_warps=_num_warps(block),
    )
    block_c = min(triton.next_power_of_2(num_chunks), 1024)
    opd_step_loss_kernel[(B,)](
        partial,
        coef,
        loss,
        sq_partial if log_prob else partial,
        sq if log_prob else loss,
        B,
        num_chunks,
        LOG_PROB=log_prob,
        BLOCK_C=block_c,
        num_warps=4,
    )


def backward(
    v_student,
    v_teacher,
    coef,
    grad_loss,
    student_guidance,
    teacher_guidance,
    grad,
    block,
    *,
    x=None,
    sample=None,
    grad_sq=None,
):
    """Launch the backward: grad (shaped like v_student, (B or 2B, N)) = 2 w g (v_s - v_t), split by CFG; with
    grad_sq (B,) float32 given, plus grad_sq (-2 v_coef) (sample - mu_S) for the log-density (x, sample: (B, N))."""
    B = coef.shape[1]
    log_prob = grad_sq is not None
    N = v_student.shape[1]
    num_chunks = triton.cdiv(N, block)
    opd_step_bwd_kernel[(num_chunks, B)](
        v_student,
        v_teacher,
        coef,
        grad_loss,
        grad_loss.stride(0),
        grad,
        x if log_prob else grad,  # any valid pointer when not read
        sample if log_prob else grad,
        grad_sq if log_prob else grad_loss,
        B,
        N,
        0.0 if student_guidance is None else float(student_guidance),
        0.0 if teacher_guidance is None else float(teacher_guidance),
        STUDENT_CFG=student_guidance is not None,
        TEACHER_CFG=teacher_guidance is not None,
        LOG_PROB=log_prob,
        BLOCK=block,
        num_warps=_num_warps(block),
    )
