"""The GPU check's plan (bench/gpu_run.py, run by bench/gpu_all.sh) holds on the CPU before a GPU minute is spent:
the first command fits 8 minutes in the order asked, every step's command is valid here (its pytest selection
collects the tests it is for, its script parses its arguments, the bandwidth step's functions run on CPU tensors,
the trace step runs end to end on the tiny preset), and the runner keeps its promises: each step under its own
deadline, the summary rewritten after every step, a failing or hanging step not stopping the later ones."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_run

FIRST = ["preflight", "kernels", "tests", "bandwidth", "round512", "fp8_sd35m"]
# The CUDA-only tests the `tests` step is for (by name: a rename must fail here, not on the GPU)
CUDA_TESTS = [
    "test_teacher_runtime.py::test_side_stream_gives_the_serial_result_on_cuda[model]",
    "test_teacher_runtime.py::test_side_stream_gives_the_serial_result_on_cuda[fp8]",
    "test_teacher_runtime.py::test_pipelined_micro_batch_does_not_synchronise_the_host",
    "test_fp8.py::test_fp8_linear_on_cuda_equals_its_dequantized_twin[rowwise]",
    "test_fp8.py::test_fp8_linear_on_cuda_equals_its_dequantized_twin[tensorwise]",
    "test_fp8.py::test_fused_activation_quantization_on_cuda_equals_the_eager_one[rowwise]",
    "test_fp8.py::test_fused_activation_quantization_on_cuda_equals_the_eager_one[tensorwise]",
    "test_attention.py::test_attention_backend_on_cuda_matches_sdpa[sd3-cudnn]",
]


@pytest.fixture(scope="module")
def steps(tmp_path_factory) -> dict[str, gpu_run.Step]:
    return {s.name: s for s in gpu_run.plan(tmp_path_factory.mktemp("logs"))}


def python_commands(step: gpu_run.Step) -> list[list[str]]:
    """The python command lines of a step (the target of ncu included), from the interpreter on."""
    out = []
    for argv in step.commands():
        if sys.executable in argv:
            out.append(argv[argv.index(sys.executable) :])
    return out


# -- the plan ---------------------------------------------------------------------------------------------------


def test_first_command_fits_eight_minutes_in_the_asked_order(steps):
    first = gpu_run.select(list(steps.values()), [])
    assert [s.name for s in first] == FIRST
    assert sum(s.budget_s for s in first) <= gpu_run.FIRST_COMMAND_LIMIT_S == 480
    for step in steps.values():
        assert step.budget_s > 0 and len(step.why) > 40, step.name  # a budget, and the reasoning next to it
        assert step.commands() or step.action is not None, step.name
    ladder = steps["round512"].argv
    assert ladder[ladder.index("--variants") + 1].split(",") == [
        "official",
        "one_pass",
        "fused",
        "merged",
        "fp8",
        "side",
        "cudnn",
        "task_batch",
    ]
    for flag, value in [("--warmup", "1"), ("--rounds", "2"), ("--resolution", "512"), ("--preset", "sd3.5-medium")]:
        assert ladder[ladder.index(flag) + 1] == value
    assert "--per-layer" not in steps["fp8_sd35m"].argv


def test_named_steps_run_after_the_preflight(steps):
    chosen = gpu_run.select(list(steps.values()), ["round1024", "profile"])
    assert [s.name for s in chosen] == ["preflight", "round1024", "ncu", "trace"]
    assert [s.name for s in gpu_run.select(list(steps.values()), ["engine"], preflight_first=False)] == ["engine"]
    with pytest.raises(SystemExit, match="unknown step"):
        gpu_run.select(list(steps.values()), ["round2048"])
    deferred = {s.name for s in steps.values() if not s.first}
    assert {"round1024", "engine", "fp8_flux", "round512_extra", "ncu", "trace"} <= deferred


def test_dry_run_prints_every_step_with_its_budget_and_the_total(steps):
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", "bench/gpu_all.sh", "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    first = [steps[name] for name in FIRST]
    for i, step in enumerate(first, 1):
        assert f"{i}. {step.name}: budget {step.budget_s} s" in proc.stdout
    assert f"total: {sum(s.budget_s for s in first)} s (limit 480 s)" in proc.stdout
    assert "bench/bench_round.py --preset sd3.5-medium" in proc.stdout and "later commands" in proc.stdout
    proc = subprocess.run(
        ["bash", "bench/gpu_all.sh", "--dry-run", "engine"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0 and "2. engine: budget" in proc.stdout
    assert f"total: {steps['preflight'].budget_s + steps['engine'].budget_s} s" in proc.stdout


# -- every step's command is valid here --------------------------------------------------------------------------


def collect(args: list[str]) -> subprocess.Popen:
    """pytest --collect-only with a step's own arguments, started (several run at once)."""
    argv = [sys.executable, "-m", "pytest", "--collect-only", "-q", *(a for a in args if a != "-q")]  # ids, one a line
    return subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def collected(proc: subprocess.Popen) -> set[str]:
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    return {line.strip() for line in out.splitlines() if "::" in line}


