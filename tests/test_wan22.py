"""Wan 2.2 two-expert pipelines (issue 26 item 1) on a tiny WanPipeline with `transformer` (high noise) and
`transformer_2` (low noise) built from config: each sample's velocity comes from the expert WanPipeline would use at
its timestep (t >= boundary_ratio * num_train_timesteps: transformer), the student (a LoRA on both experts, or all
weights) trains against two-expert teachers, its LoRA export loads into both experts through
WanPipeline.load_lora_weights (load_into_transformer_2=True for the second) with alpha intact, and it samples
through the pipeline."""

from __future__ import annotations

import copy
import json
import math
import shutil

import pytest
import torch
from conftest import capture_round_gradient, run_family
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict
from tiny_pipeline import one_thread, write_tiny_wan22_pipeline  # noqa: F401  (one_thread: autouse)

from opd_fast.config import ConfigError, ModelConfig, TeacherConfig, config_from_dict
from opd_fast.families import get_family
from opd_fast.families.wan import WanExperts
from opd_fast.models import load_transformer
from opd_fast.teachers import load_teacher
from opd_fast.trainer import Trainer

WAN = run_family(get_family("wan"))
PROMPTS = ["a red cat", "the blue dog", 'a sign that says "hi"', "a photo of the cat"]
BOUNDARY = 0.875  # Wan2.2-T2V-A14B's: timestep 875 of 1000


@pytest.fixture(scope="module")
def wan22(tmp_path_factory):
    return write_tiny_wan22_pipeline(tmp_path_factory.mktemp("wan22") / "pipe", BOUNDARY)


def inputs(batch: int, generator):
    x = torch.randn(batch, 4, 2, 4, 4, generator=generator)
    text = torch.randn(batch, 5, 32, generator=generator)
    return x, text


def test_each_sample_gets_the_expert_the_pipeline_uses(wan22):
    """Per sample, at and around the boundary: t >= 875 is the high-noise expert's, t < 875 the low-noise one's,
    in one mixed batch as alone; the family's velocity (sigma -> the pipeline's int64 timestep) routes the same way;
    and over a real WanPipeline call, every step's expert is the one WanExperts picks for its timestep."""
    model = load_transformer(ModelConfig(family="wan", path=str(wan22)), WAN)
    assert isinstance(model, WanExperts) and model.boundary_timestep == 875.0
    g = torch.Generator().manual_seed(0)
    timesteps = torch.tensor([874, 875, 876, 999, 0])
    x, text = inputs(len(timesteps), g)
    with torch.no_grad():
        mixed = model(x, timesteps, text, return_dict=False)[0]
        for i, t in enumerate(timesteps.tolist()):
            expert = model.transformer if t >= 875 else model.transformer_2
            alone = expert(x[i : i + 1], timesteps[i : i + 1], text[i : i + 1], return_dict=False)[0]
            other = (model.transformer_2 if t >= 875 else model.transformer)(
                x[i : i + 1], timesteps[i : i + 1], text[i : i + 1], return_dict=False
            )[0]
            torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-5, atol=1e-6)
            assert (other - alone).abs().max() > 1e-4  # the experts differ, so the check means something

    from opd_fast.models import Conditioning

    cond = Conditioning(text[:3], torch.ones(3, 5), text[:1], torch.ones(1, 5))
    sigma = torch.tensor([0.8749, 0.875, 0.8751])  # timesteps 874, 875, 875
    with torch.no_grad():
        v, cfg = WAN.velocity(model, x[:3], sigma, cond, None)
        low = model.transformer_2(x[:1], torch.tensor([874]), text[:1], return_dict=False)[0]
        high = model.transformer(x[1:3], torch.tensor([875, 875]), text[1:3], return_dict=False)[0]
    assert cfg is None
    torch.testing.assert_close(v, torch.cat([low, high]), rtol=1e-5, atol=1e-6)

    pipe = WAN.pipeline_class.from_pretrained(wan22, local_files_only=True)
    calls = []
    for name in ("transformer", "transformer_2"):
        getattr(pipe, name).register_forward_pre_hook(
            lambda _, args, kwargs, name=name: calls.append((name, float(kwargs["timestep"][0]))), with_kwargs=True
        )
    with torch.no_grad():
        pipe(prompt="a red cat", num_inference_steps=6, height=32, width=32, num_frames=5, output_type="latent")
    assert {name for name, _ in calls} == {"transformer", "transformer_2"}  # the steps straddle the boundary
    for name, t in calls:
        assert bool(model.high_noise(torch.tensor([t]))) == (name == "transformer"), (name, t)


