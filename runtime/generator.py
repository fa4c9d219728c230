"""Batch generation: prefill the prompts, then decode until every row stops.

One jitted function does a whole decode iteration (the model's step, sampling, the stop rule)
with the KV cache donated, so it is updated in place. Without streaming the whole loop runs on
device in a ``lax.while_loop`` that exits as soon as every row has stopped; with streaming the
same iteration runs once per host call and each token is handed over as it is made. Both call
the same iteration function, so they give the same tokens.

Rows of different prompt lengths share one prefill (runtime.model_runner.pack_prompts) and
then decode each at its own position; each row stops on its own (end-of-sequence token or its
token budget). Stop strings are text, so they are applied by the caller on the decoded text.

On a mesh with pipeline stages the non-streaming decode is one call that makes every row's
remaining tokens with the pipeline kept full across them (runtime/pipelined_generate.py); the
host cuts each row where this loop would have stopped it, so the tokens are the same.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ir.errors import SpecError
from runtime.model_runner import ModelRunner, bucket, pack_prompts
from runtime.pipelined_generate import PipelinedDecode, cut_rows, is_pipelined
from runtime.sampling import SamplingArrays, SamplingParams, sample
from runtime import xla_options
from runtime.xla_options import tree_int8


@dataclass(frozen=True)
class GenerateRequest:
    """What to generate: prompts (token ids), per-row sampling and budgets, the stop ids."""

    prompts: tuple[tuple[int, ...], ...]
    params: tuple[SamplingParams, ...]
    max_new_tokens: tuple[int, ...]
    eos_ids: tuple[int, ...] = ()

    @staticmethod
    def of(prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
           max_new_tokens: int | Sequence[int], eos_ids: Sequence[int] = ()) -> "GenerateRequest":
        B = len(prompts)
        ps = (params,) * B if isinstance(params, SamplingParams) else tuple(params)
        mx = (max_new_tokens,) * B if isinstance(max_new_tokens, int) else tuple(max_new_tokens)
        if len(ps) != B or len(mx) != B:
            raise SpecError(f"{B} prompts need {B} sampling parameters and budgets, got {len(ps)} and {len(mx)}")
        for i, n in enumerate(mx):
            if n < 1:
                raise SpecError(f"max_new_tokens must be >= 1, got {n} for prompt {i}")
        return GenerateRequest(tuple(tuple(int(t) for t in p) for p in prompts), ps, mx, tuple(eos_ids))


@dataclass
class GenerateResult:
    tokens: list[list[int]]
    finish_reasons: list[str]  # "eos" | "length"
    prompt_tokens: list[int]
    ttft_s: float  # prefill + first token, as the caller saw it
    decode_s: float  # wall time of the decode loop
    step_ms: list[float] = field(default_factory=list)  # per-step times (streaming: each; else the mean)
    batch: int = 0
    prompt_bucket: int = 0
    context: int = 0  # KV-cache positions the programs were compiled for (Generator.context)

    @property
    def generated(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def decode_tokens_per_s(self) -> float:
        # tokens made by the decode loop (the first token of each row comes from prefill)
        made = sum(max(len(t) - 1, 0) for t in self.tokens)
        return made / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def step_ms_p50(self) -> float:
        return float(np.median(self.step_ms)) if self.step_ms else 0.0


def request_shapes(runner: Any, req: GenerateRequest, batch: int | None) -> tuple[int, int, int, int]:
    """(batch, prompt bucket, longest budget, KV-cache positions) of ``req`` on a runner with
    ``vocab``, ``cache_len`` and ``context_for`` (ModelRunner, OffloadRunner): one rule, so a
    request runs at the same program shape whether its layers are resident or streamed."""
    B, L = check_prompts(req, runner.vocab, runner.cache_len, batch)
    need = max(len(p) + m for p, m in zip(req.prompts, req.max_new_tokens))
    return B, L, max(req.max_new_tokens), runner.context_for(max(L, need))


def check_prompts(req: GenerateRequest, vocab: int, cache_len: int, batch: int | None) -> tuple[int, int]:
    """(batch, prompt bucket) of a request, after checking its prompts (non-empty, ids in the
    vocabulary, prompt + budget within the context) before anything compiles, so bad input
    fails at once. ``batch`` pads to a compiled batch size (never below the prompt count)."""
    n = len(req.prompts)
    if n == 0:
        raise SpecError("no prompts to generate from")
    for i, p in enumerate(req.prompts):
        if not p:
            raise SpecError(f"prompt {i} is empty", hint="give at least one token (most tokenizers add BOS)")
        if any(t < 0 or t >= vocab for t in p):
            bad = next(t for t in p if t < 0 or t >= vocab)
            raise SpecError(f"prompt {i} has token id {bad}, outside the vocabulary [0, {vocab})")
        need = len(p) + req.max_new_tokens[i]
        if need > cache_len:
            raise SpecError(f"prompt {i} ({len(p)} tokens) + {req.max_new_tokens[i]} new tokens needs {need} "
                            f"positions; the context holds {cache_len}",
                            hint="shorten the prompt or lower --max-new-tokens")
    return max(batch or n, n), min(bucket(max(len(p) for p in req.prompts)), cache_len)


def pad_rows(req: GenerateRequest, B: int, L: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                                            tuple[jax.Array, ...]]:
    """(tokens, positions, prompt lengths, per-row budgets, sampling arrays) of a request's rows
    packed into a [B, L] bucket; rows past the prompts repeat the first with a budget of 1 (they
    are computed and dropped)."""
    extra = B - len(req.prompts)
    rows = list(req.prompts) + [req.prompts[0]] * extra
    params = list(req.params) + [req.params[0]] * extra
    limit = np.array(list(req.max_new_tokens) + [1] * extra, np.int32)
    tokens, pos = pack_prompts(rows, L)
    lens = np.array([len(p) for p in rows], np.int32)
    samp = tuple(jnp.asarray(a) for a in SamplingArrays.of(params).as_tuple())
    return tokens, pos, lens, limit, samp


class Generator:
    """Compiled prefill + decode iteration + on-device loop for one runner, cached per shape."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self._prefill: dict[tuple[int, int, bool, int | None], Callable] = {}
        self._iterate: dict[tuple[int, bool, int | None], Callable] = {}
        self._loop: dict[tuple[int, int, bool, int | None], Callable] = {}
        self._compiled: dict[tuple, Callable] = {}  # ahead-of-time compiled, by shape
        self.pipelined = PipelinedDecode(runner)  # used on meshes with pipeline stages

    # ---- compiled pieces -----------------------------------------------------------------
    def prefill_fn(self, batch: int, length: int, greedy: bool = False, context: int | None = None) -> Callable:
        """Prefill + the first token. ``greedy``: every row is greedy, so the program leaves out
        the sampling branch (its sort over the vocabulary costs seconds of compile time).
        ``context``: the KV-cache positions (default the runner's cache_len)."""
        key = (batch, length, greedy, context)
        if key not in self._prefill:
            step = self.runner.step("prefill", batch, length, context)

            def prefill(params, caches, tokens, pos, samp, first_pos):
                logits, caches = step(params, tokens, pos, caches)
                tok = sample(logits, *samp, first_pos, greedy_only=greedy)
                return tok, caches

            self._prefill[key] = xla_options.jit(prefill, tree_int8(self.runner.params), donate_argnums=(1,))
        return self._prefill[key]

    def _iteration(self, batch: int, greedy: bool = False, context: int | None = None) -> Callable:
        """(params, caches, state, samp, eos, limit) -> (caches, state): one decode step for
        every live row. state = (tok [B], pos [B], done [B], count [B]); ``pos`` is the position
        of ``tok``, ``count`` the tokens made so far, ``limit`` each row's budget."""
        step = self.runner.step("decode", batch, 1, context)

        def iterate(params, caches, state, samp, eos, limit):
            tok, pos, done, count = state
            logits, caches = step(params, tok[:, None], pos[:, None], caches)
            nxt = sample(logits, *samp, pos + 1, greedy_only=greedy)
            live = ~done
            tok = jnp.where(live, nxt, tok)
            pos = jnp.where(live, pos + 1, pos)
            count = count + live.astype(jnp.int32)
            stop = (count >= limit) | jnp.any(nxt[:, None] == eos[None, :], axis=-1)
            return caches, (tok, pos, done | (live & stop), count)

        return iterate

    def iterate_fn(self, batch: int, greedy: bool = False, context: int | None = None) -> Callable:
        key = (batch, greedy, context)
        if key not in self._iterate:
            iterate = self._iteration(batch, greedy, context)
            self._iterate[key] = xla_options.jit(iterate, tree_int8(self.runner.params), donate_argnums=(1,))
        return self._iterate[key]

    def loop_fn(self, batch: int, max_new: int, greedy: bool = False, context: int | None = None) -> Callable:
        """The whole decode on device: iterate until every row is done; tokens into a buffer."""
        key = (batch, max_new, greedy, context)
        if key not in self._loop:
            iterate = self._iteration(batch, greedy, context)

            def loop(params, caches, state, samp, eos, limit):
                out = jnp.zeros((batch, max_new), jnp.int32).at[:, 0].set(state[0])

                def cond(c):
                    return ~jnp.all(c[1][2])

                def body(c):
                    caches, state, out = c
                    caches, state = iterate(params, caches, state, samp, eos, limit)
                    tok, _, _, count = state
                    out = out.at[jnp.arange(batch), jnp.minimum(count - 1, max_new - 1)].set(tok)
                    return caches, state, out

                caches, state, out = jax.lax.while_loop(cond, body, (caches, state, out))
                return caches, state, out

            # XLA would hoist each int8/bf16 weight's convert out of the loop (loop-invariant code
            # motion): an f32 copy of every weight read on every step, which int8 must not make
            self._loop[key] = xla_options.jit(loop, tree_int8(self.runner.params), donate_argnums=(1,),
                                              compiler_options={"xla_disable_hlo_passes": "while-loop-invariant-code-motion"})
        return self._loop[key]

    # ---- generation ----------------------------------------------------------------------
    def _shapes(self, req: GenerateRequest, batch: int | None) -> tuple[int, int, int, int]:
        """(batch, prompt bucket, longest budget, KV-cache positions) of a request, after
        checking its prompts (see ``check_prompts``). The cache is compiled for what the request
        writes (the prompt bucket, each row's prompt + budget), bucketed: decode attends over
        every compiled position."""
        return request_shapes(self.runner, req, batch)

    def compile(self, req: GenerateRequest, batch: int | None = None, stream: bool = False) -> float:
        """Compiles (ahead of time) the programs ``generate`` will run for ``req``; the seconds
        it took (0 when they were compiled already; the persistent cache makes a rerun cheap)."""
        B, L, max_new, ctx = self._shapes(req, batch)
        r = self.runner
        t0 = time.perf_counter()
        samp = tuple(jnp.asarray(a) for a in SamplingArrays.of([SamplingParams()] * B).as_tuple())
        z = jnp.zeros((B,), jnp.int32)
        state = (z, z, jnp.zeros((B,), bool), z)
        eos = jnp.asarray(np.array(req.eos_ids or (-1,), np.int32))
        caches = r.empty_cache(B, ctx)
        tok = jnp.zeros((B, L), jnp.int32)
        g = all(p.greedy for p in req.params)
        self._aot(("prefill", B, L, g, ctx), self.prefill_fn(B, L, g, ctx), r.params, caches, tok, tok, samp, z)
        if stream:
            self._aot(("iterate", B, g, ctx), self.iterate_fn(B, g, ctx), r.params, caches, state, samp, eos, z)
        elif max_new > 1 and is_pipelined(r):  # stages: K tokens per call (runtime/pipelined_generate.py)
            self._aot(("pipelined", B, max_new - 1, g, ctx), self.pipelined.fn(B, max_new - 1, g, ctx), r.params,
                      caches, z, z, samp)
        elif max_new > 1:
            self._aot(("loop", B, max_new, g, ctx), self.loop_fn(B, max_new, g, ctx), r.params, caches, state, samp,
                      eos, z)
        return time.perf_counter() - t0

    def _aot(self, key: tuple, fn: Any, *args: object) -> None:
        """``fn`` is a ``jax.jit`` function; its compiled form is kept for calls of this shape."""
        if key not in self._compiled:
            self._compiled[key] = fn.lower(*args).compile()

    def _call(self, key: tuple, fn: Callable) -> Callable:
        return self._compiled.get(key, fn)

    def generate(self, req: GenerateRequest, stream: Callable[[int, int], bool | None] | None = None,
                 batch: int | None = None) -> GenerateResult:
        """Generates for every prompt; ``stream(row, token)`` is called for each token as it is
        made when given (then one host call per step), and a true return stops that row.
        ``batch`` pads the rows to a compiled batch size (extra rows repeat the first prompt
        and are dropped)."""
        r = self.runner
        n = len(req.prompts)
        B, L, max_new, ctx = self._shapes(req, batch)
        tokens, pos, lens, limit, samp = pad_rows(req, B, L)
        eos = jnp.asarray(np.array(req.eos_ids or (-1,), np.int32))

        t0 = time.perf_counter()
        caches = r.empty_cache(B, ctx)
        g = all(p.greedy for p in req.params)
        prefill = self._call(("prefill", B, L, g, ctx), self.prefill_fn(B, L, g, ctx))
        first, caches = prefill(r.params, caches, jnp.asarray(tokens), jnp.asarray(pos), samp, jnp.asarray(lens))
        first_h = np.asarray(first)
        ttft = time.perf_counter() - t0
        count = np.ones(B, np.int32)
        done = (count >= limit) | np.isin(first_h, np.array(req.eos_ids, np.int32))
        state = (jnp.asarray(first_h), jnp.asarray(lens), jnp.asarray(done), jnp.asarray(count))
        out = [[int(first_h[b])] for b in range(B)]
        if stream is not None:
            for b in range(n):
                if stream(b, out[b][0]):
                    done[b] = True
            state = (state[0], state[1], jnp.asarray(done), state[3])
        steps: list[float] = []
        t1 = time.perf_counter()
        if stream is None and not done.all() and max_new > 1 and is_pipelined(r):
            # stages: every row's remaining tokens in one call, the pipeline kept full across them
            K = max_new - 1
            run = self._call(("pipelined", B, K, g, ctx), self.pipelined.fn(B, K, g, ctx))
            made, caches = run(r.params, caches, state[0], state[1], samp)
            out = cut_rows(first_h, np.asarray(made), limit, req.eos_ids)
            dt = time.perf_counter() - t1
            steps = [dt / K * 1e3]
        elif stream is None:
            if not done.all():
                loop = self._call(("loop", B, max_new, g, ctx), self.loop_fn(B, max_new, g, ctx))
                caches, state, buf = loop(r.params, caches, state, samp, eos, jnp.asarray(limit))
                counts = np.asarray(state[3])
                buf_h = np.asarray(buf)
                out = [buf_h[b, : counts[b]].tolist() for b in range(B)]
                made = int(counts.max()) - 1
                dt = time.perf_counter() - t1
                steps = [dt / made * 1e3] if made else []
        else:
            iterate = self._call(("iterate", B, g, ctx), self.iterate_fn(B, g, ctx))
            lim = jnp.asarray(limit)
            # One step ahead: step t+1 is dispatched before step t's tokens are read, so the
            # host's wait, transfer and callbacks overlap the device's work. A row the callback
            # stops at step t still gets step t+1 (its token is dropped here) and is marked done
            # in the state step t+2 starts from. The host mirrors the budgets, so no step is
            # dispatched once every row has used its budget (an EOS can cost one wasted step).
            ahead = iterate(r.params, caches, state, samp, eos, lim) if not done.all() else None
            ts = time.perf_counter()
            while ahead is not None:
                caches, state = ahead
                count = count + ~done
                ahead = None if np.all(done | (count >= limit)) else iterate(r.params, caches, state, samp, eos, lim)
                tok_h, dev_done = np.asarray(state[0]), np.asarray(state[2])
                now = time.perf_counter()
                steps.append((now - ts) * 1e3)
                ts = now
                stopped = np.zeros(B, bool)
                for b in range(B):
                    if not done[b]:
                        out[b].append(int(tok_h[b]))
                        if b < n and stream(b, int(tok_h[b])):
                            stopped[b] = True
                done = done | dev_done | stopped
                if done.all():
                    break
                if stopped.any() and ahead is not None:
                    c2, s2 = ahead
                    ahead = (c2, (s2[0], s2[1], s2[2] | jnp.asarray(stopped), s2[3]))
        decode_s = time.perf_counter() - t1
        eos_set = set(req.eos_ids)
        reasons = ["eos" if o and o[-1] in eos_set else "length" for o in out[:n]]
        return GenerateResult(out[:n], reasons, [len(p) for p in req.prompts], ttft, decode_s, steps, B, L, ctx)


def generate(runner: ModelRunner, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
             max_new_tokens: int | Sequence[int], eos_ids: Sequence[int] = ()) -> GenerateResult:
    """One-shot generation (the reference a request alone gets; see Generator for reuse)."""
    return Generator(runner).generate(GenerateRequest.of(prompts, params, max_new_tokens, eos_ids))
