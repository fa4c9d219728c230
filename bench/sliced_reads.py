"""Weight bytes each process of a multi-process run reads or makes: N real processes
(jax.distributed over loopback) each place the weights on their devices as the commands do and
report their share.

    python bench/sliced_reads.py CHECKPOINT --mesh x=2,y=2 [-n 2]
    python bench/sliced_reads.py SPEC.model --mesh x=2,y=2 [-n 2]

CHECKPOINT (a Hugging Face directory or a ``.gguf`` file): ``generate``'s runner from lazy
weights (runtime/sliced_weights.py); the figure is the file bytes read (quantized blocks for a
GGUF) against the sum of the checkpoint's tensor bytes, which one process reads whole.
SPEC.model: ``run``'s random weights made block by block (runtime/random_blocks.py) and placed
for its prefill entry; the figure is the float32 bytes made against the whole weights.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from _harness import ROOT


def run_worker(args: argparse.Namespace) -> None:
    """One process of ``run``: places the prefill entry's random weights, prints the bytes made."""
    from compiler.driver import build_for, compile_module, default_pipeline, run_config
    from compiler.spec import apply_overrides, load_spec
    from runtime.distributed import ProcessGroup, initialize
    from runtime.generate import generate
    from runtime.random_blocks import BUILT, lazy_random_weights
    from runtime.weights import random_tokens

    spec = apply_overrides(load_spec(args.checkpoint), mesh=args.mesh)
    n_dev = spec.mesh.n_devices
    initialize(ProcessGroup(args.coordinator, args.num_processes, args.process_id, n_dev // args.num_processes,
                            120))
    from runtime.lower_jax import JaxExecutor

    cfg = run_config(spec, 4, None)
    module = build_for(spec, cfg)
    weights = lazy_random_weights(module.function("prefill"), 0, cfg.dtype)
    ex = JaxExecutor(compile_module(module, default_pipeline(spec)).module)
    tokens = random_tokens(cfg.batch, cfg.prompt_len, spec.model.vocab)
    generate(ex, weights, tokens, cfg.prompt_len)  # one prefill call: the weights placed once
    total = sum(4 * int(_prod(w.shape)) for w in weights.values())
    print(json.dumps({"process": args.process_id, "bytes": BUILT.bytes, "reads": BUILT.reads, "total": total}),
          flush=True)


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
    spec = args.checkpoint.suffix == ".model"
    if args.worker:
        (run_worker if spec else worker)(args)
        return
    reports = measure(args.checkpoint, args.mesh, args.num_processes)
    total = reports[0]["total"] if spec else total_bytes(args.checkpoint)
    what = "random weights (float32)" if spec else "checkpoint tensors"
    print(f"{args.checkpoint.name}, mesh {args.mesh} over {args.num_processes} processes: {what} {total:,} bytes")
    for rep in reports:
        print(f"  process {rep['process']}: {'made' if spec else 'read'} {rep['bytes']:,} bytes "
              f"({rep['bytes'] / total:.1%}) in {rep['reads']} blocks")
    print(f"ratio of the largest process's share to the whole: {max(r['bytes'] for r in reports) / total:.3f}")


if __name__ == "__main__":
    main()
