"""Stage 1 (`opd-fast teach`): Flow-GRPO's advantages and clipped-ratio loss against a hand computation, DiffusionNFT's
loss against a plain per-sample reference, the teach config's checks, and short teach runs on a demo-world model
(the `demo` reward): the on-policy ratio is exactly 1 (fp32 and a bf16 base), the teacher lands in the layout a run
config's teacher reads, and --resume continues."""

import json
import math

import pytest
import torch

from opd_fast.config import ConfigError, TeacherConfig
from opd_fast.demo import flow, world
from opd_fast.stage1 import flow_grpo, nft
from opd_fast.stage1.config import load_teach_config

# -- the math ---------------------------------------------------------------------------------------------------


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 3.0, 0.0, 0.0, 2.0, 4.0])  # groups of 2: (1, 3), (0, 0), (2, 4)
    # group means 2, 0, 3; population stds 1, 0, 1; + 1e-4
    want = torch.tensor([-1 / 1.0001, 1 / 1.0001, 0.0, 0.0, -1 / 1.0001, 1 / 1.0001])
    torch.testing.assert_close(flow_grpo.group_advantages(rewards, 2), want)
    # global std: population std of all six rewards
    std = rewards.std(unbiased=False).item()
    centred = torch.tensor([-1.0, 1.0, 0.0, 0.0, -1.0, 1.0])
    torch.testing.assert_close(flow_grpo.group_advantages(rewards, 2, global_std=True), centred / (std + 1e-4))


def test_clipped_ratio_loss_by_hand():
    log_prob = torch.tensor([0.0, 0.5, -0.5, 0.5, -0.5, 0.0])
    old = torch.zeros(6)
    adv = torch.tensor([2.0, 1.0, 1.0, -1.0, -1.0, 9.0])
    loss, ratio, clipped = flow_grpo.clipped_loss(log_prob, old, adv, clip_range=0.2, adv_clip_max=5.0)
    e = torch.exp(torch.tensor([0.5, -0.5]))
    want = torch.tensor(
        [
            -2.0,  # ratio 1: -A
            -1.0 * 1.2,  # A > 0, ratio e^0.5 > 1.2: clipped, -A * 1.2
            -1.0 * e[1],  # A > 0, ratio e^-0.5 < 0.8: the unclipped term is larger, kept
            1.0 * e[0],  # A < 0, ratio > 1.2: the unclipped term is larger, kept
            1.0 * 0.8,  # A < 0, ratio < 0.8: clipped, -A * 0.8
            -5.0,  # A clipped to adv_clip_max
        ]
    )
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(ratio, torch.exp(log_prob))
    assert clipped.tolist() == [False, True, False, False, True, False]


def test_guard_log_ratio_removes_the_mean_shift():
    """For x' drawn around mu_old, log p - log p_old averages -b; GRPO-Guard adds b back, then scales by sbar."""
    g = torch.Generator().manual_seed(0)
    D, draws, sbar = 16, 20000, 0.3
    mu_old, mu = torch.zeros(D), torch.full((D,), 0.05)
    x = mu_old + sbar * torch.randn(draws, D, generator=g)
    lp_old = -(x - mu_old).pow(2).sum(1) / (2 * sbar**2)
    lp = -(x - mu).pow(2).sum(1) / (2 * sbar**2)
    b = flow_grpo.mean_shift(torch.tensor(1.0), mu[None], mu_old[None], torch.tensor(sbar), "sum")
    assert (lp - lp_old).mean() == pytest.approx(-b.item(), rel=0.1)
    normed = flow_grpo.guard_log_ratio(lp, lp_old, b, torch.tensor(sbar))
    assert abs(normed.mean().item()) < 0.01


