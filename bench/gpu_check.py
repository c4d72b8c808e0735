"""GPU check of the fused opd_step backends: one script for a machine with a CUDA GPU (torch with CUDA, triton, nvcc).

    python3 bench/gpu_check.py [--out DIR] [--skip-build] [--skip-tests] [--quick] [--rep MS]   (DIR: $OUT, else
                                                                                                 runs/gpu_check)
    python3 bench/gpu_check.py --launch N [--backend triton]   # only launch the fused op N times (for ncu)

1. builds opd_fast._C and opd_fast._C_cuda in place (setup.py build_ext --inplace)             -> DIR/build.log
2. runs tests/test_kernels.py and tests/test_logprob.py (compiled Triton and CUDA on the GPU) and
   tests/test_cuda_build.py -> DIR/tests.log
3. measures the device-to-device copy bandwidth of a 1 GiB tensor (read + write): the ceiling of a memory-bound op
4. times every backend with triton.testing.do_bench (median, L2 flushed between runs), forward / backward / full:
   "op" is the whole opd_step as the trainer calls it (host-side scalar math included), "kernels" the fused kernels
   alone on preallocated buffers; GB/s counts the bytes that must move (forward x, v_s, v_t, noise -> x_next;
   backward v_s, v_t -> grad; a CFG-stacked velocity is two rows per sample), "x eager" is the reference opd_step's
   time over this one's, same case and mode
-> DIR/results.json, DIR/results.md; the table and the targets line are printed last.

--quick (what bench/gpu_all.sh's `bandwidth` step runs): SD3.5-Medium's latent shapes only, as the trainer feeds them
(float32 state and noise, bf16 velocities, ODE as in the official config), a shorter do_bench, no build, and as
tests only the CUDA backend's kernel tests, when the extension is built (the Triton ones ran in the `kernels` step).

Targets: fused full >= 80% of the copy bandwidth at the largest case (smaller ones move a few MB, under a
microsecond of DRAM time at 4.3 TB/s, where launch latency decides; "% same-size copy" shows that yardstick) and the
fused op >= 4x the eager reference (forward + backward) in every case.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(4, 16, 64, 64), (8, 16, 128, 128), (16, 16, 128, 128), (4, 4096, 64), (8, 4096, 64)]
MODES = ["forward", "backward", "full"]
NOISE_LEVEL = 0.7
GUIDANCE = 4.5
TARGET_PCT_COPY = 80.0
TARGET_X_EAGER = 4.0


def full_cases() -> list[dict]:
    """Every shape in bf16 and float32 (all four tensors one dtype), SDE, no CFG."""
    return [
        dict(label="x".join(map(str, s)), shape=s, x_dtype=d, v_dtype=d, guidance=None, noise_level=NOISE_LEVEL)
        for s in SHAPES
        for d in ("bfloat16", "float32")
    ]


# SD3.5-M at 512 px: 3 prompts x 16 channels x 64 x 64 latents; the student's CFG stacks [uncond; cond] velocities
# (2B rows) that the fused op combines in registers; 1024 px: 128 x 128 latents.
QUICK_CASES = [
    dict(label="SD3.5-M 512 px", shape=(3, 16, 64, 64), guidance=None),
    dict(label="SD3.5-M 512 px, CFG-stacked", shape=(3, 16, 64, 64), guidance=GUIDANCE),
    dict(label="SD3.5-M 1024 px", shape=(3, 16, 128, 128), guidance=None),
]
for _case in QUICK_CASES:  # the trainer's dtypes: float32 state and noise, bf16 model output; ODE (official mopd)
    _case.update(x_dtype="float32", v_dtype="bfloat16", noise_level=0.0)


def run_logged(cmd: list[str], log: Path, env: dict | None = None) -> int:
    start = time.time()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    tail = log.read_text().splitlines()[-3:]
    print(f"[{time.time() - start:6.1f}s] rc={rc} {' '.join(cmd[1:4])} ... -> {log}\n    " + "\n    ".join(tail))
    return rc


def moved_bytes(shape, element_size: int, mode: str) -> int:
    """Bytes a mode must move when all four tensors share one dtype, no CFG, SDE (noise read)."""
    numel = 1
    for n in shape:
        numel *= n
    return {"forward": 5, "backward": 3, "full": 8}[mode] * numel * element_size


def case_bytes(x, v_s, v_t, noise_level: float) -> dict[str, int]:
    """Bytes each mode must move for these tensors: forward reads x, v_s, v_t (and noise unless ODE) and writes
    x_next; backward reads v_s, v_t and writes the gradient (v_s's size)."""
    fwd = 2 * x.nbytes + v_s.nbytes + v_t.nbytes + (x.nbytes if noise_level else 0)
    bwd = 2 * v_s.nbytes + v_t.nbytes
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}


