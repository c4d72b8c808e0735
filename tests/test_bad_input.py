"""Bad input gets a clear error naming the problem, and loses nothing."""

import json
import logging
import pickle

import pytest
import torch
from conftest import ROOT, set_args, tiny_overrides

from opd_fast import checkpoint as ckpt
from opd_fast.cli import main
from opd_fast.config import ConfigError, load_config
from opd_fast.prompts import PromptError, read_prompts
from opd_fast.run_folder import UNCLAIMED_OK, OutputDirError
from opd_fast.safeio import UnsafeFileError
from opd_fast.teachers import TeacherError
from opd_fast.trainer import Trainer, TrainingError

TINY = str(ROOT / "configs" / "tiny.yaml")


def unclaimed(out) -> bool:
    """A start that failed left nothing of a run in OUT: at most the folder's lock (and the prompt cache), which the
    next start takes over."""
    return not out.exists() or {p.name for p in out.iterdir()} <= UNCLAIMED_OK


def run_cli(*args, capsys):
    code = main(list(args))
    return code, capsys.readouterr().err


def test_missing_and_empty_prompt_files(tiny_config, tmp_path):
    with pytest.raises(PromptError, match=r"task 'ocr': prompt file not found: .*nope\.txt"):
        Trainer.build(tiny_config(**{"tasks.1.prompts": str(tmp_path / "nope.txt")}), tmp_path / "a", device="cpu")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(PromptError, match="prompt file is empty"):
        Trainer.build(tiny_config(**{"tasks.1.prompts": str(tmp_path / "empty.txt")}), tmp_path / "b", device="cpu")
    assert unclaimed(tmp_path / "a") and unclaimed(tmp_path / "b")


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a cat"}\n{"prompt": 3}\n')
    with pytest.raises(PromptError, match=r"p\.jsonl:2: expected an object with a string field 'prompt'"):
        read_prompts(path)
    path.write_text('{"prompt": "a cat"}\n{broken\n')
    with pytest.raises(PromptError, match=r"p\.jsonl:2: not valid JSON"):
        read_prompts(path)


def test_prompt_sets_are_checked_by_kind_before_training(tiny_config, tmp_path):
    (tmp_path / "ocr.txt").write_text('a sign that says "open"\na sign with no quoted text\n')
    with pytest.raises(PromptError, match=r"task 'ocr': .*ocr\.txt:2: an OCR prompt needs the text to render"):
        Trainer.build(tiny_config(**{"tasks.1.prompts": str(tmp_path / "ocr.txt")}), tmp_path / "a", device="cpu")
    assert unclaimed(tmp_path / "a")
    # DrawBench as Google's sheet exports it: read by its "Prompts" column, not as lines of CSV
    (tmp_path / "drawbench.csv").write_text('Prompts,Category\nA red colored car.,Colors\n"A sign, ""hi""",Text\n')
    trainer = Trainer.build(
        tiny_config(**{"tasks.2.prompts": str(tmp_path / "drawbench.csv")}), tmp_path / "b", device="cpu"
    )
    assert trainer.prompts["aesthetic"].prompts.prompts == ["A red colored car.", 'A sign, "hi"']


def test_teacher_path_that_does_not_exist(tiny_config, tmp_path, capsys):
    with pytest.raises(TeacherError, match=r"teacher of task 'aesthetic': path does not exist: .*missing"):
        Trainer.build(tiny_config(**{"tasks.2.teacher.path": str(tmp_path / "missing")}), tmp_path / "a", device="cpu")
    code, err = run_cli(
        "train", TINY, "--out", str(tmp_path / "b"), "--set", f"tasks.2.teacher.path={tmp_path}/x", capsys=capsys
    )
    assert code == 2 and "teacher of task 'aesthetic': path does not exist" in err


