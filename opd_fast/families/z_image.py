"""Z-Image: state x is the (B, C, H, W) latent (the transformer patchifies it itself, taking a list of (C, 1, H, W)
samples); the transformer predicts the negated velocity at time 1 - sigma; the text encoder is Qwen3 (the second
text tensor is the token mask: the pipeline hands each prompt's tokens alone, as a list). ZImagePipeline's guidance
`g` is v_c + g (v_c - v_u), 0 = none (Z-Image-Turbo): linear, so it runs as one [uncond; cond] batch that opd_step
combines at scale 1 + g."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from diffusers import ZImageTransformer2DModel

from opd_fast.families.base import Family, model_dtype

PATCH = "2-1"  # the transformer's patch size "{patch}-{frame patch}", the one ZImagePipeline uses


def token_list(embeds: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Each prompt's own tokens, as ZImagePipeline hands them to its transformer."""
    return [e[m > 0.5] for e, m in zip(embeds, mask)]


class ZImage(Family):
    name = "z_image"
    transformer_class = ZImageTransformer2DModel
    pipeline_class_name = "ZImagePipeline"

    def output_layer(self, model):
        # no proj_out: one final layer per patch size, in a dict; the pipeline's patch size is the one trained
        return model.all_final_layer[PATCH].linear

    tiny_preset = "tiny-z-image"
    no_guidance = 0.0
    presets: ClassVar[dict[str, dict]] = {
        # CPU-sized: builds in milliseconds.
        "tiny-z-image": dict(
            all_patch_size=(2,),
            all_f_patch_size=(1,),
            in_channels=4,
            dim=64,
            n_layers=2,
            n_refiner_layers=1,
            n_heads=2,
            n_kv_heads=2,
            cap_feat_dim=32,
            axes_dims=[8, 12, 12],
            axes_lens=[256, 64, 64],
        ),
        # Tongyi-MAI/Z-Image-Turbo transformer/config.json, for random-weight benchmarks.
        "z-image-turbo": dict(
            all_patch_size=(2,),
            all_f_patch_size=(1,),
            in_channels=16,
            dim=3840,
            n_layers=30,
            n_refiner_layers=2,
            n_heads=30,
            n_kv_heads=30,
            norm_eps=1e-5,
            qk_norm=True,
            cap_feat_dim=2560,
            rope_theta=256.0,
            t_scale=1000.0,
            axes_dims=[32, 48, 48],
            axes_lens=[1024, 512, 512],
        ),
    }
    arch_keys = (
        "all_patch_size",
        "all_f_patch_size",
        "in_channels",
        "dim",
        "n_layers",
        "n_refiner_layers",
        "n_heads",
        "n_kv_heads",
        "cap_feat_dim",
        "axes_dims",
    )
    latent_keys = ("in_channels", "all_patch_size", "all_f_patch_size")
    lora_targets = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0")
    # embedders, the timestep MLP, modulations and the final layer: SD3's and FLUX's counterparts stay high too, and
    # the model reads the x embedder's .weight (its dtype) directly
    fp8_keep = ("all_x_embedder.*", "all_final_layer.*", "t_embedder.*", "cap_embedder.*", "*adaLN_modulation*")
    text_components = ("text_encoder", "tokenizer")
    default_max_sequence_length = 512  # ZImagePipeline.__call__'s default
    mu_defaults: ClassVar[dict] = dict(base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    # Tongyi-MAI/Z-Image-Turbo scheduler/scheduler_config.json: a static shift 3.0
    scheduler_config: ClassVar[dict] = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)

    def latent_shape(self, model, batch: int, resolution: int) -> tuple[int, ...]:
        side = resolution // self.vae_scale
        return (batch, model.config.in_channels, side, side)

    def image_tokens(self, model, resolution: int) -> int:
        side = resolution // self.vae_scale // 2
        return side * side

    def text_widths(self, model) -> tuple[int, int]:
        return model.config.cap_feat_dim, 0

    def velocity(self, model, x, sigma, cond, guidance):
        dtype = model_dtype(model)
        use_cfg = guidance is not None and guidance > 0  # ZImagePipeline.do_classifier_free_guidance
        captions = token_list(cond.prompt_embeds, cond.pooled)
        xs, t = x, sigma
        if use_cfg:
            negative = token_list(cond.negative_embeds, cond.negative_pooled) * x.shape[0]
            captions = negative + captions
            xs, t = torch.cat([x, x]), torch.cat([sigma, sigma])
        out = model(
            list(xs.to(dtype).unsqueeze(2).unbind(0)),
            (1000 - t.float() * 1000) / 1000,  # the pipeline's (1000 - timestep) / 1000, timestep = sigma * 1000
            [c.to(dtype) for c in captions],
            return_dict=False,
        )[0]
        v = -torch.stack(out).squeeze(2)  # the transformer predicts the negated velocity
        return v, (1.0 + guidance if use_cfg else None)

    def cut_blocks(self, kwargs: dict, layers: int) -> dict:
        return dict(kwargs, n_layers=min(layers, kwargs["n_layers"]))

    def set_timesteps(self, scheduler, num_steps: int, **mu) -> None:
        # ZImagePipeline: a linear ramp (get_default_z_image_sigmas), with mu whether or not the config shifts
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps).tolist(), **mu)

    def encode_prompt(self, pipe, prompts: list[str], device, max_sequence_length: int):
        tokens, _ = pipe.encode_prompt(
            list(prompts), device=device, do_classifier_free_guidance=False, max_sequence_length=max_sequence_length
        )
        embeds = torch.zeros(len(tokens), max_sequence_length, tokens[0].shape[-1], dtype=tokens[0].dtype)
        mask = torch.zeros(len(tokens), max_sequence_length)
        for i, t in enumerate(tokens):  # padded to one length so batches stack; the mask keeps each prompt's own
            embeds[i, : len(t)] = t.cpu()
            mask[i, : len(t)] = 1
        return embeds.to(device), mask.to(device)

    def text_tokens(self, max_sequence_length: int | None = None) -> int:
        return max_sequence_length or self.default_max_sequence_length

    def sampling_inputs(self, embeds, pooled, negative_embeds, negative_pooled, guidance) -> dict:
        inputs = dict(prompt_embeds=token_list(embeds, pooled), guidance_scale=guidance)
        if guidance > 0:
            inputs["negative_prompt_embeds"] = token_list(negative_embeds, negative_pooled) * embeds.shape[0]
        return inputs

    def tiny_pipeline(self, transformer, parts):
        """A Qwen3 text model of hidden 32 = cap_feat_dim; an AutoencoderKL of 4 latent channels = in_channels."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        tokenizer = parts.qwen_tokenizer()
        return self.pipeline_class(
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(**self.scheduler_config),
            vae=parts.vae(1, shift_factor=0.1159),
            text_encoder=parts.qwen3_model(tokenizer, 2),
            tokenizer=tokenizer,
        )


FAMILY = ZImage()
