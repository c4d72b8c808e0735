"""`opd-fast demo`: the paper's comparison in miniature, stage by stage, each stage cached.

The stages form a small graph; stages whose inputs are ready run in parallel worker processes (one thread each: on a
few cores, torch's intra-op threads mostly wait on each other at this model size):

    prompts, base ─┬─ teacher/<task> (x3) ─┬─ opd-ode (the student), opd-sde, opd-ppo-sde  (the trainer)
                   │                       ├─ offpolicy                                     (flow matching on teacher samples)
                   │                       └─ gradient-variance                             (the trainer, grads only)
                   └─ joint                                                                 (stage-1 method, all rewards)
    every model ── eval/<model>

A stage's folder CACHE/<stage>-<key> is keyed by a hash of its settings, its inputs' keys and the code version (the
source of opd_fast and configs/demo.yaml, and the torch / diffusers / peft versions). result.json is written last,
so a folder with it is complete; a second run reads it and skips the work. Budgets are in sample-passes
(opd_fast.demo.flow.ComputeMeter): every stage-2 method gets what the OPD student spends.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import multiprocessing
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "demo.yaml"
# what a stage's result depends on: the package's source but the report and the CLI, and the demo's config
CODE_VERSION_FILES = sorted(
    p for p in (REPO / "opd_fast").rglob("*.py") if p.name not in ("report.py", "cli.py") or p.parent.name != "demo"
) + [CONFIG]


@dataclass(frozen=True)
class Stage:
    name: str
    kind: str  # a key of STAGES (below)
    params: dict
    deps: tuple[str, ...] = ()


@dataclass
class Preset:
    """Everything that sets the demo's size; `full` is the README's run, `quick` the CI's."""

    name: str
    pretrain: dict = field(default_factory=dict)  # PretrainSettings fields
    teacher: dict = field(default_factory=dict)  # FinetuneSettings fields (stage 1 and the joint baseline)
    teacher_budget: int = 30_000  # sample-passes per teacher
    offpolicy: dict = field(default_factory=dict)  # FinetuneSettings fields
    offpolicy_samples: int = 4  # teacher samples per prompt
    opd_overrides: tuple[str, ...] = ()  # --set overrides on configs/demo.yaml
    eval: dict = field(default_factory=dict)  # EvalSettings fields
    gradient_draws: int = 12  # noise draws per estimator in the gradient-variance comparison
    seed: int = 0


PRESETS = {
    "full": Preset("full"),
    # the CI's: the full base (a weaker one follows glyph prompts too loosely to show anything), smaller budgets.
    # 50 rounds and 4 samples per prompt: at 34 and 2 the student's composition gain (+0.045 on one CPU) sat inside
    # the evaluation's noise; at 50 and 4 it was +0.10, +0.14, +0.31 over demo seeds 0-2 (bench/RESULTS.md).
    "quick": Preset(
        "quick",
        teacher_budget=15_000,
        opd_overrides=("train.rounds=50",),
        eval={"seeds": 4, "curve_points": 3},
        gradient_draws=6,
    ),
}
SDE_NOISE_LEVEL = 0.7  # Flow-GRPO's default a, for the SDE variants
SAMPLE_PROMPTS = {
    "composition": ["two red blocks on the left", "three blue blocks on the top"],
    "glyph": ['a sign saying "t"', 'a poster reading "z"'],
    "aesthetic": ["a calm sunset", "a quiet ocean"],
}


# -- the plan ------------------------------------------------------------------------------------------------------
def demo_config(preset: Preset, overrides: list[str] = ()):
    from opd_fast.config import load_config

    return load_config(CONFIG, list(preset.opd_overrides) + list(overrides))


def plan(preset: Preset) -> list[Stage]:
    """The stages, in dependency order, each with every setting it reads in its params (so in its cache key)."""
    from opd_fast.demo import world
    from opd_fast.demo.stages import units_per_round

    cfg = demo_config(preset)
    opd_budget = units_per_round(cfg) * cfg.train.rounds
    # what the demo's own stages share with the trainer: text encoding, sampling grid, seed
    common = {
        "seed": preset.seed,
        "max_tokens": cfg.prompts.max_tokens,
        "num_steps": cfg.sampling.num_steps,
        "shift": cfg.sampling.shift,
    }
    teachers = tuple(f"teacher/{t}" for t in world.TASKS)
    inputs = ("prompts", "base") + teachers
    curve = {"curve": preset.eval}
    stages = [
        Stage("prompts", "prompts", {}),
        Stage("base", "pretrain", {**common, "settings": preset.pretrain}),
        *[
            Stage(
                f"teacher/{t}",
                "reward_finetune",
                {**common, "tasks": [t], "settings": preset.teacher, "budget": preset.teacher_budget},
                ("base",),
            )
            for t in world.TASKS
        ],
        Stage(
            "joint",
            "reward_finetune",
            {**common, **curve, "tasks": list(world.TASKS), "settings": preset.teacher, "budget": opd_budget},
            ("base",),
        ),
        Stage(
            "offpolicy",
            "offpolicy",
            {
                **common,
                **curve,
                "settings": preset.offpolicy,
                "budget": opd_budget,
                "samples_per_prompt": preset.offpolicy_samples,
            },
            ("base",) + teachers,
        ),
        *[
            Stage(f"opd-{v}", "opd", {**common, **curve, "variant": v, "overrides": list(preset.opd_overrides)}, inputs)
            for v in ("ode", "sde", "ppo-sde")
        ],
        Stage(
            "gradient-variance",
            "gradient_variance",
            {**common, "draws": preset.gradient_draws, "overrides": list(preset.opd_overrides)},
            inputs,
        ),
    ]
    models = ["base", *teachers, "joint", "offpolicy", "opd-ode", "opd-sde", "opd-ppo-sde"]
    stages += [
        Stage(
            f"eval/{m}",
            "evaluate",
            {**common, "eval": preset.eval, "model": m},
            ("base",) if m == "base" else ("base", m),
        )
        for m in models
    ]
    return stages


