"""Random weights made block by block (runtime/random_blocks.py): any block equals the same block
of the whole weight, the values have random_weights' scales, and a block makes only itself."""

from __future__ import annotations

import numpy as np

from compiler.build import BuildConfig, build_module
from conftest import EXAMPLES
from compiler.spec import load_spec
from runtime import random_blocks
from runtime.random_blocks import lazy_random_weights, normal_at
from runtime.weights import random_weights


def _fn():
    spec = load_spec(EXAMPLES / "tiny-gqa.model")
    return build_module(spec.model, BuildConfig(2, 4, 8, ("prefill",))).function("prefill")


def test_blocks_equal_the_whole_and_scales_match_random_weights() -> None:
    fn = _fn()
    lazy, eager = lazy_random_weights(fn, seed=3), random_weights(fn, seed=3)
    assert set(lazy) == set(eager)
    rng = np.random.default_rng(0)
    for name, w in lazy.items():
        whole = np.asarray(w)
        assert whole.shape == eager[name].shape and whole.dtype == np.float32, name
        # same role and scale as random_weights (different values): mean and std within sampling noise
        assert abs(whole.mean() - eager[name].mean()) < 0.1 + 4 * eager[name].std() / np.sqrt(whole.size), name
        assert 0.8 < whole.std() / eager[name].std() < 1.25, name
        for _ in range(5):
            lo = [int(rng.integers(0, n)) for n in whole.shape]
            idx = tuple(slice(a, int(rng.integers(a + 1, n + 1))) for a, n in zip(lo, whole.shape))
            assert np.array_equal(w[idx], whole[idx]), (name, idx)
            if w.layered:
                assert np.array_equal(w[1][idx[1:]], whole[1][idx[1:]]), name
    assert not np.array_equal(np.asarray(lazy_random_weights(fn, seed=4)["embed"]), np.asarray(lazy["embed"]))


def test_a_block_makes_only_itself_and_rounds_like_round_to() -> None:
    fn = _fn()
    w = lazy_random_weights(fn, dtype="bf16")["embed"]
    before = random_blocks.BUILT.bytes
    half = w[: w.shape[0] // 2]
    assert random_blocks.BUILT.bytes - before == half.nbytes and 2 * half.size == np.prod(w.shape)
    import ml_dtypes

    assert np.array_equal(half.astype(ml_dtypes.bfloat16).astype(np.float32), half)


def test_normals_are_standard() -> None:
    z = normal_at(12345, np.arange(200_000))
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01 and np.isfinite(z).all()
    assert abs(np.corrcoef(z[:-1], z[1:])[0, 1]) < 0.01  # neighbours independent
