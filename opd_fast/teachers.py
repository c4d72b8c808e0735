"""Task teachers: frozen transformers with their LoRA merged into the weights.

A teacher comes as a LoRA on the student's base (peft adapter folder, or diffusers `pytorch_lora_weights` file) or
as a full transformer folder. It must fit the base: a LoRA that targets modules the base lacks, or whose shapes
differ, or a full model of another architecture, is a TeacherError naming the teacher and the mismatch.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from opd_fast.config import ModelConfig, TeacherConfig
from opd_fast.models import TRANSFORMER_CLASSES, frozen_copy, transformer_folder
from opd_fast.safeio import PICKLE_SUFFIXES, load_tensors

log = logging.getLogger(__name__)
ARCH_KEYS = ("in_channels", "out_channels", "num_layers", "num_single_layers", "attention_head_dim",
             "num_attention_heads", "joint_attention_dim", "pooled_projection_dim", "caption_projection_dim",
             "patch_size", "dual_attention_layers", "qk_norm")  # fmt: skip
DIFFUSERS_LORA_FILES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
PEFT_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


class TeacherError(ValueError):
    """A teacher that cannot be loaded onto the student's base; the message names the teacher."""


@dataclass
class Teacher:
    name: str
    model: torch.nn.Module
    guidance: float | None


@dataclass
class LoraWeights:
    """A LoRA as module path -> (A (r, in), B (out, r)) plus the scale alpha / r for each module."""

    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scales: dict[str, float]


def detect_format(path: Path) -> str:
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            return "peft"
        if any((path / f).is_file() for f in DIFFUSERS_LORA_FILES):
            return "diffusers"
        if (path / "config.json").is_file() or (path / "transformer" / "config.json").is_file():
            return "full"
        raise TeacherError(f"{path}: not a peft adapter folder (adapter_config.json), a diffusers LoRA "
                           f"({' / '.join(DIFFUSERS_LORA_FILES)}) or a model folder (config.json)")
    if path.suffix == ".safetensors" or path.suffix in PICKLE_SUFFIXES:
        return "diffusers"  # a bare LoRA file: its key prefixes are checked when it is read
    raise TeacherError(f"{path}: not a LoRA weight file or a folder")


def _split_lora_key(key: str) -> tuple[str, str] | None:
    """'blocks.0.attn.to_q.lora_A.weight' -> ('blocks.0.attn.to_q', 'A'); adapter-named keys (lora_A.x.weight) too."""
    for which in ("A", "B"):
        marker = f".lora_{which}."
        if marker in key and key.endswith(".weight"):
            return key.split(marker)[0], which
    return None


