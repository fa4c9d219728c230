"""Checkpoint bytes each process of a multi-process run reads: N real processes (jax.distributed
over loopback) each build ``generate``'s runner from lazy weights (runtime/sliced_weights.py)
and place them on its devices, as ``generate``/``serve`` do; each reports the bytes it read
(file bytes: quantized blocks for a GGUF).

    python bench/sliced_reads.py CHECKPOINT --mesh x=2,y=2 [-n 2]

CHECKPOINT is a Hugging Face directory (safetensors) or a ``.gguf`` file; the total is the sum
of the checkpoint's tensor bytes, which one process reads whole.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from _harness import ROOT


def worker(args: argparse.Namespace) -> None:
    """One process: joins the group, places every weight of the decode entry, prints its reads."""
    from compiler.generation import make_runner, weight_types
    from compiler.spec import Spec, apply_overrides
    from runtime.checkpoint import open_checkpoint
    from runtime.distributed import ProcessGroup, initialize
    from runtime.sliced_weights import STATS, lazy_weights

    ck = open_checkpoint(args.checkpoint)
    spec = apply_overrides(Spec(ck.model_spec(), path=str(args.checkpoint)), mesh=args.mesh)
    n_dev = spec.mesh.n_devices
    initialize(ProcessGroup(args.coordinator, args.num_processes, args.process_id, n_dev // args.num_processes,
                            120))
    runner = make_runner(spec, lazy_weights(ck, spec.model, weight_types(spec)), 64)
    runner.valid_batch(1)  # the first entry places the weights: each process reads its devices' blocks
    print(json.dumps({"process": args.process_id, "bytes": STATS.bytes, "reads": STATS.reads}), flush=True)


def total_bytes(path: Path) -> int:
    """Bytes of every tensor of the checkpoint (what one process reads)."""
    from runtime.checkpoint import read_safetensors_index

    if path.suffix == ".gguf":
        from gguf import GGUFReader

        return sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors)
    size = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}
    return sum(size.get(t.dtype, 4) * int(_prod(t.shape)) for t in read_safetensors_index(path).values())


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def measure(checkpoint: Path, mesh: str, n_proc: int) -> list[dict]:
    """Every process's report."""
    from compiler.launch import free_port

    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("XLA_FLAGS", None)
    base = [sys.executable, __file__, str(checkpoint), "--mesh", mesh, "--worker", "--coordinator",
            f"127.0.0.1:{free_port()}", "--num-processes", str(n_proc)]
    procs = [subprocess.Popen([*base, "--process-id", str(i)], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(n_proc)]
    reports = []
    try:
        for i, p in enumerate(procs):
            out, err = p.communicate(timeout=600)
            if p.returncode != 0:
                raise SystemExit(f"process {i} failed (exit {p.returncode}):\n{err[-3000:]}")
            reports.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            p.kill()
    return reports


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--mesh", default="x=2,y=2")
    ap.add_argument("-n", "--num-processes", type=int, default=2)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--coordinator", help=argparse.SUPPRESS)
    ap.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    total = total_bytes(args.checkpoint)
    print(f"{args.checkpoint.name}, mesh {args.mesh} over {args.num_processes} processes: "
          f"checkpoint tensors {total:,} bytes")
    for rep in measure(args.checkpoint, args.mesh, args.num_processes):
        print(f"  process {rep['process']}: read {rep['bytes']:,} bytes ({rep['bytes'] / total:.1%}) "
              f"in {rep['reads']} reads")


if __name__ == "__main__":
    main()
