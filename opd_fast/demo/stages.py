"""The demo's training stages, each a function of its settings that writes its artefacts into one folder.

- pretrain: the base, a full SD3-architecture transformer trained by flow matching on generic renders with noisy
  captions (opd_fast.demo.world): it draws plausible images of each kind but follows the prompt's attributes loosely.
- reward_finetune: stage 1, one LoRA per task (a teacher) or one LoRA for all tasks at once (the joint baseline).
  The method is supervised fine-tuning on reward-filtered task data: a pool of captioned renders of the task's kind
  (the pretraining distribution, noisy captions) is scored by the task's reward against each caption, the best fifth
  is kept, and a LoRA is trained on it by flow matching, as web data is filtered by a reward model. Why not
  reward-filtered self-training on the model's own samples (RAFT)? We built and measured it: on this base it lifts
  composition only from 0.28 to ~0.43 in 60k sample-passes, too weak a teacher to show anything; filtered data
  gives teachers clearly better than the base on every task (0.65 / 0.81 / 0.53) in half that.
- offpolicy_distill: the off-policy baseline: flow-matching fine-tune on the teachers' own samples.
- opd: stage 2 through the real trainer (opd_fast.trainer.Trainer.fit, the code path of `opd-fast train`).

Every stage runs until a compute budget in sample-passes (flow.ComputeMeter) is spent, so equal-budget comparisons do
not depend on the machine's speed; seconds are measured and reported beside. Curves are (seconds, units, rewards)
points measured on a fixed evaluation subset; evaluation time is not counted as training time.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from opd_fast.checkpoint import export_diffusers_lora
from opd_fast.config import OFFICIAL_LORA_TARGETS, EMAConfig, LoraConfig, ModelConfig, TeacherConfig
from opd_fast.demo import flow, world
from opd_fast.engine import EMA
from opd_fast.models import add_student_lora, load_transformer
from opd_fast.teachers import load_teacher

LORA_FILE = "pytorch_lora_weights.safetensors"


@dataclass(frozen=True, kw_only=True)
class PretrainSettings:
    steps: int = 600
    batch: int = 32
    lr: float = 1e-2  # with warm-up and cosine decay; 3e-3 learns the prompt binding markedly slower (measured)
    pool: int = 8000  # generic renders, drawn with replacement
    caption_noise: float = 0.3  # probability that each attribute word of a caption is replaced by a random one
    ema_decay: float = 0.995


@dataclass(frozen=True, kw_only=True)
class FinetuneSettings:
    """A LoRA on the base, trained by flow matching: stage 1 (on reward-filtered renders) and the off-policy
    baseline (on teacher samples)."""

    rank: int = 16
    alpha: int = 32
    lr: float = 1e-2  # LoRA factors at this size learn slowly at the usual 1e-4..1e-3 (measured)
    batch: int = 128  # large batches: better gradients, and far more samples per second on a CPU than 32
    pool: int = 3000  # stage 1: generic renders scored per task
    keep: float = 0.2  # stage 1: the best-scoring fraction kept
    caption_noise: float = 0.3  # stage 1: the captions' noise in the pool (as in pretraining)


@dataclass(frozen=True, kw_only=True)
class EvalSettings:
    seeds: int = 8  # samples per prompt in the final evaluation (composition's reward moves in thirds: noisy)
    curve_points: int = 6  # evaluations along each stage-2 run (plus the start)
    curve_prompts: int = 16  # prompts per task in a curve evaluation (1 sample each)


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
    return load_transformer(ModelConfig(family=flow.FAMILY, preset=None, path=str(base_dir)))


def load_lora_model(base: torch.nn.Module, base_dir: Path, lora_dir: Path, name: str) -> torch.nn.Module:
    """The base with a LoRA file merged, through the trainer's own teacher loader."""
    cfg = TeacherConfig(path=str(lora_dir / LORA_FILE), format="diffusers", guidance=None)
    return load_teacher(name, cfg, base, ModelConfig(family=flow.FAMILY, preset=None, path=str(base_dir))).model


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


