"""GPU check of the fused opd_step backends: one script for a machine with a CUDA GPU (torch with CUDA, triton, nvcc).

    python3 bench/gpu_check.py [--out DIR] [--skip-build] [--skip-tests]   (DIR: $OUT, else runs/gpu_check)

1. builds opd_fast._C and opd_fast._C_cuda in place (setup.py build_ext --inplace)             -> DIR/build.log
2. runs tests/test_kernels.py (compiled Triton and CUDA on the GPU) and tests/test_cuda_build.py -> DIR/tests.log
3. measures the device-to-device copy bandwidth of a 1 GiB tensor (read + write): the ceiling of a memory-bound op
4. times every backend with triton.testing.do_bench (median, L2 flushed between runs), forward / backward / full:
   "op" is the whole opd_step as the trainer calls it (host-side scalar math included), "kernels" the fused kernels
   alone on preallocated buffers; GB/s counts the bytes that must move (forward x, v_s, v_t, noise -> x_next;
   backward v_s, v_t -> grad), "x eager" is the reference opd_step's time over this one's, same shape and mode
-> DIR/results.json, DIR/results.md; the table is printed last.
Targets: fused full >= 80% of the copy bandwidth (at shapes big enough that launch latency does not dominate) and
>= 4x the eager reference.
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
    numel = 1
    for n in shape:
        numel *= n
    return {"forward": 5, "backward": 3, "full": 8}[mode] * numel * element_size


def benchmark(out: Path) -> list[dict]:
    import torch
    import triton
    from triton.testing import do_bench

    from opd_fast import fused, ops

    dev = torch.device("cuda")

    def copy_ms(nbytes: int) -> float:
        """do_bench median of a device-to-device copy moving nbytes (half read, half written)."""
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        return do_bench(lambda: dst.copy_(src), rep=100, return_mode="median")

    copy_gbps = (2 << 30) / copy_ms(2 << 30) / 1e6  # a 1 GiB tensor copied
    backends = [b for b in ops.available_backends(dev) if b != "reference"]
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"copy bandwidth (1 GiB, read + write): {copy_gbps:.0f} GB/s; fused backends: {backends}")

    rows = []
    for shape in SHAPES:
        for dtype in (torch.bfloat16, torch.float32):
            B = shape[0]
            x, v_s, v_t, noise = (torch.randn(shape, device=dev, dtype=dtype) + 0.1 for _ in range(4))
            v_s.requires_grad_(True)
            sigma = torch.linspace(0.9, 0.3, B, device=dev)
            sigma_next = sigma - 0.1
            g = torch.ones(B, device=dev)
            # a plain copy moving the same bytes: the yardstick at this size, launch latency included
            same_size_copy_ms = {m: copy_ms(moved_bytes(shape, x.element_size(), m)) for m in MODES}
            eager = {}
            for backend in ["reference"] + backends:
                for kind in ["op"] if backend == "reference" else ["op", "kernels"]:
                    fns = _timed_fns(ops, fused, backend, kind, x, v_s, v_t, noise, sigma, sigma_next, g)
                    for mode in MODES:
                        ms = do_bench(fns[mode], rep=100, return_mode="median")
                        nbytes = moved_bytes(shape, x.element_size(), mode)
                        if backend == "reference":
                            eager[mode] = ms
                        rows.append(
                            {
                                "backend": backend if backend == "reference" else f"{backend} {kind}",
                                "shape": "x".join(map(str, shape)),
                                "dtype": str(dtype)[6:],
                                "mode": mode,
                                "ms": ms,
                                "gb_per_s": nbytes / ms / 1e6,
                                "pct_copy": 100 * nbytes / ms / 1e6 / copy_gbps,
                                "pct_same_size_copy": 100 * same_size_copy_ms[mode] / ms,
                                "x_eager": eager[mode] / ms,
                            }
                        )
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "copy_gb_per_s": copy_gbps,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return rows


def _timed_fns(ops, fused, backend, kind, x, v_s, v_t, noise, sigma, sigma_next, g):
    """{mode: fn}. "op": opd_step + autograd; "kernels": the backend's launchers on preallocated buffers."""
    import torch

    if kind == "op":

        def forward():
            return ops.opd_step(x, v_s, v_t, noise, sigma, sigma_next, NOISE_LEVEL, backend=backend)

        _, loss = forward()
        return {
            "forward": forward,
            "backward": lambda: torch.autograd.grad(loss, v_s, g, retain_graph=True),
            "full": lambda: torch.autograd.grad(forward()[1], v_s, g),
        }
    B = x.shape[0]
    chunk_fn, fwd, bwd = fused._IMPLS[backend]()
    rows = [t.detach().reshape(B, -1) for t in (x, v_s, v_t, noise)]
    N = rows[0].shape[1]
    chunk = chunk_fn(B, N, x.device)
    coef = fused.step_coefficients(sigma, sigma_next, NOISE_LEVEL, N)
    x_next, grad = torch.empty_like(rows[0]), torch.empty_like(rows[1])
    partial = torch.empty(B, -(-N // chunk), device=x.device)
    loss = torch.empty(B, device=x.device)

    def forward():
        fwd(*rows, coef, None, None, x_next, partial, loss, chunk)

    def backward():
        bwd(rows[1], rows[2], coef, g, None, None, grad, chunk)

    def full():
        forward()
        backward()

    return {"forward": forward, "backward": backward, "full": full}


def table(rows: list[dict]) -> str:
    lines = [
        "| backend | shape | dtype | mode | ms | GB/s | % copy BW | % same-size copy | x eager |",
        "|---" * 9 + "|",
    ]
    for r in rows:
        lines.append(
            f"| {r['backend']} | {r['shape']} | {r['dtype']} | {r['mode']} | {r['ms']:.4f} | {r['gb_per_s']:.0f} "
            f"| {r['pct_copy']:.0f}% | {r['pct_same_size_copy']:.0f}% | {r['x_eager']:.1f}x |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "runs" / "gpu_check")))
    parser.add_argument("--skip-build", action="store_true")
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device (torch {torch.__version__}); this script benchmarks the GPU backends. On a "
              "CPU: python -m pytest bench/bench_opd_step.py --benchmark-only", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("TRITON_INTERPRET", None)  # compiled Triton on the GPU
    status = {}
    if not args.skip_build:
        status["build"] = run_logged([sys.executable, "setup.py", "build_ext", "--inplace"], out / "build.log", env)
    if not args.skip_tests:
        cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "tests/test_kernels.py", "tests/test_cuda_build.py"]
        status["tests"] = run_logged(cmd, out / "tests.log", env)
    sys.path.insert(0, str(ROOT))
    os.environ.pop("TRITON_INTERPRET", None)
    rows = benchmark(out)
    text = table(rows)
    (out / "results.md").write_text(text + "\n")
    print(f"status: {status or 'build and tests skipped'}")
    print(text)
    return 1 if any(status.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
