"""The student update on 2 CPU ranks (gloo): DeepSpeed ZeRO-3 / the LoRA default stage / DDP train the tiny model to
the same weights as one process on the same global batch; ZeRO really partitions; prompts split without overlap;
save + resume under ZeRO-3 continues identically; the ZeRO-3 export loads like the single-process one; a dead rank
makes the other exit with a clear error instead of hanging.

All 2-rank training runs as one launch of tests/dist_worker.py (jobs one after another in the same two processes),
so imports, the process group and DeepSpeed's one-time op build are paid for once.

Tolerance of "the same weights": the 2-rank gradient is the sum of two half-batch gradients, all-reduced, where one
process sums the same terms in another order; fp32 rounding then differs by ~1e-7 relative per step, and Adam's
normalisation m / (sqrt(v) + eps) passes relative gradient errors through unamplified. So after a few steps weights
agree to ~1e-6 of their scale: atol 1e-5 with rtol 1e-4 leaves margin and is still far below one step's change
(lr 3e-3 moves every LoRA weight by ~1e-3).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import sd3_pipeline_output, set_args, tiny_sd3_inputs
from dist_launch import ROOT, free_port, logs, start, wait
from dist_worker import discard_rounds
from safetensors.torch import load_file

from opd_fast import distributed
from opd_fast.config import ConfigError, EngineConfig, load_config
from opd_fast.distributed import (
    cuda_device_index,
    first_host,
    pick_device,
    shared_store_restart_hazard,
    slurm_launch_env,
)
from opd_fast.families import get_family
from opd_fast.models import load_transformer
from opd_fast.trainer import Trainer

pytest.importorskip("deepspeed")
CONFIG = ROOT / "configs" / "tiny.yaml"
WORLD = 2
ROUNDS = 2
RTOL, ATOL = 1e-4, 1e-5
COMMON = [
    "sampling.num_steps=4",
    "train.micro_batch_size=2",
    "checkpoint.every=1",
    "checkpoint.keep_last=3",
    "logging.progress=false",
    "logging.tensorboard=false",
    "ema.update_every=1",
    "optimizer.schedule=cosine",  # lr 3e-3 then 1.5e-3: every engine must set the rate it steps with
]
# persistence 0: no parameter stays gathered; gradient checkpointing: ZeRO-3 must gather again in the recompute
ZERO3 = [
    "engine.kind=deepspeed",
    "engine.zero_stage=3",
    "engine.persistence_threshold=0",
    "model.gradient_checkpointing=true",
]
FULL = ["student.lora.enabled=false", "train.schedule=two_pass"]  # two-pass: rollout forwards without grad, too
PERSIST_FULL = 1000
RESTART_ROUNDS = 4  # the torchrun restart test: rank 1 is killed after round 2
DISCARD = [1]  # rounds whose loss the DDP / LoRA-default jobs see as NaN: the round's gradients must be dropped
# name -> overrides of a 2-rank job (each rank: 1 micro-batch of 2 prompts per task; global batch 4)
JOBS = {
    "zero3": ZERO3 + [f"train.rounds={ROUNDS}"],
    "zero3_half": ZERO3 + [f"train.rounds={ROUNDS}"],  # stopped after round ROUNDS // 2 (fit's until)
    "zero3_resumed": ZERO3 + [f"train.rounds={ROUNDS}"],  # same folder as zero3_half, --resume
    "lora_default": ["engine.kind=deepspeed", "train.rounds=3"],  # and DISCARD
    "ddp": ["engine.kind=ddp", "train.rounds=3"],  # and DISCARD
    "zero2_half": ["engine.kind=deepspeed", "engine.zero_stage=2", f"train.rounds={ROUNDS}"],  # until ROUNDS // 2
    "zero2_resumed": ["engine.kind=deepspeed", "engine.zero_stage=2", f"train.rounds={ROUNDS}"],  # --resume
    # persistence 1000: the biases and norms (<= 1000 elements) stay gathered, the weights are partitioned; the mix a
    # full-parameter SD3.5 student gets at DeepSpeed's default 100k
    "zero3_full": ZERO3 + FULL + ["train.rounds=1", f"engine.persistence_threshold={PERSIST_FULL}"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Every 2-rank job, run once for the module: name -> output folder."""
    root = tmp_path_factory.mktemp("dist")
    folder = {name: root / name for name in JOBS}
    folder["zero3_resumed"], folder["zero2_resumed"] = folder["zero3_half"], folder["zero2_half"]
    jobs = [
        {
            "out": str(folder[name]),
            "overrides": COMMON + JOBS[name],
            "resume": name.endswith("_resumed"),
            "discard": DISCARD if name in ("lora_default", "ddp") else [],
            "until": ROUNDS // 2 if name.endswith("_half") else None,
        }
        for name in JOBS
    ]
    (root / "jobs.json").write_text(json.dumps(jobs))
    procs = start(["tests/dist_worker.py", str(root / "jobs.json")], WORLD, root / "logs")
    codes = wait(procs, timeout=900)
    assert codes == [0] * WORLD, logs(root / "logs")
    return folder


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict[str, Path]:
    """The same global batches in one process: 2 micro-batches of 2 prompts per task."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("single")
    out = {}
    runs = {
        "lora": [f"train.rounds={ROUNDS}"],
        "lora_discard": ["train.rounds=3"],
        "full": FULL + ["train.rounds=1"],
        "lora_restart": [f"train.rounds={RESTART_ROUNDS}"],
    }
    for name, extra in runs.items():
        cfg = load_config(CONFIG, COMMON + extra + ["train.micro_batches_per_task=2"])
        trainer = Trainer.build(cfg, root / name, device="cpu")
        discard_rounds(trainer, DISCARD if name == "lora_discard" else [])
        indices = {f"{r}/{t}": trainer.batch_indices(r, t).tolist() for r in range(ROUNDS) for t in range(3)}
        (root / name / "indices.json").write_text(json.dumps(indices))
        trainer.fit()
        out[name] = root / name
    return out


def probe(folder: Path, rank: int) -> dict:
    return json.loads((folder / f"probe_rank{rank}.json").read_text())


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for k, value in a.items():
        torch.testing.assert_close(value, b[k], rtol=RTOL, atol=ATOL, msg=lambda m, k=k: f"{k}: {m}")


def checkpoint(folder: Path, step: int, part: str) -> dict[str, torch.Tensor]:
    return load_file(folder / "checkpoints" / f"step_{step:08d}" / f"{part}.safetensors")


def losses(folder: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


# -- same weights as one process ------------------------------------------------------------------------------------
@pytest.mark.parametrize("job", ["zero3", "zero2_resumed", "lora_default", "ddp"])
def test_two_ranks_train_like_one_process(runs, single, job):
    """zero3 and zero2 (resumed half-way): 2 rounds. lora_default (the DeepSpeed stage a LoRA student gets) and ddp:
    3 rounds, the middle one dropped for a NaN loss, so gradients of a dropped round must not leak into the next."""
    reference, rounds = (single["lora_discard"], 3) if job in ("lora_default", "ddp") else (single["lora"], ROUNDS)
    for part in ("student", "optimizer", "ema"):  # weights, Adam moments, EMA: the whole state, gathered to rank 0
        assert_same_tensors(checkpoint(runs[job], rounds, part), checkpoint(reference, rounds, part))
    # ... in the same layout, key for key: a checkpoint of either resumes the other
    meta = [
        json.loads((f / "checkpoints" / f"step_{rounds:08d}" / "state.json").read_text())
        for f in (runs[job], reference)
    ]
    measured = ("loss", "max_abs_weight")  # floats of the run, to the rounding of another reduction order
    assert {k: v for k, v in meta[0].items() if k not in measured} == {
        k: v for k, v in meta[1].items() if k not in measured
    }
    torch.testing.assert_close([meta[0][k] for k in measured], [meta[1][k] for k in measured], rtol=1e-5, atol=0)
    torch.testing.assert_close(losses(runs[job]), losses(reference), rtol=1e-5, atol=0, equal_nan=True)
    assert probe(runs[job], 0)["rounds_trained"] == rounds - (ROUNDS // 2 if job.endswith("_resumed") else 0)


def test_zero3_full_parameter_student_trains_like_one_process(runs, single):
    assert_same_tensors(checkpoint(runs["zero3_full"], 1, "student"), checkpoint(single["full"], 1, "student"))
    # the full-parameter export (a diffusers transformer folder) is gathered from the shards
    ours = load_file(runs["zero3_full"] / "transformer" / "diffusion_pytorch_model.safetensors")
    theirs = load_file(single["full"] / "transformer" / "diffusion_pytorch_model.safetensors")
    assert_same_tensors(ours, theirs)
    # ... and its EMA weights: after one step (s = 1, d = 2 / 11) ema = d base + (1 - d) trained
    ours_ema = load_file(runs["zero3_full"] / "transformer_ema" / "diffusion_pytorch_model.safetensors")
    theirs_ema = load_file(single["full"] / "transformer_ema" / "diffusion_pytorch_model.safetensors")
    assert_same_tensors(ours_ema, theirs_ema)
    model_cfg = load_config(CONFIG).model
    base, d = load_transformer(model_cfg, get_family(model_cfg.family)).state_dict(), 2 / 11
    assert_same_tensors(theirs_ema, {k: d * base[k] + (1 - d) * theirs[k] for k in theirs})


def test_one_optimizer_step_per_round(runs):
    assert probe(runs["lora_default"], 0)["before"]["stage"] == 0  # what engine.zero_stage null gives a LoRA student
    for job in ("zero3", "lora_default", "zero3_full"):
        report = probe(runs[job], 1)
        dropped = len(DISCARD) if job == "lora_default" else 0
        assert report["optimizer_steps"] == report["rounds_trained"] - dropped, job


# -- partitioning ---------------------------------------------------------------------------------------------------
def test_zero3_partitions_every_student_tensor_and_no_teacher(runs):
    """Every student tensor is partitioned and none is held outside a forward. zero3_full runs at persistence
    PERSIST_FULL: DeepSpeed marks exactly the tensors of at most that many elements persistent (kept gathered within
    a round), and training, EMA and export over that mix match one process (the test above)."""
    for job, persist in (("zero3", 0), ("zero3_full", PERSIST_FULL)):
        for rank in range(WORLD):
            report = probe(runs[job], rank)
            assert report["before"]["stage"] == 3
            assert report["before"]["teacher_params_under_zero"] == 0, "a teacher was handed to ZeRO"
            for when in (report["before"]["partition"], report["after"]):
                for name, p in when["params"].items():
                    assert p["shard"] == -(-p["numel"] // WORLD), name  # this rank keeps ceil(numel / 2)
                    assert p["held"] == 0, f"{name}: gathered outside a forward"
                    assert p["persist"] == (p["numel"] <= persist), name
    full = probe(runs["zero3_full"], 0)["before"]["partition"]["params"]
    assert "proj_out.weight" in full and sum(p["numel"] for p in full.values()) > 50_000  # every weight, not a LoRA
    sizes = [p["numel"] for p in full.values()]
    assert min(sizes) <= PERSIST_FULL < max(sizes)  # both kinds are there


def test_zero2_partitions_the_lora_optimizer_state(runs):
    reports = [probe(runs["zero2_half"], r) for r in range(WORLD)]  # the resumed job's report
    assert reports[0]["before"]["stage"] == 2
    params = reports[0]["before"]["partition"]["params"]
    total = sum(p["numel"] for p in params.values())
    assert all(p["held"] == p["numel"] for p in params.values())  # stage 1-2: weights replicated
    for report in reports:  # the fp32 master weights (and Adam's moments, the same size): half per rank, padded
        assert total // WORLD <= report["before"]["partition"]["optimizer_elements"] <= total // WORLD + 64


def test_prompts_are_split_across_ranks_without_overlap(runs, single):
    one_process = json.loads((single["lora"] / "indices.json").read_text())
    for job in ("zero3", "ddp"):
        ranks = [probe(runs[job], r)["before"]["indices"] for r in range(WORLD)]
        for key, global_batch in one_process.items():  # round/task
            assert len(ranks[0][key]) == len(ranks[1][key]) == 2
            assert not set(ranks[0][key]) & set(ranks[1][key]), key
            assert ranks[0][key] + ranks[1][key] == global_batch  # one global batch, cut in rank order


# -- checkpoints and export -----------------------------------------------------------------------------------------
def test_zero3_resume_continues_identically(runs):
    assert probe(runs["zero3_half"], 0)["before"]["start_round"] == ROUNDS // 2  # the resumed job's report
    for part in ("student", "optimizer", "ema"):
        a, b = checkpoint(runs["zero3_half"], ROUNDS, part), checkpoint(runs["zero3"], ROUNDS, part)
        assert a.keys() == b.keys()
        for k in a:  # same process layout, same reduction order: bit-identical
            assert torch.equal(a[k], b[k]), (part, k)
    assert losses(runs["zero3_half"]) == losses(runs["zero3"])


def test_zero3_export_loads_like_the_single_process_one(runs, single, tmp_path):
    from diffusers import SD3Transformer2DModel

    from opd_fast.config import ModelConfig

    load_transformer(ModelConfig(family="sd3", preset="tiny-sd3"), get_family("sd3")).save_pretrained(tmp_path / "base")
    inputs = tiny_sd3_inputs()
    for export in ("lora_diffusers", "lora_diffusers_ema"):
        ours = sd3_pipeline_output(tmp_path / "base", runs["zero3"] / export, inputs)
        theirs = sd3_pipeline_output(tmp_path / "base", single["lora"] / export, inputs)
        torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=ATOL)
    with torch.no_grad():
        plain = SD3Transformer2DModel.from_pretrained(tmp_path / "base")(**inputs).sample
    assert (ours - plain).abs().max() > 1e-4  # the exported LoRA is not a no-op


# -- the real launchers, two "nodes" on this machine ------------------------------------------------------------------
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launch_env(**extra: str) -> dict[str, str]:
    """This environment without any launcher's variables (the launcher under test sets them), one thread per rank."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def launcher_command(launcher: str, node: int, port: int, hostfile: Path) -> tuple[list[str], dict[str, str]]:
    """The README's multi-node commands, one node each (1 process per node), the nodes being two processes here:
    (python arguments, environment). srun is not installed here: its rank is started with the variables srun gives
    a task (SLURM_PROCID etc.), port chosen by the job id."""
    if launcher == "torchrun":
        return [
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "2",
            "--node_rank",
            str(node),
            "--nproc_per_node",
            "1",
            "--rdzv_backend",
            "c10d",
            "--rdzv_endpoint",
            f"127.0.0.1:{port}",
            "--rdzv_id",
            "opd",
            "-m",
            "opd_fast.cli",
        ], {}
    if launcher == "deepspeed":
        return [
            "-m",
            "deepspeed.launcher.runner",
            "--hostfile",
            str(hostfile),
            "--no_ssh",
            "--node_rank",
            str(node),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
            "--module",
            "opd_fast.cli",
        ], {}
    assert port >= 20000  # SLURM_JOB_ID below gives it
    return ["-m", "opd_fast.cli"], {
        "SLURM_JOB_ID": str(port - 20000),
        "SLURM_STEP_NUM_TASKS": str(WORLD),
        "SLURM_PROCID": str(node),
        "SLURM_LOCALID": "0",
        "SLURM_STEP_NODELIST": "localhost,otherhost",
    }


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed", "srun"])
def test_multi_node_launch_trains_like_one_process(single, tmp_path, launcher):
    """torchrun with a c10d rendezvous, the deepspeed launcher reading a hostfile (--no_ssh: each node starts its
    own; pdsh would start the same command over ssh), and srun starting the ranks itself: every rank has LOCAL_RANK 0,
    so anything keyed on the local rank instead of the global one (who writes, who logs, which prompts) shows here."""
    out, hostfile, port = tmp_path / "run", tmp_path / "hostfile", free_port()
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    args = ["train", str(CONFIG), "--out", str(out), *set_args(COMMON + ZERO3 + [f"train.rounds={ROUNDS}"])]
    procs = []
    for node in range(WORLD):
        command, extra = launcher_command(launcher, node, port, hostfile)
        with open(tmp_path / f"rank{node}.err", "w") as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, *command, *args],
                    cwd=ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=launch_env(**extra),
                )
            )
    assert wait(procs, timeout=600) == [0] * WORLD, logs(tmp_path)
    for node in range(WORLD):
        log = (tmp_path / f"rank{node}.err").read_text()
        assert f"rank {node} of 2 (local rank 0)" in log
        assert "`torch.distributed." not in log  # ZeRO's deprecated-collective FutureWarnings are filtered
    for part in ("student", "optimizer", "ema"):
        assert_same_tensors(checkpoint(out, ROUNDS, part), checkpoint(single["lora"], ROUNDS, part))
    assert len(losses(out)) == ROUNDS  # one writer of the metrics, not one per node
    torch.testing.assert_close(losses(out), losses(single["lora"]), rtol=1e-5, atol=0)


