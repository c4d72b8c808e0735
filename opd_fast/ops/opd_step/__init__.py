"""`opd_step`: one OPD transition and its loss, with the ONE place that decides which backend runs.

    naive.py    backend "reference": the plain fp32 PyTorch twin every fast backend is tested against; the math
    fused.py    the autograd Function of the fused backends, their per-step scalars, chunking and availability:
                "triton" (triton.py; CUDA tensors, CPU tensors only under TRITON_INTERPRET=1), "cuda"
                (opd_fast._C_cuda) and "cpp" (opd_fast._C), the last two built from csrc/
    triton.py   the Triton kernels

"auto" picks the fastest backend available for the tensors' device. log_prob=True also returns the log-density of the
next state under the student's transition (naive.py has the math; Flow-GRPO's rollouts and ratios use it), in the
same pass as the step on every fused backend (fused.LOG_PROB_BACKENDS); a backend outside that list would refuse it
by name, and "auto" for a spec that needs it (LossSpec.log_prob) picks among the backends that have it. The loss's
modes (noise level, KL normalization, reduction, estimator, backend) travel as one frozen LossSpec, built once per
run from the config (`LossSpec.from_config`) or once per call by `opd_step`; the tensors and the guidance stay per
call.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from opd_fast.ops.opd_step import fused, naive

log = logging.getLogger(__name__)
BACKENDS = ("auto", "reference", *fused.FUSED_BACKENDS)
_announced: set[tuple[str, str]] = set()


def available_backends(device: torch.device | str) -> list[str]:
    """Backends that can run on `device`, fastest first; "reference" always last."""
    device = torch.device(device)
    return [name for name in fused.backend_order(device) if fused.backend_available(name, device)] + ["reference"]


def resolve_backend(
    backend: str, device: torch.device | str, estimator: str = "closed_form", log_prob: bool = False
) -> str:
    """The backend that runs: `backend` checked, or for "auto" the fastest available on `device` that computes what
    is asked (log_prob: the log-density too)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if estimator != "closed_form":
        if backend not in ("auto", "reference"):
            raise ValueError(f"estimator={estimator!r} runs on the reference backend only, not {backend!r}")
        return "reference"
    if log_prob and backend not in ("auto", "reference", *fused.LOG_PROB_BACKENDS):
        raise ValueError(_no_log_prob(backend))
    if backend == "auto":
        usable = available_backends(device)
        if log_prob:
            usable = [name for name in usable if name in ("reference", *fused.LOG_PROB_BACKENDS)]
        return usable[0]
    # checked directly, not via available_backends: an explicit request may name a backend that "auto" never picks
    # on this device (triton on CPU tensors under TRITON_INTERPRET=1, for tests)
    if backend != "reference" and not fused.backend_available(backend, device):
        why = fused.why_unavailable(backend, device)
        raise RuntimeError(f"opd_step backend {backend!r} is not available on {device}: {why}")
    return backend


