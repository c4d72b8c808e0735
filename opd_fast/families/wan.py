"""Wan 2.1 text-to-video: state x is the 5-D video latent (B, C, F, H, W), F = (frames - 1) / 4 + 1 latent frames.
Text: UMT5 (the pipeline pads every prompt to max_sequence_length with zeros and feeds no mask; the second text
tensor is the token mask, for the record). CFG as one [uncond; cond] batch that opd_step combines, as SD3. The sigma
grid is the released UniPC scheduler's flow sigmas with its static `flow_shift`; the rollout steps them with the
OPD transition.

The per-step KL sums (or, with loss.reduction mean, averages) over every latent element of a sample, frames
included: opd_step flattens each sample whatever its rank (tests/test_families.py holds it to a float64 twin).

Wan 2.2's two-expert pipelines (a high-noise and a low-noise transformer switched at a boundary timestep) and its
TI2V model are not supported yet: a pipeline folder with them is a ConfigError before any model loads."""

from __future__ import annotations

import copy
from typing import ClassVar

import torch
from diffusers import WanTransformer3DModel

from opd_fast.config import ConfigError
from opd_fast.families.base import Family, model_dtype

# UniPC nudges a first sigma of 1 to 1 - 1e-6 (its multistep update takes log(alpha)); the OPD transition's
# sigma == 1 rule (the SDE's std at the first step) needs the exact 1 back. The transformer still sees the
# pipeline's timestep there: 999.
FIRST_SIGMA_EPS = 1e-6


