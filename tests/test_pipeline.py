"""`opd-fast pipeline` (configs/pipeline_tiny.yaml on a demo-world model): stage 1 trains the teacher that does not
exist and leaves the one that does, stage 2 reads the trained one from OUT/teachers/<task>/; every stage resumes on
its own (stage 1 only, then a stage-1 run cut short, then stage 2 killed by SIGKILL mid-run: each --resume goes on
from where the stage stopped and skips what finished); the config's teach sections are checked on load."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from opd_fast.config import ConfigError
from opd_fast.demo import flow, world

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "pipeline_tiny.yaml"
TASKS = ("glyph", "aesthetic")


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    """The layout pipeline_tiny.yaml names: a seeded 2-block demo-world base, each task's prompts, and glyph's
    teacher (a seeded LoRA on the base, exported as stage 1 and the demo export theirs)."""
    from opd_fast.checkpoint import export_diffusers_lora
    from opd_fast.config import LoraConfig
    from opd_fast.demo.stages import load_base
    from opd_fast.models import add_student_lora

    cache = tmp_path_factory.mktemp("demo-cache")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        flow.FAMILY.transformer_class(**dict(flow.ARCH, num_layers=2)).save_pretrained(cache / "base")
        teacher = load_base(cache / "base")
        peft_config = add_student_lora(teacher, LoraConfig(rank=4, alpha=8))
    export_diffusers_lora(teacher, peft_config, flow.FAMILY, cache / "teachers" / "glyph")
    (cache / "prompts").mkdir()
    for task in TASKS:
        rows = world.task_prompts(task)[:4]
        (cache / "prompts" / f"{task}.txt").write_text("".join(row["prompt"] + "\n" for row in rows))
    return cache


def _paths(cache: Path) -> list[str]:
    return [
        f"model.path={cache / 'base'}",
        f"tasks.0.prompts={cache / 'prompts' / 'glyph.txt'}",
        f"tasks.0.teacher.path={cache / 'teachers' / 'glyph'}",
        f"tasks.1.prompts={cache / 'prompts' / 'aesthetic.txt'}",
    ]


def _args(cache: Path, out: Path, *extra: str) -> list[str]:
    args = ["pipeline", str(CONFIG), "--out", str(out)]
    for assignment in _paths(cache):
        args += ["--set", assignment]
    return args + list(extra)


def _steps(folder: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_pipeline_trains_the_missing_teacher_then_distils_and_resumes_at_every_stage(tmp_path, demo_cache, capsys):
    from opd_fast.cli import main

    out = tmp_path / "out"
    teacher_dir, opd_dir = out / "teachers" / "aesthetic", out / "opd"
    # 1. stage 1 alone, one round of its two: the existing glyph teacher is not trained
    assert main(_args(demo_cache, out, "--until", "teachers", "--set", "tasks.1.teach.train.rounds=1")) == 0
    assert "teachers ready" in capsys.readouterr().out
    assert not (out / "teachers" / "glyph").exists() and not opd_dir.exists()
    assert _steps(teacher_dir) == [1]
    record = json.loads((teacher_dir / "metrics.jsonl").read_text())  # stage 1's statistics in the run's record
    assert {"loss", "grad_norm", "reward", "reward_std", "ratio_mean", "clipped"} <= record.keys()

    # 2. the whole pipeline, resumed, killed (SIGKILL) after stage 2's second round: stage 1 goes on from round 1
    env = {**os.environ, "OPD_FAST_FAULT": "kill:round.done:3", "PYTHONPATH": str(ROOT)}
    killed = subprocess.run(
        [sys.executable, "-m", "opd_fast.cli", *_args(demo_cache, out, "--resume")],
        env=env,
        cwd=tmp_path,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert _steps(teacher_dir) == [1, 2]  # round 2 of 2 (the kill's first round.done)
    assert (teacher_dir / "lora_diffusers_ema" / "pytorch_lora_weights.safetensors").is_file()
    assert (opd_dir / "checkpoints" / "step_00000001").is_dir() and not (opd_dir / "lora_diffusers").exists()

    # 3. resumed again: stage 1 is skipped, stage 2 goes on from its round-1 checkpoint and exports the student
    capsys.readouterr()
    assert main(_args(demo_cache, out, "--resume")) == 0
    printed = capsys.readouterr().out
    assert f"{teacher_dir}: skipped" in printed and f"{opd_dir}: trained" in printed
    assert (opd_dir / "lora_diffusers_ema" / "pytorch_lora_weights.safetensors").is_file()
    assert _steps(opd_dir) == [1, 2, 3]  # each round once: the killed run's round 2 was dropped and run again
    run = json.loads((opd_dir / "run.json").read_text())["config"]
    glyph, aesthetic = run["tasks"]
    assert glyph["teacher"]["path"] == str(demo_cache / "teachers" / "glyph")
    assert {k: v for k, v in aesthetic["teacher"].items() if v is not None} == {
        "path": str(teacher_dir / "lora_diffusers_ema" / "pytorch_lora_weights.safetensors"),
        "format": "diffusers",
    }

    # 4. everything done: a rerun loads nothing; without --resume, the folder's run is refused
    capsys.readouterr()
    assert main(_args(demo_cache, out, "--resume")) == 0
    assert f"{opd_dir}: skipped" in capsys.readouterr().out
    assert main(_args(demo_cache, out)) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_an_existing_teacher_path_skips_stage_1(tmp_path, demo_cache):
    from opd_fast.stage1.pipeline import load_pipeline

    existing = demo_cache / "teachers" / "glyph" / "pytorch_lora_weights.safetensors"
    pipeline = load_pipeline(CONFIG, tmp_path / "out", _paths(demo_cache) + [f"tasks.1.teacher.path={existing}"])
    assert pipeline.teachers == {}
    assert pipeline.opd.tasks[1].teacher.path == str(existing)


@pytest.mark.parametrize(
    "change, message",
    [
        ("tasks.1.teach.grpoo={}", r"unknown config key tasks.1.teach.grpoo"),
        ("tasks.1.teach.model={}", r"unknown config key tasks.1.teach.model .*model, prompts, engine are the run's"),
        ("tasks.1.teach.grpo.clip_range=-1", r"tasks.1.teach: grpo.clip_range: must be a finite number > 0"),
        ("tasks.1.teach.sampling.noise_level=0.0", r"tasks.1.teach: sampling.noise_level: Flow-GRPO needs SDE"),
        ("tasks.1.teach.reward=null", r"tasks.1.teach: task.reward"),
        ("tasks.0.teacher.path=null", r"tasks.0.teacher.path: required key is missing \(or a teach: section"),
        ("tasks.1.timestep_fraction=abc", r"tasks.1.timestep_fraction"),  # stage 2's own checks, as train's
    ],
)
def test_config_errors_name_the_key(tmp_path, demo_cache, change, message):
    from opd_fast.stage1.pipeline import load_pipeline

    with pytest.raises(ConfigError, match=message):
        load_pipeline(CONFIG, tmp_path / "out", _paths(demo_cache) + [change])


def test_pipeline_on_two_ranks(tmp_path, demo_cache):
    """Both stages on 2 DDP ranks (gloo): rank 0 alone writes stage 1's export, which stage 2 loads on every rank, so
    no rank may start stage 2 before it is written; both ranks finish, and the student is exported once."""
    from dist_launch import logs, start, wait

    out = tmp_path / "out"
    args = ["-m", "opd_fast.cli", *_args(demo_cache, out, "--set", "engine.kind=ddp")]
    codes = wait(start(args, 2, tmp_path / "logs"), timeout=300)
    assert codes == [0, 0], logs(tmp_path / "logs")
    teacher_dir, opd_dir = out / "teachers" / "aesthetic", out / "opd"
    assert _steps(teacher_dir) == [1, 2] and _steps(opd_dir) == [1, 2, 3]
    assert (opd_dir / "lora_diffusers_ema" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "logs" / "rank0.out").read_text().count("student: ") == 1
    assert "student: " not in (tmp_path / "logs" / "rank1.out").read_text()