def test_teacher_for_another_base_is_refused(tiny_config, tmp_path):
    from peft import LoraConfig, get_peft_model

    from opd_fast.config import ModelConfig
    from opd_fast.families import get_family
    from opd_fast.models import load_transformer

    flux = get_peft_model(
        load_transformer(ModelConfig(family="flux", preset="tiny-flux"), get_family("flux")),
        LoraConfig(r=2, target_modules=["attn.to_q"]),
    )
    flux.save_pretrained(tmp_path / "flux_lora")
    with pytest.raises(TeacherError, match=r"teacher of task 'ocr': LoRA targets 'single_transformer_blocks"):
        Trainer.build(
            tiny_config(**{"tasks.1.teacher.path": str(tmp_path / "flux_lora")}), tmp_path / "a", device="cpu"
        )
    # a full model folder on another latent space (another size alone is a teacher: tests/test_families.py)
    other = load_transformer(ModelConfig(family="sd3", preset="tiny-sd3"), get_family("sd3"))
    other.register_to_config(in_channels=8)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(
        TeacherError,
        match=r"teacher of task 'ocr': it does not share the student's latent space: in_channels: student 4 "
        r"vs teacher 8",
    ):
        Trainer.build(tiny_config(**{"tasks.1.teacher.path": str(tmp_path / "other")}), tmp_path / "b", device="cpu")


