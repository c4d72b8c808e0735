"""A training run built from its parts: one builder per part, each from its own config section, and build_run, which
assembles them in the one order that works:

    model family, attention check, loss spec   checked before any model loads (minutes at full size)
    base                                       the frozen transformer, on the rank's device
    teachers                                   frozen copies of the base (LoRA merged, or adapters on one copy),
                                               made before the student gets its LoRA
    student                                    the base with its LoRA (or all weights trainable)
    engine, EMA                                the engine wraps the student (ZeRO-3 partitions it: only the
                                               student); the EMA tracks the engine's tensors
    prompts, sigmas                            the embedding cache (rank 0 fills it, the others read it) and the
                                               rollout's sigma grid

A caller that needs another part passes it in (build_run(..., base=..., teachers=...)) or builds RunParts itself from
the builders; nothing patches a Trainer's insides. The Trainer receives the parts and runs rounds with them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from opd_fast import attention, distributed
from opd_fast.config import ConfigError, RunConfig
from opd_fast.datasets import read_dataset
from opd_fast.distributed import DistInfo
from opd_fast.engine import EMA, Engine, make_engine
from opd_fast.families import Family, family_for_run
from opd_fast.models import DTYPES, add_student_lora, load_transformer
from opd_fast.ops import LossSpec
from opd_fast.prompts import EncodedPrompts, encode_cached
from opd_fast.schedule import sigma_grid
from opd_fast.teachers import Teacher, load_teachers

log = logging.getLogger(__name__)
PROMPTS_DEVICE_SHARE = 0.1  # prompts.placement auto: the cache goes to the GPU when it takes at most this share


@dataclass
class RunParts:
    """Everything a Trainer trains with. `dist` is the one source of this process's rank, world size and device."""

    dist: DistInfo
    family: Family
    loss: LossSpec
    student: torch.nn.Module
    peft_config: object | None  # the student's peft LoraConfig; None: a full-parameter student
    teachers: dict[str, Teacher]
    engine: Engine
    ema: EMA | None
    prompts: dict[str, EncodedPrompts]
    sigmas: torch.Tensor  # (num_steps + 1,) float32, 1 -> 0


def build_loss(cfg: RunConfig, device: torch.device) -> LossSpec:
    try:
        spec = LossSpec.from_config(cfg.loss, cfg.sampling, device)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"loss.backend: {e}") from None
    log.info("opd_step backend: %s", spec.backend)
    return spec


def build_base(cfg: RunConfig, family: Family, device: torch.device) -> torch.nn.Module:
    """The frozen base transformer on the device: from model.path, or a preset with seeded weights."""
    return load_transformer(cfg.model, family).to(device)


def build_teachers(cfg: RunConfig, base: torch.nn.Module, family: Family) -> dict[str, Teacher]:
    """Every task's teacher from `base` (before the student's LoRA is added to it), as cfg.teacher_runtime says."""
    return load_teachers(cfg.tasks, base, family, cfg.teacher_runtime)


def build_student(cfg: RunConfig, base: torch.nn.Module) -> tuple[torch.nn.Module, object | None]:
    """`base` becomes the student: its LoRA (seeded by train.seed), gradient checkpointing, train mode."""
    with torch.random.fork_rng(devices=[]):  # peft draws the adapter init from the global RNG
        torch.manual_seed(cfg.train.seed)
        peft_config = add_student_lora(base, cfg.student.lora)
    if cfg.model.gradient_checkpointing:
        base.enable_gradient_checkpointing()
    base.train()
    return base, peft_config


def build_ema(cfg: RunConfig, engine: Engine) -> EMA | None:
    return EMA(engine.params, cfg.ema, engine) if cfg.ema.enabled else None


def encode_task_prompts(
    cfg: RunConfig, family: Family, student: torch.nn.Module, cache_dir: Path
) -> dict[str, EncodedPrompts]:
    """Each task's prompt set, encoded once into the embedding cache. All files are read (and checked) before
    anything is written."""
    prompt_sets = {task.name: read_dataset(task.prompts, task.prompts_kind, task.name) for task in cfg.tasks}
    if cfg.prompts.encoder == "builtin":
        encode_fn, name = family.builtin_text_encoder(student, cfg.prompts.max_tokens)
    else:
        from opd_fast.text_encoders import pipeline_encoder

        encode_fn, name = pipeline_encoder(cfg.model, family, cfg.prompts)
    return {
        task: encode_cached(prompt_set, encode_fn, name, cfg.prompts.negative_prompt, cache_dir / f"{task}.safetensors")
        for task, prompt_set in prompt_sets.items()
    }


