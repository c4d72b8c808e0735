"""Task teachers: frozen transformers with their LoRA merged into the weights, and the runtime that runs them.

A teacher comes as a LoRA on the student's base (peft adapter folder, or diffusers `pytorch_lora_weights` file) or
as a full transformer folder, which may be of another size (SD3.5-Large teaching SD3.5-Medium) when it shares the
student's latent space and sigma schedule. A full teacher whose pipeline folder (the one its transformer sits in,
or its `pipeline` key) has text encoders other than the student's is conditioned by them: Teacher.text_pipeline
names that folder, and opd_fast.run caches the prompts' embeddings once per distinct text-encoder set. It must fit:
a LoRA that targets modules the base lacks, or whose shapes differ, or a full model on another latent space, is a
TeacherError naming the teacher and the mismatch.

Runtime (cfg.teacher_runtime, see load_teachers and TeacherRunner at the end of this file):
- mode "merged": one frozen copy per teacher with its LoRA merged (no LoRA work per forward); "adapter": one
  frozen copy of the base shared by all LoRA teachers, each an unmerged peft adapter activated before its forward
  (memory of one base + the LoRAs, for a few % more FLOPs; full-model teachers keep their own copy).
- precision "model" (as loaded), "bf16", "fp32", or "fp8" (opd_fast.fp8: e4m3 weights for attention and MLP
  linears through Transformer Engine or torch._scaled_mm; adapters' LoRA factors stay high).
- stream "side": on CUDA, teacher forwards run on their own stream, so teacher(x_{j+1}) overlaps the student's
  backward(j); CPU (or "serial") runs the same schedule in order.
"""

from __future__ import annotations

import json
import logging
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

from opd_fast import fp8
from opd_fast.config import ConfigError, TaskConfig, TeacherConfig, TeacherRuntimeConfig, first_line
from opd_fast.families.base import model_dtype
from opd_fast.models import Conditioning, freeze, frozen_copy, transformer_folder
from opd_fast.profiling import nvtx_range
from opd_fast.safeio import PICKLE_SUFFIXES, load_tensors
from opd_fast.text_encoders import check_pipeline_folder, missing_text_components, text_files

if TYPE_CHECKING:
    from opd_fast.families.base import Family

log = logging.getLogger(__name__)
DIFFUSERS_LORA_FILES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
PEFT_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


class TeacherError(ValueError):
    """A teacher that cannot be loaded onto the student's base; the message names the teacher."""


@dataclass
class Teacher:
    name: str
    model: torch.nn.Module
    guidance: float | None  # as family.guidance gives it (a two-expert teacher: a scale per expert)
    adapter: str | None = None  # mode "adapter": the peft adapter of `model` (shared base) that is this teacher
    # the pipeline folder whose text encoders condition it, where they are not the student's (None: the student's
    # prompt embeddings serve it; opd_fast.run builds the others)
    text_pipeline: Path | None = None

    def velocity(self, family: Family, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning):
        """(v, guidance) as family.velocity returns them, at the teacher's guidance, without grad."""
        if self.adapter is not None:
            activate_adapter(self.model, self.adapter)
        with torch.no_grad(), fp8.forward_context(self.model):
            return family.velocity(self.model, x, sigma, cond, self.guidance)


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
        raise TeacherError(
            f"{path}: not a peft adapter folder (adapter_config.json), a diffusers LoRA "
            f"({' / '.join(DIFFUSERS_LORA_FILES)}) or a model folder (config.json)"
        )
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
        split = _split_lora_key(key[len(prefix) :])
        if split is None:
            raise TeacherError(
                f"{where}: key {key!r} is not a lora_A/lora_B weight (DoRA, bias or other extras are not supported)"
            )
        if not tensor.is_floating_point():  # a cast would "work" and merge garbage (or rounded integers)
            raise TeacherError(f"{where}: tensor {key!r} is stored as {tensor.dtype}; LoRA weights are floating point")
        module, which = split
        halves.setdefault(module, {})[which] = tensor
    incomplete = [m for m, h in halves.items() if len(h) != 2]
    if incomplete:
        raise TeacherError(f"{where}: modules with only one of lora_A/lora_B: {incomplete[:3]}")
    return {m: (h["A"], h["B"]) for m, h in halves.items()}


