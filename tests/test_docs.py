"""docs/layouts.md and docs/rewrites.md are generated from the compiler; a stale copy would
document wrong dumps."""

import subprocess
import sys

from conftest import ROOT


def test_generated_docs_are_current() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "docs" / "generate.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_the_code_map_lists_every_module() -> None:
    """docs/code-map.md gives each module its one job; a module added without a line there is
    one a reader cannot place."""
    text = (ROOT / "docs" / "code-map.md").read_text(encoding="utf-8")
    modules = [p.relative_to(ROOT).as_posix() for pkg in ("ir", "passes", "compiler", "runtime", "bench")
               for p in sorted((ROOT / pkg).rglob("*.py")) if p.name != "__init__.py"]
    missing = [m for m in modules if f"`{m}`" not in text]
    assert not missing, missing
