"""Decode on a mesh with pipeline stages: many tokens per call, the pipeline kept full across them.

A one-token decode call fills and drains the pipeline every token (M + S - 1 stage steps for M
micro-batches). The generation program (``pipeline_generate``, ir/pipeline_ops.py; built by the
runner's ``generate``/``generate_greedy`` phases) makes K tokens for every row in one call of
(K - 1) * max(M, S) + M + S - 1 stage steps: each stage works on a different micro-batch's token
in every step, and a micro-batch's next token enters stage 0 as its last one leaves the last
stage. Rows do not stop inside the call (a row past its budget or stop id keeps decoding into
positions nobody reads); the host cuts each row where the one-token loop would have stopped,
so the tokens are the one-device tokens (sampling keys on seed and position only).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from runtime.lower_jax import entry_program
from runtime.model_runner import Caches, ModelRunner
from runtime import xla_options
from runtime.xla_options import function_int8

STAGE_AXIS = "stage"


def is_pipelined(runner: ModelRunner) -> bool:
    """Whether ``runner``'s programs run over pipeline stages (a ``stage`` mesh axis); known
    once it has compiled a program."""
    mesh = runner.mesh
    return mesh is not None and STAGE_AXIS in mesh.axis_names


class PipelinedDecode:
    """K-token generation programs of one runner, jitted per (batch, K, greedy, context)."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self._fns: dict[tuple[int, int, bool, int | None], Callable] = {}
        self.steps: dict[tuple[int, int, bool, int | None], int] = {}
        #: per compiled program: stages, micro-batches, tokens per call, stage steps (and per token)
        self.schedules: dict[tuple[int, int, bool, int | None], dict[str, float]] = {}

    def fn(self, batch: int, tokens: int, greedy: bool, context: int | None = None) -> Callable:
        """(params, caches, tok [B], pos [B], samp) -> (new tokens [B, K], caches): ``tok`` at
        positions ``pos`` in, the K tokens after it out; ``samp`` as runtime/sampling.py's
        SamplingArrays.as_tuple() (seeds uint32)."""
        key = (batch, tokens, greedy, context)
        if key not in self._fns:
            r = self.runner
            ctx = r.cache_len if context is None else context
            module = r.build("generate_greedy" if greedy else "generate", batch, tokens, ctx)
            fn = module.function("decode")
            gen = next(op for op in fn.ops if op.kind == "pipeline_generate")
            S, M, steps = module.mesh_sizes[gen.axis], gen.microbatches, gen.steps(module.mesh_sizes[gen.axis])
            self.steps[key] = steps
            self.schedules[key] = {"stages": S, "microbatches": M, "tokens_per_call": tokens, "stage_steps": steps,
                                   "stage_steps_per_token": steps / tokens, "one_token_call_steps": M + S - 1,
                                   "bubble": 1 - tokens * M / steps}
            program, _ = entry_program(module, "decode", r.backend, split_layers=r.split_layers)
            names = [p.name for p in fn.params]
            caches_of = [p.name for p in fn.params_with_role("cache")]

            def run(params: dict[str, Any], caches: Caches, tok: jax.Array, pos: jax.Array,
                    samp: tuple[jax.Array, ...]) -> tuple[jax.Array, Caches]:
                temp, top_k, top_p, seed = samp
                env: dict[str, Any] = {**params, "tokens": tok[:, None].astype(jnp.int32),
                                       "pos": pos[:, None].astype(jnp.int32), "temperature": temp, "top_k": top_k,
                                       "top_p": top_p, "seed": jax.lax.bitcast_convert_type(seed, jnp.int32)}
                env.update(zip(caches_of, caches))
                outs = program(*[env[n] for n in names])
                return outs[0], tuple(outs[1:])

            self._fns[key] = xla_options.jit(run, function_int8(fn), donate_argnums=(1,))
        return self._fns[key]


def cut_rows(first: np.ndarray, made: np.ndarray, limit: np.ndarray, eos: tuple[int, ...]) -> list[list[int]]:
    """Each row's tokens as the one-token loop makes them: its first token, then the made ones,
    up to its budget ``limit`` (tokens in all) or through its first stop id."""
    stops = set(eos)
    out = []
    for b in range(len(first)):
        row = [int(first[b]), *map(int, made[b])][: int(limit[b])]
        cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        out.append(row[:cut])
    return out
