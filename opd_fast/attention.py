"""Which kernel runs the attention of the diffusers transformers (`model.attention`).

Both families end in torch's scaled_dot_product_attention: SD3's JointAttnProcessor2_0 calls it directly, FLUX's
processor through diffusers' dispatcher (its "native" backend). So one mechanism serves both: every attention module's
forward runs inside a context, and only there:

- "sdpa": nothing; torch picks its backend (on Hopper: flash or memory-efficient).
- "cudnn": torch's SDPA with cuDNN attention first in the priority order (then flash, efficient, math); whether it
  beats torch's own choice on H100/H200 at these head sizes is what bench/bench_round.py's cudnn row measures.
- "flash": the flash-attn package (Dao-AILab): a TorchFunctionMode routes scaled_dot_product_attention calls that
  flash-attn can take (CUDA, fp16/bf16, no mask, head dim <= 256) to flash_attn_func, in its (B, S, H, D) layout;
  any other call runs torch's SDPA unchanged.

The backward of each is its own kernel's (the cuDNN and flash-attn ops carry theirs), and gradient checkpointing's
recompute calls the modules again, so it runs under the same context.
"""

from __future__ import annotations

import contextlib
import logging
import types

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from opd_fast.config import ConfigError

log = logging.getLogger(__name__)
BACKENDS = ("sdpa", "cudnn", "flash")


class AttentionUnavailable(ConfigError):
    """The requested attention backend cannot run here; the message names model.attention and says why."""


def flash_available() -> tuple[bool, str]:
    """(True, "") when flash_attn imports and a CUDA device is present, else (False, why)."""
    if not torch.cuda.is_available():
        return False, "flash-attn needs a CUDA device (none here)"
    try:
        import flash_attn  # noqa: F401
    except (ImportError, OSError, RuntimeError) as e:  # not installed, or built for another torch / CUDA
        return False, f"flash_attn does not import: {type(e).__name__}: {e}"
    return True, ""


def _flash_attn_func():
    from flash_attn import flash_attn_func

    return flash_attn_func


class FlashSDPA(TorchFunctionMode):
    """Routes F.scaled_dot_product_attention to `kernel(q, k, v, dropout_p=, softmax_scale=, causal=)` in the
    (B, S, H, D) layout (flash_attn_func's signature) when the call qualifies; `calls` counts the routed ones."""

    def __init__(self, kernel=None, cuda_only: bool = True):
        super().__init__()
        self.kernel = kernel if kernel is not None else _flash_attn_func()
        self.cuda_only = cuda_only
        self.calls = 0

    def qualifies(
        self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
    ) -> bool:
        """Whether flash-attn can take this call (SDPA's own signature: positional or keyword, as callers pass)."""
        return (
            attn_mask is None
            and not enable_gqa
            and query.dim() == 4
            and query.shape[-1] <= 256
            and query.shape[-1] == key.shape[-1] == value.shape[-1]
            and query.dtype in (torch.float16, torch.bfloat16)
            and (query.is_cuda or not self.cuda_only)
        )

    def route(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        self.calls += 1
        out = self.kernel(
            query.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            dropout_p=dropout_p,
            softmax_scale=scale,
            causal=is_causal,
        )
        return out.transpose(1, 2)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and self.qualifies(*args, **kwargs):
            return self.route(*args, **kwargs)
        return func(*args, **kwargs)


def backend_context(backend: str, flash: FlashSDPA | None = None):
    """The context one attention call runs in under `backend` (a FlashSDPA instance for "flash")."""
    if backend == "cudnn":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        order = [
            SDPBackend.CUDNN_ATTENTION,
            SDPBackend.FLASH_ATTENTION,
            SDPBackend.EFFICIENT_ATTENTION,
            SDPBackend.MATH,
        ]
        return sdpa_kernel(order, set_priority=True)
    if backend == "flash":
        return flash
    return contextlib.nullcontext()


def _attention_modules(model: torch.nn.Module):
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    return [m for m in model.modules() if isinstance(m, (Attention, AttentionModuleMixin))]


def check(backend: str) -> None:
    """Raise AttentionUnavailable when `backend` cannot run here (before any model is loaded)."""
    if backend == "flash":
        ok, why = flash_available()
        if not ok:
            raise AttentionUnavailable(f"model.attention flash: {why}; use sdpa or cudnn")


def _routed_forward(self, *args, **kwargs):
    """An attention module's forward under its backend: a `with` statement, which torch.compile traces (manual
    __enter__/__exit__ in forward hooks break its graph)."""
    with backend_context(self._opd_attention, self._opd_flash):
        return self._opd_class_forward(self, *args, **kwargs)


def use_backend(model: torch.nn.Module, backend: str, flash_kernel=None) -> int:
    """Run every attention module of `model` under `backend` from now on; returns how many modules were set.
    "sdpa" changes nothing. A model already set (e.g. a teacher deep-copied from a set base) is left as it is.
    `flash_kernel` replaces flash_attn_func (tests run the routing on CPU with a reference kernel)."""
    if backend not in BACKENDS:
        raise ValueError(f"model.attention must be one of {BACKENDS}, got {backend!r}")
    if backend == "sdpa" or getattr(model, "_opd_attention", "sdpa") != "sdpa":
        return 0
    if flash_kernel is None:
        check(backend)
    flash = FlashSDPA(flash_kernel, cuda_only=flash_kernel is None) if backend == "flash" else None
    modules = _attention_modules(model)
    for module in modules:
        module._opd_attention, module._opd_flash = backend, flash
        module._opd_class_forward = type(module).forward  # a plain function (torch.compile traces a call of it)
        module.forward = types.MethodType(_routed_forward, module)  # a bound method: deepcopy rebinds it
    model._opd_attention, model._opd_flash = backend, flash
    log.info("attention: %s in %d modules", backend, len(modules))
    return len(modules)
