"""Fault injection on the tiny default: what a cluster does to a run folder every day (a job launched twice, a node
killed mid-write, a full disk, a damaged or foreign checkpoint, bad bytes in a prompt file) gives its named outcome,
and where the run can go on, its final weights equal an uninterrupted run's.

Kills land at named points (opd_fast.faults), not after a sleep: each risky moment (between a checkpoint's rename
and the pruning of the old ones, say) is reached every time.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, set_args, tiny_overrides
from safetensors.torch import load_file, save_file

from opd_fast import checkpoint as ckpt
from opd_fast.checkpoint import CheckpointError
from opd_fast.cli import main
from opd_fast.config import load_config
from opd_fast.run_folder import OutputDirError, clean_stale_temps
from opd_fast.teachers import TeacherError
from opd_fast.trainer import Trainer, TrainingError

TINY = str(ROOT / "configs" / "tiny.yaml")
ROUNDS = 4
# every round checkpointed, one kept: each save renames and prunes, the moments a kill hurts most
RUN = {"train.rounds": ROUNDS, "checkpoint.every": 1, "checkpoint.keep_last": 1}


def overrides(**extra) -> list[str]:
    return tiny_overrides(**{**RUN, **extra})


def config(**extra):
    return load_config(TINY, overrides(**extra))


@pytest.fixture
def one_thread():
    """One intra-op thread, as the subprocess runs of these tests have (OMP_NUM_THREADS=1): the same reductions in
    the same order, so a run resumed in this process ends bit-identical to one run elsewhere."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def child_env(**extra) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    env.pop("OPD_FAST_FAULT", None)
    return {**env, **extra}


def cli(out, *args, env=None, resume=False, **extra) -> subprocess.CompletedProcess:
    """`opd-fast train` of the tiny default into `out` in a process of its own."""
    cmd = [sys.executable, "-m", "opd_fast.cli", "train", TINY, "--out", str(out), *set_args(overrides(**extra))]
    cmd += list(args) + (["--resume"] if resume else [])
    return subprocess.run(
        cmd, check=False, cwd=ROOT, env=env or child_env(), capture_output=True, text=True, timeout=600
    )


def weights(out) -> dict[str, torch.Tensor]:
    """The exported student and EMA LoRAs of a finished run."""
    return {
        f"{name}/{k}": v
        for name in ("lora_diffusers", "lora_diffusers_ema")
        for k, v in load_file(str(out / name / "pytorch_lora_weights.safetensors")).items()
    }


def assert_same_weights(a, b) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def steps_logged(out) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def leftovers(out) -> list[str]:
    """Temporary files and folders of writers, anywhere in the run folder."""
    return [p.name for p in out.rglob(".*") if ".tmp" in p.name or ".old" in p.name]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, in a process of its own (one thread)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    done = cli(out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


# -- one writer ------------------------------------------------------------------------------------------------------
HOLD_LOCK = "import sys; from opd_fast.run_folder import RunLock; RunLock(sys.argv[1]).acquire(); print('held', flush=True); sys.stdin.read()"


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holder_leaves_no_lock(tmp_path, tiny_config):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out)], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        who = rf"in use by another run \(host {socket.gethostname()}, pid {holder.pid}, since "
        with pytest.raises(OutputDirError, match=who):
            Trainer.build(tiny_config(), out, device="cpu")
        with pytest.raises(OutputDirError, match=who):
            Trainer.build(tiny_config(), out, device="cpu", resume=True)
    finally:
        holder.kill()
        holder.wait()
    # the lock died with its holder: no stale lock to clear by hand
    trainer = Trainer.build(tiny_config(**{"train.rounds": 1}), out, device="cpu")
    try:
        trainer.fit()
        # a live run holds its folder for its whole life: a second start, resume or not, is refused
        for resume in (False, True):
            refused = cli(out, resume=resume)
            assert refused.returncode == 2, refused.stderr[-3000:]
            assert f"pid {os.getpid()}, since" in refused.stderr and "Traceback" not in refused.stderr
    finally:
        trainer.close()
    assert steps_logged(out) == [1]


