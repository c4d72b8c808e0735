"""The families beyond SD3 and FLUX.1 (Qwen-Image, Wan 2.1, Z-Image) end to end on tiny pipelines built from config,
the per-step KL on 5-D video latents against a float64 twin, teachers of another size on the student's latent space.
Wan 2.2's two experts: tests/test_wan22.py. The family-generic tests (conftest.every_family) cover the rest: the
embedding cache against each pipeline's own encode_prompt, the sigma grid against its pipeline's, LoRA export through
its pipeline's load_lora_weights, sampling."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import every_family, run_family, video_overrides
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict
from tiny_pipeline import one_thread  # noqa: F401  (autouse fixture)

from opd_fast.config import ConfigError, ModelConfig, config_from_dict
from opd_fast.families import get_family
from opd_fast.models import load_transformer
from opd_fast.ops import opd_step
from opd_fast.ops.opd_step import available_backends
from opd_fast.teachers import TeacherError, teacher_memory_bytes
from opd_fast.trainer import Trainer

NEW = ["qwen_image", "wan", "z_image"]
QWEN, WAN = get_family("qwen_image"), run_family(get_family("wan"))
PROMPTS = ["a red cat", "the blue dog", 'a sign that says "hi"', "a photo of the cat"]


def write_teachers(root, family, folder) -> list[dict]:
    """Three teachers of the tiny pipeline at `folder`, one per layout: a peft adapter folder, the pipeline's
    diffusers LoRA file, a full transformer folder (the base with its LoRA merged in)."""
    tiny = ModelConfig(family=family.name, path=str(folder))
    teachers = []
    for seed, fmt in enumerate(("peft", "diffusers", "full")):
        config = LoraConfig(r=4, lora_alpha=8, target_modules=list(family.lora_targets), init_lora_weights="gaussian")
        model = get_peft_model(load_transformer(tiny, family), config)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        path = root / f"teacher_{fmt}"
        if fmt == "peft":
            model.save_pretrained(path)
        elif fmt == "diffusers":
            state = {k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(model).items()}
            family.pipeline_class.save_lora_weights(
                path, transformer_lora_layers=state, transformer_lora_adapter_metadata=config.to_dict()
            )
        else:
            model.merge_and_unload().save_pretrained(path)
        teachers.append({"path": str(path), "format": fmt})
    return teachers


def world_config(root, family, folder, teachers, guidance, **extra) -> dict:
    (root / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    tasks = [
        {"name": f"t{i}", "prompts": str(root / "p.txt"), "teacher": {**teacher, "guidance": guidance}}
        for i, teacher in enumerate(teachers)
    ]
    raw = {
        "model": {"family": family.name, "path": str(folder)},
        "student": {"guidance": guidance, "lora": {"rank": 4, "alpha": 8, "targets": list(family.lora_targets)}},
        "tasks": tasks,
        "prompts": {"encoder": "pipeline", "max_sequence_length": 8},
        "sampling": {"num_steps": 3, "resolution": 32, **video_overrides(family)},
        "optimizer": {"lr": 3e-2},
        "train": {"rounds": 4, "micro_batch_size": 2},
        "logging": {"progress": False, "tensorboard": False},
    }
    for key, value in extra.items():
        raw.setdefault(key, {}).update(value)
    return raw


@pytest.mark.parametrize("name", NEW)
def test_three_teacher_world_trains_exports_and_samples(name, tiny_pipelines, tmp_path):
    """A tiny three-teacher world (peft, diffusers, full) on the family's pipeline folder: the loss falls, the
    student's LoRA is exported in the pipeline's layout and sampled through the pipeline."""
    from opd_fast.evaluate.sample import SampleSettings, sample
    from opd_fast.prompts import PromptSet

    family = run_family(get_family(name))
    folder = tiny_pipelines[name]
    teachers = write_teachers(tmp_path, family, folder)
    guidance = 4.0 if name != "z_image" else 3.0
    cfg = config_from_dict(world_config(tmp_path, family, folder, teachers, guidance))
    trainer = Trainer.build(cfg, tmp_path / "run", device="cpu")
    records = trainer.fit()
    trainer.round = 0  # round 0's prompts and noise again, measured after training (no step)
    after = trainer.train_round(step=False).loss
    assert after < 0.95 * records[0]["loss"], (records[0]["loss"], after)
    lora = tmp_path / "run" / "lora_diffusers" / "pytorch_lora_weights.safetensors"
    assert lora.is_file()
    out = sample(cfg, PromptSet(PROMPTS[:1]), tmp_path / "s", SampleSettings(num_steps=2), tmp_path / "run")
    assert (out / "images" / "00000.png").is_file()
    assert json.loads((out / "sample.json").read_text())["extra"]["family"] == name


def test_qwen_image_true_cfg_is_the_pipelines(tiny_pipelines):
    """The rollout's guided velocity (the family combines it: the rescaling to the conditional norm is not linear),
    stepped by opd_step on the family's sigma grid, lands where QwenImagePipeline's own denoising loop does."""
    from opd_fast.schedule import sigma_grid

    folder = tiny_pipelines["qwen_image"]
    pipe = QWEN.pipeline_class.from_pretrained(folder, local_files_only=True)
    resolution, steps, guidance = 64, 3, 4.0
    with torch.no_grad():
        embeds, mask = QWEN.encode_prompt(pipe, PROMPTS[:2], "cpu", 16)
        negative, negative_mask = QWEN.encode_prompt(pipe, ["blurry"], "cpu", 16)
    shape = QWEN.latent_shape(pipe.transformer, 2, resolution)
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    inputs = QWEN.sampling_inputs(embeds, mask, negative, negative_mask, guidance)
    with torch.no_grad():
        expected = pipe(
            **inputs, latents=x0, num_inference_steps=steps, height=resolution, width=resolution, output_type="latent"
        ).images

    from opd_fast.models import Conditioning

    cond = Conditioning(embeds, mask, negative, negative_mask)
    sigmas = sigma_grid(QWEN, steps, image_seq_len=QWEN.image_tokens(pipe.transformer, resolution), path=folder)
    x = x0
    with torch.no_grad():
        for j in range(steps):
            sigma, sigma_next = sigmas[j].expand(2), sigmas[j + 1].expand(2)
            v, cfg = QWEN.velocity(pipe.transformer, x, sigma, cond, guidance)
            assert cfg is None and v.shape == x.shape
            x, _ = opd_step(x, v, v, torch.zeros_like(x), sigma, sigma_next, 0.0, backend="reference")
    torch.testing.assert_close(x, expected, rtol=1e-4, atol=1e-5)


def kl_float64(x, v_s, v_t, sigma, sigma_next, a, reduction):
    """The per-sample KL of one transition in float64, summed over every latent element (frames included)."""
    x, v_s, v_t = x.double(), v_s.double(), v_t.double()
    s, sn = sigma.double(), sigma_next.double()
    dt = sn - s
    view = (-1,) + (1,) * (x.dim() - 1)
    if a == 0:
        gap = (v_s - v_t) * dt.view(view)
        kl = 0.5 * gap.pow(2).flatten(1).sum(1)
    else:
        std = a * torch.sqrt(s / (1 - torch.where(s == 1, sn, s)))
        v_coef = (1 + std**2 * (1 - s) / (2 * s)) * dt
        sbar2 = std**2 * -dt
        kl = (v_coef.view(view) * (v_s - v_t)).pow(2).flatten(1).sum(1) / (2 * sbar2)
    return kl / x[0].numel() if reduction == "mean" else kl


@pytest.mark.parametrize("backend", available_backends("cpu"))
@pytest.mark.parametrize("noise_level", [0.0, 0.7])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_video_kl_sums_over_every_frame(backend, noise_level, reduction):
    """(B, C, F, H, W) latents with F > 1: the fused op's loss and gradient against a float64 twin; a change in one
    frame alone moves the loss (no frame is dropped by a per-image reduction)."""
    g = torch.Generator().manual_seed(3)
    shape = (2, 4, 3, 5, 6)
    x, v_t, noise = (torch.randn(shape, generator=g) for _ in range(3))
    v_s = torch.randn(shape, generator=g).requires_grad_(True)
    sigma, sigma_next = torch.tensor([1.0, 0.6]), torch.tensor([0.8, 0.35])
    _, loss = opd_step(x, v_s, v_t, noise, sigma, sigma_next, noise_level, reduction=reduction, backend=backend)
    v64 = v_s.detach().double().requires_grad_(True)
    expected = kl_float64(x, v64, v_t, sigma, sigma_next, noise_level, reduction)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)
    loss.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(v_s.grad.double(), v64.grad, rtol=1e-4, atol=1e-8)
    last_frame = v_t.clone()
    last_frame[:, :, -1] += 1.0
    _, moved = opd_step(x, v_s.detach(), last_frame, noise, sigma, sigma_next, noise_level, backend=backend)
    assert bool((moved > loss.detach() * 0 + 1e-6).all()) and not torch.allclose(moved, loss.detach())


def test_trainer_loss_on_video_latents_is_the_float64_kl(tiny_pipelines, tmp_path):
    """The trainer's per-task loss on Wan's 5-D latents (2 latent frames here) is the float64 sum of every trained
    step's KL over all latent elements, recomputed from the same noise, prompts and models (SDE)."""
    folder = tiny_pipelines["wan"]
    teachers = write_teachers(tmp_path, WAN, folder)[:1]
    raw = world_config(tmp_path, WAN, folder, teachers, 4.0, sampling={"noise_level": 0.7})
    trainer = Trainer.build(config_from_dict(raw), tmp_path / "run", device="cpu")
    assert trainer.family.latent_shape(trainer.student, 2, 32)[2] == 2  # frames > 1
    cfg, task = trainer.cfg, trainer.cfg.tasks[0]
    indices = trainer.batch_indices(trainer.round, 0)[:2]
    shape = WAN.latent_shape(trainer.student, 2, cfg.sampling.resolution)
    noise = trainer.sample_noise(trainer.round, 0, 0, shape)
    cond = trainer.prompts[task.name].conditioning(indices, "cpu")
    result = trainer.train_round(step=False)

    total, x = torch.zeros(2, dtype=torch.float64), noise[0]
    with torch.no_grad():
        for j in range(trainer.num_trained[task.name]):
            sigma, sigma_next = trainer.sigmas[j].expand(2), trainer.sigmas[j + 1].expand(2)
            v_s, g_s = WAN.velocity(trainer.student, x, sigma, cond, cfg.student.guidance)
            v_t, g_t = trainer.teachers[task.name].velocity(WAN, x, sigma, cond)
            v_s = v_s[:2].double() + g_s * (v_s[2:].double() - v_s[:2].double())  # the CFG batch [uncond; cond]
            v_t = (v_t[:2].double() + g_t * (v_t[2:].double() - v_t[:2].double())).float()
            total += kl_float64(x, v_s, v_t, sigma, sigma_next, 0.7, "sum")
            x, _ = opd_step(x, v_s.float(), v_t, noise[j + 1], sigma, sigma_next, 0.7, backend="reference")
    torch.testing.assert_close(torch.tensor(result.task_losses[task.name]), total.mean().float(), rtol=1e-4, atol=0)


