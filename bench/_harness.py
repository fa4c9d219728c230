"""What the benchmark scripts share: the repository on ``sys.path``, JAX on CPU devices (set up
before JAX is imported, the only time XLA reads its flags) and the median of warm runs.

Import it first, call :func:`use_cpu_devices`, then import JAX and einshard.
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
