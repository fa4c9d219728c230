"""Layer streaming from disk (issue 15 §1): the streamed run's tokens equal the resident run's and
transformers' greedy tokens on tiny checkpoints (f32, int8, a family with a @prepare), with and
without prefetch, with released buffers poisoned; the pool's bounds, the budget arithmetic,
a stale store, and the CLI.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compiler.cli import main
from compiler.exit_codes import EXIT_ERROR, EXIT_OK
from compiler.offload import ensure_store, make_offload_runner, parse_size, store_key
from gen_helpers import CONTEXT, NEW, PROMPTS, tiny
from ir.errors import SpecError, WeightsError
from runtime.generator import GenerateRequest
from runtime.offload import OffloadGenerator, budget_slots
from runtime.offload_pool import LayerPool
from runtime.offload_store import aligned_buffer, data_path, read_layout, write_store
from runtime.sampling import SamplingParams


def _runner(t, tmp: Path, slots: int, **kw):
    key = store_key(t.path, t.spec)
    d = tmp / f"store-{t.spec.serve.weights}"
    ensure_store(t.spec, key, d, lambda: t.weights)
    layout = read_layout(d, key)
    return make_offload_runner(t.spec, d, key, CONTEXT, layout.globals_bytes + slots * layout.layer_bytes, **kw)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny("llama", tmp_path_factory.mktemp("off-llama"))


@pytest.mark.parametrize("slots,prefetch", [(1, True), (2, True), (2, False)])
def test_streamed_tokens_equal_resident_and_transformers(llama, tmp_path, slots, prefetch) -> None:
    r = _runner(llama, tmp_path, slots, prefetch=prefetch, poison=True)
    try:
        assert r.slots == slots
        req = GenerateRequest.of(PROMPTS, SamplingParams(), NEW)
        got = OffloadGenerator(r).generate(req, batch=4)
        assert got.tokens == llama.generate(PROMPTS, batch=4).tokens
        assert got.tokens == [llama.want(p) for p in PROMPTS]
        # every pass read every layer once: prefill + NEW-1 decode steps (+ what the reader ran ahead)
        passes = NEW
        assert passes * 2 <= r.stats.layers_read <= passes * 2 + r.slots
    finally:
        r.close()


@pytest.mark.parametrize("slots", [1, 2])
def test_next_layer_is_dispatched_before_the_previous_is_released(llama, tmp_path, slots) -> None:
    """With two buffers layer i+1 is dispatched before layer i's buffer goes back (the host's
    per-layer work overlaps the compute); with one, each layer is released before the next."""
    r = _runner(llama, tmp_path, slots)
    events: list[tuple[str, int]] = []
    acquire, release = r.pool.acquire, r.pool.release
    r.pool.acquire = lambda i: (events.append(("acquire", i)), acquire(i))[1]  # type: ignore[method-assign]
    r.pool.release = lambda i: (events.append(("release", i)), release(i))[1]  # type: ignore[method-assign]
    try:
        r.run_layers((), lambda i, w: jnp.ones(()))
    finally:
        r.close()
    n = r.layout.layers
    assert sorted(events) == sorted([("acquire", i) for i in range(n)] + [("release", i) for i in range(n)])
    lagged = [events.index(("acquire", i + 1)) < events.index(("release", i)) for i in range(n - 1)]
    assert all(lagged) if slots == 2 else not any(lagged)


def test_sampled_tokens_equal_resident(llama, tmp_path) -> None:
    r = _runner(llama, tmp_path, 2, poison=True)
    try:
        ps = [SamplingParams(temperature=0.8, top_k=20, seed=s) for s in (1, 2, 3)]
        req = GenerateRequest.of(PROMPTS, ps, NEW)
        assert OffloadGenerator(r).generate(req).tokens == llama.generate(PROMPTS, ps).tokens
    finally:
        r.close()


@pytest.mark.parametrize("family,weights", [("llama", "int8"), ("falcon", "f32")])
def test_prepared_weights_stream(tmp_path, family, weights) -> None:
    """int8 (quantized once by @prepare, streamed as int8) and Falcon (packed by @prepare)."""
    t = tiny(family, tmp_path / "ck", weights=weights)
    r = _runner(t, tmp_path, 2, poison=True)
    try:
        assert any(sl.dtype == "int8" for sl in r.layout.layer) == (weights == "int8")
        req = GenerateRequest.of(PROMPTS, SamplingParams(), NEW)
        got = OffloadGenerator(r).generate(req)
        assert got.tokens == t.generate(PROMPTS).tokens
        if weights == "f32":
            assert got.tokens == [t.want(p) for p in PROMPTS]
    finally:
        r.close()


def test_device_put_of_a_pool_buffer_aliases_it_so_release_must_wait() -> None:
    """Why the runner blocks before releasing: on CPU the layer's input array IS the buffer."""
    buf = aligned_buffer(4096)
    v = buf.view(np.float32)
    v[:] = 1.0
    a = jax.device_put(v)
    v[:] = 7.0
    assert float(np.asarray(a)[0]) == 7.0


