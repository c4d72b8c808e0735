"""The trainer on the tiny model: schedules agree, micro-batching agrees, resume is exact, the export loads into a
diffusers pipeline, the teacher is skipped at untrained steps, the loss falls."""

import json

import pytest
import torch
from conftest import capture_round_gradient, every_family, sd3_pipeline_output, tiny_sd3_inputs, video_overrides

from opd_fast.checkpoint import list_checkpoints
from opd_fast.config import ConfigError, EMAConfig
from opd_fast.engine import EMA, backwards_per_round
from opd_fast.trainer import Trainer


def round_gradient(cfg, out) -> dict[str, torch.Tensor]:
    """The accumulated gradient of round 0 (captured instead of the optimizer step)."""
    return capture_round_gradient(Trainer.build(cfg, out, device="cpu"))


def assert_grads_close(a, b, ratio):
    """Relative RMS error per tensor, rms(a - b) / rms(a) < ratio (fla's criterion: robust to tiny elements)."""
    assert a.keys() == b.keys() and a
    for name in a:
        scale = a[name].pow(2).mean().sqrt()
        err = (a[name] - b[name]).pow(2).mean().sqrt()
        assert err <= ratio * scale + 1e-12, (name, err.item(), scale.item())
    assert any(g.abs().max() > 0 for g in a.values())


@pytest.mark.parametrize("noise_level", [0.0, 0.7])
def test_one_pass_and_two_pass_give_the_same_gradient(tiny_config, tmp_path, noise_level):
    # Same forward at the same states with the same weights: equal up to float32 summation order (rtol 1e-5).
    one = round_gradient(tiny_config(**{"sampling.noise_level": noise_level}), tmp_path / "one")
    two = round_gradient(
        tiny_config(**{"sampling.noise_level": noise_level, "train.schedule": "two_pass"}), tmp_path / "two"
    )
    assert_grads_close(one, two, ratio=1e-5)


def test_micro_batching_and_gradient_checkpointing_keep_the_gradient(tiny_config, tmp_path):
    # noise is seeded per global sample, so 2 micro-batches of 2 see the same trajectories as 1 micro-batch of 4
    whole = round_gradient(tiny_config(**{"train.micro_batch_size": 4}), tmp_path / "whole")
    split = round_gradient(
        tiny_config(
            **{"train.micro_batch_size": 2, "train.micro_batches_per_task": 2, "model.gradient_checkpointing": True}
        ),
        tmp_path / "split",
    )
    assert_grads_close(whole, split, ratio=1e-5)


@pytest.mark.parametrize("schedule", ["one_pass", "two_pass"])
def test_teacher_runs_only_at_trained_steps(tiny_config, tmp_path, schedule):
    # int(5 * 0.6) = 3 trained steps; the first task sets its own fraction: int(5 * 0.2) = 1
    cfg = tiny_config(
        **{
            "sampling.num_steps": 5,
            "sampling.timestep_fraction": 0.6,
            "tasks.0.timestep_fraction": 0.2,
            "train.schedule": schedule,
        }
    )
    trainer = Trainer.build(cfg, tmp_path / "run", device="cpu")
    calls = {}
    for name, teacher in trainer.teachers.items():
        teacher.model.register_forward_hook(lambda *args, name=name: calls.setdefault(name, []).append(1))
    student_calls = []
    trainer.student.register_forward_hook(lambda *args: student_calls.append(1))
    backwards = []
    backward = trainer.engine.backward
    trainer.engine.backward = lambda loss: backwards.append(1) or backward(loss)
    trainer.train_round()
    names = [task.name for task in cfg.tasks]
    assert trainer.num_trained == {names[0]: 1, names[1]: 3, names[2]: 3}
    assert {name: len(c) for name, c in calls.items()} == trainer.num_trained  # one micro-batch per task
    assert len(backwards) == 7 == backwards_per_round(cfg)  # what DeepSpeed's accumulation boundary counts
    # one-pass: the rollout stops after the last trained step; two-pass rolls out the trained states first
    rollout = 0 if schedule == "one_pass" else sum(n - 1 for n in trainer.num_trained.values())
    assert len(student_calls) == 7 + rollout


