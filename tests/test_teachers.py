"""Teachers as released: each LoRA layout merges to exactly what the independent reference gives on the tiny base
(peft adapter folder: peft's own PeftModel.from_pretrained + merge_and_unload; diffusers pytorch_lora_weights:
StableDiffusion3Pipeline.load_lora_weights + fuse_lora), alpha != r and peft's rank/alpha patterns are honoured,
and a LoRA for another base is an error naming the teacher."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from conftest import every_family
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from tiny_pipeline import one_thread  # noqa: F401  (autouse fixture: one intra-op thread)

from opd_fast.config import OFFICIAL_LORA_TARGETS, ModelConfig, TeacherConfig
from opd_fast.families import get_family
from opd_fast.models import load_transformer
from opd_fast.teachers import TeacherError, load_teacher

SD3 = get_family("sd3")


@pytest.fixture(scope="module")
def base():
    return load_transformer(ModelConfig(family="sd3", preset="tiny-sd3"), SD3)


def randomize_lora(model: torch.nn.Module, seed: int) -> None:
    """peft initialises lora_B to zero (a no-op adapter); teachers are trained, so give B weights too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def output(model: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return model(
            hidden_states=torch.randn(2, 4, 8, 8, generator=g),
            encoder_hidden_states=torch.randn(2, 5, 32, generator=g),
            pooled_projections=torch.randn(2, 32, generator=g),
            timestep=torch.tensor([500.0, 900.0]),
            return_dict=False,
        )[0]


def write_peft_folder(base, folder, seed=1, **lora_kwargs) -> None:
    """peft's own layout, as the released teachers: PeftModel.save_pretrained (adapter_config.json + safetensors)."""
    model = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=list(OFFICIAL_LORA_TARGETS), **lora_kwargs))
    randomize_lora(model, seed)
    model.save_pretrained(folder)


def write_diffusers_lora(base, folder, seed=2, metadata=True, targets=OFFICIAL_LORA_TARGETS, **lora_kwargs) -> None:
    """diffusers' layout, as `save_lora_weights` writes it (what opd_fast.checkpoint exports too)."""
    model = copy.deepcopy(base)
    config = LoraConfig(target_modules=list(targets), **lora_kwargs)
    model.add_adapter(config)
    randomize_lora(model, seed)
    StableDiffusion3Pipeline.save_lora_weights(
        folder,
        transformer_lora_layers=get_peft_model_state_dict(model),
        transformer_lora_adapter_metadata=config.to_dict() if metadata else None,
    )