def test_wrong_config_types_and_unknown_keys(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"train\.rounds: expected an integer, got str 'ten'"):
        load_config(TINY, ["train.rounds=ten"])
    with pytest.raises(ConfigError, match=r"unknown config key sampling\.num_step\b"):
        load_config(TINY, ["sampling.num_step=4"])
    with pytest.raises(ConfigError, match=r"loss\.kl_normalization: must be one of \['exact', 'official'\]"):
        load_config(TINY, ["loss.kl_normalization=exakt"])
    with pytest.raises(ConfigError, match=r"student\.lora\.rank: must be > 0"):
        load_config(TINY, ["student.lora.rank=0"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  family: sd3\n  dtype: 16\n")
    code, err = run_cli("train", str(bad), "--out", str(tmp_path / "o"), capsys=capsys)
    assert code == 2 and "model.dtype: must be one of" in err
    assert not (tmp_path / "o").exists()


def test_unknown_model_family_is_refused_before_anything_runs(tmp_path, capsys):
    from opd_fast.families import FAMILIES

    code, err = run_cli("train", TINY, "--out", str(tmp_path / "o"), "--set", "model.family=sdxl", capsys=capsys)
    assert code == 2 and f"model.family: unknown family 'sdxl' (known: {', '.join(FAMILIES)})" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "override, error",
    [
        ("optimizer.max_grad_norm=-1", "optimizer.max_grad_norm: must be > 0, got -1.0"),  # torch would ascend
        (
            "optimizer.max_grad_norm=0",
            "optimizer.max_grad_norm: must be > 0",
        ),  # zero grads in torch, no clip in DeepSpeed
        ("student.lora.alpha=0", "student.lora.alpha: must be > 0"),  # the LoRA would never train
        ("prompts.max_tokens=0", "prompts.max_tokens: must be > 0"),  # no text conditioning
        ("sampling.shift=0", "sampling.shift: must be > 0"),  # all-NaN sigmas
        ("optimizer.lr=.nan", "optimizer.lr: must be a finite number, got nan"),
        ("tasks.1.loss_weight=.inf", r"tasks\.1\.loss_weight: must be a finite number, got inf"),
        ("sampling.noise_level=.nan", "sampling.noise_level: must be a finite number >= 0, got nan"),
        ("optimizer.weight_decay=-0.1", "optimizer.weight_decay: must be a finite number >= 0"),
        ("optimizer.betas=[1.5,0.9]", r"optimizer\.betas\.0: must be in \[0, 1\), got 1.5"),
        ("ema.decay=-0.5", r"ema\.decay: must be in \[0, 1\]"),
    ],
)
def test_values_that_would_train_wrongly_are_refused_by_name(override, error):
    with pytest.raises(ConfigError, match=error):
        load_config(TINY, [override])


def test_a_full_bf16_student_needs_fp32_master_weights():
    full_bf16 = ["student.lora.enabled=false", "model.dtype=bfloat16"]
    for engine in (["engine.kind=single"], ["engine.kind=ddp"], ["engine.kind=deepspeed", "engine.zero_stage=3"]):
        with pytest.raises(ConfigError, match=r"student\.lora\.enabled: false .* model\.dtype: bfloat16 would update"):
            load_config(TINY, full_bf16 + engine)
    load_config(TINY, full_bf16 + ["engine.kind=deepspeed", "engine.bf16=true"])  # DeepSpeed's fp32 master weights
    load_config(TINY, ["model.dtype=bfloat16"])  # a LoRA student keeps its LoRA weights in fp32


def test_output_folder_holding_another_run(tiny_config, tmp_path, capsys):
    out = tmp_path / "run"
    Trainer.build(tiny_config(**{"train.rounds": 1}), out, device="cpu").fit()
    with pytest.raises(OutputDirError, match="already holds a run .*pass --resume"):
        Trainer.build(tiny_config(**{"train.rounds": 1}), out, device="cpu")
    with pytest.raises(OutputDirError, match=r"another config; differing keys: sampling\.noise_level"):
        Trainer.build(tiny_config(**{"train.rounds": 1, "sampling.noise_level": 0.5}), out, device="cpu", resume=True)
    Trainer.build(tiny_config(**{"train.rounds": 3}), out, device="cpu", resume=True)  # constant lr: rounds may change
    cosine = tmp_path / "cosine"
    Trainer.build(tiny_config(**{"train.rounds": 2, "optimizer.schedule": "cosine"}), cosine, device="cpu").fit(until=1)
    with pytest.raises(OutputDirError, match=r"train\.rounds \(2 -> 4\); with optimizer\.schedule cosine"):
        Trainer.build(
            tiny_config(**{"train.rounds": 4, "optimizer.schedule": "cosine"}), cosine, device="cpu", resume=True
        )
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    code, err = run_cli("train", TINY, "--out", str(other), *set_args(tiny_overrides()), capsys=capsys)
    assert code == 2 and "is not empty and holds no run.json" in err
    assert (other / "notes.txt").read_text() == "mine"


def test_nonfinite_loss_skips_then_stops(tiny_config, tmp_path):
    cfg = tiny_config(**{"train.rounds": 6, "train.max_nonfinite_rounds": 2})
    trainer = Trainer.build(cfg, tmp_path / "run", device="cpu")
    poisoned = {"on": False}
    teacher = trainer.teachers["ocr"].model
    teacher.register_forward_hook(lambda m, i, out: (out[0] * float("nan"),) if poisoned["on"] else out)

    trainer.cfg.train.rounds = 1
    trainer.fit()  # round 1 is good and checkpointed
    good = {n: p.detach().clone() for n, p in trainer.student.named_parameters() if p.requires_grad}
    poisoned["on"] = True
    trainer.cfg.train.rounds = 6
    with pytest.raises(TrainingError, match=r"3 rounds had a non-finite loss .*train\.max_nonfinite_rounds=2"):
        trainer.fit()
    for n, p in trainer.student.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, good[n]), "a skipped round changed the weights"
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records] == [False, True, True, True]
    assert [r["nonfinite_rounds"] for r in records] == [0, 1, 2, 3]
    # round 1's checkpoint holds the weights the non-finite rounds were computed at: set aside, no temp folder left
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["nonfinite_step_00000001"]


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="needs a machine without CUDA, where loss.backend cuda cannot run"
)
def test_a_start_that_fails_names_the_key_and_leaves_the_folder_usable(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_cli(
        "train", TINY, "--out", str(out), *set_args(tiny_overrides(**{"loss.backend": "cuda"})), capsys=capsys
    )
    assert code == 2 and "loss.backend: opd_step backend 'cuda' is not available on cpu" in err
    assert unclaimed(out)  # refused before anything of a run was written
    # a start that failed after caching the prompts leaves OUT/embeddings and no run.json: the retry may go on
    (out / "embeddings").mkdir(parents=True)
    code, err = run_cli(
        "train", TINY, "--out", str(out), *set_args(tiny_overrides(**{"train.rounds": 1})), capsys=capsys
    )
    assert code == 0, err
    assert (out / "run.json").is_file()


def test_checkpoint_write_killed_midway_leaves_the_last_one_intact(tiny_config, tmp_path, monkeypatch):
    out = tmp_path / "run"
    trainer = Trainer.build(tiny_config(**{"train.rounds": 1}), out, device="cpu")
    trainer.fit()
    before = ckpt.latest_checkpoint(out)
    calls = {"n": 0}
    real_save = ckpt.save_file

    def dying_save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed while writing")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", dying_save)
    trainer.round = 2
    with pytest.raises(KeyboardInterrupt):
        trainer.save()
    assert ckpt.latest_checkpoint(out) == before
    monkeypatch.undo()
    with open(out / "metrics.jsonl", "a") as f:  # the killed run's record of round 2, and a line cut by the kill
        f.write(json.dumps({"step": 2, "loss": -1.0}) + '\n{"step": 3, "lo')
    resumed = Trainer.build(tiny_config(**{"train.rounds": 2}), out, device="cpu", resume=True)
    assert resumed.round == 1
    resumed.fit()
    assert ckpt.latest_checkpoint(out).name == "step_00000002"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and records[1]["loss"] > 0  # round 2 once: the resumed run's
    assert not [p for p in (out / "checkpoints").iterdir() if not p.name.startswith("step_")]


