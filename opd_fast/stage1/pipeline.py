"""`opd-fast pipeline CONFIG --out OUT`: the method's two stages from one config, resumable at any stage.

The config is a run config (stage 2, as `opd-fast train` reads it) in which a task may carry a `teach:` section:
stage 1 trains that task's teacher when its teacher.path is not given or does not exist, and stage 2 reads it.

    tasks:
      - name: aesthetic
        prompts: prompts/aesthetic.txt
        teacher: {guidance: null}          # no path: stage 1 trains it (its guidance: the teacher's CFG in stage 2)
        teach:
          method: grpo                     # the teach config's own keys: method, rollout, grpo, nft
          reward: {name: pickscore}        # and its task's: reward, images
          optimizer: {lr: 1.0e-3}          # any of STAGE1_OWN below, merged key by key over the run's section
          train: {rounds: 200}

A teacher's run is a teach config (opd_fast.stage1.config) made of the run's shared sections (INHERITED: one base,
one text encoding, one process group) and its own (STAGE1_OWN, the run's section merged with the fragment's; every
other key of the run, tasks and eval and teacher_runtime and loss, is stage 2's alone). Every teach section is
validated when the config loads, before anything trains; an error names tasks.N.teach.KEY.

OUT holds one run folder per stage, each with its own lock, run.json and manifest-verified checkpoints:

    OUT/teachers/<task>/   stage 1 (a teach run); stage 2 reads its export (final_export) as tasks.N.teacher.path
    OUT/opd/               stage 2 (a train run); the student is OUT/opd/lora_diffusers(_ema)

--resume skips a stage whose newest checkpoint verifies at its last round and whose export exists (nothing loads),
resumes the first unfinished one from its newest verified checkpoint, and starts the rest. --until teachers stops
after stage 1.
"""

from __future__ import annotations

import copy
import gc
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from opd_fast.checkpoint import CheckpointError, checkpoint_step, list_checkpoints, verify_checkpoint
from opd_fast.config import ConfigError, RunConfig, _build, _resolve_paths, apply_override, read_yaml
from opd_fast.run_folder import OutputDirError, config_hash, read_run_id
from opd_fast.stage1.config import TeachConfig, load_teach_config

log = logging.getLogger(__name__)

LORA_FILE = "pytorch_lora_weights.safetensors"  # what export_diffusers_lora writes in its folder
INHERITED = ("model", "prompts", "engine")  # as the run's: the teacher's LoRA sits on stage 2's base
STAGE1_OWN = ("student", "sampling", "optimizer", "ema", "train", "checkpoint", "logging")  # run's, then merged
TEACH_KEYS = ("method", "rollout", "grpo", "nft")  # the teach config's own sections
TASK_KEYS = ("reward", "images")  # the teach config's task section (name, prompts: the run task's)
STAGES = ("teachers", "opd")


def final_export(cfg: RunConfig, out_dir: Path) -> tuple[Path, str]:
    """What a run into out_dir leaves for the next stage, as a teacher reads it (path, tasks.N.teacher.format): the
    EMA's LoRA file when the run keeps an EMA, else the trained one; a full-parameter run's transformer folder.
    Trainer.export writes it last, so it exists only once the export is whole."""
    suffix = "_ema" if cfg.ema.enabled else ""
    if cfg.student.lora.enabled:
        return Path(out_dir) / f"lora_diffusers{suffix}" / LORA_FILE, "diffusers"
    return Path(out_dir) / f"transformer{suffix}", "full"


@dataclass
class Pipeline:
    """The two stages of one config into `out`: stage 2's run config (its teachers' paths filled in) and the
    teach config of every teacher stage 1 trains, by task name."""

    out: Path
    opd: RunConfig
    teachers: dict[str, TeachConfig]

    def teacher_dir(self, task: str) -> Path:
        return self.out / "teachers" / task

    @property
    def opd_dir(self) -> Path:
        return self.out / "opd"


