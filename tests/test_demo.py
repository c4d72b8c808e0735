"""The demo's world (rewards against hand-made images) and a reduced end-to-end run (`opd-fast demo --quick`)."""

import json

import numpy as np
import pytest

from opd_fast.demo import world

RNG = np.random.default_rng(0)


def _row(task: str, prompt: str) -> dict:
    return next(r for r in world.task_prompts(task) if r["prompt"] == prompt)


# -- composition ---------------------------------------------------------------------------------------------------
def test_composition_perfect_render_scores_one():
    for row in world.task_prompts("composition"):
        img = world.render_perfect("composition", row, RNG)
        assert world.reward("composition", img, row) == 1.0, row["prompt"]


def test_composition_detector_finds_the_blocks():
    img = world.render_composition(3, "blue", "top", RNG)
    blobs = world.detect_blocks(img)
    assert [b[0] for b in blobs] == ["blue"] * 3
    assert all(r < 7.5 for _, r, _ in blobs)


@pytest.mark.parametrize(
    "render, expected",
    [
        (dict(count=2, color="green", side="left"), 0.0),  # wrong colour: no red block at all
        (dict(count=2, color="red", side="right"), 2 / 3),  # wrong side
        (dict(count=3, color="red", side="left"), 2 / 3),  # wrong count
        (dict(count=1, color="red", side="right"), 1 / 3),  # wrong count and side
    ],
)
def test_composition_wrong_attributes_score_low(render, expected):
    row = _row("composition", "two red blocks on the left")
    img = world.render_composition(render["count"], render["color"], render["side"], RNG)
    assert world.reward("composition", img, row) == pytest.approx(expected)


def test_composition_blank_and_other_colour_majority_score_low():
    row = _row("composition", "one yellow blocks on the bottom")
    assert world.reward("composition", world._canvas(world.BACKGROUND), row) == 0.0
    img = world.render_composition(1, "yellow", "bottom", np.random.default_rng(1))
    img[0:4, 0:4] = world.COLORS["blue"]  # two foreign blocks outnumber the one yellow block
    img[0:4, 12:16] = world.COLORS["blue"]
    assert world.reward("composition", img, row) < 1.0


# -- glyph ---------------------------------------------------------------------------------------------------------
def test_glyph_perfect_render_scores_one_and_is_read():
    for glyph in world.FONT:
        img = world.render_glyph(glyph)
        assert world.read_glyph(img)[0] == glyph
        assert world.glyph_reward(img, glyph) == pytest.approx(1.0, abs=1e-5)


def test_glyph_wrong_glyph_scores_zero():
    for glyph in world.FONT:
        for other in world.FONT:
            if other != glyph:
                assert world.glyph_reward(world.render_glyph(other), glyph) == 0.0, (glyph, other)


def test_glyph_tolerates_a_pixel_shift_and_noise():
    img = world.render_glyph("t", dy=1, dx=-1) + RNG.normal(0, 0.05, (16, 16, 3)).astype(np.float32)
    assert world.glyph_reward(np.clip(img, 0, 1), "t") > 0.8


def test_glyph_blank_panel_scores_zero():
    assert world.glyph_reward(world._canvas(world.PANEL), "o") == 0.0


# -- aesthetic -----------------------------------------------------------------------------------------------------
def test_aesthetic_ideal_scene_scores_high_and_wrong_palette_low():
    for scene in world.SCENES:
        ideal = world.render_scene(scene)
        assert world.aesthetic_reward(ideal, scene) > 0.95
        others = [world.aesthetic_reward(ideal, other) for other in world.SCENES if other != scene]
        assert max(others) < 0.75, scene


def test_aesthetic_speckle_lowers_the_score():
    ideal = world.render_scene("ocean")
    noisy = np.clip(ideal + RNG.normal(0, 0.15, ideal.shape).astype(np.float32), 0, 1)
    assert world.aesthetic_reward(noisy, "ocean") < world.aesthetic_reward(ideal, "ocean") - 0.3


# -- the model-space round trip and the batch API ------------------------------------------------------------------
def test_rewards_take_model_space_images():
    rows = world.task_prompts("glyph")[:3]
    images = np.stack([world.render_perfect("glyph", r, RNG) for r in rows])
    x = world.to_model(images)
    assert x.shape == (3, 3, 16, 16) and float(x.min()) >= -1 and float(x.max()) <= 1
    np.testing.assert_allclose(world.rewards("glyph", x, rows), 1.0, atol=1e-5)


