"""`opd-fast demo`: the paper's comparison in miniature, stage by stage, each stage cached.

The stages form a small graph; stages whose inputs are ready run in parallel worker processes (one thread each: on a
few cores, torch's intra-op threads mostly wait on each other at this model size):

    prompts, base ─┬─ teacher/<task> (x3) ─┬─ opd-ode (the student), opd-sde, opd-ppo-sde  (the trainer)
                   │                       ├─ opd-ppo-sde-lr<lr> (x2)                       (the PPO-style lr sweep)
                   │                       ├─ offpolicy                                     (flow matching on teacher samples)
                   │                       └─ gradient-variance                             (the trainer, grads only)
                   ├─ teacher-grpo/<task> (x3) ── opd-ode-grpo     (stage 1 by Flow-GRPO-Fast, then the student's run)
                   ├─ teacher-nft/<task> (x3) ─── opd-ode-nft      (stage 1 by DiffusionNFT, then the student's run)
                   ├─ cascade/composition ── cascade/glyph ── cascade  (DiffusionNFT, one task after another)
                   └─ joint                                                                 (stage-1 method, all rewards)
    every model ── eval/<model>

Each stage is a function registered by its kind in opd_fast.demo.stages.STAGES; the plan below gives it its settings
(`params`) and its inputs. A stage's folder CACHE/<stage>-<key> is keyed by a hash of its settings, its inputs' keys
and the code version (the source of opd_fast and the demo's config, and the torch / diffusers / peft versions).
result.json is written last, so a folder with it is complete; a second run reads it and skips the work. Budgets are
in sample-passes (opd_fast.demo.flow.ComputeMeter): every stage-2 method gets what the OPD student spends.
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

PACKAGE = Path(__file__).resolve().parents[1]  # opd_fast/, in a checkout or installed
NOT_STAGE_CODE = ("demo/report.py", "demo/cli.py")  # package files that no stage's result depends on


@dataclass(frozen=True)
class Stage:
    name: str
    kind: str  # a key of opd_fast.demo.stages.STAGES
    params: dict
    deps: tuple[str, ...] = ()


# Flow-GRPO-Fast on the first 2 of 10 steps (the layout is set there) takes more rounds per budget than on 4 and
# learnt glyph faster; DiffusionNFT lost composition reward at 3e-3 (bench/RESULTS.md, "The demo with RL-trained
# teachers")
RL_SETTINGS = {"grpo": {"lr": 5e-3, "window": [0, 2]}, "nft": {"lr": 2e-3}}


@dataclass
class Preset:
    """Everything that sets the demo's size; `full` is the README's run, `quick` the CI's."""

    name: str
    pretrain: dict = field(default_factory=dict)  # PretrainSettings fields
    teacher: dict = field(default_factory=dict)  # FinetuneSettings fields (stage 1 and the joint baseline)
    teacher_budget: int = 30_000  # sample-passes per teacher
    offpolicy: dict = field(default_factory=dict)  # FinetuneSettings fields
    offpolicy_samples: int = 4  # teacher samples per prompt
    opd_overrides: tuple[str, ...] = ()  # --set overrides on the demo's config (configs/demo.yaml)
    eval: dict = field(default_factory=dict)  # EvalSettings fields
    gradient_draws: int = 12  # noise draws per estimator in the gradient-variance comparison
    # per stage-1 RL method: TeachSettings fields but `method` (its teachers; nft's also the cascade's)
    rl_teacher: dict = field(default_factory=lambda: {k: dict(v) for k, v in RL_SETTINGS.items()})
    rl_teacher_budget: int = 20_000  # sample-passes per RL teacher
    rl_stage1: bool = True  # the RL teacher sets, OPD from each, and the cascade baseline
    ppo_sweep: bool = True  # the PPO-style baseline at every lr of roster.PPO_SWEEP (else the student's lr only)
    seed: int = 0


