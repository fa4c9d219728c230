"""docs/layouts.md is generated from the compiler; a stale copy would document wrong dumps."""

import subprocess
import sys

from conftest import ROOT


def test_layouts_doc_is_current() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "docs" / "generate.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_rewrites_doc_is_current() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "docs" / "generate_rewrites.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
