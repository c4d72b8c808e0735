"""FP8 (e4m3) linears for frozen teachers: weights quantized once, activations quantized at every call.

Backends (`quantize_model(model, backend=...)`):
- "torch": Fp8Linear, a thin module around torch._scaled_mm. Runs on sm_89+ GPUs, and on CPU (torch >= 2.13 runs
  _scaled_mm with float8 operands there; 2.11 with tensorwise scales only), so CI tests the numerics the GPU runs.
- "te": Transformer Engine's te.Linear with FP8 weights, under TE's autocast (forward_context). Needs CUDA and the
  `transformer_engine` package; cannot be installed or tested without them.
- "auto": "te" when transformer_engine imports and the model is on CUDA, else "torch".

Scaling: "rowwise" = one scale per activation row (token) and per weight output channel; "tensorwise" = one scale
per tensor. In TE, rowwise maps to Float8BlockScaling (1x128 activation blocks, 128x128 weight blocks) and tensorwise
to Float8CurrentScaling. Both quantize from the current amax. TE's DelayedScaling (a scale from earlier calls' amax
history) is not offered: a frozen teacher has no history, so its first call would quantize the cached FP8 weights
with the initial scale 1, where most of N(0, 0.02^2) weights fall below e4m3's smallest normal (2^-6).

Activations are quantized at every call: on CUDA by one fused kernel (torch.compile of `quantize`: the amax and the
scaled cast in one read of the activation, instead of ~6 eager kernels and an fp32 copy), eagerly elsewhere.

Shapes: _scaled_mm on CUDA needs K and N multiples of 16 (M is free); TE needs rows multiples of 8/16 too. Weights
are zero-padded once; activations are padded per call only when a dimension needs it (SD3's 333-token text stream
gives M = 2B*333 rows: padded for TE, free for _scaled_mm). Zero padding changes no amax and no product.

Which Linear layers stay in high precision (DEFAULT_SKIP) was decided by measurement: `python
bench/fp8_accuracy.py --per-layer` puts ONE layer type in FP8 at a time and reports the relative error of the
teacher velocity. bench/RESULTS.md, section "FP8 teacher accuracy (tiny-sd3, CPU)", holds that table beside each
type's share of SD3.5-M's and FLUX.1-dev's Linear FLOPs; section "FP8: the Linear layers' share of forward FLOPs
(SD3.5-M, FLUX.1-dev)" holds how much of the whole forward the Linear layers are.

The final projection, adaLN modulation and the time/text embedders carry most of the error and almost none of
the FLOPs: the final projection's error lands in the velocity unfiltered (then amplified by CFG), adaLN's
shift/scale/gate multiply every token of a block, and the embedders feed adaLN. They stay high, with the input
embedders (cheap either way). FP8 stays where the FLOPs are: the attention projections and the MLPs (FLUX: the same
in the double blocks, and the single blocks' attn / proj_mlp / proj_out). Rowwise is the default: in that table
it errs less than tensorwise for every layer type but one, at the cost of one amax per row. Layers narrower than
`min_features` can be kept too (0 by default: every block Linear of SD3.5-M and FLUX.1 is >= 1536 wide).
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)
E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
SCALINGS = ("rowwise", "tensorwise")
DEFAULT_SKIP = (
    # embedders (SD3, FLUX)
    "pos_embed.*",
    "x_embedder",
    "time_text_embed.*",
    "context_embedder",
    "*norm*",  # adaLN modulation: norm1.linear, norm1_context.linear, norm.linear (FLUX single), norm_out.linear
    "proj_out",  # the final projection (top level only: FLUX's single_transformer_blocks.*.proj_out stay FP8)
)
# Fast accumulation (fp8 tensor-core accumulators promoted less often) on CUDA: torchao's choice for inference
# forwards. bench/fp8_accuracy.py's GPU figures include its error (it is not measured apart).
FAST_ACCUM = True
COMPILE_QUANTIZE = True  # fuse the activation quantization on CUDA (quantize_activation); False: eager kernels


class Fp8Unavailable(RuntimeError):
    """The requested FP8 backend cannot run here; the message says why."""


def quantize(t: torch.Tensor, scaling: str) -> tuple[torch.Tensor, torch.Tensor]:
    """t (R, C) -> (q e4m3 (R, C), float32 dequantization scale) with t ~= q * scale; scale is () for tensorwise,
    (R, 1) for rowwise. Scales come from the current amax, so nothing saturates."""
    amax = t.abs().amax() if scaling == "tensorwise" else t.abs().amax(dim=1, keepdim=True)
    scale = amax.float().clamp(min=1e-12) / E4M3_MAX
    q = (t.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, scale


@functools.cache
def _fused_quantize():
    return torch.compile(quantize, dynamic=True)


def quantize_activation(t: torch.Tensor, scaling: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize` for the per-call activations: one fused Inductor kernel on CUDA (COMPILE_QUANTIZE), eager
    elsewhere (the same arithmetic)."""
    if t.is_cuda and COMPILE_QUANTIZE:
        return _fused_quantize()(t, scaling)
    return quantize(t, scaling)


