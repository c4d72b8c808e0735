"""Benchmark opd_step: the eager reference against every available fused backend, forward / backward / both.

    pytest bench/bench_opd_step.py --benchmark-only --benchmark-json=bench.json   # run (CUDA if visible, else CPU)
    python bench/bench_opd_step.py bench.json                                     # markdown table from the JSON
    OPD_BENCH_THREADS=1 pytest bench/...                                          # torch.set_num_threads(1) first
    OPD_BENCH_LOG_PROB=1 pytest bench/...                                         # with the log-density (log_prob)

Shapes: SD3.5-M latents (B, 16, 64, 64) and (B, 16, 128, 128) (512 and 1024 px), FLUX packed (B, 4096, 64); SDE
step (noise_level 0.7, so noise is read), no CFG. extra_info of each benchmark holds the bytes that must move
(forward reads x, v_s, v_t, noise and writes x_next; backward reads v_s, v_t and writes dL/dv_s), the achieved GB/s
from the median time, and `x_vs_eager` / `x_vs_eager_min`: the reference's median (min) time over this one's,
measured in the same run (the reference of each shape / dtype / mode runs first). On CUDA the timed function
synchronises before returning. With OPD_BENCH_LOG_PROB=1 every step also returns its log-density of x_next (as
stored) and the backward takes the gradient of loss + log_prob, so the run measures what the log-density adds: the
forward moves the same bytes (x_next is re-read while still in cache), the backward also reads x and x_next.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from opd_fast import ops

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if os.environ.get("OPD_BENCH_THREADS"):  # on a shared CPU box one thread per op dodges waits for a busy core
    torch.set_num_threads(int(os.environ["OPD_BENCH_THREADS"]))
SHAPES = [(4, 16, 64, 64), (8, 16, 64, 64), (4, 16, 128, 128), (8, 16, 128, 128), (4, 4096, 64)]
DTYPES = [torch.float32, torch.bfloat16]
MODES = ["forward", "backward", "full"]
NOISE_LEVEL = 0.7
LOG_PROB = os.environ.get("OPD_BENCH_LOG_PROB") == "1"
# triton on CPU is the interpreter (orders of magnitude slower, not a training path): never benchmarked there
BACKENDS = ["reference"] + [b for b in ops.available_backends(DEVICE) if b != "reference"]
_reference_times: dict[tuple, tuple[float, float]] = {}  # (median, min) seconds


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def moved_bytes(shape, dtype, mode) -> int:
    """Bytes a single fused pass must move: 5 tensors forward, 3 backward (no CFG); the log-density's backward 5."""
    numel = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    backward = 5 if LOG_PROB else 3
    return {"forward": 5 * numel, "backward": backward * numel, "full": (5 + backward) * numel}[mode]


def _inputs(shape, dtype):
    gen = torch.Generator().manual_seed(0)
    x, v_student, v_teacher, noise = (
        (torch.randn(shape, generator=gen) + 0.1).to(device=DEVICE, dtype=dtype) for _ in range(4)
    )
    B = shape[0]
    sigma = torch.linspace(0.9, 0.3, B, device=DEVICE)
    return x, v_student.requires_grad_(), v_teacher, noise, sigma, sigma - 0.1


def _params():
    return [
        pytest.param(shape, dtype, mode, backend, id=f"{'x'.join(map(str, shape))}-{str(dtype)[6:]}-{mode}-{backend}")
        for shape in SHAPES
        for dtype in DTYPES
        for mode in MODES
        for backend in BACKENDS  # reference first: the others report their speed-up over it
    ]


@pytest.mark.parametrize("shape, dtype, mode, backend", _params())
def test_opd_step(benchmark, shape, dtype, mode, backend):
    x, v_student, v_teacher, noise, sigma, sigma_next = _inputs(shape, dtype)
    grad_loss = torch.ones(shape[0], device=DEVICE)

    def forward():
        out = ops.opd_step(
            x, v_student, v_teacher, noise, sigma, sigma_next, NOISE_LEVEL, backend=backend, log_prob=LOG_PROB
        )
        return out[0], out[1] + out[2] if LOG_PROB else out[1]  # the objective the backward differentiates

    if mode == "forward":

        def run():
            out = forward()
            _sync()
            return out

    elif mode == "backward":
        _, loss = forward()

        def run():
            out = torch.autograd.grad(loss, v_student, grad_loss, retain_graph=True)
            _sync()
            return out

    else:

        def run():
            _, loss = forward()
            out = torch.autograd.grad(loss, v_student, grad_loss)
            _sync()
            return out

    benchmark.group = f"{'x'.join(map(str, shape))} {str(dtype)[6:]} {mode}"
    benchmark(run)
    stats = benchmark.stats.stats
    key = (shape, dtype, mode)
    if backend == "reference":
        _reference_times[key] = (stats.median, stats.min)
    nbytes = moved_bytes(shape, dtype, mode)
    ref = _reference_times.get(key)
    benchmark.extra_info.update(
        shape="x".join(map(str, shape)),
        dtype=str(dtype)[6:],
        mode=mode,
        backend=backend,
        device=torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu",
        threads=torch.get_num_threads(),
        log_prob=LOG_PROB,
        bytes=nbytes,
        gb_per_s=round(nbytes / stats.median / 1e9, 3),
        # on a shared machine noise only adds time: the ratio of minima is the steadier one
        x_vs_eager=None if ref is None else round(ref[0] / stats.median, 2),
        x_vs_eager_min=None if ref is None else round(ref[1] / stats.min, 2),
    )


def markdown_table(path: str) -> str:
    """Markdown table of a --benchmark-json file: median and min ms, GB/s (median), speed-up over the reference."""
    rows = [
        "| shape | dtype | mode | backend | median ms | min ms | GB/s | x vs eager (median) | x vs eager (min) |",
        "|---" * 9 + "|",
    ]
    with open(path) as f:
        benchmarks = json.load(f)["benchmarks"]
    for bench in benchmarks:
        info, stats = bench["extra_info"], bench["stats"]
        ratios = [info.get("x_vs_eager"), info.get("x_vs_eager_min")]
        ratios = ["" if r is None or info["backend"] == "reference" else f"{r:.1f}x" for r in ratios]
        rows.append(
            f"| {info['shape']} | {info['dtype']} | {info['mode']} | {info['backend']} | {stats['median'] * 1e3:.2f} "
            f"| {stats['min'] * 1e3:.2f} | {info['gb_per_s']:.2f} | {ratios[0]} | {ratios[1]} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table(sys.argv[1]))