def copy_pipeline(src, dst, transformer=None, edit: dict | None = None):
    """A copy of the pipeline folder `src`, its transformer replaced and component configs edited
    ({"vae/config.json": {key: value}})."""
    shutil.copytree(src, dst)
    if transformer is not None:
        shutil.rmtree(dst / "transformer")
        transformer.save_pretrained(dst / "transformer")
    for file, changes in (edit or {}).items():
        path = dst / file
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return dst


def test_teacher_of_another_size_on_the_same_latent_space(tiny_pipelines, tmp_path):
    """Wan 14B teaching Wan 1.3B in miniature: a larger tiny Wan in a pipeline folder that shares the student's VAE,
    scheduler and text encoders trains the student, its memory counted; another VAE scaling, sigma schedule or latent
    channel count is a TeacherError naming the teacher and what differs. (Other text encoders are a teacher's own:
    tests/test_teacher_text_encoders.py; ones that do not load are an error naming the teacher's key.)"""
    folder = tiny_pipelines["wan"]
    large = load_transformer(ModelConfig(family="wan", preset="tiny-wan-large"), WAN)
    teacher = copy_pipeline(folder, tmp_path / "large", large)
    raw = world_config(tmp_path, WAN, folder, [{"path": str(teacher / "transformer"), "format": "full"}], 4.0)
    raw["train"]["rounds"] = 2
    trainer = Trainer.build(config_from_dict(raw), tmp_path / "run", device="cpu")
    assert len(trainer.teachers["t0"].model.blocks) == 3 and len(trainer.student.blocks) == 2
    student_bytes = sum(p.numel() * p.element_size() for p in trainer.student.parameters() if not p.requires_grad)
    assert teacher_memory_bytes(trainer.teachers) > student_bytes
    records = trainer.fit()
    assert all(r["loss"] > 0 for r in records)

    wider = load_transformer(ModelConfig(family="wan", preset="tiny-wan"), WAN)
    wider.register_to_config(in_channels=8)
    bad = {
        "vae": ({"vae/config.json": {"latents_std": [2.0] * 4}}, large, r"vae latents_std"),
        "schedule": ({"scheduler/scheduler_config.json": {"flow_shift": 5.0}}, large, r"scheduler flow_shift"),
        "channels": (None, wider, r"in_channels: student 4 vs teacher 8"),
    }
    for name, (edit, model, match) in bad.items():
        other = copy_pipeline(folder, tmp_path / name, model, edit)
        raw = world_config(tmp_path, WAN, folder, [{"path": str(other / "transformer"), "format": "full"}], 4.0)
        with pytest.raises(TeacherError, match=rf"teacher of task 't0'.*{match}"):
            Trainer.build(config_from_dict(raw), tmp_path / f"run_{name}", device="cpu")
    damaged = copy_pipeline(folder, tmp_path / "damaged", large, {"text_encoder/config.json": {"d_ff": 48}})
    raw = world_config(tmp_path, WAN, folder, [{"path": str(damaged / "transformer"), "format": "full"}], 4.0)
    with pytest.raises(ConfigError, match=r"tasks\.0\.teacher\.path: cannot load the text encoders of .*damaged"):
        Trainer.build(config_from_dict(raw), tmp_path / "run_damaged", device="cpu")


