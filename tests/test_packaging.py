"""The wheel holds every package: built with ``pip wheel``, installed (not editable) into a fresh
virtual environment, ``einshard explain`` and ``einshard run --check`` work from it.

A hand-written package list once left ``compiler.cost`` out of the wheel, so ``explain`` failed
with ModuleNotFoundError after ``pip install .``. The fresh venv sees the project venv's
dependencies through a ``.pth`` path (no downloads) but not its editable einshard, and the
commands run outside the repository, so only the wheel's copy can be imported.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MQA = ROOT / "examples" / "tiny-mqa.model"


def _sh(*cmd: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{cmd}: {r.stdout[-2000:]}{r.stderr[-3000:]}"
    return r


@pytest.mark.slow
def test_wheel_installs_and_runs(tmp_path: Path) -> None:
    src = tmp_path / "src"  # a copy: setuptools writes build/ next to the sources
    for name in ("compiler", "ir", "passes", "runtime"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    _sh(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist",
        src, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("einshard-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for must in ("compiler/cost/explain.py", "compiler/spec.lark", "ir/grammar.lark", "passes/pipeline.lark",
                 "passes/manager.py", "compiler/pipelines.py", "compiler/subcommand.py",
                 "runtime/lower_jax.py"):
        assert must in names, must
    assert not any(n.startswith(("tests/", "bench/")) for n in names)

    venv = tmp_path / "venv"
    _sh(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv, cwd=tmp_path)
    py = venv / "bin" / "python"
    site = Path(_sh(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).stdout.strip())
    (site / "project-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _sh(sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", "-q", wheel, cwd=tmp_path)
    where = _sh(py, "-c", "import compiler.cost.explain as m; print(m.__file__)", cwd=tmp_path).stdout.strip()
    assert where.startswith(str(site)), where

    einshard = venv / "bin" / "einshard"
    out = _sh(einshard, "explain", MQA, "--phase", "decode", "--json", cwd=tmp_path).stdout
    assert json.loads(out)["candidates"]
    out = _sh(einshard, "run", MQA, "--check", "--json", "--steps", "1", "--set", "model.layers=1", cwd=tmp_path).stdout
    assert json.loads(out)["ok"] is True