def diffusers_fused(base, lora_path):
    """The reference for diffusers files: the pipeline's loader and fuse, on a pipeline holding only the model."""
    pipe = StableDiffusion3Pipeline(
        transformer=copy.deepcopy(base),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.load_lora_weights(lora_path)
    pipe.fuse_lora()
    return pipe.transformer


PEFT_CASES = {
    "alpha=r": dict(r=4, lora_alpha=4),
    "r32-alpha64": dict(r=32, lora_alpha=64),  # the official student/teacher setting: scale 2
    # peft matches pattern keys as regexes against module-name suffixes; the first match (in file order) wins
    "patterns": dict(
        r=4,
        lora_alpha=8,
        rank_pattern={r"transformer_blocks\.0\.attn\.(to_q|to_k)": 2, "add_k_proj": 6},
        alpha_pattern={r"transformer_blocks\.1\.attn\.to_[qv]": 3, "add_k_proj": 5, "to_out.0": 1},
    ),
    "rslora": dict(r=8, lora_alpha=16, use_rslora=True),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_folder_matches_peft_merge(base, tmp_path, case):
    write_peft_folder(base, tmp_path / "teacher", **PEFT_CASES[case])
    teacher = load_teacher("geneval", TeacherConfig(path=str(tmp_path / "teacher"), guidance=1.0), base, SD3)
    reference = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "teacher").merge_and_unload()

    expected = output(reference)
    assert (expected - output(base)).abs().max() > 1e-3  # the LoRA does something
    torch.testing.assert_close(output(teacher.model), expected)
    merged = dict(teacher.model.named_parameters())
    for name, p in reference.named_parameters():
        torch.testing.assert_close(merged[name], p, msg=lambda m, name=name: f"{name}: {m}")
    assert teacher.guidance == 1.0
    assert not any(p.requires_grad for p in teacher.model.parameters())


@pytest.mark.parametrize("metadata", [True, False], ids=["with-metadata", "without-metadata"])
def test_diffusers_file_matches_load_lora_weights_and_fuse(base, tmp_path, caplog, metadata):
    folder = tmp_path / "teacher"
    write_diffusers_lora(
        base, folder, metadata=metadata, r=8, lora_alpha=16, rank_pattern={"transformer_blocks.1.attn.to_k": 4}
    )
    expected = output(diffusers_fused(base, folder))
    with caplog.at_level(logging.WARNING, logger="opd_fast.teachers"):
        from_folder = load_teacher("ocr", TeacherConfig(path=str(folder), guidance=4.5), base, SD3)
        from_file = load_teacher("ocr", TeacherConfig(path=str(folder / "pytorch_lora_weights.safetensors")), base, SD3)
    torch.testing.assert_close(output(from_folder.model), expected)
    torch.testing.assert_close(output(from_file.model), expected)
    assert ("no lora_adapter_metadata" in caplog.text) is not metadata
    assert from_folder.guidance == 4.5


@every_family
def test_exported_lora_merges_as_the_familys_pipeline_fuses_it(family, tmp_path):
    """Any family: the student's LoRA exported for the family's pipeline (opd_fast.checkpoint), read back as a teacher,
    gives the velocity of the pipeline's own load_lora_weights + fuse_lora; alpha / r = 2 kept."""
    from opd_fast.checkpoint import export_diffusers_lora

    base = load_transformer(ModelConfig(family=family.name, preset=family.tiny_preset), family)
    student = copy.deepcopy(base)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(family.lora_targets))
    student.add_adapter(config)
    randomize_lora(student, seed=4)
    export_diffusers_lora(student, config, family, tmp_path / "lora")

    pipe = family.pipeline_class(
        transformer=copy.deepcopy(base),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        **dict.fromkeys(family.text_components),
    )
    pipe.load_lora_weights(tmp_path / "lora")
    pipe.fuse_lora()
    teacher = load_teacher("ocr", TeacherConfig(path=str(tmp_path / "lora")), base, family).model

    g = torch.Generator().manual_seed(0)
    x = torch.randn(family.latent_shape(base, 2, 64), generator=g)
    cond = family.random_conditioning(base, 2, 5, g)
    sigma = torch.tensor([0.8, 0.3])
    with torch.no_grad():
        expected, _ = family.velocity(pipe.transformer, x, sigma, cond, 4.5)
        ours, _ = family.velocity(teacher, x, sigma, cond, 4.5)
        plain, _ = family.velocity(base, x, sigma, cond, 4.5)
    assert (expected - plain).abs().max() > 1e-3  # the LoRA does something
    torch.testing.assert_close(ours, expected)


def test_metadata_decides_the_strength(base, tmp_path):
    """Without lora_adapter_metadata the loader (diffusers and ours) takes alpha == r: an r=32/alpha=64 LoRA at half
    strength. Both files hold the same factors, so the merged deltas differ by exactly 2x."""
    for metadata in (True, False):
        write_diffusers_lora(base, tmp_path / str(metadata), seed=3, metadata=metadata, r=32, lora_alpha=64)
    full = load_teacher("a", TeacherConfig(path=str(tmp_path / "True")), base, SD3).model
    half = load_teacher("a", TeacherConfig(path=str(tmp_path / "False")), base, SD3).model
    name = "transformer_blocks.0.attn.to_q.weight"
    W = dict(base.named_parameters())[name]
    delta_full = dict(full.named_parameters())[name] - W
    delta_half = dict(half.named_parameters())[name] - W
    torch.testing.assert_close(delta_full, 2 * delta_half)


