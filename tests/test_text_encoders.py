"""The pipeline text encoders (opd_fast.text_encoders) on a tiny pipeline folder of every family, built from config:
the cached embeddings equal what the pipeline itself feeds its transformer, the cache name tracks the model, the
encoders are freed, and a training round runs with `prompts.encoder: pipeline`."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch
from conftest import every_family
from safetensors.torch import load_file
from tiny_pipeline import one_thread  # noqa: F401  (autouse fixture)

from opd_fast.config import ConfigError, ModelConfig, PromptsConfig, config_from_dict
from opd_fast.families import get_family
from opd_fast.prompts import PromptSet, encode_cached
from opd_fast.text_encoders import PipelineTextEncoder, pipeline_encoder

SD3, FLUX = get_family("sd3"), get_family("flux")

PROMPTS = ["a photo of the cat", 'a red sign that says "hi"', "the blue dog of", "cat"]
MSL = 16  # T5 tokens; the pipelines' defaults (256 / 512) work too but cost more here


def reference_encode(family, folder, prompts: list[str]):
    """The text conditioning the whole pipeline (loaded in full) gives its transformer when it samples the whole list
    at once, without CFG: its own encode_prompt, called its own way, with no batching. (embeds, pooled) for a family
    with a pooled input; for a mask family (Qwen-Image, Wan, Z-Image), each prompt's tokens as its transformer sees
    them (trimmed, masked or listed) and None."""
    pipe = family.pipeline_class.from_pretrained(folder, local_files_only=True)
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda _, args, kwargs: seen.append((args, kwargs)), with_kwargs=True)
    with torch.no_grad():
        pipe(
            prompt=prompts,
            num_inference_steps=1,
            guidance_scale=family.no_guidance,
            height=64,
            width=64,
            output_type="latent",
            max_sequence_length=MSL,
        )
    args, kwargs = seen[0]
    if "pooled_projections" in kwargs:
        return kwargs["encoder_hidden_states"], kwargs["pooled_projections"]
    if args:  # Z-Image: (latents, timestep, a list of each prompt's tokens)
        return list(args[2][: len(prompts)]), None
    embeds, mask = kwargs["encoder_hidden_states"], kwargs.get("encoder_hidden_states_mask")
    if mask is None:  # Qwen-Image drops an all-ones mask; Wan feeds the zero padding (rows of zeros) unmasked
        mask = embeds.abs().sum(-1) > 0 if "img_shapes" not in kwargs else torch.ones(embeds.shape[:2], dtype=bool)
    return [e[m.bool()] for e, m in zip(embeds, mask)], None


def assert_same_text(stored_embeds, stored_second, ref_embeds, ref_pooled):
    if ref_pooled is not None:
        torch.testing.assert_close(stored_embeds, ref_embeds)
        torch.testing.assert_close(stored_second, ref_pooled)
        return
    assert len(ref_embeds) == len(stored_embeds)
    for e, m, ref in zip(stored_embeds, stored_second, ref_embeds):
        torch.testing.assert_close(e[m > 0.5], ref)
        assert not e[m <= 0.5].any()  # padding is zeros


@every_family
def test_cache_equals_pipeline_encode_prompt(family, tiny_pipelines, tmp_path):
    folder = tiny_pipelines[family.name]
    encoder, name = pipeline_encoder(
        ModelConfig(family=family.name, path=str(folder)),
        family,
        PromptsConfig(max_sequence_length=MSL, encode_batch_size=3),
    )
    cache = tmp_path / "task.safetensors"
    with encoder:
        encoded = encode_cached(PromptSet(PROMPTS), encoder, name, "blurry", cache)
    assert encoder.pipe is None  # freed on exit

    ref_embeds, ref_pooled = reference_encode(family, folder, PROMPTS + ["blurry"])
    stored = load_file(str(cache))
    assert stored["embeds"].shape == (len(PROMPTS), family.text_tokens(MSL), 32)  # SD3: CLIP's 77 before T5's
    assert stored["embeds"].dtype == torch.float32
    # Batches of 3 vs one batch of 5: the same up to float32 summation order.
    last = None if ref_pooled is None else ref_pooled[:-1]
    assert_same_text(stored["embeds"], stored["pooled"], ref_embeds[:-1], last)
    last = None if ref_pooled is None else ref_pooled[-1:]
    assert_same_text(stored["negative_embeds"], stored["negative_pooled"], ref_embeds[-1:], last)
    torch.testing.assert_close(encoded.embeds, stored["embeds"])

    # A cache hit never loads the encoders.
    again, name_again = pipeline_encoder(
        ModelConfig(family=family.name, path=str(folder)),
        family,
        PromptsConfig(max_sequence_length=MSL, encode_batch_size=3),
    )
    assert name_again == name
    encode_cached(PromptSet(PROMPTS), again, name_again, "blurry", cache)
    assert again.pipe is None


def test_cache_name_tracks_model_and_length(tiny_pipelines, tmp_path):
    sd3 = ModelConfig(family="sd3", path=str(tiny_pipelines["sd3"]))
    _, name = pipeline_encoder(sd3, SD3, PromptsConfig(max_sequence_length=MSL))
    _, longer = pipeline_encoder(sd3, SD3, PromptsConfig(max_sequence_length=MSL + 1))
    _, default = pipeline_encoder(sd3, SD3)
    assert str(tiny_pipelines["sd3"].resolve()) in name and f"msl{MSL}" in name and "msl256" in default
    assert len({name, longer, default}) == 3

    # Another model at the same path: the fingerprint (configs + weight sizes) changes the name.
    config_file = tiny_pipelines["sd3"] / "text_encoder_3" / "config.json"
    original = config_file.read_text()
    try:
        config_file.write_text(json.dumps({**json.loads(original), "dropout_rate": 0.2}))
        assert pipeline_encoder(sd3, SD3, PromptsConfig(max_sequence_length=MSL))[1] != name
    finally:
        config_file.write_text(original)


@pytest.mark.parametrize("how", ["close", "drop"])
def test_encoders_are_freed(tiny_pipelines, how):
    """close() (or `with`), or merely dropping the encoder as the trainer does: the weights go at once, without
    waiting for the garbage collector's next cycle."""
    encoder = PipelineTextEncoder(tiny_pipelines["sd3"], SD3, max_sequence_length=MSL)
    encoder(["a cat"])
    t5 = weakref.ref(encoder.pipe.text_encoder_3)
    gc.disable()
    try:
        if how == "close":
            encoder.close()
        else:
            del encoder
        assert t5() is None
    finally:
        gc.enable()