def test_task_keys_are_validated(tiny_config):
    with pytest.raises(ConfigError, match=r"tasks\.1\.timestep_fraction: trains no step at all"):
        tiny_config(**{"tasks.1.timestep_fraction": 0.05})
    with pytest.raises(ConfigError, match=r"tasks\.2\.timestep_fraction: must be in \(0, 1\]"):
        tiny_config(**{"tasks.2.timestep_fraction": 1.5})
    with pytest.raises(ConfigError, match=r"tasks\.0\.loss_weight: must be > 0, got 0.0"):
        tiny_config(**{"tasks.0.loss_weight": 0})


def test_sd3_velocity_takes_the_pipelines_fp32_timesteps():
    """A bf16 SD3 transformer gets the timestep StableDiffusion3Pipeline gives it, scheduler.timesteps[i] in fp32,
    not a bf16-rounded one: the student trains at the timesteps it samples and is evaluated at."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from opd_fast.config import ModelConfig
    from opd_fast.families import get_family
    from opd_fast.models import Conditioning, load_transformer

    sd3 = get_family("sd3")
    model = load_transformer(ModelConfig(family="sd3", preset="tiny-sd3", dtype="bfloat16"), sd3)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    inputs = tiny_sd3_inputs()
    cond = Conditioning(
        inputs["encoder_hidden_states"],
        inputs["pooled_projections"],
        inputs["encoder_hidden_states"][:1],
        inputs["pooled_projections"][:1],
    )
    for i in (2, 5):  # sigmas whose timesteps bf16 would round (602.15 -> 604, 857.69 -> 856)
        t = scheduler.timesteps[i].expand(2)
        assert t.to(torch.bfloat16).float().ne(t).all()
        with torch.no_grad():
            ours, _ = sd3.velocity(model, inputs["hidden_states"], scheduler.sigmas[i].expand(2), cond, None)
            pipeline = model(
                hidden_states=inputs["hidden_states"].bfloat16(),
                encoder_hidden_states=inputs["encoder_hidden_states"].bfloat16(),
                pooled_projections=inputs["pooled_projections"].bfloat16(),
                timestep=t,
            ).sample
        torch.testing.assert_close(ours, pipeline, rtol=0, atol=0)


def test_ema_follows_the_official_schedule():
    """ema += (1 - d)(p - ema), d = min((1 + s) / (10 + s), decay), only when (s + 1) % update_every == 0; against a
    float64 reference, over bf16 parameters (the shadow is fp32)."""
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(7, generator=g).bfloat16(), torch.randn(3, 5, generator=g).bfloat16()]
    ema = EMA(params, EMAConfig(decay=0.9, update_every=3))
    ref = [p.double() for p in params]
    for s in range(14):
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g))
        ema.update(s)
        if (s + 1) % 3 == 0:
            d = min((1 + s) / (10 + s), 0.9)
            ref = [r + (1 - d) * (p.double() - r) for r, p in zip(ref, params)]
    for shadow, r in zip(ema.shadow, ref):
        assert shadow.dtype == torch.float32
        torch.testing.assert_close(shadow.double(), r, rtol=1e-6, atol=1e-6)
    last = [p.clone() for p in params]
    with ema.swapped_in():
        for p, r in zip(params, ref):
            torch.testing.assert_close(p, r.bfloat16())
    assert all(torch.equal(p, q) for p, q in zip(params, last))


def test_trainer_hands_ema_the_steps_taken(tiny_config, tmp_path):
    """Flow-GRPO calls ema.step(params, global_step) after incrementing global_step, so with update_every 2 the
    first update follows the first optimizer step, at s = 1 with d = min(2 / 11, decay)."""
    trainer = Trainer.build(tiny_config(**{"train.rounds": 1, "ema.update_every": 2}), tmp_path / "run", device="cpu")
    initial = [s.clone() for s in trainer.ema.shadow]
    trainer.fit()
    params = [p.detach().float() for p in trainer.engine.params]
    assert any(not torch.equal(p, s) for p, s in zip(params, initial))  # the step moved the weights
    for shadow, start, p in zip(trainer.ema.shadow, initial, params):
        torch.testing.assert_close(shadow, start + (1 - 2 / 11) * (p - start))


def test_resume_continues_exactly(tiny_config, tmp_path):
    cfg = tiny_config(**{"train.rounds": 4, "ema.update_every": 1})
    straight = Trainer.build(cfg, tmp_path / "straight", device="cpu")
    straight.fit()

    half = tiny_config(**{"train.rounds": 2, "ema.update_every": 1})
    Trainer.build(half, tmp_path / "resumed", device="cpu").fit()
    resumed = Trainer.build(cfg, tmp_path / "resumed", device="cpu", resume=True)
    assert resumed.round == 2
    resumed.fit()

    for (name, a), (_, b) in zip(straight.student.named_parameters(), resumed.student.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)  # CPU, same ops: bitwise
    for a, b in zip(straight.ema.shadow, resumed.ema.shadow):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert len(list_checkpoints(tmp_path / "resumed")) == cfg.checkpoint.keep_last


def test_loss_falls_and_metrics_are_written(tiny_config, tmp_path):
    cfg = tiny_config(
        **{"train.rounds": 12, "optimizer.lr": 0.01, "train.micro_batch_size": 4, "logging.tensorboard": True}
    )
    records = Trainer.build(cfg, tmp_path / "run", device="cpu").fit()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 13))
    assert {"loss", "loss/geneval", "loss/ocr", "loss/aesthetic", "grad_norm", "lr"} <= set(lines[0])
    first, last = sum(r["loss"] for r in records[:3]) / 3, sum(r["loss"] for r in records[-3:]) / 3
    assert last < 0.8 * first, (first, last)
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_diffusers_export_loads_into_sd3_pipeline(tiny_config, tmp_path):
    from opd_fast.config import ModelConfig
    from opd_fast.models import load_transformer

    cfg = tiny_config(**{"optimizer.lr": 0.01})
    trainer = Trainer.build(cfg, tmp_path / "run", device="cpu")
    trainer.fit()
    lora_file = tmp_path / "run" / "lora_diffusers" / "pytorch_lora_weights.safetensors"
    assert lora_file.is_file()

    base = load_transformer(ModelConfig(family="sd3", preset="tiny-sd3"), trainer.family)
    base.save_pretrained(tmp_path / "base")
    inputs = tiny_sd3_inputs()
    theirs = sd3_pipeline_output(tmp_path / "base", tmp_path / "run" / "lora_diffusers", inputs)
    with torch.no_grad():
        ours = trainer.student(**inputs).sample
        plain = base(**inputs).sample
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)
    assert (ours - plain).abs().max() > 1e-4  # the LoRA is not a no-op
    assert (tmp_path / "run" / "lora_diffusers_ema" / "pytorch_lora_weights.safetensors").is_file()


@every_family
def test_student_trains_from_a_local_folder(family, tmp_path):
    """Every family (FLUX: packed latents, guidance embedding; SD3: CFG batch): a base loaded from a local folder, a
    teacher in the family pipeline's LoRA layout."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    from opd_fast.config import ModelConfig, config_from_dict
    from opd_fast.models import load_transformer

    tiny = ModelConfig(family=family.name, preset=family.tiny_preset)
    base = load_transformer(tiny, family)
    base.save_pretrained(tmp_path / family.name / "transformer")
    targets = list(family.lora_targets)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="gaussian")
    teacher = get_peft_model(load_transformer(tiny, family), lora)
    with torch.no_grad():
        for n, p in teacher.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    state = {k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(teacher).items()}
    family.pipeline_class.save_lora_weights(
        tmp_path / "teacher", transformer_lora_layers=state, transformer_lora_adapter_metadata=lora.to_dict()
    )
    (tmp_path / "p.txt").write_text("a red cup\na blue car\n")
    cfg = config_from_dict(
        {
            "model": {"family": family.name, "path": str(tmp_path / family.name), "preset": None},
            "student": {"guidance": 3.5, "lora": {"rank": 4, "alpha": 8, "targets": targets}},
            "tasks": [
                {
                    "name": "t",
                    "prompts": str(tmp_path / "p.txt"),
                    "teacher": {"path": str(tmp_path / "teacher"), "guidance": 3.5},
                }
            ],
            "sampling": {"num_steps": 3, "resolution": 64, **video_overrides(family)},
            "train": {"rounds": 2, "micro_batch_size": 2},
            "logging": {"progress": False, "tensorboard": False},
        }
    )
    trainer = Trainer.build(cfg, tmp_path / "run", device="cpu")
    records = trainer.fit()
    assert len(records) == 2 and all(r["loss"] > 0 for r in records)
    assert (tmp_path / "run" / "lora_diffusers" / "pytorch_lora_weights.safetensors").is_file()