def make_inputs(case: dict, device):
    """x, v_s (requires grad), v_t, noise, sigma, sigma_next, g for one case."""
    import torch

    shape, B = tuple(case["shape"]), case["shape"][0]
    rows = 2 * B if case["guidance"] is not None else B
    x_dtype, v_dtype = getattr(torch, case["x_dtype"]), getattr(torch, case["v_dtype"])
    x, noise = (torch.randn(shape, device=device, dtype=x_dtype) + 0.1 for _ in range(2))
    v_s, v_t = (torch.randn((rows,) + shape[1:], device=device, dtype=v_dtype) + 0.1 for _ in range(2))
    v_s.requires_grad_(True)
    sigma = torch.linspace(0.9, 0.3, B, device=device)
    return x, v_s, v_t, noise, sigma, sigma - 0.1, torch.ones(B, device=device)


def cuda_timer(rep: int):
    from triton.testing import do_bench

    return lambda fn: do_bench(fn, warmup=max(5, rep // 4), rep=rep, return_mode="median")


def cpu_timer(calls: int = 2):
    """Milliseconds of one call, the fastest of `calls`: the CPU check of the timed code, not a measurement."""

    def timer(fn):
        best = float("inf")
        for _ in range(calls):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return best * 1e3

    return timer


def benchmark(
    out: Path,
    cases: list[dict],
    *,
    device: str = "cuda",
    backends: list[str] | None = None,
    rep: int = 100,
    copy_bytes: int = 2 << 30,
    timer=None,
) -> tuple[list[dict], dict]:
    """(rows, meta) of every case x backend x kind x mode; also written to out/results.json. On CUDA the timer is
    do_bench; pass device="cpu" with explicit backends (e.g. triton under TRITON_INTERPRET=1) to run the same code on
    CPU tensors."""
    import torch

    from opd_fast import ops
    from opd_fast.ops.opd_step import fused

    dev = torch.device(device)
    timer = timer or (cuda_timer(rep) if dev.type == "cuda" else cpu_timer())

    def copy_ms(nbytes: int) -> float:
        """Median of a device-to-device copy moving nbytes (half read, half written)."""
        src = torch.empty(max(1, nbytes // 2), dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        return timer(lambda: dst.copy_(src))

    copy_gbps = copy_bytes / copy_ms(copy_bytes) / 1e6
    if backends is None:
        backends = [b for b in ops.available_backends(dev) if b != "reference"]
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU"
    print(
        f"device {name}, torch {torch.__version__}; copy bandwidth ({copy_bytes / 2**31:.3g} GiB copied, read + "
        f"write): {copy_gbps:.0f} GB/s; fused backends: {backends}",
        flush=True,
    )

    rows = []
    for case in cases:
        x, v_s, v_t, noise, sigma, sigma_next, g = make_inputs(case, dev)
        nbytes = case_bytes(x, v_s, v_t, case["noise_level"])
        # a plain copy moving the same bytes: the yardstick at this size, launch latency included
        same_size_copy_ms = {m: copy_ms(nbytes[m]) for m in MODES}
        eager = {}
        for backend in ["reference"] + backends:
            for kind in ["op"] if backend == "reference" else ["op", "kernels"]:
                fns = _timed_fns(
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
                for mode in MODES:
                    ms = timer(fns[mode])
                    if backend == "reference":
                        eager[mode] = ms
                    rows.append(
                        {
                            "backend": backend if backend == "reference" else f"{backend} {kind}",
                            "case": case["label"],
                            "shape": "x".join(map(str, case["shape"]))
                            + (" cfg" if case["guidance"] is not None else ""),
                            "dtype": case["x_dtype"]
                            if case["x_dtype"] == case["v_dtype"]
                            else f"{case['x_dtype']} x / {case['v_dtype']} v",
                            "mode": mode,
                            "ms": ms,
                            "gb_per_s": nbytes[mode] / ms / 1e6,
                            "pct_copy": 100 * nbytes[mode] / ms / 1e6 / copy_gbps,
                            "pct_same_size_copy": 100 * same_size_copy_ms[mode] / ms,
                            "x_eager": eager[mode] / ms,
                            "bytes": nbytes[mode],
                        }
                    )
    meta = {
        "device": name,
        "torch": torch.__version__,
        "copy_gb_per_s": copy_gbps,
        "backends": backends,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows, "targets": targets(rows)}, indent=1))
    return rows, meta


def _timed_fns(
    ops, fused, backend, kind, x, v_s, v_t, noise, sigma, sigma_next, g, guidance=None, noise_level=NOISE_LEVEL
):
    """{mode: fn}. "op": opd_step + autograd; "kernels": the backend's launchers on preallocated buffers. guidance:
    v_s and v_t are CFG-stacked (2B rows) and combined with this weight (student and teacher alike)."""
    import torch

    if kind == "op":
        cfg = dict(student_guidance=guidance, teacher_guidance=guidance)

        def forward():
            return ops.opd_step(x, v_s, v_t, noise, sigma, sigma_next, noise_level, backend=backend, **cfg)

        _, loss = forward()
        return {
            "forward": forward,
            "backward": lambda: torch.autograd.grad(loss, v_s, g, retain_graph=True),
            "full": lambda: torch.autograd.grad(forward()[1], v_s, g),
        }
    B = x.shape[0]
    chunk_fn, fwd, bwd = fused.launchers(backend)
    x_rows, noise_rows = (t.detach().reshape(B, -1) for t in (x, noise))
    v_rows = [t.detach().reshape(t.shape[0], -1) for t in (v_s, v_t)]
    N = x_rows.shape[1]
    chunk = chunk_fn(B, N, x.device)
    coef = fused.step_coefficients(ops.LossSpec(noise_level, backend=backend), sigma, sigma_next, N)
    noise_arg = noise_rows if noise_level else None  # as opd_step: ODE never reads the noise
    x_next, grad = torch.empty_like(x_rows), torch.empty_like(v_rows[0])
    partial = torch.empty(B, -(-N // chunk), device=x.device)
    loss = torch.empty(B, device=x.device)

    def forward():
        fwd(x_rows, *v_rows, noise_arg, coef, guidance, guidance, x_next, partial, loss, chunk)

    def backward():
        bwd(*v_rows, coef, g, guidance, guidance, grad, chunk)

    def full():
        forward()
        backward()

    return {"forward": forward, "backward": backward, "full": full}


def targets(rows: list[dict]) -> dict:
    """The fused backends against the targets: full (forward + backward) >= TARGET_PCT_COPY % of the copy ceiling
    at the largest case (the fastest backend's kernels), and the op >= TARGET_X_EAGER x the eager reference in every
    case (the fastest backend's op, which is what the trainer calls). {"pass": bool | None, "line": str}."""
    full = [r for r in rows if r["mode"] == "full" and r["backend"] != "reference"]
    if not full:
        return {"pass": None, "line": "targets: not checked (no fused backend ran)"}
    largest = max(r["bytes"] for r in full)
    kernels = [r for r in full if r["bytes"] == largest and r["backend"].endswith(" kernels")] or [
        r for r in full if r["bytes"] == largest
    ]
    best_bw = max(kernels, key=lambda r: r["pct_copy"])
    bw_ok = best_bw["pct_copy"] >= TARGET_PCT_COPY
    eager_parts, eager_ok = [], True
    for case in dict.fromkeys(r["case"] for r in full):
        ops_ = [r for r in full if r["case"] == case and r["backend"].endswith(" op")] or [
            r for r in full if r["case"] == case
        ]
        best = max(ops_, key=lambda r: r["x_eager"])
        eager_ok &= best["x_eager"] >= TARGET_X_EAGER
        eager_parts.append(f"{case} {best['x_eager']:.1f}x ({best['backend']})")
    line = (
        f"targets: {'PASS' if bw_ok and eager_ok else 'FAIL'}; fused full at {best_bw['case']} "
        f"({best_bw['backend']}): {best_bw['pct_copy']:.0f}% of the copy ceiling, {best_bw['gb_per_s']:.0f} GB/s "
        f"({best_bw['pct_same_size_copy']:.0f}% of a same-size copy) {'>=' if bw_ok else '<'} "
        f"{TARGET_PCT_COPY:.0f}%; op vs eager: {', '.join(eager_parts)} "
        f"({'all >=' if eager_ok else 'not all >='} {TARGET_X_EAGER:g}x)"
    )
    return {"pass": bw_ok and eager_ok, "line": line}


def table(rows: list[dict], meta: dict | None = None) -> str:
    lines = []
    if meta:
        lines += [
            (
                f"{meta['device']}, torch {meta['torch']}: copy ceiling {meta['copy_gb_per_s']:.0f} GB/s (1 GiB "
                f"device-to-device, read + write); fused backends {', '.join(meta['backends']) or 'none'}"
            ),
            "",
        ]
    lines += [
        "| backend | case | dtype | mode | ms | GB/s | % copy BW | % same-size copy | x eager |",
        "|---" * 9 + "|",
    ]
    for r in rows:
        lines.append(
            f"| {r['backend']} | {r.get('case', r['shape'])} | {r['dtype']} | {r['mode']} | {r['ms']:.4f} "
            f"| {r['gb_per_s']:.0f} | {r['pct_copy']:.0f}% | {r['pct_same_size_copy']:.0f}% | {r['x_eager']:.1f}x |"
        )
    return "\n".join(lines)


def write_report(out: Path, rows: list[dict], meta: dict) -> str:
    """out/results.md: the table and the targets line (bench/gpu_run.py puts it in the GPU check's summary)."""
    text = table(rows, meta) + "\n\n" + targets(rows)["line"]
    (out / "results.md").write_text(text + "\n")
    return text


def launch(count: int, backend: str) -> None:
    """The fused op (forward + backward, as the trainer calls it) `count` times at SD3.5-M 1024 px: a short process
    for ncu to profile with a kernel-name filter and a launch count."""
    import torch

    from opd_fast import ops
    from opd_fast.ops.opd_step import fused

    case = QUICK_CASES[-1]
    x, v_s, v_t, noise, sigma, sigma_next, g = make_inputs(case, torch.device("cuda"))
    fns = _timed_fns(
        ops,
        fused,
        backend,
        "op",
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
    for _ in range(count):
        fns["full"]()
    torch.cuda.synchronize()
    print(f"launched opd_step ({backend}) forward + backward {count} times at {case['label']} {case['shape']}")


def kernel_tests(quick: bool) -> list[str] | None:
    """The pytest command line of the kernel tests; in --quick mode only the CUDA backend's, and None when its
    extension does not import (the background build has not finished, or failed: its log says)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "--tb=short", "--maxfail=20", "-p", "no:cacheprovider"]
    if not quick:
        # test_logprob's CUDA cases too: the `tests` step may have run before the build finished (they skip there)
        return cmd + ["tests/test_kernels.py", "tests/test_logprob.py", "tests/test_cuda_build.py"]
    import torch

    from opd_fast.ops.opd_step import fused

    if not fused.backend_available("cuda", torch.device("cuda")):
        print(f"CUDA backend not tested or timed: {fused.why_unavailable('cuda', torch.device('cuda'))}")
        return None
    return cmd + ["tests/test_kernels.py", "tests/test_logprob.py", "-k", "cuda and not triton and not cpp"]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "runs" / "gpu_check")))
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--quick", action="store_true", help="SD3.5-M latent shapes, no build, CUDA-backend tests only")
    ap.add_argument("--rep", type=int, default=None, help="do_bench milliseconds per timing (default 100, quick 40)")
    ap.add_argument("--launch", type=int, default=0, metavar="N", help="only launch the fused op N times (for ncu)")
    ap.add_argument("--backend", default="triton", help="the backend --launch runs (default triton)")
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(
            f"gpu_check: no CUDA device (torch {torch.__version__}); this script benchmarks the GPU backends. On a "
            "CPU: python -m pytest bench/bench_opd_step.py --benchmark-only",
            file=sys.stderr,
        )
        return 2
    os.environ.pop("TRITON_INTERPRET", None)  # compiled Triton on the GPU
    sys.path.insert(0, str(ROOT))
    if args.launch:
        launch(args.launch, args.backend)
        return 0
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    status = {}
    if not (args.skip_build or args.quick):
        status["build"] = run_logged([sys.executable, "setup.py", "build_ext", "--inplace"], out / "build.log", env)
    if not args.skip_tests:
        cmd = kernel_tests(args.quick)
        if cmd is not None:
            status["tests"] = run_logged(cmd, out / "tests.log", env)
    rows, meta = benchmark(
        out, QUICK_CASES if args.quick else full_cases(), rep=args.rep or (40 if args.quick else 100)
    )
    text = write_report(out, rows, meta)
    print(f"status: {status or 'build and tests skipped'}")
    print(text)
    return 1 if any(status.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
