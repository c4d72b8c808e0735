"""The GPU check as one command of at most 8 minutes on one H100/H200, then named steps for later commands.

    bench/gpu_all.sh                      # the first command: preflight kernels tests bandwidth round512 fp8_sd35m
    bench/gpu_all.sh round1024 engine     # named steps (a later command; preflight runs first unless --no-preflight)
    bench/gpu_all.sh --dry-run [STEP ...] # the plan: steps, commands, budgets and their reasoning, the total

Every step runs under its own timeout, in its own process group, and a step that fails or times out does not stop
the later ones. Step i must end by T0 + the budgets of steps 1..i (T0: the command's start), so a step that
finishes early leaves its time to the next, and the whole command ends within the sum of the budgets even if every
step hangs. After every step the summary (the verdict table, then each step's raw figures: kernel table, ladder
table, FP8 table, test outcomes) is rewritten, and with $OUT set (the device tool) $OUT gets summary.md and
logs.tar.gz (every log and JSON); the step that is running writes its log to $OUT/running.log, so a command cut short
from outside still returns what it was doing. The verdict table is printed last.

Verdicts: PASS (the step ran and its check holds), FAIL (it ran and the check failed, or it crashed: the detail
says which), TIMEOUT (cut at its deadline; what it wrote before is kept), SKIPPED (with the reason). Logs and JSON go
to $LOGS (default runs/gpu).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIRST_COMMAND_LIMIT_S = 480  # the first command must fit 8 minutes: the device tool's 10-minute cap minus start-up
KILL_GRACE_S = 3  # SIGTERM, then SIGKILL this much later
SITE = "/tmp/site"  # where the carried wheels are installed (the machine's own site-packages stays untouched)
MODULES = ("torch", "triton", "diffusers", "peft", "transformers", "deepspeed", "nvtx", "pytest_benchmark", "opd_fast")
LADDER_512 = "official,one_pass,fused,merged,fp8,side,cudnn,task_batch"
# The Triton kernel tests in four processes at once: most of their time is Triton compiling each specialisation
# (dtype x CFG flags x noise x block), single-threaded per process. The groups split `-k triton` by dtype (tests/
# test_gpu_plan.py checks that they cover it exactly once); "float16" also matches "bfloat16", hence the "not".
KERNEL_GROUPS = (
    "triton and float32",
    "triton and bfloat16",
    "triton and float16 and not bfloat16",
    "triton and not float32 and not float16",
)
OUT_FILE_LIMIT = 15 << 20  # the device tool returns files up to 16 MiB
BUILD_ARGS = ["setup.py", "build_ext", "--inplace"]  # opd_fast._C and opd_fast._C_cuda, in the tree


@dataclasses.dataclass
class Outcome:
    verdict: str  # PASS | FAIL | TIMEOUT | SKIPPED
    detail: str = ""
    rc: int | None = None
    seconds: float = 0.0
    raw: str = ""  # markdown: the figures later analysis needs


@dataclasses.dataclass
class Step:
    name: str
    budget_s: int
    why: str  # how the budget was estimated
    argv: list[str] | None = None  # the command; None: `action` runs in the runner
    parallel: list[list[str]] | None = None  # or several commands run at once (one verdict, logs concatenated)
    action: Callable | None = None  # (run, step, deadline) -> Outcome
    judge: Callable | None = None  # (run, step, outcome) -> Outcome, after the command ended
    first: bool = True  # part of the first command
    needs_build: bool = False  # uses the CUDA extension when the background build has finished by then
    waits_for_build: bool = False  # waits (within its budget) for the background build
    shows: str = ""  # what --dry-run shows for an action step

    def commands(self) -> list[list[str]]:
        return self.parallel or ([self.argv] if self.argv else [])

    def command(self) -> str:
        if not self.commands():
            return self.shows
        shown = [shlex.join("python" if a == sys.executable else _rel(a) for a in argv) for argv in self.commands()]
        return " & ".join(shown) + (" (at once)" if len(shown) > 1 else "")


def _rel(arg: str) -> str:
    return arg.replace(str(ROOT) + os.sep, "")


# ------------------------------------------------------------------------------------------------------------------
# the plan


def plan(logs: Path, python: str = sys.executable) -> list[Step]:
    """Every step, the first command's first, in order. Budgets rest on SPEC.md's measured facts for the H200 (~4.3
    TB/s copy, ~790 TFLOP/s bf16 matmul; SD3.5-M: one forward of one CFG branch at 512 px ~2.4 TFLOP at batch 1)."""
    py, L = python, str(logs)
    pytest = [py, "-m", "pytest", "-q", "--tb=short", "-p", "no:cacheprovider"]
    ladder = [
        py,
        "bench/bench_round.py",
        "--preset",
        "sd3.5-medium",
        "--device",
        "cuda",
        "--warmup",
        "1",
        "--rounds",
        "2",
    ]
    return [
        Step(
            "preflight",
            45,
            "CUDA check and import check ~10 s (torch, deepspeed and diffusers dominate); when they "
            "fail, pip installs ~14 MB of wheels with --no-deps ~10 s and the imports run again ~10 s; nvidia-smi 1 s; "
            "the extension build only starts here (background, log build.log)",
            action=preflight,
            shows=f"imports of {', '.join(MODULES)}; when one fails: python3 -m pip install -q "
            f"--no-index --no-deps --no-compile --no-cache-dir --upgrade --target {SITE} .whl/*.whl and "
            f"PYTHONPATH={SITE}, imports again; versions, GPU; background: TORCH_CUDA_ARCH_LIST=9.0 python setup.py "
            "build_ext --inplace",
        ),
        Step(
            "kernels",
            60,
            "~290 Triton cases against the float64 reference (3 shapes x 3 dtypes x SDE/ODE x 2 norms x "
            "2 reductions x 4 CFG modes); each specialisation (dtype, CFG flags, noise, block, B == 1) compiles once, "
            "~110 compiles at ~0.5-1 s, spread over 4 processes by dtype (~25 s each), each case then ~20 ms; "
            "pytest start-up and CUDA init ~10 s",
            parallel=[pytest + ["-rfEs", "--maxfail=20", "tests/test_kernels.py", "-k", k] for k in KERNEL_GROUPS],
            judge=judge_pytest,
        ),
        Step(
            "tests",
            105,
            "collecting tests/ ~10 s; ~20 CUDA tests: tiny trainers on CUDA (seconds each; CUDA-graph "
            "teachers capture once), the torch.compile'd FP8 activation quantization (cold Inductor compiles, ~20 s "
            "per shape family, twice), cuDNN attention, bf16 autocast, a one-GPU NCCL resume in fresh processes (~20 "
            "s)",
            argv=pytest + ["-p", "bench.pytest_cuda", "-rA", "-m", "cuda", "tests"],
            judge=judge_pytest,
        ),
        Step(
            "bandwidth",
            35,
            "start-up ~8 s; a 1 GiB copy; 3 cases x (same-size copy, reference, Triton op and "
            "kernels, CUDA op and kernels once built) x 3 modes ~50 do_bench timings of ~60 ms; Triton compiles the "
            "new block sizes; the CUDA backend's kernel tests ~10 s when the build is done",
            argv=[py, "bench/gpu_check.py", "--quick", "--out", f"{L}/bandwidth"],
            judge=judge_bandwidth,
            needs_build=True,
        ),
        Step(
            "round512",
            180,
            "one round is ~1.2 PFLOP of useful work (student forward + backward at CFG batch 6 and a "
            "teacher forward, x 9 trained steps x 3 tasks): ~4 s at ~40% of 790 TFLOP/s for the fast rows, ~7 s for "
            "the official-like two-pass; 8 variants x 3 rounds ~120 s, building each variant's trainer (model copy, 3 "
            "merged teachers) ~30 s, FP8's compiled quantization ~15 s, start-up and FLOP count ~15 s",
            argv=ladder
            + [
                "--resolution",
                "512",
                "--variants",
                LADDER_512,
                "--md",
                f"{L}/round512.md",
                "--json",
                f"{L}/round512.json",
            ],
            judge=judge_ladder,
        ),
        Step(
            "fp8_sd35m",
            45,
            "fp32, bf16 and two FP8 copies of 2.2 B parameters built on the GPU ~10 s; 5 states x "
            "batch 4 x CFG = 40 sample-forwards of 2.4 TFLOP per model: fp32 without tensor cores ~100 TFLOP at ~50 "
            "TFLOP/s ~2 s, the others faster; start-up ~10 s",
            argv=[
                py,
                "bench/fp8_accuracy.py",
                "--preset",
                "sd3.5-medium",
                "--device",
                "cuda",
                "--resolution",
                "512",
                "--json",
                f"{L}/fp8_sd35m.json",
            ],
            judge=judge_fp8,
        ),
        # -- deferred: named steps for later commands ----------------------------------------------------------------
        Step(
            "round1024",
            330,
            "4096 image tokens: ~4.4x the 512 px FLOPs per forward (linears x3.3, attention x10): "
            "official-like ~30 s a round, the others ~20 s; 4 variants x 3 rounds + builds and start-up ~30 s",
            argv=ladder
            + [
                "--resolution",
                "1024",
                "--variants",
                "official,fp8,cudnn,task_batch",
                "--md",
                f"{L}/round1024.md",
                "--json",
                f"{L}/round1024.json",
            ],
            judge=judge_ladder,
            first=False,
        ),
        Step(
            "engine",
            300,
            "3 variants, each fresh processes (DeepSpeed + NCCL init ~30 s), 1 warm-up + 3 optimizer "
            "steps of 27 backward calls at CFG batch 6 (~1.2 PFLOP, ~5 s); offload-all moves the 4.5 GB of bf16 "
            "parameters over PCIe for every forward and backward (~10 s a step)",
            argv=[
                py,
                "bench/bench_engine.py",
                "--preset",
                "sd3.5-medium",
                "--full",
                "--world",
                "1",
                "--bf16",
                "--resolution",
                "512",
                "--num-steps",
                "10",
                "--batch",
                "3",
                "--tokens",
                "333",
                "--steps",
                "3",
                "--variants",
                "zero3,zero3-offload-optimizer,zero3-offload-all",
                "--json",
                f"{L}/engine.json",
            ],
            judge=judge_engine,
            first=False,
        ),
        Step(
            "fp8_flux",
            120,
            "FLUX.1-dev, 11.9 B parameters: fp32 (48 GB), bf16 and two FP8 copies built on the GPU "
            "~20 s; 5 states x batch 2 at 512 px, ~36 TFLOP per sample-forward: fp32 ~350 TFLOP at ~50 TFLOP/s ~7 s",
            argv=[
                py,
                "bench/fp8_accuracy.py",
                "--preset",
                "flux.1-dev",
                "--device",
                "cuda",
                "--resolution",
                "512",
                "--batch",
                "2",
                "--json",
                f"{L}/fp8_flux.json",
            ],
            judge=judge_fp8,
            first=False,
        ),
        Step(
            "round512_extra",
            330,
            "the official-like row again (~30 s; the reference of loss and gradient), "
            "torch.compile of every block of the student and of three FP8 teachers (a cold Inductor compile of ~6 "
            "graphs forward and backward, ~2-3 min), adapter-mode FP8 teachers (~20 s), CUDA-graph teachers (a "
            "capture per task, ~25 s)",
            argv=ladder
            + [
                "--resolution",
                "512",
                "--variants",
                "official,compile,adapter,graphs",
                "--md",
                f"{L}/round512_extra.md",
                "--json",
                f"{L}/round512_extra.json",
            ],
            judge=judge_ladder,
            first=False,
        ),
        Step(
            "ncu",
            60,
            "a ~15 s process (start-up, Triton compile) launching the fused op 4 times at SD3.5-M 1024 "
            "px; ncu replays one forward and one backward kernel for two sections (~40 passes of ~10 us): seconds",
            argv=[
                "ncu",
                "--target-processes",
                "all",
                "--section",
                "SpeedOfLight",
                "--section",
                "MemoryWorkloadAnalysis",
                "-k",
                "regex:opd_step_(fwd|bwd)_kernel",
                "--launch-skip",
                "2",
                "--launch-count",
                "2",
                "-f",
                "-o",
                f"{L}/ncu/fused",
                py,
                "bench/gpu_check.py",
                "--launch",
                "4",
            ],
            judge=judge_ncu,
            first=False,
        ),
        Step(
            "trace",
            180,
            "an SD3.5-M 512 px trainer from its preset (random init on the CPU ~20 s, 3 merged FP8 "
            "teachers), a warm-up round (~10 s, plus a cold compile of the FP8 quantization ~30 s), one round under "
            "torch.profiler (~15 s), the chrome trace exported and gzipped (~300k events, ~30 s)",
            argv=[
                py,
                "bench/profile_round.py",
                "--preset",
                "sd3.5-medium",
                "--device",
                "cuda",
                "--resolution",
                "512",
                "--out",
                f"{L}/trace",
            ],
            judge=judge_trace,
            first=False,
        ),
        Step(
            "kernels_full",
            180,
            "waits for the background build; tests/test_kernels.py on all three backends (~870 "
            "cases), test_logprob.py's Triton and CUDA cases (~60) and test_cuda_build.py ~70 s; 5 shapes x 2 dtypes x (reference + 2 fused backends x op/kernels) "
            "x 3 modes of ~150 ms ~25 s",
            argv=[py, "bench/gpu_check.py", "--skip-build", "--out", f"{L}/kernels_full"],
            judge=judge_bandwidth,
            first=False,
            needs_build=True,
            waits_for_build=True,
        ),
    ]


ALIASES = {"profile": ["ncu", "trace"]}


def select(steps: list[Step], names: list[str], preflight_first: bool = True) -> list[Step]:
    """The first command's steps (no names), or the named ones in plan order, preflight first."""
    if not names:
        return [s for s in steps if s.first]
    by_name = {s.name: s for s in steps}
    wanted = {n for name in names for n in ALIASES.get(name, [name])}
    unknown = sorted(wanted - set(by_name))
    if unknown:
        aliases = ", ".join(f"{a} = {' '.join(v)}" for a, v in ALIASES.items())
        raise SystemExit(
            f"gpu_all.sh: unknown step(s) {', '.join(unknown)}; steps: {', '.join(by_name)}; aliases: {aliases}"
        )
    if preflight_first:
        wanted.add("preflight")
    return [s for s in steps if s.name in wanted]


