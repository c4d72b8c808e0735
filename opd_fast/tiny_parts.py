"""Tiny model parts of every family, built from config, offline: the one place they are made.

Two callers need them and must agree to the weight: `opd-fast tiny-world` (opd_fast/tiny_world.py), whose
checked-in output (configs/tiny/pipeline, configs/tiny/clip) has to stay byte-identical, and the tests
(tests/tiny_pipeline.py), which write a tiny pipeline of every family. Nothing is downloaded: the tokenizers are
built with the `tokenizers` library (a byte-level BPE for CLIP and Qwen, a Unigram for T5/UMT5), the models from
small configs with seeded random weights. A family puts its pipeline together from these parts
(Family.tiny_pipeline, via TinyParts), so that the dimensions line up as in its released pipeline.

Each builder seeds the global torch RNG itself (so a part's weights do not depend on what was built before it) and
leaves it there: callers that must not disturb their own RNG wrap the call in torch.random.fork_rng.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

CLIP_MAX_LENGTH = 77  # the pipelines read tokenizer.model_max_length; 77 as released
T5_WORDS = ["a", "the", "of", "photo", "cat", "dog", "red", "blue", "sign", "says", "on", "with"]
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_CHAT_TEMPLATE = (  # Qwen's chat layout, enough for ZImagePipeline's apply_chat_template
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# -- tokenizers ----------------------------------------------------------------------------------------------


def clip_tokenizer():
    """A byte-level BPE with a handful of merges: CLIP's tokenizer class, nothing downloaded."""
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
    """A Unigram over single characters and a few whole words: T5's tokenizer class (UMT5 uses it too)."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in string.ascii_letters + string.digits + string.punctuation]
    pieces += [("\u2581" + w, -1.0) for w in T5_WORDS]
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


def qwen_tokenizer():
    """A byte-level BPE in Qwen2's layout (Qwen-Image's Qwen2.5-VL and Z-Image's Qwen3 share it): every byte a
    token, a few merges, Qwen's chat special tokens."""
    from transformers import Qwen2TokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    merges = [("t", "h"), ("th", "e"), ("a", "t"), ("c", "at"), ("\u0120", "a")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tokenizer = Qwen2TokenizerFast(vocab=vocab, merges=merges, unk_token=None, pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL[1:]})
    tokenizer.add_special_tokens({"eos_token": "<|im_end|>"})
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


# -- text encoders -------------------------------------------------------------------------------------------


def clip_text_model(tokenizer, seed: int, with_projection: bool, hidden: int = 16, projection: int = 16):
    """SD3's and Flux's CLIP text encoders (CLIPTextModel, or CLIPTextModelWithProjection for a pooled output)."""
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


def _t5_like(config_class, model_class, tokenizer, seed: int, d_model: int):
    """T5 and UMT5 encoders take the same config; one block, so the pipelines' shapes stay tiny."""
    config = config_class(
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
    return model_class(config).eval()


def t5_model(tokenizer, seed: int, d_model: int = 32):
    """SD3's and Flux's T5 text encoder class (T5EncoderModel)."""
    from transformers import T5Config, T5EncoderModel

    return _t5_like(T5Config, T5EncoderModel, tokenizer, seed, d_model)


def umt5_model(tokenizer, seed: int, d_model: int = 32):
    """Wan's text encoder class (UMT5EncoderModel)."""
    from transformers import UMT5Config, UMT5EncoderModel

    return _t5_like(UMT5Config, UMT5EncoderModel, tokenizer, seed, d_model)


def qwen2_5_vl_model(tokenizer, seed: int, hidden: int = 32):
    """Qwen-Image's text encoder class (Qwen2_5_VLForConditionalGeneration), text hidden `hidden`, a one-block
    vision tower it never uses for text."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=hidden),
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def qwen3_model(tokenizer, seed: int, hidden: int = 32):
    """Z-Image's text encoder class (Qwen3Model), two blocks (the pipeline reads the second-to-last hidden state)."""
    from transformers import Qwen3Config, Qwen3Model

    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return Qwen3Model(config).eval()


# -- VAEs ----------------------------------------------------------------------------------------------------


def tiny_vae(seed: int, shift_factor: float | None):
    """SD3's and Flux's AutoencoderKL. Four levels: 8 pixels per latent cell, as the released VAEs (and
    Family.vae_scale)."""
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


def video_vae_kwargs(z_dim: int = 4) -> dict:
    """Wan / Qwen-Image causal 3-D VAE: 8 pixels per latent cell (three downsamplings), 4 frames per latent frame."""
    return dict(
        base_dim=8,
        z_dim=z_dim,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.1 * i for i in range(z_dim)],
        latents_std=[1.0 + 0.5 * i for i in range(z_dim)],
    )


def wan_vae(seed: int):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(**video_vae_kwargs()).eval()


def qwen_image_vae(seed: int):
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(**video_vae_kwargs()).eval()


# -- what a family assembles its pipeline from -------------------------------------------------------------


class TinyParts:
    """The seeded parts of a tiny pipeline (opd_fast.families.base.TinyParts, every family's): component seeds are
    offsets from `seed`, so one pipeline seed gives each component its own weights."""

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

    def vae(self, seed: int, shift_factor: float | None):
        return tiny_vae(self.seed + seed, shift_factor)

    def qwen_tokenizer(self):
        return qwen_tokenizer()

    def qwen2_5_vl_model(self, tokenizer, seed: int):
        return qwen2_5_vl_model(tokenizer, self.seed + seed)

    def qwen3_model(self, tokenizer, seed: int):
        return qwen3_model(tokenizer, self.seed + seed)

    def umt5_model(self, tokenizer, seed: int):
        return umt5_model(tokenizer, self.seed + seed)

    def wan_vae(self, seed: int):
        return wan_vae(self.seed + seed)

    def qwen_image_vae(self, seed: int):
        return qwen_image_vae(self.seed + seed)


def write_pipeline(folder: str | Path, family, seed: int = 0, transformer=None) -> Path:
    """Save `family`'s (an opd_fast.families.Family) tiny pipeline to `folder` (safetensors, diffusers layout).
    With transformer=None model_index.json names none, and whoever loads it passes one
    (from_pretrained(folder, transformer=...)): the tiny world's case, whose student comes from the run."""
    folder = Path(folder)
    pipe = family.tiny_pipeline(transformer, TinyParts(seed))
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def write_clip(folder: str | Path, seed: int = 0, image_size: int = 32, aesthetic_head: bool = False) -> Path:
    """A tiny random CLIPModel + CLIPProcessor folder: what the CLIP-based rewards load (PickScore, CLIPScore, the
    aesthetic predictor's backbone, GenEval's color classifier). aesthetic_head=True adds
    aesthetic_head.safetensors (the LAION head's layout, one Linear 16 -> 1, seeded from seed + 1), which the
    aesthetic reward loads beside the backbone; the tests' folders go without."""
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
    if aesthetic_head:
        from safetensors.torch import save_file

        g = torch.Generator().manual_seed(seed + 1)
        head = {"layers.0.weight": torch.randn(1, 16, generator=g), "layers.0.bias": torch.zeros(1)}
        save_file(head, str(folder / "aesthetic_head.safetensors"))
    processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    CLIPProcessor(image_processor=processor, tokenizer=tok).save_pretrained(folder)
    return folder