def test_nft_loss_against_a_plain_reference():
    g = torch.Generator().manual_seed(1)
    B, shape = 3, (3, 4, 5)
    v, v_old, x0, eps = (torch.randn((B, *shape), generator=g, dtype=torch.float64) for _ in range(4))
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    adv = torch.tensor([-7.0, 0.5, 2.0])
    beta, m = 0.7, 5.0
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    got = nft.nft_loss(v, v_old, x_t, x0, t, nft.optimality(adv, m), beta, m)
    for i in range(B):  # one sample at a time, the formulas as written
        r = min(max((max(min(adv[i].item(), m), -m) / m) / 2 + 0.5, 0.0), 1.0)
        pos = beta * v[i] + (1 - beta) * v_old[i]
        neg = (1 + beta) * v_old[i] - beta * v[i]
        terms = []
        for pred in (pos, neg):
            err = x_t[i] - t[i] * pred - x0[i]
            terms.append((err**2).mean() / max(err.abs().mean().item(), 1e-5))
        want = m * (r * terms[0] + (1 - r) * terms[1]) / beta
        assert got[i].item() == pytest.approx(want.item(), rel=1e-5)
    assert nft.optimality(adv, m).tolist() == pytest.approx([0.0, 0.55, 0.7])


# -- the config -------------------------------------------------------------------------------------------------


def _teach_data(tmp_path, base, method="grpo", **extra):
    prompts = tmp_path / "aesthetic.txt"
    prompts.write_text("a calm sunset\na quiet ocean\n")
    data = {
        "model": {"family": "sd3", "path": str(base), "preset": None},
        "student": {"guidance": None, "lora": {"rank": 4, "alpha": 8}},
        "method": method,
        "task": {
            "name": "aesthetic",
            "prompts": str(prompts),
            "images": "state",
            "reward": {"name": "demo", "task": "aesthetic"},
        },
        "rollout": {"prompts_per_round": 2, "group_size": 2},
        "prompts": {"max_tokens": 8},
        "sampling": {"num_steps": 4, "shift": 1.0, "noise_level": 0.7, "resolution": 128},
        "optimizer": {"lr": 1e-2},
        "train": {"rounds": 2, "micro_batch_size": 2},
        "ema": {"update_every": 1},
        "checkpoint": {"every": 1, "keep_last": 2},
        "logging": {"tensorboard": False, "progress": False},
    }
    for key, value in extra.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return data