@pytest.mark.parametrize("name", NEW)
def test_builtin_encoder_gives_a_mask_family_its_word_mask(name):
    family = run_family(get_family(name))
    model = load_transformer(ModelConfig(family=name, preset=family.tiny_preset), family)
    encode, cache_name = family.builtin_text_encoder(model, 6)
    embeds, mask = encode(["a red cat", "dog"])
    assert embeds.shape == (2, 6, family.text_widths(model)[0]) and cache_name.endswith("-mask")
    assert mask.tolist() == [[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]]


def test_a_video_length_is_the_runs_and_only_a_video_family_takes_one():
    from opd_fast.config import SamplingConfig

    wan = get_family("wan")
    nine = wan.for_run(SamplingConfig(num_frames=9))
    assert nine.latent_frames() == 3 and wan.latent_frames() == 21  # the registry's object is not changed
    assert wan.for_run(SamplingConfig()) is wan
    with pytest.raises(ConfigError, match=r"sampling\.num_frames: the Wan VAE encodes 1 \+ 4k frames"):
        wan.for_run(SamplingConfig(num_frames=6))
    with pytest.raises(ConfigError, match=r"sampling\.num_frames: model.family 'sd3' makes images"):
        get_family("sd3").for_run(SamplingConfig(num_frames=5))


