"""FLUX.1-dev: state x is the packed (B, tokens, C * 4) latent; the model is guidance-distilled, so the guidance scale
goes into its guidance embedding and there is no CFG batch (and no negative prompt). Text: CLIP-L and T5."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from diffusers import FluxTransformer2DModel

from opd_fast.families.base import Family


def image_ids(tokens: int, device) -> torch.Tensor:
    """(tokens, 3) position ids of a square grid of packed latent tokens, as FluxPipeline makes them."""
    side = round(tokens**0.5)
    ids = torch.zeros(side, side, 3, device=device)
    ids[..., 1] = torch.arange(side, device=device)[:, None]
    ids[..., 2] = torch.arange(side, device=device)[None, :]
    return ids.reshape(tokens, 3)


class Flux(Family):
    name = "flux"
    transformer_class = FluxTransformer2DModel
    pipeline_class_name = "FluxPipeline"
    tiny_preset = "tiny-flux"
    presets: ClassVar[dict[str, dict]] = {
        # CPU-sized: builds in milliseconds.
        "tiny-flux": dict(
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
        # The released architecture (transformer/config.json), for random-weight benchmarks.
        "flux.1-dev": dict(
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
    }
    arch_keys = (
        "in_channels",
        "out_channels",
        "num_layers",
        "num_single_layers",
        "attention_head_dim",
        "num_attention_heads",
        "joint_attention_dim",
        "pooled_projection_dim",
        "patch_size",
    )
    text_components = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    default_max_sequence_length = 512
    mu_defaults: ClassVar[dict] = dict(base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    # black-forest-labs/FLUX.1-dev: a dynamic shift, whose keys are its pipeline's defaults
    scheduler_config: ClassVar[dict] = dict(shift=3.0, use_dynamic_shifting=True, **mu_defaults)

    def latent_shape(self, model, batch: int, resolution: int) -> tuple[int, ...]:
        # packed: 2x2 latent patches become one token of 4 * latent_channels
        return (batch, self.image_tokens(model, resolution), model.config.in_channels)

    def image_tokens(self, model, resolution: int) -> int:
        side = resolution // self.vae_scale // 2
        return side * side

    def decode_latents(self, pipe, latents, resolution):
        # FluxPipeline's tail: the packed tokens back to (B, C, H, W) first
        unpacked = pipe._unpack_latents(latents, resolution, resolution, pipe.vae_scale_factor)
        return super().decode_latents(pipe, unpacked, resolution)

    def velocity(self, model, x, sigma, cond, guidance):
        dtype = next(model.parameters()).dtype
        g = None
        if model.config.guidance_embeds:
            g = torch.full((x.shape[0],), 1.0 if guidance is None else guidance, device=x.device, dtype=dtype)
        v = model(
            hidden_states=x.to(dtype),
            encoder_hidden_states=cond.prompt_embeds.to(dtype),
            pooled_projections=cond.pooled.to(dtype),
            timestep=sigma.to(dtype),  # the FLUX transformer multiplies by 1000 itself
            img_ids=image_ids(x.shape[1], x.device),
            txt_ids=torch.zeros(cond.prompt_embeds.shape[1], 3, device=x.device),
            guidance=g,
            return_dict=False,
        )[0]
        return v, None

    def cut_blocks(self, kwargs: dict, layers: int) -> dict:
        """`layers` double-stream blocks and 2 x `layers` single-stream ones."""
        kwargs = super().cut_blocks(kwargs, layers)
        kwargs["num_single_layers"] = min(2 * layers, kwargs["num_single_layers"])
        return kwargs

    def set_timesteps(self, scheduler, num_steps: int, **mu) -> None:
        if scheduler.config.get("use_flow_sigmas"):
            scheduler.set_timesteps(num_steps, **mu)
        else:  # FluxPipeline's own linear ramp, which the scheduler then shifts
            scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), **mu)

    def encode_prompt(self, pipe, prompts: list[str], device, max_sequence_length: int):
        embeds, pooled, _ = pipe.encode_prompt(
            prompts, prompt_2=None, device=device, max_sequence_length=max_sequence_length
        )
        return embeds, pooled

    def text_tokens(self, max_sequence_length: int | None = None) -> int:
        return max_sequence_length or self.default_max_sequence_length  # T5's alone (CLIP gives only the pooled)

    def sampling_inputs(self, embeds, pooled, negative_embeds, negative_pooled, guidance) -> dict:
        # guidance-distilled: no negative branch, the scale goes into the guidance embedding
        return dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled, guidance_scale=guidance)

    def tiny_pipeline(self, transformer, parts):
        """CLIP-L hidden 32 = pooled_projection_dim (FLUX pools CLIP's hidden state, no projection); T5's d_model
        32 = joint_attention_dim."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        clip, t5 = parts.clip_tokenizer(), parts.t5_tokenizer()
        return self.pipeline_class(
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(**self.scheduler_config),
            vae=parts.vae(1, shift_factor=0.1159),
            text_encoder=parts.clip_text_model(clip, 2, with_projection=False, hidden=32),
            tokenizer=clip,
            text_encoder_2=parts.t5_model(t5, 4),
            tokenizer_2=t5,
        )


FAMILY = Flux()
