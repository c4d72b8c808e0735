"""Stable Diffusion 3 / 3.5 (first-class): state x is the (B, C, H, W) latent; CFG runs as one batch [uncond; cond]
and opd_step combines the two halves. Text: CLIP-L, CLIP-G and T5."""

from __future__ import annotations

from typing import ClassVar

import torch
from diffusers import SD3Transformer2DModel

from opd_fast.families.base import Family

CLIP_TOKENS = 77  # SD3 puts the CLIP hidden states (padded to T5's width) before T5's


class SD3(Family):
    name = "sd3"
    transformer_class = SD3Transformer2DModel
    pipeline_class_name = "StableDiffusion3Pipeline"
    tiny_preset = "tiny-sd3"
    presets: ClassVar[dict[str, dict]] = {
        # CPU-sized: builds in milliseconds, ~80k parameters.
        "tiny-sd3": dict(
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
        # The released architecture (transformer/config.json), for random-weight benchmarks.
        "sd3.5-medium": dict(
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
    }
    arch_keys = (
        "in_channels",
        "out_channels",
        "num_layers",
        "attention_head_dim",
        "num_attention_heads",
        "joint_attention_dim",
        "pooled_projection_dim",
        "caption_projection_dim",
        "patch_size",
        "dual_attention_layers",
        "qk_norm",
    )
    text_components = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")
    default_max_sequence_length = 256
    # stabilityai/stable-diffusion-3.5-*: a static shift
    scheduler_config: ClassVar[dict] = dict(shift=3.0)
    mu_defaults: ClassVar[dict] = dict(base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.16)

    def latent_shape(self, model, batch: int, resolution: int) -> tuple[int, ...]:
        side = resolution // self.vae_scale
        return (batch, model.config.in_channels, side, side)

    def image_tokens(self, model, resolution: int) -> int:
        side = resolution // self.vae_scale // model.config.patch_size
        return side * side

    def velocity(self, model, x, sigma, cond, guidance):
        dtype = next(model.parameters()).dtype
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

    def cut_blocks(self, kwargs: dict, layers: int) -> dict:
        """SD3's last block has no context output, so SD3.5-M needs layers >= 2 for the official LoRA targets."""
        kwargs = super().cut_blocks(kwargs, layers)
        if "dual_attention_layers" in kwargs:
            kwargs["dual_attention_layers"] = tuple(i for i in kwargs["dual_attention_layers"] if i < layers)
        return kwargs

    def set_timesteps(self, scheduler, num_steps: int, **mu) -> None:
        scheduler.set_timesteps(num_steps, **mu)

    def encode_prompt(self, pipe, prompts: list[str], device, max_sequence_length: int):
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompts,
            prompt_2=None,
            prompt_3=None,
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
        )
        return embeds, pooled

    def text_tokens(self, max_sequence_length: int | None = None) -> int:
        return CLIP_TOKENS + (max_sequence_length or self.default_max_sequence_length)

    def sampling_inputs(self, embeds, pooled, negative_embeds, negative_pooled, guidance) -> dict:
        batch = embeds.shape[0]
        return dict(
            prompt_embeds=embeds,
            pooled_prompt_embeds=pooled,
            negative_prompt_embeds=negative_embeds.expand(batch, -1, -1),
            negative_pooled_prompt_embeds=negative_pooled.expand(batch, -1),
            guidance_scale=guidance,
        )

    def tiny_pipeline(self, transformer, parts):
        """CLIP-L and CLIP-G hidden 16 + 16 padded to T5's d_model 32 = joint_attention_dim; their pooled outputs
        concatenated, 16 + 16 = pooled_projection_dim."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        clip, t5 = parts.clip_tokenizer(), parts.t5_tokenizer()
        return self.pipeline_class(
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(**self.scheduler_config),
            vae=parts.vae(1, shift_factor=0.0609),
            text_encoder=parts.clip_text_model(clip, 2, with_projection=True),
            tokenizer=clip,
            text_encoder_2=parts.clip_text_model(clip, 3, with_projection=True),
            tokenizer_2=parts.clip_tokenizer(),
            text_encoder_3=parts.t5_model(t5, 4),
            tokenizer_3=t5,
        )


FAMILY = SD3()
