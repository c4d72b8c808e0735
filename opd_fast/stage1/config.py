"""Stage-1 (teacher) configs: `opd-fast teach` trains ONE task's teacher by diffusion RL on that task's reward.

A teach config is a run config (opd_fast.config: model, student, prompts, sampling, optimizer, ema, train, engine,
checkpoint, logging: the same keys, the same validation) with, instead of `tasks` and `teacher_runtime`:

    method: grpo | nft
    task: {name, prompts, prompts_kind, images: vae | state, reward: {name: REWARD, OPTION: VALUE...}}
    rollout: {prompts_per_round, group_size}
    grpo: {...}   nft: {...}    (the method's own section; the other one must stay at its defaults)

TeachConfig IS a RunConfig (a subclass), so the run's builders, the run folder, checkpoints and export take it as
they are; its `tasks` holds one task derived from `task` (no teacher) whose trained steps and micro-batches are the
stage-1 round's backward calls, which the multi-process engines count (opd_fast.engine.backwards_per_round).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from opd_fast.config import (
    PROMPT_KINDS,
    ConfigError,
    RunConfig,
    TaskConfig,
    TeacherConfig,
    _build,
    apply_override,
    read_yaml,
    steps_for_fraction,
)

NO_TEACHER = "(stage 1 trains this teacher: none is read)"  # the derived task's teacher path; never loaded


@dataclass(kw_only=True)
class TeachTaskConfig:
    name: str
    prompts: str  # as tasks.N.prompts of a run config
    prompts_kind: Literal[PROMPT_KINDS] = "auto"
    # how a final state becomes the images the reward scores: vae (the VAE of eval.pipeline, else model.path) or
    # state (the state IS the image, (B, 3, H, W) in [-1, 1]: the demo world's models)
    images: Literal["vae", "state"] = "vae"
    # {name: a reward of opd_fast.evaluate.registry, or "demo"; every other key is the reward's own option}. Read by
    # the loader (its options are the reward's business: build_reward names an unknown one)
    reward: dict = field(default_factory=dict)


@dataclass(kw_only=True)
class RolloutConfig:
    prompts_per_round: int = 4  # per rank
    group_size: int = 4  # samples per prompt: the group whose rewards make the advantages


@dataclass(kw_only=True)
class GRPOConfig:
    """Flow-GRPO (Liu et al. 2025) with its Fast variant and GRPO-Guard's ratio normalisation."""

    clip_range: float = 1e-4  # the ratio's clip: official 1e-4, since its log-prob is a mean over elements
    adv_clip_max: float = 5.0  # advantages clipped to [-m, m]
    global_std: bool = False  # divide by the std over the whole round instead of the group's
    kl_beta: float = 0.0  # weight of the closed-form KL to the reference policy (the base without the LoRA)
    # Fast variant: SDE steps [start, stop) only (trained), ODE elsewhere; null: SDE everywhere, the leading
    # int(num_steps * sampling.timestep_fraction) steps trained (plain Flow-GRPO)
    window: list[int] | None = None
    ratio_norm: bool = False  # GRPO-Guard: the ratio re-centred and scaled per step, the step's loss / |dt|
    reduction: Literal["mean", "sum"] = "mean"  # log p and KL over latent elements: mean (official) or sum
    kl_normalization: Literal["official", "exact"] = "official"  # the KL's denominator: std_t^2 (official)


@dataclass(kw_only=True)
class NFTConfig:
    """DiffusionNFT (Zheng et al. 2025): CFG-free, implicit positive / negative policies, any rollout solver."""

    beta: float = 1.0  # the implicit policies' step: v+ = beta v + (1 - beta) v_old, v- = (1 + beta) v_old - beta v
    adv_clip_max: float = 5.0  # advantages clipped to [-m, m], then mapped to an optimality r in [0, 1]
    kl_beta: float = 0.0  # weight of ||v - v_ref||^2 to the reference policy (the base without the LoRA)
    timesteps: int = 4  # noise levels trained per sample per round, drawn from the rollout's grid


STAGE1_SECTIONS = ("method", "task", "rollout", "grpo", "nft")


