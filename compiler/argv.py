"""Where a flag's value sits in the command line, for located errors.

Its own module so that the subcommand modules (serve_cmd, generate_cmd, ...) can locate their
errors without importing compiler.cli, which imports them (tests/test_architecture.py checks
that compiler has no import cycles).
"""

from __future__ import annotations

from typing import Sequence

from ir.errors import Location


def argv_location(argv: Sequence[str], flag: str) -> Location | None:
    """Where ``flag``'s value (``--flag V`` or ``--flag=V``, the last one given) sits in the
    command line, as a Location in file ``<command line>`` whose source line is the argv."""
    line = "einshard " + " ".join(argv)
    col, found = len("einshard "), None
    for i, tok in enumerate(argv):
        if tok == flag and i + 1 < len(argv):
            found = (col + len(tok) + 1, len(argv[i + 1]))
        elif tok.startswith(flag + "="):
            found = (col + len(flag) + 1, len(tok) - len(flag) - 1)
        col += len(tok) + 1
    if found is None:
        return None
    return Location("<command line>", 1, found[0] + 1, line, max(1, found[1]))