def test_full_parameter_student(tiny_config, tmp_path):
    cfg = tiny_config(**{"student.lora.enabled": False, "optimizer.lr": 1e-4})
    trainer = Trainer.build(cfg, tmp_path / "run", device="cpu")
    before = {n: p.detach().clone() for n, p in trainer.student.named_parameters()}
    trainer.fit()
    changed = [n for n, p in trainer.student.named_parameters() if not torch.equal(p, before[n])]
    assert "transformer_blocks.0.attn.to_q.weight" in changed
    assert (tmp_path / "run" / "transformer" / "config.json").is_file()


def test_cosine_schedule_sets_each_rounds_lr(tiny_trainer):
    trainer = tiny_trainer(
        **{
            "optimizer.schedule": "cosine",
            "train.rounds": 3,
            "sampling.num_steps": 2,
            "logging.tensorboard": False,
            "logging.progress": False,
        }
    )
    records = trainer.fit()
    lr = trainer.cfg.optimizer.lr
    # lr (1 + cos(pi r / 3)) / 2 for r = 0, 1, 2; the logged rate is the one the optimizer stepped with
    assert [r["lr"] for r in records] == pytest.approx([lr, 0.75 * lr, 0.25 * lr], rel=1e-12)
    assert trainer.engine.optimizer.param_groups[0]["lr"] == pytest.approx(0.25 * lr, rel=1e-12)


