"""What a model family is: everything about SD3, FLUX, ... that the trainer, the teachers, the sigma grid, the text
encoders, sampling and the LoRA export need, behind one interface. One module per family sits beside this one and
exposes `FAMILY`, an instance of its Family subclass; opd_fast.families finds them.

A family's state x is what its transformer takes as `hidden_states`: SD3's (B, C, H, W) latent, FLUX's and
Qwen-Image's packed (B, tokens, C * 4), Wan's video latent (B, C, F, H, W). A velocity call returns (v, cfg): with a
linear CFG run as one [uncond; cond] batch, v is (2B, ...) and cfg the scale opd_step applies to the two halves;
otherwise v is (B, ...) and cfg is None (no CFG, a guidance embedding, or a guidance that is not linear in the two
predictions, such as Qwen-Image's norm-rescaled true CFG, which the family combines itself).

The text conditioning (opd_fast.models.Conditioning) has two tensors per prompt: `prompt_embeds` (B, T, D) and a
second one whose meaning is the family's: SD3 and FLUX, the pooled projection (B, P); the families whose text
encoder gives one sequence (Qwen-Image, Wan, Z-Image), the token mask (B, T) (1.0 = a real token), because their
pipelines trim or mask the padding the embedding cache needs to stack prompts of different lengths.
"""

from __future__ import annotations

import abc
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar, Protocol

import torch

from opd_fast.config import OFFICIAL_LORA_TARGETS, ConfigError


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype a model computes in: its first floating parameter's, past the modules diffusers keeps in fp32 when
    it loads a model in 16 bits (Wan's time embedder, norms and modulation tables come first in its parameters). A
    DDP wrapper is looked through."""
    keep = getattr(getattr(model, "module", model), "_keep_in_fp32_modules", None) or ()
    params = [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]
    return next((p.dtype for n, p in params if not any(k in n.split(".") for k in keep)), params[0][1].dtype)


class TinyParts(Protocol):
    """The seeded tiny components a family's tiny pipeline is put together from (opd_fast/tiny_parts.py makes
    them, offline). `seed` is an offset from the pipeline's seed, so each component gets its own weights."""

    def clip_tokenizer(self) -> Any: ...

    def t5_tokenizer(self) -> Any: ...

    def clip_text_model(self, tokenizer, seed: int, with_projection: bool, hidden: int = 16) -> Any: ...

    def t5_model(self, tokenizer, seed: int) -> Any: ...

    def vae(self, seed: int, shift_factor: float) -> Any: ...

    def qwen_tokenizer(self) -> Any: ...  # Qwen2's byte-level BPE with the chat special tokens and template

    def qwen2_5_vl_model(self, tokenizer, seed: int) -> Any: ...  # Qwen-Image's text encoder, hidden 32

    def qwen3_model(self, tokenizer, seed: int) -> Any: ...  # Z-Image's text encoder, hidden 32

    def umt5_model(self, tokenizer, seed: int) -> Any: ...  # Wan's text encoder, d_model 32

    def wan_vae(self, seed: int) -> Any: ...  # 4 latent channels

    def qwen_image_vae(self, seed: int) -> Any: ...  # 4 latent channels


def unnormalise_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """(B, z_dim, F, H, W) latents in the VAE's dtype, un-normalised by its per-channel mean and std, as the tails
    of WanPipeline and QwenImagePipeline (Wan's VAE) do: latents / (1 / std) + mean."""
    latents = latents.to(vae.device, vae.dtype)
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
    inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
    return latents / inverse_std + mean


