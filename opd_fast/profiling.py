"""Observability: NVTX ranges for Nsight Systems, per-phase timing for benchmarks, and the capture window.

Phases of a round (the names NVTX shows and bench/bench_round.py reports): rollout (two-pass only), teacher,
student_forward, loss, backward, optimizer; inside the two-pass rollout its steps show as rollout/student_forward
and rollout/loss. The `nvtx` package works on CPU builds (torch.cuda.nvtx does not); with no profiler attached a
range costs well under a microsecond. Without the package the ranges are no-ops.

While a torch profiler records (torch.profiler.profile, e.g. bench/profile_round.py), every range is also a
torch.profiler.record_function range of the same name, so the phases show in its trace and key_averages where no
Nsight tool is at hand; otherwise that costs one check of the profiler's state (well under a microsecond).

Capture window (`opd-fast train --profile-steps a:b`): cudaProfilerStart before round a, cudaProfilerStop after
round b-1, so `nsys profile --capture-range=cudaProfilerApi` records only those rounds (the first rounds pay for
allocator growth, cuDNN/cuBLAS heuristics and compilation, and would swamp a trace).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict

import torch

from opd_fast.hooks import Hook

try:
    import nvtx as _nvtx
except ImportError:  # optional at run time; listed in install_requires
    _nvtx = None

log = logging.getLogger(__name__)
DOMAIN = "opd_fast"
PHASES = ("rollout", "teacher", "student_forward", "loss", "backward", "optimizer")


# True while any torch profiler records (kineto's own state, however the profiler was started)
_torch_profiler_on = getattr(torch._C._autograd, "_profiler_enabled", None) or (lambda: False)


@contextlib.contextmanager
def _recorded(name: str, rng):
    with rng, torch.profiler.record_function(name):
        yield


def nvtx_range(name: str):
    rng = contextlib.nullcontext() if _nvtx is None else _nvtx.annotate(name, domain=DOMAIN)
    if _torch_profiler_on():
        return _recorded(name, rng)
    return rng


class PhaseTimer:
    """Seconds spent per phase name, summed until read().

    CUDA: an event pair per phase on the stream that is current when the phase starts (the side stream for
    teacher forwards), resolved in read(): timing adds no host synchronisation inside the loop. Phases on two
    streams overlap, so their sum can exceed the wall time. CPU: perf_counter around the phase (CPU ops return when
    done, so no sync is needed).
    """

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"
        self._pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self._seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def measure(self, name: str):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._pending.append((name, start, end))
        else:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self._seconds[name] += time.perf_counter() - t0

    def read(self) -> dict[str, float]:
        """Seconds per phase since the last read (synchronises the device once)."""
        if self._pending:
            torch.cuda.synchronize()
            for name, start, end in self._pending:
                self._seconds[name] += start.elapsed_time(end) / 1e3
            self._pending.clear()
        out = dict(self._seconds)
        self._seconds.clear()
        return out


@contextlib.contextmanager
def phase(name: str, timer: PhaseTimer | None = None):
    """An NVTX range, timed too when a PhaseTimer is given."""
    with nvtx_range(name):
        if timer is None:
            yield
        else:
            with timer.measure(name):
                yield


def parse_window(spec: str) -> tuple[int, int]:
    """'a:b' -> (a, b): rounds a..b-1 (0-based round index, as Trainer.round counts before training it)."""
    try:
        first, stop = (int(part) for part in spec.split(":"))
    except ValueError:
        raise ValueError(f"--profile-steps expects a:b (two integers, e.g. 2:4), got {spec!r}") from None
    if not 0 <= first < stop:
        raise ValueError(f"--profile-steps {spec}: needs 0 <= a < b")
    return first, stop


class CaptureWindow(Hook):
    """cudaProfilerStart/Stop around rounds [first, stop) for `nsys profile --capture-range=cudaProfilerApi`, as a
    trainer hook. On a run without CUDA it logs once that it does nothing."""

    def __init__(self, first: int, stop: int):
        self.first, self.stop = first, stop
        self.active = False
        self._said_no_cuda = False

    def before_round(self, trainer, round_idx: int) -> None:
        if not (self.first <= round_idx < self.stop) or self.active:
            return
        if trainer.device.type != "cuda":
            if not self._said_no_cuda:
                log.info("profile window %d:%d: no CUDA device, so no cudaProfilerStart/Stop (a no-op)", *self.window)
                self._said_no_cuda = True
            return
        torch.cuda.synchronize()  # earlier rounds' kernels stay out of the capture
        torch.cuda.cudart().cudaProfilerStart()
        self.active = True
        log.info("profiler capture started before round %d", round_idx)

    def after_record(self, trainer, record: dict) -> None:
        if self.active and record["step"] >= self.stop:  # record["step"]: the rounds done
            self.close()

    @property
    def window(self) -> tuple[int, int]:
        return self.first, self.stop

    def close(self) -> None:
        if self.active:
            torch.cuda.synchronize()  # the window's kernels finish inside the capture
            torch.cuda.cudart().cudaProfilerStop()
            self.active = False
            log.info("profiler capture stopped")
