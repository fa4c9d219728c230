"""``einshard launch -n N -- COMMAND``: N local processes of one multi-process run.

Each process runs ``einshard COMMAND`` with ``--coordinator 127.0.0.1:PORT`` (a free loopback
port), ``--num-processes N`` and its ``--process-id``, so it is exactly what a user would start
by hand on N hosts. Process 0's output streams through; the others write to per-process logs
that are shown when a process fails. The exit status is the worst one (a process killed by a
signal counts as 128 + the signal). Nothing hangs: once one process fails, the rest get
``--grace`` seconds to finish before they are killed, and Ctrl-C kills them all.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from compiler.exit_codes import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK
from ir.errors import FileError, SpecError

#: Subcommands that take the multi-process flags.
MULTIPROCESS_COMMANDS = ("run", "generate", "serve")
DEFAULT_GRACE = 45.0  # longer than the default --peer-timeout, so survivors can name the dead process
LOG_TAIL = 40


def add_launch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--num-processes", dest="launch_n", type=int, required=True, metavar="N",
                   help="processes to start on this machine")
    p.add_argument("--devices-per-process", type=int, metavar="K",
                   help="simulated CPU devices of each process (default: the mesh size / N)")
    p.add_argument("--init-timeout", dest="launch_init_timeout", type=int, metavar="S",
                   help="passed to every process: seconds to wait for the others to join")
    p.add_argument("--grace", type=float, default=DEFAULT_GRACE, metavar="S",
                   help=f"after one process fails, seconds the others get before they are killed "
                        f"(default {DEFAULT_GRACE:g})")
    p.add_argument("--timeout", type=float, metavar="S", help="kill every process after S seconds (default: none)")
    p.add_argument("--log-dir", type=Path, metavar="DIR",
                   help="where processes 1..N-1 write their output (default: a temporary folder)")
    p.add_argument("command", nargs=argparse.REMAINDER,
                   help="-- then an einshard command (run, generate or serve) and its arguments")


def free_port() -> int:
    """A loopback TCP port nobody listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Plan:
    """The command lines of the N processes and where processes 1.. log."""

    argvs: tuple[tuple[str, ...], ...]
    logs: tuple[Path | None, ...]


def plan(command: Sequence[str], n: int, port: int, log_dir: Path, devices_per_process: int | None = None,
         init_timeout: int | None = None) -> Plan:
    """Each process's ``einshard`` argv: the command plus its place in the group."""
    cmd = list(command)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if cmd and cmd[0] == "einshard":
        cmd = cmd[1:]
    if not cmd:
        raise SpecError("einshard launch needs a command after --, e.g. `einshard launch -n 2 -- run SPEC --check`")
    if cmd[0] not in MULTIPROCESS_COMMANDS:
        raise SpecError(f"einshard launch runs {', '.join(MULTIPROCESS_COMMANDS)}, not {cmd[0]!r}")
    taken = [f for f in ("--coordinator", "--num-processes", "--process-id")
             if any(a == f or a.startswith(f + "=") for a in cmd)]
    if taken:
        raise SpecError(f"einshard launch sets {', '.join(taken)} itself; leave it out of the command")
    if n < 1:
        raise SpecError(f"-n must be >= 1, got {n}")
    extra = []
    if devices_per_process is not None:
        if devices_per_process < 1:
            raise SpecError(f"--devices-per-process must be >= 1, got {devices_per_process}")
        extra += ["--devices", str(devices_per_process * n)]
    if init_timeout is not None:
        extra += ["--init-timeout", str(init_timeout)]
    base = [sys.executable, "-m", "compiler.cli", *cmd, *extra, "--coordinator", f"127.0.0.1:{port}",
            "--num-processes", str(n)]
    argvs = tuple(tuple([*base, "--process-id", str(i)]) for i in range(n))
    logs = tuple(None if i == 0 else log_dir / f"process-{i}.log" for i in range(n))
    return Plan(argvs, logs)


def _status(rc: int) -> int:
    """A Popen return code as a shell exit status (killed by signal s: 128 + s)."""
    return 128 - rc if rc < 0 else rc