def test_pool_reads_in_order_and_never_runs_ahead_of_its_buffers(tmp_path) -> None:
    layers = {"w": np.arange(5 * 3000, dtype=np.float32).reshape(5, 3000)}
    write_store(tmp_path, "k", {"g": np.ones(3, np.float32)}, layers)
    layout = read_layout(tmp_path, "k")
    pool = LayerPool(data_path(tmp_path), layout, 2, poison=True)
    try:
        for rnd in range(3):
            for i in range(5):
                buf = pool.acquire(i)
                np.testing.assert_array_equal(layout.layer[0].view(buf), layers["w"][i])
                assert pool.stats.layers_read <= rnd * 5 + i + 2  # at most `slots` layers fetched ahead
                pool.release(i)
    finally:
        pool.close()
    sync = LayerPool(data_path(tmp_path), layout, 3, prefetch=False, poison=True)
    try:
        assert sync.slots == 1  # without prefetch one buffer is all it needs
        np.testing.assert_array_equal(layout.layer[0].view(sync.acquire(0)), layers["w"][0])
        sync.release(0)
        assert np.isnan(layout.layer[0].view(sync.buffers[0])).all()  # poisoned on release
        with pytest.raises(WeightsError, match="asked for layer 3"):
            sync.acquire(3)
    finally:
        sync.close()


@pytest.mark.parametrize("direct,io_depth", [(True, 1), (True, 4), (False, 2)])
def test_pool_reads_every_part_of_a_layer(tmp_path, direct, io_depth) -> None:
    """A layer read as several page-aligned parts in flight (O_DIRECT where the file system
    takes it, else buffered) gives the same bytes as the store holds, layer after layer."""
    layers = {"w": np.random.default_rng(0).standard_normal((4, 5, 3001)).astype(np.float32),
              "b": np.arange(4 * 7, dtype=np.int8).reshape(4, 7)}
    write_store(tmp_path, "k", {"g": np.ones(3, np.float32)}, layers)
    layout = read_layout(tmp_path, "k")
    assert layout.stride > 3 * 4096  # several parts per layer
    pool = LayerPool(data_path(tmp_path), layout, 2, poison=True, direct=direct, io_depth=io_depth)
    try:
        if not direct:
            assert not pool.direct
        for _ in range(2):
            for i in range(4):
                buf = pool.acquire(i)
                for sl in layout.layer:
                    np.testing.assert_array_equal(sl.view(buf), layers[sl.name][i])
                pool.release(i)
        assert pool.stats.bytes_read >= 8 * layout.stride
    finally:
        pool.close()


def test_budget_and_sizes(tmp_path) -> None:
    write_store(tmp_path, "k", {"g": np.ones(1000, np.float32)}, {"w": np.ones((4, 3000), np.float32)})
    layout = read_layout(tmp_path, "k")
    assert layout.layer_bytes == 12288 and layout.globals_bytes == 4096
    assert budget_slots(4096 + 2 * 12288, layout) == 2
    assert budget_slots(10**9, layout) == 4  # never more buffers than layers
    with pytest.raises(SpecError, match="does not hold"):
        budget_slots(4096 + 12287, layout)
    assert parse_size("200MB") == 200_000_000 and parse_size("1.5GiB") == 1610612736 and parse_size("4096") == 4096
    with pytest.raises(SpecError):
        parse_size("lots")
    with pytest.raises(WeightsError, match="other weights"):
        read_layout(tmp_path, "another-key")


