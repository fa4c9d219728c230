"""One collective step on 8 CPU devices: 2 processes x 4 devices (gloo over loopback TCP) against
1 process x 8 devices, per collective kind and size, and the ratio.

Every collective runs over all 8 devices inside ``jax.shard_map`` (a jitted program per kind and
size, compiled before timing); the figure is the median of ``--repeats`` calls of process 0.
``psum (after psum_scatter)`` repeats the psum once a psum_scatter has run: issue 12 measured
that order at 48-108 ms against 2-10 ms on 256 KiB - 4 MiB (a TCP delayed-ACK stall). The
machine's other load shows in absolute times; the ratio is measured in the same run.

    python bench/multihost.py [--sizes-kib 256,1024,4096] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from _harness import ROOT

KINDS = ("psum", "all_gather", "psum_scatter", "all_to_all", "ppermute", "psum (after psum_scatter)")
N_DEVICES = 8


def _programs(mesh, n_floats: int):
    """kind -> (jitted fn, its input): each device holds ``n_floats`` float32 values."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax
    from jax.sharding import NamedSharding, PartitionSpec as P

    ax = ("d",)
    n = N_DEVICES
    rows = max(n, (n_floats // 128) // n * n)  # per-device block [rows, 128], rows divisible by n
    x = jax.make_array_from_callback((n * rows, 128), NamedSharding(mesh, P("d")),
                                     lambda idx: np.ones((rows, 128), np.float32))
    bodies = {
        "psum": (lambda b: lax.psum(b, ax), P()),
        "all_gather": (lambda b: lax.all_gather(b, ax, axis=0, tiled=True, to="invarying"), P()),
        "psum_scatter": (lambda b: lax.psum_scatter(b, ax, scatter_dimension=0, tiled=True), P("d")),
        "all_to_all": (lambda b: lax.all_to_all(b, ax, 0, 0, tiled=True), P("d")),
        "ppermute": (lambda b: lax.ppermute(b, ax, [(i, (i + 1) % n) for i in range(n)]), P("d")),
    }
    out = {}
    for k, (body, spec) in bodies.items():
        fn = jax.jit(jax.shard_map(lambda b, body=body: body(b) * jnp.float32(1), mesh=mesh, in_specs=P("d"),
                                   out_specs=spec))
        out[k] = (fn, x)
    return out


def _time(fn, x, repeats: int) -> float:
    import jax

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(x))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def worker(args: argparse.Namespace) -> None:
    """One process of a run: times every kind and size; process 0 prints one JSON line."""
    import numpy as np

    if args.num_processes > 1:
        from runtime.distributed import ProcessGroup, initialize

        initialize(ProcessGroup(args.coordinator, args.num_processes, args.process_id,
                                N_DEVICES // args.num_processes, 120))
    else:
        import jax

        jax.config.update("jax_num_cpu_devices", N_DEVICES)
    import jax
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()), ("d",))
    res: dict[str, dict[str, float]] = {k: {} for k in KINDS}
    for kib in args.sizes:
        progs = _programs(mesh, kib * 1024 // 4)
        for fn, x in progs.values():  # compile everything first, without psum_scatter running
            fn.lower(x).compile()
        order = [k for k in KINDS if k not in ("psum_scatter", "psum (after psum_scatter)")]
        for k in order:  # psum first: before any psum_scatter has run in this process
            fn, x = progs[k]
            jax.block_until_ready(fn(x))
            res[k][str(kib)] = _time(fn, x, args.repeats)
        fn, x = progs["psum_scatter"]
        jax.block_until_ready(fn(x))
        res["psum_scatter"][str(kib)] = _time(fn, x, args.repeats)
        fn, x = progs["psum"]
        res["psum (after psum_scatter)"][str(kib)] = _time(fn, x, args.repeats)
    if args.process_id == 0:
        print(json.dumps(res), flush=True)


def measure(n_proc: int, sizes: list[int], repeats: int, env_extra: dict[str, str]) -> dict:
    """Runs the worker in ``n_proc`` processes; process 0's results."""
    from compiler.launch import free_port

    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2", **env_extra}
    env.pop("XLA_FLAGS", None)
    base = [sys.executable, __file__, "--worker", "--coordinator", f"127.0.0.1:{port}", "--num-processes",
            str(n_proc), "--sizes-kib", ",".join(map(str, sizes)), "--repeats", str(repeats)]
    procs = [subprocess.Popen([*base, "--process-id", str(i)], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE if i == 0 else subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for i in range(n_proc)]
    try:
        out, _ = procs[0].communicate(timeout=600)
        for p in procs[1:]:
            p.wait(timeout=120)
    finally:
        for p in procs:
            p.kill()
    if procs[0].returncode != 0:
        raise SystemExit(f"the {n_proc}-process run failed (exit {procs[0].returncode})")
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes-kib", dest="sizes", type=lambda s: [int(t) for t in s.split(",")],
                    default=[256, 1024, 4096], help="bytes per device, KiB (default 256,1024,4096)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--coordinator", help=argparse.SUPPRESS)
    ap.add_argument("--num-processes", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    one = measure(1, args.sizes, args.repeats, {})
    two = measure(2, args.sizes, args.repeats, {})
    print(f"one collective step over {N_DEVICES} CPU devices; median of {args.repeats} calls, ms "
          f"(the machine is shared: compare the ratio)")
    print(f"{'collective':28s} {'KiB/dev':>8s} {'1 proc x 8':>11s} {'2 proc x 4':>11s} {'ratio':>7s}")
    for k in KINDS:
        for kib in args.sizes:
            a, b = one[k][str(kib)] * 1e3, two[k][str(kib)] * 1e3
            print(f"{k:28s} {kib:8d} {a:11.2f} {b:11.2f} {b / a:7.2f}")


if __name__ == "__main__":
    main()