@pytest.mark.parametrize(
    "change, message",
    [
        ({"sampling": {"noise_level": 0.0}}, "sampling.noise_level: Flow-GRPO needs SDE rollouts"),
        ({"method": "nft", "student": {"guidance": 4.5}}, "student.guidance: DiffusionNFT is CFG-free"),
        ({"method": "nft", "student": {"guidance_2": 3.0}}, "student.guidance_2: DiffusionNFT is CFG-free"),
        ({"method": "nft", "grpo": {"clip_range": 0.2}}, "grpo.clip_range: only method grpo reads it"),
        ({"grpo": {"window": [3, 9]}}, r"grpo.window: \[start, stop\)"),
        ({"rollout": {"group_size": 1}}, "rollout.group_size: a group needs >= 2"),
        ({"train": {"micro_batch_size": 3}}, "train.micro_batch_size: 3 must divide"),
        ({"grpo": {"clip": 0.2}}, "unknown config key grpo.clip"),
        ({"tasks": []}, "tasks: a teach config trains one task's teacher"),
    ],
)
def test_config_errors_name_the_key(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        load_teach_config(data=_teach_data(tmp_path, tmp_path / "base", **change))


def test_fast_window_sets_the_backward_calls(tmp_path):
    cfg = load_teach_config(data=_teach_data(tmp_path, tmp_path / "base", grpo={"window": [1, 3]}))
    from opd_fast.engine import backwards_per_round

    assert cfg.sde_window() == (1, 3) and cfg.trained_steps(cfg.tasks[0]) == 2
    assert backwards_per_round(cfg) == 2 * 2  # 2 trained steps x 2 micro-batches (4 samples, 2 per micro-batch)


# -- teach runs -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_base(tmp_path_factory):
    """A 2-block demo-world transformer (the image is the state: 3 x 16 x 16), seeded weights."""
    folder = tmp_path_factory.mktemp("demo_base") / "base"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = flow.FAMILY.transformer_class(**dict(flow.ARCH, num_layers=2))
    model.save_pretrained(folder)
    return folder


def _stats(out):
    """The run's records: the trainer's keys and stage 1's statistics in one line a round."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_grpo_run_is_on_policy_and_exports_a_teacher(tmp_path, demo_base, dtype):
    from opd_fast.stage1.trainer import TeachTrainer
    from opd_fast.teachers import load_teacher

    cfg = load_teach_config(data=_teach_data(tmp_path, demo_base, model={"dtype": dtype}))
    out = tmp_path / "run"
    trainer = TeachTrainer.build(cfg, out, device="cpu")
    records = trainer.fit()
    trainer.close()
    assert [r["step"] for r in records] == [1, 2] and all(r["grad_norm"] is not None for r in records)
    for stats in _stats(out):  # one optimizer step per round: every ratio is exactly 1
        assert stats["ratio_mean"] == 1.0 and stats["ratio_max_dev"] == 0.0 and 0 <= stats["reward"] <= 1
    lora = out / "lora_diffusers_ema" / "pytorch_lora_weights.safetensors"
    assert lora.is_file() and (out / "checkpoints" / "step_00000002").is_dir()
    # stage 2 reads it as a teacher
    base = trainer.parts.family.transformer_class.from_pretrained(demo_base)
    teacher = load_teacher("aesthetic", TeacherConfig(path=str(lora), guidance=None), base, trainer.family)
    assert teacher.model is not None


def test_nft_run_and_resume(tmp_path, demo_base):
    from opd_fast.stage1.trainer import TeachTrainer

    data = _teach_data(tmp_path, demo_base, method="nft", sampling={"noise_level": 0.0}, nft={"timesteps": 2})
    cfg = load_teach_config(data=data)
    out = tmp_path / "run"
    trainer = TeachTrainer.build(cfg, out, device="cpu")
    trainer.fit(until=1)
    trainer.close()
    resumed = TeachTrainer.build(cfg, out, device="cpu", resume=True)
    assert resumed.round == 1
    records = resumed.fit()
    resumed.close()
    assert [r["step"] for r in records] == [2]
    assert [s["step"] for s in _stats(out)] == [1, 2]


def test_demo_reward_scores_the_world():
    from opd_fast.evaluate.demo_reward import DemoReward
    from opd_fast.stage1.rewards import to_pil

    reward = DemoReward(task="aesthetic")
    import numpy as np

    perfect = world.to_model(np.stack([world.render_scene("sunset")]))
    noise = torch.rand(1, 3, 16, 16) * 2 - 1
    good, bad = reward.score(to_pil(torch.cat([perfect, noise])), ["a calm sunset", "a calm sunset"], [{}, {}])
    assert good > 0.9 and bad < 0.2


def test_teach_command(tmp_path, demo_base, capsys):
    import yaml

    from opd_fast.cli import main

    config = tmp_path / "teach.yaml"
    config.write_text(yaml.safe_dump(_teach_data(tmp_path, demo_base)))
    assert main(["teach", str(config), "--out", str(tmp_path / "run"), "--set", "train.rounds=1"]) == 0
    assert "teacher aesthetic (grpo): rounds 1..1" in capsys.readouterr().out
    assert main(["teach", str(config), "--out", str(tmp_path / "run"), "--set", "grpo.clip_range=-1"]) == 2
    assert "grpo.clip_range: must be a finite number > 0" in capsys.readouterr().err


# -- the reward rises -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scene_base(tmp_path_factory):
    """A demo-world transformer that draws scenes, cheaply: 2 blocks, 100 flow-matching steps (batch 16) on generic
    aesthetic renders with noisy captions (the demo's pretraining data, one task), weights as trained. A fresh
    seeded model scores ~1e-6: every group's rewards tie, every advantage is 0 and nothing learns. The demo's own
    base (600 steps, 3 blocks) takes a minute alone; its EMA (decay 0.995) would leave a 100-step warm-up 60% random."""
    import numpy as np

    rng = np.random.default_rng(0)
    renders = [world.render_pretraining("aesthetic", rng, caption_noise=0.3) for _ in range(1000)]
    images, captions = world.to_model(np.stack([image for image, _ in renders])), [c for _, c in renders]
    text = flow.TextConditioner(max_tokens=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = flow.FAMILY.transformer_class(**dict(flow.ARCH, num_layers=2))
    steps, lr = 100, 1e-2
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):  # 10 steps of warm-up, cosine decay to 10%, as the demo's pretraining
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 10) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        idx = torch.randint(len(captions), (16,), generator=g).tolist()
        loss = flow.flow_matching_loss(model, images[idx], text([captions[i] for i in idx]), g)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    folder = tmp_path_factory.mktemp("scene_base") / "base"
    model.save_pretrained(folder)
    return folder


def _aesthetic_score(model) -> float:
    """The mean aesthetic reward over every prompt of the task x 2 fixed noises (ODE, 10 steps): the same images
    before and after, so the difference is the teacher's, not the draw's (a round's own mean moves with its prompts)."""
    from opd_fast.demo.stages import evaluate

    return evaluate(model, flow.TextConditioner(8), flow.sigmas(10, 1.0), ("aesthetic",), seeds=2)[0]["aesthetic"]


@pytest.mark.parametrize(
    "method, settings",
    [
        # Flow-GRPO-Fast: SDE and training on the first 4 of 10 steps (plain Flow-GRPO, all 10, barely moved in 40)
        ("grpo", {"grpo": {"window": [0, 4]}, "optimizer": {"lr": 3e-3}}),
        ("nft", {"sampling": {"noise_level": 0.0}, "optimizer": {"lr": 2e-3}}),  # 3e-3 peaks, then falls back
    ],
)
def test_a_tiny_teacher_run_raises_its_reward(tmp_path, scene_base, method, settings):
    """40 rounds of 8 prompts x 4 samples on the aesthetic reward; the exported teacher (the EMA's: what stage 2
    reads) against the base on the same prompts and noise. Measured (2-core CPU, train.seed 0..3): 0.047 ->
    0.143..0.146 (GRPO), 0.126..0.147 (NFT). The bar, a rise of 0.04, is half the smallest rise over those seeds:
    another CPU's float rounding moves the run less than another seed does."""
    from opd_fast.demo.stages import load_base, load_lora_model
    from opd_fast.stage1.trainer import TeachTrainer

    prompts = tmp_path / "aesthetic_all.txt"
    prompts.write_text("".join(row["prompt"] + "\n" for row in world.task_prompts("aesthetic")))
    data = _teach_data(
        tmp_path,
        scene_base,
        method=method,
        student={"guidance": None, "lora": {"rank": 8, "alpha": 16}},
        rollout={"prompts_per_round": 8, "group_size": 4},
        sampling={"num_steps": 10},
        train={"rounds": 40, "micro_batch_size": 32},
        ema={"enabled": True, "decay": 0.9, "update_every": 1},
        checkpoint={"every": 1000, "keep_last": 1},
    )
    for key, value in settings.items():
        data[key] = {**data.get(key, {}), **value}
    data["task"]["prompts"] = str(prompts)
    cfg = load_teach_config(data=data)
    out = tmp_path / "run"
    trainer = TeachTrainer.build(cfg, out, device="cpu")
    trainer.fit()
    trainer.close()
    before = _aesthetic_score(load_base(scene_base))
    after = _aesthetic_score(load_lora_model(load_base(scene_base), scene_base, out / "lora_diffusers_ema", method))
    assert after > before + 0.04, (before, after)
    assert len(_stats(out)) == 40 and all("reward" in record for record in _stats(out))


def test_round_statistics_may_not_shadow_the_records_keys(tmp_path, demo_base):
    from opd_fast.stage1.trainer import TeachTrainer
    from opd_fast.trainer import RoundResult

    class Shadowing(TeachTrainer):
        def train_round(self, step=True):
            result = super().train_round(step)
            return RoundResult(result.loss, result.task_losses, result.grad_norm, extra={"loss": 0.0})

    trainer = Shadowing.build(load_teach_config(data=_teach_data(tmp_path, demo_base)), tmp_path / "run", device="cpu")
    with pytest.raises(ValueError, match=r"RoundResult.extra: \['loss'\] are the record's own keys"):
        trainer.fit()
    trainer.close()


# -- two ranks ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, engine", [("grpo", "ddp"), ("nft", "deepspeed")])
def test_two_ranks_teach_like_one_process(tmp_path, demo_base, method, engine):
    """`opd-fast teach` on 2 ranks (gloo; DDP, or DeepSpeed at the stage a LoRA gets; 2 prompts x 2 samples each)
    against one process with the 4 prompts:
    the same prompts and noises per global sample, the same advantages (GRPO's global_std is the whole round's
    spread: the ranks gather their rewards), the same averaged gradient, so the same weights and records."""
    import yaml
    from dist_launch import logs, start, wait
    from safetensors.torch import load_file

    from opd_fast.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(row["prompt"] + "\n" for row in world.task_prompts("aesthetic")[:6]))
    extra = {"grpo": {"global_std": True}} if method == "grpo" else {"sampling": {"noise_level": 0.0}}
    data = _teach_data(tmp_path, demo_base, method=method, **extra)
    data["task"]["prompts"] = str(prompts)
    single_config, ranks_config = tmp_path / "single.yaml", tmp_path / "ranks.yaml"
    single_config.write_text(yaml.safe_dump({**data, "rollout": {"prompts_per_round": 4, "group_size": 2}}))
    ranks_config.write_text(yaml.safe_dump({**data, "engine": {"kind": engine}}))
    assert main(["teach", str(single_config), "--out", str(tmp_path / "single")]) == 0
    args = ["-m", "opd_fast.cli", "teach", str(ranks_config), "--out", str(tmp_path / "ranks")]
    codes = wait(start(args, 2, tmp_path / "logs"), timeout=300)
    assert codes == [0, 0], logs(tmp_path / "logs")
    for part in ("student", "optimizer", "ema"):
        ours = load_file(tmp_path / "ranks" / "checkpoints" / "step_00000002" / f"{part}.safetensors")
        theirs = load_file(tmp_path / "single" / "checkpoints" / "step_00000002" / f"{part}.safetensors")
        assert ours.keys() == theirs.keys() and ours
        for key, value in ours.items():
            # Adam divides each gradient by its own root mean square: a gradient near 0 summed in another order
            # moves its weight by up to ~1e-6 (the distributed tests' tolerance)
            torch.testing.assert_close(value, theirs[key], rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
    keys = ("loss", "reward", "reward_std") + (("ratio_mean",) if method == "grpo" else ())
    ours, theirs = _stats(tmp_path / "ranks"), _stats(tmp_path / "single")
    torch.testing.assert_close(
        [[r[k] for k in keys] for r in ours], [[r[k] for k in keys] for r in theirs], rtol=1e-5, atol=1e-7
    )


# -- images through the VAE -----------------------------------------------------------------------------------------


def test_a_teach_run_scores_vae_images(tmp_path):
    """task.images: vae on the tiny default (its pipeline folder's VAE, named by eval.pipeline): the decoder makes
    the pipeline's images of the final latents (tests/test_families.py holds Family.decode_latents to each
    pipeline's own, every family), the tiny CLIP's PickScore scores them, and the round trains."""
    from opd_fast.resources import TINY_CONFIG, builtin_path
    from opd_fast.stage1.trainer import TeachTrainer

    tiny = builtin_path(TINY_CONFIG).parent / "tiny"
    data = _teach_data(
        tmp_path,
        None,
        model={"family": "sd3", "path": None, "preset": "tiny-sd3"},
        student={"guidance": 4.5, "lora": {"rank": 4, "alpha": 8}},
        sampling={"resolution": 64, "num_steps": 4, "shift": 3.0},
        eval={"pipeline": str(tiny / "pipeline")},
    )
    data["task"] = {
        "name": "aesthetic",
        "prompts": str(tiny / "prompts" / "aesthetic.txt"),
        "images": "vae",
        "reward": {"name": "pickscore", "model": str(tiny / "clip")},
    }
    data["train"] = {"rounds": 1, "micro_batch_size": 2}
    trainer = TeachTrainer.build(load_teach_config(data=data), tmp_path / "run", device="cpu")
    images = trainer.decoder(torch.zeros(2, 4, 8, 8))
    assert [image.size for image in images] == [(64, 64)] * 2
    records = trainer.fit()
    trainer.close()
    assert len(records) == 1 and math.isfinite(records[0]["loss"]) and records[0]["grad_norm"] > 0
    assert math.isfinite(_stats(tmp_path / "run")[0]["reward"])


def test_vae_images_need_a_pipeline_folder_with_a_vae(tmp_path):
    from opd_fast.families import get_family
    from opd_fast.stage1.rewards import ImageDecoder

    with pytest.raises(ConfigError, match="needs a pipeline folder with vae/ in eval.pipeline or model.path"):
        ImageDecoder("vae", str(tmp_path), "cpu", get_family("sd3"), 64)