def place_prompts(
    prompts: dict[str, EncodedPrompts], cfg: RunConfig, device: torch.device
) -> dict[str, EncodedPrompts]:
    """The embedding caches where cfg.prompts.placement puts them: on the device, in the widest dtype any model
    reads them in (fp32 when the model or a teacher runs in fp32, else the model's 16-bit dtype: the transformers
    cast their text inputs to it, so nothing is lost), or left on the host (each micro-batch's rows are then copied
    through pinned memory)."""
    if device.type != "cuda":
        return prompts
    wide = cfg.model.dtype == "float32" or cfg.teacher_runtime.precision == "fp32"
    dtype = torch.float32 if wide else DTYPES[cfg.model.dtype]
    placement = cfg.prompts.placement
    if placement == "auto":
        need = sum(p.nbytes() for p in prompts.values()) * torch.finfo(dtype).bits // 32  # cached as float32
        placement = (
            "device" if need <= PROMPTS_DEVICE_SHARE * torch.cuda.get_device_properties(device).total_memory else "host"
        )
        log.info("prompt embeddings: %.2f GB in %s on the %s (prompts.placement auto)", need / 1e9, dtype, placement)
    if placement == "device":
        return {task: p.to(device, dtype) for task, p in prompts.items()}
    return prompts


def build_prompts(
    cfg: RunConfig, family: Family, student: torch.nn.Module, dist: DistInfo, out_dir: Path
) -> dict[str, EncodedPrompts]:
    """Every task's prompts with their cached text conditioning (prompts.cache_dir, default OUT/embeddings)."""
    cache_dir = Path(cfg.prompts.cache_dir) if cfg.prompts.cache_dir else Path(out_dir) / "embeddings"
    with distributed.rank_zero_first(dist):  # rank 0 fills the cache, the others read it
        return place_prompts(encode_task_prompts(cfg, family, student, cache_dir), cfg, dist.device)


def build_sigmas(cfg: RunConfig, family: Family, student: torch.nn.Module) -> torch.Tensor:
    """The rollout's sigma grid, as the family's pipeline samples it at sampling.resolution."""
    return sigma_grid(
        family,
        cfg.sampling.num_steps,
        cfg.sampling.shift,
        path=cfg.model.path,
        image_seq_len=family.image_tokens(student, cfg.sampling.resolution),
    )


def build_run(
    cfg: RunConfig,
    out_dir: str | Path,
    dist: DistInfo,
    *,
    base: torch.nn.Module | None = None,
    teachers: dict[str, Teacher] | None = None,
) -> RunParts:
    """Every part of the run `cfg` describes, on dist's device. `base`: this transformer instead of loading one
    (it becomes the student; a benchmark hands in a copy of a model it built once); `teachers`: these teachers
    instead of building them from the base (e.g. {} when the caller attaches its own later)."""
    family = family_for_run(cfg)
    attention.check(cfg.model.attention)
    loss = build_loss(cfg, dist.device)
    base = build_base(cfg, family, dist.device) if base is None else base.to(dist.device)
    teachers = build_teachers(cfg, base, family) if teachers is None else teachers
    for model in {id(m): m for m in [base] + [t.model for t in teachers.values()]}.values():
        attention.use_backend(model, cfg.model.attention)
    student, peft_config = build_student(cfg, base)
    engine = make_engine(cfg, student, dist)  # after the teachers were copied: only the student is partitioned
    return RunParts(
        dist=dist,
        family=family,
        loss=loss,
        student=student,
        peft_config=peft_config,
        teachers=teachers,
        engine=engine,
        ema=build_ema(cfg, engine),
        prompts=build_prompts(cfg, family, student, dist, Path(out_dir)),
        sigmas=build_sigmas(cfg, family, student),
    )
