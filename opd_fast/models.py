"""The diffusers transformers we train, whatever their family: loading from a folder or a preset, the student's
LoRA, its forward's precision, frozen copies, and the cached text conditioning. What differs by family (classes,
presets, velocity, latent shape) is the family object's (opd_fast.families).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig

from opd_fast.config import LoraConfig, ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def transformer_folder(path: str | Path) -> Path:
    """A pipeline folder's transformer/ subfolder, or the folder itself when it holds the transformer."""
    path = Path(path)
    if (path / "transformer" / "config.json").is_file():
        return path / "transformer"
    if (path / "config.json").is_file():
        return path
    raise FileNotFoundError(
        f"no diffusers transformer at {path} (expected {path}/transformer/config.json or {path}/config.json)"
    )


def load_transformer(cfg: ModelConfig, family) -> torch.nn.Module:  # family: an opd_fast.families.Family (above)
    """The frozen base transformer of `family`: from a local folder (safetensors only) or from one of the family's
    presets with seeded weights."""
    dtype = DTYPES[cfg.dtype]
    if cfg.path is not None:
        model = family.load_pretrained(transformer_folder(cfg.path), dtype)
    else:
        if cfg.preset not in family.presets:
            raise ValueError(
                f"model.preset: {cfg.preset!r} is not a preset of model.family {family.name!r} "
                f"(its presets: {', '.join(family.presets)})"
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = family.transformer_class(**family.presets[cfg.preset])
            init_output_layer(family.output_layer(model))
        if dtype != torch.float32:  # a float32 .to() is a no-op that diffusers still warns about
            model = model.to(dtype)
    return freeze(model)


def init_output_layer(proj: torch.nn.Linear) -> None:
    """The final projection of a preset's random weights (the family's output_layer): normal(0, 0.02) weights and
    a zero bias, so the velocity is small, nonzero and free of a constant offset (diffusers 0.42.1 leaves both at
    nn.Linear's uniform init)."""
    torch.nn.init.normal_(proj.weight, std=0.02)
    torch.nn.init.zeros_(proj.bias)


def add_student_lora(model: torch.nn.Module, lora: LoraConfig) -> PeftLoraConfig | None:
    """Make `model` the student: a peft LoRA (adapter "default") or, with lora.enabled false, all parameters.
    Trainable parameters are kept in float32 whatever the base dtype. Returns the peft config (None: full)."""
    if not lora.enabled:
        model.requires_grad_(True)
        return None
    names = {name for name, _ in model.named_modules()}
    missing = [t for t in lora.targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ValueError(f"student.lora.targets: no module of the transformer matches {missing}")
    peft_config = PeftLoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        init_lora_weights=True if lora.init == "default" else lora.init,
        target_modules=list(lora.targets),
    )
    model.add_adapter(peft_config)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return peft_config


def autocast_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype the student's forward runs in under autocast: its frozen weights' dtype when that is bf16/fp16 and
    its trainable weights are fp32 (fp32 master weights, trained in place); None when there is nothing to mix (an
    fp32 model, or one whose trainable weights are 16-bit as DeepSpeed's bf16 engine keeps them)."""
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    low = frozen & {torch.bfloat16, torch.float16}
    if len(low) == 1 and trainable == {torch.float32}:
        return low.pop()
    return None


@contextlib.contextmanager
def student_forward_context(model: torch.nn.Module, dtype: torch.dtype | None):
    """What the student's forward runs inside: with `dtype` (autocast_dtype(model)), autocast to it with peft's
    input casting off. peft would otherwise cast each LoRA layer's bf16 input to the fp32 of its weights: ~190 fp32
    GEMMs per forward at SD3.5-M, with an fp32 copy of every LoRA input kept for the backward. Under autocast the
    LoRA GEMMs run in bf16 and their gradients still reach the fp32 weights. The casting is switched off only
    here: a forward outside this context (a user's script) keeps peft's fp32 path, which runs without autocast."""
    if dtype is None:
        yield
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer) and m.cast_input_dtype_enabled]
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    try:
        with torch.autocast(next(model.parameters()).device.type, dtype=dtype):
            yield
    finally:
        for layer in layers:
            layer.cast_input_dtype_enabled = True


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.requires_grad_(False)
    model.eval()
    return model


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy with parameters of its own and the buffers of `model`: they are constants (SD3's sin-cos position
    table is 0.9 GB in float32 at SD3.5's pos_embed_max_size of 384) that nothing writes in place, and a cast or a
    .to() gives the copy new ones without touching `model`'s."""
    return freeze(copy.deepcopy(model, {id(b): b for b in model.buffers()}))


@dataclass
class Conditioning:
    """Cached text conditioning of a batch: what the transformer's text inputs take."""

    prompt_embeds: torch.Tensor  # (B, T, D)
    pooled: torch.Tensor  # (B, P)
    negative_embeds: torch.Tensor  # (1, T, D): the negative / empty prompt
    negative_pooled: torch.Tensor  # (1, P)
