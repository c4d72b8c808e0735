"""The diffusers transformers we train: presets, loading, the student's LoRA, and one velocity call per family.

SD3 (first-class): state x is the (B, C, H, W) latent; CFG runs as one batch [uncond; cond] and opd_step combines
the two halves. FLUX.1-dev: state x is the packed (B, tokens, C*4) latent; it is guidance-distilled, so the
guidance scale goes into the model's guidance embedding and there is no CFG batch.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from peft import LoraConfig as PeftLoraConfig

from opd_fast.config import LoraConfig, ModelConfig

TRANSFORMER_CLASSES = {"sd3": SD3Transformer2DModel, "flux": FluxTransformer2DModel}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
VAE_SCALE = 8  # pixels per latent cell for both families' VAEs

PRESETS = {
    # CPU-sized: builds in milliseconds, ~80k parameters.
    "tiny-sd3": (
        "sd3",
        dict(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            caption_projection_dim=32,
            pooled_projection_dim=32,
            pos_embed_max_size=16,
        ),
    ),
    "tiny-flux": (
        "flux",
        dict(
            patch_size=1,
            in_channels=16,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        ),
    ),
    # The released architectures (transformer/config.json of each pipeline), for random-weight benchmarks.
    "sd3.5-medium": (
        "sd3",
        dict(
            sample_size=128,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=24,
            attention_head_dim=64,
            num_attention_heads=24,
            joint_attention_dim=4096,
            caption_projection_dim=1536,
            pooled_projection_dim=2048,
            pos_embed_max_size=384,
            dual_attention_layers=tuple(range(13)),
            qk_norm="rms_norm",
        ),
    ),
    "flux.1-dev": (
        "flux",
        dict(
            patch_size=1,
            in_channels=64,
            num_layers=19,
            num_single_layers=38,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        ),
    ),
}


def preset_arch(preset: str, layers: int | None = None) -> tuple[str, dict]:
    """A preset's family and constructor arguments. `layers` keeps the widths and the first `layers` blocks (FLUX:
    `layers` double-stream and 2 x `layers` single-stream ones): the benchmarks' way to run the released widths on
    a CPU. SD3's last block has no context output, so SD3.5-M needs layers >= 2 for the official LoRA targets."""
    family, kwargs = PRESETS[preset]
    if layers is None:
        return family, kwargs
    kwargs = dict(kwargs, num_layers=min(layers, kwargs["num_layers"]))
    if "dual_attention_layers" in kwargs:
        kwargs["dual_attention_layers"] = tuple(i for i in kwargs["dual_attention_layers"] if i < layers)
    if "num_single_layers" in kwargs:
        kwargs["num_single_layers"] = min(2 * layers, kwargs["num_single_layers"])
    return family, kwargs


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


def load_transformer(cfg: ModelConfig) -> torch.nn.Module:
    """The frozen base transformer: from a local folder (safetensors only) or from a preset with seeded weights."""
    cls = TRANSFORMER_CLASSES[cfg.family]
    dtype = DTYPES[cfg.dtype]
    if cfg.path is not None:
        model = cls.from_pretrained(transformer_folder(cfg.path), dtype=dtype, use_safetensors=True)
    else:
        if cfg.preset not in PRESETS:
            raise ValueError(f"model.preset: unknown preset {cfg.preset!r} (known: {', '.join(PRESETS)})")
        family, kwargs = preset_arch(cfg.preset)
        if family != cfg.family:
            raise ValueError(f"model.preset: {cfg.preset!r} is a {family} model but model.family is {cfg.family!r}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = cls(**kwargs)
            init_output_layer(model)
        if dtype != torch.float32:  # a float32 .to() is a no-op that diffusers still warns about
            model = model.to(dtype)
    return freeze(model)


def init_output_layer(model) -> None:
    """The final projection of a preset's random weights: normal(0, 0.02) weights and a zero bias, so the velocity
    is small, nonzero and free of a constant offset (diffusers 0.42.1 leaves both at nn.Linear's uniform init)."""
    proj = model.proj_out
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


def latent_shape(model: torch.nn.Module, family: str, batch: int, resolution: int) -> tuple[int, ...]:
    if family == "flux":
        # packed: 2x2 latent patches become one token of 4 * latent_channels
        return (batch, image_tokens(model, family, resolution), model.config.in_channels)
    side = resolution // VAE_SCALE
    return (batch, model.config.in_channels, side, side)


def image_tokens(model: torch.nn.Module, family: str, resolution: int) -> int:
    """The transformer's image tokens at `resolution` (the `image_seq_len` of a dynamic sigma shift)."""
    side = resolution // VAE_SCALE // (2 if family == "flux" else model.config.patch_size)
    return side * side


def flux_image_ids(tokens: int, device) -> torch.Tensor:
    side = round(tokens**0.5)
    ids = torch.zeros(side, side, 3, device=device)
    ids[..., 1] = torch.arange(side, device=device)[:, None]
    ids[..., 2] = torch.arange(side, device=device)[None, :]
    return ids.reshape(tokens, 3)


def velocity(model, family: str, x, sigma, cond: Conditioning, guidance: float | None):
    """Model velocity at state x (B, ...) and noise level sigma (B,).

    Returns (v, cfg) where cfg is the guidance opd_step must apply: for SD3 with guidance (not None and != 1) v is
    (2B, ...) = [uncond; cond]; otherwise v is (B, ...) and cfg is None.
    """
    dtype = next(model.parameters()).dtype
    B = x.shape[0]
    if family == "flux":
        g = None
        if model.config.guidance_embeds:
            g = torch.full((B,), 1.0 if guidance is None else guidance, device=x.device, dtype=dtype)
        v = model(
            hidden_states=x.to(dtype),
            encoder_hidden_states=cond.prompt_embeds.to(dtype),
            pooled_projections=cond.pooled.to(dtype),
            timestep=sigma.to(dtype),  # the FLUX transformer multiplies by 1000 itself
            img_ids=flux_image_ids(x.shape[1], x.device),
            txt_ids=torch.zeros(cond.prompt_embeds.shape[1], 3, device=x.device),
            guidance=g,
            return_dict=False,
        )[0]
        return v, None
    use_cfg = guidance is not None and guidance != 1.0
    embeds, pooled, xs, t = cond.prompt_embeds, cond.pooled, x, sigma
    if use_cfg:
        embeds = torch.cat([cond.negative_embeds.expand_as(embeds), embeds])
        pooled = torch.cat([cond.negative_pooled.expand_as(pooled), pooled])
        xs, t = torch.cat([x, x]), torch.cat([sigma, sigma])
    v = model(
        hidden_states=xs.to(dtype),
        encoder_hidden_states=embeds.to(dtype),
        pooled_projections=pooled.to(dtype),
        timestep=(t * 1000).float(),  # as StableDiffusion3Pipeline: fp32 (in bf16, 602.15 would become 604)
        return_dict=False,
    )[0]
    return v, (guidance if use_cfg else None)