def test_loss_weight_scales_its_tasks_gradient(tiny_trainer):
    # tiny_trainer keeps the ocr task (tasks.1); the round gradient is linear in the task's loss weight. A power of
    # two scales every rounding of the backward exactly, so the two gradients agree bit for bit; any other factor
    # leaves fp32 differences that cancellation makes as large as 1e-4 of an entry, and a machine-dependent bound.
    grads = [
        capture_round_gradient(tiny_trainer(**{"tasks.1.loss_weight": w, "sampling.num_steps": 2})) for w in (1.0, 4.0)
    ]
    assert any(g.abs().sum() > 0 for g in grads[0].values())
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], 4.0 * g, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("schedule", ["one_pass", "two_pass"])
@pytest.mark.parametrize("noise_level", [0.0, 0.7])
def test_task_batching_gives_the_task_by_task_gradient(tiny_config, tmp_path, schedule, noise_level):
    """train.task_batching runs every task's micro-batch through one student forward and backward per step; the
    tasks train 1, 2 and 3 of 4 steps here (int(4 x fraction)), so the batch shrinks as tasks drop out, and two
    micro-batches per task make two such batches per round. Same terms summed in another order: rtol 1e-5, as the
    schedules' test."""
    overrides = {
        "sampling.noise_level": noise_level,
        "train.schedule": schedule,
        "sampling.timestep_fraction": 0.75,
        "tasks.0.timestep_fraction": 0.25,
        "tasks.1.timestep_fraction": 0.5,
        "tasks.2.loss_weight": 2.0,
        "train.micro_batches_per_task": 2,
    }
    by_task = Trainer.build(tiny_config(**overrides), tmp_path / "by_task", device="cpu")
    batched = Trainer.build(
        tiny_config(**overrides, **{"train.task_batching": True}), tmp_path / "batched", device="cpu"
    )
    assert list(by_task.num_trained.values()) == [1, 2, 3]
    forwards = []
    batched.student.register_forward_hook(
        lambda module, args, kwargs, out: forwards.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
    )
    backwards = []
    backward = batched.engine.backward
    batched.engine.backward = lambda loss: backwards.append(1) or backward(loss)
    losses = {}
    for name, trainer in (("by_task", by_task), ("batched", batched)):
        grads = capture_round_gradient(trainer)
        losses[name] = grads
    assert_grads_close(losses["by_task"], losses["batched"], ratio=1e-5)
    # per micro-batch: 3 steps trained by 3, 2, 1 tasks of 2 samples each, CFG doubling the batch; two-pass first
    # rolls out states 1 and 2 for the tasks that train them
    trained = [2 * 6, 2 * 4, 2 * 2]
    rollout = [2 * 4, 2 * 2] if schedule == "two_pass" else []
    assert forwards == (rollout + trained) * 2
    assert len(backwards) == 3 * 2 == backwards_per_round(batched.cfg)