@dataclass(frozen=True)
class LossSpec:
    """The loss config turned into the op's modes once (validated, the backend resolved for a device), so a caller
    passes one object instead of the mode keywords at every step. `step` is opd_step with these modes."""

    noise_level: float
    kl_normalization: str = "exact"
    reduction: str = "sum"
    estimator: str = "closed_form"
    backend: str = "reference"  # resolved: never "auto"
    log_prob: bool = False  # the caller asks for log-probabilities: the backend must compute them

    def __post_init__(self):
        for name, value, allowed in (
            ("kl_normalization", self.kl_normalization, naive.KL_NORMALIZATIONS),
            ("reduction", self.reduction, naive.REDUCTIONS),
            ("estimator", self.estimator, naive.ESTIMATORS),
            ("backend", self.backend, BACKENDS[1:]),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if self.log_prob and self.backend not in ("reference", *fused.LOG_PROB_BACKENDS):
            raise ValueError(_no_log_prob(self.backend))

    @classmethod
    def resolve(
        cls,
        noise_level: float,
        device,
        *,
        kl_normalization="exact",
        reduction="sum",
        estimator="closed_form",
        backend="auto",
        log_prob=False,
    ) -> LossSpec:
        backend = resolve_backend(backend, device, estimator, log_prob)
        return cls(float(noise_level), kl_normalization, reduction, estimator, backend, log_prob)

    @classmethod
    def from_config(cls, loss, sampling, device) -> LossSpec:
        """The run's spec from its config sections: `loss` (kl_normalization, reduction, estimator, backend) and
        `sampling` (noise_level), with the backend resolved for `device`."""
        return cls.resolve(
            sampling.noise_level,
            device,
            kl_normalization=loss.kl_normalization,
            reduction=loss.reduction,
            estimator=loss.estimator,
            backend=loss.backend,
        )

    def coefficient_table(self, sigmas: torch.Tensor, numel: int, batch: int, device) -> torch.Tensor:
        """(steps, 4, batch) float32 on `device`: step j's per-sample scalars (x_coef, v_coef, sbar, w) on the grid
        `sigmas` (steps + 1,), for every sample of a batch at step j. Made once on the host and uploaded once: the
        fused op then launches no scalar kernels per step (on CUDA that was ~30 tiny launches per opd_step). The
        same reference math as fused.step_coefficients, so the rows are bit for bit what it would compute."""
        host = sigmas.detach().to("cpu", torch.float32)
        table = fused.step_coefficients(self, host[:-1], host[1:], numel, cache=False)  # (4, steps)
        return table.t()[:, :, None].expand(-1, -1, batch).contiguous().to(device)

    def step(
        self,
        x,
        v_student,
        v_teacher,
        noise,
        sigma,
        sigma_next,
        *,
        student_guidance=None,
        teacher_guidance=None,
        coef: torch.Tensor | None = None,
        log_prob: bool = False,
        sample: torch.Tensor | None = None,
    ):
        """opd_step with this spec's modes. coef: this step's rows of coefficient_table, (4, B), for the fused
        backends (the reference computes from sigma, the values the table was made from). log_prob, sample: as
        opd_step's."""
        _check_inputs(x, v_student, v_teacher, noise, sigma, sigma_next, student_guidance, teacher_guidance, sample)
        if log_prob and self.backend not in ("reference", *fused.LOG_PROB_BACKENDS):
            raise ValueError(_no_log_prob(self.backend))
        if sample is not None and not log_prob:
            raise ValueError("opd_step: `sample` is the state whose log-density is asked: pass log_prob=True with it")
        guidance = dict(student_guidance=student_guidance, teacher_guidance=teacher_guidance)
        if self.backend == "reference":
            return naive.opd_step_reference(
                x,
                v_student,
                v_teacher,
                noise,
                sigma,
                sigma_next,
                self.noise_level,
                kl_normalization=self.kl_normalization,
                reduction=self.reduction,
                estimator=self.estimator,
                log_prob=log_prob,
                sample=sample,
                **guidance,
            )
        return fused.opd_step_fused(
            self,
            x,
            v_student,
            v_teacher,
            noise,
            sigma,
            sigma_next,
            coef=coef,
            log_prob=log_prob,
            sample=sample,
            **guidance,
        )


def opd_step(
    x: torch.Tensor,
    v_student: torch.Tensor,
    v_teacher: torch.Tensor,
    noise: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    noise_level: float,
    *,
    kl_normalization: str = "exact",
    reduction: str = "sum",
    backend: str = "auto",
    student_guidance: float | None = None,
    teacher_guidance: float | None = None,
    estimator: str = "closed_form",
    log_prob: bool = False,
    sample: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """One student transition x -> x_next and the per-sample OPD loss against the teacher.

    x, noise: (B, ...) latents, (B, C, H, W) or packed (B, tokens, D). v_student, v_teacher: the same shape, or
    (2B, ...) = [unconditional; conditional] when the matching *_guidance is given (CFG fused into the op).
    sigma, sigma_next: (B,) so each sample may sit at its own step. Returns x_next (detached, x.dtype) and loss
    (B,) float32 whose gradient reaches v_student only. See opd_fast/ops/opd_step/naive.py for the math.

    v_teacher=None: no teacher (a stage-1 rollout); the loss is 0. log_prob=True: returns (x_next, loss, log_prob),
    log_prob (B,) float32 = log p(x' | x) under the student's Gaussian transition, gradient to v_student, x' =
    `sample` (B, ...) when given (a stored state: the recompute of a ratio), else x_next as returned; summed over
    the latent elements, or averaged with reduction="mean" (Flow-GRPO's); 0 for an ODE step. Every backend computes
    it (the fused ones in the step's own pass).
    """
    spec = LossSpec.resolve(
        noise_level,
        x.device,
        kl_normalization=kl_normalization,
        reduction=reduction,
        estimator=estimator,
        backend=backend,
        log_prob=log_prob,
    )
    key = (spec.backend, str(x.device))
    if key not in _announced:
        _announced.add(key)
        log.info("opd_step backend: %s on %s", spec.backend, x.device)
    return spec.step(
        x,
        v_student,
        v_teacher,
        noise,
        sigma,
        sigma_next,
        student_guidance=student_guidance,
        teacher_guidance=teacher_guidance,
        log_prob=log_prob,
        sample=sample,
    )


def _no_log_prob(backend: str) -> str:
    have = ", ".join(repr(name) for name in ("reference", *fused.LOG_PROB_BACKENDS))
    return f"opd_step: the {backend} backend does not compute log_prob; use one of {have} (or 'auto', which does)"


def _check_inputs(x, v_student, v_teacher, noise, sigma, sigma_next, student_guidance, teacher_guidance, sample=None):
    B = x.shape[0]
    for name, v, guided in (("v_student", v_student, student_guidance), ("v_teacher", v_teacher, teacher_guidance)):
        if v is None and name == "v_teacher":
            continue
        want = (2 * B,) + tuple(x.shape[1:]) if guided is not None else tuple(x.shape)
        if tuple(v.shape) != want:
            extra = " ([uncond; cond] stacked, since its guidance is set)" if guided is not None else ""
            raise ValueError(f"opd_step: {name} has shape {tuple(v.shape)}, expected {want}{extra}")
    for name, t in (("noise", noise), ("sample", sample)):
        if t is not None and t.shape != x.shape:
            raise ValueError(f"opd_step: {name} has shape {tuple(t.shape)}, expected {tuple(x.shape)}")
    for name, s in (("sigma", sigma), ("sigma_next", sigma_next)):
        if tuple(s.shape) != (B,):
            raise ValueError(f"opd_step: {name} has shape {tuple(s.shape)}, expected ({B},)")