def _scale(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def _module_scales(pairs, config: dict, prefix_in_patterns: str = "") -> dict[str, float]:
    """alpha / r per module, honouring peft's rank_pattern (through the factors' shapes) and alpha_pattern. Pattern
    keys match as peft matches them (peft.utils.other.get_pattern_key): a regex against a dotted suffix of the module
    name, the first matching key in file order wins."""
    rslora = bool(config.get("use_rslora", False))
    default_alpha = config.get("lora_alpha")
    alpha_pattern = config.get("alpha_pattern") or {}
    scales = {}
    for module, (A, _) in pairs.items():
        rank = A.shape[0]
        alpha = default_alpha if default_alpha is not None else rank
        for pattern, value in alpha_pattern.items():
            if re.match(rf"(.*\.)?({pattern.removeprefix(prefix_in_patterns)})$", module):
                alpha = value
                break
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


def _target_linear(module, name: str, A: torch.Tensor, B: torch.Tensor, where: str) -> torch.nn.Linear:
    """`module` (the base's layer named `name`, or None) if it is a Linear that LoRA factors A, B fit; else the error
    that names the layer and the shapes."""
    if not isinstance(module, torch.nn.Linear):
        raise TeacherError(
            f"{where}: LoRA targets {name!r}, which the student's base has no Linear layer for "
            "(a LoRA for another base model or other target modules?)"
        )
    W = module.weight
    if A.shape[1] != W.shape[1] or B.shape[0] != W.shape[0] or A.shape[0] != B.shape[1]:
        raise TeacherError(
            f"{where}: LoRA for {name!r} has lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} "
            f"but the base weight is {tuple(W.shape)} (a LoRA for another base model?)"
        )
    return module


@torch.no_grad()
def merge_lora(model: torch.nn.Module, lora: LoraWeights, where: str) -> None:
    """W += scale * B @ A for every module of the LoRA, in float32, written back in the weight's dtype."""
    modules = dict(model.named_modules())
    for name, (A, B) in lora.pairs.items():
        W = _target_linear(modules.get(name), name, A, B, where).weight
        delta = lora.scales[name] * (B.float() @ A.float())
        W.copy_((W.float() + delta.to(W.device)).to(W.dtype))


def _config_value(config, key):
    value = config.get(key)
    return tuple(value) if isinstance(value, list) else value


def _differences(student: dict, teacher: dict, keys) -> list[str]:
    return [
        f"{key}: student {_config_value(student, key)} vs teacher {_config_value(teacher, key)}"
        for key in keys
        if _config_value(student, key) != _config_value(teacher, key)
    ]


def pipeline_of(folder: Path | None) -> Path | None:
    """The pipeline folder a transformer folder sits in (None: a lone transformer folder, or a preset)."""
    if folder is None:
        return None
    folder = Path(folder)
    for candidate in (folder, folder.parent):
        if (candidate / "model_index.json").is_file():
            return candidate
    return None


def _component_config(pipeline: Path, component: str, file: str = "config.json") -> dict | None:
    path = pipeline / component / file
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    return {k: v for k, v in config.items() if k not in ("_diffusers_version", "_name_or_path", "transformers_version")}


def _teacher_pipeline(cfg: TeacherConfig, folder: Path, family: Family, where: str) -> Path | None:
    """The pipeline folder a full-model teacher belongs to: its `pipeline` key (checked: a pipeline of the family),
    else the one its transformer folder sits in (None: a lone transformer folder)."""
    if cfg.pipeline is None:
        return pipeline_of(folder)
    try:  # a pipeline of the family's class, in a layout the family supports
        return check_pipeline_folder(cfg.pipeline, family, key=f"{where}: teacher.pipeline")
    except ConfigError as e:
        raise TeacherError(str(e)) from None


def _check_latent_space(
    base: torch.nn.Module, teacher_config: dict, family: Family, pipeline: Path | None, where: str
) -> Path | None:
    """A full-model teacher must speak the student's latent space; its size may differ (SD3.5-Large teaching
    SD3.5-Medium, Wan 14B teaching Wan 1.3B). The transformer's latent keys always; where both sit in pipeline
    folders (the teacher's: `pipeline`), the VAE's latent keys and the sigma schedule (scheduler config). A
    mismatch is a TeacherError naming what differs. Returns the teacher's pipeline folder when its text encoders
    differ from the student's (its prompts need embeddings of their own), else None."""
    diffs = _differences(base.config, teacher_config, family.latent_keys)
    student_pipeline = pipeline_of(base.config.get("_name_or_path"))
    own_text = None
    if student_pipeline is not None and pipeline is not None and student_pipeline.resolve() != pipeline.resolve():
        vae = [_component_config(p, "vae") for p in (student_pipeline, pipeline)]
        if None not in vae:
            diffs += [f"vae {d}" for d in _differences(*vae, family.vae_keys)]
        schedulers = [_component_config(p, "scheduler", "scheduler_config.json") for p in (student_pipeline, pipeline)]
        if schedulers[0] != schedulers[1]:
            keys = sorted(k for k in set(schedulers[0] or {}) | set(schedulers[1] or {}) if not k.startswith("_"))
            diffs += [f"scheduler {d}" for d in _differences(schedulers[0] or {}, schedulers[1] or {}, keys)] or [
                "scheduler: another class"
            ]
        text = [text_files(p, family) for p in (student_pipeline, pipeline)]
        changed = sorted(k for k in set(text[0]) | set(text[1]) if text[0].get(k) != text[1].get(k))
        if changed:
            missing = missing_text_components(pipeline, family)
            if missing:
                raise TeacherError(
                    f"{where}: its text encoders cannot be found: its pipeline folder {pipeline} has no "
                    f"{', '.join(missing)} (set teacher.pipeline to the pipeline folder whose text encoders it uses)"
                )
            log.info(
                "%s: text encoders of its own (%s differ from the student's): its prompts get embeddings of their own",
                where,
                ", ".join(changed[:4]),
            )
            own_text = pipeline
    if diffs:
        raise TeacherError(f"{where}: it does not share the student's latent space: {'; '.join(diffs)}")
    size = _differences(base.config, teacher_config, family.arch_keys)
    if size:
        log.info("%s: a teacher of another size on the student's latent space (%s)", where, "; ".join(size))
    return own_text


def _locate(name: str, cfg: TeacherConfig) -> tuple[str, Path, str]:
    """(where, path, format) of task `name`'s teacher: `where` names it in errors; the path must exist."""
    where = f"teacher of task {name!r}"
    path = Path(cfg.path)
    if not path.exists():
        raise TeacherError(f"{where}: path does not exist: {path}")
    return where, path, detect_format(path) if cfg.format == "auto" else cfg.format


def _no_pipeline(cfg: TeacherConfig, path: Path, fmt: str, where: str) -> None:
    """A LoRA teacher with a `pipeline` key (format auto found the LoRA; an explicit LoRA format is refused when the
    config loads): an error, not a key silently ignored."""
    if cfg.pipeline is not None:
        raise TeacherError(
            f"{where}: teacher.pipeline is set, but {path} is a {fmt} LoRA, which runs on the student's base with "
            "the student's text encoders; only a full-model teacher has a pipeline of its own"
        )


def _read_lora(path: Path, fmt: str, where: str, base: torch.nn.Module | None = None) -> LoraWeights:
    """The LoRA at `path`, its module names those of `base`. A base made of several pipeline components (Wan 2.2's
    two experts: base.lora_components) takes a diffusers LoRA per component, as the pipeline loads them: the first
    component's file in the folder, each other's in a subfolder of its name (load_into_transformer_2)."""
    if fmt == "peft":
        return read_peft_lora(path, where)
    lora = read_diffusers_lora(path, where)
    components = getattr(base, "lora_components", None)
    if not components:
        return lora
    parts = [(components[0], lora)]
    for name in components[1:]:
        folder = path / name if path.is_dir() else None
        if folder is not None and any((folder / f).is_file() for f in DIFFUSERS_LORA_FILES):
            parts.append((name, read_diffusers_lora(folder, f"{where} ({name})")))
        else:
            log.warning(
                "%s: no LoRA for %s (no %s/%s/): it keeps its base weights, as load_lora_weights leaves it",
                where,
                name,
                path,
                name,
            )
    pairs = {f"{name}.{m}": pair for name, part in parts for m, pair in part.pairs.items()}
    scales = {f"{name}.{m}": scale for name, part in parts for m, scale in part.scales.items()}
    return LoraWeights(pairs, scales)


def load_teacher(name: str, cfg: TeacherConfig, base: torch.nn.Module, family: Family) -> Teacher:
    """A frozen teacher for task `name` on top of `base` (the student's base transformer of `family`, without its
    LoRA)."""
    where, path, fmt = _locate(name, cfg)
    if fmt == "full":
        try:
            folder = transformer_folder(path)
        except FileNotFoundError as e:
            raise TeacherError(f"{where}: {e}") from None
        with open(folder / "config.json") as f:
            arch = json.load(f)
        text_pipeline = _check_latent_space(base, arch, family, _teacher_pipeline(cfg, folder, family, where), where)
        dtype = model_dtype(base)  # not the first parameter's: a kept-fp32 table (Wan) would load it all in fp32
        try:
            model = freeze(family.load_pretrained(folder, dtype))  # Wan 2.2: both experts, as one module
        except (OSError, ValueError, RuntimeError) as e:  # a tensor of another shape, a damaged file, ...
            raise TeacherError(f"{where}: cannot load the full model in {folder} ({first_line(e)})") from None
    else:
        _no_pipeline(cfg, path, fmt, where)
        model, text_pipeline = frozen_copy(base), None
        merge_lora(model, _read_lora(path, fmt, where, base), where)
    log.info("%s: loaded %s teacher from %s", where, fmt, path)
    guidance = family.guidance(model, cfg.guidance, cfg.guidance_2, f"{where}: teacher.guidance_2")
    return Teacher(name, model, guidance, text_pipeline=text_pipeline)


# ---------------------------------------------------------------------------------------------------------------
# runtime: modes, precision, and the side-stream runner

PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _lora_or_none(name: str, cfg: TeacherConfig, base: torch.nn.Module) -> LoraWeights | None:
    """The teacher's LoRA on `base`, or None for a full-model teacher."""
    where, path, fmt = _locate(name, cfg)
    if fmt == "full":
        return None
    _no_pipeline(cfg, path, fmt, where)
    return _read_lora(path, fmt, where, base)


@torch.no_grad()
def add_lora_adapter(model: torch.nn.Module, adapter: str, lora: LoraWeights, where: str) -> None:
    """Attach `lora` to `model` as the unmerged peft adapter `adapter`, with its exact per-module scales, its
    factors in the base's dtype, frozen."""
    from peft import LoraConfig as PeftLoraConfig

    modules = dict(model.named_modules())
    for name, (A, B) in lora.pairs.items():
        module = modules.get(name)
        module = getattr(module, "base_layer", module)  # a layer that already carries another teacher's adapter
        _target_linear(module, name, A, B, where)
    ranks = {name: A.shape[0] for name, (A, _) in lora.pairs.items()}
    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    config = PeftLoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=sorted(lora.pairs),
        init_lora_weights=False,
        rank_pattern={n: r for n, r in ranks.items() if r != rank},
    )
    with warnings.catch_warnings():  # peft warns on every adapter after the first: several are the point here
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        model.add_adapter(config, adapter_name=adapter)
    modules = dict(model.named_modules())
    dtype = next(model.parameters()).dtype
    for name, (A, B) in lora.pairs.items():
        layer = modules[name]
        layer.lora_A[adapter].to(dtype).weight.copy_(A)
        layer.lora_B[adapter].to(dtype).weight.copy_(B)
        layer.scaling[adapter] = lora.scales[name]  # alpha / r (or rsLoRA) as read, whatever the config said
    model.requires_grad_(False)