def code_version() -> str:
    import diffusers
    import peft
    import torch

    h = hashlib.sha256(f"{torch.__version__} {diffusers.__version__} {peft.__version__}".encode())
    for path in CODE_VERSION_FILES:
        h.update(path.relative_to(REPO).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def stage_keys(stages: list[Stage], version: str) -> dict[str, str]:
    keys: dict[str, str] = {}
    for stage in stages:  # in dependency order
        blob = json.dumps(
            {"kind": stage.kind, "params": stage.params, "deps": [keys[d] for d in stage.deps], "code": version},
            sort_keys=True,
        )
        keys[stage.name] = hashlib.sha256(blob.encode()).hexdigest()[:12]
    return keys


# -- executing one stage (in a worker process) ---------------------------------------------------------------------
def _lora_file(folder: Path, result: dict) -> Path:
    return folder / result["lora"] / "pytorch_lora_weights.safetensors"


def trainer_overrides(params: dict, folders: dict[str, Path], results: dict[str, dict]) -> list[str]:
    """--set overrides that point configs/demo.yaml at the cached base, prompts and teachers, and pick the variant:
    "ode" is the config as written, "sde" SDE rollouts with the closed-form KL, "ppo-sde" the PPO-style surrogate."""
    from opd_fast.demo import world

    overrides = list(params["overrides"]) + [f"model.path={folders['base'] / 'base'}"]
    for i, task in enumerate(world.TASKS):
        teacher = f"teacher/{task}"
        overrides += [
            f"tasks.{i}.name={task}",
            f"tasks.{i}.prompts={folders['prompts'] / f'{task}.txt'}",
            f"tasks.{i}.teacher.path={_lora_file(folders[teacher], results[teacher])}",
        ]
    variant = params.get("variant", "ode")
    if variant in ("sde", "ppo-sde"):
        overrides.append(f"sampling.noise_level={SDE_NOISE_LEVEL}")
    if variant == "ppo-sde":
        overrides.append("loss.estimator=ppo")
    return overrides


def _execute(kind: str, params: dict, folder: Path, folders: dict[str, Path], results: dict[str, dict]) -> dict:
    import numpy as np
    import torch

    from opd_fast.config import load_config
    from opd_fast.demo import flow, stages, world

    torch.manual_seed(params.get("seed", 0))
    if kind == "prompts":
        for task in world.TASKS:
            (folder / f"{task}.txt").write_text("".join(r["prompt"] + "\n" for r in world.task_prompts(task)))
        return {}
    text, grid = flow.TextConditioner(params["max_tokens"]), flow.sigmas(params["num_steps"], params["shift"])
    curve = stages.EvalSettings(**params["curve"]) if "curve" in params else None
    if kind == "pretrain":
        settings = stages.PretrainSettings(**params["settings"])
        return {**stages.pretrain(settings, params["seed"], params["max_tokens"], folder / "base"), "lora": None}
    if kind == "reward_finetune":
        settings = stages.FinetuneSettings(**params["settings"])
        out = stages.reward_finetune(
            folders["base"] / "base",
            tuple(params["tasks"]),
            settings,
            params["budget"],
            params["seed"],
            grid,
            text,
            folder / "lora",
            curve,
        )
        return {**out, "lora": "lora"}
    if kind == "offpolicy":
        loras = {t: _lora_file(folders[f"teacher/{t}"], results[f"teacher/{t}"]).parent for t in world.TASKS}
        out = stages.offpolicy_distill(
            folders["base"] / "base",
            loras,
            stages.FinetuneSettings(**params["settings"]),
            params["budget"],
            params["samples_per_prompt"],
            params["seed"],
            grid,
            text,
            folder / "lora",
            curve,
        )
        return {**out, "lora": "lora"}
    if kind == "opd":
        overrides = trainer_overrides(params, folders, results) + [f"prompts.cache_dir={folder / 'embeddings'}"]
        cfg = load_config(CONFIG, overrides)
        out = stages.opd(cfg, folder / "run", text, grid, world.TASKS, curve)
        lora = "run/lora_diffusers_ema" if cfg.ema.enabled else "run/lora_diffusers"
        return {**out, "lora": lora, "overrides": overrides}
    if kind == "gradient_variance":
        # fixed prompts: each task's prompt file holds exactly one micro-batch, so every draw sees the same prompts
        base_cfg = load_config(CONFIG, params["overrides"])
        batch = base_cfg.train.micro_batch_size * base_cfg.train.micro_batches_per_task
        for task in world.TASKS:
            rows = world.task_prompts(task)[::7][:batch]
            (folder / f"{task}.txt").write_text("".join(r["prompt"] + "\n" for r in rows))
        overrides = trainer_overrides({**params, "variant": "sde"}, folders, results)
        overrides += [f"tasks.{i}.prompts={folder / f'{t}.txt'}" for i, t in enumerate(world.TASKS)]
        overrides += ["loss.backend=reference", "optimizer.max_grad_norm=null", f"prompts.cache_dir={folder / 'emb'}"]
        configs = {name: load_config(CONFIG, overrides + [f"loss.estimator={name}"]) for name in ("closed_form", "ppo")}
        return stages.gradient_variance(configs, folder, params["draws"])
    if kind == "evaluate":
        settings = stages.EvalSettings(**params["eval"])
        base_dir = folders["base"] / "base"
        model = stages.load_base(base_dir)
        name = params["model"]
        if name != "base":
            model = stages.load_lora_model(model, base_dir, _lora_file(folders[name], results[name]).parent, name)
        rewards, images = stages.evaluate(model, text, grid, world.TASKS, settings.seeds)
        picks = {
            t: [[r["prompt"] for r in world.task_prompts(t)].index(p) for p in SAMPLE_PROMPTS[t]] for t in world.TASKS
        }
        grid_images = np.concatenate([world.to_pixels(images[t][picks[t]]) for t in world.TASKS])
        np.save(folder / "samples.npy", grid_images)
        return {"rewards": rewards}
    raise ValueError(f"unknown stage kind {kind!r}")


def run_stage(kind: str, params: dict, folder: str, folders: dict[str, str], results: dict[str, dict]) -> dict:
    """Run one stage into `folder` (cleared first: a folder without result.json is an unfinished attempt) and write
    result.json last."""
    import torch

    torch.set_num_threads(1)
    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    result = _execute(kind, params, folder, {k: Path(v) for k, v in folders.items()}, results)
    result["stage_seconds"] = time.perf_counter() - t0  # wall-clock of the whole stage, evaluations included
    tmp = folder / "result.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(folder / "result.json")
    return result


# -- running the graph ---------------------------------------------------------------------------------------------
def run_stages(stages: list[Stage], folders: dict[str, Path], force: bool, workers: int, bar) -> dict[str, dict]:
    """Run every stage not already cached, each as soon as its inputs are done, up to `workers` at a time."""
    results: dict[str, dict] = {}
    pending = []
    for stage in stages:
        done = folders[stage.name] / "result.json"
        if done.is_file() and not force:
            results[stage.name] = json.loads(done.read_text())
            bar.update(1)
        else:
            pending.append(stage)
    if not pending:
        return results
    context = multiprocessing.get_context("spawn")  # fork after torch has started threads is unsafe
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) if workers > 1 else None
    running: dict[concurrent.futures.Future, str] = {}
    try:
        while pending or running:
            for stage in [s for s in pending if all(d in results for d in s.deps)]:
                if len(running) >= workers:
                    break
                pending.remove(stage)
                args = (
                    stage.kind,
                    stage.params,
                    str(folders[stage.name]),
                    {d: str(folders[d]) for d in stage.deps},
                    {d: results[d] for d in stage.deps},
                )
                if pool is None:  # one worker: run here, in order
                    future = concurrent.futures.Future()
                    bar.set_postfix_str(stage.name)
                    future.set_result(run_stage(*args))
                else:
                    future = pool.submit(run_stage, *args)
                running[future] = stage.name
            bar.set_postfix_str(", ".join(sorted(running.values())))
            done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                name = running.pop(future)
                results[name] = future.result()  # a failed stage raises here, with its traceback
                bar.update(1)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return results


def default_cache() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "opd-fast" / "demo"


def run_demo(
    out: str | Path,
    quick: bool = False,
    force: bool = False,
    cache: str | Path | None = None,
    workers: int | None = None,
) -> dict:
    """Run (or read from the cache) every stage, then write OUT/results.{md,json}, samples.png, curves.png,
    gradient_variance.png and details.json. Returns results.json's content."""
    from tqdm.auto import tqdm

    from opd_fast.demo import report

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # diffusers' pipeline import warns about torchvision
    t0 = time.perf_counter()
    preset = PRESETS["quick" if quick else "full"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache) if cache is not None else default_cache()
    stages = plan(preset)
    keys = stage_keys(stages, code_version())
    folders = {s.name: cache / f"{s.name.replace('/', '-')}-{keys[s.name]}" for s in stages}
    workers = workers or min(2, os.cpu_count() or 1)
    with tqdm(total=len(stages), desc=f"demo ({preset.name})", unit="stage") as bar:
        results = run_stages(stages, folders, force, workers, bar)
    summary = report.write_report(out, preset.name, results, folders, time.perf_counter() - t0)
    return summary