def test_pytest_selections_collect_the_tests_they_are_for(steps):
    def pytest_args(argv):
        return argv[argv.index("pytest") + 1 :]

    groups = [collect(pytest_args(argv)) for argv in steps["kernels"].parallel]
    cuda = collect(pytest_args(steps["tests"].argv))
    parts = [collected(p) for p in groups]
    assert all(parts), "a Triton test group collects nothing"
    # float32 | bfloat16 | float16-not-bfloat16 | neither: together every `-k triton` test by construction; here, once
    union = set().union(*parts)
    assert sum(len(p) for p in parts) == len(union) and all("triton" in t for t in union)
    assert any("test_backend_matches_reference[triton-" in t for t in union)
    ids = collected(cuda)
    missing = [t for t in CUDA_TESTS if not any(i.endswith(t) for i in ids)]
    assert not missing, f"the `tests` step would not run: {missing}"
    # a test that needs a machine WITHOUT CUDA stays out
    assert not any("test_a_start_that_fails_names_the_key" in i for i in ids)


class _Parsed(Exception):
    def __init__(self, namespace):
        self.namespace = namespace


def parse_only(script: str, args: list[str], monkeypatch) -> argparse.Namespace:
    """The script's own argparse run on `args`, stopped before the script does anything else."""
    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, argv=None, namespace=None):
        raise _Parsed(original(self, argv, namespace))

    module = importlib.import_module(Path(script).stem)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    monkeypatch.setattr(sys, "argv", [script, *args])
    with pytest.raises(_Parsed) as parsed:
        module.main()
    monkeypatch.undo()
    return parsed.value.namespace


def test_every_script_accepts_the_plans_arguments(steps, monkeypatch):
    seen = set()
    for step in steps.values():
        for argv in python_commands(step):
            if argv[1] == "-m":
                continue  # pytest: test_pytest_selections_collect_the_tests_they_are_for
            script, args = argv[1], argv[2:]
            assert (ROOT / script).is_file(), (step.name, script)
            ns = parse_only(script, args, monkeypatch)
            seen.add(step.name)
            if script.endswith("bench_round.py"):
                import bench_round

                known = {key for key, *_ in bench_round.LADDER + bench_round.ALTERNATIVES}
                unknown = set(ns.variants.split(",")) - known
                assert not unknown, f"{step.name}: bench_round has no variant {unknown}"
            if script.endswith("bench_engine.py"):
                import bench_engine

                assert set(ns.variants.split(",")) <= set(bench_engine.VARIANTS)
    assert {"bandwidth", "round512", "fp8_sd35m", "round1024", "engine", "fp8_flux", "ncu", "trace"} <= seen


