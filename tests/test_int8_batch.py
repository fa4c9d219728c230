"""A row's int8 tokens do not depend on its batch (runtime/xla_options.py).

XLA CPU's YNNPACK fusions other than single dots made resident ``--weights int8`` SmolLM2 give
other greedy tokens at batch 64 than at batch 1 (the prefill's logits 23 away, argmax changed);
int8 programs on the CPU now keep only single dots in the library."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from conftest import SMOLLM2
from runtime import xla_options


def _ynn_fusions(f, *args) -> list[str]:
    """The op names (metadata) of the YNNPACK library fusions in ``f``'s optimized HLO."""
    text = f.lower(*args).compile().as_text()
    return [line.split('op_name="')[1].split('"')[0] for line in text.splitlines()
            if "fusion(" in line and '"__ynn_fusion"' in line]


def _dot_softmax(x, m):
    y = lax.dot_general(x, m, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32).astype(jnp.float32)
    e = jnp.exp(y - y.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_int8_programs_keep_only_single_dots_in_the_library() -> None:
    """The suite runs on XLA CPU (tests/conftest.py sets JAX_PLATFORMS=cpu), whose YNNPACK library
    this is about; the other backends get no options (test_options_only_for_int8_on_the_cpu)."""
    assert jax.default_backend() == "cpu"
    x, m = jnp.ones((512, 256), jnp.int8), jnp.ones((384, 256), jnp.int8)
    int8 = _ynn_fusions(xla_options.jit(_dot_softmax, xla_options.tree_int8(x)), x, m)
    assert int8 and all("dot_general" in name for name in int8)  # the int8 x int8 dot stays fast
    default = _ynn_fusions(xla_options.jit(_dot_softmax, False), x, m)
    assert any("reduce" in name for name in default)  # what the int8 build leaves out


def test_options_only_for_int8_on_the_cpu() -> None:
    assert xla_options.program_options(False) == {}
    assert xla_options.tree_int8({"a": jnp.ones(2, jnp.float32), "b": [jnp.ones(2, jnp.int8)]})
    assert not xla_options.tree_int8({"a": jnp.ones(2, jnp.bfloat16)}, ())
    want = xla_options.INT8_CPU_OPTIONS if jax.default_backend() == "cpu" else {}
    assert xla_options.program_options(True) == want


@pytest.mark.slow
def test_smollm2_int8_greedy_tokens_at_batch_64_equal_batch_1() -> None:
    """Batch 64 of an 8-token prompt: a 512-row prefill (where the fault changed the first
    token) and two decode steps, every row equal to batch 1's tokens."""
    from compiler.generation import make_runner, weight_types
    from compiler.spec import Spec, apply_overrides
    from runtime.checkpoint import open_checkpoint
    from runtime.generator import GenerateRequest, Generator
    from runtime.sampling import SamplingParams

    ck = open_checkpoint(SMOLLM2)
    spec = apply_overrides(Spec(ck.model_spec()), weights="int8")
    runner = make_runner(spec, ck.load_weights(spec.model, weight_types(spec)), 16)
    gen = Generator(runner)
    prompt = list(range(1, 9))
    one = gen.generate(GenerateRequest.of([prompt], SamplingParams(), 3)).tokens[0]
    many = gen.generate(GenerateRequest.of([prompt] * 64, SamplingParams(), 3)).tokens
    assert [list(r) for r in many] == [list(one)] * 64
