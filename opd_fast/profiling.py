"""NVTX ranges for Nsight Systems. The `nvtx` package works on CPU builds (torch.cuda.nvtx does not); with no
profiler attached a range costs well under a microsecond. Without the package the ranges are no-ops."""

from __future__ import annotations

import contextlib

try:
    import nvtx as _nvtx
except ImportError:  # optional at run time; listed in install_requires
    _nvtx = None

DOMAIN = "opd_fast"


def nvtx_range(name: str):
    if _nvtx is None:
        return contextlib.nullcontext()
    return _nvtx.annotate(name, domain=DOMAIN)
