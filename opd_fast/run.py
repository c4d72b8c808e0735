"""A training run built from its parts: one builder per part, each from its own config section, and build_run, which
assembles them in the one order that works:

    model family, attention check, loss spec   checked before any model loads (minutes at full size)
    base                                       the frozen transformer, on the rank's device
    teachers                                   frozen copies of the base (LoRA merged, or adapters on one copy),
                                               made before the student gets its LoRA
    student                                    the base with its LoRA (or all weights trainable)
    engine, EMA                                the engine wraps the student (ZeRO-3 partitions it: only the
                                               student); the EMA tracks the engine's tensors
    prompts, sigmas                            the embedding cache (rank 0 fills it, the others read it): one
                                               entry per task and distinct text-encoder set (the student's, and
                                               each other set a teacher is conditioned by); the rollout's sigmas

A caller that needs another part passes it in (build_run(..., base=..., teachers=...)) or builds RunParts itself from
the builders; nothing patches a Trainer's insides. The Trainer receives the parts and runs rounds with them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
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
from opd_fast.teachers import Teacher, TeacherError, load_teachers, pipeline_of

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
    prompts: dict[str, EncodedPrompts]  # task -> its prompts with the student's text conditioning
    sigmas: torch.Tensor  # (num_steps + 1,) float32, 1 -> 0
    # task -> its prompts with its teacher's own text conditioning, for a teacher whose text encoders are not the
    # student's (the same rows and negative prompt, encoded by the teacher's set); absent: `prompts` serves both
    teacher_prompts: dict[str, EncodedPrompts] = field(default_factory=dict)


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


def teacher_text_sets(
    cfg: RunConfig, family: Family, student: torch.nn.Module, teachers: dict[str, Teacher]
) -> tuple[dict[str, tuple], dict[str, str]]:
    """The text-encoder sets that condition teachers, other than the student's: (set name -> (encode_fn, cache
    name), task -> set name). A set is keyed by what encodes (prompts.encoder pipeline: the text encoders' files,
    so two teachers whose pipeline folders hold the same encoders share one; builtin: the text widths), so each set
    is encoded once. A teacher whose text inputs are another width than the student's and that has no text encoders
    of its own is a TeacherError: it cannot be conditioned."""
    from opd_fast.text_encoders import pipeline_encoder, text_set_key

    sets, members = {}, {}
    student_widths = family.text_widths(student)
    for i, task in enumerate(cfg.tasks):
        teacher = teachers.get(task.name)
        if teacher is None:
            continue
        where = f"teacher of task {task.name!r}"
        widths = family.text_widths(teacher.model)
        if cfg.prompts.encoder == "builtin":
            if widths == student_widths:
                continue
            encode_fn, cache_name = family.builtin_text_encoder(teacher.model, cfg.prompts.max_tokens)
            key = f"builtin-{widths[0]}-{widths[1]}"
        elif teacher.text_pipeline is not None:
            key = text_set_key(teacher.text_pipeline, family)
            if key in sets:
                members[task.name] = key
                continue
            named_by = "pipeline" if task.teacher.pipeline is not None else "path"
            encode_fn, _ = pipeline_encoder(
                cfg.model, family, cfg.prompts, path=teacher.text_pipeline, key=f"tasks.{i}.teacher.{named_by}"
            )
            # the cache key names the set, not the folder it was first found in: any member finds the entries
            dtype = str(encode_fn.dtype).removeprefix("torch.")
            cache_name = f"pipeline-{family.name}:text-{key}:msl{encode_fn.max_sequence_length}:{dtype}"
        elif widths != student_widths:
            if task.teacher.pipeline is not None:
                why = f"its teacher.pipeline {task.teacher.pipeline} holds the student's text encoders"
            elif pipeline_of(task.teacher.path) is None:
                why = f"{task.teacher.path} is not in a diffusers pipeline folder (no model_index.json beside it)"
            else:
                why = "its pipeline folder holds the student's text encoders"
            raise TeacherError(
                f"{where}: its text encoders cannot be found: it takes text of width {widths}, the student's text "
                f"encoders give {student_widths}, and {why}; set its teacher.pipeline to the pipeline folder whose "
                "text encoders it uses"
            )
        else:
            continue
        sets.setdefault(key, (encode_fn, cache_name))
        members[task.name] = key
    return sets, members


def encode_teacher_prompts(
    cfg: RunConfig,
    family: Family,
    student: torch.nn.Module,
    teachers: dict[str, Teacher],
    student_prompts: dict[str, EncodedPrompts],
    cache_dir: Path,
) -> dict[str, EncodedPrompts]:
    """Each task's prompts (and the negative prompt) encoded by its teacher's text-encoder set, where that is not
    the student's: one cache entry per task and set, under cache_dir/text-<set>/ (the student's entries stay at
    cache_dir/<task>.safetensors). Each set's encoders are freed once its tasks are encoded. The embeddings must
    fit the teacher's text inputs (a teacher.pipeline of another text width than its transformer is an error)."""
    sets, members = teacher_text_sets(cfg, family, student, teachers)
    encoded: dict[str, EncodedPrompts] = {}
    for key, (encode_fn, cache_name) in sets.items():
        tasks = [task for task, member in members.items() if member == key]
        try:
            for task in tasks:
                file = cache_dir / f"text-{key}" / f"{task}.safetensors"
                prompt_set = student_prompts[task].prompts
                encoded[task] = encode_cached(prompt_set, encode_fn, cache_name, cfg.prompts.negative_prompt, file)
                log.info("task %r: its teacher's prompt embeddings (text-encoder set %s) in %s", task, key, file)
        finally:
            if hasattr(encode_fn, "close"):
                encode_fn.close()  # the pipeline encoders: nothing of them stays resident while training
        for task in tasks:
            _check_widths(family, teachers[task], encoded[task], f"teacher of task {task!r}")
    return encoded