def test_cli_offload_disk_equals_resident(llama, tmp_path, capsys) -> None:
    ids = ",".join(map(str, PROMPTS[0]))
    base = ["generate", "--checkpoint", str(llama.path), "--prompt-ids", ids, "--max-new-tokens", "8", "--json"]
    assert main(base) == EXIT_OK
    resident = json.loads(capsys.readouterr().out)
    assert main(base + ["--offload", "disk", "--memory-budget", "100KB", "--offload-dir", str(tmp_path / "s")]) == EXIT_OK
    streamed = json.loads(capsys.readouterr().out)
    assert streamed["tokens"] == resident["tokens"] == [llama.want(PROMPTS[0], 8)]
    off = streamed["offload"]
    assert off["buffers"] == 1 and off["pool_bytes"] + off["resident_weight_bytes"] <= 100_000
    assert main(base + ["--offload", "disk", "--memory-budget", "1KB", "--offload-dir", str(tmp_path / "s")]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "does not hold" in err and "Traceback" not in err
    assert main(base + ["--offload", "disk"]) == EXIT_ERROR
    assert "needs --memory-budget" in capsys.readouterr().err


def test_host_offload_equals_resident_and_moves_layers_inside_the_program(llama) -> None:
    """--offload host: per-layer weights in pinned_host memory, device_put per layer in the step."""
    from compiler.generation import make_runner
    from runtime.generator import Generator
    from runtime.offload_host import HostOffloadBackend, host_bytes, place_on_host

    r = make_runner(llama.spec, llama.weights, CONTEXT)
    r.backend, r.place = HostOffloadBackend(), place_on_host
    g = Generator(r)
    got = g.generate(GenerateRequest.of(PROMPTS, SamplingParams(), NEW))
    assert got.tokens == llama.generate(PROMPTS).tokens == [llama.want(p) for p in PROMPTS]
    assert r.params["wq"][0].sharding.memory_kind == "pinned_host"
    assert r.params["embed"].sharding.memory_kind == "device"
    layered = sum(a.nbytes for k, v in r.params.items() if isinstance(v, list) for a in v)
    assert host_bytes(r.params) == layered > 0
    # the program takes host arguments and moves them itself: one transfer per layer weight
    step = r.step("decode", 1, 1)
    caches = r.empty_cache(1)
    tok = np.zeros((1, 1), np.int32)
    hlo = jax.jit(step).lower(r.params, tok, tok, caches).as_text()
    assert hlo.count('memory_kind = "pinned_host"') >= len(r.params["wq"]) * 7


def test_cli_offload_host(llama, capsys) -> None:
    ids = ",".join(map(str, PROMPTS[1]))
    base = ["generate", "--checkpoint", str(llama.path), "--prompt-ids", ids, "--max-new-tokens", "8", "--json"]
    assert main(base + ["--offload", "host"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["tokens"] == [llama.want(PROMPTS[1], 8)]
    assert main(base + ["--offload", "host", "--memory-budget", "1MB"]) == EXIT_ERROR
    assert "--memory-budget is for --offload disk" in capsys.readouterr().err


def test_cli_offload_dir_that_is_a_file_is_a_clear_error(llama, tmp_path, capsys) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    argv = ["generate", "--checkpoint", str(llama.path), "--prompt-ids", "1,2", "--max-new-tokens", "2",
            "--offload", "disk", "--memory-budget", "1MB", "--offload-dir", str(f), "--json"]
    assert main(argv) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "offload store" in err and "Traceback" not in err


def test_score_offload_disk_and_host_equal_resident(tmp_path, capsys) -> None:
    """`score --offload disk|host`: the perplexity of the resident run, over two window lengths
    (the disk run through a budget of one layer buffer, so every layer is read per window)."""
    from gen_helpers import checkpoint_with_tokenizer

    d = tmp_path / "ck"
    d.mkdir()
    checkpoint_with_tokenizer(d)
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 5)
    base = ["score", "--checkpoint", str(d), "--text", str(text), "--window", "16", "--json"]
    assert main(base) == EXIT_OK
    resident = json.loads(capsys.readouterr().out)
    store = tmp_path / "store"
    assert main(base + ["--offload", "disk", "--memory-budget", "1MB", "--offload-dir", str(store)]) == EXIT_OK
    disk = json.loads(capsys.readouterr().out)
    layout = read_layout(store)
    budget = layout.globals_bytes + layout.layer_bytes
    assert main(base + ["--offload", "disk", "--memory-budget", str(budget), "--offload-dir", str(store)]) == EXIT_OK
    one = json.loads(capsys.readouterr().out)
    assert main(base + ["--offload", "host"]) == EXIT_OK
    host = json.loads(capsys.readouterr().out)
    assert resident["windows"] >= 3 and resident["tokens"] % 16 not in (0, 1)  # two window lengths
    assert one["offload"]["buffers"] == 1 and one["offload"]["layers_read"] >= resident["windows"] * layout.layers
    assert host["mean_nll"] == resident["mean_nll"]  # the same program, weights elsewhere: bit-identical
    for r in (disk, one, host):
        assert r["scored"] == resident["scored"]
        # the store keeps projections [out, in] as the generation runner does (resident score
        # multiplies [in, out]): the f32 dots sum in another order, ~1e-9 apart
        assert r["mean_nll"] == pytest.approx(resident["mean_nll"], rel=1e-7)
    for mode in (["disk", "--memory-budget", "1MB", "--offload-dir", str(store)], ["host"]):  # one device only
        assert main(base + ["--mesh", "x=2", "--offload", *mode]) == EXIT_ERROR
        err = capsys.readouterr().err
        assert "one device; drop --mesh" in err and "Traceback" not in err


@pytest.mark.parametrize("family,weights", [("llama", "f32"), ("llama", "int8"), ("falcon", "f32")])
def test_store_converted_group_by_group_equals_the_whole_model_conversion(tmp_path, family, weights) -> None:
    """The budgeted conversion (one @prepare group, one layer at a time, from lazily read
    safetensors) writes the same bytes as preparing the whole model at once."""
    from compiler.generation import module_for, weight_types
    from runtime.checkpoint import open_checkpoint
    from runtime.generate import prepared_weights
    from runtime.lower_jax import JaxExecutor
    from runtime.offload import write_offload_store
    from runtime.offload_convert import prepare_groups
    from runtime.sliced_weights import lazy_weights

    t = tiny(family, tmp_path / "ck", weights=weights)
    key = store_key(t.path, t.spec)
    lazy = lazy_weights(open_checkpoint(t.path), t.spec.model, weight_types(t.spec))
    assert ensure_store(t.spec, key, tmp_path / "cut", lambda: lazy)
    module = module_for(t.spec, "decode", 1, 1, 8)
    write_offload_store(module, dict(prepared_weights(JaxExecutor(module), t.weights)), tmp_path / "whole", key)
    assert read_layout(tmp_path / "cut", key) == read_layout(tmp_path / "whole", key)
    cut = data_path(tmp_path / "cut").read_bytes()
    assert cut == data_path(tmp_path / "whole").read_bytes() and len(set(cut[:4096])) > 1
    groups = prepare_groups(module)
    assert len(groups) > 1 and all(len(g.outputs) <= 3 for g in groups)  # many small groups, not one
    assert any(g.fn is not None for g in groups) == (weights == "int8" or family == "falcon")


def test_whole_model_conversion_fallback_keeps_to_the_budget(tmp_path, monkeypatch) -> None:
    """A @prepare that cannot be cut per layer converts the whole model at once: refused with a
    typed error when that holds more than the budget, written when the budget covers it."""
    import runtime.offload_convert as oc
    from compiler.generation import module_for
    from compiler.offload import whole_conversion_bytes

    t = tiny("llama", tmp_path / "ck")
    key = store_key(t.path, t.spec)

    def mixed(module):
        raise oc.MixedPrepareGroup("a @prepare group mixes per-layer and global weights")

    monkeypatch.setattr(oc, "prepare_groups", mixed)
    layout = oc.store_plan(module_for(t.spec, "decode", 1, 1, 8), key)
    need = whole_conversion_bytes(module_for(t.spec, "decode", 1, 1, 8), layout.file_bytes)
    assert need > layout.file_bytes
    small = layout.globals_bytes + 2 * layout.stride  # enough to stream, not to convert at once
    assert small < need
    with pytest.raises(SpecError, match="whole model at once") as e:
        ensure_store(t.spec, key, tmp_path / "s", lambda: t.weights, small)
    assert str(need) in (e.value.hint or "")
    assert not (tmp_path / "s" / "store.json").exists()
    assert ensure_store(t.spec, key, tmp_path / "s", lambda: t.weights, need)
    assert read_layout(tmp_path / "s", key) == layout