def dry_run(steps: list[Step], selected: list[Step], names: list[str]) -> str:
    total = sum(s.budget_s for s in selected)
    which = f"bench/gpu_all.sh {' '.join(names)}" if names else "bench/gpu_all.sh (the first command)"
    lines = [f"plan of {which}: each step ends by its deadline (T0 + its budget + the budgets before it)", ""]
    deadline = 0
    for i, s in enumerate(selected, 1):
        deadline += s.budget_s
        lines += [
            f"{i}. {s.name}: budget {s.budget_s} s (deadline {deadline} s)",
            f"   $ {s.command()}",
            f"   why: {s.why}",
        ]
    limit = f" (limit {FIRST_COMMAND_LIMIT_S} s)" if not names else ""
    lines += ["", f"total: {total} s{limit}"]
    if not names:
        lines += ["", "later commands (bench/gpu_all.sh STEP ...; preflight runs first):"]
        lines += [f"  {s.name}: {s.budget_s} s" for s in steps if not s.first]
        lines += [f"  {a} = {' '.join(v)}" for a, v in ALIASES.items()]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------------
# running


class Run:
    """One command: where logs go, the steps' environment, the background build, the outcomes so far."""

    def __init__(
        self, steps: list[Step], logs: Path, out: Path | None, title: str = "GPU check", t0: float | None = None
    ):
        self.steps, self.logs, self.out, self.title = steps, logs, out, title
        self.logs.mkdir(parents=True, exist_ok=True)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
        self.t0 = time.monotonic() if t0 is None else t0  # the command's start: every deadline counts from it
        self.started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled Triton on the GPU
        env["PYTHONPATH"] = os.pathsep.join(p for p in [str(ROOT), env.get("PYTHONPATH", "")] if p)
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
        self.env = env
        self.results: list[tuple[Step, Outcome]] = []
        self.machine = ""  # filled by preflight: GPU and versions
        self.build: subprocess.Popen | None = None
        self.build_outcome: Outcome | None = None
        self.build_log = self.logs / "build.log"

    # -- the background build ----------------------------------------------------------------------------------------
    def start_build(self) -> None:
        env = dict(self.env, TORCH_CUDA_ARCH_LIST="9.0")  # sm_90 only: H100/H200, half the nvcc time of the default
        with open(self.build_log, "w") as log:
            log.write(f"$ TORCH_CUDA_ARCH_LIST=9.0 python {shlex.join(BUILD_ARGS)}\n")
            log.flush()
            self.build = subprocess.Popen(
                [sys.executable, *BUILD_ARGS],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.build_started = time.monotonic()
        self.build_ended: list[float] = []  # when it ended, noted by a watcher (the runner only looks between steps)
        threading.Thread(
            target=lambda: (self.build.wait(), self.build_ended.append(time.monotonic())), daemon=True
        ).start()

    def build_state(self, wait_until: float | None = None) -> Outcome | None:
        """The build's outcome once it ended (None: not started). wait_until: wait for it up to then."""
        if self.build is None or self.build_outcome is not None:
            return self.build_outcome
        try:
            timeout = 0 if wait_until is None else max(0.0, wait_until - time.monotonic())
            rc = self.build.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return Outcome("RUNNING", f"running for {time.monotonic() - self.build_started:.0f} s")
        tail = _tail(self.build_log, 1)
        ended = self.build_ended[0] if self.build_ended else time.monotonic()
        self.build_outcome = Outcome("PASS" if rc == 0 else "FAIL", f"rc {rc}: {tail}", rc, ended - self.build_started)
        return self.build_outcome

    def stop_build(self) -> None:
        state = self.build_state()
        if state is not None and state.verdict == "RUNNING":
            _kill_group(self.build)
            self.build_outcome = Outcome(
                "TIMEOUT",
                "still running when the command's time ran out: stopped",
                None,
                time.monotonic() - self.build_started,
            )

    # -- one step ----------------------------------------------------------------------------------------------------
    def live_log(self, step: Step) -> Path:
        """Where the running step logs: in $OUT while it runs, so a command cut short from outside still returns it."""
        return (self.out / "running.log") if self.out is not None else (self.logs / f"{step.name}.log")

    def log_of(self, step: Step) -> Path:
        return self.logs / f"{step.name}.log"

    def run_argv(self, step: Step, deadline: float) -> Outcome:
        commands = [list(argv) for argv in step.commands()]
        for argv in commands:
            if argv[0] == "ncu":
                found = find_ncu()
                if found is None:
                    return Outcome("SKIPPED", "ncu is not on PATH nor under /usr/local/cuda*/bin or /opt/nvidia")
                argv[0] = found
            for arg in argv:  # the step's own outputs: none left from an earlier command on a warm machine
                if arg.startswith(str(self.logs) + os.sep):
                    _remove(Path(arg))
                    Path(arg).parent.mkdir(parents=True, exist_ok=True)
        if step.waits_for_build:
            state = self.build_state(wait_until=deadline - 5)
            if state is not None and state.verdict == "RUNNING":
                return Outcome("TIMEOUT", "the background build did not finish within the step's budget")
        # stop early enough that stopping (SIGTERM, then SIGKILL) also ends by the deadline
        stop_at = deadline - KILL_GRACE_S - 1
        timeout = stop_at - time.monotonic()
        if timeout < 1:
            return Outcome("SKIPPED", "no time left: earlier steps used this step's budget")
        single = len(commands) == 1
        logs = [self.live_log(step)] if single else [self.logs / f"{step.name}.{i}.log" for i in range(len(commands))]
        procs = []
        for argv, log_path in zip(commands, logs):
            with open(log_path, "w") as log:
                log.write(f"$ {shlex.join(argv)}\n")
                log.flush()
                procs.append(
                    subprocess.Popen(
                        argv, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                    )
                )
        codes, timed_out = [], False
        for proc in procs:
            try:
                codes.append(proc.wait(timeout=max(0.0, stop_at - time.monotonic())))
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc)
                codes.append(None)
        if single:
            if logs[0] != self.log_of(step):
                shutil.move(str(logs[0]), self.log_of(step))
        else:  # one log: the parts one after the other
            with open(self.log_of(step), "w") as log:
                for i, (path, rc) in enumerate(zip(logs, codes)):
                    log.write(f"=== part {i + 1} of {len(logs)}, exit {rc}\n{path.read_text(errors='replace')}\n")
                    path.unlink()
        if timed_out:
            return Outcome("TIMEOUT", f"cut at its deadline ({timeout:.0f} s)")
        # pytest's 5 (nothing collected) in one part of several is not a failure of the step
        rc = max(0 if (c == 5 and not single) else c for c in codes)
        if not single and all(c == 5 for c in codes):
            rc = 5
        detail = "" if rc == 0 else f"exit {rc}: {_last_error(self.log_of(step))}"
        return Outcome("PASS" if rc == 0 else "FAIL", detail, rc)

    def execute(self) -> list[tuple[Step, Outcome]]:
        deadline = self.t0
        self.write_summary()
        for step in self.steps:
            deadline += step.budget_s
            start = time.monotonic()
            print(
                f"=== {step.name} (budget {step.budget_s} s, {deadline - start:.0f} s left to its deadline)", flush=True
            )
            try:
                outcome = step.action(self, step, deadline) if step.action else self.run_argv(step, deadline)
                if step.judge is not None and outcome.verdict != "SKIPPED":
                    outcome = step.judge(self, step, outcome)
            except Exception as e:  # noqa: BLE001  (a broken step must not stop the later ones)
                outcome = Outcome("FAIL", f"runner error: {type(e).__name__}: {e}")
            outcome.seconds = time.monotonic() - start
            self.results.append((step, outcome))
            print(f"    {outcome.verdict} in {outcome.seconds:.0f} s {outcome.detail}", flush=True)
            self.write_summary()
        if self.build is not None:  # its verdict is worth the wait while the command's time lasts
            self.build_state(wait_until=self.t0 + sum(s.budget_s for s in self.steps))
        self.stop_build()
        self.write_summary()
        return self.results

    # -- the summary ---------------------------------------------------------------------------------------------------
    def table(self) -> str:
        lines = ["| # | step | verdict | seconds | budget s | detail |", "|---|---|---|---:|---:|---|"]
        for i, (step, o) in enumerate(self.results, 1):
            lines.append(f"| {i} | {step.name} | {o.verdict} | {o.seconds:.0f} | {step.budget_s} | {_cell(o.detail)} |")
            if step.name == "preflight" and self.build is not None:
                b = self.build_state()
                lines.append(f"| | build (background) | {b.verdict} | {b.seconds:.0f} | | {_cell(b.detail)} |")
        done = {s.name for s, _ in self.results}
        for step in self.steps:
            if step.name not in done:
                lines.append(f"| | {step.name} | not run yet | | {step.budget_s} | |")
        return "\n".join(lines)

    def summary(self) -> str:
        total = sum(s.budget_s for s in self.steps)
        steps = ", ".join(s.name for s in self.steps)
        parts = [
            f"# {self.title}",
            "",
            f"started {self.started}; steps {steps}; budgets {total} s; elapsed {time.monotonic() - self.t0:.0f} s",
        ]
        if self.machine:
            parts += ["", self.machine]
        parts += ["", self.table()]
        for step, o in self.results:
            if o.raw.strip():
                parts += ["", f"## {step.name}", "", o.raw.strip()]
        return "\n".join(parts) + "\n"

    def write_summary(self) -> None:
        text = self.summary()
        (self.logs / "summary.md").write_text(text)
        if self.out is None:
            return
        (self.out / "summary.md").write_text(text)
        tmp = self.out / "logs.tar.gz.tmp"
        with tarfile.open(tmp, "w:gz") as tar:
            for path in sorted(self.logs.rglob("*")):
                if path.is_file() and _worth_returning(path):
                    tar.add(path, arcname=str(Path(self.logs.name) / path.relative_to(self.logs)))
        tmp.replace(self.out / "logs.tar.gz")

    def send(self, path: Path) -> str:
        """Copy a large artefact (a trace, an ncu report) to $OUT as a file of its own; says where it went."""
        if not path.is_file():
            return f"{path.name}: not written"
        if self.out is None:
            return f"{_rel(str(path))}"
        if path.stat().st_size > OUT_FILE_LIMIT:
            return f"{path.name}: {path.stat().st_size >> 20} MiB, too large to return (kept on the machine)"
        shutil.copy(path, self.out / path.name)
        return f"$OUT/{path.name}"


