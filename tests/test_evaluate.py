"""Sampling through the real pipeline of every model family (opd_fast.evaluate.sample), the reward adapters
(rewards.py, geneval.py) on tiny random CLIPs, and `opd-fast sample` / `opd-fast eval` end to end on a tiny SD3
pipeline folder."""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_family, video_overrides
from PIL import Image
from tiny_pipeline import one_thread, write_tiny_clip, write_tiny_pipeline  # noqa: F401  (one_thread: autouse)

from opd_fast.config import ConfigError, config_from_dict
from opd_fast.evaluate import geneval as G
from opd_fast.evaluate.base import RewardError
from opd_fast.evaluate.registry import REWARDS, build_reward
from opd_fast.evaluate.rewards import edit_distance, ocr_reward
from opd_fast.evaluate.sample import SampleSettings, sample
from opd_fast.families import FAMILIES, get_family
from opd_fast.prompts import PromptSet

PROMPTS = ["a photo of the cat", "a red dog", 'a sign that says "hi"']


def sampling_world(root: Path, family) -> dict:
    """A tiny pipeline of `family` and a run folder with an exported student LoRA (and run.json), whose task's
    teacher is that same LoRA file."""
    from peft import LoraConfig

    from opd_fast.checkpoint import export_diffusers_lora
    from opd_fast.models import load_transformer

    pipeline = write_tiny_pipeline(root / family.name, family)
    (root / "pick.txt").write_text("\n".join(PROMPTS) + "\n")
    cfg = config_from_dict(
        {
            "model": {"family": family.name, "path": str(pipeline)},
            "tasks": [
                {
                    "name": "pick",
                    "prompts": str(root / "pick.txt"),
                    "teacher": {"path": str(root / "run" / "lora_diffusers"), "guidance": 2.0},
                }
            ],
            "prompts": {"encoder": "pipeline", "max_sequence_length": 8},
            "sampling": {"resolution": 64, **video_overrides(family)},
        }
    )
    student = load_transformer(cfg.model, family)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(family.lora_targets))
    student.add_adapter(config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    export_diffusers_lora(student, config, family, root / "run" / "lora_diffusers")
    (root / "run" / "run.json").write_text(json.dumps({"config": cfg.to_dict()}))
    return {"root": root, "cfg": cfg, "run": root / "run"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The SD3 sampling world (sampling_world) and a tiny CLIP."""
    root = tmp_path_factory.mktemp("eval")
    return {**sampling_world(root, get_family("sd3")), "clip": write_tiny_clip(root / "clip")}


@pytest.fixture(scope="module", params=[run_family(f) for f in FAMILIES.values()], ids=list(FAMILIES))
def family_world(request, tmp_path_factory):
    """The sampling world of every registered family."""
    return sampling_world(tmp_path_factory.mktemp(f"eval_{request.param.name}"), request.param)


def pixels(folder, i: int) -> np.ndarray:
    return np.asarray(Image.open(folder / "images" / f"{i:05d}.png")).astype(int)


# -- sampling --------------------------------------------------------------------------------------------------------


def test_sampling_is_seeded_per_prompt(family_world, tmp_path):
    cfg = family_world["cfg"]
    a = sample(cfg, PromptSet(PROMPTS), tmp_path / "a", SampleSettings(model="base", num_steps=2, batch_size=2))
    b = sample(
        cfg, PromptSet(PROMPTS[1:]), tmp_path / "b", SampleSettings(model="base", num_steps=2, batch_size=1, seed=1)
    )
    # Image 1 of `a` (seed 0 + 1) is image 0 of `b` (seed 1 + 0): same prompt, same seed, other batch.
    assert np.abs(pixels(a, 1) - pixels(b, 0)).max() <= 1
    assert np.abs(pixels(a, 1) - pixels(a, 2)).max() > 10  # other prompt and seed: another image
    records = [json.loads(line) for line in (a / "samples.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in records] == [0, 1, 2] and records[2]["prompt"] == PROMPTS[2]
    width, height = Image.open(a / "images" / "00000.png").size  # 64 px (a video: its frames side by side)
    assert Image.open(a / "grid.png").size == (2 * width, 2 * height) and height == 64  # 3 images on a 2x2 grid
    settings = json.loads((a / "sample.json").read_text())
    assert settings["extra"]["guidance"] == 4.5 and settings["extra"]["weights"] == "base"


def test_student_lora_loads_at_full_strength(family_world, tmp_path):
    """The student through diffusers' load_lora_weights equals the same LoRA file merged by our teacher loader
    (whose equality with diffusers' own fuse is tests/test_teachers.py): alpha/r = 2 survives the export."""
    cfg, run = family_world["cfg"], family_world["run"]
    settings = dict(num_steps=2, batch_size=3, guidance=2.0)
    student = sample(cfg, PromptSet(PROMPTS), tmp_path / "s", SampleSettings(model="student", **settings), run)
    teacher = sample(cfg, PromptSet(PROMPTS), tmp_path / "t", SampleSettings(model="teacher:pick", **settings))
    base = sample(cfg, PromptSet(PROMPTS), tmp_path / "b", SampleSettings(model="base", **settings))
    for i in range(3):
        assert np.abs(pixels(student, i) - pixels(teacher, i)).max() <= 1
        assert np.abs(pixels(student, i) - pixels(base, i)).max() > 3  # > rounding (1); tiny Qwen-Image VAE: 6
    assert json.loads((teacher / "sample.json").read_text())["extra"]["guidance"] == 2.0


def test_sampling_inputs_and_metadata(family_world, tmp_path):
    """The pipeline takes the family's sampling inputs at a guidance (FLUX: its guidance embedding, no negative
    branch; SD3: CFG with the negative prompt), the same images in any batch; metadata flows into samples.jsonl."""
    cfg = family_world["cfg"]
    prompts = PromptSet(PROMPTS[:2], [{"tag": "a"}, {"tag": "b"}])
    a = sample(cfg, prompts, tmp_path / "a", SampleSettings(model="base", num_steps=2, batch_size=2, guidance=3.5))
    b = sample(cfg, prompts, tmp_path / "b", SampleSettings(model="base", num_steps=2, batch_size=1, guidance=3.5))
    assert np.abs(pixels(a, 1) - pixels(b, 1)).max() <= 1
    records = [json.loads(line) for line in (a / "samples.jsonl").read_text().splitlines()]
    assert [r["metadata"]["tag"] for r in records] == ["a", "b"]


def test_sampling_errors(world, tmp_path):
    cfg = world["cfg"]
    with pytest.raises(ConfigError, match="no exported student.*lora_diffusers_ema.*EMA disabled"):
        sample(cfg, PromptSet(PROMPTS), tmp_path / "x", SampleSettings(model="ema"), world["run"])
    with pytest.raises(ConfigError, match="no task 'ocr'"):
        sample(cfg, PromptSet(PROMPTS), tmp_path / "x", SampleSettings(model="teacher:ocr"))
    with pytest.raises(ConfigError, match="needs model.path"):
        sample(
            config_from_dict({"tasks": cfg.to_dict()["tasks"]}), PromptSet(PROMPTS), tmp_path / "x", SampleSettings()
        )


# -- rewards ---------------------------------------------------------------------------------------------------------


def random_images(n: int, seed: int = 0, size: int = 48) -> list:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def clip_reference(folder, images, prompts) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits_per_image diagonal, logit scale) from CLIPModel's own forward: the independent reference."""
    from transformers import AutoProcessor, CLIPModel

    model, processor = CLIPModel.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)
    inputs = processor(text=prompts, images=images, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits_per_image
    return logits.diagonal(), model.logit_scale.exp()


def test_pickscore_and_clipscore_match_clip_forward(world):
    images, prompts = random_images(3), PROMPTS
    logits, scale = clip_reference(world["clip"], images, prompts)
    pick = build_reward("pickscore", model=str(world["clip"]), device="cpu", batch_size=2)
    torch.testing.assert_close(torch.tensor(pick.score(images, prompts, [])), logits / 26)
    clip = build_reward("clipscore", model=str(world["clip"]), device="cpu")
    torch.testing.assert_close(torch.tensor(clip.score(images, prompts, [])), (100 * logits / scale).clamp(min=0))


def test_aesthetic_head(world, tmp_path):
    """The LAION head layout (layers.0/2/4/6/7, no activations) from a .pth of plain tensors."""
    from transformers import AutoProcessor, CLIPModel

    g = torch.Generator().manual_seed(0)
    dims = [16, 32, 8, 8, 4, 1]
    state = {}
    for index, (fan_in, fan_out) in zip([0, 2, 4, 6, 7], itertools.pairwise(dims)):
        state[f"layers.{index}.weight"] = torch.randn(fan_out, fan_in, generator=g)
        state[f"layers.{index}.bias"] = torch.randn(fan_out, generator=g)
    torch.save(state, tmp_path / "head.pth")
    reward = build_reward("aesthetic", model=str(world["clip"]), head=str(tmp_path / "head.pth"), device="cpu")
    images = random_images(2, seed=1)
    model, processor = CLIPModel.from_pretrained(world["clip"]), AutoProcessor.from_pretrained(world["clip"])
    with torch.no_grad():
        out = model.get_image_features(**processor(images=images, return_tensors="pt"))
        h = out if isinstance(out, torch.Tensor) else out.pooler_output
        h = h / h.norm(dim=-1, keepdim=True)
        for index in [0, 2, 4, 6, 7]:
            h = h @ state[f"layers.{index}.weight"].T + state[f"layers.{index}.bias"]
    torch.testing.assert_close(torch.tensor(reward.score(images, ["", ""], [])), h[:, 0])

    torch.save({"layers.0.weight": torch.zeros(1, 768), "layers.0.bias": torch.zeros(1)}, tmp_path / "l14.pth")
    with pytest.raises(RewardError, match="the head maps 768 -> 1 but the CLIP embeds 16"):
        build_reward("aesthetic", model=str(world["clip"]), head=str(tmp_path / "l14.pth"))


@pytest.mark.parametrize("module, sibling", [("geneval", "rewards"), ("rewards", "geneval")])
def test_reward_modules_stand_alone_and_the_registry_knows_every_reward(module, sibling):
    """A fresh interpreter (this session's imports would hide a missing one): each reward module loads without the
    other, and importing the registry afterwards makes every reward known."""
    code = (
        f"import sys, opd_fast.evaluate.{module}\n"
        f"print('opd_fast.evaluate.{sibling}' in sys.modules)\n"
        "from opd_fast.evaluate.registry import REWARDS\n"
        "print(sorted(REWARDS))\n"
    )
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    sibling_loaded, known = run.stdout.splitlines()
    assert sibling_loaded == "False"
    assert known == str(
        ["aesthetic", "clipscore", "demo", "geneval", "hpsv2", "imagereward", "ocr", "pickscore", "remote"]
    )


def test_reward_errors(world, tmp_path):
    with pytest.raises(RewardError, match="unknown reward 'hps'"):
        build_reward("hps")
    with pytest.raises(RewardError, match=r"reward 'pickscore': unknown option\(s\) \['modle'\]"):
        build_reward("pickscore", modle=str(world["clip"]))
    with pytest.raises(RewardError, match="reward 'clipscore': model .* not found .*local files only"):
        build_reward("clipscore", model=str(tmp_path / "nope"))
    with pytest.raises(RewardError, match="reward 'pickscore': option 'model' is required"):
        build_reward("pickscore")


@pytest.mark.parametrize("name, module", [("hpsv2", "open_clip"), ("imagereward", "ImageReward")])
def test_optional_package_rewards(name, module):
    """Where the package is missing, building the reward says which package and how to install it."""
    import importlib.util

    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed: {name} needs its released checkpoint, which tests cannot build")
    with pytest.raises(RewardError, match=rf"reward '{name}' needs the Python package\(s\) \['{module}'\] \(pip "):
        build_reward(name, checkpoint="x")


def test_hpsv2_with_open_clip(tmp_path):
    open_clip = pytest.importorskip(
        "open_clip",
        reason=(
            "open_clip not installed: `pip install open_clip_torch` resolves, but the torchvision it needs (0.28.0 for "
            "torch 2.13) is a CUDA build that fails to import on torch 2.13.0+cpu (operator torchvision::nms does not "
            "exist)"
        ),
    )
    model = open_clip.create_model("ViT-B-32", pretrained=None)  # the smallest config open_clip ships
    torch.save({"state_dict": model.state_dict()}, tmp_path / "hps.pt")
    reward = build_reward("hpsv2", checkpoint=str(tmp_path / "hps.pt"), model_name="ViT-B-32", device="cpu")
    scores = reward.score(random_images(2), PROMPTS[:2], [])
    assert len(scores) == 2 and all(-1 <= s <= 1 for s in scores)


def test_ocr_reward_rule():
    assert edit_distance("kitten", "sitting") == 3 and edit_distance("", "abc") == 3
    assert ocr_reward("Welcome to the CAFE", "cafe") == 1.0  # contained, case and spaces folded
    assert ocr_reward("hallo", "hello") == pytest.approx(0.8)
    assert ocr_reward("", "hello") == 0.0 and ocr_reward("completely different text", "hi") == 0.0


def test_ocr_with_an_injected_recognizer():
    readings = iter(["OPEN", "0PEN", "nothing"])
    reward = build_reward("ocr", recognizer=lambda image: next(readings))
    prompts = ['a sign that says "OPEN"', 'a sign that says "OPEN"', 'a mug with "tea"']
    assert reward.score(random_images(3), prompts, [{}, {}, {"text": "tea"}]) == pytest.approx([1.0, 0.75, 0.0])
    with pytest.raises(RewardError, match="no quoted text"):
        reward.score(random_images(1), ["a sign"], [{}])


def test_paddleocr_adapter():
    pytest.importorskip(
        "paddleocr",
        reason="paddleocr not installed (pip install paddleocr paddlepaddle; its "
        "det/rec models must be downloaded beforehand)",
    )
    with pytest.raises(RewardError, match="det_model_dir"):
        build_reward("ocr", engine="paddleocr")


# -- GenEval ---------------------------------------------------------------------------------------------------------


def det(x1, y1, x2, y2, score=0.95, mask=None):
    return (np.array([x1, y1, x2, y2, score], dtype=np.float32), mask)


def no_colors(image, objects, name):
    raise AssertionError("no color requirement here")


def test_geneval_rules():
    image = Image.new("RGB", (100, 100))
    single = {"tag": "single_object", "include": [{"class": "cat", "count": 1}]}
    assert G.evaluate(image, G.select_objects({"cat": [det(0, 0, 10, 10, 0.5)]}, "single_object"), single, no_colors)[0]
    assert not G.evaluate(
        image, G.select_objects({"cat": [det(0, 0, 10, 10, 0.2)]}, "single_object"), single, no_colors
    )[0]

    counting = {"tag": "counting", "include": [{"class": "cup", "count": 2}], "exclude": [{"class": "cup", "count": 3}]}
    cups = {"cup": [det(0, 0, 10, 10, 0.95), det(20, 0, 30, 10, 0.92), det(40, 0, 50, 10, 0.5)]}
    assert G.evaluate(image, G.select_objects(cups, "counting"), counting, no_colors)[0]  # 0.5 < 0.9: two cups
    ok, reason = G.evaluate(image, G.select_objects(cups, "two_object"), counting, no_colors)  # 0.3: three
    assert not ok and "expected cup<3, found 3" in reason

    position = {
        "tag": "position",
        "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["left of", 0]}],
    }
    left = {"cat": [det(60, 40, 80, 60)], "dog": [det(0, 40, 20, 60)]}
    right = {"cat": [det(0, 40, 20, 60)], "dog": [det(60, 40, 80, 60)]}
    assert G.evaluate(image, left, position, no_colors)[0]
    ok, reason = G.evaluate(image, right, position, no_colors)
    assert not ok and "expected dog left of target, found right of" in reason
    assert G.relative_position(det(0, 0, 10, 10), det(1, 1, 11, 11)) == set()  # overlapping: no relation

    colors = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}
    cars = {"car": [det(0, 0, 10, 10)]}
    assert G.evaluate(image, cars, colors, lambda im, objs, name: ["red"])[0]
    ok, reason = G.evaluate(image, cars, colors, lambda im, objs, name: ["blue"])
    assert not ok and "expected red car>=1, found 0 red" in reason


def test_geneval_reward_with_injected_detector(world):
    """The adapter end to end: detections from a stand-in detector, colors from a tiny CLIP (masked crops), the
    score per image and GenEval's mean over tags."""
    mask = np.zeros((48, 48), dtype=bool)
    mask[10:30, 10:30] = True
    detections = [{"bench": [det(5, 5, 40, 40)]}, {}, {"car": [det(10, 10, 30, 30, mask=mask)]}]
    calls = iter(detections)
    reward = build_reward("geneval", clip_model=str(world["clip"]), detector=lambda image: next(calls), device="cpu")
    metadata = [
        {"tag": "single_object", "include": [{"class": "bench", "count": 1}]},
        {"tag": "single_object", "include": [{"class": "bench", "count": 1}]},
        {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]},
    ]
    scores = reward.score(random_images(3), ["a bench", "a bench", "a red car"], metadata)
    assert scores[:2] == [1.0, 0.0] and scores[2] in (0.0, 1.0)
    assert reward.colors(random_images(1)[0], detections[2]["car"], "car")[0] in G.COLORS
    assert reward.aggregate([1.0, 0.0, 1.0], metadata) == pytest.approx((0.5 + 1.0) / 2)  # per tag, then mean
    with pytest.raises(RewardError, match="GenEval metadata"):
        reward.score(random_images(1), ["a bench"], [{}])