def test_bandwidth_step_runs_on_cpu_tensors(tmp_path):
    # bench/gpu_check.py --quick's measurement at SD3.5-M's latent shapes, with a plain timer on CPU tensors (Triton
    # through its interpreter): the GPU run meets no stale signature, and the report and targets line render.
    import gpu_check

    from opd_fast import ops

    backends = ["triton"] + [b for b in ops.available_backends("cpu") if b == "cpp"]
    rows, meta = gpu_check.benchmark(
        tmp_path, gpu_check.QUICK_CASES, device="cpu", backends=backends, copy_bytes=1 << 20
    )
    per_case = 3 * (1 + 2 * len(backends))  # modes x (reference op + each backend's op and kernels)
    assert len(rows) == per_case * len(gpu_check.QUICK_CASES)
    cfg = next(r for r in rows if r["case"].endswith("CFG-stacked") and r["mode"] == "backward")
    plain = next(r for r in rows if r["case"] == "SD3.5-M 512 px" and r["mode"] == "backward")
    assert cfg["bytes"] == 2 * plain["bytes"]  # two velocity rows per sample: twice the traffic
    assert all(r["ms"] > 0 and r["gb_per_s"] > 0 for r in rows)
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["targets"]["line"].startswith("targets: ") and report["targets"]["pass"] in (True, False)
    gpu_check.write_report(tmp_path, rows, meta)
    # what the runner makes of it: the table in the summary, the targets line as the verdict's detail
    step = gpu_run.Step(
        "bandwidth", 35, "", argv=[sys.executable, "bench/gpu_check.py", "--quick", "--out", str(tmp_path)]
    )
    run = gpu_run.Run([step], tmp_path / "logs", None)
    run.log_of(step).write_text("$ python bench/gpu_check.py --quick\n")
    judged = gpu_run.judge_bandwidth(run, step, gpu_run.Outcome("PASS", rc=0))
    assert judged.verdict == ("PASS" if report["targets"]["pass"] else "FAIL")
    assert "targets: " in judged.detail and "| triton kernels | SD3.5-M 1024 px |" in judged.raw


def test_judges_read_what_the_scripts_write(tmp_path):
    # The ladder's report in bench_round's own format (its table and verdict functions), an FP8 JSON as
    # fp8_accuracy writes it, ncu's text: the verdicts and the figures the summary carries.
    import bench_round

    row = dict(
        round_s=10.0,
        images_per_s=0.9,
        phases_s={p: 1.0 for p in bench_round.PHASES},
        peak_gb=40.0,
        teacher_mb=9000.0,
        loss0=1.0,
        grad_cos=1.0,
        precision="model",
        backend="triton",
    )
    results = {
        "official-like": row,
        "+ FP8 teachers": dict(row, round_s=4.0, loss0=1.02, precision="fp8"),
        "+ side stream": {"skipped": "skipped: no CUDA stream"},
    }
    md = tmp_path / "round512.md"
    md.write_text(bench_round.table(results, 1e15, 1e15) + "\n\n" + bench_round.verdict(results) + "\n")
    run = gpu_run.Run([], tmp_path / "logs", None)
    step = gpu_run.Step("round512", 180, "", argv=["python", "--variants", "official,fp8", "--md", str(md)])
    judged = gpu_run.judge_ladder(run, step, gpu_run.Outcome("PASS", rc=0))
    assert judged.verdict == "PASS" and judged.detail.startswith("target: 2.50x")
    assert "| official-like |" in judged.raw
    md.write_text(bench_round.verdict(dict(results, **{"+ FP8 teachers": dict(row, round_s=8.0)})) + "\n")
    assert gpu_run.judge_ladder(run, step, gpu_run.Outcome("PASS", rc=0)).verdict == "FAIL"  # 1.25x < 2x

    fp8 = tmp_path / "fp8.json"
    fp8.write_text(
        json.dumps(
            {
                "preset": "sd3.5-medium",
                "resolution": 512,
                "device": "cuda",
                "teachers": {
                    "bf16": {"vs_fp32": 0.02, "vs_bf16": 0.0},
                    "fp8 torch rowwise": {"vs_fp32": 0.03, "vs_bf16": 0.025},
                    "fp8 torch tensorwise": {"error": "RuntimeError: no"},
                },
            }
        )
    )
    step = gpu_run.Step("fp8_sd35m", 45, "", argv=["python", "--json", str(fp8)])
    judged = gpu_run.judge_fp8(run, step, gpu_run.Outcome("PASS", rc=0))
    assert (
        judged.verdict == "FAIL"
        and "fp8 torch tensorwise" in judged.detail
        and "| fp8 torch rowwise | 0.0300 |" in judged.raw
    )

    step = gpu_run.Step("ncu", 60, "", argv=["ncu", "-o", str(tmp_path / "logs" / "ncu" / "fused"), "python"])
    run.log_of(step).write_text(
        '==PROF== Profiling "opd_step_fwd_kernel" - 0: 0%....50%....100% - 40 passes\n'
        "  opd_step_fwd_kernel (96, 3, 1)x(256, 1, 1), Context 1, Stream 7, Device 0, CC 9.0\n"
        "    Section: GPU Speed Of Light Throughput\n"
        "    DRAM Throughput                     %        78.07\n"
        "    Section: Memory Workload Analysis\n"
        "    Memory Throughput             Tbyte/s         3.36\n"
    )
    judged = gpu_run.judge_ncu(run, step, gpu_run.Outcome("PASS", rc=0))
    assert judged.verdict == "PASS" and "DRAM Throughput % 78.07" in judged.detail and "Tbyte/s 3.36" in judged.detail