def test_torchrun_restarts_a_failed_group_from_the_last_checkpoint(single, tmp_path):
    """`torchrun --max-restarts 1 ... train --resume`: rank 1 is killed mid-run, torchrun stops rank 0 and starts
    both again, and the run continues from its latest checkpoint to the weights of an uninterrupted run. With
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, as opd-fast's warning asks (otherwise this hung in 1 of 3 restarts)."""
    out, log_file = tmp_path / "run", tmp_path / "torchrun.log"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(WORLD),
        "--max-restarts",
        "1",
        "-m",
        "opd_fast.cli",
        "train",
        str(CONFIG),
        "--out",
        str(out),
        "--resume",
        *set_args(COMMON + ZERO3 + [f"train.rounds={RESTART_ROUNDS}"]),
    ]
    env = launch_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    with open(log_file, "w") as log:
        agent = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while not (out / "metrics.jsonl").is_file() or len(losses(out)) < 2:  # round 2 done, 2 to go
            assert time.monotonic() < deadline and agent.poll() is None, log_file.read_text()[-4000:]
            time.sleep(0.1)
        victim = [pid for pid in worker_pids(agent.pid) if worker_env(pid).get("RANK") == "1"]
        assert len(victim) == 1, victim
        os.kill(victim[0], signal.SIGKILL)
        code = agent.wait(600)
    finally:
        agent.kill()
        agent.wait()
    text = log_file.read_text()
    assert code == 0, text[-4000:]
    assert re.search(r"resumed from .*step_0000000[12] at round [12]", text), text[-4000:]
    for part in ("student", "optimizer", "ema"):
        assert_same_tensors(
            checkpoint(out, RESTART_ROUNDS, part), checkpoint(single["lora_restart"], RESTART_ROUNDS, part)
        )
    torch.testing.assert_close(losses(out), losses(single["lora_restart"]), rtol=1e-5, atol=0)


