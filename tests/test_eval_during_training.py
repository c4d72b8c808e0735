"""In-training evaluation (opd_fast.evaluate.during, the `eval:` section) on the tiny default: `opd-fast train` with
an evaluation every 2 rounds writes eval.jsonl, grids and scalars to TensorBoard and an offline W&B run, and
`opd-fast report` renders it; the held-out prompts never reach training; a failing reward is a warning, retried at
the next evaluation; evaluation time stays out of the rounds' seconds; `opd-fast sample --run` works on a tiny run
(its pipeline folder comes from `opd-fast tiny-world`)."""

from __future__ import annotations

import logging
import time

import pytest
import torch
from conftest import ROOT, offline_wandb_env, set_args, tiny_overrides
from test_trackers import offline_wandb, read_wandb_run  # noqa: F401  (offline_wandb: a fixture)

from opd_fast.cli import main
from opd_fast.config import ConfigError, load_config
from opd_fast.evaluate import during
from opd_fast.evaluate.during import EvalHook, held_out, rank_share, training_pools
from opd_fast.evaluate.records import read_eval_records
from opd_fast.trainer import Trainer

TINY = ROOT / "configs" / "tiny.yaml"
EVAL = {"eval.every": 2, "eval.num_steps": 3, "eval.prompts_per_task": 2, "eval.seeds": 2, "train.rounds": 4}


@pytest.fixture(scope="module")
def watched_run(tmp_path_factory):
    """The tiny default (all three tasks) trained 4 rounds through the CLI, evaluated after rounds 2 and 4, with
    TensorBoard and an offline W&B run; the W&B environment as the offline_wandb fixture sets it."""
    import wandb

    out = tmp_path_factory.mktemp("watched") / "run"
    with pytest.MonkeyPatch.context() as mp:
        offline_wandb_env(mp, out.parent / "wandb-home")
        overrides = tiny_overrides(
            **EVAL, **{"logging.tensorboard": "null", "logging.trackers": "[tensorboard, wandb]"}
        )
        assert main(["train", str(TINY), "--out", str(out), *set_args(overrides)]) == 0
        wandb.teardown()
    return out