def describe_exit(rc: int) -> str:
    """A Popen return code in words: "exited with 1", "was killed by signal 9 (SIGKILL)"."""
    if rc >= 0:
        return f"exited with {rc}"
    try:
        name = f" ({signal.Signals(-rc).name})"
    except ValueError:
        name = ""
    return f"was killed by signal {-rc}{name}"


def _kill(procs: Sequence[subprocess.Popen], sig: int) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass


def _show_log(i: int, rc: int | None, log: Path | None) -> None:
    what = "was killed by launch" if rc is None else describe_exit(rc)
    if rc == -signal.SIGABRT:
        what += " (an abort: JAX's distributed runtime lost contact with another process)"
    if log is None:
        print(f"launch: process {i} {what} (its output is above)", file=sys.stderr)
        return
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        lines = []
    print(f"launch: process {i} {what}; last {min(len(lines), LOG_TAIL)} lines of {log}:", file=sys.stderr)
    for line in lines[-LOG_TAIL:]:
        print(f"  [{i}] {line}", file=sys.stderr)


def run_processes(pl: Plan, grace: float, timeout: float | None) -> int:
    """Starts every process, waits for them, returns the worst exit status."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs: list[subprocess.Popen] = []
    files = []
    try:
        for argv, log in zip(pl.argvs, pl.logs):
            out = None
            if log is not None:
                out = log.open("w", encoding="utf-8")
                files.append(out)
            # own process group: a signal meant for one run reaches all of its threads and children
            procs.append(subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
                                          stdin=subprocess.DEVNULL, start_new_session=True))
        start, first_fail = time.monotonic(), None
        killed: set[int] = set()
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
            if failed and first_fail is None:
                first_fail = now
                print(f"launch: process {failed[0]} {describe_exit(procs[failed[0]].returncode)}; "
                      f"the others get {grace:g} s to finish", file=sys.stderr)
            late = first_fail is not None and now - first_fail > grace
            if late or (timeout is not None and now - start > timeout):
                alive = [i for i, p in enumerate(procs) if p.poll() is None]
                why = f"{grace:g} s after a process failed" if late else f"after --timeout {timeout:g} s"
                print(f"launch: killing process(es) {', '.join(map(str, alive))} {why}", file=sys.stderr)
                killed.update(alive)
                _kill(procs, signal.SIGKILL)
                for p in procs:
                    p.wait()
                break
            time.sleep(0.05)
    except KeyboardInterrupt:
        _kill(procs, signal.SIGINT)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            time.sleep(0.05)
        _kill(procs, signal.SIGKILL)
        for p in procs:
            p.wait()
        print("launch: interrupted; every process stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        for f in files:
            f.close()
    statuses = [_status(p.returncode) for p in procs]
    for i, (st, p) in enumerate(zip(statuses, procs)):
        if st != 0:
            _show_log(i, None if i in killed else p.returncode, pl.logs[i])
    return max(statuses) if statuses else EXIT_OK


def cmd_launch(args: argparse.Namespace) -> int:
    log_dir = args.log_dir
    if args.grace < 0 or (args.timeout is not None and args.timeout <= 0):
        raise SpecError("--grace must be >= 0 and --timeout > 0")
    if log_dir is None:
        log_dir = Path(tempfile.mkdtemp(prefix="einshard-launch-"))
    else:
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise FileError(f"--log-dir '{log_dir}' cannot be a folder: {e.strerror or e}") from None
    pl = plan(args.command, args.launch_n, free_port(), log_dir, args.devices_per_process,
              args.launch_init_timeout)
    status = run_processes(pl, args.grace, args.timeout)
    if status == EXIT_OK and args.log_dir is None:
        shutil.rmtree(log_dir, ignore_errors=True)
    return status if status in range(256) else EXIT_ERROR


def subcommand():
    from compiler.subcommand import Subcommand

    return Subcommand("launch", "start N local processes of one multi-process run (jax.distributed)",
                      add_launch_args, cmd_launch)
