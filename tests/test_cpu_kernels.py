"""runtime.cpu_kernels: the hand-written int8 rows-times-weight kernel behind int8_dot on CPU.

* Its int32 sums equal numpy's int64 product bit for bit for any shape (tails of the 32-byte
  vectors and of the 4-row groups, one chunk or many split with the helper threads), weights
  spanning the whole int8 range (-128 included), activations in int8_dot's [-127, 127].
* int8_dot uses it on CPU (the compiled program calls the FFI target) and gives what XLA's own
  int8 dot gives; turned off, or where it cannot be built, int8_dot keeps XLA's dot, with the
  reason in ``status()``.
* Eight simulated devices calling it at once (a shard_map program) and Python threads calling
  it concurrently each get their own exact products (one call at a time uses the helpers).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st
from jax.sharding import Mesh, PartitionSpec as P

from runtime import cpu_kernels
from runtime.lower_jax import int8_dot

from conftest import ROOT


def _avx2() -> bool:
    try:
        return " avx2 " in Path("/proc/cpuinfo").read_text().replace("\n", " ")
    except OSError:
        return False


#: where the kernel must build and run (an x86-64 Linux CPU with AVX2 and a C++ compiler, as on
#: CI): there a broken build fails these tests instead of quietly keeping XLA's dot
CAN_BUILD = platform.machine() in ("x86_64", "AMD64") and _avx2() and any(
    shutil.which(c) for c in ("g++", "c++", "clang++"))
pytestmark = pytest.mark.skipif(not CAN_BUILD, reason="the kernel is AVX2 C++: needs an x86-64 CPU with AVX2 and g++")


def test_the_kernel_is_on_where_it_can_be_built() -> None:
    assert cpu_kernels.available(), cpu_kernels.status()


def _exact(xq: np.ndarray, w: np.ndarray) -> np.ndarray:
    return (xq.astype(np.int64) @ w.astype(np.int64).T).astype(np.int32)


def _operands(rng: np.random.Generator, p: int, c: int, q: int) -> tuple[np.ndarray, np.ndarray]:
    xq = rng.integers(-127, 128, (p, c)).astype(np.int8)
    w = rng.integers(-128, 128, (q, c)).astype(np.int8)
    w.flat[rng.integers(0, w.size)] = -128  # the value whose magnitude needs the unsigned read
    xq[0, 0], w[0, 0] = -127, -128  # the largest product, with others summing towards int16's edge
    return xq, w


_dot = jax.jit(cpu_kernels.int_rows_dot)


@given(p=st.integers(1, cpu_kernels.MAX_ROWS), c=st.integers(1, 200), q=st.integers(1, 300),
       seed=st.integers(0, 2**32 - 1))
def test_kernel_is_the_exact_integer_product(p, c, q, seed) -> None:
    xq, w = _operands(np.random.default_rng(seed), p, c, q)
    np.testing.assert_array_equal(np.asarray(_dot(xq, w)), _exact(xq, w))


@pytest.mark.parametrize("p,c,q", [(1, 576, 49152), (3, 1536, 577), (16, 64, 4099)])
def test_many_chunks_split_with_the_helpers(p, c, q) -> None:
    xq, w = _operands(np.random.default_rng(q), p, c, q)
    np.testing.assert_array_equal(np.asarray(_dot(xq, w)), _exact(xq, w))


def test_saturation_edge() -> None:
    """Every pair of products at 127 x -128 (maddubs adds two into int16: -32512, inside)."""
    xq = np.full((2, 96), 127, np.int8)
    xq[1] = -127
    w = np.full((5, 96), -128, np.int8)
    np.testing.assert_array_equal(np.asarray(_dot(xq, w)), _exact(xq, w))


def test_int8_dot_calls_the_kernel_and_equals_xla() -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 96)).astype(np.float32)
    m = rng.integers(-127, 128, (48, 96)).astype(np.int8)
    hlo = jax.jit(int8_dot).lower(x, m).as_text()
    assert cpu_kernels.TARGET in hlo
    a = jnp.max(jnp.abs(x), axis=1, keepdims=True) / 127.0
    xq = jnp.round(x / a).astype(jnp.int8)
    xla = jax.lax.dot_general(xq, m, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
    np.testing.assert_array_equal(np.asarray(jax.jit(int8_dot)(x, m)), np.asarray(xla.astype(jnp.float32) * a))
    # more rows than a decode step: XLA's dot (the kernel takes at most MAX_ROWS)
    big = np.repeat(x, 7, axis=0)
    assert cpu_kernels.TARGET not in jax.jit(int8_dot).lower(big, m).as_text()


def test_eight_devices_at_once() -> None:
    rng = np.random.default_rng(5)
    xq = rng.integers(-127, 128, (8 * 2, 576)).astype(np.int8)
    w = rng.integers(-128, 128, (8 * 600, 576)).astype(np.int8)
    mesh = Mesh(np.array(jax.devices()[:8]), ("x",))
    f = jax.shard_map(cpu_kernels.int_rows_dot, mesh=mesh, in_specs=(P(None), P("x")), out_specs=P(None, "x"))
    np.testing.assert_array_equal(np.asarray(jax.jit(f)(xq, w)), _exact(xq, w))


def test_python_threads_at_once() -> None:
    rng = np.random.default_rng(6)
    cases = [_operands(rng, 1 + i % 4, 576, 3000 + 97 * i) for i in range(6)]
    got: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        for _ in range(5):
            got[i] = np.asarray(_dot(*cases[i]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for i, (xq, w) in enumerate(cases):
        np.testing.assert_array_equal(got[i], _exact(xq, w))


_OFF = """
import numpy as np, jax
from runtime import cpu_kernels
from runtime.lower_jax import int8_dot
x = np.linspace(-2, 3, 3 * 96, dtype=np.float32).reshape(3, 96)
m = (np.arange(48 * 96) % 255 - 127).astype(np.int8).reshape(48, 96)
print(cpu_kernels.status())
print(cpu_kernels.TARGET in jax.jit(int8_dot).lower(x, m).as_text())
np.save(__import__("sys").argv[1], np.asarray(jax.jit(int8_dot)(x, m)))
"""


@pytest.mark.parametrize("env,why", [({"EINSHARD_CPU_KERNELS": "0"}, "turned off by EINSHARD_CPU_KERNELS=0"),
                                     ({"CXX": "/nonexistent/g++"}, "could not build the kernels")])
def test_off_or_unbuildable_keeps_xlas_dot(tmp_path, env, why) -> None:
    base = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}
    outs: list[np.ndarray] = []
    runs: tuple[dict[str, str], ...] = ({}, env)
    for extra in runs:
        out = tmp_path / f"y{len(outs)}.npy"
        r = subprocess.run([sys.executable, "-c", _OFF, str(out)], cwd=ROOT, env={**base, **extra},
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        status, called = r.stdout.split("\n")[:2]
        assert (status == "on") if not extra else status.startswith(why), r.stdout
        assert called == str(not extra)
        outs.append(np.load(out))
    np.testing.assert_array_equal(outs[0], outs[1])  # the same exact sums either way