def activate_adapter(model: torch.nn.Module, adapter: str) -> None:
    """Make `adapter` the only active one in every LoRA layer, without touching requires_grad (peft's default
    set_adapter marks the active adapter trainable). Cached: a no-op when it is already active."""
    if getattr(model, "_opd_active_adapter", None) == adapter:
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.set_adapter(adapter, inference_mode=True)
    model._opd_active_adapter = adapter


def apply_precision(model: torch.nn.Module, runtime: TeacherRuntimeConfig, family: Family) -> torch.nn.Module:
    """Cast or quantize a frozen teacher model in place, as runtime.precision says (FP8: the family's own
    high-precision layers kept, unless teacher_runtime.fp8_skip lists every kept pattern itself)."""
    if runtime.precision in PRECISION_DTYPES:  # nn.Module.to: diffusers' override warns on every cast
        torch.nn.Module.to(model, PRECISION_DTYPES[runtime.precision])
    elif runtime.precision == "fp8":
        skip = runtime.fp8_skip if runtime.fp8_skip is not None else fp8.DEFAULT_SKIP + family.fp8_keep
        try:
            fp8.quantize_model(model, runtime.fp8_backend, runtime.fp8_scaling, skip)
        except fp8.Fp8Unavailable as e:
            raise TeacherError(f"teacher_runtime.precision fp8: {e}") from None
    return model


