"""Config loading/overrides, the official-defaults config, prompt sets, the embedding cache, the tiny world."""

import dataclasses
import inspect

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file

from opd_fast.config import ConfigError, apply_override, load_config
from opd_fast.prompts import BuiltinTextEncoder, encode_cached, read_prompts


def test_overrides_reach_nested_keys_and_list_items():
    cfg = load_config(
        ROOT / "configs" / "tiny.yaml",
        ["train.rounds=7", "tasks.0.teacher.guidance=2.5", "optimizer.betas=[0.8, 0.9]", "student.guidance=null"],
    )
    assert cfg.train.rounds == 7 and cfg.tasks[0].teacher.guidance == 2.5
    assert cfg.optimizer.betas == [0.8, 0.9] and cfg.student.guidance is None
    assert cfg.tasks[0].prompts == str(ROOT / "configs" / "tiny" / "prompts" / "geneval.jsonl")  # relative to the file
    with pytest.raises(ConfigError, match=r"tasks\.5 is not an index of a list of 3"):
        apply_override({"tasks": [{}, {}, {}]}, "tasks.5.name=x")
    with pytest.raises(ConfigError, match="expects key=value"):
        apply_override({}, "train.rounds")


def test_sd35m_mopd_reproduces_the_official_defaults():
    cfg = load_config(ROOT / "configs" / "sd35m_mopd.yaml")
    assert (cfg.model.family, cfg.model.dtype, cfg.sampling.resolution, cfg.sampling.num_steps) == (
        "sd3",
        "bfloat16",
        512,
        10,
    )
    assert cfg.sampling.noise_level == 0.0 and cfg.sampling.timestep_fraction == 0.99
    assert cfg.sampling.shift is None  # the model's scheduler config: SD3.5's shift 3.0 (tests/test_schedule.py)
    assert cfg.student.guidance == 4.5 and [t.teacher.guidance for t in cfg.tasks] == [1.0, 4.5, 4.5]
    lora = cfg.student.lora
    assert (lora.rank, lora.alpha, lora.init) == (32, 64, "gaussian")
    assert sorted(lora.targets) == sorted(
        [
            "attn.to_q",
            "attn.to_k",
            "attn.to_v",
            "attn.to_out.0",
            "attn.add_q_proj",
            "attn.add_k_proj",
            "attn.add_v_proj",
            "attn.to_add_out",
        ]
    )
    opt = cfg.optimizer
    assert (opt.lr, opt.betas, opt.weight_decay, opt.eps, opt.max_grad_norm) == (3e-4, [0.9, 0.999], 1e-4, 1e-8, 1.0)
    assert (cfg.train.micro_batch_size, cfg.train.micro_batches_per_task, len(cfg.tasks)) == (3, 1, 3)
    assert (cfg.ema.enabled, cfg.ema.decay, cfg.ema.update_every) == (True, 0.9, 8)
    with pytest.raises(ConfigError, match="prompts.encoder: 'pipeline' needs model.path"):
        load_config(ROOT / "configs" / "sd35m_mopd.yaml", ["model.path=null", "model.preset=sd3.5-medium"])


def test_every_config_key_is_read_somewhere():
    """A config key that nothing reads is a bug: each leaf field name appears in the package outside config.py, or
    in the config's derived values (RunConfig.trained_steps)."""
    from opd_fast.config import RunConfig

    sources = "\n".join(p.read_text() for p in (ROOT / "opd_fast").rglob("*.py") if p.name != "config.py")
    sources += inspect.getsource(RunConfig.trained_steps)

    def leaves(cls):
        for f in dataclasses.fields(cls):
            tp = cls.__annotations__[f.name]
            nested = getattr(__import__("opd_fast.config", fromlist=[tp]), tp, None) if isinstance(tp, str) else None
            if nested is not None and dataclasses.is_dataclass(nested):
                yield from leaves(nested)
            else:
                yield f.name

    unread = [name for name in leaves(RunConfig) if f".{name}" not in sources]
    assert not unread, unread


def test_prompt_files_txt_and_jsonl():
    txt = read_prompts(ROOT / "configs" / "tiny" / "prompts" / "ocr.txt")
    assert len(txt) == 16 and txt.prompts[0] == 'a sign that says "open"'
    jsonl = read_prompts(ROOT / "configs" / "tiny" / "prompts" / "geneval.jsonl")
    assert jsonl.prompts[0] == "a photo of 1 red cat"
    assert jsonl.metadata[0] == {"tag": "counting_color", "include": [{"class": "cat", "count": 1, "color": "red"}]}


def test_builtin_encoder_is_deterministic_and_word_sensitive():
    enc = BuiltinTextEncoder(32, 16, 8)
    a, pa = enc.encode(["a red cat", "a blue cat", ""])
    b, _ = BuiltinTextEncoder(32, 16, 8).encode(["a red cat", "a blue cat", ""])
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a[0], a[1]) and torch.equal(a[0, 0], a[1, 0])  # differ at "red"/"blue" only
    assert a[2].abs().sum() == 0 and pa[2].abs().sum() == 0  # the empty prompt is all padding


def test_embedding_cache_is_written_once_and_invalidated_by_new_prompts(tmp_path):
    prompts = read_prompts(ROOT / "configs" / "tiny" / "prompts" / "ocr.txt")
    enc = BuiltinTextEncoder(32, 16, 8)
    calls = []

    def counting(texts):
        calls.append(len(texts))
        return enc.encode(texts)

    first = encode_cached(prompts, counting, "builtin", "", tmp_path / "ocr.safetensors")
    second = encode_cached(prompts, counting, "builtin", "", tmp_path / "ocr.safetensors")
    assert calls == [16, 1]  # prompts + negative, once
    torch.testing.assert_close(first.embeds, second.embeds, rtol=0, atol=0)
    assert set(load_file(str(tmp_path / "ocr.safetensors"))) == {
        "embeds",
        "pooled",
        "negative_embeds",
        "negative_pooled",
    }
    prompts.prompts[0] = "another prompt"
    encode_cached(prompts, counting, "builtin", "", tmp_path / "ocr.safetensors")
    assert calls == [16, 1, 16, 1]


def test_tiny_world_files_are_up_to_date(tmp_path):
    """configs/tiny is what `opd-fast tiny-world` writes today (the seeded teachers and prompt files)."""
    from opd_fast.tiny_world import write_tiny_world

    write_tiny_world(tmp_path)
    shipped = ROOT / "configs" / "tiny"
    for fresh in sorted(p for p in tmp_path.rglob("*") if p.is_file()):
        rel = fresh.relative_to(tmp_path)
        assert (shipped / rel).is_file(), rel
        if fresh.suffix == ".safetensors":
            a, b = load_file(str(fresh)), load_file(str(shipped / rel))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rel
        elif fresh.suffix != ".json":
            assert fresh.read_text() == (shipped / rel).read_text(), rel
