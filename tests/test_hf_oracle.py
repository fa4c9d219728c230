"""The external oracle: tiny random Hugging Face models (transformers + torch) against einshard.

Each case builds a 2-layer model from a small config with a fixed torch seed, perturbs every
parameter (HF initialises norm scales to 1 and biases to 0, which would hide a swapped or dropped
norm/bias), saves it with ``save_pretrained``, and then goes through the same path as
``einshard run --checkpoint``: ``spec_from_hf`` → ``build_module`` → ``load_hf_weights`` →
``generate`` (prefill then one-token decode steps) on the numpy reference and on JAX. The logits
are compared with (a) HF's full-sequence forward over all P+S tokens and (b) HF's own
token-by-token decode with its KV cache.

Also: the spec fields ``spec_from_hf`` derives for each family and config layout, the errors for
configs einshard cannot represent, and the ``WeightsError`` messages of the loader.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

import torch  # a pinned test extra: its absence is a set-up error, not a reason to skip
import transformers
from safetensors.numpy import load_file, save_file

from compiler.build import BuildConfig, build_module
from compiler.hf import spec_from_hf
from compiler.spec import format_spec, parse_spec
from ir.errors import SpecError, WeightsError
from runtime.checkpoint import load_hf_weights
from gen_helpers import hf_logits, saved_once
from runtime.generate import ReferenceExecutor, generate

P, S, B = 5, 3, 2  # prompt tokens, decode steps, batch

# Tolerance: torch computes in float32; the reference in float64 from the same float32 weights, so
# the difference is torch's f32 rounding, which scales with the logit magnitude (|logit| ~ 4-5
# here). Measured max |diff| / max |logit|: 3e-7 .. 1.3e-6 for the reference and for JAX (f32,
# HIGHEST precision) alike, against both HF paths; HF's forward vs its own KV-cache decode differ
# by 4e-7. 1e-5 relative leaves ~8x headroom, while the smallest semantic slips tried on these
# models stay well above it: norm eps 1e-5 vs 1e-6 gives 2e-4, exact vs tanh GELU 3e-4, a wrong
# rope theta 2e-1, half vs interleaved rotary 6e-1.
RTOL_OF_MAX = 1e-5


def _llama(**kw: Any) -> tuple[Any, Any]:
    base = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, initializer_range=0.2, rms_norm_eps=1e-5)
    return transformers.LlamaConfig(**{**base, **kw}), transformers.LlamaForCausalLM


def _mistral(**kw: Any) -> tuple[Any, Any]:
    base = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2, rms_norm_eps=1e-5)
    return transformers.MistralConfig(**{**base, **kw}), transformers.MistralForCausalLM


def _qwen2(**kw: Any) -> tuple[Any, Any]:
    base = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2, rms_norm_eps=1e-5)
    return transformers.Qwen2Config(**{**base, **kw}), transformers.Qwen2ForCausalLM


def _falcon(**kw: Any) -> tuple[Any, Any]:
    base = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                initializer_range=0.2, multi_query=True, parallel_attn=True, new_decoder_architecture=False,
                bias=False, alibi=False)
    return transformers.FalconConfig(**{**base, **kw}), transformers.FalconForCausalLM


def _gptj(**kw: Any) -> tuple[Any, Any]:
    base = dict(vocab_size=97, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64, initializer_range=0.2,
                bos_token_id=0, eos_token_id=0)
    return transformers.GPTJConfig(**{**base, **kw}), transformers.GPTJForCausalLM


CASES: dict[str, Callable[[], tuple[Any, Any]]] = {
    "llama-mqa": lambda: _llama(num_key_value_heads=1),
    "llama-gqa": lambda: _llama(num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
    "llama-mha-tied-bias": lambda: _llama(num_key_value_heads=4, tie_word_embeddings=True, attention_bias=True,
                                          mlp_bias=True),
    "llama-mlp-bias-headdim": lambda: _llama(num_key_value_heads=2, mlp_bias=True, head_dim=12),
    # window 3 < P = 5 prompt tokens: the prefill and every decode step mask old positions
    "mistral-window": lambda: _mistral(sliding_window=3),
    "mistral-no-window-tied": lambda: _mistral(sliding_window=None, tie_word_embeddings=True),
    "qwen2": lambda: _qwen2(rope_parameters={"rope_type": "default", "rope_theta": 1000.0}),
    "falcon-mqa": lambda: _falcon(),
    "falcon-mha-serial-bias": lambda: _falcon(multi_query=False, parallel_attn=False, bias=True,
                                              tie_word_embeddings=False),
    "falcon-new-arch-1ln": lambda: _falcon(new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=1),
    "gptj": lambda: _gptj(),
    "gptj-tanh-full-rotary": lambda: _gptj(rotary_dim=8, activation_function="gelu_pytorch_tanh"),
}


def _save_case(name: str, root: Path) -> tuple[Path, Any]:
    """Saves the case's random model under ``root/name``; returns the dir and the eval-mode model."""
    config, cls = CASES[name]()
    torch.manual_seed(1234)
    model = cls(config).to(torch.float32).eval()
    with torch.no_grad():
        for _, p in model.named_parameters():  # shared (tied) parameters are visited once
            p.add_(0.1 * torch.randn_like(p))
    d = root / name
    model.save_pretrained(d)
    return d, model


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, Any]]:
    root = tmp_path_factory.mktemp("hf")
    return saved_once(root, _save_case)