def _check_widths(family: Family, teacher: Teacher, prompts: EncodedPrompts, where: str) -> None:
    dim, pooled = family.text_widths(teacher.model)
    got = (prompts.embeds.shape[-1], prompts.pooled.shape[-1] if pooled else 0)
    if got != (dim, pooled):
        raise TeacherError(
            f"{where}: the text encoders of {teacher.text_pipeline} give embeddings of width {got}, its transformer "
            f"takes {(dim, pooled)}: teacher.pipeline names another model's pipeline"
        )


def place_prompts(
    prompts: dict[str, EncodedPrompts], cfg: RunConfig, device: torch.device
) -> dict[str, EncodedPrompts]:
    """The embedding caches where cfg.prompts.placement puts them: on the device, in the widest dtype any model
    reads them in (fp32 when the model or a teacher runs in fp32, else the model's 16-bit dtype: the transformers
    cast their text inputs to it, so nothing is lost), or left on the host (each micro-batch's rows are then copied
    through pinned memory). `prompts` may hold the entries of several text-encoder sets: they are placed
    together."""
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
    cfg: RunConfig,
    family: Family,
    student: torch.nn.Module,
    dist: DistInfo,
    out_dir: Path,
    teachers: dict[str, Teacher] | None = None,
) -> tuple[dict[str, EncodedPrompts], dict[str, EncodedPrompts]]:
    """(the student's, the teachers' own): every task's prompts with their cached text conditioning
    (prompts.cache_dir, default OUT/embeddings), and, for each teacher whose text encoders are not the student's,
    the same prompts encoded by them."""
    cache_dir = Path(cfg.prompts.cache_dir) if cfg.prompts.cache_dir else Path(out_dir) / "embeddings"
    with distributed.rank_zero_first(dist):  # rank 0 fills the cache, the others read it
        student_prompts = encode_task_prompts(cfg, family, student, cache_dir)
        own = encode_teacher_prompts(cfg, family, student, teachers or {}, student_prompts, cache_dir)
    placed = place_prompts(
        {**{("student", t): p for t, p in student_prompts.items()}, **{("teacher", t): p for t, p in own.items()}},
        cfg,
        dist.device,
    )
    return (
        {t: p for (who, t), p in placed.items() if who == "student"},
        {t: p for (who, t), p in placed.items() if who == "teacher"},
    )


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
    prompts, teacher_prompts = build_prompts(cfg, family, student, dist, Path(out_dir), teachers)
    return RunParts(
        dist=dist,
        family=family,
        loss=loss,
        student=student,
        peft_config=peft_config,
        teachers=teachers,
        engine=engine,
        ema=build_ema(cfg, engine),
        prompts=prompts,
        sigmas=build_sigmas(cfg, family, student),
        teacher_prompts=teacher_prompts,
    )
