"""The demo's stages, registered by name: each is a function of one StageContext (its settings, its folder, its
inputs) that writes its artefacts into its folder and returns what result.json records.

- prompts: each task's prompt file, for the trainer.
- pretrain: the base, a full SD3-architecture transformer trained by flow matching on generic renders with noisy
  captions (opd_fast.demo.world): it draws plausible images of each kind but follows the prompt's attributes loosely.
- reward_finetune: stage 1, one LoRA per task (a teacher) or one LoRA for all tasks at once (the joint baseline).
  The method is supervised fine-tuning on reward-filtered task data: a pool of captioned renders of the task's kind
  (the pretraining distribution, noisy captions) is scored by the task's reward against each caption, the best fifth
  is kept, and a LoRA is trained on it by flow matching, as web data is filtered by a reward model. Reward-filtered
  self-training on the model's own samples (RAFT) makes too weak a teacher on this base to show anything.
- teach: stage 1 by diffusion RL through the real stage-1 trainer (opd_fast.stage1's TeachTrainer, the code path of
  `opd-fast teach`): Flow-GRPO-Fast or DiffusionNFT on one task's demo reward, a teacher from the base or, given an
  input stage's LoRA to start from, the next link of the cascade baseline (one task after another).
- offpolicy: the off-policy baseline: flow-matching fine-tune on the teachers' own samples.
- opd: stage 2 through the real trainer (opd_fast.trainer.Trainer.fit, the code path of `opd-fast train`).
- gradient_variance: the trainer's round gradient under the closed-form KL and the PPO-style surrogate.
- evaluate: one model's rewards on every prompt of each task, and its samples of roster.SAMPLE_PROMPTS.

Every training stage runs until a compute budget in sample-passes (flow.ComputeMeter) is spent, so equal-budget
comparisons do not depend on the machine's speed; seconds are measured and reported beside. Curves are (seconds,
units, rewards) points measured on a fixed evaluation subset; evaluation time is not counted as training time.

The measurements behind the settings' defaults and the choices above: bench/RESULTS.md, "The demo's settings".
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from opd_fast.checkpoint import export_diffusers_lora
from opd_fast.config import OFFICIAL_LORA_TARGETS, EMAConfig, LoraConfig, ModelConfig, TeacherConfig, load_config
from opd_fast.demo import flow, roster, world
from opd_fast.engine import EMA
from opd_fast.hooks import Hook
from opd_fast.models import add_student_lora, load_transformer
from opd_fast.resources import DEMO_CONFIG, builtin_path
from opd_fast.teachers import load_teacher

LORA_FILE = "pytorch_lora_weights.safetensors"


@dataclass(frozen=True, kw_only=True)
class PretrainSettings:
    steps: int = 600
    batch: int = 32
    lr: float = 1e-2  # with warm-up and cosine decay; 3e-3 learns the prompt binding markedly slower
    pool: int = 8000  # generic renders, drawn with replacement
    caption_noise: float = 0.3  # probability that each attribute word of a caption is replaced by a random one
    ema_decay: float = 0.995


@dataclass(frozen=True, kw_only=True)
class FinetuneSettings:
    """A LoRA on the base, trained by flow matching: stage 1 (on reward-filtered renders) and the off-policy
    baseline (on teacher samples)."""

    rank: int = 16
    alpha: int = 32
    lr: float = 1e-2  # LoRA factors this small learn slowly at the usual 1e-4..1e-3
    batch: int = 128  # large batches: better gradients, and far more samples per second on a CPU than 32
    pool: int = 3000  # stage 1: generic renders scored per task
    keep: float = 0.2  # stage 1: the best-scoring fraction kept
    caption_noise: float = 0.3  # stage 1: the captions' noise in the pool (as in pretraining)


@dataclass(frozen=True, kw_only=True)
class EvalSettings:
    seeds: int = 8  # samples per prompt in the final evaluation (composition's reward moves in thirds: noisy)
    curve_points: int = 6  # evaluations along each stage-2 run (plus the start)
    curve_prompts: int = 16  # prompts per task in a curve evaluation (1 sample each)


# -- the registry and the context every stage gets -----------------------------------------------------------------
Settings = TypeVar("Settings")


@dataclass
class StageContext:
    """One stage's view of the demo: its settings, its folder and its inputs, and what stages derive from them.

    params: the stage's settings, exactly what its cache key hashes (run.plan writes them: seed, max_tokens,
    num_steps, shift, and the stage's own keys such as "settings", "budget", "curve", "tasks", "model").
    inputs, input_results: each input stage's folder and result.json, by stage name (e.g. "base", "teacher/glyph").
    """

    params: dict
    folder: Path  # the stage's own folder, empty at the start
    inputs: dict[str, Path]
    input_results: dict[str, dict]

    @property
    def seed(self) -> int:
        return self.params.get("seed", 0)

    @cached_property
    def text(self) -> flow.TextConditioner:  # the trainer's text encoding, at the demo config's token count
        return flow.TextConditioner(self.params["max_tokens"])

    @cached_property
    def grid(self) -> torch.Tensor:  # (num_steps + 1,) sigmas of the demo config's sampling
        return flow.sigmas(self.params["num_steps"], self.params["shift"])

    @property
    def curve(self) -> EvalSettings | None:  # evaluations along the way: stage-2 methods only
        return EvalSettings(**self.params["curve"]) if "curve" in self.params else None

    def settings(self, kind: type[Settings]) -> Settings:
        return kind(**self.params["settings"])

    @property
    def base_dir(self) -> Path:  # the base transformer's folder (a diffusers model folder)
        return self.inputs["base"] / "base"

    def lora_dir(self, model: str) -> Path:
        """The diffusers-layout LoRA folder (holding LORA_FILE) that the input stage `model` trained."""
        return self.inputs[model] / self.input_results[model]["lora"]


StageFunction = Callable[[StageContext], dict]
STAGES: dict[str, StageFunction] = {}  # a Stage's kind (run.plan) -> the function that runs it


def stage(kind: str) -> Callable[[StageFunction], StageFunction]:
    """Register the decorated function as the stage kind `kind`."""

    def register(function: StageFunction) -> StageFunction:
        if kind in STAGES:
            raise ValueError(f"stage kind {kind!r} is registered twice")
        STAGES[kind] = function
        return function

    return register


def demo_config(overrides: list[str] = ()):
    """The demo's stage-2 config (the built-in configs/demo.yaml) with --set overrides."""
    return load_config(builtin_path(DEMO_CONFIG), list(overrides))