class Family(abc.ABC):
    """One model family. Its data are class constants of the subclass; its methods take the model they act on."""

    name: str  # the model.family value
    transformer_class: type  # the diffusers transformer
    pipeline_class_name: str  # the diffusers pipeline, as a folder's model_index.json names it
    # preset name -> transformer constructor arguments (preset names are unique across families)
    presets: ClassVar[dict[str, dict]]
    tiny_preset: str  # the CPU-sized preset (milliseconds to build) that the tests run the family with
    arch_keys: tuple[str, ...]  # transformer config keys a full-model teacher must share with the student's base
    text_components: tuple[str, ...]  # the pipeline's text encoders and tokenizers
    default_max_sequence_length: int  # the pipeline's encode_prompt default (T5 tokens)
    scheduler_config: ClassVar[dict]  # scheduler/scheduler_config.json of the released pipeline
    mu_defaults: ClassVar[dict]  # what the pipeline assumes for a dynamic-shift key its scheduler config lacks
    vae_scale = 8  # pixels per latent cell of the family's VAE
    # the attention projections its recommended LoRA trains (configs/ name them; the tests' LoRAs use them)
    lora_targets: ClassVar[tuple[str, ...]] = tuple(OFFICIAL_LORA_TARGETS)
    # Linear layers an FP8 teacher keeps in high precision beyond fp8.DEFAULT_SKIP (SD3's and FLUX's embedders,
    # norms and final projection): this family's own embedders and modulations, read as weights elsewhere or
    # carrying most of the FP8 error (bench/fp8_accuracy.py --per-layer)
    fp8_keep: ClassVar[tuple[str, ...]] = ()
    no_guidance: float = 1.0  # the guidance value its pipeline takes as "no guidance" (sampling without one)
    # What makes a teacher of another size speak the student's latent space: its transformer's config keys (the
    # latent channels in and out, the patching) and its VAE's (latent channels, scaling and shift, or per-channel
    # statistics); the sigma schedule is compared through the scheduler config (opd_fast.teachers).
    latent_keys: ClassVar[tuple[str, ...]] = ("in_channels", "out_channels", "patch_size")
    vae_keys: ClassVar[tuple[str, ...]] = ("latent_channels", "scaling_factor", "shift_factor")

    @property
    def pipeline_class(self) -> type:
        import diffusers  # the pipeline classes import transformers: only when a pipeline is used

        return getattr(diffusers, self.pipeline_class_name)

    def __repr__(self) -> str:
        return f"<model family {self.name}>"

    # -- the transformer ------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def latent_shape(self, model, batch: int, resolution: int) -> tuple[int, ...]:
        """The shape of a batch of states x at `resolution` pixels."""

    @abc.abstractmethod
    def image_tokens(self, model, resolution: int) -> int:
        """The transformer's image tokens at `resolution` (the `image_seq_len` of a dynamic sigma shift)."""

    @abc.abstractmethod
    def velocity(self, model, x, sigma, cond, guidance: float | None) -> tuple[torch.Tensor, float | None]:
        """(v, cfg): the model's velocity at state x (B, ...) and noise level sigma (B,) for the batch's text
        conditioning `cond` (an opd_fast.models.Conditioning), with `guidance` applied the family's way (module
        docstring: what v and cfg are)."""

    def guidance(self, model, guidance: float | None, guidance_2: float | None, key: str):
        """The guidance that velocity and sampling_inputs take for `model`, from a config's guidance and guidance_2
        (`key`: the latter's config key). Only a model whose pipeline switches transformers (Wan 2.2's experts)
        takes a second scale; elsewhere it is an error, as WanPipeline's own for a pipeline without a boundary."""
        if guidance_2 is not None:
            raise ConfigError(
                f"{key}: the {self.name} model has one transformer; a second guidance is for a two-expert model "
                "(Wan 2.2's low-noise expert: WanPipeline's guidance_scale_2)"
            )
        return guidance

    def cut_blocks(self, kwargs: dict, layers: int) -> dict:
        """Constructor arguments with the widths of `kwargs` and only the first `layers` blocks."""
        return dict(kwargs, num_layers=min(layers, kwargs["num_layers"]))

    def text_widths(self, model) -> tuple[int, int]:
        """(D, P): the width of the text embeddings the transformer takes and of its pooled input (0: the family's
        second text tensor is the token mask, whose width is T)."""
        return model.config.joint_attention_dim, model.config.pooled_projection_dim

    def random_conditioning(self, model, batch: int, tokens: int, generator=None):
        """Random text conditioning of the model's widths (tests, benchmarks): embeddings N(0, 1); a mask family's
        prompts use every token, its negative prompt leaves its last token as padding (zeros, masked), so the
        padding path runs too."""
        from opd_fast.models import Conditioning

        dim, pooled = self.text_widths(model)
        embeds = torch.randn(batch, tokens, dim, generator=generator)
        negative = torch.randn(1, tokens, dim, generator=generator)
        if pooled:
            return Conditioning(
                embeds,
                torch.randn(batch, pooled, generator=generator),
                negative,
                torch.randn(1, pooled, generator=generator),
            )
        negative_mask = torch.ones(1, tokens)
        negative_mask[:, -1] = 0
        return Conditioning(embeds, torch.ones(batch, tokens), negative * negative_mask[..., None], negative_mask)

    def for_run(self, sampling) -> Family:
        """The family as a run's `sampling` section sets it up (a video family: its length); the registry's object
        itself never changes. Image families take no video length."""
        if sampling.num_frames is not None:
            raise ConfigError(f"sampling.num_frames: model.family {self.name!r} makes images, not videos; remove it")
        return self

    def output_layer(self, model) -> torch.nn.Linear:
        """The transformer's final projection (a preset's random weights initialise it: models.init_output_layer)."""
        return model.proj_out

    def builtin_text_encoder(self, model, max_tokens: int):
        """(encode_fn, cache name) of the built-in deterministic encoder at the model's text widths (prompts.encoder
        builtin); a mask family's second tensor is the mask of the prompt's words."""
        from opd_fast.prompts import BuiltinTextEncoder

        dim, pooled = self.text_widths(model)
        enc = BuiltinTextEncoder(dim, max(pooled, 1), max_tokens)
        name = f"{enc.name}-{enc.dim}-{enc.pooled_dim}-{enc.max_tokens}"
        if pooled:
            return enc.encode, name

        def encode(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
            embeds, _ = enc.encode(prompts)
            return embeds, (embeds.abs().sum(-1) > 0).float()  # the encoder pads with zeros

        return encode, f"{name}-mask"

    def check_model(self, model_cfg) -> None:
        """A ConfigError for a model folder this family cannot train yet (before any model loads); model_cfg is
        the run's `model` section."""
        if model_cfg.path is not None and (Path(model_cfg.path) / "model_index.json").is_file():
            self.check_pipeline_folder(Path(model_cfg.path))

    def check_pipeline_folder(self, folder: Path) -> None:
        """A ConfigError for a pipeline folder of this family's class in a layout it does not support."""

    def load_pretrained(self, folder: Path, dtype: torch.dtype) -> torch.nn.Module:
        """The model saved in the transformer folder `folder` (safetensors only), as this family trains it (a family
        whose pipeline switches between several transformers returns them as one module)."""
        return self.transformer_class.from_pretrained(folder, dtype=dtype, use_safetensors=True)

    def pipeline_model(self, pipe) -> torch.nn.Module:
        """The model a pipeline denoises with, as load_pretrained gives it (pipe.transformer)."""
        return pipe.transformer

    def set_pipeline_model(self, pipe, model: torch.nn.Module) -> None:
        """Put `model` (as pipeline_model gives it) into the pipeline."""
        pipe.transformer = model

    def pipeline_components(self, model: torch.nn.Module) -> dict:
        """from_pretrained's keyword arguments that build the pipeline around `model` (as pipeline_model gives it)
        instead of loading its transformer(s) from the folder."""
        return {"transformer": model}

    @staticmethod
    def read_json(file: Path) -> dict:
        return json.loads(Path(file).read_text())

    def unsupported(self, what: str) -> ConfigError:
        return ConfigError(f"model.path: {what} (model.family {self.name!r})")

    # -- the sigma grid -------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def set_timesteps(self, scheduler, num_steps: int, **mu) -> None:
        """Call the scheduler as the family's pipeline does for `num_steps` steps (`mu`: the dynamic shift)."""

    def rollout_grid(self, sigmas: torch.Tensor) -> torch.Tensor:
        """The rollout's sigmas from the ones the pipeline's scheduler holds (a family whose scheduler nudges a
        sigma for its own integrator's sake puts it back)."""
        return sigmas

    # -- the text encoders ----------------------------------------------------------------------------------------
    @abc.abstractmethod
    def encode_prompt(self, pipe, prompts: list[str], device, max_sequence_length: int):
        """(embeds (N, T, D), pooled (N, P)) from the pipeline's own encode_prompt, without CFG."""

    @abc.abstractmethod
    def text_tokens(self, max_sequence_length: int | None = None) -> int:
        """T of the released encoders' embeddings at that T5 length (None: the pipeline's default)."""

    # -- the pipeline ---------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def sampling_inputs(self, embeds, pooled, negative_embeds, negative_pooled, guidance: float) -> dict:
        """The text and guidance inputs the pipeline's __call__ takes, from a batch's embeddings (B, T, D) / (B, P)
        and the negative prompt's (1, T, D) / (1, P), at `guidance` (the family's own meaning of it)."""

    def output_images(self, output) -> list:
        """The PIL images of a pipeline call's output (one per prompt)."""
        return output.images

    @torch.no_grad()
    def decode_latents(self, pipe, latents: torch.Tensor, resolution: int) -> list:
        """Final states `latents` (latent_shape's layout) as the PIL images output_images gives: what the pipeline's
        own __call__ makes of its last latents with output_type "pil" (its VAE, text encoders and transformer may
        be None). Here SD3's and Z-Image's tail: unscale, unshift, decode, postprocess."""
        vae = pipe.vae
        latents = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        pixels = vae.decode(latents, return_dict=False)[0]
        return self.output_images(SimpleNamespace(images=pipe.image_processor.postprocess(pixels, output_type="pil")))

    def save_lora(self, folder, state: dict[str, torch.Tensor], metadata: dict) -> None:
        """The student's LoRA in the pipeline's layout (`transformer.` prefix), with the adapter metadata so that
        load_lora_weights keeps alpha != r."""
        self.pipeline_class.save_lora_weights(
            folder, transformer_lora_layers=state, transformer_lora_adapter_metadata=metadata
        )

    def load_lora_into_pipeline(self, pipe, folder) -> None:
        """A LoRA that save_lora wrote, loaded by the pipeline's own load_lora_weights and fused."""
        pipe.load_lora_weights(folder)  # diffusers' own loader: the exported alpha/r metadata is honoured
        pipe.fuse_lora()

    @abc.abstractmethod
    def tiny_pipeline(self, transformer, parts: TinyParts):
        """A pipeline of tiny seeded components around `transformer` (the tiny preset), for tests that need the
        real pipeline class: its encoders' dimensions line up with the tiny preset's as the released ones do."""