@every_family
def test_an_fp8_teacher_of_every_family_runs_near_its_bf16_velocity(family):
    """The family's own embedders and modulations stay high (Family.fp8_keep): Wan reads its time embedder's weight
    dtype and Z-Image its x embedder's, so quantizing them failed outright."""
    import copy

    from opd_fast import fp8
    from opd_fast.config import TeacherRuntimeConfig
    from opd_fast.teachers import apply_precision

    model = load_transformer(ModelConfig(family=family.name, preset=family.tiny_preset), family)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(family.latent_shape(model, 2, 32), generator=g)
    cond = family.random_conditioning(model, 2, 6, generator=g)
    sigma = torch.full((2,), 0.7)
    reference, _ = family.velocity(model, x, sigma, cond, None)
    quantized = apply_precision(
        copy.deepcopy(model),
        TeacherRuntimeConfig(precision="fp8", fp8_backend="torch", fp8_scaling="tensorwise"),
        family,
    )
    assert any(isinstance(m, fp8.Fp8Linear) for m in quantized.modules())
    for name, module in quantized.named_modules():  # what the family keeps high is still a plain Linear
        if fp8.is_skipped(name, family.fp8_keep) and isinstance(model.get_submodule(name), torch.nn.Linear):
            assert type(module) is torch.nn.Linear, name
    v, _ = family.velocity(quantized, x, sigma, cond, None)
    assert torch.isfinite(v).all() and float((v - reference).norm() / reference.norm()) < 0.25


