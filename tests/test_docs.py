"""docs/layouts.md and docs/rewrites.md are generated from the compiler; a stale copy would
document wrong dumps."""

import subprocess
import sys

from conftest import ROOT


def test_generated_docs_are_current() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "docs" / "generate.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