@functools.cache
def _cpu_runs_rowwise() -> bool:
    """Whether this torch runs _scaled_mm with rowwise scales on CPU (2.13 does; 2.11 asserts per-tensor only)."""
    a = torch.ones(16, 16).to(E4M3)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.float32)
    except RuntimeError:
        return False
    return True


def scaling_supported(scaling: str, device) -> tuple[bool, str]:
    """(True, "") when Fp8Linear can run `scaling` on `device`, else (False, why)."""
    if scaling == "rowwise" and torch.device(device).type == "cpu" and not _cpu_runs_rowwise():
        return False, (
            f"torch {torch.__version__} runs _scaled_mm with rowwise scales on CUDA only (on CPU from "
            f"torch 2.13); use fp8_scaling tensorwise on this machine"
        )
    return True, ""


def _pad_to(n: int, multiple: int = 16) -> int:
    return -n % multiple


class Fp8Linear(torch.nn.Module):
    """y = x W^T + b through torch._scaled_mm: W e4m3 (quantized once, padded to multiples of 16), x quantized per
    call. Output in x's dtype, as nn.Linear. The weight buffer is `weight_fp8`, not `weight`, so code that reads
    `layer.weight.dtype` to cast its inputs fails loudly instead of casting activations to float8."""

    def __init__(self, linear: torch.nn.Linear, scaling: str = "rowwise"):
        super().__init__()
        if scaling not in ("rowwise", "tensorwise"):
            raise ValueError(f"Fp8Linear scaling must be rowwise or tensorwise, got {scaling!r}")
        self.out_features, self.in_features = linear.weight.shape
        self.scaling = scaling
        ok, why = scaling_supported(scaling, linear.weight.device)
        if not ok:
            raise Fp8Unavailable(f"fp8_scaling {scaling}: {why}")
        self.k_pad, self.n_pad = _pad_to(self.in_features), _pad_to(self.out_features)
        weight = F.pad(linear.weight.detach(), (0, self.k_pad, 0, self.n_pad))
        weight_fp8, weight_scale = quantize(weight, scaling)
        self.register_buffer("weight_fp8", weight_fp8)  # (N_pad, K_pad) row-major: .t() is the column-major mat2
        self.register_buffer("weight_scale", weight_scale.reshape(1, -1) if scaling == "rowwise" else weight_scale)
        bias = None if linear.bias is None else F.pad(linear.bias.detach(), (0, self.n_pad))
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.k_pad:
            x2 = F.pad(x2, (0, self.k_pad))
        # row-major for cuBLASLt (a transposed 2-D input stays column-major through reshape and the quantization)
        x_fp8, x_scale = quantize_activation(x2.contiguous(), self.scaling)
        out_dtype = x.dtype
        cuda = x.is_cuda
        # rowwise on CUDA writes bf16 (cuBLAS < 12.9 / CUTLASS path); fp32 callers get a cast afterwards
        mm_dtype = torch.bfloat16 if cuda and self.scaling == "rowwise" and out_dtype == torch.float32 else out_dtype
        fused_bias = self.bias is not None and mm_dtype in (torch.bfloat16, torch.float16)
        y = torch._scaled_mm(
            x_fp8,
            self.weight_fp8.t(),
            scale_a=x_scale,
            scale_b=self.weight_scale,
            bias=self.bias.to(mm_dtype) if fused_bias else None,
            out_dtype=mm_dtype,
            use_fast_accum=FAST_ACCUM and cuda,
        )
        if self.bias is not None and not fused_bias:
            y = y + self.bias.to(y.dtype)
        if self.n_pad:
            y = y[:, : self.out_features]
        return y.to(out_dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scaling={self.scaling}"


# ---------------------------------------------------------------------------------------------------------------
# Transformer Engine


def te_available() -> tuple[bool, str]:
    """(True, "") when transformer_engine.pytorch imports and a CUDA device is present, else (False, why)."""
    if not torch.cuda.is_available():
        return False, "Transformer Engine needs a CUDA device (none here)"
    try:
        import transformer_engine.pytorch  # noqa: F401
    except (ImportError, OSError, RuntimeError) as e:  # not installed, or its CUDA libraries fail to load
        return False, f"transformer_engine does not import: {type(e).__name__}: {e}"
    return True, ""


def te_recipe(scaling: str):
    from transformer_engine.common import recipe

    if scaling == "tensorwise":
        return recipe.Float8CurrentScaling(fp8_format=recipe.Format.E4M3)
    if not hasattr(recipe, "Float8BlockScaling"):
        raise Fp8Unavailable("fp8_scaling rowwise with Transformer Engine needs Float8BlockScaling (TE >= 2.3)")
    return recipe.Float8BlockScaling()


def _te_quantized_init(recipe):
    """TE's context for modules whose weights are created in FP8 (renamed across TE versions)."""
    import transformer_engine.pytorch as te

    init = getattr(te, "quantized_model_init", None) or te.fp8_model_init
    return init(enabled=True, recipe=recipe)


class TeLinear(torch.nn.Module):
    """te.Linear holding FP8 weights, with inputs padded to TE's FP8 shape rules (rows to 16, features to 16). The
    weights are created in FP8 (TE's quantized init) and quantized from their own amax when they are copied in."""

    def __init__(self, linear: torch.nn.Linear, recipe):
        super().__init__()
        import transformer_engine.pytorch as te

        self.out_features, self.in_features = linear.weight.shape
        self.k_pad, self.n_pad = _pad_to(self.in_features), _pad_to(self.out_features)
        with _te_quantized_init(recipe):
            self.inner = te.Linear(
                self.in_features + self.k_pad,
                self.out_features + self.n_pad,
                bias=linear.bias is not None,
                params_dtype=linear.weight.dtype,
                device=linear.weight.device,
            )
        with torch.no_grad():
            self.inner.weight.copy_(F.pad(linear.weight.detach(), (0, self.k_pad, 0, self.n_pad)))
            if linear.bias is not None:
                self.inner.bias.copy_(F.pad(linear.bias.detach(), (0, self.n_pad)))
        self.inner.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        rows = x2.shape[0]
        m_pad = _pad_to(rows)
        if m_pad or self.k_pad:
            x2 = F.pad(x2, (0, self.k_pad, 0, m_pad))
        y = self.inner(x2)
        return y[:rows, : self.out_features].reshape(*lead, self.out_features)


def forward_context(model: torch.nn.Module):
    """What a forward of `model` must run inside: TE's FP8 autocast for a TE-quantized model, else nothing."""
    recipe = getattr(model, "_opd_te_recipe", None)
    if recipe is None:
        return contextlib.nullcontext()
    import transformer_engine.pytorch as te

    if hasattr(te, "autocast"):  # TE >= 2.8; fp8_autocast is its deprecated name
        return te.autocast(enabled=True, recipe=recipe)
    return te.fp8_autocast(enabled=True, fp8_recipe=recipe)


# ---------------------------------------------------------------------------------------------------------------
# model conversion


def resolve_backend(backend: str, device: torch.device) -> str:
    """auto|te|torch -> te|torch for a model on `device`, or Fp8Unavailable naming what is missing."""
    device = torch.device(device)
    if backend not in ("auto", "te", "torch"):
        raise ValueError(f"fp8 backend must be auto, te or torch, got {backend!r}")
    te_ok, te_why = te_available() if device.type == "cuda" else (False, "the model is not on a CUDA device")
    if backend == "te" and not te_ok:
        raise Fp8Unavailable(f"fp8_backend te: {te_why}")
    if backend == "auto":
        backend = "te" if te_ok else "torch"
    if backend == "torch" and device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise Fp8Unavailable(
                f"torch._scaled_mm FP8 needs compute capability >= 8.9 (Ada/Hopper), this GPU is "
                f"sm_{major}{minor}; use teacher_runtime.precision bf16"
            )
    return backend


def is_skipped(name: str, skip) -> bool:
    """fnmatch of the layer's name (peft's `.base_layer` suffix stripped) against the skip patterns."""
    name = name.removesuffix(".base_layer")
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in skip)


