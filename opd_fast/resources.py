"""The built-in configs and the tiny world, shipped inside the package as opd_fast/builtin/.

opd_fast/builtin/ is a byte-for-byte copy of the repository's configs/ (the copies users read and edit) for the
files listed in BUILTIN_FILES; tests/test_packaging.py fails on any difference and names the command that syncs
them. Both copies hold the same relative paths (tiny.yaml names tiny/prompts/..., tiny/teachers/...), which
load_config resolves against the config file's own folder, so either copy runs as it is.

Why two checked-in copies instead of one copied into the package at build time: a checkout and an editable install
import opd_fast/ from the source tree, where a build-time copy would be missing or stale, so the code would have to
look in two places and the wheel's place would be tried only by the packaging test. With two copies, every install
reads the same place, and an edit made to one copy only fails a test that says what to run.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

TINY_CONFIG = "tiny.yaml"  # `opd-fast train`'s default: the tiny CPU run
DEMO_CONFIG = "demo.yaml"  # stage 2 of `opd-fast demo`
# what ships, as paths under configs/ and opd_fast/builtin/ (directories: everything below them)
BUILTIN_FILES = (TINY_CONFIG, DEMO_CONFIG, "tiny")


def builtin_path(name: str) -> Path:
    """The file or folder `name` (e.g. "tiny.yaml", "tiny/prompts") of the installed package's built-in copy."""
    root = Path(str(files("opd_fast") / "builtin"))  # a folder on disk: pip installs packages unzipped
    path = root / name
    if not path.exists():
        raise FileNotFoundError(f"opd-fast's built-in {name} is missing from {root} (an incomplete install?)")
    return path
