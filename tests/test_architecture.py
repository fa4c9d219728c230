"""The import arrows point one way: ``ir <- passes <- compiler``, ``runtime <- ir``, compiler may
import runtime, and no module imports another that (directly or not) imports it back, counting
the imports inside functions too (a lazy import is still an arrow)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("ir", "passes", "compiler", "runtime")
#: Which top-level packages each package may import.
ALLOWED = {"ir": {"ir"}, "passes": {"ir", "passes"}, "runtime": {"ir", "runtime"},
           "compiler": {"ir", "passes", "compiler", "runtime"}}


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> nx.DiGraph:
    mods = {_module(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    g = nx.DiGraph()
    g.add_nodes_from(mods)
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for t in targets:
                if t in mods and t != name:
                    g.add_edge(name, t)
    return g


def test_packages_import_only_downward() -> None:
    bad = [(a, b) for a, b in import_graph().edges if b.split(".")[0] not in ALLOWED[a.split(".")[0]]]
    assert not bad, bad


def test_compiler_has_no_import_cycles() -> None:
    g = import_graph()
    cycles = [c for c in nx.simple_cycles(g.subgraph(n for n in g if n.startswith("compiler")))]
    assert not cycles, cycles


def test_the_cli_starts_without_jax() -> None:
    """Simulated devices must be set up before JAX starts, and the CLI sets them up only once it
    has parsed the mesh: importing the CLI and building its parser must not import JAX (it did
    once, through a subcommand's argument function, and every `--mesh` then saw one device)."""
    code = ("import sys; from compiler.cli import make_parser; make_parser(); "
            "print(sorted(m for m in sys.modules if m == 'jax' or m.startswith('jax.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _imported_roots(path: Path) -> set[str]:
    """The top-level names a module imports anywhere in it (lazy imports included)."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            roots.add(node.module.split(".")[0])
    return roots


def test_jax_is_imported_only_in_the_runtime() -> None:
    """ir, passes and compiler describe and transform programs; only runtime/ (and bench/) run
    them, so a JAX import above the runtime is a layering slip (compiler reaches JAX only
    through runtime modules)."""
    bad = [str(p.relative_to(ROOT)) for pkg in ("ir", "passes", "compiler") for p in (ROOT / pkg).rglob("*.py")
           if _imported_roots(p) & {"jax", "jaxlib"}]
    assert not bad, bad


def test_passes_never_print() -> None:
    """A pass returns its statistics; printing them is the driver's job (a pass that prints
    garbles --json output and the golden files)."""
    bad = [f"{p.relative_to(ROOT)}:{n.lineno}" for p in (ROOT / "passes").rglob("*.py")
           for n in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
           if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "print"]
    assert not bad, bad
