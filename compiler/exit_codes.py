"""The exit statuses of ``einshard``, one per kind of outcome, so scripts can tell them apart.

The values follow BSD ``sysexits.h`` where one fits (64 usage, 70 internal software error):
argparse's own 2 is not used, because a usage mistake and a bug must not look alike.
"""

from __future__ import annotations

#: The command did what was asked (``run --check``: every error within its tolerance).
EXIT_OK = 0
#: A documented error (an ``EinshardError``: spec, parse, layout, file, cost ... errors, printed
#: with its place and no traceback), or ``run --check`` found a mismatch.
EXIT_ERROR = 1
#: The command line does not parse: unknown flag or subcommand, missing argument, a value of the
#: wrong type (``--steps many``). argparse prints the usage.
EXIT_USAGE = 64
#: Anything else: a bug in einshard. The traceback is printed, with a request to report it.
EXIT_INTERNAL = 70
#: Interrupted with Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130

__all__ = ["EXIT_ERROR", "EXIT_INTERNAL", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE"]