# -- stage 0: the base ---------------------------------------------------------------------------------------------
def pretrain(settings: PretrainSettings, seed: int, max_tokens: int, out_dir: Path) -> dict:
    """Full-parameter flow matching of a fresh transformer on generic renders; saves the EMA weights (a diffusers
    transformer folder) to out_dir."""
    clock = TrainClock()
    rng = np.random.default_rng(seed)
    images, captions = [], []
    for i in range(settings.pool):
        img, caption = world.render_pretraining(world.TASKS[i % len(world.TASKS)], rng, settings.caption_noise)
        images.append(img)
        captions.append(caption)
    data = world.to_model(np.stack(images))
    text = flow.TextConditioner(max_tokens)
    model = flow.build_model(seed)
    model.train()
    ema = EMA(list(model.parameters()), EMAConfig(decay=settings.ema_decay, update_every=1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(0.9, 0.99), weight_decay=0.0)
    warmup = max(settings.steps // 40, 1)

    def lr_factor(step: int) -> float:  # linear warm-up, cosine decay to 10%
        return min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / settings.steps)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    g = torch.Generator().manual_seed(seed)
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
        model.save_pretrained(out_dir)
    return {"seconds": clock.seconds(), "units": meter.units, "final_loss": float(np.mean(losses[-50:]))}


# -- stage 1: reward-filtered self-training ----------------------------------------------------------------------
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
    data: list[tuple[str, torch.Tensor]],
    base_dir: Path,
    settings: FinetuneSettings,
    budget: int,
    seed: int,
    grid: torch.Tensor,
    text: flow.TextConditioner,
    out_dir: Path,
    meter: flow.ComputeMeter,
    clock: TrainClock,
    tasks: tuple[str, ...],
    eval_settings: EvalSettings | None,
) -> dict:
    """Flow matching of a fresh LoRA on `data` [(prompt, image)], batches drawn with replacement, until the meter
    reaches `budget`; evaluated on `tasks` along the way when eval_settings is given. Saves the diffusers-layout
    LoRA to out_dir."""
    model, peft_config = _with_lora(base_dir, settings)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    curve, g = Curve(), torch.Generator().manual_seed(seed)
    every = max(budget // eval_settings.curve_points, 1) if eval_settings is not None else None
    next_eval, steps = 0, 0
    while True:
        if every is not None and meter.units >= next_eval:
            with clock.paused():
                curve.add(
                    clock.seconds(), meter.units, evaluate(model, text, grid, tasks, 1, eval_settings.curve_prompts)[0]
                )
            next_eval += every
        if meter.units >= budget:
            break
        idx = torch.randint(len(data), (settings.batch,), generator=g).tolist()
        loss = flow.flow_matching_loss(
            model, torch.stack([data[i][1] for i in idx]), text([data[i][0] for i in idx]), g
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        meter.train(settings.batch)
        steps += 1
    export_diffusers_lora(model, peft_config, flow.FAMILY, out_dir)
    return {
        "seconds": clock.seconds(),
        "units": meter.units,
        "steps": steps,
        "data": len(data),
        "curve": curve.__dict__,
    }


def reward_finetune(
    base_dir: Path,
    tasks: tuple[str, ...],
    settings: FinetuneSettings,
    budget: int,
    seed: int,
    grid: torch.Tensor,
    text: flow.TextConditioner,
    out_dir: Path,
    eval_settings: EvalSettings | None = None,
) -> dict:
    """Stage 1: fine-tuning on reward-filtered data of `tasks` (one task: a teacher; all three: the joint baseline)
    until `budget` sample-passes are spent."""
    clock = TrainClock()
    data = filtered_data(tasks, settings.pool, settings.keep, settings.caption_noise, seed)
    return fine_tune(
        data, base_dir, settings, budget, seed, grid, text, out_dir, flow.ComputeMeter(), clock, tasks, eval_settings
    )


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


def opd(
    cfg,
    out_dir: Path,
    text: flow.TextConditioner,
    grid: torch.Tensor,
    tasks: tuple[str, ...],
    eval_settings: EvalSettings,
) -> dict:
    """Run the trainer (Trainer.fit, as `opd-fast train`) on `cfg`; evaluate the student along the way."""
    from opd_fast.trainer import Trainer

    trainer = Trainer(cfg, out_dir, device="cpu")
    per_round = units_per_round(cfg)
    every = max(cfg.train.rounds // eval_settings.curve_points, 1)
    curve, train_seconds = Curve(), [0.0]

    def student_rewards() -> dict[str, float]:  # on the EMA weights when there are any: they are the result
        with trainer.ema.swapped_in() if trainer.ema is not None else contextlib.nullcontext():
            return evaluate(trainer.student, text, grid, tasks, 1, eval_settings.curve_prompts)[0]

    def on_round(trainer, record):
        train_seconds[0] += record["seconds"]
        if trainer.round % every == 0 or trainer.round == cfg.train.rounds:
            curve.add(train_seconds[0], trainer.round * per_round, student_rewards())

    curve.add(0.0, 0, student_rewards())
    records = trainer.fit(on_round)
    return {
        "seconds": train_seconds[0],
        "units": cfg.train.rounds * per_round,
        "rounds": len(records),
        "final_loss": records[-1]["loss"],
        "curve": curve.__dict__,
    }


class _GradientRecorder:
    """Stands in for the trainer's engine at step(): keeps the round's accumulated gradient (one flat vector) and
    clears it, leaving the weights as they are; everything else goes to the engine."""

    def __init__(self, engine):
        self.engine = engine
        self.gradients: list[torch.Tensor] = []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def step(self) -> float:
        flat = torch.cat(
            [
                (p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten().double()
                for p in self.engine.params
            ]
        )
        self.gradients.append(flat)
        self.engine.zero_grad()
        return float(flat.norm())


def gradient_variance(configs: dict, out_dir: Path, draws: int) -> dict:
    """Per-parameter variance of the round gradient over `draws` noise draws at one fixed student (the fresh
    student every OPD run starts from), for each estimator in `configs` ({"closed_form": cfg, "ppo": cfg}, equal
    but for loss.estimator). Round k of both runs sees the same prompts and the same noise: the same batches."""
    from opd_fast.trainer import Trainer

    gradients, sizes = {}, None
    for name, cfg in configs.items():
        trainer = Trainer(cfg, out_dir / name, device="cpu")
        recorder = _GradientRecorder(trainer.engine)
        trainer.engine = recorder
        for _ in range(draws):
            trainer.train_round()
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
def offpolicy_distill(
    base_dir: Path,
    teacher_loras: dict[str, Path],
    settings: FinetuneSettings,
    budget: int,
    samples_per_prompt: int,
    seed: int,
    grid: torch.Tensor,
    text: flow.TextConditioner,
    out_dir: Path,
    eval_settings: EvalSettings,
) -> dict:
    """Sample each teacher on its task's prompts once (ODE), then flow-matching fine-tune a fresh student LoRA on
    those samples until the budget (sampling included) is spent."""
    clock = TrainClock()
    meter = flow.ComputeMeter()
    base = load_base(base_dir)
    data: list[tuple[str, torch.Tensor]] = []
    for task, lora_dir in teacher_loras.items():
        teacher = load_lora_model(base, base_dir, lora_dir, f"offpolicy:{task}")
        prompts = [r["prompt"] for r in world.task_prompts(task) for _ in range(samples_per_prompt)]
        data += list(zip(prompts, generate(teacher, text, prompts, seed + 1, grid, meter)))
    del base, teacher
    return fine_tune(
        data, base_dir, settings, budget, seed, grid, text, out_dir, meter, clock, world.TASKS, eval_settings
    )