def _pair_up(state: dict[str, torch.Tensor], prefix: str, where: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if not key.startswith(prefix):
            raise TeacherError(f"{where}: key {key!r} does not start with {prefix!r}: not a LoRA of this layout")
        split = _split_lora_key(key[len(prefix):])
        if split is None:
            raise TeacherError(f"{where}: key {key!r} is not a lora_A/lora_B weight (DoRA, bias or other extras are "
                               "not supported)")
        module, which = split
        halves.setdefault(module, {})[which] = tensor
    incomplete = [m for m, h in halves.items() if len(h) != 2]
    if incomplete:
        raise TeacherError(f"{where}: modules with only one of lora_A/lora_B: {incomplete[:3]}")
    return {m: (h["A"], h["B"]) for m, h in halves.items()}


def _scale(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def _module_scales(pairs, config: dict, prefix_in_patterns: str = "") -> dict[str, float]:
    """alpha / r per module, honouring peft's rank_pattern / alpha_pattern (keys matched as suffixes)."""
    rslora = bool(config.get("use_rslora", False))
    default_alpha = config.get("lora_alpha")
    alpha_pattern = config.get("alpha_pattern") or {}
    scales = {}
    for module, (A, _) in pairs.items():
        rank = A.shape[0]
        alpha = default_alpha if default_alpha is not None else rank
        for pattern, value in alpha_pattern.items():
            pattern = pattern.removeprefix(prefix_in_patterns)
            if module == pattern or module.endswith("." + pattern):
                alpha = value
        scales[module] = _scale(alpha, rank, rslora)
    return scales


def read_peft_lora(path: Path, where: str) -> LoraWeights:
    config = json.loads((path / "adapter_config.json").read_text())
    if config.get("use_dora"):
        raise TeacherError(f"{where}: DoRA adapters are not supported (use_dora: true in adapter_config.json)")
    weight_file = next((path / f for f in PEFT_WEIGHT_FILES if (path / f).is_file()), None)
    if weight_file is None:
        raise TeacherError(f"{where}: {path} has adapter_config.json but none of {PEFT_WEIGHT_FILES}")
    state = load_tensors(weight_file, where)
    prefix = "base_model.model." if all(k.startswith("base_model.model.") for k in state) else ""
    pairs = _pair_up(state, prefix, where)
    return LoraWeights(pairs, _module_scales(pairs, config))


def read_diffusers_lora(path: Path, where: str) -> LoraWeights:
    file = next((path / f for f in DIFFUSERS_LORA_FILES if (path / f).is_file()), None) if path.is_dir() else path
    if file is None:
        raise TeacherError(f"{where}: no {' or '.join(DIFFUSERS_LORA_FILES)} in {path}")
    state = load_tensors(file, where)
    if all(k.startswith("base_model.model.") for k in state):
        prefix = "base_model.model."  # a peft-layout file passed on its own
    else:
        prefix = "transformer."
    config = {}
    if file.suffix == ".safetensors":
        with safe_open(str(file), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
        config = {k.removeprefix("transformer."): v for k, v in meta.items() if k.startswith("transformer.")}
    pairs = _pair_up(state, prefix, where)
    if "lora_alpha" not in config:
        log.warning("%s: no lora_adapter_metadata in %s: assuming alpha == rank, as diffusers does", where, file)
    return LoraWeights(pairs, _module_scales(pairs, config))


@torch.no_grad()
def merge_lora(model: torch.nn.Module, lora: LoraWeights, where: str) -> None:
    """W += scale * B @ A for every module of the LoRA, in float32, written back in the weight's dtype."""
    modules = dict(model.named_modules())
    for name, (A, B) in lora.pairs.items():
        module = modules.get(name)
        if module is None or not isinstance(module, torch.nn.Linear):
            raise TeacherError(f"{where}: LoRA targets {name!r}, which the student's base has no Linear layer for "
                               "(a LoRA for another base model or other target modules?)")
        W = module.weight
        if A.shape[1] != W.shape[1] or B.shape[0] != W.shape[0] or A.shape[0] != B.shape[1]:
            raise TeacherError(f"{where}: LoRA for {name!r} has lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} "
                               f"but the base weight is {tuple(W.shape)} (a LoRA for another base model?)")
        delta = lora.scales[name] * (B.float() @ A.float())
        W.copy_((W.float() + delta.to(W.device)).to(W.dtype))


def _check_architecture(base: torch.nn.Module, teacher: torch.nn.Module, where: str) -> None:
    diffs = []
    for key in ARCH_KEYS:
        a, b = base.config.get(key), teacher.config.get(key)
        if isinstance(a, list):
            a = tuple(a)
        if isinstance(b, list):
            b = tuple(b)
        if a != b:
            diffs.append(f"{key}: student {a} vs teacher {b}")
    if diffs:
        raise TeacherError(f"{where}: its architecture differs from the student's: {'; '.join(diffs)}")


def load_teacher(name: str, cfg: TeacherConfig, base: torch.nn.Module, model_cfg: ModelConfig) -> Teacher:
    """A frozen teacher for task `name` on top of `base` (the student's base transformer, without its LoRA)."""
    where = f"teacher of task {name!r}"
    path = Path(cfg.path)
    if not path.exists():
        raise TeacherError(f"{where}: path does not exist: {path}")
    fmt = detect_format(path) if cfg.format == "auto" else cfg.format
    if fmt == "full":
        cls = TRANSFORMER_CLASSES[model_cfg.family]
        try:
            folder = transformer_folder(path)
        except FileNotFoundError as e:
            raise TeacherError(f"{where}: {e}") from None
        with open(folder / "config.json") as f:
            arch = json.load(f)
        probe = type("Probe", (), {"config": arch})
        _check_architecture(base, probe, where)
        dtype = next(base.parameters()).dtype
        model = cls.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True)
        model = frozen_copy(model)
    else:
        lora = read_peft_lora(path, where) if fmt == "peft" else read_diffusers_lora(path, where)
        model = frozen_copy(base)
        merge_lora(model, lora, where)
    log.info("%s: loaded %s teacher from %s", where, fmt, path)
    return Teacher(name, model, cfg.guidance)
