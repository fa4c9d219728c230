"""What every ``einshard`` subcommand module shares, below compiler/cli.py so that the modules
cli.py registers (generate_cmd, serve_cmd, ...) need not import cli.py back.

A subcommand is a name, a help line, a function that adds its arguments and one that runs it;
cli.py lists them in ``SUBCOMMANDS``. Simulated CPU devices for JAX are requested here too.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from typing import Callable

from ir.errors import SpecError


@dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


_DEVICE_FLAG = re.compile(r"--xla_force_host_platform_device_count=(\S*)")


def ensure_devices(n: int, explicit: bool = False) -> None:
    """Simulated CPU devices must be requested before JAX starts. An explicit ``--devices``
    replaces a count already in XLA_FLAGS; once JAX has started, a different one is refused
    rather than ignored."""
    flags = os.environ.get("XLA_FLAGS", "")
    m = _DEVICE_FLAG.search(flags)
    current = m.group(1) if m else None
    if not explicit and (current is not None or n <= 1):
        return
    if current == str(n):
        return
    if "jax" in sys.modules:
        if explicit:
            raise SpecError(f"--devices {n} cannot take effect: JAX has already started "
                            f"({'with ' + current + ' devices from XLA_FLAGS' if current else 'without it'})")
        return
    flag = f"--xla_force_host_platform_device_count={n}"
    os.environ["XLA_FLAGS"] = _DEVICE_FLAG.sub(flag, flags) if m else f"{flags} {flag}".strip()