class TrainClock:
    """Training seconds: wall-clock since start, minus the time spent inside `paused()` (evaluations)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.excluded = 0.0

    def seconds(self) -> float:
        return time.perf_counter() - self.start - self.excluded

    @contextlib.contextmanager
    def paused(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - t0


@dataclass
class Curve:
    """Reward against training time: one point per evaluation."""

    seconds: list[float] = field(default_factory=list)
    units: list[int] = field(default_factory=list)
    rewards: list[dict[str, float]] = field(default_factory=list)

    def add(self, seconds: float, units: int, rewards: dict[str, float]) -> None:
        self.seconds.append(round(seconds, 3))
        self.units.append(int(units))
        self.rewards.append(rewards)


# -- models --------------------------------------------------------------------------------------------------------
def load_base(base_dir: Path) -> torch.nn.Module:
    return load_transformer(ModelConfig(family=flow.FAMILY.name, preset=None, path=str(base_dir)), flow.FAMILY)


def load_lora_model(base: torch.nn.Module, base_dir: Path, lora_dir: Path, name: str) -> torch.nn.Module:
    """The base with a LoRA file merged, through the trainer's own teacher loader."""
    cfg = TeacherConfig(path=str(lora_dir / LORA_FILE), format="diffusers", guidance=None)
    return load_teacher(name, cfg, base, flow.FAMILY).model