def load_teachers(
    tasks: list[TaskConfig], base: torch.nn.Module, family: Family, runtime: TeacherRuntimeConfig
) -> dict[str, Teacher]:
    """Every task's teacher on top of `base` (the student's base transformer, before it gets its LoRA), in the
    runtime's mode and precision."""
    teachers = _load_teachers(tasks, base, family, runtime)
    routed = [name for name, t in teachers.items() if getattr(t.model, "routes_by_timestep", False)]
    if runtime.cuda_graphs and routed:
        raise TeacherError(
            f"teacher_runtime.cuda_graphs: the teachers of tasks {routed} switch experts by the step's timestep "
            "(Wan 2.2's two experts), which a captured graph would freeze at the step it was captured at; set "
            "teacher_runtime.cuda_graphs: false"
        )
    return teachers


def _load_teachers(
    tasks: list[TaskConfig], base: torch.nn.Module, family: Family, runtime: TeacherRuntimeConfig
) -> dict[str, Teacher]:
    if runtime.mode == "merged":
        teachers = {t.name: load_teacher(t.name, t.teacher, base, family) for t in tasks}
        for teacher in teachers.values():
            apply_precision(teacher.model, runtime, family)
        return teachers
    teachers, shared = {}, None
    for task in tasks:
        lora = _lora_or_none(task.name, task.teacher, base)
        if lora is None:  # a full model cannot share the base
            teachers[task.name] = load_teacher(task.name, task.teacher, base, family)
            apply_precision(teachers[task.name].model, runtime, family)
            log.info("teacher of task %r: a full model, kept as its own copy in adapter mode", task.name)
            continue
        shared = frozen_copy(base) if shared is None else shared
        add_lora_adapter(shared, task.name, lora, f"teacher of task {task.name!r}")
        where = f"teacher of task {task.name!r}: teacher.guidance_2"
        guidance = family.guidance(shared, task.teacher.guidance, task.teacher.guidance_2, where)
        teachers[task.name] = Teacher(task.name, shared, guidance, adapter=task.name)
    if shared is not None:
        apply_precision(shared, runtime, family)  # FP8 wraps the base layers; the LoRA factors stay high
    return teachers


