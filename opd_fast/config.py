"""Run configuration: typed dataclasses loaded from YAML, validated on load.

An unknown key, a wrong type or a value outside its choices is a ConfigError naming the key (e.g.
`train.micro_batch_size`). `--set a.b=value` overrides are parsed as YAML scalars and validated the same way.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

OFFICIAL_LORA_TARGETS = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
]


# The trackers opd_fast.trackers registers, named here so that a config is checked on load without importing them
# (config.py imports nothing of opd_fast); tests/test_trackers.py holds the two lists equal.
TRACKER_NAMES = ("tensorboard", "wandb")
# Released recipes use CFG scales up to ~10 (SD3.5: 4.5, FLUX's embedded guidance: 3.5); far above that, the
# guided velocity is the difference of two predictions scaled into overflow, and every round is wasted.
MAX_GUIDANCE = 100.0


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): what a one-line error quotes."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def read_yaml(path: str | Path) -> dict:
    """A YAML config file's mapping (safe loader; an empty file is {}): a missing file or bad YAML is a
    ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names the key."""


@dataclass(kw_only=True)
class ModelConfig:
    family: str = "sd3"  # a family of opd_fast.families, checked where the run looks it up (before any model loads)
    preset: str | None = "tiny-sd3"  # one of the family's presets (opd_fast.families); ignored when path is set
    path: str | None = None  # local diffusers pipeline folder (with transformer/) or transformer folder
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    seed: int = 0  # init of a preset's random weights
    gradient_checkpointing: bool = False
    attention: Literal["sdpa", "cudnn", "flash"] = "sdpa"  # the attention kernel (opd_fast.attention), all models


@dataclass(kw_only=True)
class LoraConfig:
    enabled: bool = True  # false: full-parameter student
    rank: int = 32
    alpha: int = 64
    init: Literal["gaussian", "default"] = "gaussian"  # peft init_lora_weights: gaussian or kaiming A; B = 0
    targets: list[str] = field(default_factory=lambda: list(OFFICIAL_LORA_TARGETS))


@dataclass(kw_only=True)
class StudentConfig:
    guidance: float | None = 4.5  # CFG scale in rollout AND training forward; null or 1.0: no CFG pass
    # a two-expert model (Wan 2.2): the low-noise expert's CFG scale, WanPipeline's guidance_scale_2 (null: guidance;
    # CFG runs in both experts or neither, as `guidance` > 1 decides); an error for a model of one transformer
    guidance_2: float | None = None
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass(kw_only=True)
class TeacherConfig:
    path: str  # LoRA (peft folder / diffusers file or folder) or full model folder
    format: Literal["auto", "peft", "diffusers", "full"] = "auto"
    guidance: float | None = 4.5
    guidance_2: float | None = None  # a two-expert teacher (Wan 2.2): the low-noise expert's, as student.guidance_2
    # a full-model teacher's own diffusers pipeline folder (model_index.json), whose text encoders condition it and
    # whose VAE and scheduler are checked against the student's; null: the pipeline folder its `path` sits in, if any
    pipeline: str | None = None


@dataclass(kw_only=True)
class TeacherRuntimeConfig:
    """How all teachers run (opd_fast.teachers, opd_fast.fp8): precision, weight layout, CUDA stream."""

    precision: Literal["model", "bf16", "fp32", "fp8"] = "model"  # model: the dtype the base was loaded in
    fp8_backend: Literal["auto", "te", "torch"] = "auto"  # auto: Transformer Engine when it imports on CUDA
    fp8_scaling: Literal["rowwise", "tensorwise"] = "rowwise"  # from the current amax (why not delayed: opd_fast.fp8)
    fp8_skip: list[str] | None = None  # fnmatch patterns of Linear names kept in high precision; null: fp8 default
    stream: Literal["side", "serial"] = "side"  # side: overlap teacher(x_j+1) with backward(j) on CUDA
    cuda_graphs: bool = False  # CUDA: replay each teacher's forward as a captured CUDA graph (static shapes per task)
    mode: Literal["merged", "adapter"] = "merged"  # merged: one copy per teacher; adapter: one base + LoRAs


PROMPT_KINDS = ("auto", "txt", "jsonl", "pickscore", "ocr", "geneval", "drawbench")  # opd_fast.datasets reads them


@dataclass(kw_only=True)
class TaskConfig:
    name: str
    prompts: str  # .txt (one prompt per line), .jsonl ({"prompt": ..., metadata...}) or DrawBench's .csv
    # the set's checks before training (opd_fast.datasets): ocr (quoted text), geneval (its metadata schema), ...
    prompts_kind: Literal[PROMPT_KINDS] = "auto"
    teacher: TeacherConfig
    # this task's trained leading steps, as sampling.timestep_fraction (null: that value). A task whose reward is
    # decided early (layout, count, glyph shape) can train fewer steps, and its rollout stops there
    timestep_fraction: float | None = None
    loss_weight: float = 1.0  # this task's share of the round's loss (1: the tasks' mean, as the official code)


@dataclass(kw_only=True)
class PromptsConfig:
    encoder: Literal["builtin", "pipeline"] = "builtin"  # builtin: the tiny deterministic text encoder
    max_tokens: int = 16  # builtin encoder's sequence length
    cache_dir: str | None = None  # default: OUT/embeddings
    negative_prompt: str = ""
    # pipeline encoder (opd_fast.text_encoders): T5 tokens; null = the pipeline's default (SD3 256, FLUX 512)
    max_sequence_length: int | None = None
    encode_batch_size: int = 32  # prompts per text-encoder forward
    # where the embedding cache lives while training (CUDA): device (no copy per micro-batch), host (a micro-batch's
    # rows are copied through pinned memory, without a wait), auto: the device when all sets fit in 10% of its memory
    placement: Literal["auto", "device", "host"] = "auto"


@dataclass(kw_only=True)
class SamplingConfig:
    num_steps: int = 10
    shift: float | None = None  # null: the model's scheduler config (opd_fast.schedule); a number: that static shift
    noise_level: float = 0.0  # a: 0 = ODE rollout and L2 loss; > 0 = Flow-GRPO SDE and closed-form KL
    timestep_fraction: float = 0.99  # trained steps = int(num_steps * timestep_fraction), as the official code
    resolution: int = 512  # pixels; latent side = resolution // 8
    num_frames: int | None = None  # video families: frames per sample (null: the family's default, Wan's 81)


@dataclass(kw_only=True)
class LossConfig:
    kl_normalization: Literal["exact", "official"] = "exact"
    reduction: Literal["sum", "mean"] = "sum"  # over latent elements
    timestep_reduction: Literal["sum", "mean"] = "sum"  # over trained steps (official: mean)
    estimator: Literal["closed_form", "ppo"] = "closed_form"
    backend: Literal["auto", "reference", "triton", "cuda", "cpp"] = "auto"


@dataclass(kw_only=True)
class OptimizerConfig:
    lr: float = 3e-4
    schedule: Literal["constant", "cosine"] = "constant"  # cosine: lr (1 + cos(pi r / train.rounds)) / 2 in round r
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-4
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0


@dataclass(kw_only=True)
class EMAConfig:
    enabled: bool = True
    decay: float = 0.9  # effective decay min((1 + s) / (10 + s), decay), s = optimizer steps taken (official)
    update_every: int = 8


@dataclass(kw_only=True)
class TrainConfig:
    rounds: int = 100
    seed: int = 0
    micro_batch_size: int = 3
    micro_batches_per_task: int = 1
    schedule: Literal["one_pass", "two_pass"] = "one_pass"
    # the tasks' micro-batches as one student batch per step (each teacher on its own rows); same gradient
    task_batching: bool = False
    max_nonfinite_rounds: int = 3  # rounds skipped for a NaN/inf loss or gradient before the run stops


# engine.zero_stage null with a LoRA student; chosen by measurement: bench/RESULTS.md, section "Student update
# engines on CPU, 2 ranks (bench/bench_engine.py)"
LORA_ZERO_STAGE = 0


@dataclass(kw_only=True)
class EngineConfig:
    """How the student update runs (opd_fast.engine, opd_fast.distributed): one process, data parallel, or DeepSpeed.

    zero_stage null means "by student kind": 3 for a full-parameter student (partitions weights, gradients and
    optimizer state), 0 for a LoRA student: its state is small enough to replicate (SD3.5-M r32: ~19 M weights, 0.3 GB
    with gradients and Adam), stage 0 all-reduces once per round where stages 2-3 communicate at every backward call,
    and it was the fastest DeepSpeed stage for LoRA in bench/bench_engine.py (LORA_ZERO_STAGE)."""

    kind: Literal["single", "ddp", "deepspeed"] = "single"
    zero_stage: int | None = None  # deepspeed only: 0..3, null = by student kind (above)
    # deepspeed: to CPU the optimizer state (stage >= 1), and with "all" the weights too (stage 3)
    offload: Literal["none", "optimizer", "all"] = "none"
    bf16: bool = False  # deepspeed: bf16 weights, activations and gradients; fp32 master weights in the optimizer
    timeout_s: int = 600  # collective ops: a rank that died or hangs makes the others exit after at most this long
    persistence_threshold: int = 100_000  # ZeRO-3: parameters this small stay gathered (DeepSpeed's default)

    def resolved_zero_stage(self, lora: bool) -> int:
        if self.zero_stage is not None:
            return self.zero_stage
        return LORA_ZERO_STAGE if lora else 3


@dataclass(kw_only=True)
class CheckpointConfig:
    every: int = 10  # rounds
    keep_last: int = 3


@dataclass(kw_only=True)
class WandbConfig:
    """The W&B run (opd_fast.trackers); its files go to OUT/wandb. Set only with wandb in logging.trackers."""

    project: str | None = None  # null: WANDB_PROJECT, else "opd-fast"
    entity: str | None = None  # null: WANDB_ENTITY, else the logged-in user's default entity
    mode: Literal["online", "offline", "disabled"] | None = None  # null: WANDB_MODE, else online (W&B's default)
    tags: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class LoggingConfig:
    """Where a run's signals go besides OUT/metrics.jsonl: the experiment trackers (opd_fast.trackers).

    logging.tensorboard is the older switch, kept for configs that have it: alone it means trackers [tensorboard]
    (true) or [] (false); beside logging.trackers it must agree with it (a contradiction is an error)."""

    trackers: list[str] | None = None  # names in opd_fast.trackers; null: [tensorboard] unless tensorboard: false
    tensorboard: bool | None = None
    run_name: str | None = None  # the run's name in every tracker; null: the output folder's name
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress: bool = True

    def __post_init__(self):
        self.active_trackers()  # its checks, when the config loads

    def active_trackers(self) -> list[str]:
        """The tracker names this run opens, from logging.trackers and logging.tensorboard."""
        if self.trackers is None:
            names = [] if self.tensorboard is False else ["tensorboard"]
        else:
            names = list(self.trackers)
            unknown = [name for name in names if name not in TRACKER_NAMES]
            if unknown:
                raise ConfigError(
                    f"logging.trackers: unknown tracker(s) {', '.join(map(repr, unknown))} (known: "
                    f"{', '.join(TRACKER_NAMES)})"
                )
            if len(set(names)) != len(names):
                raise ConfigError(f"logging.trackers: a tracker is listed twice in {names}")
            if self.tensorboard is not None and self.tensorboard != ("tensorboard" in names):
                raise ConfigError(
                    f"logging.tensorboard: {str(self.tensorboard).lower()} contradicts logging.trackers {names}; "
                    "remove logging.tensorboard (logging.trackers decides) or make the two agree"
                )
        if "wandb" not in names:  # nothing would read these: refuse them rather than ignore them
            default = WandbConfig()
            for key in dataclasses.asdict(default):
                if getattr(self.wandb, key) != getattr(default, key):
                    raise ConfigError(
                        f"logging.wandb.{key}: only the wandb tracker reads it (logging.trackers: {names}); remove "
                        "it or add wandb to logging.trackers"
                    )
        return names


@dataclass(kw_only=True)
class EvalConfig:
    """In-training evaluation (opd_fast.evaluate.during.EvalHook): every `every` rounds (and after the last with
    at_end), each model of `models` samples a fixed, seeded subset of every task's prompts (held out of training,
    or from eval.prompts.TASK) through the family's pipeline, and each task's rewards score the images in the
    background: OUT/eval.jsonl, metrics.jsonl and the trackers. Off unless `every` or `at_end` is set."""

    every: int | None = None  # rounds between evaluations; null or 0: none (at_end may still evaluate once)
    at_end: bool = False  # also after the run's last round (train.rounds)
    models: list[Literal["ema", "student"]] = field(default_factory=lambda: ["ema"])  # ema: the EMA weights
    prompts_per_task: int = 8  # each task's evaluation prompts: a seeded subset (held out of training)
    seeds: int = 1  # images per prompt (the grid's columns)
    num_steps: int = 40  # the paper's evaluation setting
    guidance: float | None = None  # CFG scale; null: student.guidance (4.5 in the official recipe)
    resolution: int | None = None  # pixels; null: sampling.resolution
    batch_size: int = 8  # images per pipeline call
    seed: int = 0  # the held-out subset and the evaluation's noise
    pipeline: str | None = None  # pipeline folder whose VAE decodes (and scheduler samples); null: model.path
    prompts: dict[str, str] = field(default_factory=dict)  # task -> its own evaluation prompt file (not held out)
    # task (or "*": every task) -> [{name: REWARD, options...}], as `opd-fast eval`'s reward spec; every task's
    # rewards score its prompts, "*" ones every task's: the in-domain and cross-task columns of the paper's table
    rewards: dict[str, list[dict]] = field(default_factory=dict)
    wait_s: float = 600.0  # the run's end waits this long at most for evaluations still being scored

    @property
    def enabled(self) -> bool:
        return bool(self.every) or self.at_end


@dataclass(kw_only=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    tasks: list[TaskConfig] = field(default_factory=list)
    teacher_runtime: TeacherRuntimeConfig = field(default_factory=TeacherRuntimeConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def trained_steps(self, task: TaskConfig) -> int:
        """How many leading steps of `task`'s rollout are trained, with the task's own fraction if it sets one."""
        fraction = self.sampling.timestep_fraction if task.timestep_fraction is None else task.timestep_fraction
        return steps_for_fraction(self.sampling.num_steps, fraction)

    def validate(self) -> RunConfig:
        """Cross-field checks that types alone cannot express."""
        if not self.tasks:
            raise ConfigError("tasks: at least one task is required")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ConfigError(f"tasks: task names must be unique, got {names}")
        if len(self.optimizer.betas) != 2:
            raise ConfigError(f"optimizer.betas: needs two values, got {self.optimizer.betas}")
        positive = {
            "train.rounds": self.train.rounds,
            "train.micro_batch_size": self.train.micro_batch_size,
            "train.micro_batches_per_task": self.train.micro_batches_per_task,
            "sampling.num_steps": self.sampling.num_steps,
            "checkpoint.every": self.checkpoint.every,
            "checkpoint.keep_last": self.checkpoint.keep_last,
            "student.lora.rank": self.student.lora.rank,
            "ema.update_every": self.ema.update_every,
            "sampling.resolution": self.sampling.resolution,
            "optimizer.lr": self.optimizer.lr,
            "optimizer.eps": self.optimizer.eps,
            "student.lora.alpha": self.student.lora.alpha,
            "prompts.max_tokens": self.prompts.max_tokens,
            "prompts.encode_batch_size": self.prompts.encode_batch_size,
            **({"sampling.num_frames": self.sampling.num_frames} if self.sampling.num_frames is not None else {}),
            **{f"tasks.{i}.loss_weight": t.loss_weight for i, t in enumerate(self.tasks)},
        }
        optional = {
            "optimizer.max_grad_norm": self.optimizer.max_grad_norm,  # <= 0 would ascend (or zero) in torch
            "prompts.max_sequence_length": self.prompts.max_sequence_length,
            "sampling.shift": self.sampling.shift,
        }
        positive.update({key: value for key, value in optional.items() if value is not None})
        for key, value in positive.items():
            if not math.isfinite(value):
                raise ConfigError(f"{key}: must be a finite number, got {value}")
            if value <= 0:
                raise ConfigError(f"{key}: must be > 0, got {value}")
        for key, value in {
            "optimizer.betas.0": self.optimizer.betas[0],
            "optimizer.betas.1": self.optimizer.betas[1],
        }.items():
            if not 0 <= value < 1:
                raise ConfigError(f"{key}: must be in [0, 1), got {value}")
        if not 0 <= self.ema.decay <= 1:  # 1: the ramp (1 + s) / (10 + s) alone
            raise ConfigError(f"ema.decay: must be in [0, 1], got {self.ema.decay}")
        for key, value in {
            "sampling.noise_level": self.sampling.noise_level,
            "optimizer.weight_decay": self.optimizer.weight_decay,
        }.items():
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{key}: must be a finite number >= 0, got {value}")
        fractions = {"sampling.timestep_fraction": self.sampling.timestep_fraction}
        fractions.update(
            {
                f"tasks.{i}.timestep_fraction": t.timestep_fraction
                for i, t in enumerate(self.tasks)
                if t.timestep_fraction is not None
            }
        )
        for key, fraction in fractions.items():
            if not 0 < fraction <= 1:
                raise ConfigError(f"{key}: must be in (0, 1], got {fraction}")
            if steps_for_fraction(self.sampling.num_steps, fraction) < 1:
                raise ConfigError(f"{key}: trains no step at all with sampling.num_steps={self.sampling.num_steps}")
        guidance = {"student.guidance": self.student.guidance, "student.guidance_2": self.student.guidance_2}
        for i, t in enumerate(self.tasks):
            guidance[f"tasks.{i}.teacher.guidance"] = t.teacher.guidance
            guidance[f"tasks.{i}.teacher.guidance_2"] = t.teacher.guidance_2
        for key, value in guidance.items():
            if value is not None and not (math.isfinite(value) and 0 <= value <= MAX_GUIDANCE):
                raise ConfigError(
                    f"{key}: a CFG scale must be a finite number in [0, {MAX_GUIDANCE:g}] (null: no CFG), got {value}"
                )
        for i, task in enumerate(self.tasks):
            if task.teacher.pipeline is not None and task.teacher.format in ("peft", "diffusers"):
                raise ConfigError(
                    f"tasks.{i}.teacher.pipeline: a {task.teacher.format} LoRA teacher runs on the student's base, "
                    "with the student's text encoders; only a full-model teacher (format full) has a pipeline of "
                    "its own"
                )
        if self.loss.estimator == "ppo" and self.sampling.noise_level == 0:
            raise ConfigError("loss.estimator: 'ppo' needs an SDE rollout (sampling.noise_level > 0)")
        if self.sampling.resolution % 8:
            raise ConfigError(f"sampling.resolution: must be a multiple of 8, got {self.sampling.resolution}")
        self._validate_engine()
        if self.model.path is None and self.model.preset is None:
            raise ConfigError("model: set model.path (a local diffusers folder) or model.preset")
        if self.prompts.encoder == "pipeline" and self.model.path is None:
            raise ConfigError(
                "prompts.encoder: 'pipeline' needs model.path, the local pipeline folder whose text "
                "encoders encode the prompts"
            )
        self._validate_eval()
        return self

    def _validate_eval(self) -> None:
        ev = self.eval
        for key in ("prompts_per_task", "seeds", "num_steps", "batch_size"):
            if getattr(ev, key) <= 0:
                raise ConfigError(f"eval.{key}: must be > 0, got {getattr(ev, key)}")
        if ev.every is not None and ev.every < 0:
            raise ConfigError(f"eval.every: must be >= 0 (0 or null: no periodic evaluation), got {ev.every}")
        if not (math.isfinite(ev.wait_s) and ev.wait_s >= 0):
            raise ConfigError(f"eval.wait_s: must be a finite number >= 0, got {ev.wait_s}")
        if ev.resolution is not None and (ev.resolution <= 0 or ev.resolution % 8):
            raise ConfigError(f"eval.resolution: must be a positive multiple of 8, got {ev.resolution}")
        if ev.guidance is not None and not (math.isfinite(ev.guidance) and 0 <= ev.guidance <= MAX_GUIDANCE):
            raise ConfigError(
                f"eval.guidance: a CFG scale must be a finite number in [0, {MAX_GUIDANCE:g}], got {ev.guidance}"
            )
        if not ev.models or len(set(ev.models)) != len(ev.models):
            raise ConfigError(f"eval.models: one or both of ema, student, each once; got {ev.models}")
        if ev.enabled and "ema" in ev.models and not self.ema.enabled:
            raise ConfigError("eval.models: 'ema' needs ema.enabled: true (or evaluate [student])")
        tasks = [t.name for t in self.tasks]
        for task in ev.prompts:
            if task not in tasks:
                raise ConfigError(f"eval.prompts.{task}: no such task (tasks: {', '.join(tasks)})")
        for task, entries in ev.rewards.items():
            if task not in tasks and task != "*":
                raise ConfigError(f"eval.rewards.{task}: no such task (tasks: {', '.join(tasks)}, or * for all)")
            for i, entry in enumerate(entries):
                if not isinstance(entry.get("name"), str):
                    raise ConfigError(f"eval.rewards.{task}.{i}: needs name: REWARD (opd-fast eval --list)")
        if ev.enabled and ev.pipeline is None and self.model.path is None:
            raise ConfigError(
                "eval.pipeline: evaluation decodes its images with a pipeline folder's VAE: set eval.pipeline (or "
                "model.path)"
            )

    def _validate_engine(self) -> None:
        engine = self.engine
        master_fp32 = engine.kind == "deepspeed" and engine.bf16 and self.model.dtype == "bfloat16"
        if not self.student.lora.enabled and self.model.dtype != "float32" and not master_fp32:
            raise ConfigError(
                f"student.lora.enabled: false (a full-parameter student) with model.dtype: "
                f"{self.model.dtype} would update {self.model.dtype} weights, where small steps round "
                "away; set engine.kind: deepspeed with engine.bf16: true and model.dtype: bfloat16 (fp32 "
                "master weights), or model.dtype: float32"
            )
        if engine.timeout_s <= 0:
            raise ConfigError(f"engine.timeout_s: must be > 0, got {engine.timeout_s}")
        if engine.persistence_threshold < 0:
            raise ConfigError(f"engine.persistence_threshold: must be >= 0, got {engine.persistence_threshold}")
        if engine.kind != "deepspeed":  # these keys would be read by nothing: refuse them rather than ignore them
            defaults = EngineConfig()
            for key in ("zero_stage", "offload", "bf16", "persistence_threshold"):
                value, default = getattr(engine, key), getattr(defaults, key)
                if value != default:
                    raise ConfigError(
                        f"engine.{key}: only the deepspeed engine has it (engine.kind is "
                        f"{engine.kind!r}); remove it or set engine.kind: deepspeed"
                    )
            return
        if engine.zero_stage is not None and engine.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(
                f"engine.zero_stage: must be 0, 1, 2, 3 or null (by student kind), got {engine.zero_stage}"
            )
        stage = engine.resolved_zero_stage(self.student.lora.enabled)
        if engine.bf16 and stage == 0:
            raise ConfigError(
                "engine.bf16: needs ZeRO stage >= 1 (at stage 0 DeepSpeed sums a round's gradients in "
                "bf16); set engine.zero_stage, or for a LoRA student keep engine.bf16 false and set "
                "model.dtype: bfloat16 (bf16 base, fp32 LoRA weights, gradients and Adam)"
            )
        if engine.offload == "optimizer" and stage == 0:
            raise ConfigError("engine.offload: 'optimizer' needs ZeRO stage >= 1 (engine.zero_stage)")
        if engine.offload == "all" and stage != 3:
            raise ConfigError(f"engine.offload: 'all' (weights too) needs ZeRO stage 3, got stage {stage}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------------------
# loading and validation

_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def steps_for_fraction(num_steps: int, fraction: float) -> int:
    """int(num_steps * fraction): the official code's count of trained leading steps (9 of 10 at 0.99)."""
    return int(num_steps * fraction)