def _einshard(d: Path, tokens: np.ndarray) -> tuple[Any, Any, dict[str, np.ndarray]]:
    spec = spec_from_hf(d)
    module = build_module(spec.model, BuildConfig(batch=B, prompt_len=P, cache_len=P + S, logits="all"))
    types = {p.name: p.type for p in module.function("prefill").params_with_role("weight")}
    return spec, module, load_hf_weights(d, spec.model, types)


def _rel_err(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.abs(np.asarray(ours, np.float64) - theirs).max() / np.abs(theirs).max())


@pytest.mark.parametrize("case", list(CASES))
def test_matches_hf(case: str, saved: Callable[[str], tuple[Path, Any]]) -> None:
    from runtime.lower_jax import JaxExecutor

    d, model = saved(case)
    spec, module, weights = _einshard(d, np.zeros((1, 1)))
    tokens = np.random.default_rng(7).integers(0, spec.model.vocab, (B, P + S)).astype(np.int32)
    full, stepped = hf_logits(model, tokens, P)
    assert np.abs(full).max() > 1.0, "logits too small to be a discriminating test"
    assert _rel_err(stepped, full) < RTOL_OF_MAX  # HF agrees with itself
    for ex in (ReferenceExecutor(module), JaxExecutor(module)):
        got = generate(ex, weights, tokens, P).logits
        assert got.shape == full.shape
        assert _rel_err(got, full) < RTOL_OF_MAX, (ex.name, "vs HF forward", _rel_err(got, full))
        assert _rel_err(got, stepped) < RTOL_OF_MAX, (ex.name, "vs HF decode", _rel_err(got, stepped))


# ---------------------------------------------------------------------------------------------
# spec_from_hf