# -- kill -9 at the moments that matter ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "point",
    [
        "checkpoint.written:2",  # round 2's checkpoint complete under its temporary name
        "checkpoint.renamed:2",  # renamed into place, round 1's not yet pruned
        "checkpoint.pruning:1",  # round 1's pruned, mid-prune
        "round.done:3",  # round 3 logged, not checkpointed
        "export.written:1",  # the final checkpoint written, the LoRA export under its temporary name
    ],
)
def test_a_run_killed_at_any_point_resumes_to_the_uninterrupted_weights(point, reference, tmp_path, one_thread):
    out = tmp_path / "run"
    killed = cli(out, env=child_env(OPD_FAST_FAULT=f"kill:{point}"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    stale = leftovers(out)
    if point.startswith(("checkpoint.written", "export.written")):
        assert stale, "the kill should have left a writer's temporary folder"
    trainer = Trainer.build(config(), out, device="cpu", resume=True)
    assert leftovers(out) == []  # cleaned at start: the lock says their writer is gone
    trainer.fit()
    trainer.close()
    assert_same_weights(out, reference)
    assert steps_logged(out) == list(range(1, ROUNDS + 1))
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step_00000003", "step_00000004"]


def test_a_checkpoint_left_half_replaced_is_put_back(tmp_path):
    """A writer that died between moving a checkpoint aside (to replace it with a re-save of the same round) and
    renaming the new one in: only the old copy holds that round, so it is restored, not deleted."""
    root = tmp_path / "checkpoints"
    (root / ".step_00000002.old123").mkdir(parents=True)
    (root / ".step_00000002.old123" / "state.json").write_text("{}")
    (root / ".step_00000002.tmp123").mkdir()
    (root / ".step_00000003.tmp77").mkdir()
    (tmp_path / ".lora_diffusers.tmp77").mkdir()
    (tmp_path / ".run.json.tmp77").write_text("{")
    removed = clean_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == [
        ".lora_diffusers.tmp77",
        ".run.json.tmp77",
        ".step_00000002.tmp123",
        ".step_00000003.tmp77",
    ]
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002"]
    assert (root / "step_00000002" / "state.json").read_text() == "{}"


# -- checkpoints that prove what they hold ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def three_kept(tmp_path_factory):
    """A run of ROUNDS rounds with every checkpoint kept (in this process, one thread)."""
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("kept") / "run"
        trainer = Trainer.build(config(**{"checkpoint.keep_last": ROUNDS}), out, device="cpu")
        trainer.fit()
        trainer.close()
        other = tmp_path_factory.mktemp("other") / "run"  # another run: another learning rate
        trainer = Trainer.build(config(**{"checkpoint.keep_last": ROUNDS, "optimizer.lr": 1e-3}), other, device="cpu")
        trainer.fit()
        trainer.close()
    finally:
        torch.set_num_threads(torch_threads)
    return out, other


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


def _overwrite_floats(path):
    """Four floats of a tensor changed in place: same size, other bytes (what only a checksum sees)."""
    tensors = load_file(str(path))
    name = min(tensors)
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    start = header + json.loads(data[8:header])[name]["data_offsets"][0]
    data[start : start + 16] = torch.full((4,), 123.0).numpy().tobytes()
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated tensors": (lambda c: _truncate(c / "student.safetensors"), r"student\.safetensors has \d+ bytes"),
    "four floats overwritten": (
        lambda c: _overwrite_floats(c / "optimizer.safetensors"),
        r"optimizer\.safetensors fails its sha256 checksum",
    ),
    "truncated state.json": (lambda c: _truncate(c / "state.json"), r"state\.json has \d+ bytes"),
    "no optimizer state": (lambda c: (c / "optimizer.safetensors").unlink(), r"optimizer\.safetensors is missing"),
    "no EMA": (lambda c: (c / "ema.safetensors").unlink(), r"ema\.safetensors is missing"),
    "no manifest": (lambda c: (c / "manifest.json").unlink(), r"no manifest\.json"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_latest_checkpoint_is_skipped_by_name_and_the_previous_one_resumes(
    damage, three_kept, tmp_path, one_thread, caplog
):
    kept, _ = three_kept
    out = tmp_path / "run"
    shutil.copytree(kept, out)
    harm, why = DAMAGE[damage]
    harm(ckpt.checkpoint_path(out, ROUNDS))
    trainer = Trainer.build(config(**{"checkpoint.keep_last": ROUNDS}), out, device="cpu", resume=True)
    assert trainer.round == ROUNDS - 1
    assert any(f"step_{ROUNDS:08d}" in r.message and r.levelname == "WARNING" for r in caplog.records)
    assert any(re.search(why, r.message) for r in caplog.records), caplog.text
    trainer.fit()
    trainer.close()
    assert_same_weights(out, kept)  # round ROUNDS again, from round ROUNDS - 1: the same weights


def test_foreign_and_misnamed_checkpoints_are_refused_by_name(three_kept, tmp_path, one_thread, caplog):
    kept, other = three_kept
    out = tmp_path / "run"
    shutil.copytree(kept, out)
    # another run's checkpoint dropped in as the newest; one of ours copied under a later round's name
    shutil.copytree(ckpt.checkpoint_path(other, 2), ckpt.checkpoint_path(out, 14))
    shutil.copytree(ckpt.checkpoint_path(out, 2), ckpt.checkpoint_path(out, 9))
    trainer = Trainer.build(config(**{"checkpoint.keep_last": ROUNDS}), out, device="cpu", resume=True)
    trainer.close()
    assert trainer.round == ROUNDS
    assert "step_00000014: written by another run" in caplog.text
    assert "step_00000009: holds round 2, not the round of its name" in caplog.text


def test_no_checkpoint_that_verifies_is_an_error_naming_each(three_kept, tmp_path, capsys):
    kept, _ = three_kept
    out = tmp_path / "run"
    shutil.copytree(kept, out)
    for path in ckpt.list_checkpoints(out):
        (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* can be resumed: step_00000004: no manifest"):
        Trainer.build(config(**{"checkpoint.keep_last": ROUNDS}), out, device="cpu", resume=True)
    code = main(["train", TINY, "--out", str(out), "--resume", *set_args(overrides(**{"checkpoint.keep_last": 4}))])
    err = capsys.readouterr().err
    assert code == 2 and "can be resumed" in err and "Traceback" not in err


# -- only good states are checkpointed -------------------------------------------------------------------------------
def test_a_diverged_run_checkpoints_nothing_after_it_and_names_no_bad_checkpoint_as_good(tmp_path):
    """lr 1e30: round 1's loss is finite but its step blows the weights up; every later round is non-finite."""
    out = tmp_path / "run"
    trainer = Trainer.build(config(**{"optimizer.lr": 1e30, "train.rounds": 8}), out, device="cpu")
    with pytest.raises(TrainingError) as stop:
        trainer.fit()
    trainer.close()
    message = str(stop.value)
    assert "computed at the weights of round 1: its checkpoint is set aside" in message
    assert "No checkpoint holds a state known to be good" in message
    # nothing was checkpointed during the streak, and the one checkpoint (blown-up weights) is out of --resume's way
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["nonfinite_step_00000001"]
    assert (
        json.loads((out / "checkpoints" / "nonfinite_step_00000001" / "state.json").read_text())["max_abs_weight"]
        > 1e20
    )


def test_pruning_keeps_the_newest_good_checkpoint_and_the_stop_names_it(tmp_path):
    """keep_last 1, two good rounds, then a teacher that turns NaN: round 2's checkpoint holds the weights the NaN
    rounds ran at; round 1's (kept by the pruning although keep_last is 1) is the last good one, and --resume takes
    it."""
    out = tmp_path / "run"
    trainer = Trainer.build(config(**{"train.rounds": 8}), out, device="cpu")
    teacher = trainer.teachers["ocr"].model
    teacher.register_forward_hook(lambda m, i, o: (o[0] * float("nan"),) if trainer.round >= 2 else o)
    with pytest.raises(TrainingError, match=r"The last good checkpoint is .*step_00000001 \(round 1, loss"):
        trainer.fit()
    trainer.close()
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["nonfinite_step_00000002", "step_00000001"]
    resumed = Trainer.build(config(**{"train.rounds": 8}), out, device="cpu", resume=True)
    resumed.close()
    assert resumed.round == 1


# -- a full disk, a read-only folder -----------------------------------------------------------------------------
def _pages(path) -> int:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in files)


def _namespace_sh(script: str) -> subprocess.CompletedProcess:
    """`sh -c script` as root of a user and mount namespace of its own, where tmpfs can be mounted unprivileged."""
    return subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
        check=False,
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def _can_mount_tmpfs() -> str | None:
    if shutil.which("unshare") is None:
        return "no unshare command on this machine"
    probe = _namespace_sh('d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs "$d"')
    return None if probe.returncode == 0 else f"cannot mount a tmpfs in a user namespace here ({probe.stderr.strip()})"


def test_a_full_disk_stops_with_one_line_and_the_last_checkpoint_resumes(reference, tmp_path, one_thread):
    why = _can_mount_tmpfs()
    if why:
        pytest.skip(why)
    # room for the run's files and round 1's checkpoint, not for round 2's beside it
    checkpoint = _pages(ckpt.checkpoint_path(reference, ROUNDS))
    size = _pages(reference / "embeddings") + 3 * 4096 + checkpoint + checkpoint // 2
    disk, kept = tmp_path / "disk", tmp_path / "kept"
    disk.mkdir()
    cmd = " ".join(
        [sys.executable, "-m", "opd_fast.cli", "train", TINY, "--out", f"{disk}/run", *set_args(overrides())]
    )
    done = _namespace_sh(
        f"mount -t tmpfs -o size={size} tmpfs {disk} && {cmd}; echo $? > {tmp_path}/rc; cp -a {disk}/run {kept}"
    )
    assert (tmp_path / "rc").read_text().strip() == "2", done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("opd-fast: error: could not write the checkpoint of round 2: No space left on device")
    assert "step_00000001 is intact" in last and "Traceback" not in done.stderr
    assert leftovers(kept) == [] and [p.name for p in ckpt.list_checkpoints(kept)] == ["step_00000001"]
    trainer = Trainer.build(config(), kept, device="cpu", resume=True)
    trainer.fit()
    trainer.close()
    assert_same_weights(kept, reference)


def test_a_read_only_out_is_one_line(tmp_path):
    why = _can_mount_tmpfs()
    if why:
        pytest.skip(why)
    ro = tmp_path / "ro"
    ro.mkdir()
    cmd = " ".join([sys.executable, "-m", "opd_fast.cli", "train", TINY, "--out", f"{ro}/run"])
    done = _namespace_sh(f"mount -t tmpfs -o ro tmpfs {ro} && {cmd}")
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"opd-fast: error: --out {ro}/run: it is on a read-only filesystem; cannot write the run there"
    )


# -- one clear line for every fault ----------------------------------------------------------------------------------
def _full_teacher_with_a_wrong_shape(tmp_path):
    folder = tmp_path / "full"
    shutil.copytree(ROOT / "configs" / "tiny" / "teachers" / "aesthetic", folder)
    weights_file = folder / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights_file))
    name = next(k for k, v in tensors.items() if v.ndim == 2)
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, str(weights_file))
    return folder


