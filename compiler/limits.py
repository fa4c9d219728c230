"""Host memory that ``einshard run`` would need, checked before anything is allocated.

``run --steps 10000000000`` or ``--batch 4611686018427387904`` would otherwise fail deep inside
numpy (or swap the machine to death). The estimate is a lower bound of what run holds at once:
the float32 weights and their float64 reference copy, the KV cache and logits in both
precisions, and the largest prefill activation; shapes above the machine's memory are refused
with that figure.
"""

from __future__ import annotations

import os

from compiler.build import BuildConfig
from compiler.spec import Spec
from ir.model import ModelSpec
from ir.errors import SpecError

GiB = 1 << 30


def param_count(m: ModelSpec) -> int:
    """Parameters of the projections and the embedding (and untied head): a lower bound, norms
    and biases left out, and a mixture of experts counted as one expert of width d_ff."""
    q, kv = m.heads * m.d_head, m.kv_heads * m.d_head
    mlp = (3 if m.mlp == "swiglu" or m.experts else 2) * m.d_model * m.d_ff  # gate, up, down / up, down
    return m.layers * (m.d_model * (q + 2 * kv) + q * m.d_model + mlp) + m.vocab * m.d_model * (
        1 if m.tie_embeddings else 2)


def kv_values(m: ModelSpec, rows: int, context: int) -> int:
    """Values a KV cache of ``rows`` rows of ``context`` positions holds (keys and values)."""
    return m.layers * 2 * rows * context * m.kv_heads * m.d_head


def run_memory_bytes(spec: Spec, cfg: BuildConfig) -> dict[str, int]:
    """Bytes by part (lower bounds), for the shapes of ``cfg``."""
    m = spec.model
    q, kv = m.heads * m.d_head, m.kv_heads * m.d_head
    params = param_count(m)
    cache = kv_values(m, cfg.batch, cfg.cache_len)
    steps = cfg.cache_len - cfg.prompt_len
    logit_rows = (cfg.prompt_len if cfg.logits == "all" else 1) + steps
    logits = cfg.batch * logit_rows * m.vocab
    widest = max(m.d_model, q + 2 * kv, m.d_ff, m.heads * cfg.cache_len)
    activations = cfg.batch * cfg.prompt_len * widest
    f32_f64 = 4 + 8  # the JAX run (f32) and the reference (f64) both hold one
    return {"weights": params * f32_f64, "KV cache": cache * f32_f64, "logits": logits * f32_f64,
            "activations": activations * 8}


def host_memory_bytes() -> int | None:
    """Physical memory of this machine, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_run_memory(spec: Spec, cfg: BuildConfig, available: int | None = None) -> None:
    """A SpecError when ``cfg``'s shapes need more than ``available`` (default: this machine)."""
    available = host_memory_bytes() if available is None else available
    parts = run_memory_bytes(spec, cfg)
    need = sum(parts.values())
    if available is not None and need > available:
        detail = ", ".join(f"{k} {_gib(v)}" for k, v in parts.items() if v)
        raise SpecError(f"these shapes need at least {_gib(need)} of host memory ({detail}); "
                        f"this machine has {_gib(available)}",
                        hint="lower --steps, --prompt-len, --batch or serve.seq")


def serving_memory_bytes(spec: Spec, batch: int, context: int, resident_weights: bool = True) -> dict[str, int]:
    """Lower bounds, by part, of what ``generate``/``serve``/``score`` hold on the host (CPU)
    device: the served weights (1, 2 or 4 bytes a parameter; none when streamed from disk) and
    ``batch`` KV rows of ``context`` positions at 2 bytes or more a value."""
    width = {"int8": 1, "bf16": 2}.get(spec.serve.weights, 4)
    return {"weights": param_count(spec.model) * width if resident_weights else 0,
            "KV cache": kv_values(spec.model, batch, context) * 2}


def check_serving_memory(spec: Spec, batch: int, context: int, flags: str, rows: str = "batch",
                         resident_weights: bool = True, available: int | None = None) -> None:
    """A SpecError before allocation when ``batch`` x ``context`` (and the weights) cannot fit
    this machine's memory: XLA would otherwise fail deep inside, or the machine would swap."""
    available = host_memory_bytes() if available is None else available
    parts = serving_memory_bytes(spec, batch, context, resident_weights)
    need = sum(parts.values())
    if available is not None and need > available:
        detail = ", ".join(f"{k} {_gib(v)}" for k, v in parts.items() if v)
        raise SpecError(f"{rows} {batch} x context {context} needs at least {_gib(need)} of memory ({detail}); "
                        f"this machine has {_gib(available)}", hint=f"lower {flags}")


def _gib(n: int) -> str:
    return f"{n / GiB:.3g} GiB" if n < 2**1000 else "more than 1e290 GiB"  # no float overflow
