"""A minimal hand-written JAX Llama decoder: the baseline einshard's decode step is held to.

It reads the same device arrays as a :class:`runtime.model_runner.ModelRunner` (so the
arithmetic and the greedy tokens are the same) but is written the way one would write a decoder
by hand: one ``[E, H*D]`` matrix per projection, a per-layer Python loop (unrolled in the
program), a scalar position shared by every row, the cache written with
``lax.dynamic_update_slice`` and greedy argmax on device. ``bench/generate.py`` prints
einshard's on-device step against it; :func:`ab_decode` times the two interleaved in one
process, so only their ratio matters on a loaded machine.

    python bench/minimal_decoder.py [--batch 1] [--steps 32] [--repeats 5] [--context 96]
    python bench/minimal_decoder.py --tiny          # a tiny random Llama, tied head (smoke test)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

if __name__ == "__main__":  # bench/generate.py sets JAX up for one CPU device before jax is imported
    from generate import same_prompt, smollm2_gguf
    from _harness import tiny_llama

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402


@dataclass(frozen=True)
class Shape:
    layers: int
    heads: int
    kv_heads: int
    d_head: int
    eps: float
    theta: float


def minimal_params(runner_params: dict[str, Any], layouts: dict[str, tuple[int, ...]] | None = None) -> dict[str, Any]:
    """The runner's device weights as plain per-layer 2-D matrices (reshapes: no copies). Weights
    the runner stores ``[out, in]`` (``layouts``: runtime/projections.py) are transposed back
    once, here, so that this decoder stays the plain ``x @ W[in, out]`` one."""
    p = dict(runner_params)
    for name, perm in (layouts or {}).items():
        inv = tuple(int(i) for i in np.argsort(perm))
        p[name] = [jnp.transpose(w, inv) for w in p[name]] if isinstance(p[name], list) else jnp.transpose(p[name], inv)

    def layers(name: str, shape: Callable[[Any], tuple[int, ...]]) -> list[jax.Array]:
        return [w.reshape(shape(w)) for w in p[name]]

    return {
        "embed": p["embed"], "head": p.get("lm_head", p["embed"]), "final": p["final_scale"],
        "ln1": list(p["ln1_scale"]), "ln2": list(p["ln2_scale"]),
        "wq": layers("wq", lambda w: (w.shape[0], -1)), "wk": layers("wk", lambda w: (w.shape[0], -1)),
        "wv": layers("wv", lambda w: (w.shape[0], -1)), "wo": layers("wo", lambda w: (-1, w.shape[-1])),
        "gate": list(p["w_gate"]), "up": list(p["w_up"]), "down": list(p["w_down"]),
    }


def _rms(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    return x * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x: jax.Array, pos: jax.Array, theta: float) -> jax.Array:
    d = x.shape[-1]
    inv = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    ang = pos.astype(jnp.float32) * inv
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def make_step(s: Shape) -> Callable:
    """(params, tok [B], pos scalar, (k, v) lists of [B, T, K, D]) -> (next tok [B], caches)."""
    K, G, D = s.kv_heads, s.heads // s.kv_heads, s.d_head

    def step(p, tok, pos, caches):
        ks, vs = caches
        B = tok.shape[0]
        x = p["embed"][tok]  # [B, E]
        T = ks[0].shape[1]
        masked = jnp.arange(T) > pos
        nk, nv = [], []
        for i in range(s.layers):
            h = _rms(x, p["ln1"][i], s.eps)
            q = _rope((h @ p["wq"][i]).reshape(B, K, G, D), pos, s.theta)
            k = _rope((h @ p["wk"][i]).reshape(B, K, D), pos, s.theta)
            v = (h @ p["wv"][i]).reshape(B, K, D)
            kc = lax.dynamic_update_slice(ks[i], k[:, None], (0, pos, 0, 0))
            vc = lax.dynamic_update_slice(vs[i], v[:, None], (0, pos, 0, 0))
            sc = jnp.einsum("bkgd,btkd->bkgt", q, kc) * (D ** -0.5)
            sc = jnp.where(masked, -jnp.inf, sc)
            a = jnp.einsum("bkgt,btkd->bkgd", jax.nn.softmax(sc, axis=-1), vc)
            x = x + a.reshape(B, K * G * D) @ p["wo"][i]
            h = _rms(x, p["ln2"][i], s.eps)
            x = x + (jax.nn.silu(h @ p["gate"][i]) * (h @ p["up"][i])) @ p["down"][i]
            nk.append(kc)
            nv.append(vc)
        logits = _rms(x, p["final"], s.eps) @ p["head"].T
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), (nk, nv)

    return step


def make_loop(s: Shape, steps: int) -> Callable:
    """``steps`` decode steps on device (``fori_loop``), tokens into a buffer; caches donated."""
    step = make_step(s)

    def loop(p, tok, pos, caches):
        def body(i, c):
            tok, caches, out = c
            tok, caches = step(p, tok, pos + i, caches)
            return tok, caches, out.at[:, i].set(tok)

        out = jnp.zeros((tok.shape[0], steps), jnp.int32)
        return lax.fori_loop(0, steps, body, (tok, caches, out))

    return jax.jit(loop, donate_argnums=(3,))


def shape_of(model: Any) -> Shape:
    """The decoder shape of a compiler.spec ModelSpec (Llama family)."""
    return Shape(model.layers, model.heads, model.kv_heads, model.d_head, model.norm_eps, model.rope_theta)


def minimal_run(runner: Any, gen: Any, model: Any, prompt: np.ndarray, steps: int) -> Callable[[], tuple[float, list[int]]]:
    """A timed run of the minimal decoder: einshard's prefill (so it starts from the same cache
    and first token), then ``steps`` greedy tokens on device. Returns (ms per step, row 0's
    tokens) per call."""
    from runtime.model_runner import bucket

    B, P = prompt.shape
    ctx = runner.context_for(max(bucket(P), P + steps + 1))  # what Generator compiles for the same request
    loop = make_loop(shape_of(model), steps)
    mp = minimal_params(runner.params, runner.layouts)

    def run() -> tuple[float, list[int]]:
        first, caches = _prefill_first(gen, runner, prompt, runner.empty_cache(B, ctx), ctx)
        caches = (list(caches[0]), list(caches[1]))
        jax.block_until_ready(caches)
        t0 = time.perf_counter()
        _, _, out = loop(mp, first, jnp.int32(P), caches)
        out = np.asarray(out)
        return (time.perf_counter() - t0) / steps * 1e3, [int(np.asarray(first)[0])] + out[0].tolist()

    return run


def ab_decode(runner: Any, model: Any, prompt: np.ndarray, steps: int, repeats: int) -> dict[str, Any]:
    """einshard's decode (on-device loop and streamed) against the minimal decoder, interleaved
    in one process: each repeat times one run of each. Returns per-step medians (ms) and whether
    the tokens agree."""
    from runtime.generator import GenerateRequest, Generator
    from runtime.sampling import SamplingParams

    gen = Generator(runner)
    req = GenerateRequest.of(prompt.tolist(), SamplingParams(), steps + 1, ())
    gen.compile(req)
    gen.compile(req, stream=True)
    minimal = minimal_run(runner, gen, model, prompt, steps)

    def einshard_run() -> tuple[float, list[int]]:
        res = gen.generate(req)
        return res.decode_s / steps * 1e3, res.tokens[0]

    def stream_run() -> float:
        return gen.generate(req, stream=lambda b, t: None).step_ms_p50

    einshard_run(), minimal(), stream_run()  # warm
    ein, mini, streamed = [], [], []
    toks_e: list[int] = []
    toks_m: list[int] = []
    for _ in range(repeats):
        ms, toks_e = einshard_run()
        ein.append(ms)
        ms, toks_m = minimal()
        mini.append(ms)
        streamed.append(stream_run())
    e, m = statistics.median(ein), statistics.median(mini)
    return {"einshard_ms": e, "minimal_ms": m, "minimal_over_einshard": m / e,
            "stream_ms": statistics.median(streamed),
            "same_tokens": toks_e == toks_m[: len(toks_e)], "einshard_all": ein, "minimal_all": mini}


def _prefill_first(gen: Any, runner: Any, prompt: np.ndarray, caches: Any, ctx: int) -> tuple[jax.Array, Any]:
    from runtime.model_runner import pack_prompts
    from runtime.sampling import SamplingArrays, SamplingParams

    B, P = prompt.shape
    tokens, pos = pack_prompts(prompt.tolist(), P)
    samp = tuple(jnp.asarray(a) for a in SamplingArrays.of([SamplingParams()] * B).as_tuple())
    fn = gen.prefill_fn(B, P, True, ctx)
    return fn(runner.params, caches, jnp.asarray(tokens), jnp.asarray(pos), samp, jnp.full((B,), P, jnp.int32))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--context", type=int, default=0, help="KV cache positions (default: bucketed prompt + steps)")
    ap.add_argument("--weights", default="f32")
    ap.add_argument("--tiny", action="store_true",
                    help="a tiny random Llama with a tied head, as SmolLM2's (smoke test: the same code, seconds)")
    args = ap.parse_args()

    from compiler.generation import make_runner, weight_types
    from compiler.spec import Spec, apply_overrides
    from runtime.checkpoint import open_checkpoint
    from runtime.model_runner import bucket

    tmp = tempfile.TemporaryDirectory()
    ck = open_checkpoint(tiny_llama(Path(tmp.name), tie_word_embeddings=True) if args.tiny else smollm2_gguf())
    model = ck.model_spec()
    spec = apply_overrides(Spec(model), weights=args.weights)
    context = args.context or bucket(args.prompt) + bucket(args.steps + 1)
    runner = make_runner(spec, ck.load_weights(model, weight_types(spec)), context)
    r = ab_decode(runner, model, same_prompt(model.vocab, args.batch, args.prompt), args.steps, args.repeats)
    print(f"batch {args.batch}, context {context}: einshard {r['einshard_ms']:.2f} ms/step, minimal "
          f"{r['minimal_ms']:.2f} ms/step, ratio einshard/minimal {r['einshard_ms'] / r['minimal_ms']:.2f}, "
          f"same tokens {r['same_tokens']}; einshard streamed {r['stream_ms']:.2f} ms/step")
    print("einshard", " ".join(f"{x:.1f}" for x in r["einshard_all"]))
    print("minimal ", " ".join(f"{x:.1f}" for x in r["minimal_all"]))


if __name__ == "__main__":
    main()
