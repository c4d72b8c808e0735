"""Qwen-Image: state x is the packed (B, tokens, C * 4) latent (2x2 latent patches, as FLUX), the text encoder is
Qwen2.5-VL (one sequence of hidden states, no pooled output: the second text tensor is the token mask), the sigma
grid is FLUX's linear ramp with a resolution-dependent dynamic shift, and the guidance is QwenImagePipeline's "true
CFG": v = v_u + w (v_c - v_u), rescaled per token to the norm of v_c. That rescaling is not linear in the two
predictions, so the family combines them itself and hands opd_step one guided velocity (cfg None); the student's
gradient flows through the rescaling."""

from __future__ import annotations

from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import torch
from diffusers import QwenImageTransformer2DModel

from opd_fast.families.base import Family, model_dtype, unnormalise_latents


def true_cfg(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """QwenImagePipeline's guided velocity: the CFG combination rescaled, token by token (the last dimension is a
    packed token's channels), to the conditional prediction's norm."""
    combined = v_uncond + scale * (v_cond - v_uncond)
    return combined * (torch.norm(v_cond, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))


def trim_text(embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The embeddings cut to the batch's longest prompt, and the mask (None when nothing is padding), as the
    pipeline hands them to its transformer: the cache pads every prompt to one length, the pipeline to the batch's."""
    keep = max(int(mask.sum(1).max()), 1)  # one host sync per forward: ~95% of a 512-token cache is padding
    embeds, mask = embeds[:, :keep], mask[:, :keep] > 0.5
    return embeds, None if bool(mask.all()) else mask


class QwenImage(Family):
    name = "qwen_image"
    transformer_class = QwenImageTransformer2DModel
    pipeline_class_name = "QwenImagePipeline"
    tiny_preset = "tiny-qwen-image"
    presets: ClassVar[dict[str, dict]] = {
        # CPU-sized: builds in milliseconds.
        "tiny-qwen-image": dict(
            patch_size=2,
            in_channels=16,
            out_channels=4,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            axes_dims_rope=(4, 6, 6),
        ),
        # Qwen/Qwen-Image transformer/config.json, for random-weight benchmarks.
        "qwen-image": dict(
            patch_size=2,
            in_channels=64,
            out_channels=16,
            num_layers=60,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=3584,
            axes_dims_rope=(16, 56, 56),
        ),
    }
    arch_keys = (
        "in_channels",
        "out_channels",
        "num_layers",
        "attention_head_dim",
        "num_attention_heads",
        "joint_attention_dim",
        "patch_size",
        "axes_dims_rope",
        "guidance_embeds",
    )
    # the input projections of the latent tokens and the text: in FP8 they carried the whole teacher's error at the
    # released widths (bench/RESULTS.md, "FP8 per layer type at Qwen-Image widths"); 11 M of the 20 B weights
    fp8_keep = ("img_in", "txt_in")
    text_components = ("text_encoder", "tokenizer")
    default_max_sequence_length = 512  # QwenImagePipeline.__call__'s default
    mu_defaults: ClassVar[dict] = dict(base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    # Qwen/Qwen-Image scheduler/scheduler_config.json: dynamic exponential shift, stretched to a terminal 0.02
    scheduler_config: ClassVar[dict] = dict(
        base_image_seq_len=256,
        base_shift=0.5,
        max_image_seq_len=8192,
        max_shift=0.9,
        num_train_timesteps=1000,
        shift=1.0,
        shift_terminal=0.02,
        time_shift_type="exponential",
        use_dynamic_shifting=True,
    )
    latent_keys = ("in_channels", "out_channels", "patch_size")
    vae_keys = ("z_dim", "latents_mean", "latents_std", "temperal_downsample")

    def latent_shape(self, model, batch: int, resolution: int) -> tuple[int, ...]:
        return (batch, self.image_tokens(model, resolution), model.config.in_channels)

    def image_tokens(self, model, resolution: int) -> int:
        side = resolution // self.vae_scale // 2
        return side * side

    def text_widths(self, model) -> tuple[int, int]:
        return model.config.joint_attention_dim, 0

    @torch.no_grad()
    def decode_latents(self, pipe, latents, resolution):
        # QwenImagePipeline's tail: unpack to (B, C, 1, H, W), un-normalise (Wan's VAE), decode, the one frame
        unpacked = pipe._unpack_latents(latents, resolution, resolution, pipe.vae_scale_factor)
        pixels = pipe.vae.decode(unnormalise_latents(pipe.vae, unpacked), return_dict=False)[0][:, :, 0]
        return self.output_images(SimpleNamespace(images=pipe.image_processor.postprocess(pixels, output_type="pil")))

    def velocity(self, model, x, sigma, cond, guidance):
        dtype = model_dtype(model)
        side = round(x.shape[1] ** 0.5)
        use_cfg = guidance is not None and guidance > 1.0  # the pipeline's do_true_cfg (its negative prompt is set)
        embeds, mask, xs, t = cond.prompt_embeds, cond.pooled, x, sigma
        if use_cfg:  # one batch [uncond; cond], as SD3; the mask keeps each half's own prompt length
            embeds = torch.cat([cond.negative_embeds.expand_as(embeds), embeds])
            mask = torch.cat([cond.negative_pooled.expand_as(mask), mask])
            xs, t = torch.cat([x, x]), torch.cat([sigma, sigma])
        embeds, mask = trim_text(embeds, mask)
        v = model(
            hidden_states=xs.to(dtype),
            encoder_hidden_states=embeds.to(dtype),
            encoder_hidden_states_mask=mask,
            timestep=t.to(dtype),  # the pipeline passes timestep / 1000 = sigma, in the latents' dtype
            img_shapes=[[(1, side, side)]] * xs.shape[0],
            return_dict=False,
        )[0]
        if not use_cfg:
            return v, None
        v_uncond, v_cond = v.float().chunk(2)
        return true_cfg(v_cond, v_uncond, guidance).to(v.dtype), None

    def set_timesteps(self, scheduler, num_steps: int, **mu) -> None:
        # QwenImagePipeline: FLUX's linear ramp, which the scheduler shifts (dynamically) and stretches
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), **mu)

    def encode_prompt(self, pipe, prompts: list[str], device, max_sequence_length: int):
        embeds, mask = pipe.encode_prompt(prompts, device=device, max_sequence_length=max_sequence_length)
        if mask is None:  # the pipeline drops an all-ones mask
            mask = torch.ones(embeds.shape[:2], device=embeds.device)
        # padded to one length, so batches (and the negative prompt) stack; padding is zeros and masked, as the
        # pipeline pads within a batch
        pad = max_sequence_length - embeds.shape[1]
        embeds = torch.nn.functional.pad(embeds, (0, 0, 0, pad))
        return embeds, torch.nn.functional.pad(mask.float(), (0, pad))

    def text_tokens(self, max_sequence_length: int | None = None) -> int:
        return max_sequence_length or self.default_max_sequence_length

    def sampling_inputs(self, embeds, pooled, negative_embeds, negative_pooled, guidance) -> dict:
        embeds, mask = trim_text(embeds, pooled)
        inputs = dict(prompt_embeds=embeds, prompt_embeds_mask=mask, true_cfg_scale=guidance)
        if guidance > 1.0:
            negative, negative_mask = trim_text(negative_embeds, negative_pooled)
            batch = embeds.shape[0]
            inputs.update(
                negative_prompt_embeds=negative.expand(batch, -1, -1),
                negative_prompt_embeds_mask=None if negative_mask is None else negative_mask.expand(batch, -1),
            )
        return inputs

    def tiny_pipeline(self, transformer, parts):
        """A Qwen2.5-VL text model of hidden 32 = joint_attention_dim; a Qwen-Image VAE of 4 latent channels =
        out_channels (packed: in_channels 16)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        tokenizer = parts.qwen_tokenizer()
        return self.pipeline_class(
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(**self.scheduler_config),
            vae=parts.qwen_image_vae(1),
            text_encoder=parts.qwen2_5_vl_model(tokenizer, 2),
            tokenizer=tokenizer,
        )


FAMILY = QwenImage()