def quantize_model(
    model: torch.nn.Module, backend: str = "auto", scaling: str = "rowwise", skip=DEFAULT_SKIP, min_features: int = 0
) -> dict:
    """Replace the model's nn.Linear layers by FP8 ones in place (frozen, inference only).

    Kept in high precision: layers matching `skip` (fnmatch patterns on the module name; DEFAULT_SKIP is why),
    layers with min(in, out) < min_features, and peft's LoRA factors (lora_A / lora_B: small, and the teacher's
    delta is what distillation transfers). Returns {"backend", "scaling", "fp8": [names], "kept": [names]}.
    """
    if scaling not in SCALINGS:
        raise ValueError(f"fp8 scaling must be one of {SCALINGS}, got {scaling!r}")
    skip = tuple(DEFAULT_SKIP if skip is None else skip)
    device = next(model.parameters()).device
    backend = resolve_backend(backend, device)
    recipe = te_recipe(scaling) if backend == "te" else None
    targets, kept = [], []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or ".lora_" in name:
            continue
        small = min(module.in_features, module.out_features) < min_features
        (kept if small or is_skipped(name, skip) else targets).append(name)
    modules = dict(model.named_modules())
    for name in targets:
        parent_name, _, attr = name.rpartition(".")
        linear = modules[name]
        new = TeLinear(linear, recipe) if backend == "te" else Fp8Linear(linear, scaling)
        setattr(modules[parent_name] if parent_name else model, attr, new)
    if recipe is not None:
        model._opd_te_recipe = recipe
    log.info(
        "fp8 (%s, %s): %d linears in FP8, %d kept in %s",
        backend,
        scaling,
        len(targets),
        len(kept),
        next(model.parameters()).dtype,
    )
    return {"backend": backend, "scaling": scaling, "fp8": targets, "kept": kept}