def randomized_lora(model, seed: int, r: int = 4, alpha: int = 8, scale: float = 0.3):
    """A peft LoRA on both experts' attention projections with random B (a trained teacher's, not a no-op)."""
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(WAN.lora_targets), init_lora_weights="gaussian")
    peft_model = get_peft_model(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return peft_model, config


def write_teachers(root, folder) -> list[dict]:
    """Two two-expert teachers of the tiny Wan 2.2 pipeline: its diffusers LoRA (one file per expert, as the
    student's export) and a full pipeline folder with the LoRA merged into both experts."""
    tiny = ModelConfig(family="wan", path=str(folder))
    lora_model, config = randomized_lora(load_transformer(tiny, WAN), seed=1)
    state = {k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(lora_model).items()}
    WAN.save_lora(root / "teacher_lora", state, config.to_dict())
    full_model, _ = randomized_lora(load_transformer(tiny, WAN), seed=2)
    full = root / "teacher_full"
    shutil.copytree(folder, full)
    for name in ("transformer", "transformer_2"):
        shutil.rmtree(full / name)
        getattr(full_model.merge_and_unload(), name).save_pretrained(full / name)
    return [{"path": str(root / "teacher_lora"), "format": "diffusers"}, {"path": str(full), "format": "full"}]


def world(root, folder, teachers, lora: bool = True, **extra) -> dict:
    (root / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    raw = {
        "model": {"family": "wan", "path": str(folder)},
        "student": {
            "guidance": 4.0,
            "guidance_2": 3.0,  # the low-noise expert's (WanPipeline's guidance_scale_2), as the released recipe
            "lora": {"enabled": lora, "rank": 4, "alpha": 8, "targets": list(WAN.lora_targets)},
        },
        "tasks": [
            {"name": f"t{i}", "prompts": str(root / "p.txt"), "teacher": {**t, "guidance": 4.0}}
            for i, t in enumerate(teachers)
        ],
        "prompts": {"encoder": "pipeline", "max_sequence_length": 8},
        # 3 steps at flow_shift 3: timesteps 999 (high-noise expert), 857 and 600 (low-noise): both trained
        "sampling": {"num_steps": 3, "resolution": 32, "num_frames": 5},
        "optimizer": {"lr": 3e-2},
        "train": {"rounds": 4, "micro_batch_size": 2},
        "logging": {"progress": False, "tensorboard": False},
    }
    for key, value in extra.items():
        raw.setdefault(key, {}).update(value)
    return raw


def test_a_two_expert_student_trains_exports_and_samples(wan22, tmp_path):
    """A LoRA on both experts against two two-expert teachers (diffusers LoRA, full folder): both experts' LoRA
    get gradients (the trained steps straddle the boundary), the loss falls, the export is one file per expert and
    `opd-fast sample` renders through WanPipeline with both loaded."""
    from opd_fast.evaluate.sample import SampleSettings, sample
    from opd_fast.prompts import PromptSet

    teachers = write_teachers(tmp_path, wan22)
    cfg = config_from_dict(world(tmp_path, wan22, teachers))
    trainer = Trainer.build(cfg, tmp_path / "run", device="cpu")
    assert isinstance(trainer.student, WanExperts)
    assert all(isinstance(t.model, WanExperts) for t in trainer.teachers.values())
    assert float(trainer.sigmas[0]) == 1.0 and float(trainer.sigmas[1]) < BOUNDARY < 1.0
    gradient = capture_round_gradient(trainer)  # round 0, measured (no step)
    trainer.round = 0
    for expert in ("transformer.", "transformer_2."):
        grads = [g for n, g in gradient.items() if n.startswith(expert) and "lora_B" in n]  # A's: 0 while B = 0
        assert grads and all(g.abs().max() > 0 for g in grads), expert
    records = trainer.fit()
    trainer.round = 0  # round 0's prompts and noise again, measured after training (no step)
    after = trainer.train_round(step=False).loss
    assert after < 0.95 * records[0]["loss"], (records[0]["loss"], after)
    export = tmp_path / "run" / "lora_diffusers"
    assert (export / "pytorch_lora_weights.safetensors").is_file()
    assert (export / "transformer_2" / "pytorch_lora_weights.safetensors").is_file()
    out = sample(cfg, PromptSet(PROMPTS[:1]), tmp_path / "s", SampleSettings(num_steps=2), tmp_path / "run")
    assert (out / "images" / "00000.png").is_file()
    assert json.loads((out / "sample.json").read_text())["extra"]["guidance"] == [4.0, 3.0]
    teacher = sample(
        cfg, PromptSet(PROMPTS[:1]), tmp_path / "st", SampleSettings(model="teacher:t0", num_steps=2), tmp_path / "run"
    )
    assert (teacher / "images" / "00000.png").is_file()


def test_the_export_loads_into_both_experts_with_alpha_intact(wan22, tmp_path):
    """r=4, alpha=8: WanPipeline.load_lora_weights(folder) and (folder/transformer_2, load_into_transformer_2=True)
    give each expert exactly the student's output (scale alpha / r = 2, not 1), and reading the export back as a
    teacher merges the same weights."""
    from opd_fast.checkpoint import export_diffusers_lora
    from opd_fast.models import add_student_lora

    base = load_transformer(ModelConfig(family="wan", path=str(wan22)), WAN)
    student = copy.deepcopy(base)
    from opd_fast.config import LoraConfig as RunLora

    peft_config = add_student_lora(student, RunLora(rank=4, alpha=8, targets=list(WAN.lora_targets)))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    export_diffusers_lora(student, peft_config, WAN, tmp_path / "lora")

    pipe = WAN.pipeline_class.from_pretrained(wan22, local_files_only=True)
    pipe.load_lora_weights(tmp_path / "lora")
    pipe.load_lora_weights(tmp_path / "lora" / "transformer_2", load_into_transformer_2=True)
    x, text = inputs(2, torch.Generator().manual_seed(1))
    t = torch.tensor([900, 300])
    with torch.no_grad():
        for name in ("transformer", "transformer_2"):
            expected = getattr(student, name)(x, t, text, return_dict=False)[0]
            plain = getattr(base, name)(x, t, text, return_dict=False)[0]
            loaded = getattr(pipe, name)(x, t, text, return_dict=False)[0]
            assert (expected - plain).abs().max() > 1e-3, name  # the LoRA does something
            torch.testing.assert_close(loaded, expected, rtol=1e-4, atol=1e-5)
            layer = getattr(pipe, name).blocks[0].attn1.to_q
            assert layer.scaling[next(iter(layer.scaling))] == 2.0

    teacher = load_teacher("t", TeacherConfig(path=str(tmp_path / "lora")), base, WAN).model
    with torch.no_grad():
        torch.testing.assert_close(teacher(x, t, text, return_dict=False)[0], student(x, t, text, return_dict=False)[0])


def test_a_full_two_expert_student_exports_both_experts_and_samples(wan22, tmp_path):
    from opd_fast.evaluate.sample import SampleSettings, sample
    from opd_fast.prompts import PromptSet

    teachers = write_teachers(tmp_path, wan22)[1:]
    cfg = config_from_dict(world(tmp_path, wan22, teachers, lora=False, train={"rounds": 1}, optimizer={"lr": 1e-4}))
    trainer = Trainer.build(cfg, tmp_path / "run", device="cpu")
    assert {n.split(".")[0] for n, p in trainer.student.named_parameters() if p.requires_grad} == {
        "transformer",
        "transformer_2",
    }
    trainer.fit()
    folder = tmp_path / "run" / "transformer"
    assert (folder / "transformer" / "config.json").is_file() and (folder / "transformer_2" / "config.json").is_file()
    assert json.loads((folder / "wan_experts.json").read_text())["boundary_ratio"] == BOUNDARY
    out = sample(cfg, PromptSet(PROMPTS[:1]), tmp_path / "s", SampleSettings(num_steps=2), tmp_path / "run")
    assert (out / "images" / "00000.png").is_file()


def test_wan22_layouts_that_are_not_supported_are_clear_errors(wan22, tmp_path):
    from opd_fast.text_encoders import check_pipeline_folder

    def edited(name, changes):
        folder = tmp_path / name
        shutil.copytree(wan22, folder)
        index = folder / "model_index.json"
        index.write_text(json.dumps({**json.loads(index.read_text()), **changes}))
        return folder

    ti2v = edited("ti2v", {"expand_timesteps": True})
    with pytest.raises(ConfigError, match="TI2V pipeline.*not supported yet"):
        WAN.check_model(ModelConfig(family="wan", path=str(ti2v)))
    one = edited("one", {"transformer_2": [None, None]})
    with pytest.raises(ConfigError, match=r"boundary_ratio 0\.875 but has no transformer_2"):
        check_pipeline_folder(one, WAN)
    # without a boundary WanPipeline denoises every step with `transformer`: so does the run
    no_boundary = edited("no_boundary", {"boundary_ratio": None})
    model = load_transformer(ModelConfig(family="wan", path=str(no_boundary)), WAN)
    assert not isinstance(model, WanExperts)


def test_two_expert_teachers_in_every_runtime_mode(wan22, tmp_path):
    """The LoRA teacher (one file per expert) as an adapter on the shared two-expert base gives the merged teacher's
    velocity on both sides of the boundary; an FP8 two-expert teacher keeps both experts' time embedders high and
    stays near its velocity; CUDA graphs, which would freeze the expert of the step they were captured at, are
    refused naming the key."""
    from opd_fast.config import TaskConfig, TeacherRuntimeConfig
    from opd_fast.teachers import TeacherError, apply_precision, load_teachers

    base = load_transformer(ModelConfig(family="wan", path=str(wan22)), WAN)
    lora = write_teachers(tmp_path, wan22)[0]
    tasks = [TaskConfig(name="t", prompts="unused.txt", teacher=TeacherConfig(**lora, guidance=4.0))]
    merged = load_teachers(tasks, base, WAN, TeacherRuntimeConfig(mode="merged"))["t"]
    adapter = load_teachers(tasks, base, WAN, TeacherRuntimeConfig(mode="adapter"))["t"]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(WAN.latent_shape(base, 2, 32), generator=g)
    cond = WAN.random_conditioning(base, 2, 5, g)
    for sigma in (torch.tensor([0.95, 0.95]), torch.tensor([0.5, 0.5]), torch.tensor([0.95, 0.5])):
        expected, _ = merged.velocity(WAN, x, sigma, cond)
        ours, _ = adapter.velocity(WAN, x, sigma, cond)
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
        plain, _ = WAN.velocity(base, x, sigma, cond, 4.0)
        assert (expected - plain).abs().max() > 1e-3  # the LoRA reaches the expert that runs

    from opd_fast import fp8

    quantized = apply_precision(
        copy.deepcopy(merged.model),
        TeacherRuntimeConfig(precision="fp8", fp8_backend="torch", fp8_scaling="tensorwise"),
        WAN,
    )
    names = {n for n, m in quantized.named_modules() if isinstance(m, fp8.Fp8Linear)}
    assert any(n.startswith("transformer_2.blocks") for n in names) and any(n.startswith("transformer.") for n in names)
    assert not any("condition_embedder" in n or n.endswith("proj_out") for n in names)
    sigma = torch.tensor([0.95, 0.5])
    reference, _ = merged.velocity(WAN, x, sigma, cond)
    with torch.no_grad():
        v, _ = WAN.velocity(quantized, x, sigma, cond, 4.0)
    assert torch.isfinite(v).all() and float((v - reference).norm() / reference.norm()) < 0.25

    with pytest.raises(TeacherError, match=r"teacher_runtime\.cuda_graphs: the teachers of tasks \['t'\]"):
        load_teachers(tasks, base, WAN, TeacherRuntimeConfig(cuda_graphs=True))


def test_the_low_noise_expert_has_its_own_guidance_as_in_the_pipeline(wan22):
    """guidance_2 (WanPipeline's guidance_scale_2) scales the CFG of the samples the low-noise expert denoises; a
    batch on one side hands opd_step its expert's scale, a mixed one is combined per sample; guidance_scale <= 1
    turns CFG off in both experts (the pipeline decides by it alone); a model of one transformer refuses a second
    scale, naming the key."""
    from opd_fast.families.wan import ExpertGuidance

    model = load_transformer(ModelConfig(family="wan", path=str(wan22)), WAN)
    guidance = WAN.guidance(model, 4.0, 3.0, "student.guidance_2")
    assert guidance == ExpertGuidance(4.0, 3.0)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(WAN.latent_shape(model, 2, 32), generator=g)
    cond = WAN.random_conditioning(model, 2, 5, g)
    mixed = torch.tensor([0.95, 0.5])  # timesteps 950 (high-noise expert), 500 (low-noise)
    with torch.no_grad():
        v, cfg = WAN.velocity(model, x, mixed, cond, guidance)
        expected = []
        for i, scale in ((0, 4.0), (1, 3.0)):
            row = type(cond)(
                cond.prompt_embeds[i : i + 1], cond.pooled[i : i + 1], cond.negative_embeds, cond.negative_pooled
            )
            both, _ = WAN.velocity(model, x[i : i + 1], mixed[i : i + 1], row, scale)
            expected.append(both[:1] + scale * (both[1:] - both[:1]))
        assert cfg is None
        torch.testing.assert_close(v, torch.cat(expected), rtol=1e-5, atol=1e-6)
        for sigma, scale in ((torch.tensor([0.95, 0.95]), 4.0), (torch.tensor([0.5, 0.5]), 3.0)):
            v, cfg = WAN.velocity(model, x, sigma, cond, guidance)
            assert cfg == scale and v.shape[0] == 4  # [uncond; cond] for opd_step
        v, cfg = WAN.velocity(model, x, mixed, cond, ExpertGuidance(1.0, 3.0))
        assert cfg is None and v.shape[0] == 2
    inputs = WAN.sampling_inputs(cond.prompt_embeds, None, cond.negative_embeds, None, guidance)
    assert inputs["guidance_scale"] == 4.0 and inputs["guidance_scale_2"] == 3.0

    single = load_transformer(ModelConfig(family="wan", preset="tiny-wan"), WAN)
    with pytest.raises(ConfigError, match=r"tasks\.0\.teacher\.guidance_2: .*needs a Wan 2\.2 two-expert model"):
        WAN.guidance(single, 4.0, 3.0, "tasks.0.teacher.guidance_2")
    sd3 = get_family("sd3")
    with pytest.raises(ConfigError, match=r"student\.guidance_2: the sd3 model has one transformer"):
        sd3.guidance(None, 4.0, 3.0, "student.guidance_2")


def test_a_two_expert_student_is_evaluated_while_it_trains(wan22, tmp_path):
    """The `eval:` section on a two-expert student: EvalHook builds WanPipeline around both trained experts (none
    loaded from the folder) and samples at the student's own per-expert guidance, (4.0, 3.0) into WanPipeline's
    guidance_scale and guidance_scale_2."""
    from opd_fast.evaluate.during import EvalHook
    from opd_fast.evaluate.records import read_eval_records
    from opd_fast.resources import builtin_path

    clip = builtin_path("tiny") / "clip"
    teachers = write_teachers(tmp_path, wan22)[:1]
    raw = world(
        tmp_path,
        wan22,
        teachers,
        train={"rounds": 1},
        eval={
            "at_end": True,
            "models": ["student"],
            "prompts_per_task": 1,
            "num_steps": 2,
            "batch_size": 1,
            "prompts": {"t0": str(tmp_path / "p.txt")},
            "rewards": {"t0": [{"name": "pickscore", "model": str(clip)}]},
        },
    )
    cfg = config_from_dict(raw)
    hook = EvalHook()
    trainer = Trainer.build(cfg, tmp_path / "run", device="cpu", hooks=[hook])
    try:
        trainer.fit()
    finally:
        trainer.close()
    pipe = hook.pipe  # the pipeline the evaluation sampled with, around the trained experts themselves
    assert pipe.transformer is trainer.student.transformer and pipe.transformer_2 is trainer.student.transformer_2
    assert (pipe._guidance_scale, pipe._guidance_scale_2) == (4.0, 3.0)  # what WanPipeline.__call__ was given
    records = read_eval_records(tmp_path / "run")
    assert [(r["step"], r["model"]) for r in records] == [(1, "student")]
    assert math.isfinite(records[0]["rewards"]["t0"]["pickscore"])  # the film strip scored
