"""pytest plugin of the GPU check's `tests` step (bench/gpu_run.py): `pytest -p bench.pytest_cuda -m cuda tests`
selects every CUDA-only test of the suite, so a test added later is picked up without a list of names to keep.

A test is CUDA-only when it is marked `@pytest.mark.cuda` (registered in pytest.ini) or carries a skipif whose
reason says it needs CUDA ("needs a CUDA device", "... is CUDA's"; a reason saying it needs a machine *without*
CUDA does not count). Here the plugin adds the `cuda` marker to the latter, and skips a marked test on a machine
without a CUDA device.
"""

from __future__ import annotations

import pytest

MARKER = "cuda"


def needs_cuda(item: pytest.Item) -> bool:
    if item.get_closest_marker(MARKER) is not None:
        return True
    for mark in item.iter_markers("skipif"):
        reason = str(mark.kwargs.get("reason", ""))
        if "CUDA" in reason and "without CUDA" not in reason:
            return True
    return False


def pytest_configure(config):
    config.addinivalue_line("markers", f"{MARKER}: needs a CUDA device")


def pytest_collection_modifyitems(config, items):
    skip = None
    for item in items:
        if not needs_cuda(item):
            continue
        if item.get_closest_marker(MARKER) is None:
            item.add_marker(MARKER)
        if skip is None:
            import torch  # here, not at import: tests/conftest.py sets TRITON_INTERPRET before anything loads triton

            skip = pytest.mark.skip(reason="needs a CUDA device") if not torch.cuda.is_available() else False
        if skip:
            item.add_marker(skip)