def teacher_memory_bytes(teachers: dict[str, Teacher]) -> int:
    """Bytes of all teachers' parameters and buffers, a storage shared by several teachers counted once."""
    seen, total = set(), 0
    for teacher in teachers.values():
        for t in list(teacher.model.parameters()) + list(teacher.model.buffers()):
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


class GraphedVelocity:
    """One teacher's forward captured as a CUDA graph for one input signature, replayed for every call with it.

    A teacher forward is hundreds of kernel launches at fixed shapes (per task: batch, resolution, tokens, CFG), no
    grad and no host logic that depends on values, so a captured graph replays it without the host's launch cost.
    Inputs are copied into the graph's static tensors on the current stream; the output is cloned out of the
    graph's static output, which the next replay overwrites while the caller may still read the last one (the
    backward of opd_step(j) keeps the teacher velocity of step j and runs after the teacher of step j + 1 is
    submitted)."""

    WARMUP = 2  # eager runs on a side stream before capture: lazy initialisations must not happen inside it

    @staticmethod
    def signature(x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> tuple:
        tensors = (x, sigma, cond.prompt_embeds, cond.pooled, cond.negative_embeds, cond.negative_pooled)
        return tuple((tuple(t.shape), t.dtype) for t in tensors)

    def __init__(self, teacher: Teacher, family: Family, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning):
        self.inputs = [
            t.detach().clone()
            for t in (x, sigma, cond.prompt_embeds, cond.pooled, cond.negative_embeds, cond.negative_pooled)
        ]
        static_x, static_sigma, *static_cond = self.inputs

        def forward():
            return teacher.velocity(family, static_x, static_sigma, Conditioning(*static_cond))

        warm = torch.cuda.Stream(x.device)
        warm.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(warm):
            for _ in range(self.WARMUP):
                forward()
        torch.cuda.current_stream(x.device).wait_stream(warm)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output, self.guidance = forward()
        log.info("teacher %r: CUDA graph captured for input %s", teacher.name, tuple(x.shape))

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning):
        for static, t in zip(
            self.inputs, (x, sigma, cond.prompt_embeds, cond.pooled, cond.negative_embeds, cond.negative_pooled)
        ):
            static.copy_(t)
        self.graph.replay()
        return self.output.clone(), self.guidance