def test_alpha_scale_from_first_principles(base, tmp_path):
    """W_teacher = W + (alpha / r) B @ A, computed by hand from the saved factors (no peft, no diffusers)."""
    from safetensors.torch import load_file

    write_peft_folder(base, tmp_path / "t", r=32, lora_alpha=64)
    state = load_file(str(tmp_path / "t" / "adapter_model.safetensors"))
    module = "transformer_blocks.1.attn.add_v_proj"
    A = state[f"base_model.model.{module}.lora_A.weight"]
    B = state[f"base_model.model.{module}.lora_B.weight"]
    teacher = load_teacher("t", TeacherConfig(path=str(tmp_path / "t")), base, SD3).model
    W = dict(base.named_parameters())[f"{module}.weight"]
    torch.testing.assert_close(dict(teacher.named_parameters())[f"{module}.weight"], W + 2.0 * (B @ A))


def other_base(**changes) -> SD3Transformer2DModel:
    kwargs = SD3.presets["tiny-sd3"]
    torch.manual_seed(0)
    return SD3Transformer2DModel(**{**kwargs, **changes})


def test_lora_of_another_base_shape_names_the_teacher(base, tmp_path):
    wider = other_base(attention_head_dim=24)  # inner dim 48 instead of 32
    write_peft_folder(wider, tmp_path / "peft", r=4, lora_alpha=4)
    with pytest.raises(TeacherError, match=r"teacher of task 'ocr'.*lora_A \(4, 48\).*another base model"):
        load_teacher("ocr", TeacherConfig(path=str(tmp_path / "peft")), base, SD3)
    write_diffusers_lora(wider, tmp_path / "diffusers", r=4, lora_alpha=4)
    with pytest.raises(TeacherError, match=r"teacher of task 'ocr'.*another base model"):
        load_teacher("ocr", TeacherConfig(path=str(tmp_path / "diffusers")), base, SD3)


def test_lora_with_other_targets_names_the_teacher(base, tmp_path):
    """An SD3.5-style LoRA on the second attention of dual-attention blocks, against a base without them."""
    dual = other_base(dual_attention_layers=(0,))
    write_diffusers_lora(dual, tmp_path / "t", targets=["attn2.to_q", "attn.to_q"], r=4, lora_alpha=4)
    with pytest.raises(
        TeacherError,
        match=r"teacher of task 'aesthetic'.*'transformer_blocks\.0\.attn2\.to_q'.*no "
        r"Linear layer",
    ):
        load_teacher("aesthetic", TeacherConfig(path=str(tmp_path / "t")), base, SD3)


def test_full_model_of_another_latent_space_names_the_teacher(base, tmp_path):
    """Another size is a teacher (tests/test_families.py); another latent space is not."""
    other_base(in_channels=8, out_channels=8).save_pretrained(tmp_path / "full")
    with pytest.raises(
        TeacherError, match=r"teacher of task 'geneval'.*latent space.*in_channels: student 4 vs teacher 8"
    ):
        load_teacher("geneval", TeacherConfig(path=str(tmp_path / "full")), base, SD3)


def test_lora_file_of_another_layout_names_the_teacher(base, tmp_path):
    """A peft state dict pushed through save_lora_weights ('transformer.base_model.model.' keys) loads neither in
    diffusers nor here; the error says which teacher."""
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=4, target_modules=["attn.to_q"]))
    StableDiffusion3Pipeline.save_lora_weights(tmp_path / "t", transformer_lora_layers=get_peft_model_state_dict(model))
    with pytest.raises(TeacherError, match="teacher of task 'ocr'"):
        load_teacher("ocr", TeacherConfig(path=str(tmp_path / "t")), base, SD3)
