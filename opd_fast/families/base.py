"""What a model family is: everything about SD3, FLUX, ... that the trainer, the teachers, the sigma grid, the text
encoders, sampling and the LoRA export need, behind one interface. One module per family sits beside this one and
exposes `FAMILY`, an instance of its Family subclass; opd_fast.families finds them.

A family's state x is what its transformer takes as `hidden_states`: SD3's (B, C, H, W) latent, FLUX's packed
(B, tokens, C * 4). A velocity call returns (v, cfg): with CFG run as one [uncond; cond] batch, v is (2B, ...) and
cfg the scale opd_step applies to the two halves; otherwise v is (B, ...) and cfg is None.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, Protocol

import torch


class TinyParts(Protocol):
    """The seeded tiny components a family's tiny pipeline is put together from (tests/tiny_pipeline.py makes
    them, offline). `seed` is an offset from the pipeline's seed, so each component gets its own weights."""

    def clip_tokenizer(self) -> Any: ...

    def t5_tokenizer(self) -> Any: ...

    def clip_text_model(self, tokenizer, seed: int, with_projection: bool, hidden: int = 16) -> Any: ...

    def t5_model(self, tokenizer, seed: int) -> Any: ...

    def vae(self, seed: int, shift_factor: float) -> Any: ...


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

    def cut_blocks(self, kwargs: dict, layers: int) -> dict:
        """Constructor arguments with the widths of `kwargs` and only the first `layers` blocks."""
        return dict(kwargs, num_layers=min(layers, kwargs["num_layers"]))

    # -- the sigma grid -------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def set_timesteps(self, scheduler, num_steps: int, **mu) -> None:
        """Call the scheduler as the family's pipeline does for `num_steps` steps (`mu`: the dynamic shift)."""

    # -- the text encoders ----------------------------------------------------------------------------------------
    @abc.abstractmethod
    def encode_prompt(self, pipe, prompts: list[str], device, max_sequence_length: int):
        """(embeds (N, T, D), pooled (N, P)) from the pipeline's own encode_prompt, without CFG."""

    @abc.abstractmethod
    def text_tokens(self, max_sequence_length: int | None = None) -> int:
        """T of the released encoders' embeddings at that T5 length (None: the pipeline's default)."""

    # -- the pipeline ---------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def sampling_inputs(self, embeds, pooled, negative_embeds, negative_pooled) -> dict:
        """The text inputs the pipeline's __call__ takes, from a batch's embeddings (B, T, D) / (B, P) and the
        negative prompt's (1, T, D) / (1, P)."""

    def save_lora(self, folder, state: dict[str, torch.Tensor], metadata: dict) -> None:
        """The student's LoRA in the pipeline's layout (`transformer.` prefix), with the adapter metadata so that
        load_lora_weights keeps alpha != r."""
        self.pipeline_class.save_lora_weights(
            folder, transformer_lora_layers=state, transformer_lora_adapter_metadata=metadata
        )

    @abc.abstractmethod
    def tiny_pipeline(self, transformer, parts: TinyParts):
        """A pipeline of tiny seeded components around `transformer` (the tiny preset), for tests that need the
        real pipeline class: its encoders' dimensions line up with the tiny preset's as the released ones do."""