def _with_lora(base_dir: Path, settings: FinetuneSettings):
    model = load_base(base_dir)
    lora = LoraConfig(rank=settings.rank, alpha=settings.alpha, init="gaussian", targets=list(OFFICIAL_LORA_TARGETS))
    peft_config = add_student_lora(model, lora)
    return model, peft_config


# -- evaluation ----------------------------------------------------------------------------------------------------
def _noise(seed: int, index: int, count: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return torch.randn(count, 3, world.SIZE, world.SIZE, generator=g)


def generate(
    model,
    text: flow.TextConditioner,
    prompts: list[str],
    seed: int,
    grid: torch.Tensor,
    meter: flow.ComputeMeter | None = None,
    batch: int = 64,
) -> torch.Tensor:
    """ODE samples, one per prompt; prompt i's initial noise depends only on (seed, i)."""
    out = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        noise = torch.cat([_noise(seed, start + i, 1) for i in range(len(chunk))])
        out.append(flow.sample(model, text(chunk), noise, grid, meter=meter))
    return torch.cat(out)


def evaluate(
    model,
    text: flow.TextConditioner,
    grid: torch.Tensor,
    tasks: tuple[str, ...],
    seeds: int,
    prompts_per_task: int | None = None,
    seed: int = 12345,
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Mean reward per task over its prompts x `seeds` samples (fixed noise), and the samples of the first seed."""
    was_training = model.training
    model.eval()
    scores, images = {}, {}
    for task in tasks:
        rows = world.task_prompts(task)[:prompts_per_task]
        prompts = [r["prompt"] for r in rows]
        values = []
        for s in range(seeds):
            x = generate(model, text, prompts, seed + 7919 * s, grid)
            values.append(world.rewards(task, x, rows))
            if s == 0:
                images[task] = x
        scores[task] = float(np.mean(values))
    model.train(was_training)
    return scores, images


@stage("evaluate")
def evaluate_model(ctx: StageContext) -> dict:
    """The final evaluation of the model ctx.params["model"]: every prompt of each task x EvalSettings.seeds samples;
    samples.npy holds its first-seed samples of roster.SAMPLE_PROMPTS (samples.png's row)."""
    settings = EvalSettings(**ctx.params["eval"])
    model = load_base(ctx.base_dir)
    name = ctx.params["model"]
    if name != "base":
        model = load_lora_model(model, ctx.base_dir, ctx.lora_dir(name), name)
    rewards, images = evaluate(model, ctx.text, ctx.grid, world.TASKS, settings.seeds)
    picks = {
        t: [[r["prompt"] for r in world.task_prompts(t)].index(p) for p in roster.SAMPLE_PROMPTS[t]]
        for t in world.TASKS
    }
    grid_images = np.concatenate([world.to_pixels(images[t][picks[t]]) for t in world.TASKS])
    np.save(ctx.folder / "samples.npy", grid_images)
    return {"rewards": rewards}


# -- stage 0: the prompts and the base -----------------------------------------------------------------------------
@stage("prompts")
def write_prompts(ctx: StageContext) -> dict:
    """Each task's prompt file (one prompt a line), as the trainer reads it."""
    for task in world.TASKS:
        (ctx.folder / f"{task}.txt").write_text("".join(r["prompt"] + "\n" for r in world.task_prompts(task)))
    return {}


@stage("pretrain")
def pretrain(ctx: StageContext) -> dict:
    """Full-parameter flow matching of a fresh transformer on generic renders; saves the EMA weights (a diffusers
    transformer folder) to FOLDER/base."""
    settings = ctx.settings(PretrainSettings)
    clock = TrainClock()
    rng = np.random.default_rng(ctx.seed)
    images, captions = [], []
    for i in range(settings.pool):
        img, caption = world.render_pretraining(world.TASKS[i % len(world.TASKS)], rng, settings.caption_noise)
        images.append(img)
        captions.append(caption)
    data = world.to_model(np.stack(images))
    text = ctx.text
    model = flow.build_model(ctx.seed)
    model.train()
    ema = EMA(list(model.parameters()), EMAConfig(decay=settings.ema_decay, update_every=1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(0.9, 0.99), weight_decay=0.0)
    warmup = max(settings.steps // 40, 1)

    def lr_factor(step: int) -> float:  # linear warm-up, cosine decay to 10%
        return min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / settings.steps)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    g = torch.Generator().manual_seed(ctx.seed)
    meter = flow.ComputeMeter()
    losses = []
    for step in range(settings.steps):
        idx = torch.randint(settings.pool, (settings.batch,), generator=g)
        loss = flow.flow_matching_loss(model, data[idx], text([captions[i] for i in idx]), g)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        meter.train(settings.batch)
        losses.append(float(loss.detach()))
        ema.update(step)  # EMA weights sample far cleaner than the last iterate of a short run
    with ema.swapped_in():
        model.save_pretrained(ctx.folder / "base")
    return {"seconds": clock.seconds(), "units": meter.units, "final_loss": float(np.mean(losses[-50:])), "lora": None}


# -- stage 1: fine-tuning on reward-filtered data ------------------------------------------------------------------
def filtered_data(
    tasks: tuple[str, ...], pool: int, keep: float, caption_noise: float, seed: int
) -> list[tuple[str, torch.Tensor]]:
    """Per task: `pool` generic renders with noisy captions (the pretraining distribution), each scored by the task's
    reward against its own caption; the best `keep` fraction is the fine-tuning set (caption, image)."""
    data = []
    for t_idx, task in enumerate(tasks):
        rng = np.random.default_rng([seed, t_idx])
        rows = {r["prompt"]: r for r in world.task_prompts(task)}
        renders = [world.render_pretraining(task, rng, caption_noise) for _ in range(pool)]
        scores = np.array([world.reward(task, img, rows[caption]) for img, caption in renders])
        best = np.argsort(-scores, kind="stable")[: int(pool * keep)]
        images = world.to_model(np.stack([renders[i][0] for i in best]))
        data += [(renders[i][1], img) for i, img in zip(best, images)]
    return data


def fine_tune(
    ctx: StageContext,
    data: list[tuple[str, torch.Tensor]],
    meter: flow.ComputeMeter,
    clock: TrainClock,
    tasks: tuple[str, ...],
) -> dict:
    """Flow matching of a fresh LoRA (ctx's FinetuneSettings) on `data` [(prompt, image)], batches drawn with
    replacement, until the meter reaches ctx.params["budget"]; evaluated on `tasks` along the way when the stage
    draws a curve. Saves the diffusers-layout LoRA to FOLDER/lora."""
    settings, budget, eval_settings = ctx.settings(FinetuneSettings), ctx.params["budget"], ctx.curve
    model, peft_config = _with_lora(ctx.base_dir, settings)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    curve, g = Curve(), torch.Generator().manual_seed(ctx.seed)
    every = max(budget // eval_settings.curve_points, 1) if eval_settings is not None else None
    next_eval, steps = 0, 0
    while True:
        if every is not None and meter.units >= next_eval:
            with clock.paused():  # the point's seconds are read before its evaluation runs
                seconds = clock.seconds()
                rewards = evaluate(model, ctx.text, ctx.grid, tasks, 1, eval_settings.curve_prompts)[0]
                curve.add(seconds, meter.units, rewards)
            next_eval += every
        if meter.units >= budget:
            break
        idx = torch.randint(len(data), (settings.batch,), generator=g).tolist()
        loss = flow.flow_matching_loss(
            model, torch.stack([data[i][1] for i in idx]), ctx.text([data[i][0] for i in idx]), g
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        meter.train(settings.batch)
        steps += 1
    export_diffusers_lora(model, peft_config, flow.FAMILY, ctx.folder / "lora")
    return {
        "seconds": clock.seconds(),
        "units": meter.units,
        "steps": steps,
        "data": len(data),
        "curve": curve.__dict__,
        "lora": "lora",
    }


@stage("reward_finetune")
def reward_finetune(ctx: StageContext) -> dict:
    """Stage 1: fine-tuning on reward-filtered data of ctx.params["tasks"] (one task: a teacher; all three: the
    joint baseline) until the budget is spent."""
    settings, tasks = ctx.settings(FinetuneSettings), tuple(ctx.params["tasks"])
    clock = TrainClock()
    data = filtered_data(tasks, settings.pool, settings.keep, settings.caption_noise, ctx.seed)
    return fine_tune(ctx, data, flow.ComputeMeter(), clock, tasks)


# -- stage 2: on-policy distillation through the trainer -----------------------------------------------------------
def units_per_round(cfg) -> int:
    """Sample-passes of one trainer round: per task and sample, every trained step costs a student forward +
    backward and a teacher forward (CFG doubles the passes it applies to); the rollout stops after the last trained
    step, so untrained steps cost nothing."""
    student = 2 if cfg.student.guidance not in (None, 1.0) else 1
    per_sample = 0
    for task in cfg.tasks:
        teacher = 2 if task.teacher.guidance not in (None, 1.0) else 1
        per_sample += cfg.trained_steps(task) * (3 * student + teacher)
    return per_sample * cfg.train.micro_batch_size * cfg.train.micro_batches_per_task


def trainer_overrides(ctx: StageContext, variant: str) -> list[str]:
    """--set overrides that point configs/demo.yaml at the cached base, prompts and teachers (ctx.params["teachers"],
    task -> input stage, when given; else roster.TEACHERS), and pick the variant: "ode" is the config as written,
    "sde" SDE rollouts with the closed-form KL, "ppo-sde" the PPO-style surrogate."""
    overrides = list(ctx.params["overrides"]) + [f"model.path={ctx.base_dir}"]
    teachers = ctx.params.get("teachers", roster.TEACHERS)
    for i, task in enumerate(world.TASKS):
        teacher = teachers[task]
        overrides += [
            f"tasks.{i}.name={task}",
            f"tasks.{i}.prompts={ctx.inputs['prompts'] / f'{task}.txt'}",
            f"tasks.{i}.teacher.path={ctx.lora_dir(teacher) / LORA_FILE}",
        ]
    if variant in ("sde", "ppo-sde"):
        overrides.append(f"sampling.noise_level={roster.SDE_NOISE_LEVEL}")
    if variant == "ppo-sde":
        overrides.append("loss.estimator=ppo")
    return overrides


@stage("opd")
def opd(ctx: StageContext) -> dict:
    """The trainer (Trainer.fit, as `opd-fast train`) on the demo config in variant ctx.params["variant"]; the student
    is evaluated along the way."""
    from opd_fast.trainer import Trainer

    overrides = trainer_overrides(ctx, ctx.params["variant"]) + [f"prompts.cache_dir={ctx.folder / 'embeddings'}"]
    cfg = demo_config(overrides)
    eval_settings = ctx.curve
    per_round = units_per_round(cfg)
    every = max(cfg.train.rounds // eval_settings.curve_points, 1)
    curve, train_seconds = Curve(), [0.0]

    def student_rewards(trainer) -> dict[str, float]:  # on the EMA weights when there are any: they are the result
        with trainer.ema.swapped_in() if trainer.ema is not None else contextlib.nullcontext():
            return evaluate(trainer.student, ctx.text, ctx.grid, world.TASKS, 1, eval_settings.curve_prompts)[0]

    class RewardCurve(Hook):
        """The student's rewards every `every` rounds, against the training seconds so far."""

        def after_record(self, trainer, record):
            train_seconds[0] += record["seconds"]
            if trainer.round % every == 0 or trainer.round == cfg.train.rounds:
                curve.add(train_seconds[0], trainer.round * per_round, student_rewards(trainer))

    trainer = Trainer.build(cfg, ctx.folder / "run", device="cpu", hooks=[RewardCurve()])
    curve.add(0.0, 0, student_rewards(trainer))
    records = trainer.fit()
    return {
        "seconds": train_seconds[0],
        "units": cfg.train.rounds * per_round,
        "rounds": len(records),
        "final_loss": records[-1]["loss"],
        "curve": curve.__dict__,
        "lora": "run/lora_diffusers_ema" if cfg.ema.enabled else "run/lora_diffusers",
        "overrides": overrides,
    }


class _GradientRecorder(Hook):
    """Keeps each measured round's accumulated gradient as one flat float64 vector."""

    def __init__(self):
        self.gradients: list[torch.Tensor] = []

    def after_gradients(self, trainer, round_idx):
        grads = [(p.grad if p.grad is not None else torch.zeros_like(p)) for p in trainer.engine.params]
        self.gradients.append(torch.cat([g.detach().flatten().double() for g in grads]))


@stage("gradient_variance")
def gradient_variance(ctx: StageContext) -> dict:
    """The trainer's round gradient at the fresh student, SDE rollouts, over ctx.params["draws"] noise draws for the
    closed-form KL and the PPO-style surrogate. Each task's prompt file holds exactly one micro-batch of fixed
    prompts, so every draw sees the same prompts."""
    batch_cfg = demo_config(ctx.params["overrides"])
    batch = batch_cfg.train.micro_batch_size * batch_cfg.train.micro_batches_per_task
    for task in world.TASKS:
        rows = world.task_prompts(task)[::7][:batch]
        (ctx.folder / f"{task}.txt").write_text("".join(r["prompt"] + "\n" for r in rows))
    overrides = trainer_overrides(ctx, "sde")
    overrides += [f"tasks.{i}.prompts={ctx.folder / f'{t}.txt'}" for i, t in enumerate(world.TASKS)]
    overrides += ["loss.backend=reference", "optimizer.max_grad_norm=null", f"prompts.cache_dir={ctx.folder / 'emb'}"]
    configs = {name: demo_config(overrides + [f"loss.estimator={name}"]) for name in ("closed_form", "ppo")}
    return compare_gradient_variance(configs, ctx.folder, ctx.params["draws"])


def compare_gradient_variance(configs: dict, out_dir: Path, draws: int) -> dict:
    """Per-parameter variance of the round gradient over `draws` noise draws at one fixed student (the fresh
    student every OPD run starts from), for each estimator in `configs` ({"closed_form": cfg, "ppo": cfg}, equal
    but for loss.estimator). Round k of both runs sees the same prompts and the same noise: the same batches."""
    from opd_fast.trainer import Trainer

    gradients, sizes = {}, None
    for name, cfg in configs.items():
        recorder = _GradientRecorder()
        trainer = Trainer.build(cfg, out_dir / name, device="cpu", hooks=[recorder])
        for _ in range(draws):
            trainer.train_round(step=False)  # the same fresh student at every draw
        gradients[name] = torch.stack(recorder.gradients)  # (draws, parameters)
        sizes = [p.numel() for p in trainer.engine.params]
    variance = {name: g.var(0) for name, g in gradients.items()}  # per parameter
    moving = variance["closed_form"] + variance["ppo"] > 0  # LoRA A starts where B = 0 gives it no gradient
    per_tensor = {
        name: [
            float(chunk[chunk_moving].mean()) if chunk_moving.any() else 0.0
            for chunk, chunk_moving in zip(v.split(sizes), moving.split(sizes))
        ]
        for name, v in variance.items()
    }
    mean_cf, mean_ppo = gradients["closed_form"].mean(0), gradients["ppo"].mean(0)
    closed, ppo = float(variance["closed_form"][moving].mean()), float(variance["ppo"][moving].mean())
    return {
        "draws": draws,
        "parameters": int(moving.sum()),
        "variance_closed_form": closed,
        "variance_ppo": ppo,
        "ratio": ppo / closed,
        "mean_gradient_cosine": float(torch.nn.functional.cosine_similarity(mean_cf, mean_ppo, 0)),
        "per_tensor": per_tensor,
    }


# -- the off-policy baseline ---------------------------------------------------------------------------------------
@stage("offpolicy")
def offpolicy_distill(ctx: StageContext) -> dict:
    """Sample each teacher on its task's prompts once (ODE), ctx.params["samples_per_prompt"] samples a prompt,
    then flow-matching fine-tune a fresh student LoRA on those samples until the budget (sampling included) is
    spent."""
    clock = TrainClock()
    meter = flow.ComputeMeter()
    base = load_base(ctx.base_dir)
    data: list[tuple[str, torch.Tensor]] = []
    for task in world.TASKS:
        teacher = load_lora_model(base, ctx.base_dir, ctx.lora_dir(roster.TEACHERS[task]), f"offpolicy:{task}")
        prompts = [r["prompt"] for r in world.task_prompts(task) for _ in range(ctx.params["samples_per_prompt"])]
        data += list(zip(prompts, generate(teacher, ctx.text, prompts, ctx.seed + 1, ctx.grid, meter)))
    del base, teacher
    return fine_tune(ctx, data, meter, clock, world.TASKS)


# -- stage 1 by diffusion RL: the real stage-1 trainer (opd-fast teach) --------------------------------------------
@dataclass(frozen=True, kw_only=True)
class TeachSettings:
    """A stage-1 LoRA trained by Flow-GRPO (Fast window) or DiffusionNFT on one task's demo reward, through
    opd_fast.stage1's TeachTrainer (the code path of `opd-fast teach`). The demo's choice per method is
    opd_fast.demo.run.RL_SETTINGS (measured: bench/RESULTS.md, "The demo with RL-trained teachers")."""

    method: str = "grpo"  # grpo | nft
    rank: int = 16
    alpha: int = 32
    lr: float = 3e-3
    prompts_per_round: int = 8
    group_size: int = 4
    window: tuple[int, int] = (0, 4)  # grpo: Flow-GRPO-Fast's SDE window [start, stop)
    noise_level: float = 0.7  # grpo: the SDE's a (nft samples by ODE)
    nft_timesteps: int = 4  # nft: noise levels trained per sample and round
    ema_decay: float = 0.9


def teach_config(ctx: StageContext, task: str, settings: TeachSettings, rounds: int):
    """The teach config (opd_fast.stage1.config) of one task's stage-1 run on the demo's base, prompts and reward."""
    from opd_fast.stage1.config import load_teach_config

    samples = settings.prompts_per_round * settings.group_size
    method = {
        "grpo": {"grpo": {"window": list(settings.window)}},
        "nft": {"nft": {"timesteps": settings.nft_timesteps}},
    }
    data = {
        "model": {"family": flow.FAMILY.name, "path": str(ctx.base_dir), "preset": None},
        "student": {"guidance": None, "lora": {"rank": settings.rank, "alpha": settings.alpha}},
        "method": settings.method,
        "task": {
            "name": task,
            "prompts": str(ctx.inputs["prompts"] / f"{task}.txt"),
            "images": "state",  # the demo model's state is the image
            "reward": {"name": "demo", "task": task},
        },
        "rollout": {"prompts_per_round": settings.prompts_per_round, "group_size": settings.group_size},
        **method[settings.method],
        "prompts": {"max_tokens": ctx.params["max_tokens"], "cache_dir": str(ctx.folder / "embeddings")},
        "sampling": {
            "num_steps": ctx.params["num_steps"],
            "shift": ctx.params["shift"],
            "noise_level": settings.noise_level if settings.method == "grpo" else 0.0,
            "resolution": 128,
        },
        "optimizer": {"lr": settings.lr},
        "train": {"rounds": rounds, "micro_batch_size": samples, "seed": ctx.seed},
        "ema": {"enabled": True, "decay": settings.ema_decay, "update_every": 1},
        "checkpoint": {"every": 10_000, "keep_last": 1},
        "logging": {"tensorboard": False, "progress": False},
    }
    return load_teach_config(data=data)


def teach_units_per_round(cfg) -> int:
    """Sample-passes of one stage-1 round: the rollout's forward of every sample at every step (the reward needs the
    final image), plus a forward and a backward per trained step (GRPO) or noise level (NFT) of every sample."""
    return cfg.samples_per_round() * (cfg.sampling.num_steps + 3 * cfg.trained_per_sample())


def start_from_lora(trainer, lora_file: Path) -> None:
    """Put the LoRA in `lora_file` (diffusers layout, the same rank and targets) into the fresh student's adapter and
    its EMA, before the first round: a run that continues another run's LoRA (the cascade baseline), with a fresh
    optimizer. The trainer's own loader reads the file (opd_fast.teachers), so alpha / r is checked, not assumed."""
    from opd_fast.teachers import read_diffusers_lora

    lora = read_diffusers_lora(lora_file, f"start_from_lora({lora_file})")
    modules = dict(trainer.student.named_modules())
    adapted = {name for name, m in modules.items() if hasattr(m, "lora_A") and "default" in m.lora_A}
    if set(lora.pairs) != adapted:
        raise ValueError(
            f"{lora_file}: its modules differ from the student's LoRA ({len(lora.pairs)} vs {len(adapted)})"
        )
    with torch.no_grad():
        for name, (A, B) in lora.pairs.items():
            layer = modules[name]
            if not math.isclose(layer.scaling["default"], lora.scales[name]):
                raise ValueError(
                    f"{lora_file}: {name} has scale {lora.scales[name]}, the student's {layer.scaling['default']}"
                )
            layer.lora_A["default"].weight.copy_(A)
            layer.lora_B["default"].weight.copy_(B)
        if trainer.ema is not None:  # the EMA starts where the weights do, as in a fresh run
            for shadow, p in zip(trainer.ema.shadow, trainer.engine.params):
                shadow.copy_(p.detach().float())


@stage("teach")
def teach(ctx: StageContext) -> dict:
    """Stage 1 by diffusion RL on the task ctx.params["task"] until ctx.params["budget"] sample-passes are spent;
    with ctx.params["init"] (an input stage's name), the LoRA starts from that stage's instead of zero (the cascade:
    one task after another), and seconds and units count the whole chain."""
    from opd_fast.stage1.trainer import TeachTrainer

    settings, task = ctx.settings(TeachSettings), ctx.params["task"]
    per_round = teach_units_per_round(teach_config(ctx, task, settings, 1))
    rounds = max(round(ctx.params["budget"] / per_round), 1)
    cfg = teach_config(ctx, task, settings, rounds)
    trainer = TeachTrainer.build(cfg, ctx.folder / "run", device="cpu")
    init = ctx.params.get("init")
    try:
        if init is not None:
            start_from_lora(trainer, ctx.lora_dir(init) / LORA_FILE)
        records = trainer.fit()
    finally:
        trainer.close()
    seconds, units = sum(r["seconds"] for r in records), rounds * per_round
    earlier = ctx.input_results[init] if init is not None else {"seconds": 0.0, "units": 0, "chain": []}
    return {
        "seconds": earlier["seconds"] + seconds,
        "units": earlier["units"] + units,
        "own_seconds": seconds,
        "own_units": units,
        "rounds": len(records),
        "chain": earlier["chain"] + [task],  # the tasks trained, in order, this one last
        "rewards": [r["reward"] for r in records],  # each round's mean reward on its own samples
        "lora": "run/lora_diffusers_ema",
    }