def _merge(base: dict, override: dict) -> dict:
    """`override` over `base`, mapping by mapping (a list or value replaces)."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _teach_config(data: dict, i: int, entry: dict, fragment, base: Path) -> TeachConfig:
    """Task i's teach config: the run's shared sections, its own merged with the fragment, the task's prompts."""
    where = f"tasks.{i}.teach"
    if not isinstance(fragment, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(fragment).__name__}")
    allowed = TEACH_KEYS + TASK_KEYS + STAGE1_OWN
    unknown = sorted(set(fragment) - set(allowed))
    if unknown:
        raise ConfigError(
            f"unknown config key {', '.join(f'{where}.{k}' for k in unknown)} (allowed under {where}: "
            f"{', '.join(allowed)}; {', '.join(INHERITED)} are the run's for every stage)"
        )
    if "reward" not in fragment:
        raise ConfigError(f"{where}.reward: required key is missing ({{name: REWARD, options...}})")
    teach = {key: copy.deepcopy(data[key]) for key in INHERITED if key in data}
    for key in STAGE1_OWN:
        merged = _merge(data.get(key) or {}, fragment.get(key) or {})
        if merged:
            teach[key] = merged
    teach.update({key: copy.deepcopy(fragment[key]) for key in TEACH_KEYS if key in fragment})
    teach["task"] = {
        "name": entry.get("name"),
        "prompts": entry.get("prompts"),
        **{key: copy.deepcopy(fragment[key]) for key in TASK_KEYS if key in fragment},
    }
    if "prompts_kind" in entry:
        teach["task"]["prompts_kind"] = entry["prompts_kind"]
    try:
        return load_teach_config(data=teach, base=base)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def load_pipeline(path: str | Path, out: str | Path, overrides: list[str] = ()) -> Pipeline:
    """The pipeline config at `path` (--set overrides applied to it as a whole: `tasks.1.teach.train.rounds=50`),
    validated: every teach section, then stage 2's run config with the trained teachers' paths. Relative paths are
    resolved against the config's folder."""
    path, out = Path(path), Path(out)
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping, got {type(data).__name__}")
    for assignment in overrides:
        apply_override(data, assignment)
    base = path.resolve().parent
    tasks = data.get("tasks")
    if not isinstance(tasks, list):
        raise ConfigError("tasks: expected a list of tasks")
    stage2 = {**data, "tasks": []}
    teachers: dict[str, TeachConfig] = {}
    for i, entry in enumerate(tasks):
        if not isinstance(entry, dict):
            stage2["tasks"].append(entry)  # (_build names it)
            continue
        entry = copy.deepcopy(entry)
        fragment = entry.pop("teach", None)
        teacher = entry.setdefault("teacher", {})
        if not isinstance(teacher, dict):
            raise ConfigError(f"tasks.{i}.teacher: expected a mapping, got {type(teacher).__name__}")
        given = teacher.get("path")
        exists = given is not None and (Path(given) if Path(given).is_absolute() else base / given).exists()
        if fragment is not None:
            cfg = _teach_config(data, i, entry, fragment, base)
            if not exists:
                if given is not None:
                    log.info("tasks.%d.teacher.path %s does not exist: stage 1 trains the teacher", i, given)
                teachers[cfg.task.name] = cfg
                export, fmt = final_export(cfg, out / "teachers" / cfg.task.name)
                teacher.update(path=str(export), format=fmt)
                teacher.setdefault("guidance", cfg.student.guidance)  # the CFG it was trained to sample with
        elif given is None:
            raise ConfigError(f"tasks.{i}.teacher.path: required key is missing (or a teach: section to train one)")
        stage2["tasks"].append(entry)
    cfg = _build(RunConfig, stage2).validate()
    _resolve_paths(cfg, base)
    return Pipeline(out, cfg, teachers)


def finished(cfg: RunConfig, out_dir: Path) -> bool:
    """Whether out_dir holds cfg's run done: its export is there and its newest checkpoint, at train.rounds or past
    it, is this run's under this recipe (manifest, sizes; not the checksums: nothing loads it). Anything else,
    a damaged or foreign checkpoint included, is left to the resumed run, which says what is wrong."""
    if not final_export(cfg, out_dir)[0].exists():
        return False
    found = list_checkpoints(out_dir) if (Path(out_dir) / "checkpoints").is_dir() else []
    if not found or checkpoint_step(found[-1]) < cfg.train.rounds:
        return False
    try:
        identity = {"run_id": read_run_id(out_dir), "config_hash": config_hash(cfg)}
        verify_checkpoint(found[-1], identity, ("student",), checksums=False)
    except (CheckpointError, OutputDirError):
        return False
    return True


def _free(device) -> None:
    """Drop the finished stage's models before the next stage loads its own."""
    gc.collect()
    if torch.cuda.is_available() and str(device or "cuda").startswith("cuda"):
        torch.cuda.empty_cache()


def run_pipeline(
    pipeline: Pipeline, *, resume: bool = False, until: str = "opd", device: str | None = None
) -> dict[str, str]:
    """Stage 1 for every teacher to train, then stage 2 (none with until="teachers"); returns what each stage did
    ("trained", "skipped": finished before), by stage folder. Without resume, a stage folder that holds a run is
    refused, as `opd-fast train` refuses one."""
    from opd_fast.stage1.trainer import TeachTrainer
    from opd_fast.trainer import Trainer

    if until not in STAGES:
        raise ConfigError(f"--until: one of {', '.join(STAGES)}, got {until!r}")
    done: dict[str, str] = {}
    stages = [(pipeline.teacher_dir(task), cfg, TeachTrainer) for task, cfg in pipeline.teachers.items()]
    if until == "opd":
        stages.append((pipeline.opd_dir, pipeline.opd, Trainer))
    for out_dir, cfg, trainer_class in stages:
        if resume and finished(cfg, out_dir):
            log.info("%s: finished before (round %d), skipped", out_dir, cfg.train.rounds)
            done[str(out_dir)] = "skipped"
            continue
        hooks = []
        if trainer_class is Trainer and cfg.eval.enabled:  # as `opd-fast train`: evaluations while it trains
            from opd_fast.evaluate.during import EvalHook

            hooks.append(EvalHook())
        trainer = trainer_class.build(cfg, out_dir, resume=resume, device=device, hooks=hooks)
        try:
            trainer.fit()
            # rank 0 alone writes the export that the next stage loads on every rank: none may go on before it
            trainer.dist.barrier()
        finally:
            trainer.close()
        done[str(out_dir)] = "trained"
        del trainer
        _free(device)
    return done