@pytest.mark.parametrize("name", ["sd3", "flux", "qwen_image", "wan", "z_image"])
def test_decoded_latents_are_the_pipelines_own_images(name, tiny_pipelines):
    """Family.decode_latents (stage 1's `task.images: vae`) against the pipeline's own tail: one pipeline call with
    output_type "latent" and one with "pil" from the same starting latents; our decode of the first gives the
    second's images, pixel for pixel (FLUX's and Qwen-Image's packed tokens, Wan's normalised video latents)."""
    from opd_fast.families import FAMILIES
    from opd_fast.stage1.rewards import ImageDecoder

    family = WAN if name == "wan" else FAMILIES[name]
    folder, resolution = tiny_pipelines[name], 32
    pipe = family.pipeline_class.from_pretrained(folder, local_files_only=True)
    with torch.no_grad():
        embeds, pooled = family.encode_prompt(pipe, PROMPTS[:2], "cpu", 8)
        negative, negative_pooled = family.encode_prompt(pipe, [""], "cpu", 8)
    inputs = family.sampling_inputs(embeds, pooled, negative, negative_pooled, family.no_guidance)
    x0 = torch.randn(family.latent_shape(pipe.transformer, 2, resolution), generator=torch.Generator().manual_seed(0))

    def call(output_type):
        with torch.no_grad():
            return pipe(
                **inputs,
                latents=x0.clone(),
                num_inference_steps=2,
                height=resolution,
                width=resolution,
                output_type=output_type,
            )

    latent_output = call("latent")
    latents = latent_output.frames if name == "wan" else latent_output.images
    assert latents.shape == x0.shape  # the pipeline's last latents are in the layout of our states
    theirs = family.output_images(call("pil"))
    ours = ImageDecoder("vae", str(folder), "cpu", family, resolution)(latents)
    assert len(ours) == len(theirs) == 2
    for a, b in zip(ours, theirs):
        assert a.size == b.size
        assert abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 1  # rounding only