def test_the_tiny_default_writes_evaluation_records_grids_and_scalars(watched_run):
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = read_eval_records(watched_run)
    assert [(r["step"], r["model"]) for r in records] == [(2, "ema"), (4, "ema")]
    for record in records:
        # every task's prompts scored by pickscore ("*": the cross-task columns), aesthetic's by its own too
        assert {task: sorted(scores) for task, scores in record["rewards"].items()} == {
            "geneval": ["pickscore"],
            "ocr": ["pickscore"],
            "aesthetic": ["aesthetic", "pickscore"],
        }
        assert record["in_domain"] == {"aesthetic": ["aesthetic"]} and record["seconds"] > 0
    lines = [json.loads(line) for line in (watched_run / "metrics.jsonl").read_text().splitlines()]
    evals = [line for line in lines if "eval/ema/aesthetic" in line]
    assert [line["step"] for line in evals] == [2, 4]
    assert evals[0]["eval/ema/ocr/pickscore"] == pytest.approx(records[0]["rewards"]["ocr"]["pickscore"])

    events = EventAccumulator(str(watched_run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    for task in ("geneval", "ocr", "aesthetic"):  # 2 prompts x 2 seeds of 64 px: 2 rows, 2 columns
        assert [(e.step, e.width, e.height) for e in events.Images(f"samples/ema/{task}")] == [(2, 128, 128)] * 1 + [
            (4, 128, 128)
        ]
    assert [(e.step, e.value) for e in events.Scalars("eval/ema/aesthetic")] == [
        (r["step"], pytest.approx(r["rewards"]["aesthetic"]["aesthetic"], rel=1e-6)) for r in records
    ]

    (run_folder,) = (watched_run / "wandb").glob("offline-run-*")
    _, _, history = read_wandb_run(run_folder)
    assert all("loss" in history[step] for step in (1, 2, 3, 4))  # no round lost
    # each evaluation in a row of its own (at a round's, or after the last), charted against eval/step
    scored = [history[step] for step in sorted(history) if "eval/step" in history[step]]
    assert [row["eval/step"] for row in scored] == [2, 4]
    assert scored[0]["eval/ema/aesthetic"] == pytest.approx(records[0]["rewards"]["aesthetic"]["aesthetic"])
    assert "samples/ema/ocr/path" in history[2] and "samples/ema/ocr/path" in history[4]


def test_report_renders_the_runs_evaluations(watched_run, tmp_path, capsys):
    assert main(["report", str(watched_run), "--all-steps", "--out", str(tmp_path / "report")]) == 0
    table = capsys.readouterr().out
    assert "| run | model | step | geneval/pickscore | ocr/pickscore | aesthetic* | aesthetic/pickscore |" in table
    assert "| run | ema | 2 |" in table and "| run | ema | 4 |" in table
    assert (tmp_path / "report" / "curves.png").is_file()


def test_sample_works_on_a_tiny_run(watched_run, tmp_path, capsys):
    """`opd-fast sample --run` on the tiny default: the preset transformer with the exported LoRA (or its EMA), the
    VAE of eval.pipeline, prompts encoded as in training."""
    for model in ("student", "ema"):
        args = ["sample", "--run", str(watched_run), "--model", model, "--task", "ocr", "--limit", "2"]
        assert main([*args, "--num-steps", "2", "--out", str(tmp_path / model)]) == 0
        assert sorted(p.name for p in (tmp_path / model / "images").iterdir()) == ["00000.png", "00001.png"]
    with pytest.raises(ConfigError, match="needs model.path.*or eval.pipeline"):
        from opd_fast.evaluate.sample import SampleSettings, sample
        from opd_fast.prompts import PromptSet

        sample(
            load_config(TINY, ["eval.pipeline=null", "eval.every=null"]),
            PromptSet(["a"]),
            tmp_path / "x",
            SampleSettings(),
        )


def test_the_held_out_prompts_never_reach_training(tiny_config):
    """Without eval.prompts files, each task's evaluation prompts are held out of its training draws; a config
    without an evaluation draws exactly as before (its training numbers do not change)."""
    cfg = tiny_config(**{**EVAL, "eval.prompts": "{}", "eval.prompts_per_task": 5})
    sizes = {"geneval": 48, "ocr": 16, "aesthetic": 18}
    pools = training_pools(cfg, sizes)
    for i, task in enumerate(cfg.tasks):
        held = set(held_out(cfg, i, sizes[task.name]).tolist())
        assert len(held) == 5 and held.isdisjoint(pools[task.name].tolist())
        assert sorted(held | set(pools[task.name].tolist())) == list(range(sizes[task.name]))
    assert held_out(cfg, 1, 16).tolist() == held_out(cfg, 1, 16).tolist()  # seeded
    off = tiny_config()  # the tests' tiny config: rounds 2, so eval.every 10 never comes
    off.eval.every = None
    assert training_pools(off, sizes) == dict.fromkeys(sizes)
    assert training_pools(tiny_config(**EVAL), sizes) == dict.fromkeys(sizes)  # own eval files: nothing held out
    with pytest.raises(ConfigError, match="eval.prompts_per_task: holding 16 of task 'ocr'"):
        training_pools(tiny_config(**{**EVAL, "eval.prompts": "{}", "eval.prompts_per_task": 16}), sizes)


def test_a_trainer_draws_around_the_held_out_prompts(tiny_config, tmp_path):
    cfg = tiny_config(**{**EVAL, "eval.prompts": "{}", "eval.prompts_per_task": 6})
    cfg.tasks = [task for task in cfg.tasks if task.name == "ocr"]
    trainer = Trainer.build(cfg, tmp_path / "run", device="cpu")
    try:
        sets = during.eval_sets(trainer)
        drawn = {i for r in range(60) for i in trainer.batch_indices(r, 0).tolist()}
        held = set(sets["ocr"].indices)
        assert len(held) == 6 and held.isdisjoint(drawn) and len(drawn) == 10  # every other prompt is trained on
        assert sets["ocr"].prompts == [trainer.prompts["ocr"].prompts.prompts[i] for i in sorted(held)]
    finally:
        trainer.close()


class Flaky:
    """A reward that fails its first call (a server down) and scores 1.0 after."""

    name = "flaky"

    def __init__(self):
        self.calls = 0

    def score(self, images, prompts, metadata):
        self.calls += 1
        if self.calls == 1:
            raise ConnectionError("reward server at 127.0.0.1:1 refused the connection")
        return [1.0] * len(images)

    def aggregate(self, scores, metadata):
        return sum(scores) / len(scores)


def test_a_failing_reward_warns_and_is_retried_and_evaluation_time_is_not_round_time(
    tiny_config, tmp_path, monkeypatch, caplog
):
    """The hook passed from Python: `flaky` fails at step 2 (a warning naming it and why) and scores at step 4, a
    reward whose model is missing warns at each evaluation, and the run completes. The generation (slowed here by
    GENERATION_S) is in the evaluation record's seconds, not in any round's."""
    generation_s = 1.5
    slow = during.EvalHook._generate

    def slowed(self, model):
        time.sleep(generation_s)
        return slow(self, model)

    monkeypatch.setattr(during.EvalHook, "_generate", slowed)
    cfg = tiny_config(**EVAL)
    cfg.tasks = [task for task in cfg.tasks if task.name == "ocr"]
    cfg.eval.rewards = {"ocr": [{"name": "flaky"}, {"name": "clipscore", "model": str(tmp_path / "no-clip")}]}
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="opd_fast.evaluate.during"):
        records = Trainer.build(cfg, out, device="cpu", hooks=[EvalHook(rewards={"flaky": Flaky()})]).fit()
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [(r["step"], r["rewards"]) for r in read_eval_records(out)] == [(4, {"ocr": {"flaky": 1.0}})]
    assert (
        "at step 2: reward 'flaky' failed on task 'ocr' (ConnectionError: reward server at 127.0.0.1:1" in caplog.text
    )
    assert caplog.text.count("reward 'clipscore' could not be built") == 2
    assert "tried again at the next evaluation" in caplog.text
    assert "at step 2: no reward scored; nothing recorded" in caplog.text
    assert all(r["seconds"] < generation_s for r in records)
    assert read_eval_records(out)[0]["seconds"] >= generation_s


def test_eval_config_is_checked_when_it_loads(tiny_config):
    with pytest.raises(ConfigError, match=r"unknown config key eval\.evry"):
        tiny_config(**{"eval.evry": 2})
    with pytest.raises(ConfigError, match=r"eval\.rewards\.pick: no such task"):
        tiny_config(**{"eval.rewards": "{pick: [{name: pickscore}]}"})
    with pytest.raises(ConfigError, match=r"eval\.rewards\.ocr\.0: needs name"):
        tiny_config(**{"eval.rewards": "{ocr: [{model: x}]}"})
    with pytest.raises(ConfigError, match=r"eval\.models: 'ema' needs ema\.enabled"):
        tiny_config(**{"ema.enabled": False})
    with pytest.raises(ConfigError, match=r"eval\.pipeline: evaluation decodes"):
        tiny_config(**{"eval.pipeline": "null"})
    with pytest.raises(ConfigError, match=r"eval\.prompts\.nope: no such task"):
        tiny_config(**{"eval.prompts": "{nope: x.txt}"})
    cfg = tiny_config()
    assert cfg.eval.enabled and cfg.eval.pipeline.endswith("tiny/pipeline")  # resolved beside the config
    assert cfg.eval.rewards["*"][0]["model"].endswith("tiny/clip")
    assert not tiny_config(**{"eval.every": 0}).eval.enabled


def test_rank_shares_and_the_gather_put_every_image_back_in_order():
    for n in range(9):
        for world in (1, 2, 3):
            shares = [rank_share(n, r, world) for r in range(world)]
            assert [i for share in shares for i in share] == list(range(n))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


def _gather_on_rank(rank: int, world: int, port: int, results) -> None:
    import numpy as np
    import torch.distributed as dist

    from opd_fast.distributed import DistInfo

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    info = DistInfo(rank, world, rank, torch.device("cpu"), 60)
    n = 5
    local = [np.full((2, 3, 3), i, dtype=np.uint8) for i in rank_share(n, rank, world)]
    gathered = during.gather_images(local, n, (2, 3), info)
    if rank == 0:
        results.put([int(image[0, 0, 0]) for image in gathered])
    else:
        results.put(gathered)
    dist.destroy_process_group()


def test_two_ranks_gather_their_images_on_rank_0():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_gather_on_rank, args=(r, 2, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
    assert sorted(got, key=lambda g: g is None) == [[0, 1, 2, 3, 4], None]