def _int32_lora(tmp_path):
    folder = tmp_path / "int_lora"
    shutil.copytree(ROOT / "configs" / "tiny" / "teachers" / "ocr", folder)
    weights_file = folder / "pytorch_lora_weights.safetensors"
    save_file({k: v.to(torch.int32) for k, v in load_file(str(weights_file)).items()}, str(weights_file))
    return folder


def test_every_fault_is_one_line_naming_what(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b'a sign that says "ok"\n\xff\xfe binary\n')
    (tmp_path / "a_file").write_text("x")
    os.symlink(tmp_path / "loop2", tmp_path / "loop1")
    os.symlink(tmp_path / "loop1", tmp_path / "loop2")
    full = _full_teacher_with_a_wrong_shape(tmp_path)
    cases = [
        (["train", TINY, "--out", str(tmp_path / "r1"), "--set", f"tasks.1.prompts={bad}"], f"{bad}:2: not UTF-8"),
        (["sample", TINY, "--prompts", str(bad), "--out", str(tmp_path / "s")], f"{bad}:2: not UTF-8 text"),
        (["train", TINY, "--out", str(tmp_path / "a_file")], "is a file, not a folder"),
        (["train", TINY, "--out", str(tmp_path / "loop1")], "a symbolic link loop"),
        (["train", TINY, "--out", str(tmp_path / "r2"), "--set", "train.rounds=[1,2"], "--set train.rounds: the value"),
        (["train", TINY, "--out", str(tmp_path / "r3"), "--set", "model.preset=nope"], "model.preset: 'nope' is not"),
        (
            ["train", TINY, "--out", str(tmp_path / "r4"), "--set", f"tasks.2.teacher.path={full}"],
            "task 'aesthetic'",
        ),
    ]
    for args, expected in cases:
        code = main(args)
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        lines = err.strip().splitlines()
        assert lines[-1].startswith("opd-fast: error: ") and expected in lines[-1], (args, err)
        assert "Traceback" not in err


def test_teacher_weights_that_are_not_floating_point_are_refused(tmp_path, tiny_config):
    with pytest.raises(TeacherError, match=r"stored as torch\.int32; LoRA weights are floating point"):
        Trainer.build(tiny_config(**{"tasks.1.teacher.path": str(_int32_lora(tmp_path))}), tmp_path / "r", device="cpu")


@pytest.mark.parametrize("value", [".nan", ".inf", "1e30", "-1"])
def test_a_guidance_that_cannot_train_is_refused_by_name(value):
    from opd_fast.config import ConfigError

    for key in ("student.guidance", "tasks.0.teacher.guidance"):
        with pytest.raises(ConfigError, match=rf"{key}: a CFG scale must be a finite number in \[0, 100\]"):
            load_config(TINY, [f"{key}={value}"])
