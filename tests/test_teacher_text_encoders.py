"""Teachers with text encoders of their own (issue 26 item 2): a full-model teacher whose pipeline folder holds other
text encoders than the student's (here: a wider T5 / UMT5 and a transformer that takes that width) is conditioned by
embeddings of its own encoders, cached once per distinct text-encoder set, while the student keeps its own; a
teacher whose encoders cannot be found is an error naming it."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import run_family, video_overrides
from tiny_pipeline import one_thread, t5_model, t5_tokenizer, umt5_model  # noqa: F401  (one_thread: autouse)

from opd_fast.config import ConfigError, ModelConfig, config_from_dict
from opd_fast.families import get_family
from opd_fast.models import init_output_layer, load_transformer
from opd_fast.teachers import TeacherError
from opd_fast.trainer import Trainer

PROMPTS = ["a red cat", "the blue dog", 'a sign that says "hi"', "a photo of the cat"]
MSL = 8
WIDE = 48  # the teacher's text width; the tiny students' is 32
# the text width of the transformer, and the text encoder that gives it: the family's T5 (SD3's third encoder, Wan's)
TEXT_KEY = {"wan": "text_dim", "sd3": "joint_attention_dim"}
TEXT_ENCODER = {"wan": ("text_encoder", umt5_model), "sd3": ("text_encoder_3", t5_model)}


def wide_transformer(family, seed: int, **changes):
    """The family's tiny transformer taking text of width WIDE (and `changes`), seeded."""
    kwargs = {**family.presets[family.tiny_preset], TEXT_KEY[family.name]: WIDE, **changes}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = family.transformer_class(**kwargs)
        init_output_layer(family.output_layer(model))
    return model


def wide_pipeline(src, dst, family, seed: int = 7, encoder_seed: int = 11, **changes):
    """A copy of the tiny pipeline `src` (same VAE, scheduler, tokenizers) whose T5 is WIDE wide and whose
    transformer takes that width: another model of the family on the student's latent space, with text encoders
    of its own."""
    shutil.copytree(src, dst)
    component, make = TEXT_ENCODER[family.name]
    shutil.rmtree(dst / "transformer")
    wide_transformer(family, seed, **changes).save_pretrained(dst / "transformer")
    shutil.rmtree(dst / component)
    make(t5_tokenizer(), encoder_seed, d_model=WIDE).save_pretrained(dst / component)
    return dst