# -- the reduced demo, end to end ----------------------------------------------------------------------------------
def test_quick_demo_end_to_end(tmp_path):
    from opd_fast.demo.run import run_demo

    out, cache = tmp_path / "out", tmp_path / "cache"
    summary = run_demo(out, quick=True, cache=cache)
    for name in ("results.md", "results.json", "samples.png", "curves.png", "gradient_variance.png", "details.json"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert results == summary
    assert set(results) == {"tasks", "student", "joint_baseline", "teachers", "models"}
    assert results["tasks"] == list(world.TASKS)
    for model in results["models"].values():
        assert set(model) == {"rewards", "average", "seconds"} and set(model["rewards"]) == set(world.TASKS)
    models, student = results["models"], results["student"]
    for task in world.TASKS:  # the ordering that must hold even at the reduced size
        assert models[student]["rewards"][task] > models["base"]["rewards"][task] + 0.05, task
        teacher = results["teachers"][task]
        assert models[teacher]["rewards"][task] > models["base"]["rewards"][task] + 0.1, task
    details = json.loads((out / "details.json").read_text())
    assert details["gradient_variance"]["ratio"] > 1.0  # the PPO-style estimator is the noisier one

    # every stage is cached now: a second run only reads and reports
    again = run_demo(tmp_path / "out2", quick=True, cache=cache)
    assert {n: m["rewards"] for n, m in again["models"].items()} == {n: m["rewards"] for n, m in models.items()}


# -- the budget the baselines get ----------------------------------------------------------------------------------
def test_units_per_round_counts_the_trainers_transformer_passes(tiny_config, tmp_path):
    """units_per_round (the OPD budget every baseline gets) against the sample-passes a real round makes, counted by
    forward hooks: a student forward with grad is 1 + 2 for its backward, a teacher forward 1. configs/tiny.yaml has
    CFG on the student and on two of its three teachers, so the doubling is checked too."""
    import torch

    from opd_fast.demo.stages import units_per_round
    from opd_fast.trainer import Trainer

    cfg = tiny_config()
    trainer = Trainer.build(cfg, tmp_path / "run", device="cpu")
    counted = [0]

    def hook(weight):
        def count(module, args, kwargs, output):
            x = kwargs.get("hidden_states", args[0] if args else None)
            counted[0] += weight(torch.is_grad_enabled()) * x.shape[0]

        return count

    trainer.student.register_forward_hook(hook(lambda grad: 3 if grad else 1), with_kwargs=True)
    for teacher in trainer.teachers.values():
        teacher.model.register_forward_hook(hook(lambda grad: 1), with_kwargs=True)
    trainer.train_round()
    assert counted[0] == units_per_round(cfg) > 0


def test_demo_is_an_opd_fast_subcommand():
    from opd_fast.cli import build_parser

    args = build_parser().parse_args(["demo", "--out", "somewhere", "--quick", "--workers", "1"])
    assert (args.out, args.quick, args.workers, args.force, args.only) == ("somewhere", True, 1, False, None)
    assert args.func.__module__ == "opd_fast.demo.cli"
    assert build_parser().parse_args(["demo", "--out", "x", "--only", "teacher/glyph"]).only == "teacher/glyph"


# -- the plan: registered stages, the roster, one stage and what it needs ------------------------------------------
def test_every_planned_stage_kind_is_registered_and_every_registered_kind_is_planned():
    from opd_fast.demo.run import PRESETS, plan
    from opd_fast.demo.stages import STAGES

    assert {s.kind for s in plan(PRESETS["full"])} == set(STAGES)
    for preset in PRESETS.values():
        stages = plan(preset)
        assert {s.kind for s in stages} <= set(STAGES)
        seen = set()
        for s in stages:  # dependency order: every input is planned before the stage that reads it
            assert set(s.deps) <= seen, s.name
            seen.add(s.name)


def test_roster_names_the_planned_models_and_real_prompts():
    from opd_fast.demo import roster
    from opd_fast.demo.run import PRESETS, plan

    names = {s.name for s in plan(PRESETS["full"])}
    assert set(roster.DESCRIPTIONS) == set(roster.EVALUATED) <= names
    assert {f"eval/{m}" for m in roster.EVALUATED} <= names
    assert set(roster.CURVES) <= set(roster.EVALUATED) and {roster.STUDENT, roster.JOINT} <= set(roster.CURVES)
    quick = {s.name for s in plan(PRESETS["quick"])}  # without the RL teachers, the cascade and the PPO sweep
    assert {m for m in roster.EVALUATED if f"eval/{m}" in quick} == {
        "base",
        *roster.TEACHERS.values(),
        roster.JOINT,
        "offpolicy",
        *(f"opd-{v}" for v in roster.OPD_VARIANTS),
    }
    for task, prompts in roster.SAMPLE_PROMPTS.items():
        assert set(prompts) <= {r["prompt"] for r in world.task_prompts(task)}, task


def test_only_runs_a_stage_and_everything_it_needs():
    from opd_fast.config import ConfigError
    from opd_fast.demo.run import PRESETS, needed_for, plan

    stages = plan(PRESETS["quick"])
    assert [s.name for s in needed_for(stages, "prompts")] == ["prompts"]
    assert [s.name for s in needed_for(stages, "eval/opd-sde")] == [
        "prompts",
        "base",
        "teacher/composition",
        "teacher/glyph",
        "teacher/aesthetic",
        "opd-sde",
        "eval/opd-sde",
    ]
    with pytest.raises(ConfigError, match="no stage 'teacher/ocr'.*teacher/glyph"):
        needed_for(stages, "teacher/ocr")


def test_the_demo_modules_import_one_another_without_a_cycle():
    """Every import between opd_fast.demo's modules, at the top or inside a function: the graph has no cycle."""
    import ast
    import graphlib
    from pathlib import Path

    import opd_fast.demo

    folder = Path(opd_fast.demo.__file__).parent
    graph = {}
    for path in folder.glob("*.py"):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "opd_fast.demo":
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("opd_fast.demo."):
                imported.add(node.module.removeprefix("opd_fast.demo."))
            elif isinstance(node, ast.Import):
                imported |= {
                    a.name.removeprefix("opd_fast.demo.") for a in node.names if a.name.startswith("opd_fast.demo.")
                }
        graph[path.stem] = imported
    assert graph["report"] >= {"roster"} and "run" not in graph["report"]
    tuple(graphlib.TopologicalSorter(graph).static_order())  # raises CycleError on a cycle


def test_the_full_plan_has_the_rl_teachers_the_cascade_and_the_ppo_sweep():
    """Each RL teacher set feeds one student run (the student's, teachers swapped); the cascade chains its tasks from
    the base on the student's budget in all; the PPO sweep is opd-ppo-sde at lower learning rates, nothing else
    changed."""
    from opd_fast.demo import roster
    from opd_fast.demo.run import PRESETS, plan

    stages = {s.name: s for s in plan(PRESETS["full"])}
    student = stages[roster.STUDENT]
    for name, method in roster.OPD_FROM_RL.items():
        teachers = roster.RL_TEACHERS[method]
        assert set(teachers.values()) <= set(stages[name].deps)
        assert {k: v for k, v in stages[name].params.items() if k != "teachers"} == student.params
        assert all(
            stages[t].kind == "teach" and stages[t].params["settings"]["method"] == method for t in teachers.values()
        )
    chain = [stages[n] for n in roster.CASCADE.values()]
    assert [s.params["task"] for s in chain] == list(world.TASKS)
    assert [s.params["init"] for s in chain] == [None, *[s.name for s in chain[:-1]]]
    assert all(s.params["settings"]["method"] == roster.CASCADE_METHOD for s in chain)
    assert all(s.params["init"] is None or s.params["init"] in s.deps for s in chain)
    assert sum(s.params["budget"] for s in chain) == stages["joint"].params["budget"]  # the student's budget
    ppo = stages[roster.PPO]
    for name, lr in roster.PPO_SWEEP.items():
        run = stages[name]
        assert run.params == {
            **ppo.params,
            "overrides": ppo.params["overrides"] + ([f"optimizer.lr={lr}"] if lr else []),
        }


def test_the_report_shows_the_best_ppo_run_of_the_sweep():
    from opd_fast.demo import report, roster

    def model(average):
        return {"rewards": dict.fromkeys(world.TASKS, average), "average": average, "seconds": 1.0}

    models = {"base": model(0.2), **{n: model(a) for n, a in zip(roster.PPO_SWEEP, (0.02, 0.41, 0.35))}}
    models[roster.STUDENT] = model(0.6)
    best = list(roster.PPO_SWEEP)[1]
    assert report.best_ppo(models) == best
    rows, descriptions = report.table_models(models)
    assert list(rows) == ["base", best, roster.STUDENT]
    assert descriptions[best].endswith("the best of 3 learning rates on the same budget")
    assert "best |" in report.ppo_section(models).split(best)[1].splitlines()[0]
    # one learning rate (the quick preset): the row is that run, no sweep section
    alone = {"base": model(0.2), roster.PPO: model(0.02)}
    assert list(report.table_models(alone)[0]) == ["base", roster.PPO] and report.ppo_section(alone) == ""


@pytest.fixture(scope="module")
def tiny_demo_inputs(tmp_path_factory):
    """The inputs a demo stage reads, tiny: a 2-block demo-world base (seeded, untrained) and the prompt files."""
    import torch

    from opd_fast.demo import flow
    from opd_fast.demo.run import run_stage

    root = tmp_path_factory.mktemp("tiny_demo")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        flow.FAMILY.transformer_class(**dict(flow.ARCH, num_layers=2)).save_pretrained(root / "base" / "base")
    run_stage("prompts", {}, str(root / "prompts"), {}, {})
    return root


def test_the_cascade_starts_each_task_from_the_last_tasks_lora(tiny_demo_inputs, tmp_path):
    """A chained `teach` stage loads its input's LoRA into the student and its EMA before its first round, trains
    on from there, and counts the chain's units and tasks. The second run's lr is tiny, so its LoRA must end where
    the first's did; a fresh LoRA (B = 0) would end near zero. Aesthetic first: on an untrained base its rewards
    still differ within a group (composition's tie at 0: zero advantages, no step)."""
    from pathlib import Path

    import torch

    from opd_fast.demo import stages
    from opd_fast.demo.run import run_stage
    from opd_fast.stage1.trainer import TeachTrainer
    from opd_fast.teachers import read_diffusers_lora

    common = {"seed": 0, "max_tokens": 8, "num_steps": 4, "shift": 1.0}
    settings = {"method": "nft", "prompts_per_round": 2, "group_size": 2, "nft_timesteps": 1, "lr": 1e-2}
    inputs = {"prompts": str(tiny_demo_inputs / "prompts"), "base": str(tiny_demo_inputs / "base")}
    first_params = {**common, "task": "aesthetic", "settings": settings, "budget": 1, "init": None}
    first = run_stage("teach", first_params, str(tmp_path / "a"), inputs, {})
    lora_file = tmp_path / "a" / first["lora"] / stages.LORA_FILE
    lora = read_diffusers_lora(lora_file, "test")
    B_first = torch.cat([B.flatten() for _, B in lora.pairs.values()])
    assert B_first.abs().max() > 1e-3  # the first run moved its LoRA off B = 0

    # the load itself, on a fresh trainer: every factor, and the EMA
    settings_b = {**settings, "lr": 1e-7}
    params = {**common, "task": "glyph", "settings": settings_b, "budget": 1, "init": "cascade/aesthetic"}
    ctx = stages.StageContext(params, tmp_path / "probe", {k: Path(v) for k, v in inputs.items()}, {})
    cfg = stages.teach_config(ctx, "glyph", stages.TeachSettings(**settings_b), 1)
    trainer = TeachTrainer.build(cfg, tmp_path / "probe" / "run", device="cpu")
    stages.start_from_lora(trainer, lora_file)
    modules = dict(trainer.student.named_modules())
    for name, (A, B) in lora.pairs.items():
        assert torch.equal(modules[name].lora_A["default"].weight, A)
        assert torch.equal(modules[name].lora_B["default"].weight, B)
    assert all(torch.equal(s, p) for s, p in zip(trainer.ema.shadow, trainer.engine.params))
    trainer.close()

    # the chained stage
    inputs_b = {**inputs, "cascade/aesthetic": str(tmp_path / "a")}
    second = run_stage("teach", params, str(tmp_path / "b"), inputs_b, {"cascade/aesthetic": first})
    assert second["chain"] == ["aesthetic", "glyph"]
    assert second["units"] == first["units"] + second["own_units"] and second["own_units"] > 0
    after = read_diffusers_lora(tmp_path / "b" / second["lora"] / stages.LORA_FILE, "test")
    B_after = torch.cat([B.flatten() for _, B in after.pairs.values()])
    torch.testing.assert_close(B_after, B_first, atol=1e-5, rtol=0)
