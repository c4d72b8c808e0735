"""Tiny diffusers pipeline folders of every model family, built from config, for tests that need the real pipeline
classes: text encoders + tokenizers, the transformer (the family's tiny preset), a VAE and the scheduler.

The parts are opd_fast/tiny_parts.py's (re-exported here), the same builders `opd-fast tiny-world` uses, so the
checked-in tiny world and the tests' pipelines come from one definition; each family puts its pipeline together
from them (Family.tiny_pipeline). What is test-only lives here: the one-thread fixture, and pipelines that carry
the family's tiny transformer.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from opd_fast.tiny_parts import (  # noqa: F401  (re-exported: the tests' names for the parts)
    CLIP_MAX_LENGTH,
    QWEN_CHAT_TEMPLATE,
    QWEN_SPECIAL,
    T5_WORDS,
    TinyParts,
    clip_text_model,
    clip_tokenizer,
    qwen2_5_vl_model,
    qwen3_model,
    qwen_image_vae,
    qwen_tokenizer,
    t5_model,
    t5_tokenizer,
    tiny_vae,
    umt5_model,
    video_vae_kwargs,
    wan_vae,
    write_clip,
    write_pipeline,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: OpenMP threads fighting other processes make a 1 ms conv take 50 ms.
    Import this into a test module (autouse) to run its tests on one intra-op thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_transformer(family):
    from opd_fast.config import ModelConfig
    from opd_fast.models import load_transformer

    return load_transformer(ModelConfig(family=family.name, preset=family.tiny_preset), family)


def write_tiny_pipeline(folder: str | Path, family, seed: int = 0) -> Path:
    """Save a tiny pipeline of `family` (an opd_fast.families.Family) to `folder` (safetensors, diffusers layout)
    and return the folder; unlike the tiny world's, it carries the family's tiny transformer."""
    return write_pipeline(folder, family, seed, tiny_transformer(family))


def write_tiny_clip(folder: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """A tiny random CLIPModel + CLIPProcessor folder: what the CLIP-based rewards load (PickScore, CLIPScore,
    the aesthetic predictor's backbone, GenEval's color classifier)."""
    return write_clip(folder, seed, image_size)


def write_tiny_wan22_pipeline(folder: str | Path, boundary_ratio: float = 0.875, seed: int = 0) -> Path:
    """A tiny Wan 2.2 two-expert pipeline folder (WanPipeline with `transformer` for high noise, `transformer_2` for
    low noise, switched at boundary_ratio, as Wan2.2-T2V-A14B): the tiny Wan pipeline's VAE, UMT5 and scheduler,
    two tiny-wan experts of their own seeded weights."""
    import copy

    from opd_fast.families import get_family
    from opd_fast.models import init_output_layer

    family = get_family("wan")
    pipe = family.tiny_pipeline(tiny_transformer(family), TinyParts(seed))
    low = copy.deepcopy(pipe.transformer)
    with torch.random.fork_rng(devices=[]), torch.no_grad():  # the low-noise expert: other weights, same shapes
        torch.manual_seed(seed + 100)
        for p in low.parameters():
            p.add_(0.05 * torch.randn_like(p))
        init_output_layer(family.output_layer(low))
    pipe = family.pipeline_class(
        transformer=pipe.transformer,
        transformer_2=low,
        boundary_ratio=boundary_ratio,
        scheduler=pipe.scheduler,
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)