def run_config(root, family, folder, teachers: list[dict], **extra) -> dict:
    (root / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    raw = {
        "model": {"family": family.name, "path": str(folder)},
        "student": {"guidance": 4.0, "lora": {"rank": 4, "alpha": 8, "targets": list(family.lora_targets)}},
        "tasks": [
            {"name": f"t{i}", "prompts": str(root / "p.txt"), "teacher": {"format": "full", "guidance": 4.0, **t}}
            for i, t in enumerate(teachers)
        ],
        "prompts": {"encoder": "pipeline", "max_sequence_length": MSL, "negative_prompt": "blurry"},
        "sampling": {"num_steps": 3, "resolution": 32, **video_overrides(family)},
        "optimizer": {"lr": 3e-2},
        "train": {"rounds": 2, "micro_batch_size": 2},
        "logging": {"progress": False, "tensorboard": False},
    }
    for key, value in extra.items():
        raw.setdefault(key, {}).update(value)
    return raw


def pipeline_encode(family, folder, prompts):
    """The teacher's own pipeline's encode_prompt (through the family, as the embedding cache calls it), on the
    whole list at once."""
    pipe = family.pipeline_class.from_pretrained(folder, transformer=None, vae=None, local_files_only=True)
    with torch.no_grad():
        return family.encode_prompt(pipe, prompts, "cpu", MSL)


def record_teacher_conditioning(teacher) -> list:
    """Wrap the teacher's velocity so that every call's text conditioning is kept."""
    seen, velocity = [], teacher.velocity

    def recording(family, x, sigma, cond):
        seen.append(cond)
        return velocity(family, x, sigma, cond)

    teacher.velocity = recording
    return seen


@pytest.mark.parametrize("name", ["wan", "sd3"])
def test_a_teacher_is_conditioned_by_its_own_text_encoders(name, tiny_pipelines, tmp_path):
    """The teacher's cached embeddings (prompts and negative prompt) are its own pipeline's encode_prompt; at every
    step it visits, it gets exactly the rows of the micro-batch's prompts from them, while the student gets its
    own (width 32)."""
    family = run_family(get_family(name))
    folder = tiny_pipelines[name]
    teacher_folder = wide_pipeline(folder, tmp_path / "wide", family)
    raw = run_config(tmp_path, family, folder, [{"path": str(teacher_folder / "transformer")}])
    trainer = Trainer.build(config_from_dict(raw), tmp_path / "run", device="cpu")
    own = trainer.teacher_prompts["t0"]
    embeds, second = pipeline_encode(family, teacher_folder, PROMPTS)
    negative, negative_second = pipeline_encode(family, teacher_folder, ["blurry"])
    torch.testing.assert_close(own.embeds, embeds.float())
    torch.testing.assert_close(own.pooled, second.float())
    torch.testing.assert_close(own.negative_embeds, negative.float())
    torch.testing.assert_close(own.negative_pooled, negative_second.float())
    assert own.embeds.shape[-1] == WIDE and trainer.prompts["t0"].embeds.shape[-1] == 32
    student_embeds, _ = pipeline_encode(family, folder, PROMPTS)
    torch.testing.assert_close(trainer.prompts["t0"].embeds, student_embeds.float())

    seen = record_teacher_conditioning(trainer.teachers["t0"])
    rows = trainer.batch_indices(trainer.round, 0)[:2]
    trainer.train_round(step=False)
    assert len(seen) == trainer.num_trained["t0"]  # one teacher call per trained step, no more
    for cond in seen:
        torch.testing.assert_close(cond.prompt_embeds, own.embeds[rows])
        torch.testing.assert_close(cond.pooled, own.pooled[rows])
        torch.testing.assert_close(cond.negative_embeds, own.negative_embeds)


def test_two_teachers_with_their_own_text_encoders_train_and_share_one_cache_entry(tiny_pipelines, tmp_path):
    """Two Wan teachers of another size in two pipeline folders holding the same text encoders (a wider UMT5):
    one text-encoder set, so one cache entry per task beside the student's; the run (task batching, the
    cross-task student batch) trains and the loss falls. A third teacher given by its transformer folder alone,
    with `teacher.pipeline` naming the folder of its text encoders, joins the same set."""
    family = run_family(get_family("wan"))
    folder = tiny_pipelines["wan"]
    first = wide_pipeline(folder, tmp_path / "first", family, seed=7, num_layers=3)
    second = wide_pipeline(folder, tmp_path / "second", family, seed=8)
    lone = tmp_path / "lone"
    wide_transformer(family, 9).save_pretrained(lone)
    teachers = [
        {"path": str(first / "transformer")},
        {"path": str(second / "transformer")},
        {"path": str(lone), "pipeline": str(second)},
    ]
    raw = run_config(
        tmp_path, family, folder, teachers, train={"rounds": 5, "task_batching": True}, optimizer={"lr": 5e-2}
    )
    trainer = Trainer.build(config_from_dict(raw), tmp_path / "run", device="cpu")
    assert all(t.text_pipeline is not None for t in trainer.teachers.values())
    cache = tmp_path / "run" / "embeddings"
    sets = sorted(p.name for p in cache.iterdir() if p.is_dir())
    assert len(sets) == 1 and sets[0].startswith("text-"), sets
    assert sorted(p.name for p in (cache / sets[0]).iterdir()) == ["t0.safetensors", "t1.safetensors", "t2.safetensors"]
    assert sorted(p.name for p in cache.glob("*.safetensors")) == ["t0.safetensors", "t1.safetensors", "t2.safetensors"]
    records = trainer.fit()
    trainer.round = 0  # round 0's prompts and noise again, measured after training (no step)
    after = trainer.train_round(step=False).loss
    assert after < 0.95 * records[0]["loss"], (records[0]["loss"], after)

    # `opd-fast sample --model teacher:t2` conditions the teacher by its own text encoders (teacher.pipeline)
    from opd_fast.evaluate.sample import SampleSettings, sample
    from opd_fast.prompts import PromptSet

    settings = SampleSettings(model="teacher:t2", num_steps=2)
    out = sample(trainer.cfg, PromptSet(PROMPTS[:1]), tmp_path / "s", settings, tmp_path / "run")
    assert (out / "images" / "00000.png").is_file()

    # a second run on the same cache reads the entries instead of encoding again (the text encoders never load)
    raw["prompts"]["cache_dir"] = str(cache)
    raw["train"]["rounds"] = 1
    from opd_fast import text_encoders

    loads = []
    original = text_encoders.PipelineTextEncoder.load
    text_encoders.PipelineTextEncoder.load = lambda self: loads.append(self.path) or original(self)
    try:
        Trainer.build(config_from_dict(raw), tmp_path / "run2", device="cpu")
    finally:
        text_encoders.PipelineTextEncoder.load = original
    assert loads == []


def test_builtin_encoder_gives_a_teacher_of_another_text_width_its_own_set(tmp_path):
    """prompts.encoder builtin (no pipeline anywhere): a full teacher of another text width gets the built-in
    encoding at its own widths."""
    family = run_family(get_family("wan"))
    wide_transformer(family, 3).save_pretrained(tmp_path / "teacher")
    raw = run_config(tmp_path, family, None, [{"path": str(tmp_path / "teacher")}], prompts={"encoder": "builtin"})
    raw["model"] = {"family": "wan", "preset": "tiny-wan"}
    trainer = Trainer.build(config_from_dict(raw), tmp_path / "run", device="cpu")
    assert trainer.teacher_prompts["t0"].embeds.shape[-1] == WIDE and trainer.prompts["t0"].embeds.shape[-1] == 32
    assert trainer.fit()[-1]["loss"] > 0


def test_a_teacher_whose_text_encoders_cannot_be_found_is_an_error(tiny_pipelines, tmp_path):
    family = run_family(get_family("wan"))
    folder = tiny_pipelines["wan"]
    lone = tmp_path / "lone"
    wide_transformer(family, 9).save_pretrained(lone)

    def build(teacher: dict, tag: str):
        raw = run_config(tmp_path, family, folder, [teacher])
        return Trainer.build(config_from_dict(raw), tmp_path / f"run_{tag}", device="cpu")

    # a transformer folder of another text width, in no pipeline folder and without teacher.pipeline
    with pytest.raises(TeacherError, match=r"teacher of task 't0'.*text encoders cannot be found.*not in a diffusers"):
        build({"path": str(lone)}, "lone")
    # teacher.pipeline naming a folder that holds the student's text encoders
    with pytest.raises(TeacherError, match=r"cannot be found.*teacher\.pipeline .* holds the student's"):
        build({"path": str(lone), "pipeline": str(folder)}, "same")
    # a pipeline folder without the text encoder
    bare = wide_pipeline(folder, tmp_path / "bare", family)
    shutil.rmtree(bare / "text_encoder")
    with pytest.raises(TeacherError, match=r"teacher of task 't0'.*text encoders cannot be found.*no text_encoder"):
        build({"path": str(bare / "transformer")}, "bare")
    # teacher.pipeline that is no pipeline folder, or one of another family
    with pytest.raises(TeacherError, match=r"teacher of task 't0'.*teacher\.pipeline: .*no model_index\.json"):
        build({"path": str(lone), "pipeline": str(lone)}, "nopipe")
    with pytest.raises(TeacherError, match=r"teacher\.pipeline: .*StableDiffusion3Pipeline.*expects WanPipeline"):
        build({"path": str(lone), "pipeline": str(tiny_pipelines["sd3"])}, "sd3")
    # teacher.pipeline whose text encoders do not give the width its transformer takes
    from transformers import UMT5Config, UMT5EncoderModel

    narrow = wide_pipeline(folder, tmp_path / "narrow", family)
    shutil.rmtree(narrow / "text_encoder")
    tokenizer = t5_tokenizer()
    # not tiny_parts.umt5_model: its config is the student's own, i.e. the student's text-encoder set, which takes
    # the other path (no set of its own); this one differs in shape but not in width
    narrow_config = UMT5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=96,
        num_layers=1,
        num_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    UMT5EncoderModel(narrow_config).save_pretrained(narrow / "text_encoder")
    with pytest.raises(TeacherError, match=r"teacher of task 't0'.*width \(32, 0\).*takes \(48, 0\)"):
        build({"path": str(lone), "pipeline": str(narrow)}, "narrow")
    # a LoRA teacher has no pipeline of its own: refused when the config loads
    raw = run_config(tmp_path, family, folder, [{"path": str(lone), "pipeline": str(narrow), "format": "peft"}])
    with pytest.raises(ConfigError, match=r"tasks\.0\.teacher\.pipeline: a peft LoRA teacher"):
        config_from_dict(raw)


def test_a_teacher_sharing_the_students_text_encoders_shares_its_embeddings(tiny_pipelines, tmp_path):
    """Another size with the same encoders (SD3.5-Large teaching -Medium): no set of its own, nothing cached twice."""
    family = run_family(get_family("wan"))
    folder = tiny_pipelines["wan"]
    large = load_transformer(ModelConfig(family="wan", preset="tiny-wan-large"), family)
    teacher = tmp_path / "large"
    shutil.copytree(folder, teacher)
    shutil.rmtree(teacher / "transformer")
    large.save_pretrained(teacher / "transformer")
    raw = run_config(tmp_path, family, folder, [{"path": str(teacher / "transformer"), "pipeline": str(teacher)}])
    trainer = Trainer.build(config_from_dict(raw), tmp_path / "run", device="cpu")
    assert trainer.teachers["t0"].text_pipeline is None and trainer.teacher_prompts == {}
    assert not [p for p in (tmp_path / "run" / "embeddings").iterdir() if p.is_dir()]