@dataclass
class TeacherHandle:
    """A submitted teacher forward: its velocity (valid once `ready` has passed on the consumer's stream)."""

    velocity: torch.Tensor
    guidance: float | None
    ready: torch.cuda.Event | None  # None: computed serially, ready now


class TeacherRunner:
    """Runs teacher forwards: submit() launches one, result() hands its velocity to the caller's stream.

    stream "side" on CUDA: the forward is launched on a dedicated stream after it waits for the caller's stream
    (so x, written there, is complete), and an event marks its end; result() makes the caller's stream wait for that
    event. Neither blocks the host. Allocator safety across streams: the inputs, allocated on the caller's stream
    and read on the side stream, are record_stream'ed on the side stream (their memory is not reused before the
    side stream is done with them); the output, allocated on the side stream and read on the caller's, is
    record_stream'ed on the caller's stream in result(). Otherwise (CPU, or stream "serial") submit() computes at
    once, and result() returns it: the same schedule, run in order.
    """

    def __init__(
        self, family: Family, device: torch.device | str, stream: str = "side", phase=None, cuda_graphs: bool = False
    ):
        self.family = family
        self.device = torch.device(device)
        self.side = stream == "side" and self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.side else None
        self.phase = phase or nvtx_range
        self.graphs: dict[tuple, GraphedVelocity] | None = {} if cuda_graphs and self.device.type == "cuda" else None
        if stream == "side" and not self.side:
            log.info("teacher_runtime.stream side: no CUDA device, teacher forwards run serially")
        if cuda_graphs and self.graphs is None:
            log.info("teacher_runtime.cuda_graphs: no CUDA device, teacher forwards run eagerly")

    def _velocity(self, teacher: Teacher, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning):
        if self.graphs is None:
            return teacher.velocity(self.family, x, sigma, cond)
        key = (teacher.name, *GraphedVelocity.signature(x, sigma, cond))
        if key not in self.graphs:
            self.graphs[key] = GraphedVelocity(teacher, self.family, x, sigma, cond)
        return self.graphs[key](x, sigma, cond)

    def submit(self, teacher: Teacher, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> TeacherHandle:
        if not self.side:
            with self.phase("teacher"):
                v, guidance = self._velocity(teacher, x, sigma, cond)
            return TeacherHandle(v, guidance, None)
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)
        with torch.cuda.stream(self.stream):
            with self.phase("teacher"):
                v, guidance = self._velocity(teacher, x, sigma, cond)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        for t in (x, sigma, cond.prompt_embeds, cond.pooled, cond.negative_embeds, cond.negative_pooled):
            t.record_stream(self.stream)
        return TeacherHandle(v, guidance, ready)

    def result(self, handle: TeacherHandle) -> tuple[torch.Tensor, float | None]:
        if handle.ready is not None:
            caller = torch.cuda.current_stream(self.device)
            caller.wait_event(handle.ready)
            handle.velocity.record_stream(caller)
        return handle.velocity, handle.guidance