def test_geneval_mmdet_adapter(world):
    pytest.importorskip(
        "mmdet",
        reason="mmdet not installed (GenEval's detector stack: mmcv-full 1.x + mmdet 2.x "
        "built for the local torch/CUDA; not pip-installable on this CPU torch)",
    )
    with pytest.raises(RewardError, match="detector_config"):
        build_reward("geneval", clip_model=str(world["clip"]))


# -- the command line ------------------------------------------------------------------------------------------------


def run_cli(argv: list[str]) -> int:
    from opd_fast.evaluate.cli import add_subcommands

    parser = argparse.ArgumentParser(prog="opd-fast")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_sample_and_eval_commands(world, tmp_path, capsys, caplog):
    run, clip = world["run"], world["clip"]
    for model in ("student", "base"):
        assert (
            run_cli(
                [
                    "sample",
                    "--run",
                    str(run),
                    "--model",
                    model,
                    "--task",
                    "pick",
                    "--out",
                    str(tmp_path / model),
                    "--limit",
                    "2",
                    "--num-steps",
                    "2",
                    "--batch-size",
                    "2",
                ]
            )
            == 0
        )
    assert sorted(p.name for p in (tmp_path / "student" / "images").iterdir()) == ["00000.png", "00001.png"]
    # model.attention reaches the pipeline's transformer; on a CPU cuDNN's priority list falls through to the kernel
    # torch picks anyway, so the images are the same bytes
    caplog.set_level(logging.INFO, logger="opd_fast.attention")
    assert (
        run_cli(
            [
                "sample",
                "--run",
                str(run),
                "--model",
                "base",
                "--task",
                "pick",
                "--out",
                str(tmp_path / "cudnn"),
                "--limit",
                "2",
                "--num-steps",
                "2",
                "--batch-size",
                "2",
                "--set",
                "model.attention=cudnn",
            ]
        )
        == 0
    )
    assert any(r.name == "opd_fast.attention" and "cudnn" in r.getMessage() for r in caplog.records)
    for name in ("00000.png", "00001.png"):
        assert (tmp_path / "cudnn" / "images" / name).read_bytes() == (tmp_path / "base" / "images" / name).read_bytes()

    torch.save({"layers.0.weight": torch.randn(1, 16), "layers.0.bias": torch.zeros(1)}, tmp_path / "head.pth")
    (tmp_path / "rewards.yaml").write_text(
        json.dumps(
            {
                "rewards": {
                    "pick": [{"name": "pickscore", "model": str(clip)}],
                    "*": [{"name": "aesthetic", "model": str(clip), "head": str(tmp_path / "head.pth")}],
                }
            }
        )
    )
    out = tmp_path / "results"
    assert (
        run_cli(
            [
                "eval",
                f"ours={tmp_path / 'student'}",
                str(tmp_path / "base"),
                "--rewards",
                str(tmp_path / "rewards.yaml"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads((out / "results.json").read_text())
    assert report["columns"] == ["pick/aesthetic", "pick/pickscore"]
    assert set(report["results"]) == {"ours", "base"} and report["results"]["ours"]["pick/pickscore"]["n"] == 2
    table = (out / "results.md").read_text()
    assert table.splitlines()[0] == "| model | pick/aesthetic | pick/pickscore | avg |"
    row = report["results"]["ours"]
    avg = (row["pick/aesthetic"]["score"] + row["pick/pickscore"]["score"]) / 2
    aesthetic, pickscore = row["pick/aesthetic"]["score"], row["pick/pickscore"]["score"]
    assert f"| ours | {aesthetic:.4f} | {pickscore:.4f} | {avg:.4f} |" in table
    scores = [json.loads(line) for line in (out / "scores" / "ours" / "pick.jsonl").read_text().splitlines()]
    assert len(scores) == 2 and math.isfinite(scores[0]["pickscore"])

    assert run_cli(["eval", str(tmp_path / "base"), "--rewards", str(tmp_path / "nope.yaml"), "--out", str(out)]) == 2
    assert "reward spec not found" in capsys.readouterr().err
    assert run_cli(["eval", "--list"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in REWARDS)


def test_wired_into_main_cli(world, tmp_path):
    from opd_fast import cli

    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    if "sample" not in commands:
        pytest.skip("opd_fast.cli does not register opd_fast.evaluate.cli.add_subcommands yet")
    assert (
        cli.main(
            [
                "sample",
                "--run",
                str(world["run"]),
                "--model",
                "base",
                "--task",
                "pick",
                "--out",
                str(tmp_path / "s"),
                "--limit",
                "1",
                "--num-steps",
                "1",
            ]
        )
        == 0
    )
    assert (tmp_path / "s" / "images" / "00000.png").is_file()
    assert cli.main(["eval", "--list"]) == 0