EXPECTED_FIELDS = {
    "llama-mqa": dict(layers=2, d_model=32, heads=4, kv_heads=1, d_head=8, d_ff=48, vocab=97, block="serial",
                      mlp="swiglu", norm="rmsnorm", norm_eps=1e-5, rope_theta=10000.0, rotary_dim=8,
                      rotary_style="half", bias="none", tie_embeddings=False),
    "llama-gqa": dict(kv_heads=2, rope_theta=500.0),
    "llama-mha-tied-bias": dict(kv_heads=4, bias="all", tie_embeddings=True),
    "llama-mlp-bias-headdim": dict(d_head=12, rotary_dim=12, bias="mlp"),
    "mistral-window": dict(kv_heads=2, bias="none", sliding_window=3, mlp="swiglu", norm="rmsnorm"),
    "mistral-no-window-tied": dict(sliding_window=0, tie_embeddings=True),
    "qwen2": dict(kv_heads=2, bias="qkv", sliding_window=0, rope_theta=1000.0, tie_embeddings=False),
    "falcon-mqa": dict(layers=2, d_model=32, heads=4, kv_heads=1, d_head=8, d_ff=128, vocab=97, block="parallel",
                       mlp="gelu", norm="layernorm", norm_eps=1e-5, rotary_dim=8, rotary_style="half", bias="none",
                       tie_embeddings=True),
    "falcon-mha-serial-bias": dict(kv_heads=4, block="serial", bias="all", tie_embeddings=False),
    "falcon-new-arch-1ln": dict(kv_heads=2, block="parallel"),
    "gptj": dict(layers=2, d_model=32, heads=4, kv_heads=4, d_head=8, d_ff=128, vocab=97, block="parallel",
                 mlp="gelu-tanh", norm="layernorm", norm_eps=1e-5, rope_theta=10000.0, rotary_dim=4,
                 rotary_style="interleaved", bias="mlp", tie_embeddings=False),
    "gptj-tanh-full-rotary": dict(rotary_dim=8, mlp="gelu-tanh"),
}


@pytest.mark.parametrize("case", list(EXPECTED_FIELDS))
def test_spec_fields(case: str, saved: Callable[[str], tuple[Path, Any]]) -> None:
    d, _ = saved(case)
    spec = spec_from_hf(d)
    for k, v in EXPECTED_FIELDS[case].items():
        assert getattr(spec.model, k) == v, k
    assert spec.model.name == case
    again = parse_spec(format_spec(spec), "<round trip>")  # what `einshard spec-from-hf` prints parses back
    assert again.model == spec.model


def _write_config(tmp_path: Path, cfg: dict[str, Any] | str, name: str = "ckpt") -> Path:
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg, indent=2))
    return d


LLAMA_CFG = dict(model_type="llama", num_hidden_layers=2, hidden_size=64, num_attention_heads=8, intermediate_size=96,
                 vocab_size=100)
FALCON_CFG = dict(model_type="falcon", num_hidden_layers=2, hidden_size=64, num_attention_heads=8, vocab_size=100)
GPTJ_CFG = dict(model_type="gptj", n_layer=2, n_embd=64, n_head=8, vocab_size=100, rotary_dim=4)
MISTRAL_CFG = {**LLAMA_CFG, "model_type": "mistral"}
QWEN2_CFG = {**LLAMA_CFG, "model_type": "qwen2"}


def test_defaults_follow_transformers_config_classes(tmp_path: Path) -> None:
    m = spec_from_hf(_write_config(tmp_path, LLAMA_CFG, "l")).model
    assert (m.kv_heads, m.d_head, m.norm_eps, m.rope_theta, m.tie_embeddings) == (8, 8, 1e-6, 10000.0, False)
    m = spec_from_hf(_write_config(tmp_path, FALCON_CFG, "f")).model
    assert (m.kv_heads, m.block, m.d_ff, m.mlp, m.bias, m.tie_embeddings) == (1, "parallel", 256, "gelu", "none", True)
    m = spec_from_hf(_write_config(tmp_path, {**GPTJ_CFG, "n_inner": 100}, "g")).model
    assert (m.d_ff, m.mlp, m.rotary_dim, m.bias) == (100, "gelu-tanh", 4, "mlp")


def test_mistral_and_qwen2_defaults(tmp_path: Path) -> None:
    """As MistralConfig / Qwen2Config read them: an absent window is 4096, null none; Qwen2's window
    applies only with use_sliding_window, and only from max_window_layers on."""
    assert spec_from_hf(_write_config(tmp_path, MISTRAL_CFG, "m1")).model.sliding_window == 4096
    no_window = spec_from_hf(_write_config(tmp_path, {**MISTRAL_CFG, "sliding_window": None}, "m2")).model
    assert no_window.sliding_window == 0
    m = spec_from_hf(_write_config(tmp_path, {**QWEN2_CFG, "sliding_window": 8}, "q1")).model
    assert (m.sliding_window, m.bias) == (0, "qkv")
    m = spec_from_hf(_write_config(tmp_path, {**QWEN2_CFG, "use_sliding_window": True, "sliding_window": 8,
                                              "max_window_layers": 2}, "q2")).model
    assert m.sliding_window == 0, "every layer is below max_window_layers: full attention everywhere"


