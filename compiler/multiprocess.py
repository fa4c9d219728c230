"""The multi-process flags of ``run``, ``generate`` and ``serve`` (``--coordinator``,
``--num-processes``, ``--process-id``, ``--init-timeout``, ``--peer-timeout``), checked and turned into a
:class:`runtime.distributed.ProcessGroup`.

Each process is started with the same command and its own ``--process-id``; ``--devices`` (or the
mesh size) counts the devices of all processes together, so a mesh of 8 over 2 processes gives
each 4. ``einshard launch`` (compiler/launch.py) fills these flags in for local processes.
"""

from __future__ import annotations

import argparse

from ir.errors import SpecError
from runtime.distributed import ProcessGroup

DEFAULT_INIT_TIMEOUT = 60
DEFAULT_PEER_TIMEOUT = 30  # generous: a loaded machine must not look like a dead peer
#: The argparse dests of the flags below (serve hands them on to the loader).
MULTIPROCESS_DESTS = ("coordinator", "num_processes", "process_id", "init_timeout", "peer_timeout")


def add_multiprocess_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-process (jax.distributed; einshard launch fills these in)")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address, the same for every process")
    g.add_argument("--num-processes", type=int, metavar="N", help="processes in the run (each brings devices/N)")
    g.add_argument("--process-id", type=int, metavar="I", help="this process, 0 .. N-1 (0 prints the results)")
    g.add_argument("--init-timeout", type=int, default=DEFAULT_INIT_TIMEOUT, metavar="S",
                   help=f"seconds to wait for every process to join, and to notice one that died "
                        f"(default {DEFAULT_INIT_TIMEOUT})")
    g.add_argument("--peer-timeout", type=int, default=DEFAULT_PEER_TIMEOUT, metavar="S",
                   help=f"seconds without a sign of life after which another process counts as dead "
                        f"(default {DEFAULT_PEER_TIMEOUT})")


def process_group(args: argparse.Namespace, n_devices: int) -> ProcessGroup | None:
    """The group these flags describe (None when none is given); SpecError when they are
    incomplete or inconsistent, before anything starts."""
    given = {f: getattr(args, d, None) for f, d in (("--coordinator", "coordinator"),
                                                     ("--num-processes", "num_processes"),
                                                     ("--process-id", "process_id"))}
    if all(v is None for v in given.values()):
        return None
    missing = [f for f, v in given.items() if v is None]
    if missing:
        raise SpecError(f"a multi-process run needs {', '.join(missing)} as well",
                        hint="give --coordinator HOST:PORT --num-processes N --process-id I to every process, "
                             "or let `einshard launch -n N -- ...` do it")
    n, i, coord = args.num_processes, args.process_id, args.coordinator
    if n < 1:
        raise SpecError(f"--num-processes must be >= 1, got {n}")
    if not 0 <= i < n:
        raise SpecError(f"--process-id must be in 0 .. {n - 1}, got {i}")
    host, _, port = coord.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SpecError(f"--coordinator must be HOST:PORT, got {coord!r}")
    for flag, v in (("--init-timeout", args.init_timeout), ("--peer-timeout", args.peer_timeout)):
        if v < 1:
            raise SpecError(f"{flag} must be >= 1 second, got {v}")
    if n_devices % n:
        raise SpecError(f"{n_devices} devices do not split evenly over {n} processes",
                        hint="choose a mesh (or --devices) that is a multiple of --num-processes")
    return ProcessGroup(coord, n, i, n_devices // n, args.init_timeout, args.peer_timeout)


def join(args: argparse.Namespace, mesh_devices: int) -> ProcessGroup | None:
    """Joins the group the flags describe (before any JAX backend starts); None: one process,
    whose simulated devices (``--devices``, else the mesh's) ``compiler.subcommand.ensure_devices``
    sets up instead. Across processes the mesh must span every device: a process left out of
    it would have nothing to run while the others wait for its collectives."""
    n_devices = getattr(args, "devices", None) or mesh_devices
    group = process_group(args, n_devices)
    if group is None:
        from compiler.subcommand import ensure_devices

        ensure_devices(n_devices, explicit=getattr(args, "devices", None) is not None)
        return None
    if n_devices != mesh_devices:
        raise SpecError(f"across processes the mesh must span every device: {n_devices} devices "
                        f"(--devices) but the mesh has {mesh_devices}",
                        hint="leave out --devices (and launch's --devices-per-process), or match the mesh")
    from runtime.distributed import initialize

    initialize(group)
    return group