class Wan(Family):
    name = "wan"
    transformer_class = WanTransformer3DModel
    pipeline_class_name = "WanPipeline"
    tiny_preset = "tiny-wan"
    num_frames = 81  # WanPipeline's default video length (5 s at 16 fps): 21 latent frames
    vae_temporal = 4  # frames per latent frame of the Wan VAE (after the first)
    presets: ClassVar[dict[str, dict]] = {
        # CPU-sized: builds in milliseconds.
        "tiny-wan": dict(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,
            in_channels=4,
            out_channels=4,
            text_dim=32,
            freq_dim=32,
            ffn_dim=48,
            num_layers=2,
        ),
        # A larger tiny of the same latent space: the cross-size teacher of the tests (as 14B teaches 1.3B).
        "tiny-wan-large": dict(
            patch_size=(1, 2, 2),
            num_attention_heads=3,
            attention_head_dim=12,
            in_channels=4,
            out_channels=4,
            text_dim=32,
            freq_dim=32,
            ffn_dim=72,
            num_layers=3,
        ),
        # Wan-AI/Wan2.1-T2V-1.3B-Diffusers and -14B-Diffusers transformer/config.json, for random-weight benchmarks.
        "wan2.1-t2v-1.3b": dict(
            patch_size=(1, 2, 2),
            num_attention_heads=12,
            attention_head_dim=128,
            in_channels=16,
            out_channels=16,
            text_dim=4096,
            freq_dim=256,
            ffn_dim=8960,
            num_layers=30,
        ),
        "wan2.1-t2v-14b": dict(
            patch_size=(1, 2, 2),
            num_attention_heads=40,
            attention_head_dim=128,
            in_channels=16,
            out_channels=16,
            text_dim=4096,
            freq_dim=256,
            ffn_dim=13824,
            num_layers=40,
        ),
    }
    arch_keys = (
        "patch_size",
        "num_attention_heads",
        "attention_head_dim",
        "in_channels",
        "out_channels",
        "text_dim",
        "freq_dim",
        "ffn_dim",
        "num_layers",
        "qk_norm",
        "cross_attn_norm",
        "image_dim",
        "added_kv_proj_dim",
    )
    latent_keys = ("in_channels", "out_channels", "patch_size")
    vae_keys = ("z_dim", "latents_mean", "latents_std", "temperal_downsample")
    fp8_keep = ("condition_embedder.*",)  # the time embedder's weight dtype sets its input's: read as a weight
    lora_targets = tuple(
        f"{attn}.{proj}" for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out.0")
    )
    text_components = ("text_encoder", "tokenizer")
    default_max_sequence_length = 512  # WanPipeline.__call__'s default
    mu_defaults: ClassVar[dict] = {}
    # Wan-AI/Wan2.1-T2V-1.3B-Diffusers scheduler/scheduler_config.json (flow_shift 3.0: 480p; Wan uses 5.0 at 720p)
    scheduler_config: ClassVar[dict] = dict(
        _class_name="UniPCMultistepScheduler",
        beta_end=0.02,
        beta_schedule="linear",
        beta_start=0.0001,
        final_sigmas_type="zero",
        flow_shift=3.0,
        lower_order_final=True,
        num_train_timesteps=1000,
        predict_x0=True,
        prediction_type="flow_prediction",
        solver_order=2,
        solver_type="bh2",
        timestep_spacing="linspace",
        use_flow_sigmas=True,
    )

    def for_run(self, sampling) -> Wan:
        frames = sampling.num_frames
        if frames is None or frames == self.num_frames:
            return self
        if (frames - 1) % self.vae_temporal:
            raise ConfigError(
                f"sampling.num_frames: the Wan VAE encodes 1 + {self.vae_temporal}k frames (81, 49, 5, ...); "
                f"got {frames}"
            )
        twin = copy.copy(self)
        twin.num_frames = frames
        return twin

    def latent_frames(self) -> int:
        return (self.num_frames - 1) // self.vae_temporal + 1

    def latent_shape(self, model, batch: int, resolution: int) -> tuple[int, ...]:
        side = resolution // self.vae_scale
        return (batch, model.config.in_channels, self.latent_frames(), side, side)

    def image_tokens(self, model, resolution: int) -> int:
        frames, height, width = model.config.patch_size
        side = resolution // self.vae_scale
        return (self.latent_frames() // frames) * (side // height) * (side // width)

    def text_widths(self, model) -> tuple[int, int]:
        return model.config.text_dim, 0

    def velocity(self, model, x, sigma, cond, guidance):
        dtype = model_dtype(model)
        use_cfg = guidance is not None and guidance > 1.0  # WanPipeline.do_classifier_free_guidance
        embeds, xs, t = cond.prompt_embeds, x, sigma
        if use_cfg:
            embeds = torch.cat([cond.negative_embeds.expand_as(embeds), embeds])
            xs, t = torch.cat([x, x]), torch.cat([sigma, sigma])
        # the pipeline's timestep: the scheduler's int64 sigma * 1000 (truncated), 999 at the first step
        timestep = (t.double().clamp(max=1 - FIRST_SIGMA_EPS) * 1000).long()
        v = model(
            hidden_states=xs.to(dtype),
            timestep=timestep,
            encoder_hidden_states=embeds.to(dtype),
            return_dict=False,
        )[0]
        return v, (guidance if use_cfg else None)

    def set_timesteps(self, scheduler, num_steps: int, **mu) -> None:
        scheduler.set_timesteps(num_steps, **mu)  # WanPipeline: set_timesteps(num_inference_steps)

    def rollout_grid(self, sigmas: torch.Tensor) -> torch.Tensor:
        if abs(float(sigmas[0]) - 1) <= 2 * FIRST_SIGMA_EPS:
            sigmas = sigmas.clone()
            sigmas[0] = 1.0
        return sigmas

    def encode_prompt(self, pipe, prompts: list[str], device, max_sequence_length: int):
        embeds, _ = pipe.encode_prompt(
            prompts, do_classifier_free_guidance=False, max_sequence_length=max_sequence_length, device=device
        )
        # the pipeline already pads with zeros to max_sequence_length; the mask records the prompt's tokens
        return embeds, (embeds.abs().sum(-1) > 0).float()

    def text_tokens(self, max_sequence_length: int | None = None) -> int:
        return max_sequence_length or self.default_max_sequence_length

    def sampling_inputs(self, embeds, pooled, negative_embeds, negative_pooled, guidance) -> dict:
        batch = embeds.shape[0]
        return dict(
            prompt_embeds=embeds,
            negative_prompt_embeds=negative_embeds.expand(batch, -1, -1),
            guidance_scale=guidance,
            num_frames=self.num_frames,
        )

    def output_images(self, output) -> list:
        """One PNG per video: its frames side by side (a film strip), so sample folders and `eval` stay images."""
        from PIL import Image

        strips = []
        for frames in output.frames:
            w, h = frames[0].size
            strip = Image.new("RGB", (w * len(frames), h))
            for i, frame in enumerate(frames):
                strip.paste(frame, (i * w, 0))
            strips.append(strip)
        return strips

    def check_pipeline_folder(self, folder) -> None:
        index = self.read_json(folder / "model_index.json")
        if (index.get("transformer_2") or [None])[0] is not None or index.get("boundary_ratio") is not None:
            raise self.unsupported(
                f"{folder} is a Wan 2.2 two-expert pipeline (transformer_2, boundary_ratio "
                f"{index.get('boundary_ratio')}): not supported yet; Wan 2.1 pipelines are"
            )
        if index.get("expand_timesteps"):
            raise self.unsupported(f"{folder} is a Wan 2.2 TI2V pipeline (expand_timesteps): not supported yet")

    def tiny_pipeline(self, transformer, parts):
        """UMT5 of d_model 32 = text_dim; a Wan VAE of 4 latent channels = in_channels."""
        from diffusers import UniPCMultistepScheduler

        tokenizer = parts.t5_tokenizer()
        return self.pipeline_class(
            transformer=transformer,
            scheduler=UniPCMultistepScheduler.from_config(self.scheduler_config),
            vae=parts.wan_vae(1),
            text_encoder=parts.umt5_model(tokenizer, 2),
            tokenizer=tokenizer,
        )


FAMILY = Wan()