@pytest.mark.parametrize("extra, theta", [
    ({"rope_theta": 500000.0, "rope_scaling": None}, 500000.0),  # transformers 4.x layout
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1234.0}}, 1234.0),  # 5.x layout
    ({"rope_scaling": {"type": "default"}, "rope_theta": 77.0}, 77.0),
    ({"rope_parameters": {"rope_type": "default"}, "rope_theta": 99.0}, 99.0),
])
def test_rope_layouts(tmp_path: Path, extra: dict[str, Any], theta: float) -> None:
    assert spec_from_hf(_write_config(tmp_path, {**LLAMA_CFG, **extra})).model.rope_theta == theta


def test_falcon_layouts(tmp_path: Path) -> None:
    m = spec_from_hf(_write_config(tmp_path, {**FALCON_CFG, "multi_query": False, "num_kv_heads": 8}, "a")).model
    assert m.kv_heads == 8
    # old architecture with multi_query: one K/V head whatever num_kv_heads says
    m = spec_from_hf(_write_config(tmp_path, {**FALCON_CFG, "multi_query": True, "num_kv_heads": 8}, "b")).model
    assert m.kv_heads == 1
    m = spec_from_hf(_write_config(tmp_path, {**FALCON_CFG, "parallel_attn": False}, "c")).model
    assert m.block == "serial"


def test_name_from_name_or_path(tmp_path: Path) -> None:
    spec = spec_from_hf(_write_config(tmp_path, {**LLAMA_CFG, "_name_or_path": "meta-llama/Llama 2 (7b)"}))
    assert spec.model.name == "Llama-2-7b"
    assert spec_from_hf(_write_config(tmp_path, LLAMA_CFG, "my_model.v2")).model.name == "my_model.v2"