def _convert(value, tp, key: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {list(args)}, got {value!r}")
        return value
    if tp is dict or origin is dict:  # eval.rewards' options are free-form: a bare dict is kept as it is
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{key}: expected a mapping with string keys, got {type(value).__name__} {value!r}")
        return dict(value) if not args else {k: _convert(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_convert(v, args[0], f"{key}.{i}") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT.match(value):  # YAML 1.1 reads 3e-4 (no dot) as a string
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} at {key}")


def _build(cls, data, prefix: str = ""):
    where = prefix or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        dotted = ", ".join(f"{prefix}.{k}" if prefix else str(k) for k in unknown)
        raise ConfigError(f"unknown config key {dotted} (allowed under {where}: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: required key is missing")
    return cls(**kwargs)


def apply_override(data: dict, assignment: str) -> None:
    """Apply one `a.b.c=value` (list items by index: `tasks.0.teacher.guidance=1.0`) to the raw dict in place."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"--set {key.strip()}: the value {raw!r} is not valid YAML ({problem})") from None
    parts = key.strip().split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {key}: {where} is not an index of a list of {len(node)}")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"--set {key}: {where} is a value, not a section")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"--set {key}: {last} is not an index of a list of {len(node)}")
        node[int(last)] = value
    else:
        node[last] = value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Load a YAML config (safe loader), apply overrides, validate. Relative prompt/teacher/model paths are
    resolved against the config file's folder."""
    data: dict = {}
    base = Path.cwd()
    if path is not None:
        path = Path(path)
        data = read_yaml(path)
        base = path.resolve().parent
    for assignment in overrides:
        apply_override(data, assignment)
    cfg = _build(RunConfig, data).validate()
    _resolve_paths(cfg, base)
    return cfg


def _resolve_paths(cfg: RunConfig, base: Path) -> None:
    def resolve(p):
        return None if p is None else str(p if Path(p).is_absolute() else (base / p))

    cfg.model.path = resolve(cfg.model.path)
    cfg.prompts.cache_dir = resolve(cfg.prompts.cache_dir)
    for task in cfg.tasks:
        task.prompts = resolve(task.prompts)
        task.teacher.path = resolve(task.teacher.path)
        task.teacher.pipeline = resolve(task.teacher.pipeline)
    cfg.eval.pipeline = resolve(cfg.eval.pipeline)
    cfg.eval.prompts = {task: resolve(path) for task, path in cfg.eval.prompts.items()}
    for entries in cfg.eval.rewards.values():  # a reward's option that names a file beside the config: resolved
        for entry in entries:
            for key, value in entry.items():
                if (
                    key != "name"
                    and isinstance(value, str)
                    and not Path(value).is_absolute()
                    and (base / value).exists()
                ):
                    entry[key] = str(base / value)


def config_from_dict(data: dict) -> RunConfig:
    return _build(RunConfig, data).validate()
