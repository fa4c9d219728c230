"""Decode on pipeline stages: one K-token call with the pipeline kept full (``pipeline_generate``)
against the one-token loop that fills and drains the pipeline every token, interleaved A/B.

    .venv/bin/python bench/pipeline_generate.py [--mesh stage=4,x=2] [--batch 16] [--new 33] [--rounds 5]

Prints the schedule (stage steps per token, bubble) of both and the median decode ms per token
of each arm, and checks that both give the same tokens. On this CPU the simulated devices share
two cores, so stages do not run in parallel: the wall-time ratio shows the work saved (fewer
stage-body runs per token), not the overlap a real multi-chip pipeline gets.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from _harness import ROOT, use_cpu_devices

use_cpu_devices(8)  # before JAX is imported


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT / "examples" / "tiny-mqa.model"))
    p.add_argument("--mesh", default="stage=4,x=2")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt", type=int, default=8)
    p.add_argument("--new", type=int, default=33)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--set", action="append", default=[], help="spec override, e.g. model.layers=16")
    a = p.parse_args(argv)

    import numpy as np

    import runtime.generator as generator
    from compiler.generation import make_runner, weight_types
    from compiler.spec import apply_overrides, load_spec
    from ir.module import Function, Param
    from ir.pipeline_ops import generate_steps
    from runtime.generator import GenerateRequest, Generator
    from runtime.sampling import SamplingParams
    from runtime.weights import random_weights

    spec = apply_overrides(load_spec(a.model), mesh=a.mesh, sets=a.set)
    params = tuple(Param(n, t, "weight") for n, t in weight_types(spec).items())
    weights = random_weights(Function("w", params, (), (), ()))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, spec.model.vocab, a.prompt).tolist() for _ in range(a.batch)]
    req = GenerateRequest.of(prompts, SamplingParams(), a.new)
    gen = Generator(make_runner(spec, weights, a.prompt + a.new, batch=a.batch))
    pipelined = generator.is_pipelined

    def one_token(runner: object) -> bool:
        return False

    def run(kept_full: bool):
        generator.is_pipelined = pipelined if kept_full else one_token
        try:
            res = gen.generate(req)
        finally:
            generator.is_pipelined = pipelined
        return res.tokens, 1e3 * res.decode_s / (a.new - 1)

    want, _ = run(False)  # compile both
    got, _ = run(True)
    same = got == want
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(a.rounds):
        for arm in (True, False):
            times[arm].append(run(arm)[1])
    K = a.new - 1
    (key, steps), = gen.pipelined.steps.items()
    S = dict(gen.runner.mesh.shape)["stage"]
    M = next(m for m in range(1, S + 1) if generate_steps(K, m, S) == steps)
    one, full = statistics.median(times[False]), statistics.median(times[True])
    print(f"{a.mesh}, batch {a.batch} ({M} micro-batches), {K} decode tokens per row, {a.rounds} interleaved rounds")
    print(f"  one-token calls:  {M + S - 1} stage steps per token, bubble {100 * (S - 1) / (M + S - 1):.0f}%, "
          f"{one:.2f} ms/token (median)")
    print(f"  one {K}-token call: {steps} stage steps, {steps / K:.2f} per token, bubble "
          f"{100 * (1 - K * M / steps):.1f}%, {full:.2f} ms/token (median)")
    print(f"  ratio one-token / kept full: {one / full:.2f}x; same tokens: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