@pytest.mark.parametrize("cfg, field, words", [
    ({**LLAMA_CFG, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling", "linear"),
    ({**LLAMA_CFG, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},
     "rope_parameters", "llama3"),
    ({**LLAMA_CFG, "hidden_act": "gelu"}, "hidden_act", "gelu"),
    ({**LLAMA_CFG, "attention_bias": True}, "attention_bias", "cannot be represented"),
    ({**LLAMA_CFG, "num_key_value_heads": 3}, None, "multiple of kv_heads"),
    ({**LLAMA_CFG, "hidden_size": 60}, "num_attention_heads", "not a multiple"),
    ({**LLAMA_CFG, "num_hidden_layers": "2"}, "num_hidden_layers", "positive integer"),
    ({**FALCON_CFG, "alibi": True}, "alibi", "ALiBi"),
    ({**FALCON_CFG, "new_decoder_architecture": True}, "new_decoder_architecture", "two layer norms"),
    ({**FALCON_CFG, "activation": "relu"}, "activation", "relu"),
    ({**GPTJ_CFG, "rotary_dim": 12}, None, "rotary_dim (12) exceeds d_head (8)"),
    ({**GPTJ_CFG, "rotary_dim": None}, "rotary_dim", "n_head 1"),
    ({**QWEN2_CFG, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}, "use_sliding_window",
     "only some layers"),
    ({**MISTRAL_CFG, "sliding_window": 0}, "sliding_window", "positive integer"),
])
def test_unrepresentable_configs(tmp_path: Path, cfg: dict[str, Any], field: str | None, words: str) -> None:
    with pytest.raises(SpecError) as e:
        spec_from_hf(_write_config(tmp_path, cfg))
    assert words in e.value.message
    if field is not None:  # the error points at the offending key in config.json
        assert e.value.loc is not None and e.value.loc.source_line is not None
        assert f'"{field}"' in e.value.loc.source_line


def test_unknown_model_type(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as e:
        spec_from_hf(_write_config(tmp_path, {**LLAMA_CFG, "model_type": "gpt2"}))
    assert "gpt2" in e.value.message and "llama, falcon, gptj" in (e.value.hint or "")
    with pytest.raises(SpecError, match="no model_type"):
        spec_from_hf(_write_config(tmp_path, {"hidden_size": 4}))


def test_missing_and_malformed_config(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="no config.json"):
        spec_from_hf(tmp_path)
    with pytest.raises(SpecError) as e:
        spec_from_hf(_write_config(tmp_path, '{\n  "model_type": "llama",\n  "hidden_size": ,\n}'))
    assert "not valid JSON" in e.value.message and e.value.loc is not None and e.value.loc.line == 3
    with pytest.raises(SpecError, match="JSON object"):
        spec_from_hf(_write_config(tmp_path, "[1, 2]"))
    with pytest.raises(SpecError, match="lacks required fields: num_hidden_layers, intermediate_size"):
        spec_from_hf(_write_config(tmp_path, {k: v for k, v in LLAMA_CFG.items()
                                               if k not in ("num_hidden_layers", "intermediate_size")}))


# ---------------------------------------------------------------------------------------------
# load_hf_weights errors and file formats


def _types(d: Path) -> tuple[Any, dict[str, Any]]:
    spec = spec_from_hf(d)
    module = build_module(spec.model, BuildConfig(batch=1, prompt_len=2, cache_len=4))
    return spec, {p.name: p.type for p in module.function("prefill").params_with_role("weight")}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_and_misshaped_tensors_reported_together(saved: Callable[[str], tuple[Path, Any]],
                                                          tmp_path: Path) -> None:
    d = _copy(saved("llama-gqa")[0], tmp_path / "broken")
    w = load_file(d / "model.safetensors")
    del w["model.layers.1.mlp.up_proj.weight"]
    del w["model.norm.weight"]
    w["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 32), np.float32)
    save_file(w, d / "model.safetensors")
    spec, types = _types(d)
    with pytest.raises(WeightsError) as e:
        load_hf_weights(d, spec.model, types)
    msg = e.value.message
    assert "missing: model.layers.1.mlp.up_proj.weight" in msg
    assert "missing: model.norm.weight" in msg
    assert "mis-shaped: model.layers.0.self_attn.k_proj.weight: expected (16, 32), got (8, 32)" in msg
    assert "2 missing" in msg


def test_spec_that_does_not_describe_checkpoint(saved: Callable[[str], tuple[Path, Any]]) -> None:
    import dataclasses

    d = saved("gptj")[0]
    spec, _ = _types(d)
    wrong = dataclasses.replace(spec.model, d_ff=64, mlp="gelu", name="other")
    module = build_module(wrong, BuildConfig(batch=1, prompt_len=2, cache_len=4))
    types = {p.name: p.type for p in module.function("prefill").params_with_role("weight")}
    with pytest.raises(WeightsError) as e:
        load_hf_weights(d, wrong, types)
    assert "d_ff: the spec says 64, config.json says 128" in e.value.message
    assert "mlp: the spec says 'gelu', config.json says 'gelu-tanh'" in e.value.message


def test_config_that_does_not_fit_tensors(saved: Callable[[str], tuple[Path, Any]], tmp_path: Path) -> None:
    d = _copy(saved("gptj")[0], tmp_path / "cfg")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "n_layer": 1, "n_inner": 64}))
    spec, types = _types(d)
    with pytest.raises(WeightsError) as e:
        load_hf_weights(d, spec.model, types)
    assert "mis-shaped: transformer.h.0.mlp.fc_in.weight: expected (64, 32), got (128, 32)" in e.value.message
    assert "extra layers: the checkpoint has layer(s) 1 but the model has 1" in e.value.message


def test_unreadable_files(saved: Callable[[str], tuple[Path, Any]], tmp_path: Path) -> None:
    d = _copy(saved("falcon-mqa")[0], tmp_path / "trunc")
    spec, types = _types(d)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(WeightsError, match="cannot read .*model.safetensors"):
        load_hf_weights(d, spec.model, types)
    f.write_bytes(b"not a safetensors file at all")
    with pytest.raises(WeightsError, match="cannot read"):
        load_hf_weights(d, spec.model, types)
    f.unlink()
    with pytest.raises(WeightsError, match=r"no \*\.safetensors files"):
        load_hf_weights(d, spec.model, types)
    (d / "config.json").unlink()
    with pytest.raises(WeightsError, match="no config.json"):
        load_hf_weights(d, spec.model, types)


def test_bf16_f16_and_sharded_checkpoints(saved: Callable[[str], tuple[Path, Any]], tmp_path: Path) -> None:
    d, model = saved("llama-gqa")
    spec, types = _types(d)
    f32 = load_hf_weights(d, spec.model, types)
    import copy

    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(tmp_path / "bf16", max_shard_size="20KB")
    assert len(list((tmp_path / "bf16").glob("*.safetensors"))) > 1
    bf = load_hf_weights(tmp_path / "bf16", spec.model, types)
    import ml_dtypes

    for k, v in f32.items():
        assert bf[k].dtype == np.float32
        np.testing.assert_array_equal(bf[k], v.astype(ml_dtypes.bfloat16).astype(np.float32), err_msg=k)
    copy.deepcopy(model).to(torch.float16).save_pretrained(tmp_path / "f16")
    f16 = load_hf_weights(tmp_path / "f16", spec.model, types)
    for k, v in f32.items():
        np.testing.assert_array_equal(f16[k], v.astype(np.float16).astype(np.float32), err_msg=k)


def test_tied_lm_head_in_file_is_ignored(saved: Callable[[str], tuple[Path, Any]], tmp_path: Path) -> None:
    d = _copy(saved("falcon-mqa")[0], tmp_path / "tied")
    w = load_file(d / "model.safetensors")
    w["lm_head.weight"] = np.ones_like(w["transformer.word_embeddings.weight"])
    w["transformer.h.0.self_attention.rotary_emb.inv_freq"] = np.ones(4, np.float32)
    save_file(w, d / "model.safetensors")
    spec, types = _types(d)
    assert "lm_head" not in types
    out = load_hf_weights(d, spec.model, types)
    assert set(out) == set(types)
    np.testing.assert_array_equal(out["embed"], w["transformer.word_embeddings.weight"])


def test_duplicate_tensor_across_shards(saved: Callable[[str], tuple[Path, Any]], tmp_path: Path) -> None:
    d = _copy(saved("gptj")[0], tmp_path / "dup")
    w = load_file(d / "model.safetensors")
    save_file({"transformer.wte.weight": w["transformer.wte.weight"]}, d / "model-extra.safetensors")
    spec, types = _types(d)
    with pytest.raises(WeightsError, match="'transformer.wte.weight' appears in both"):
        load_hf_weights(d, spec.model, types)


def test_weights_for_another_family(saved: Callable[[str], tuple[Path, Any]]) -> None:
    d = saved("gptj")[0]
    llama = spec_from_hf(saved("llama-mqa")[0]).model
    module = build_module(llama, BuildConfig(batch=1, prompt_len=2, cache_len=4))
    types = {p.name: p.type for p in module.function("prefill").params_with_role("weight")}
    with pytest.raises(WeightsError, match="does not describe the checkpoint") as e:
        load_hf_weights(d, llama, types)
    assert "norm: the spec says 'rmsnorm', config.json says 'layernorm'" in e.value.message


def test_sliding_window_is_discriminating(saved: Callable[[str], tuple[Path, Any]]) -> None:
    """The Mistral case tests the window: without it the same weights give clearly other logits."""
    import dataclasses

    d, model = saved("mistral-window")
    spec, module, weights = _einshard(d, np.zeros((1, 1)))
    assert any(getattr(op, "window", 0) == 3 for op in module.function("prefill_layer").ops)
    tokens = np.random.default_rng(7).integers(0, spec.model.vocab, (B, P + S)).astype(np.int32)
    full, _ = hf_logits(model, tokens, P)
    no_window = dataclasses.replace(spec.model, sliding_window=0)
    plain = build_module(no_window, BuildConfig(batch=B, prompt_len=P, cache_len=P + S, logits="all"))
    got = generate(ReferenceExecutor(plain), weights, tokens, P).logits
    assert _rel_err(got, full) > 100 * RTOL_OF_MAX


def test_qwen2_relabelled_llama_fails_naming_the_biases(saved: Callable[[str], tuple[Path, Any]],
                                                         tmp_path: Path) -> None:
    """A Qwen2 checkpoint whose config says llama must not load with its q/k/v biases dropped."""
    d = _copy(saved("qwen2")[0], tmp_path / "relabelled")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    spec, types = _types(d)
    assert spec.model.bias == "none" and "bq" not in types
    with pytest.raises(WeightsError) as e:
        load_hf_weights(d, spec.model, types)
    msg = e.value.message
    for i in range(2):
        for p in "qkv":
            assert f"unused: model.layers.{i}.self_attn.{p}_proj.bias" in msg
    assert "6 unused" in msg and "missing" not in msg


def test_unused_tensor_is_named(saved: Callable[[str], tuple[Path, Any]], tmp_path: Path) -> None:
    d = _copy(saved("gptj")[0], tmp_path / "extra")
    w = load_file(d / "model.safetensors")
    w["transformer.h.0.attn.q_proj.bias"] = np.zeros(32, np.float32)
    w["something.else"] = np.zeros(3, np.float32)
    w["transformer.h.0.attn.masked_bias"] = np.zeros(1, np.float32)  # a buffer, never a weight
    save_file(w, d / "model.safetensors")
    spec, types = _types(d)
    with pytest.raises(WeightsError) as e:
        load_hf_weights(d, spec.model, types)
    assert "unused: transformer.h.0.attn.q_proj.bias" in e.value.message
    assert "unused: something.else" in e.value.message
    assert "masked_bias" not in e.value.message


def test_open_checkpoint_and_bf16_weights(saved: Callable[[str], tuple[Path, Any]], tmp_path: Path) -> None:
    import dataclasses

    import ml_dtypes

    from runtime.checkpoint import HFCheckpoint, open_checkpoint

    d, _ = saved("qwen2")
    ck = open_checkpoint(d)
    assert isinstance(ck, HFCheckpoint) and ck.model_spec() == spec_from_hf(d).model
    spec, types = _types(d)
    f32 = ck.load_weights(spec.model, types)
    bf_types = {n: dataclasses.replace(t, dtype="bf16") for n, t in types.items()}
    bf = ck.load_weights(spec.model, bf_types)
    for n, v in f32.items():
        assert bf[n].dtype == ml_dtypes.bfloat16 and v.dtype == np.float32
        np.testing.assert_array_equal(bf[n], v.astype(ml_dtypes.bfloat16), err_msg=n)
    with pytest.raises(WeightsError, match="no checkpoint at"):
        open_checkpoint(tmp_path / "nothing")


def test_sharded_index_naming_a_missing_shard(saved: Callable[[str], tuple[Path, Any]], tmp_path: Path) -> None:
    import copy

    d, model = saved("llama-gqa")
    copy.deepcopy(model).save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shards = sorted((tmp_path / "sharded").glob("*.safetensors"))
    (tmp_path / "sharded" / "stray.safetensors").write_bytes(b"not listed in the index, so never read")
    spec, types = _types(tmp_path / "sharded")
    np.testing.assert_array_equal(load_hf_weights(tmp_path / "sharded", spec.model, types)["wq"],
                                  load_hf_weights(d, spec.model, types)["wq"])
    shards[-1].unlink()
    with pytest.raises(WeightsError, match=f"names shard.* not in .*{shards[-1].name}"):
        load_hf_weights(tmp_path / "sharded", spec.model, types)
