"""The benchmark scripts run end to end on the CPU, so a GPU session spends its minutes measuring, not debugging, and
what they report holds: the round ladder keeps the loss of the official-like schedule (the reference: two-pass,
adapter swaps on the student, the reference opd_step), the engine benchmark's ZeRO-3 student trains, the FP8 accuracy
script's errors are ordered as FP8 numerics must be. Each runs as its own process, as users run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import needs_cpu_rowwise

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args: str, timeout: int = 300) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, f"{args[0]} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


@needs_cpu_rowwise
def test_round_ladder_keeps_the_official_loss(tmp_path):
    out = tmp_path / "round.json"
    stdout = run_script(
        "bench/bench_round.py",
        "--rounds",
        "1",
        "--warmup",
        "0",
        "--prompts",
        "2",
        "--variants",
        "official,one_pass,fused,merged,fp8,side",
        "--json",
        str(out),
        "--md",
        str(tmp_path / "round.md"),
    )
    assert (tmp_path / "round.md").read_text().strip() in stdout  # the --md report is the printed one
    report = json.loads(out.read_text())
    rows = report["results"]
    official = rows["official-like"]
    assert official["loss0"] > 0 and report["round_flops"] > 0
    # Same arithmetic in float32 up to summation order (one-pass, fused kernel) and W + BA vs W x + B(A x) rounding
    for label in ("+ one-pass", "+ fused opd_step", "+ merged teacher copies"):
        assert rows[label]["loss0"] == pytest.approx(official["loss0"], rel=1e-4), label
        assert rows[label]["grad_cos"] > 1 - 1e-6, label
    assert rows["+ fused opd_step"]["backend"] != "reference"
    # FP8 teachers change the teacher's velocity, so the loss moves, but within the tolerance the table states
    fp8 = rows["+ FP8 teachers"]
    assert 1e-4 < abs(fp8["loss0"] / official["loss0"] - 1) < 0.05
    assert 0.9 < fp8["grad_cos"] < 1 - 1e-6 and official["grad_cos"] == pytest.approx(1)
    assert fp8["teacher_mb"] < rows["+ merged teacher copies"]["teacher_mb"]
    assert "skipped" in rows["+ side stream"]  # no CUDA stream on a CPU: said, not timed
    for row in rows.values():
        if "round_s" in row:
            assert row["images_per_s"] == pytest.approx(3 * 2 / row["round_s"])
            assert 0 < sum(row["phases_s"].values())
    assert "| official-like |" in stdout and "target: " in stdout


@needs_cpu_rowwise
def test_fp8_accuracy_orders_the_errors(tmp_path):
    out = tmp_path / "fp8.json"
    run_script("bench/fp8_accuracy.py", "--batch", "2", "--json", str(out))
    teachers = json.loads(out.read_text())["teachers"]
    # FP8 on a float32 base is closer to float32 than bf16 is (e4m3 rowwise on the big GEMMs only) ...
    assert teachers["fp8 torch rowwise (fp32 base)"]["vs_fp32"] < teachers["bf16"]["vs_fp32"]
    for scaling in ("rowwise", "tensorwise"):
        row = teachers[f"fp8 torch {scaling}"]
        # ... and on a bf16 base it adds a nonzero error that stays well under the teachers' own scale
        assert 0 < row["vs_bf16"] < 0.1 and row["vs_fp32"] < 0.1


@needs_cpu_rowwise
def test_fp8_per_layer_sweep_names_every_family_s_layer_types(tmp_path):
    """--per-layer on Z-Image (its names: attention.to_*, feed_forward, adaLN_modulation, t_embedder): every linear
    has a layer type, the types its teachers quantize get an error, those Family.fp8_keep holds (the model reads
    their weights) are reported kept instead of crashing the sweep."""
    out = tmp_path / "fp8.json"
    stdout = run_script("bench/fp8_accuracy.py", "--preset", "tiny-z-image", "--per-layer", "--json", str(out))
    assert "linears of no listed type" not in stdout
    per_layer = json.loads(out.read_text())["per_layer"]
    assert per_layer["time/text embedders"] == {"kept": True} and per_layer["adaLN modulation"] == {"kept": True}
    for kind in ("attention q/k/v", "attention out", "MLP", "all"):
        assert 0 < per_layer[kind]["rowwise"] < 0.5, kind


def test_engine_bench_zero3_full_student(tmp_path):
    out = tmp_path / "engine.json"
    # The GPU command's variant (bench/bench_engine.py --preset sd3.5-medium --full --world 1 ... zero3) at tiny size
    run_script(
        "bench/bench_engine.py",
        "--full",
        "--world",
        "1",
        "--variants",
        "zero3",
        "--steps",
        "1",
        "--threads",
        "1",
        "--json",
        str(out),
    )
    (row,) = json.loads(out.read_text())
    assert row["variant"] == "zero3" and row["student"] == "full" and row["world"] == 1
    assert row["step_s"] > 0 and row["backwards"] == 9  # int(0.99 x 4 steps) x 3 tasks


def test_gpu_scripts_refuse_a_cpu_machine_at_once():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the GPU scripts would benchmark it")
    proc = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--out", os.devnull],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
    env = {**os.environ, "PYTHON": sys.executable}
    for args in ([], ["kernels"], ["round1024", "profile"]):  # the first command, and named steps
        proc = subprocess.run(
            ["bash", "bench/gpu_all.sh", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=False,
        )
        assert proc.returncode == 2 and "no CUDA device" in proc.stderr, (args, proc.stdout, proc.stderr)
        assert "===" not in proc.stdout  # no step started


def test_preset_arch_keeps_the_widths_and_cuts_the_blocks():
    import torch

    from opd_fast.families import FAMILIES, get_family, preset_arch

    for family in FAMILIES.values():  # every family's presets (its tiny one among them) are found by name
        assert family.tiny_preset in family.presets
        for name, kwargs in family.presets.items():
            assert preset_arch(name) == (family, kwargs)
    sd3 = get_family("sd3")
    # (preset, layers, blocks kept, the prefix of the only parameters that may change shape: SD3's last block is
    # context-pre-only, its context norm smaller)
    last_sd3 = "transformer_blocks.1.norm1_context."
    for preset, layers, blocks, last in [
        ("sd3.5-medium", 2, (2, 0), last_sd3),
        ("flux.1-dev", 1, (1, 2), None),
        ("tiny-sd3", 9, (2, 0), last_sd3),
    ]:
        family, kwargs = preset_arch(preset, layers)
        with torch.device("meta"):
            model = family.transformer_class(**kwargs)
            full = family.transformer_class(**family.presets[preset])
        assert (len(model.transformer_blocks), len(getattr(model, "single_transformer_blocks", []))) == blocks
        widths = {n: tuple(p.shape) for n, p in full.named_parameters()}
        differ = {n for n, p in model.named_parameters() if widths[n] != tuple(p.shape)}
        assert all(last is not None and n.startswith(last) for n in differ), (preset, differ)
    _, kwargs = preset_arch("sd3.5-medium", 2)
    assert kwargs["dual_attention_layers"] == (0, 1) and sd3.presets["sd3.5-medium"]["num_layers"] == 24


def test_make_bench_collects_the_microbenchmarks():
    # `make bench` once named the folder, where pytest's default pattern (test_*.py) finds nothing: exit code 5
    lines = (ROOT / "Makefile").read_text().splitlines()
    recipe = lines[lines.index(next(line for line in lines if line.startswith("bench:"))) + 1]
    args = recipe.split("-m pytest", 1)[1].split()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "test_opd_step[" in proc.stdout and "-cpp]" in proc.stdout


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_gpu_check_timed_functions_run_on_cpu_tensors(backend):
    # What bench/gpu_check.py times on the GPU ("op": opd_step + autograd; "kernels": the launchers on preallocated
    # buffers), run once each on CPU tensors (Triton through its interpreter), so the GPU run meets no stale signature:
    # SDE with all four tensors one dtype (the full table), ODE with float32 state and CFG-stacked bf16 velocities
    # (--quick, as the trainer feeds the op at SD3.5-M shapes).
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check

    from opd_fast import ops
    from opd_fast.ops.opd_step import fused

    if backend == "cpp" and "cpp" not in ops.available_backends(torch.device("cpu")):
        pytest.skip("the C++ extension opd_fast._C is not built")
    x, v_s, v_t, noise = (torch.randn(2, 4, 6, 6) + 0.1 for _ in range(4))
    v_s.requires_grad_(True)
    sigma = torch.tensor([0.9, 0.5])
    for kind in ("op", "kernels"):
        fns = gpu_check._timed_fns(ops, fused, backend, kind, x, v_s, v_t, noise, sigma, sigma - 0.1, torch.ones(2))
        assert sorted(fns) == sorted(gpu_check.MODES)
        for fn in fns.values():
            fn()
    case = dict(gpu_check.QUICK_CASES[1], shape=(2, 4, 6, 6))  # CFG-stacked, at a CPU-sized shape
    x, v_s, v_t, noise, sigma, sigma_next, g = gpu_check.make_inputs(case, torch.device("cpu"))
    assert v_s.shape[0] == 2 * x.shape[0] and v_s.dtype == torch.bfloat16 and x.dtype == torch.float32
    for kind in ("op", "kernels"):
        fns = gpu_check._timed_fns(
            ops,
            fused,
            backend,
            kind,
            x,
            v_s,
            v_t,
            noise,
            sigma,
            sigma_next,
            g,
            guidance=case["guidance"],
            noise_level=case["noise_level"],
        )
        for fn in fns.values():
            fn()