def test_resumed_metrics_log_drops_only_later_steps_and_a_torn_last_line(tmp_path, caplog):
    from opd_fast.metrics import MetricsWriter

    lines = [
        json.dumps({"step": 1, "loss": 1.0}),
        "edited by hand",
        json.dumps({"step": 2, "loss": 2.0}),
        json.dumps({"step": 3, "loss": 3.0}),
        '{"step": 4, "lo',
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    with caplog.at_level(logging.WARNING, logger="opd_fast.metrics"):
        MetricsWriter(tmp_path, tensorboard=False, resume_step=2).close()
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == lines[:3]  # step 3 (after the checkpoint) goes
    assert "metrics.jsonl:2 is not a metrics record" in caplog.text


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_teacher_is_refused_and_runs_no_code(tiny_config, tmp_path):
    marker = tmp_path / "pwned"
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    with open(teacher / "pytorch_lora_weights.bin", "wb") as f:
        pickle.dump({"transformer.x.lora_A.weight": _Evil(str(marker))}, f)
    with pytest.raises(UnsafeFileError, match=r"refusing to load .*pytorch_lora_weights\.bin.*nothing in it was run"):
        Trainer.build(tiny_config(**{"tasks.0.teacher.path": str(teacher)}), tmp_path / "run", device="cpu")
    assert not marker.exists()

    # the same payload inside a torch.save'd peft adapter
    peft_dir = tmp_path / "peft"
    peft_dir.mkdir()
    (peft_dir / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 2}))
    torch.save({"w": _Evil(str(marker))}, peft_dir / "adapter_model.bin")
    with pytest.raises(UnsafeFileError, match="refusing to load"):
        Trainer.build(tiny_config(**{"tasks.0.teacher.path": str(peft_dir)}), tmp_path / "run2", device="cpu")
    assert not marker.exists()


def test_checkpoints_hold_no_pickles(tiny_config, tmp_path):
    Trainer.build(tiny_config(**{"train.rounds": 1}), tmp_path / "run", device="cpu").fit()
    files = [p.name for p in ckpt.latest_checkpoint(tmp_path / "run").iterdir()]
    assert sorted(files) == [
        "ema.safetensors",
        "manifest.json",
        "optimizer.safetensors",
        "state.json",
        "student.safetensors",
    ]
