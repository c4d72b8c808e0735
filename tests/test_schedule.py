"""The rollout's sigma grid against the sigmas diffusers' own pipelines sample at, for each scheduler config."""

import json
import shutil

import pytest
import torch
from conftest import every_family
from tiny_pipeline import one_thread  # noqa: F401  (autouse fixture)

from opd_fast.config import ConfigError, config_from_dict
from opd_fast.families import get_family
from opd_fast.schedule import sigma_grid

STEPS = 4
SD3, FLUX = get_family("sd3"), get_family("flux")


def pipeline_sigmas(family, folder, resolution: int) -> tuple[torch.Tensor, int]:
    """(the sigmas the pipeline at `folder` sampled at after a real call at `resolution` px, the image tokens there
    as the family counts them: a wrong count moves a dynamic shift's grid off the pipeline's)."""
    pipe = family.pipeline_class.from_pretrained(folder, local_files_only=True)
    out = pipe(
        prompt="a cat",
        num_inference_steps=STEPS,
        height=resolution,
        width=resolution,
        guidance_scale=1.0,
        max_sequence_length=8,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
        **({"num_frames": family.num_frames} if hasattr(family, "num_frames") else {}),  # a video family
    )
    latents = out.frames if hasattr(out, "frames") else out.images  # a video pipeline's output holds frames
    assert latents.shape[1:] == family.latent_shape(pipe.transformer, 1, resolution)[1:]
    # (Wan: UniPC's first sigma 1 - 1e-6, which the rollout puts back to 1; Family.rollout_grid)
    return family.rollout_grid(pipe.scheduler.sigmas.float()), family.image_tokens(pipe.transformer, resolution)


def with_scheduler_config(src, dst, **changes):
    """A copy of the pipeline folder `src` whose scheduler config has `changes`."""
    shutil.copytree(src, dst)
    file = dst / "scheduler" / "scheduler_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))
    return dst


@every_family
@pytest.mark.parametrize("resolution", [64, 128])
def test_grid_follows_the_pipeline(family, tiny_pipelines, resolution):
    """Each family's pipeline calls the scheduler its own way (FLUX: a linear ramp, shifted by the image size)."""
    folder = tiny_pipelines[family.name]
    expected, tokens = pipeline_sigmas(family, folder, resolution)
    ours = sigma_grid(family, STEPS, image_seq_len=tokens, path=folder)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    # the same grid from the transformer/ folder (its pipeline's scheduler) and with no folder (the released config,
    # which the tiny pipelines ship)
    assert torch.equal(sigma_grid(family, STEPS, image_seq_len=tokens, path=folder / "transformer"), ours)
    assert torch.equal(sigma_grid(family, STEPS, image_seq_len=tokens), ours)


def test_flux_static_config_and_explicit_shift(tiny_pipelines, tmp_path):
    """A FLUX.1-schnell-like config (no dynamic shift, shift 1) is followed; so is an explicit sampling.shift."""
    schnell = with_scheduler_config(tiny_pipelines["flux"], tmp_path / "schnell", use_dynamic_shifting=False, shift=1.0)
    expected, tokens = pipeline_sigmas(FLUX, schnell, 64)
    assert torch.equal(sigma_grid(FLUX, STEPS, image_seq_len=tokens, path=schnell), expected)
    dev = sigma_grid(FLUX, STEPS, image_seq_len=tokens, path=tiny_pipelines["flux"])
    assert not torch.allclose(dev, expected)  # the two configs give different grids, so the check above can fail
    explicit = sigma_grid(FLUX, STEPS, shift=1.0, image_seq_len=tokens, path=tiny_pipelines["flux"])
    assert torch.equal(explicit, expected)


def test_sd3_follows_its_scheduler_config(tiny_pipelines, tmp_path):
    expected, tokens = pipeline_sigmas(SD3, tiny_pipelines["sd3"], 64)
    assert torch.equal(sigma_grid(SD3, STEPS, path=tiny_pipelines["sd3"]), expected)
    assert torch.equal(sigma_grid(SD3, STEPS), expected)  # no folder: SD3.5's shift 3.0
    # a dynamic-shift SD3 config (as some fine-tunes ship): the SD3 pipeline's mu from its patched image tokens
    dynamic = with_scheduler_config(tiny_pipelines["sd3"], tmp_path / "dynamic", use_dynamic_shifting=True)
    expected_dynamic, _ = pipeline_sigmas(SD3, dynamic, 64)
    assert not torch.allclose(expected_dynamic, expected)
    assert torch.equal(sigma_grid(SD3, STEPS, image_seq_len=tokens, path=dynamic), expected_dynamic)
    with pytest.raises(ValueError, match="needs image_seq_len"):
        sigma_grid(SD3, STEPS, path=dynamic)


def test_bad_scheduler_config_names_the_file(tiny_pipelines, tmp_path):
    broken = with_scheduler_config(tiny_pipelines["sd3"], tmp_path / "broken")
    (broken / "scheduler" / "scheduler_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"broken/scheduler/scheduler_config\.json is not valid JSON"):
        sigma_grid(SD3, STEPS, path=broken)


def test_trainer_samples_at_the_model_folders_grid(tiny_pipelines, tmp_path):
    """The trainer hands model.path and its image tokens to the grid: a schnell-like FLUX folder gives its grid."""
    from opd_fast.trainer import Trainer

    schnell = with_scheduler_config(tiny_pipelines["flux"], tmp_path / "schnell", use_dynamic_shifting=False, shift=1.0)
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("a cat\na dog\n")
    cfg = config_from_dict(
        {
            "model": {"family": "flux", "path": str(schnell)},
            "student": {"guidance": None, "lora": {"rank": 2, "alpha": 4}},
            "tasks": [{"name": "t", "prompts": str(prompt_file), "teacher": {"path": str(schnell), "format": "full"}}],
            "prompts": {"encoder": "pipeline", "max_sequence_length": 8},
            "sampling": {"num_steps": STEPS, "resolution": 64},
            "logging": {"tensorboard": False, "progress": False},
        }
    )
    trainer = Trainer.build(cfg, tmp_path / "run", device="cpu")
    expected, _ = pipeline_sigmas(FLUX, schnell, 64)
    assert torch.equal(trainer.sigmas, expected)
