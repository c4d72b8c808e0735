"""Tiny diffusers pipeline folders of every model family, built from config, for tests that need the real pipeline
classes: text encoders + tokenizers, the transformer (the family's tiny preset), a VAE and the scheduler.

Nothing is downloaded: the tokenizers are built offline with the `tokenizers` library (a byte-level BPE for CLIP,
a Unigram for T5), the models from small configs with seeded random weights. This module makes the parts (TinyParts);
each family puts its pipeline together from them (Family.tiny_pipeline), so that the dimensions line up as in its
released pipeline.
"""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: OpenMP threads fighting other processes make a 1 ms conv take 50 ms.
    Import this into a test module (autouse) to run its tests on one intra-op thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CLIP_MAX_LENGTH = 77  # the pipelines read tokenizer.model_max_length; 77 as released
T5_WORDS = ["a", "the", "of", "photo", "cat", "dog", "red", "blue", "sign", "says", "on", "with"]


def clip_tokenizer():
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges = [("t", "h"), ("th", "e</w>"), ("a", "t</w>"), ("c", "at</w>"), ("o", "f</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)


def t5_tokenizer():
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in string.ascii_letters + string.digits + string.punctuation]
    pieces += [("\u2581" + w, -1.0) for w in T5_WORDS]
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


def clip_text_model(tokenizer, seed: int, with_projection: bool, hidden: int = 16, projection: int = 16):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=projection,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def t5_model(tokenizer, seed: int, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=1,
        num_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


def tiny_vae(seed: int, shift_factor: float | None):
    """Four levels: 8 pixels per latent cell, as the released VAEs (and Family.vae_scale)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=1.5,
        shift_factor=shift_factor,
    ).eval()


class TinyParts:
    """The seeded parts of a tiny pipeline (opd_fast.families.base.TinyParts): component seeds are offsets from
    `seed`."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def clip_tokenizer(self):
        return clip_tokenizer()

    def t5_tokenizer(self):
        return t5_tokenizer()

    def clip_text_model(self, tokenizer, seed: int, with_projection: bool, hidden: int = 16):
        return clip_text_model(tokenizer, self.seed + seed, with_projection, hidden=hidden)

    def t5_model(self, tokenizer, seed: int):
        return t5_model(tokenizer, self.seed + seed)

    def vae(self, seed: int, shift_factor: float):
        return tiny_vae(self.seed + seed, shift_factor)


def tiny_transformer(family):
    from opd_fast.config import ModelConfig
    from opd_fast.models import load_transformer

    return load_transformer(ModelConfig(family=family.name, preset=family.tiny_preset), family)


def write_tiny_pipeline(folder: str | Path, family, seed: int = 0) -> Path:
    """Save a tiny pipeline of `family` (an opd_fast.families.Family) to `folder` (safetensors, diffusers layout)
    and return the folder."""
    folder = Path(folder)
    pipe = family.tiny_pipeline(tiny_transformer(family), TinyParts(seed))
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def write_tiny_clip(folder: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """A tiny random CLIPModel + CLIPProcessor folder: what the CLIP-based rewards load (PickScore, CLIPScore,
    the aesthetic predictor's backbone, GenEval's color classifier)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    folder = Path(folder)
    tok = clip_tokenizer()
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=CLIP_MAX_LENGTH,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(
            image_size=image_size,
            patch_size=8,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
        ),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    CLIPModel(config).eval().save_pretrained(folder)
    processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    CLIPProcessor(image_processor=processor, tokenizer=tok).save_pretrained(folder)
    return folder