def test_task_batching_logs_the_task_by_task_losses(tiny_config, tmp_path):
    overrides = {"train.rounds": 2, "tasks.0.timestep_fraction": 0.5}
    by_task = Trainer.build(tiny_config(**overrides), tmp_path / "by_task", device="cpu").fit()
    batched = Trainer.build(
        tiny_config(**overrides, **{"train.task_batching": True}), tmp_path / "batched", device="cpu"
    ).fit()
    for a, b in zip(by_task, batched):
        for key in ("loss", "loss/geneval", "loss/ocr", "loss/aesthetic"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key


def test_optimizer_flags_belong_to_the_machine_not_the_checkpoint():
    """AdamW runs fused on a GPU and torch's default on the CPU; a resume keeps this machine's choice, where torch's
    load_state_dict would take the checkpoint's (a CPU run's state switching a GPU resume off the fused kernel)."""
    from opd_fast.config import OptimizerConfig
    from opd_fast.engine import load_optimizer_state, make_optimizer

    params = [torch.nn.Parameter(torch.randn(3, 2))]
    cpu = make_optimizer(params, OptimizerConfig())
    assert not cpu.param_groups[0]["fused"]
    params[0].grad = torch.ones(3, 2)
    cpu.step()
    state = cpu.state_dict()
    state["param_groups"][0].update(fused=True, foreach=True)  # as a GPU run's checkpoint would say
    resumed = make_optimizer([torch.nn.Parameter(params[0].detach().clone())], OptimizerConfig())
    load_optimizer_state(resumed, state)
    assert resumed.param_groups[0]["fused"] == cpu.param_groups[0]["fused"]
    assert resumed.param_groups[0]["foreach"] == cpu.param_groups[0]["foreach"]
    torch.testing.assert_close(next(iter(resumed.state.values()))["exp_avg"], next(iter(cpu.state.values()))["exp_avg"])
    if torch.cuda.is_available():
        assert make_optimizer([torch.nn.Parameter(torch.randn(3, device="cuda"))], OptimizerConfig()).param_groups[0][
            "fused"
        ]


def test_ema_update_is_one_lerp_per_tensor_bit_for_bit():
    """The multi-tensor EMA update equals a lerp_ of each tensor (the update it replaced), bit for bit."""
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g).bfloat16()]
    ema = EMA(params, EMAConfig(decay=0.9, update_every=1))
    shadows = [s.clone() for s in ema.shadow]
    for p in params:
        p.add_(torch.randn(p.shape, generator=g).to(p.dtype))
    ema.update(4)
    for shadow, start, p in zip(ema.shadow, shadows, params):
        torch.testing.assert_close(shadow, start.lerp(p.float(), 1 - ema.decay(4)), rtol=0, atol=0)