def _remove(path: Path) -> None:
    """A step's output file or folder (and NAME.ncu-rep for ncu's -o NAME)."""
    if path.is_dir():
        shutil.rmtree(path)
    for p in (path, path.with_name(path.name + ".ncu-rep")):
        if p.is_file():
            p.unlink()


def _worth_returning(path: Path) -> bool:
    """Logs, tables and JSON go into logs.tar.gz; traces and reports travel as files of their own (Run.send)."""
    big = path.suffix in (".gz", ".ncu-rep", ".safetensors", ".pt", ".bin") or "tensorboard" in path.parts
    return not big and path.stat().st_size < (4 << 20)


def _cell(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")[:400]


def _tail(path: Path, n: int) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return " / ".join(lines[-n:])


def _last_error(path: Path) -> str:
    """The most telling line of a failed command's log: the last exception line, else the last line."""
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    errors = [line for line in lines if re.match(r"^[\w.]*(Error|Exception|error:)", line)]
    return (errors or lines or [""])[-1][:300]


def _kill_group(proc: subprocess.Popen) -> None:
    """End a step's process group (it was started in a session of its own): SIGTERM, then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def find_ncu() -> str | None:
    found = shutil.which("ncu")
    if found:
        return found
    candidates = sorted(glob.glob("/usr/local/cuda*/bin/ncu") + glob.glob("/opt/nvidia/nsight-compute/*/ncu"))
    return candidates[-1] if candidates else None


# ------------------------------------------------------------------------------------------------------------------
# steps that run in the runner, and the judges that read what a step wrote

IMPORT_PROBE = r"""
import importlib, json, sys
out = {"versions": {}, "failed": {}}
for name in sys.argv[1:]:
    try:
        module = importlib.import_module(name)
        out["versions"][name] = str(getattr(module, "__version__", "ok"))
    except Exception as e:
        out["failed"][name] = f"{type(e).__name__}: {e}"[:300]
try:
    import torch
    out["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
        out["capability"] = list(torch.cuda.get_device_capability())
        out["gpus"] = torch.cuda.device_count()
    from opd_fast import fp8
    out["transformer_engine"] = fp8.te_available()[1] or "yes"
except Exception as e:
    out["probe_error"] = f"{type(e).__name__}: {e}"[:300]
print("PROBE " + json.dumps(out))
"""


def probe_imports(run: Run, deadline: float, log) -> dict:
    timeout = max(1.0, deadline - time.monotonic())
    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE, *MODULES],
        cwd=ROOT,
        env=run.env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    log.write(proc.stdout + proc.stderr)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("PROBE ")), None)
    if line is None:
        return {"versions": {}, "failed": {m: f"the import probe died (exit {proc.returncode})" for m in MODULES}}
    return json.loads(line[6:])


def use_site(run: Run) -> None:
    run.env["PYTHONPATH"] = os.pathsep.join([run.env["PYTHONPATH"], SITE])
    run.env["PATH"] = os.pathsep.join([f"{SITE}/bin", run.env.get("PATH", "")])  # ninja, for a parallel build


def preflight(run: Run, step: Step, deadline: float) -> Outcome:
    """Imports (wheels from .whl/ installed into SITE when they fail), versions, GPU; the build started."""
    log_path = run.live_log(step)
    wheels = sorted(glob.glob(str(ROOT / ".whl" / "*.whl")))
    report, smi = {"versions": {}, "failed": {m: "not checked" for m in MODULES}}, ""
    try:
        with open(log_path, "w") as log:
            report = probe_imports(run, deadline, log)
            if report["failed"] and Path(SITE).is_dir() and SITE not in run.env["PYTHONPATH"]:
                use_site(run)  # a warm machine keeps /tmp/site from an earlier command
                log.write(f"imports failed ({', '.join(report['failed'])}); trying {SITE} from an earlier command\n")
                report = probe_imports(run, deadline, log)
            if report["failed"] and wheels:
                cmd = [
                    sys.executable,
                    "-m",
                    "pip",
                    "install",
                    "-q",
                    "--no-index",
                    "--no-deps",
                    "--no-compile",
                    "--no-cache-dir",
                    "--upgrade",
                    "--target",
                    SITE,
                    *wheels,
                ]
                log.write(f"imports failed ({', '.join(report['failed'])}): $ {shlex.join(cmd)}\n")
                log.flush()
                subprocess.run(
                    cmd,
                    cwd=ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    check=False,
                    timeout=max(1.0, deadline - time.monotonic()),
                )
                if SITE not in run.env["PYTHONPATH"]:
                    use_site(run)
                report = probe_imports(run, deadline, log)
            if shutil.which("nvidia-smi"):
                smi = subprocess.run(
                    [
                        "nvidia-smi",
                        "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                        "--format=csv,noheader",
                    ],
                    capture_output=True,
                    text=True,
                    timeout=max(1.0, min(30.0, deadline - time.monotonic())),
                    check=False,
                ).stdout.strip()
                log.write(f"nvidia-smi: {smi}\n")
    except subprocess.TimeoutExpired as e:
        return Outcome("TIMEOUT", f"{shlex.join(str(a) for a in e.cmd[:4])} ... did not end within the budget")
    finally:
        if log_path.exists() and log_path != run.log_of(step):
            shutil.move(str(log_path), run.log_of(step))
        if any(s.needs_build or s.waits_for_build for s in run.steps):
            run.start_build()  # whatever the imports said: the build needs only torch
    versions = ", ".join(f"{m} {v}" for m, v in report["versions"].items())
    gpu = report.get("gpu", "no GPU visible to torch")
    run.machine = (
        f"{gpu} (capability {report.get('capability')}, {report.get('gpus', 0)} GPU(s); nvidia-smi: "
        f"{smi or 'absent'}); CUDA {report.get('cuda')}; {versions}; Transformer Engine: "
        f"{report.get('transformer_engine')}"
    )
    failed = report["failed"]
    raw = "\n".join([run.machine] + [f"- does not import: {m}: {why}" for m, why in failed.items()])
    if failed:
        hint = "" if wheels else " (no .whl/ carried: run ../shared/tools/gpu-wheels.sh .whl here and carry .whl)"
        return Outcome("FAIL", f"do not import: {', '.join(failed)}{hint}", None, raw=raw)
    return Outcome("PASS", f"{gpu}; {versions}", 0, raw=raw)


def pytest_counts(text: str) -> dict[str, int]:
    """The counts of pytest's summary lines ("3 failed, 12 passed, 2 skipped in 40.1s"), summed over the parts of
    a step that ran several pytest processes."""
    counts: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith(("$ ", "=== part ")):  # the command lines the runner wrote
            continue
        if re.search(r"\d+ (passed|failed|skipped|errors?|deselected)", line) and re.search(r" in [\d.]+s", line):
            for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)", line):
                kind = "error" if kind == "errors" else kind
                counts[kind] = counts.get(kind, 0) + int(n)
    return counts


def judge_pytest(run: Run, step: Step, o: Outcome) -> Outcome:
    text = run.log_of(step).read_text(errors="replace")
    counts = pytest_counts(text)
    said = ", ".join(f"{n} {k}" for k, n in counts.items() if k != "deselected") or "no summary line"
    # per part (several pytest processes) or for the one: its selection, its short test summary, its last line
    summary = []
    for part in re.split(r"^=== part .*$", text, flags=re.MULTILINE):
        lines = [line for line in part.splitlines() if line.strip()]
        if not lines:
            continue
        command = [line for line in lines if line.startswith("$ ")][:1]
        marker = next((i for i, line in enumerate(lines) if "short test summary info" in line), None)
        summary += command + (lines[marker + 1 :] if marker is not None else lines[-1:])
    raw = "```\n" + "\n".join(_rel(line) for line in summary[:150]) + "\n```"
    failed = [line.split(" - ")[0] for line in text.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    if o.verdict == "TIMEOUT":
        return dataclasses.replace(o, detail=f"{o.detail}; {said}", raw=raw)
    if o.rc == 5:
        return dataclasses.replace(o, verdict="FAIL", detail="no test collected by the selection", raw=raw)
    if o.rc == 0 and counts.get("passed", 0) == 0:
        return dataclasses.replace(o, verdict="FAIL", detail=f"nothing ran: {said}", raw=raw)
    detail = said + (f"; first failures: {', '.join(failed[:3])}" if failed else "")
    return dataclasses.replace(o, detail=detail if o.rc == 0 else f"{detail} (exit {o.rc})", raw=raw)


def judge_bandwidth(run: Run, step: Step, o: Outcome) -> Outcome:
    out = Path(step.argv[step.argv.index("--out") + 1])
    md = out / "results.md"
    raw = md.read_text() if md.is_file() else ""
    tests = out / "tests.log"
    if tests.is_file():
        counts = pytest_counts(tests.read_text(errors="replace"))
        raw += "\n\nkernel tests: " + (", ".join(f"{n} {k}" for k, n in counts.items()) or _tail(tests, 2))
    built = (
        "CUDA backend not built yet" if "not tested or timed" in run.log_of(step).read_text(errors="replace") else ""
    )
    if not (out / "results.json").is_file():
        return dataclasses.replace(
            o, verdict="FAIL" if o.verdict == "PASS" else o.verdict, detail=o.detail or "no results.json", raw=raw
        )
    target = json.loads((out / "results.json").read_text())["targets"]
    detail = "; ".join(x for x in [o.detail, target["line"], built] if x)
    verdict = o.verdict if o.verdict != "PASS" else ("PASS" if target["pass"] else "FAIL")
    return dataclasses.replace(o, verdict=verdict, detail=detail, raw=raw)


def judge_ladder(run: Run, step: Step, o: Outcome) -> Outcome:
    md = Path(step.argv[step.argv.index("--md") + 1])
    if not md.is_file():
        return dataclasses.replace(
            o,
            verdict="FAIL" if o.verdict == "PASS" else o.verdict,
            detail=o.detail or "no report written",
            raw=f"log: {_tail(run.log_of(step), 5)}",
        )
    text = md.read_text()
    wanted = step.argv[step.argv.index("--variants") + 1]
    target = next((line for line in text.splitlines() if line.startswith("target: ")), "no target line")
    rows = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    rows = rows[1:]  # the header's first cell
    asked = wanted.split(",")
    count = f"{len(rows)} of {len(asked)} asked variants in the table"
    raw = f"variants asked: {wanted}\n\n{text.strip()}"
    if o.verdict == "TIMEOUT":
        return dataclasses.replace(o, detail=f"{o.detail}; rows finished: {', '.join(rows)}; {target}", raw=raw)
    if o.verdict != "PASS":
        return dataclasses.replace(o, raw=raw)
    passed = re.search(r": PASS \(>=", target) is not None
    return dataclasses.replace(o, verdict="PASS" if passed else "FAIL", detail=f"{target} ({count})", raw=raw)


def judge_fp8(run: Run, step: Step, o: Outcome) -> Outcome:
    path = Path(step.argv[step.argv.index("--json") + 1])
    if not path.is_file():
        return dataclasses.replace(
            o, verdict="FAIL" if o.verdict == "PASS" else o.verdict, detail=o.detail or "no JSON written"
        )
    report = json.loads(path.read_text())
    head = (
        f"{report['preset']} @ {report['resolution']} px, {report['device']}: relative error of the teacher "
        "velocity (CFG applied) against the fp32 and the bf16 teacher"
    )
    lines = [head, "", "| teacher | rel. err vs fp32 | vs bf16 |", "|---|---:|---:|"]
    errors = []
    for name, r in report["teachers"].items():
        if "error" in r:
            errors.append(name)
            lines.append(f"| {name} | {_cell(r['error'])} | |")
        else:
            vb = f"{r['vs_bf16']:.4f}" if "vs_bf16" in r else ""
            lines.append(f"| {name} | {r['vs_fp32']:.4f} | {vb} |")
    fp8 = {k: v for k, v in report["teachers"].items() if k.startswith("fp8") and "error" not in v}
    finite = all(v["vs_fp32"] == v["vs_fp32"] and v["vs_fp32"] < float("inf") for v in fp8.values())
    detail = ", ".join(f"{k} {v['vs_fp32']:.4f}" for k, v in fp8.items()) + " vs fp32"
    if "bf16" in report["teachers"]:
        detail += f" (bf16 {report['teachers']['bf16']['vs_fp32']:.4f})"
    verdict = o.verdict
    if verdict == "PASS" and (errors or not fp8 or not finite):
        verdict, detail = "FAIL", f"failed: {', '.join(errors) or 'no FP8 row'}; {detail}"
    return dataclasses.replace(o, verdict=verdict, detail=detail, raw="\n".join(lines))


def judge_engine(run: Run, step: Step, o: Outcome) -> Outcome:
    path = Path(step.argv[step.argv.index("--json") + 1])
    if not path.is_file():
        return dataclasses.replace(
            o,
            verdict="FAIL" if o.verdict == "PASS" else o.verdict,
            detail=o.detail or "no JSON written",
            raw=f"```\n{_tail(run.log_of(step), 20)}\n```",
        )
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_engine  # light at import: torch loads inside its functions

    rows = json.loads(path.read_text())
    raw = bench_engine.table(rows, "SD3.5-M full-parameter student, 512 px, bf16, world 1")
    detail = ", ".join(f"{r['variant']} {r['step_s']:.2f} s/step, {r['cuda_peak_gb'] or 0:.1f} GB" for r in rows)
    return dataclasses.replace(o, detail=detail, raw=raw)


def judge_ncu(run: Run, step: Step, o: Outcome) -> Outcome:
    """The ncu report (when written) printed as text: the two sections of each profiled kernel."""
    rep = Path(step.argv[step.argv.index("-o") + 1] + ".ncu-rep")
    text = run.log_of(step).read_text(errors="replace")
    if rep.is_file():
        ncu = step.argv[0] if step.argv[0] != "ncu" else (find_ncu() or "ncu")
        shown = subprocess.run(
            [ncu, "--import", str(rep), "--page", "details"], capture_output=True, text=True, timeout=60, check=False
        ).stdout
        (run.logs / "ncu" / "details.txt").write_text(shown)
        text = shown or text
    keep = [line for line in text.splitlines() if line.strip() and not line.startswith("==PROF==")]
    throughput = [line.strip() for line in keep if re.search(r"(DRAM|Memory) Throughput", line)]
    profiled = sorted(set(re.findall(r"opd_step_(?:fwd|bwd)_kernel", text)))
    raw = "```\n" + "\n".join(keep[:160]) + "\n```\n\nreport: " + run.send(rep)
    if o.verdict == "PASS" and not profiled:
        said = [line for line in text.splitlines() if line.startswith(("==ERROR==", "==WARNING=="))][:2]
        detail = "no opd_step kernel was profiled" + (f": {' '.join(said)}" if said else "")
        return dataclasses.replace(o, verdict="FAIL", detail=detail, raw=raw)
    detail = f"{', '.join(profiled)}: " + "; ".join(" ".join(t.split()) for t in throughput[:4])
    return dataclasses.replace(o, detail=(o.detail + "; " if o.detail else "") + detail, raw=raw)


def judge_trace(run: Run, step: Step, o: Outcome) -> Outcome:
    out = Path(step.argv[step.argv.index("--out") + 1])
    md = out / "profile.md"
    raw = md.read_text() if md.is_file() else f"log: {_tail(run.log_of(step), 5)}"
    raw += "\n\ntrace: " + run.send(out / "trace.json.gz")
    return dataclasses.replace(o, raw=raw, detail=o.detail or _tail(run.log_of(step), 1))


# ------------------------------------------------------------------------------------------------------------------


def cuda_device(python: str) -> tuple[bool, str]:
    try:
        proc = subprocess.run(
            [python, "-c", "import torch; print(torch.__version__, torch.cuda.is_available())"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return False, "torch did not answer within 60 s"
    if proc.returncode != 0:
        return False, f"torch does not import: {_tail_text(proc.stderr)}"
    version, available = proc.stdout.split()[-2:]
    return available == "True", f"torch {version}"


def _tail_text(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("steps", nargs="*", help="named steps (default: the first command)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and the budgets; run nothing")
    ap.add_argument("--no-preflight", action="store_true", help="named steps without the preflight step")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    logs = Path(os.environ.get("LOGS", ROOT / "runs" / "gpu")).resolve()
    out = Path(os.environ["OUT"]).resolve() if os.environ.get("OUT") else None
    steps = plan(logs)
    selected = select(steps, args.steps, preflight_first=not args.no_preflight)
    total = sum(s.budget_s for s in selected)
    if args.dry_run:
        print(dry_run(steps, selected, args.steps))
        return 0
    ok, why = cuda_device(sys.executable)
    if not ok:
        print(
            f"gpu_all.sh: no CUDA device here ({why}); these are the GPU checks (their CPU paths run in "
            "tests/test_gpu_plan.py and tests/test_bench.py); `bench/gpu_all.sh --dry-run` prints the plan",
            file=sys.stderr,
        )
        return 2
    if total > FIRST_COMMAND_LIMIT_S:
        print(f"note: these steps' budgets add up to {total} s, more than {FIRST_COMMAND_LIMIT_S} s", flush=True)
    run = Run(selected, logs, out, title=f"GPU check: bench/gpu_all.sh {' '.join(args.steps)}".rstrip(), t0=t0)
    run.execute()
    print("\n================ summary (" + str(logs / "summary.md") + ") ================")
    print(run.summary())
    print("================ verdicts ================")
    print(run.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