PRESETS = {
    "full": Preset("full"),
    # the CI's: the full base (a weaker one follows glyph prompts too loosely to show anything), smaller budgets.
    # 50 rounds and 4 samples per prompt keep the student's composition gain clear of the evaluation's noise
    # (bench/RESULTS.md, "The quick demo on another CPU").
    # The RL teachers, OPD from them, the cascade and the PPO lr sweep would add minutes: the full run alone has them.
    "quick": Preset(
        "quick",
        teacher_budget=15_000,
        opd_overrides=("train.rounds=50",),
        eval={"seeds": 4, "curve_points": 3},
        gradient_draws=6,
        rl_stage1=False,
        ppo_sweep=False,
    ),
}


# -- the plan ------------------------------------------------------------------------------------------------------
def plan(preset: Preset) -> list[Stage]:
    """The stages, in dependency order, each with every setting it reads in its params (so in its cache key)."""
    from opd_fast.demo import roster, world
    from opd_fast.demo.stages import demo_config, units_per_round

    cfg = demo_config(preset.opd_overrides)
    opd_budget = units_per_round(cfg) * cfg.train.rounds
    # what the demo's own stages share with the trainer: text encoding, sampling grid, seed
    common = {
        "seed": preset.seed,
        "max_tokens": cfg.prompts.max_tokens,
        "num_steps": cfg.sampling.num_steps,
        "shift": cfg.sampling.shift,
    }
    teachers = tuple(roster.TEACHERS.values())
    inputs = ("prompts", "base") + teachers
    curve = {"curve": preset.eval}
    stages = [
        Stage("prompts", "prompts", {}),
        Stage("base", "pretrain", {**common, "settings": preset.pretrain}),
        *[
            Stage(
                teacher,
                "reward_finetune",
                {**common, "tasks": [t], "settings": preset.teacher, "budget": preset.teacher_budget},
                ("base",),
            )
            for t, teacher in roster.TEACHERS.items()
        ],
        Stage(
            roster.JOINT,
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
            for v in roster.OPD_VARIANTS
        ],
        *[  # the PPO-style baseline at lower learning rates, the same budget (opd-ppo-sde has the student's)
            Stage(
                name,
                "opd",
                {**common, **curve, "variant": "ppo-sde", "overrides": [*preset.opd_overrides, f"optimizer.lr={lr}"]},
                inputs,
            )
            for name, lr in roster.PPO_SWEEP.items()
            if lr is not None and preset.ppo_sweep
        ],
        Stage(
            "gradient-variance",
            "gradient_variance",
            {**common, "draws": preset.gradient_draws, "overrides": list(preset.opd_overrides)},
            inputs,
        ),
    ]
    if preset.rl_stage1:
        stages[2 + len(teachers) : 2 + len(teachers)] = rl_stage1_plan(preset, common, curve, opd_budget)
    evaluated = [m for m in roster.EVALUATED if m in {s.name for s in stages}]
    stages += [
        Stage(
            f"eval/{m}",
            "evaluate",
            {**common, "eval": preset.eval, "model": m},
            ("base",) if m == "base" else ("base", m),
        )
        for m in evaluated
    ]
    return stages


def rl_stage1_plan(preset: Preset, common: dict, curve: dict, opd_budget: int) -> list[Stage]:
    """Stage 1 by diffusion RL (the `teach` stage): a teacher set per method of roster.RL_TEACHERS, the student's
    run from each set, and the cascade baseline (one task after another, each from the last LoRA, on the student's
    budget in all). Placed before the other stage-2 runs: the cascade is a chain, and the teachers gate two runs."""
    from opd_fast.demo import roster

    stages = [
        Stage(
            teacher,
            "teach",
            {
                **common,
                "task": task,
                "settings": {**preset.rl_teacher[method], "method": method},
                "budget": preset.rl_teacher_budget,
            },
            ("prompts", "base"),
        )
        for method, teachers in roster.RL_TEACHERS.items()
        for task, teacher in teachers.items()
    ]
    previous = None
    for i, (task, name) in enumerate(roster.CASCADE.items()):
        budget = opd_budget * (i + 1) // len(roster.CASCADE) - opd_budget * i // len(roster.CASCADE)
        params = {
            **common,
            "task": task,
            "settings": {**preset.rl_teacher[roster.CASCADE_METHOD], "method": roster.CASCADE_METHOD},
            "budget": budget,
            "init": previous,
        }
        stages.append(Stage(name, "teach", params, ("prompts", "base") + ((previous,) if previous else ())))
        previous = name
    for name, method in roster.OPD_FROM_RL.items():
        teachers = roster.RL_TEACHERS[method]
        params = {**common, **curve, "variant": "ode", "overrides": list(preset.opd_overrides), "teachers": teachers}
        stages.append(Stage(name, "opd", params, ("prompts", "base", *teachers.values())))
    return stages


