"""Prompt sets per task, the built-in tiny text encoder, and the embedding cache.

Embeddings are computed once per (encoder, prompt list) and cached as safetensors, so no text encoder is resident
while training. The built-in encoder is deterministic (hash-seeded word vectors plus sinusoidal positions): it lets
the tiny default run with no downloaded weights while still giving each word its own conditioning.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from opd_fast.models import Conditioning


class PromptError(ValueError):
    """A prompt file that cannot be used; the message names the file (and line)."""


@dataclass
class PromptSet:
    prompts: list[str]
    metadata: list[dict] = field(default_factory=list)  # one dict per prompt (jsonl), else empty dicts
    source: str = ""

    def __len__(self) -> int:
        return len(self.prompts)


def check_utf8(path: Path, who: str = "") -> None:
    """A prompt file is UTF-8 text: anything else (a binary file, another encoding) is a PromptError naming the file
    and the line of the first byte that does not decode."""
    data = Path(path).read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise PromptError(
            f"{who}{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); prompt files are "
            "UTF-8 text (.txt, .jsonl, .csv)"
        ) from None


def read_prompts(path: str | Path, task: str = "") -> PromptSet:
    """A .txt file (one prompt per non-empty line) or a .jsonl file (one object per line with a "prompt" string;
    every other field is kept as metadata, e.g. GenEval's tag/include)."""
    path = Path(path)
    who = f"task {task!r}: " if task else ""
    if not path.is_file():
        raise PromptError(f"{who}prompt file not found: {path}")
    check_utf8(path, who)
    prompts, metadata = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if path.suffix == ".jsonl":
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise PromptError(f"{who}{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                    raise PromptError(f"{who}{path}:{lineno}: expected an object with a string field 'prompt'")
                prompts.append(record.pop("prompt").strip())
                metadata.append(record)
            else:
                prompts.append(line)
                metadata.append({})
    if not prompts:
        raise PromptError(f"{who}prompt file is empty: {path}")
    return PromptSet(prompts, metadata, str(path))


class BuiltinTextEncoder:
    """Deterministic word-level encoder: token i of a prompt is a unit-variance vector seeded by the word's CRC32
    plus a sinusoidal position code; pooled output is the mean of per-word pooled vectors. Padding is zeros."""

    name = "builtin-v1"

    def __init__(self, dim: int, pooled_dim: int, max_tokens: int):
        self.dim, self.pooled_dim, self.max_tokens = dim, pooled_dim, max_tokens
        pos = torch.arange(max_tokens, dtype=torch.float64)[:, None]
        freq = torch.exp(-math.log(1e4) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        self.positions = torch.zeros(max_tokens, dim, dtype=torch.float64)
        self.positions[:, 0::2] = torch.sin(pos * freq)
        self.positions[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]

    @staticmethod
    def words(prompt: str) -> list[str]:
        return "".join(c if c.isalnum() else " " for c in prompt.lower()).split()

    def _word_vector(self, word: str, size: int, salt: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(zlib.crc32(word.encode()) * 2 + salt)
        return torch.randn(size, generator=g, dtype=torch.float64)

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds = torch.zeros(len(prompts), self.max_tokens, self.dim, dtype=torch.float64)
        pooled = torch.zeros(len(prompts), self.pooled_dim, dtype=torch.float64)
        for i, prompt in enumerate(prompts):
            words = self.words(prompt)[: self.max_tokens]
            for j, word in enumerate(words):
                embeds[i, j] = self._word_vector(word, self.dim, 0) + 0.5 * self.positions[j]
                pooled[i] += self._word_vector(word, self.pooled_dim, 1) / len(words)
        return embeds.float(), pooled.float()


@dataclass
class EncodedPrompts:
    """A task's prompts with their cached conditioning (CPU float32)."""

    prompts: PromptSet
    embeds: torch.Tensor  # (N, T, D)
    pooled: torch.Tensor  # (N, P)
    negative_embeds: torch.Tensor  # (1, T, D)
    negative_pooled: torch.Tensor  # (1, P)

    def conditioning(self, index: torch.Tensor, device) -> Conditioning:
        """The rows `index` of the set, on `device` (gathered where the cache lives, then copied without a wait)."""
        rows = to_device(index, self.embeds.device)
        return Conditioning(
            to_device(self.embeds[rows], device),
            to_device(self.pooled[rows], device),
            to_device(self.negative_embeds, device),
            to_device(self.negative_pooled, device),
        )

    def to(self, device, dtype: torch.dtype) -> EncodedPrompts:
        """The same set with its tensors on `device` in `dtype` (copied once, e.g. to keep the cache on the GPU)."""
        move = [t.to(device, dtype) for t in (self.embeds, self.pooled, self.negative_embeds, self.negative_pooled)]
        return EncodedPrompts(self.prompts, *move)

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.embeds, self.pooled, self.negative_embeds, self.negative_pooled))


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """`t` on `device` without making the host wait: a copy from pageable host memory to a GPU waits for the device
    to finish its queued work, one from pinned memory does not (the side-stream overlap needs a host that runs
    ahead). torch's pinned allocator keeps the host buffer alive until the copy is done."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _cache_key(encoder_name: str, prompts: list[str], negative: str, extra: dict) -> str:
    blob = json.dumps({"encoder": encoder_name, "prompts": prompts, "negative": negative, **extra}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def encode_cached(
    prompt_set: PromptSet, encode_fn, encoder_name: str, negative: str, cache_file: Path, extra: dict | None = None
) -> EncodedPrompts:
    """Encode the prompts (and the negative prompt) once; later runs read `cache_file` if its key matches."""
    key = _cache_key(encoder_name, prompt_set.prompts, negative, extra or {})
    cache_file = Path(cache_file)
    if cache_file.is_file():
        from safetensors import safe_open

        with safe_open(str(cache_file), "pt") as f:
            stored_key = (f.metadata() or {}).get("key")
        if stored_key == key:
            t = load_file(str(cache_file))
            return EncodedPrompts(prompt_set, t["embeds"], t["pooled"], t["negative_embeds"], t["negative_pooled"])
    embeds, pooled = encode_fn(prompt_set.prompts)
    negative_embeds, negative_pooled = encode_fn([negative])
    tensors = {
        "embeds": embeds.contiguous(),
        "pooled": pooled.contiguous(),
        "negative_embeds": negative_embeds.contiguous(),
        "negative_pooled": negative_pooled.contiguous(),
    }
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"key": key, "encoder": encoder_name})
    os.replace(tmp, cache_file)
    return EncodedPrompts(prompt_set, embeds, pooled, negative_embeds, negative_pooled)