# -- the runner ----------------------------------------------------------------------------------------------------


def test_summary_is_rewritten_after_every_step_and_a_failure_stops_nothing(tmp_path):
    logs, out = tmp_path / "logs", tmp_path / "out"
    py, pidfile = sys.executable, tmp_path / "grandchild.pid"
    hang = (
        f"import subprocess, time; p = subprocess.Popen(['sleep', '60']); "
        f"open({str(pidfile)!r}, 'w').write(str(p.pid)); time.sleep(60)"
    )
    plan = [  # the hanging step first: it would get the time a quicker step before it left (deadlines accumulate)
        gpu_run.Step("hangs", 6, "a step that hangs, with a child of its own", argv=[py, "-c", hang]),
        gpu_run.Step("fails", 20, "a step that fails", argv=[py, "-c", "import sys; print('boom'); sys.exit(3)"]),
        gpu_run.Step(
            "later",
            20,
            "reads the summary as it stands when it starts",
            argv=[py, "-c", f"print(open({str(out / 'summary.md')!r}).read())"],
        ),
        gpu_run.Step(
            "parts",
            20,
            "two pytest-like parts at once",
            parallel=[[py, "-c", "print('1 passed in 0.1s')"], [py, "-c", "print('2 passed, 1 skipped in 1s')"]],
            judge=gpu_run.judge_pytest,
        ),
    ]
    t0 = time.monotonic()
    run = gpu_run.Run(plan, logs, out)
    results = run.execute()
    assert time.monotonic() - t0 < sum(s.budget_s for s in plan)
    assert [(s.name, o.verdict) for s, o in results] == [
        ("hangs", "TIMEOUT"),
        ("fails", "FAIL"),
        ("later", "PASS"),
        ("parts", "PASS"),
    ]
    assert results[0][1].seconds <= 6  # stopped within its budget, the SIGTERM grace included
    assert "exit 3: boom" in results[1][1].detail and "3 passed, 1 skipped" in results[3][1].detail
    seen_by_later = (logs / "later.log").read_text()
    assert "| fails | FAIL |" in seen_by_later and "| hangs | TIMEOUT |" in seen_by_later
    summary = (out / "summary.md").read_text()
    for row in ("| hangs | TIMEOUT |", "| fails | FAIL |", "| later | PASS |", "| parts | PASS |"):
        assert row in summary
    assert not (out / "running.log").exists()  # moved into the logs once the step ended
    with tarfile.open(out / "logs.tar.gz") as tar:
        assert {"logs/fails.log", "logs/hangs.log", "logs/summary.md"} <= set(tar.getnames())
    # the hanging step's whole process group was stopped, its child too
    stat = Path(f"/proc/{pidfile.read_text()}/stat")
    assert not stat.exists() or stat.read_text().split(")")[1].split()[0] in ("Z", "X")


