"""opd-fast as a package: the built-in configs and tiny world inside it, the version, and a wheel that runs the
built-in defaults from a folder that is not the repository."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT

import opd_fast
from opd_fast.resources import BUILTIN_FILES, TINY_CONFIG, builtin_path

BUILTIN = ROOT / "opd_fast" / "builtin"
CONFIGS = ROOT / "configs"


def _files(root: Path) -> dict[str, Path]:
    """Every file under root's BUILTIN_FILES entries, by its path relative to root."""
    found = {}
    for entry in BUILTIN_FILES:
        path = root / entry
        for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
            found[file.relative_to(root).as_posix()] = file
    return found


def test_builtin_files_are_the_repositorys_configs_byte_for_byte():
    """opd_fast/builtin/ is what the wheel ships of configs/; edit configs/, then copy what changed."""
    shipped, repo = _files(BUILTIN), _files(CONFIGS)
    differ = sorted(
        name for name in repo.keys() & shipped.keys() if repo[name].read_bytes() != shipped[name].read_bytes()
    )
    fix = "copy configs/ onto opd_fast/builtin/: " + " && ".join(
        f"cp configs/{name} opd_fast/builtin/{name}" for name in sorted(differ + sorted(repo.keys() - shipped.keys()))
    )
    assert repo.keys() - shipped.keys() == set(), f"missing from opd_fast/builtin/; {fix}"
    assert shipped.keys() - repo.keys() == set(), "in opd_fast/builtin/ but not in configs/: delete them there"
    assert differ == [], f"opd_fast/builtin/ differs from configs/ in {differ}; {fix}"
    # nothing else in the folder: what ships is exactly BUILTIN_FILES
    assert {p.relative_to(BUILTIN).as_posix() for p in BUILTIN.rglob("*") if p.is_file()} == shipped.keys()


def test_tiny_config_finds_its_prompts_and_teachers_in_either_copy():
    from opd_fast.config import load_config

    for copy in (CONFIGS, builtin_path("")):
        cfg = load_config(copy / TINY_CONFIG)
        for task in cfg.tasks:
            for path in (Path(task.prompts), Path(task.teacher.path)):
                assert path.exists() and path.is_relative_to(copy / "tiny"), (copy, task.name, path)


def test_version_comes_from_one_place(capsys):
    from opd_fast.cli import build_parser

    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"opd-fast {opd_fast.__version__}"
    # setup.py reads the same string (the wheel test checks the built metadata carries it)
    assert f'__version__ = "{opd_fast.__version__}"' in (ROOT / "opd_fast" / "__init__.py").read_text()


# What `python -m opd_fast.cli ARGS` runs, preceded by a report of where opd_fast was imported from: the same
# process that runs the command names its package file.
RUN_CLI = (
    "import runpy, opd_fast; print('opd_fast imported from', opd_fast.__file__, flush=True); "
    "runpy.run_module('opd_fast.cli', run_name='__main__', alter_sys=True)"
)
PROBE = (
    "import json, importlib.metadata, torch, opd_fast, opd_fast._C, opd_fast.resources as r; print(json.dumps({"
    "'package': opd_fast.__file__, 'extension': opd_fast._C.__file__, 'builtin': str(r.builtin_path('tiny.yaml')), "
    "'version': opd_fast.__version__, 'metadata_version': importlib.metadata.version('opd-fast')}))"
)


def test_wheel_installs_and_runs_the_builtin_defaults_from_another_folder(tmp_path):
    """Build the wheel (compiling the CPU extension), install it into a fresh folder, and from a folder that is not
    the repository run the tiny default (one round) and the quick demo's first stage with that folder on
    PYTHONPATH. The venv's editable install maps opd_fast to the repository through a finder that setuptools
    appends to sys.meta_path, after the path-based finder that searches PYTHONPATH: the wheel's copy wins, and the
    probe below shows it (and that without PYTHONPATH the same import lands elsewhere)."""
    source, wheels, site, work = (tmp_path / name for name in ("source", "wheels", "site", "work"))
    source.mkdir()
    # what a build reads: the build outputs of this checkout (in-tree _C*.so, build/) stay behind
    for name in ("setup.py", "MANIFEST.in", "csrc", "opd_fast"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        else:
            shutil.copy2(src, source / name)
    env = {**os.environ, "OPD_FAST_NO_CUDA": "1"}  # the CPU extension only: the CUDA one is not this test's subject
    env.pop("PYTHONPATH", None)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-build-isolation", "--no-deps", "-w", str(wheels), str(source)],
        check=True,
        env=env,
        cwd=tmp_path,
    )
    (wheel,) = wheels.glob("opd_fast-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    shipped = {f"opd_fast/builtin/{name}" for name in _files(BUILTIN)}
    assert shipped <= names, sorted(shipped - names)
    assert any(n.startswith("opd_fast/_C.") and n.endswith(".so") for n in names), "the CPU extension is missing"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, env=env)

    work.mkdir()  # no configs/ here, nor anywhere above that the run could find by accident
    installed = {**env, "PYTHONPATH": str(site)}

    def probe(environment) -> dict:
        out = subprocess.run(
            [sys.executable, "-c", PROBE], env=environment, cwd=work, check=True, capture_output=True, text=True
        )
        return json.loads(out.stdout.strip().splitlines()[-1])

    found = probe(installed)
    for key in ("package", "extension", "builtin"):
        assert Path(found[key]).is_relative_to(site), (key, found[key])
    assert found["version"] == found["metadata_version"] == opd_fast.__version__
    assert not Path(probe(env)["package"]).is_relative_to(site)  # the control: PYTHONPATH is what picks the wheel

    def run_cli(*args) -> str:
        done = subprocess.run(
            [sys.executable, "-c", RUN_CLI, *args], env=installed, cwd=work, capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert f"opd_fast imported from {site / 'opd_fast' / '__init__.py'}" in done.stdout, done.stdout[-3000:]
        return done.stdout

    run_cli("train", "--out", "t", "--set", "train.rounds=1", "--set", "logging.progress=false")
    run = json.loads((work / "t" / "run.json").read_text())["config"]
    for task in run["tasks"]:  # the tiny config and its world came from the wheel's copy
        assert Path(task["prompts"]).is_relative_to(site / "opd_fast" / "builtin"), task["prompts"]
    assert (work / "t" / "lora_diffusers").is_dir()

    out = run_cli("demo", "--quick", "--out", "d", "--cache", "cache", "--workers", "1", "--only", "prompts")
    (folder,) = (work / "cache").glob("prompts-*")
    assert f"stage prompts is done: {Path('cache') / folder.name}" in out
    assert sorted(p.name for p in folder.iterdir()) == ["aesthetic.txt", "composition.txt", "glyph.txt", "result.json"]