def test_wrong_folder_errors(tiny_pipelines, tmp_path):
    with pytest.raises(ConfigError, match="StableDiffusion3Pipeline pipeline but model.family is 'flux'"):
        pipeline_encoder(ModelConfig(family="flux", path=str(tiny_pipelines["sd3"])), FLUX)
    with pytest.raises(ConfigError, match="no model_index.json"):
        pipeline_encoder(ModelConfig(family="sd3", path=str(tiny_pipelines["sd3"] / "transformer")), SD3)
    with pytest.raises(ConfigError, match="encode_batch_size"):
        pipeline_encoder(
            ModelConfig(family="sd3", path=str(tiny_pipelines["sd3"])), SD3, PromptsConfig(encode_batch_size=0)
        )


def test_trainer_round_with_pipeline_encoder(tiny_pipelines, tmp_path):
    """One round of the real trainer on the tiny pipeline: transformer and text encoders from model.path, the
    teacher the same folder's transformer (layout `full`)."""
    from opd_fast.trainer import Trainer

    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS) + "\n")
    cfg = config_from_dict(
        {
            "model": {"family": "sd3", "path": str(tiny_pipelines["sd3"])},
            "student": {"lora": {"rank": 2, "alpha": 4}},
            "tasks": [
                {
                    "name": "pick",
                    "prompts": str(prompt_file),
                    "teacher": {"path": str(tiny_pipelines["sd3"]), "format": "full", "guidance": 4.5},
                }
            ],
            "prompts": {"encoder": "pipeline", "max_sequence_length": MSL, "encode_batch_size": 2},
            "sampling": {"num_steps": 2, "resolution": 64},
            "train": {"rounds": 1, "micro_batch_size": 1},
            "logging": {"tensorboard": False, "progress": False},
            "ema": {"enabled": False},
        }
    )
    out = tmp_path / "run"
    trainer = Trainer.build(cfg, out, device="cpu")
    records = trainer.fit()
    assert len(records) == 1 and records[0]["grad_norm"] is not None

    from safetensors import safe_open

    with safe_open(str(out / "embeddings" / "pick.safetensors"), "pt") as f:
        name = f.metadata()["encoder"]
    assert f"msl{MSL}" in name, "run.encode_task_prompts must pass cfg.prompts to pipeline_encoder"
    cached = load_file(str(out / "embeddings" / "pick.safetensors"))
    ref_embeds, ref_pooled = reference_encode(SD3, tiny_pipelines["sd3"], PROMPTS)
    torch.testing.assert_close(cached["embeds"], ref_embeds)  # prompts.max_sequence_length reached the encoder
    torch.testing.assert_close(cached["pooled"], ref_pooled)
    assert (out / "lora_diffusers" / "pytorch_lora_weights.safetensors").is_file()


@every_family
def test_every_from_pretrained_loads_at_model_dtype(family, tiny_pipelines):
    """model.dtype reaches the transformer, a full teacher and the text encoders, through diffusers' `dtype` keyword:
    `torch_dtype` is deprecated from diffusers 0.40 on (a FutureWarning, which fails here) and goes in 1.0."""
    import warnings

    from opd_fast.config import TeacherConfig
    from opd_fast.models import load_transformer
    from opd_fast.teachers import load_teacher

    folder = tiny_pipelines[family.name]
    model_cfg = ModelConfig(family=family.name, path=str(folder), dtype="bfloat16")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        transformer = load_transformer(model_cfg, family)
        teacher = load_teacher("t", TeacherConfig(path=str(folder), format="full"), transformer, family).model
        pipe = PipelineTextEncoder(folder, family, torch.bfloat16, "cpu").load()
    modules = [transformer, teacher] + [getattr(pipe, c) for c in family.text_components if "encoder" in c]
    # (a model's _keep_in_fp32_modules stay fp32 by design: Wan's time embedder, norms and modulation tables)
    kept = [(m, set(getattr(m, "_keep_in_fp32_modules", None) or ())) for m in modules]
    dtypes = {p.dtype for m, keep in kept for n, p in m.named_parameters() if not keep & set(n.split("."))}
    assert dtypes == {torch.bfloat16}