def worker_pids(parent: int) -> list[int]:
    """Children of a process, from /proc (field 4 of /proc/PID/stat is the parent)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[1]) == parent:
            pids.append(int(stat.parent.name))
    return pids


def worker_env(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def test_torchrun_restarts_with_a_shared_store_are_warned_about():
    hazard = shared_store_restart_hazard({"TORCHELASTIC_MAX_RESTARTS": "3", "TORCHELASTIC_USE_AGENT_STORE": "True"})
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in hazard and "--max-restarts 3" in hazard
    assert (
        shared_store_restart_hazard({"TORCHELASTIC_MAX_RESTARTS": "0", "TORCHELASTIC_USE_AGENT_STORE": "True"}) is None
    )
    assert (
        shared_store_restart_hazard({"TORCHELASTIC_MAX_RESTARTS": "3", "TORCHELASTIC_USE_AGENT_STORE": "False"}) is None
    )
    assert shared_store_restart_hazard({}) is None


def test_srun_variables_become_the_launcher_environment():
    srun = {
        "SLURM_STEP_NUM_TASKS": "16",
        "SLURM_PROCID": "9",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_NODELIST": "gpu-[007-008]",
    }
    assert slurm_launch_env(srun) == {
        "RANK": "9",
        "WORLD_SIZE": "16",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "gpu-007",
        "MASTER_PORT": "24242",
    }
    mine = slurm_launch_env({**srun, "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29500"})
    assert (mine["MASTER_ADDR"], mine["MASTER_PORT"]) == ("10.0.0.5", "29500")
    assert slurm_launch_env({**srun, "RANK": "3"}) == {}  # torchrun inside srun: torchrun's variables stand
    assert slurm_launch_env({**srun, "SLURM_STEP_NUM_TASKS": "1"}) == {}  # one task: a plain process
    assert slurm_launch_env({"SLURM_NTASKS": "8", "SLURM_PROCID": "0"}) == {}  # the batch script, not an srun step
    with pytest.raises(ConfigError, match="SLURM_STEP_NUM_TASKS=16 tasks but SLURM_LOCALID is not set"):
        slurm_launch_env({k: v for k, v in srun.items() if k != "SLURM_LOCALID"})
    with pytest.raises(ConfigError, match="SLURM_JOB_ID='x' is not an integer; set MASTER_PORT"):
        slurm_launch_env({**srun, "SLURM_JOB_ID": "x"})
    hostlists = {
        "gpu-[007-010,12],login1": "gpu-007",
        "rack[2-3]-n[01-04]": "rack2-n01",
        "a[1,3]": "a1",
        "node1,node2": "node1",
        "localhost": "localhost",
    }
    assert {h: first_host(h) for h in hostlists} == hostlists


def test_setup_adopts_srun_variables_without_the_cli():
    """A script that builds the Trainer itself under srun: setup() reads srun's variables as the CLI does, so rank
    1 of 2 is not taken for a lone process (here the single engine refuses the 2-rank world, naming it)."""
    srun = {
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_PROCID": "1",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_ID": "7",
        "SLURM_STEP_NODELIST": "localhost",
    }
    with mock.patch.dict(os.environ, srun):
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(var, None)
        with pytest.raises(ConfigError, match="engine.kind: 'single' but the launcher started WORLD_SIZE=2"):
            distributed.setup(EngineConfig(kind="single"), "cpu")
        assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["MASTER_PORT"]) == ("1", "1", "20007")


def test_each_rank_gets_its_gpu():
    assert [cuda_device_index(r, 8) for r in range(8)] == list(range(8))
    assert cuda_device_index(5, 1) == 0  # srun --gpus-per-task=1: each task sees only its own GPU
    with pytest.raises(ConfigError, match="LOCAL_RANK=4 but this process sees 2 GPUs"):
        cuda_device_index(4, 2)
    assert pick_device("cuda", 3, 8) == torch.device("cuda", 3)  # a bare "cuda" (--device cuda) is this rank's GPU
    assert pick_device("cuda:5", 3, 8) == torch.device("cuda", 5)
    assert pick_device(None, 2, 4) == torch.device("cuda", 2)
    assert pick_device(None, 0, 0) == pick_device("cpu", 0, 0) == torch.device("cpu")


# -- failure --------------------------------------------------------------------------------------------------------
def test_ranks_that_find_different_checkpoints_stop_naming_the_cause(runs, tmp_path):
    """--resume with OUT on a filesystem the nodes do not share: rank 0 finds the checkpoint of round 2, rank 1
    none. Both stop before loading anything and say why (the check used to be skipped by a rank finding none)."""
    shutil.copytree(runs["zero3"], tmp_path / "rank0")
    argv = ["train", str(CONFIG), "--resume", *set_args(COMMON + JOBS["zero3"] + ["engine.timeout_s=60"])]
    code = (
        f"import os, sys; from opd_fast.cli import main; "
        f"sys.exit(main({argv!r} + ['--out', {str(tmp_path)!r} + '/rank' + os.environ['RANK']]))"
    )
    procs = start(["-c", code], WORLD, tmp_path / "logs")
    assert wait(procs, timeout=240) == [2] * WORLD, logs(tmp_path / "logs")
    assert logs(tmp_path / "logs").count("ranks resumed different rounds (0..2)") == WORLD
    assert not (tmp_path / "rank1" / "checkpoints").exists()


TIMEOUT_S = 20  # the hung case waits all of it; shorter risks a slow rank's start-up counting as hung
LOST_RANK_WAIT_S = TIMEOUT_S + 100  # far below torch's default collective timeout (600 s), far above a slow exit


# The LoRA default's DeepSpeed ZeRO-0 all-reduces its gradients on a group DeepSpeed forms itself, with torch's
# default timeout (30 minutes) unless distributed.bound_new_groups shortens it: a hung rank held the other that long.
@pytest.mark.parametrize(
    "how, engine",
    [(signal.SIGKILL, ZERO3), (signal.SIGSTOP, ZERO3), (signal.SIGSTOP, ["engine.kind=deepspeed"])],
    ids=["killed", "hung", "hung-lora-default"],
)
def test_a_lost_rank_makes_the_other_exit_with_a_clear_error(tmp_path, how, engine):
    """Rank 1 dies (or stops answering) mid-run: rank 0 exits with status 3 and our one line (no traceback),
    within the timeout."""
    out = tmp_path / "run"
    args = [
        "-m",
        "opd_fast.cli",
        "train",
        str(CONFIG),
        "--out",
        str(out),
        *set_args(COMMON + engine + ["train.rounds=1000", "checkpoint.every=1000", f"engine.timeout_s={TIMEOUT_S}"]),
    ]
    procs = start(args, WORLD, tmp_path / "logs")
    try:
        deadline = time.monotonic() + 600
        metrics = out / "metrics.jsonl"
        while not (metrics.is_file() and metrics.read_text().strip()):  # a round went through: mid-run
            assert time.monotonic() < deadline and procs[0].poll() is None, logs(tmp_path / "logs")
            time.sleep(0.5)
        procs[1].send_signal(how)
        lost = time.monotonic()
        code = wait(procs[:1], timeout=LOST_RANK_WAIT_S)[0]
        elapsed = time.monotonic() - lost
    finally:
        for p in procs:
            p.kill()
            p.wait()
    err = (tmp_path / "logs" / "rank0.err").read_text()
    assert code == 3, logs(tmp_path / "logs")
    assert "rank 0 of 2: lost contact with another rank" in err and "Traceback" not in err
    # engine.timeout_s bounds the wait (a closed connection is seen at once, a silent peer at the timeout), not
    # torch's default of 10 minutes; the slack only absorbs a loaded machine's slow exit
    assert elapsed < LOST_RANK_WAIT_S, elapsed


def test_finish_exits_cleanly_after_the_last_collective(tmp_path):
    """distributed.finish, which the CLI ends every multi-rank run with, exits 0 every time, in the situation where
    the interpreter's own exit can abort a rank (tests/exit_race.py; after real 2-rank ZeRO-3 runs it aborted 3 of
    36 plain exits). Whether a plain exit aborts depends on torch and the machine's load, so only our exit is tested:
    `python tests/exit_race.py --report N` counts the plain exits' aborts."""
    for i in range(5):
        log_dir = tmp_path / f"finish{i}"
        assert (
            wait(start([str(ROOT / "tests" / "exit_race.py"), "finish"], WORLD, log_dir), timeout=60) == [0] * WORLD
        ), logs(log_dir)