def test_background_build_is_reported_or_stopped(tmp_path, monkeypatch):
    run = gpu_run.Run([], tmp_path / "logs", None)
    monkeypatch.setattr(gpu_run, "BUILD_ARGS", ["-c", "print('built')"])
    run.start_build()
    assert run.build_state(wait_until=time.monotonic() + 60).verdict == "PASS"
    monkeypatch.setattr(gpu_run, "BUILD_ARGS", ["-c", "import time; time.sleep(60)"])
    run = gpu_run.Run([], tmp_path / "logs2", None)
    run.start_build()
    assert run.build_state().verdict == "RUNNING"
    run.stop_build()
    assert run.build_state().verdict == "TIMEOUT" and run.build.poll() is not None


def test_preflight_names_what_imports(tmp_path, steps):
    # The preflight step itself, on this machine: every module the GPU run needs imports in this environment, so
    # a name in MODULES cannot be misspelt; no wheel is installed because none is missing.
    run = gpu_run.Run([steps["preflight"]], tmp_path / "logs", None)
    ((_, outcome),) = run.execute()
    assert outcome.verdict == "PASS", outcome.detail
    assert all(f"{m} " in outcome.detail for m in gpu_run.MODULES)
    assert run.build is None  # nothing in this plan needs the extension


def test_torch_profiler_sees_the_phase_ranges(monkeypatch):
    from opd_fast import profiling

    with (
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof,
        profiling.nvtx_range("task:demo"),
        profiling.phase("teacher"),
    ):
        torch.ones(4).sum()
    assert {"task:demo", "teacher"} <= {e.key for e in prof.key_averages()}

    def refuse(name):
        raise AssertionError("record_function opened while no profiler records")

    monkeypatch.setattr(torch.profiler, "record_function", refuse)
    timer = profiling.PhaseTimer("cpu")
    with profiling.phase("loss", timer):
        torch.ones(4).sum()
    assert "loss" in timer.read()


def test_trace_step_runs_end_to_end_on_the_cpu(tmp_path, steps):
    # The `trace` step as the runner runs it, on the tiny preset on the CPU: a Trainer round under torch.profiler,
    # the phase table, the gzipped trace sent to $OUT.
    step = steps["trace"]
    argv = list(step.argv)
    for flag, value in [
        ("--preset", "tiny-sd3"),
        ("--device", "cpu"),
        ("--resolution", "64"),
        ("--out", str(tmp_path / "logs" / "trace")),
    ]:
        argv[argv.index(flag) + 1] = value
    cpu_step = gpu_run.Step(
        "trace", 300, step.why, argv=argv + ["--warmup", "0", "--prompts", "2"], judge=gpu_run.judge_trace
    )
    run = gpu_run.Run([cpu_step], tmp_path / "logs", tmp_path / "out")
    ((_, outcome),) = run.execute()
    assert outcome.verdict == "PASS", (outcome.detail, (tmp_path / "logs" / "trace.log").read_text()[-3000:])
    for phase in ("teacher", "student_forward", "loss", "backward", "optimizer", "task:ocr"):
        assert f"| {phase} |" in outcome.raw
    assert (tmp_path / "out" / "trace.json.gz").is_file() and "$OUT/trace.json.gz" in outcome.raw