@dataclass(kw_only=True)
class TeachConfig(RunConfig):
    method: Literal["grpo", "nft"] = "grpo"
    task: TeachTaskConfig
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    nft: NFTConfig = field(default_factory=NFTConfig)

    # -- what the round trains ------------------------------------------------------------------------------------
    def sde_window(self) -> tuple[int, int]:
        """GRPO's trained steps [start, stop): the Fast window, or the leading steps of sampling.timestep_fraction."""
        if self.grpo.window is not None:
            return self.grpo.window[0], self.grpo.window[1]
        return 0, steps_for_fraction(self.sampling.num_steps, self.sampling.timestep_fraction)

    def trained_per_sample(self) -> int:
        """Backward calls per micro-batch: GRPO's trained steps, NFT's noise levels."""
        start, stop = self.sde_window()
        return stop - start if self.method == "grpo" else self.nft.timesteps

    def samples_per_round(self) -> int:
        return self.rollout.prompts_per_round * self.rollout.group_size

    def validate(self) -> TeachConfig:
        self._derive()
        super().validate()
        n = self.sampling.num_steps
        if not isinstance(self.task.reward, dict) or not isinstance(self.task.reward.get("name"), str):
            raise ConfigError("task.reward: expected a mapping with a string `name` (and the reward's options)")
        positive = {
            "rollout.prompts_per_round": self.rollout.prompts_per_round,
            "nft.timesteps": self.nft.timesteps,
            "grpo.clip_range": self.grpo.clip_range,
            "grpo.adv_clip_max": self.grpo.adv_clip_max,
            "nft.adv_clip_max": self.nft.adv_clip_max,
            "nft.beta": self.nft.beta,
        }
        for key, value in positive.items():
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{key}: must be a finite number > 0, got {value}")
        for key, value in {"grpo.kl_beta": self.grpo.kl_beta, "nft.kl_beta": self.nft.kl_beta}.items():
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{key}: must be a finite number >= 0, got {value}")
        if self.rollout.group_size < 2:
            raise ConfigError(f"rollout.group_size: a group needs >= 2 samples, got {self.rollout.group_size}")
        if self.samples_per_round() % self.train.micro_batch_size:
            raise ConfigError(
                f"train.micro_batch_size: {self.train.micro_batch_size} must divide the round's samples per rank, "
                f"rollout.prompts_per_round x rollout.group_size = {self.samples_per_round()}"
            )
        idle = GRPOConfig() if self.method == "nft" else NFTConfig()
        section = "grpo" if self.method == "nft" else "nft"
        for key, default in dataclasses.asdict(idle).items():
            if getattr(getattr(self, section), key) != default:
                raise ConfigError(f"{section}.{key}: only method {section} reads it (method is {self.method!r})")
        if self.method == "grpo":
            if self.sampling.noise_level <= 0:
                raise ConfigError("sampling.noise_level: Flow-GRPO needs SDE rollouts (> 0; Flow-GRPO's default 0.7)")
            window = self.grpo.window
            if window is not None and not (len(window) == 2 and 0 <= window[0] < window[1] <= n):
                raise ConfigError(f"grpo.window: [start, stop) with 0 <= start < stop <= {n}, got {window}")
        elif self.student.guidance not in (None, 1.0):
            raise ConfigError(f"student.guidance: DiffusionNFT is CFG-free (null or 1.0), got {self.student.guidance}")
        elif self.student.guidance_2 not in (None, 1.0):
            raise ConfigError(
                f"student.guidance_2: DiffusionNFT is CFG-free (null or 1.0), got {self.student.guidance_2}"
            )
        elif self.nft.timesteps > n:
            raise ConfigError(f"nft.timesteps: at most sampling.num_steps ({n}), got {self.nft.timesteps}")
        if max(self.grpo.kl_beta, self.nft.kl_beta) > 0 and not self.student.lora.enabled:
            raise ConfigError("grpo.kl_beta / nft.kl_beta: the reference policy is the base under the LoRA: needs one")
        return self

    def _derive(self) -> None:
        """The one task the run's parts see: the stage-1 task, no teacher, its trained steps and micro-batches the
        round's backward calls (engine.backwards_per_round counts them)."""
        k, n = self.trained_per_sample(), self.sampling.num_steps
        fraction = 1.0 if k >= n else (k + 0.5) / n  # int(n * fraction) == k without a rounding edge
        task = self.task
        self.tasks = [
            TaskConfig(
                name=task.name,
                prompts=task.prompts,
                prompts_kind=task.prompts_kind,
                teacher=TeacherConfig(path=NO_TEACHER, guidance=None),
                timestep_fraction=fraction,
            )
        ]
        self.train.micro_batches_per_task = max(self.samples_per_round() // self.train.micro_batch_size, 1)


def load_teach_config(
    path: str | Path | None = None, overrides: list[str] = (), data: dict | None = None, base: Path | None = None
):
    """A teach config from YAML (or the mapping `data`), --set overrides applied, validated; relative paths resolved
    against the file's folder (`data`: against `base`, default the working folder: a pipeline config's own)."""
    base = Path.cwd() if base is None else Path(base)
    if data is None:
        data = {}
        if path is not None:
            path = Path(path)
            data = read_yaml(path)
            base = path.resolve().parent
    data = copy.deepcopy(data)
    for assignment in overrides:
        apply_override(data, assignment)
    cfg = teach_config_from_dict(data)
    resolve = lambda p: None if p is None else str(p if Path(p).is_absolute() else base / p)
    cfg.model.path = resolve(cfg.model.path)
    cfg.prompts.cache_dir = resolve(cfg.prompts.cache_dir)
    cfg.task.prompts = resolve(cfg.task.prompts)
    cfg.tasks[0].prompts = cfg.task.prompts
    return cfg


def teach_config_from_dict(data: dict) -> TeachConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping, got {type(data).__name__}")
    for key in ("tasks", "teacher_runtime", "loss"):
        if key in data:
            raise ConfigError(
                f"{key}: a teach config trains one task's teacher: use `task:` (with its reward) and the method's "
                "section (grpo: / nft:) instead"
            )
    data = copy.deepcopy(data)
    task = data.get("task")
    reward = task.pop("reward", None) if isinstance(task, dict) else None
    if isinstance(task, dict) and reward is None:
        raise ConfigError("task.reward: required key is missing ({name: REWARD, options...})")
    cfg = _build(TeachConfig, data)
    cfg.task.reward = reward
    return cfg.validate()