def needed_for(stages: list[Stage], name: str) -> list[Stage]:
    """The stage `name` and every stage it needs, directly or not, in plan order."""
    by_name = {s.name: s for s in stages}
    if name not in by_name:
        from opd_fast.config import ConfigError

        raise ConfigError(f"the demo has no stage {name!r}; its stages: {', '.join(by_name)}")
    needed, todo = set(), [name]
    while todo:
        stage = by_name[todo.pop()]
        if stage.name not in needed:
            needed.add(stage.name)
            todo += stage.deps
    return [s for s in stages if s.name in needed]


def code_version() -> str:
    """A hash of what every stage's result depends on beyond its settings: the package's source (but the report and
    the CLI), the demo's config, and the torch / diffusers / peft versions."""
    import diffusers
    import peft
    import torch

    from opd_fast.resources import DEMO_CONFIG, builtin_path

    h = hashlib.sha256(f"{torch.__version__} {diffusers.__version__} {peft.__version__}".encode())
    sources = sorted(p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).as_posix() not in NOT_STAGE_CODE)
    for path in sources + [builtin_path(DEMO_CONFIG)]:
        h.update(path.resolve().relative_to(PACKAGE.parent).as_posix().encode())
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
def run_stage(kind: str, params: dict, folder: str, inputs: dict[str, str], input_results: dict[str, dict]) -> dict:
    """Run the stage function registered as `kind` into `folder` (cleared first: a folder without result.json is an
    unfinished attempt) and write result.json last. Its inputs: each input stage's folder and result, by name."""
    import torch

    from opd_fast.demo.stages import STAGES, StageContext

    torch.set_num_threads(1)
    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    if kind not in STAGES:
        raise ValueError(f"unknown stage kind {kind!r} (registered: {', '.join(STAGES)})")
    torch.manual_seed(params.get("seed", 0))
    context = StageContext(params, folder, {name: Path(path) for name, path in inputs.items()}, input_results)
    result = STAGES[kind](context)
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
    only: str | None = None,
) -> dict:
    """Run (or read from the cache) every stage, then write OUT/results.{md,json}, samples.png, curves.png,
    gradient_variance.png and details.json. Returns results.json's content.

    only: a stage's name (e.g. "base", "teacher/glyph", "eval/opd-ode"): run that stage and the stages it needs,
    then stop without a report; returns their results (result.json's content), by name."""
    from tqdm.auto import tqdm

    from opd_fast.demo import report

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # diffusers' pipeline import warns about torchvision
    t0 = time.perf_counter()
    preset = PRESETS["quick" if quick else "full"]
    out = Path(out)
    if only is None:
        out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache) if cache is not None else default_cache()
    stages = plan(preset)
    keys = stage_keys(stages, code_version())
    folders = {s.name: cache / f"{s.name.replace('/', '-')}-{keys[s.name]}" for s in stages}
    if only is not None:
        stages = needed_for(stages, only)
    workers = workers or min(2, os.cpu_count() or 1)
    with tqdm(total=len(stages), desc=f"demo ({preset.name})", unit="stage") as bar:
        results = run_stages(stages, folders, force, workers, bar)
    if only is not None:
        print(f"stage {only} is done: {folders[only]}")
        return results
    return report.write_report(out, preset.name, results, folders, time.perf_counter() - t0)