# -- collectives on the rank's device ----------------------------------------------------------------------------
COLLECTIVES = {
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
    "all_to_all",
    "gather",
    "scatter",
    "reduce",
    "all_gather_object",
    "broadcast_object_list",
}


def test_every_collective_of_ours_goes_through_the_device_helpers():
    """An NCCL group refuses CPU tensors, and gloo (the CPU tests) would hide a collective on a CPU tensor: the trainer's
    resume check once all-reduced one, which failed every multi-GPU --resume. So no module but opd_fast.distributed
    calls a torch.distributed collective; its helpers put the tensors on the rank's device."""
    import ast

    offenders = []
    for path in sorted((ROOT / "opd_fast").rglob("*.py")):
        if path.name == "distributed.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
                owner = ast.unparse(node.func.value)
                if owner in ("dist", "torch.distributed", "torch.distributed.distributed_c10d"):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {owner}.{node.func.attr}")
    assert not offenders, offenders


def test_collective_helpers_hand_the_group_tensors_on_the_ranks_device(monkeypatch):
    """A group that refuses tensors not on the rank's device, as NCCL refuses CPU ones; "meta" stands in for the GPU
    a CPU machine lacks. The helpers take tensors from anywhere and return them on the rank's device."""
    device = torch.device("meta")
    seen = []

    def strict(name):
        def collective(*tensors, **kwargs):
            for t in tensors:
                if t.device != device:
                    raise RuntimeError(f"{name}: tensor on {t.device}, the group takes {device} only")
            seen.append(name)

        return collective

    monkeypatch.setattr(torch.distributed, "all_reduce", strict("all_reduce"))
    monkeypatch.setattr(torch.distributed, "all_gather_into_tensor", strict("all_gather_into_tensor"))
    info = distributed.DistInfo(rank=0, world_size=2, local_rank=0, device=device, timeout_s=60)
    with pytest.raises(RuntimeError, match="takes meta only"):
        torch.distributed.all_reduce(torch.zeros(2))  # what the resume check once did
    reduced = distributed.all_reduce(torch.tensor([2.0, -2.0]), info, "max")
    gathered = distributed.all_gather_flat(torch.ones(2, 3), info)
    assert reduced.device == device and reduced.shape == (2,)
    assert gathered.device == device and gathered.shape == (12,)
    assert seen == ["all_reduce", "all_gather_into_tensor"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (an NCCL group)")
def test_ddp_resume_on_one_gpu_runs_its_collectives_on_nccl(tmp_path):
    """engine ddp on one GPU forms a one-rank NCCL group; --resume's agreement check, the loss average and the
    checkpoint gathers then run on it (a CPU tensor there fails at once)."""
    out = tmp_path / "run"
    common = [
        "-m",
        "opd_fast.cli",
        "train",
        str(CONFIG),
        "--out",
        str(out),
        "--device",
        "cuda",
        *set_args(COMMON + ["engine.kind=ddp"]),
    ]
    for rounds, extra in ((2, []), (3, ["--resume"])):
        proc = subprocess.run(
            [sys.executable, *common, *set_args([f"train.rounds={rounds}"]), *extra],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed from" in proc.stderr and len(losses(out)) == 3


# -- configuration --------------------------------------------------------------------------------------------------
def test_engine_config_is_validated_and_the_stage_follows_the_student():
    cfg = load_config(CONFIG, ["engine.kind=deepspeed"])
    assert cfg.engine.resolved_zero_stage(lora=False) == 3
    assert load_config(CONFIG, ["engine.kind=deepspeed", "engine.zero_stage=2"]).engine.resolved_zero_stage(True) == 2
    bad = {
        "engine.zero_stage: must be 0, 1, 2, 3": ["engine.kind=deepspeed", "engine.zero_stage=4"],
        "engine.zero_stage: only the deepspeed engine": ["engine.kind=ddp", "engine.zero_stage=3"],
        "engine.offload: 'all' (weights too) needs ZeRO stage 3": [
            "engine.kind=deepspeed",
            "engine.offload=all",
            "engine.zero_stage=2",
        ],
        "engine.timeout_s: must be > 0": ["engine.timeout_s=0"],
        "engine.bf16: needs ZeRO stage >= 1": ["engine.kind=deepspeed", "engine.bf16=true"],  # LoRA: stage 0
    }
    for message, overrides in bad.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(CONFIG, overrides)


def test_deepspeed_launcher_local_rank_argument(monkeypatch):
    from opd_fast.cli import build_parser, main

    assert build_parser().parse_args(["--local_rank=1", "tiny-world", "x"]).local_rank == 1
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main(["--local_rank=1", "tiny-world", "unused"]) == 2  # disagrees with the launcher's LOCAL_RANK
