"""Checkpoint weights read block by block (runtime/sliced_weights.py): every block equals the
same block of the fully loaded weight, and a head-sharded block reads only its own rows."""

from __future__ import annotations

import numpy as np
import pytest

from compiler.generation import weight_types
from compiler.spec import Spec, apply_overrides
from runtime import sliced_weights
from runtime.checkpoint import open_checkpoint
from runtime.sliced_weights import lazy_weights


def _load(family: str, tmp_path_factory):
    from gen_helpers import hf_model

    d = tmp_path_factory.mktemp(f"sliced-{family}")
    if family == "gguf":  # every storage type (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K), q/k permuted
        from test_gguf import _write_tiny_gguf

        d = d / "tiny.gguf"
        _write_tiny_gguf(d, tied=False)
    else:
        hf_model(family).save_pretrained(d)
    ck = open_checkpoint(d)
    spec = apply_overrides(Spec(ck.model_spec(), path=str(d)), mesh="x=2,y=2")
    types = weight_types(spec)
    return ck, spec, types, ck.load_weights(spec.model, types)


@pytest.fixture(scope="module", params=["llama", "falcon", "gguf"])
def ckpt(request, tmp_path_factory):
    """Llama: every weight a plain tensor (sliced on disk); Falcon: fused qkv (read per layer);
    GGUF: rows and quantization blocks of a memory-mapped file."""
    return _load(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _load("llama", tmp_path_factory)


def test_every_block_equals_the_loaded_weight(ckpt) -> None:
    ck, spec, types, full = ckpt
    lazy = lazy_weights(ck, spec.model, types)
    assert set(lazy) == set(full)
    rng = np.random.default_rng(0)
    for name, a in full.items():
        w = lazy[name]
        assert w.shape == a.shape and np.array_equal(np.asarray(w), a), name
        for _ in range(10):
            lo = [int(rng.integers(0, n)) for n in a.shape]
            idx = tuple(slice(lo_, int(rng.integers(lo_ + 1, n + 1))) for lo_, n in zip(lo, a.shape))
            assert np.array_equal(w[idx], a[idx]), (name, idx)
            if w.layered:
                assert np.array_equal(w[1][idx[1:]], a[1][idx[1:]]), name


def test_a_head_block_reads_only_its_rows(llama, monkeypatch) -> None:
    ck, spec, types, full = llama
    read: list[int] = []
    real = sliced_weights._get

    def counting(info, name, box):
        out = real(info, name, box)
        read.append(out.size)
        return out

    monkeypatch.setattr(sliced_weights, "_get", counting)
    w = lazy_weights(ck, spec.model, types)["wq"]  # (N, E, K, G, D): half of the K heads
    N, E, K, G, D = w.shape
    block = w[:, :, : K // 2]
    assert np.array_equal(block, full["wq"][:, :, : K // 2])
    assert sum(read) == block.size == full["wq"].size // 2


def test_a_gguf_head_block_reads_only_its_rows(tmp_path_factory) -> None:
    """Half of wq's K heads reads half of the quantized q rows (Q4_0 in the tiny file): the bytes
    counted are the file's, and no other tensor is touched."""
    ck, spec, types, full = _load("gguf", tmp_path_factory)
    w = lazy_weights(ck, spec.model, types)["wq"]
    K = w.shape[2]
    before = sliced_weights.STATS.bytes
    assert np.array_equal(w[:, :, : K // 2], full["wq"][:, :, : K // 2])
    q = [t for t in ck.reader.tensors if t.name.endswith("attn_q.weight")]
    assert sliced_weights.STATS.bytes - before == sum(int(t.n_bytes) for t in q) // 2
