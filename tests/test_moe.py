"""Mixture of experts against Hugging Face: tiny random Mixtral and Qwen2-MoE checkpoints.

Each checkpoint is saved by transformers (per-expert tensors on disk), read back through
``spec_from_hf`` and the checkpoint loader, and run through prefill + teacher-forced decode on
the numpy reference and JAX; logits must match HF's forward and its own KV-cache decode within
the oracle's 1e-5 of the largest logit (test_hf_oracle.py explains the figure). Greedy
generation through ``Generator`` must give HF's tokens exactly.
"""

from __future__ import annotations

from dataclasses import replace
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
import transformers

from compiler.build import BuildConfig, build_module
from compiler.hf import spec_from_hf
from compiler.spec import format_spec, parse_spec
from ir.errors import LayoutError, SpecError, WeightsError
from runtime.checkpoint import load_hf_weights
from gen_helpers import hf_logits, saved_once
from runtime.generate import ReferenceExecutor, generate

P, S, B = 5, 3, 2
RTOL_OF_MAX = 1e-5
BASE = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, initializer_range=0.2, rms_norm_eps=1e-5, bos_token_id=None,
            eos_token_id=None, pad_token_id=None, tie_word_embeddings=False)

CASES: dict[str, Callable[[], Any]] = {
    "mixtral": lambda: transformers.MixtralConfig(intermediate_size=24, num_local_experts=8, num_experts_per_tok=2,
                                                  **BASE),
    "qwen2-moe-shared": lambda: transformers.Qwen2MoeConfig(intermediate_size=48, moe_intermediate_size=24,
                                                            shared_expert_intermediate_size=40, num_experts=8,
                                                            num_experts_per_tok=2, **BASE),
    # 8 query heads in 2 groups: K x G divides x=2,y=2,z=2 without padding (pad-heads cannot pad the
    # flattened heads of OLMoE's all-heads QK-norm)
    "olmoe": lambda: transformers.OlmoeConfig(intermediate_size=24, num_experts=8, num_experts_per_tok=2,
                                              **{**BASE, "num_attention_heads": 8}),
    "qwen3-moe": lambda: transformers.Qwen3MoeConfig(intermediate_size=48, moe_intermediate_size=24, num_experts=8,
                                                     num_experts_per_tok=2, head_dim=12, norm_topk_prob=True, **BASE),
    "qwen2-moe-norm-topk": lambda: transformers.Qwen2MoeConfig(intermediate_size=48, moe_intermediate_size=16,
                                                               shared_expert_intermediate_size=24, num_experts=4,
                                                               num_experts_per_tok=3, norm_topk_prob=True, **BASE),
}


#: torch seeds whose greedy continuations of PROMPTS use 8-14 distinct tokens (others: 1)
SEEDS = {"qwen3-moe": 2}


def save_case(name: str, root: Path) -> tuple[Path, Any]:
    torch.manual_seed(SEEDS.get(name, 1))
    model = transformers.AutoModelForCausalLM.from_config(CASES[name]()).to(torch.float32).eval()
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(0.1 * torch.randn_like(p))
    d = root / name
    model.save_pretrained(d)
    return d, model


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, Any]]:
    root = tmp_path_factory.mktemp("moe")
    return saved_once(root, save_case)


def rel_err(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.abs(np.asarray(ours, np.float64) - theirs).max() / np.abs(theirs).max())


@pytest.mark.parametrize("case", list(CASES))
def test_matches_hf(case: str, saved: Callable[[str], tuple[Path, Any]]) -> None:
    from runtime.lower_jax import JaxExecutor

    d, model = saved(case)
    spec = spec_from_hf(d)
    module = build_module(spec.model, BuildConfig(batch=B, prompt_len=P, cache_len=P + S, logits="all"))
    types = {p.name: p.type for p in module.function("prefill").params_with_role("weight")}
    weights = load_hf_weights(d, spec.model, types)
    tokens = np.random.default_rng(7).integers(0, spec.model.vocab, (B, P + S)).astype(np.int32)
    full, stepped = hf_logits(model, tokens, P)
    assert np.abs(full).max() > 1.0
    for ex in (ReferenceExecutor(module), JaxExecutor(module)):
        got = generate(ex, weights, tokens, P).logits
        assert rel_err(got, full) < RTOL_OF_MAX, (ex.name, "vs HF forward", rel_err(got, full))
        assert rel_err(got, stepped) < RTOL_OF_MAX, (ex.name, "vs HF decode", rel_err(got, stepped))


EXPECTED = {
    "mixtral": dict(experts=8, top_k=2, router="softmax-topk", norm_topk=True, d_ff=24, expert_d_ff=24,
                    shared_experts=0, shared_gate=False, bias="none", sliding_window=0),
    "qwen2-moe-shared": dict(experts=8, top_k=2, norm_topk=False, d_ff=40, expert_d_ff=24, shared_experts=1,
                             shared_gate=True, bias="qkv"),
    "olmoe": dict(experts=8, top_k=2, norm_topk=False, expert_d_ff=24, qk_norm="all", shared_experts=0, bias="none"),
    "qwen3-moe": dict(experts=8, top_k=2, norm_topk=True, expert_d_ff=24, qk_norm="head", d_head=12, bias="none"),
    "qwen2-moe-norm-topk": dict(experts=4, top_k=3, norm_topk=True, expert_d_ff=16, d_ff=24),
}


@pytest.mark.parametrize("case", list(EXPECTED))
def test_spec_fields(case: str, saved: Callable[[str], tuple[Path, Any]]) -> None:
    spec = spec_from_hf(saved(case)[0])
    for k, v in EXPECTED[case].items():
        assert getattr(spec.model, k) == v, k
    assert parse_spec(format_spec(spec)).model == spec.model


def _config(tmp_path: Path, cfg: dict[str, Any]) -> Path:
    d = tmp_path / cfg["model_type"]
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    return d


@pytest.mark.parametrize("model_type, missing", [
    ("deepseek_v3", "grouped routing"), ("deepseek_v2", "grouped routing"), ("gpt_oss", "clamped SwiGLU")])
def test_refused_families_name_what_is_missing(tmp_path: Path, model_type: str, missing: str) -> None:
    d = _config(tmp_path, dict(model_type=model_type, num_hidden_layers=2, hidden_size=32))
    with pytest.raises(SpecError, match=missing) as e:
        spec_from_hf(d)
    assert e.value.loc is not None and e.value.loc.line == 2  # the caret is on model_type


def test_qwen2_moe_dense_layers_refused(tmp_path: Path) -> None:
    cfg = dict(model_type="qwen2_moe", num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
               intermediate_size=48, vocab_size=97, mlp_only_layers=[0])
    with pytest.raises(SpecError, match="dense MLPs on some layers"):
        spec_from_hf(_config(tmp_path, cfg))


def test_every_expert_tensor_is_used(saved: Callable[[str], tuple[Path, Any]], tmp_path: Path) -> None:
    """A checkpoint holding more experts than its config says fails the load, naming the extra tensors."""
    import shutil

    d = tmp_path / "fewer"
    shutil.copytree(saved("mixtral")[0], d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "num_local_experts": 7}))
    spec = spec_from_hf(d)
    module = build_module(spec.model, BuildConfig(batch=1, prompt_len=2, cache_len=4))
    types = {p.name: p.type for p in module.function("prefill").params_with_role("weight")}
    with pytest.raises(WeightsError, match=r"unused: model\.layers\.0\.block_sparse_moe\.experts\.7\.w1\.weight"):
        load_hf_weights(d, spec.model, types)


# ---------------------------------------------------------------------------------------------
# Greedy generation against transformers: one device and expert layouts on x=2,y=2,z=2


PROMPTS = ((5, 17, 42, 9, 3, 77, 60, 11, 2, 8), (33, 4))
NEW = 16


def hf_greedy(model: Any, prompt: tuple[int, ...]) -> list[int]:
    ids = torch.tensor([list(prompt)])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW,
                             pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def einshard_greedy(d: Path, mesh: str | None = None, experts: str | None = None) -> list[list[int]]:
    from compiler.generation import make_runner, weight_types
    from compiler.spec import Spec, apply_overrides
    from runtime.checkpoint import open_checkpoint
    from runtime.generator import GenerateRequest, Generator
    from runtime.sampling import SamplingParams

    ck = open_checkpoint(d)
    sets = [f"serve.expert_axes={experts}"] if experts else []
    spec = apply_overrides(Spec(ck.model_spec(), path=str(d)), mesh=mesh, sets=sets)
    weights = ck.load_weights(spec.model, weight_types(spec))
    gen = Generator(make_runner(spec, weights, 64))
    return gen.generate(GenerateRequest.of(PROMPTS, SamplingParams(), NEW, ())).tokens


@pytest.mark.slow
@pytest.mark.parametrize("case", ["mixtral", "qwen2-moe-shared", "olmoe", "qwen3-moe"])
def test_greedy_one_device(case: str, saved: Callable[[str], tuple[Path, Any]]) -> None:
    d, model = saved(case)
    want = [hf_greedy(model, p) for p in PROMPTS]
    assert all(len(set(w)) > 4 for w in want), "degenerate greedy continuation: not a discriminating test"
    assert einshard_greedy(d) == want


MESH_CASES = [("mixtral", "x"), ("qwen2-moe-shared", "x,y")]
SLOW_MESH_CASES = [("mixtral", "x,y"), ("mixtral", "x,y,z"), ("mixtral", "none"), ("qwen2-moe-shared", "x"),
                   ("qwen2-moe-shared", "x,y,z"), ("qwen2-moe-shared", "none"), ("olmoe", "x"), ("olmoe", "x,y"), ("olmoe", "x,y,z"), ("olmoe", "none"),
                   ("qwen3-moe", "x,y")]


def _greedy_on_mesh(case: str, experts: str, saved: Callable[[str], tuple[Path, Any]]) -> None:
    d, model = saved(case)
    assert einshard_greedy(d, "x=2,y=2,z=2", experts) == [hf_greedy(model, p) for p in PROMPTS]


@pytest.mark.slow
@pytest.mark.parametrize("case, experts", MESH_CASES)
def test_greedy_expert_layouts_on_8_devices(case: str, experts: str, saved: Callable[[str], tuple[Path, Any]]) -> None:
    """JAX on x=2,y=2,z=2 (expert parallelism over the given axes, the rest slicing each expert)."""
    _greedy_on_mesh(case, experts, saved)


@pytest.mark.slow
@pytest.mark.parametrize("case, experts", SLOW_MESH_CASES)
def test_greedy_expert_layouts_on_8_devices_slow(case: str, experts: str,
                                                 saved: Callable[[str], tuple[Path, Any]]) -> None:
    _greedy_on_mesh(case, experts, saved)


def test_experts_that_do_not_divide_are_refused(saved: Callable[[str], tuple[Path, Any]]) -> None:
    from compiler.driver import default_pipeline
    from compiler.pipelines import compile_config, compile_module
    from compiler.spec import apply_overrides

    spec = apply_overrides(spec_from_hf(saved("qwen2-moe-norm-topk")[0]), mesh="x=2,y=2,z=2",
                           sets=["serve.expert_axes=x,y,z"])
    with pytest.raises(LayoutError, match=r"4 experts do not divide over \{x,y,z\} \(8 devices\)"):
        compile_module(build_module(spec.model, compile_config(spec), spec.mesh.axes), default_pipeline(spec))


def test_all_heads_qk_norm_is_not_padded(tmp_path: Path) -> None:
    """OLMoE's norm over all heads would count zero heads in its statistics: a layout that needs
    padded heads is refused (a LayoutError the cost model's kv = auto skips), never mis-computed."""
    from compiler.driver import default_pipeline
    from compiler.pipelines import compile_config, compile_module
    from compiler.spec import apply_overrides

    cfg = dict(model_type="olmoe", num_hidden_layers=1, hidden_size=32, num_attention_heads=4, num_key_value_heads=4,
               intermediate_size=16, vocab_size=64, num_experts=8, num_experts_per_tok=2)
    spec = apply_overrides(spec_from_hf(_config(tmp_path, cfg)), mesh="x=2,y=2,z=2", phase="decode")
    with pytest.raises(LayoutError, match="QK-norm over all heads"):
        compile_module(build_module(spec.model, compile_config(spec), spec.mesh.axes), default_pipeline(spec))


@pytest.mark.slow
def test_generate_cli_with_a_checkpoint_on_8_devices(saved: Callable[[str], tuple[Path, Any]], capsys) -> None:
    """`einshard generate --checkpoint DIR --mesh x=2,y=2,z=2` (expert axes auto) gives HF's greedy tokens."""
    from compiler.cli import main

    d, model = saved("qwen2-moe-shared")
    prompt = PROMPTS[0]
    rc = main(["generate", "--checkpoint", str(d), "--prompt-ids", ",".join(map(str, prompt)), "--mesh", "x=2,y=2,z=2",
               "--max-new-tokens", str(NEW), "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    out = json.loads(captured.out)
    assert out["tokens"][0] == hf_greedy(model, prompt)


def test_generation_layout_fixes_expert_axes_and_kv_at_decode(tmp_path: Path) -> None:
    """The runner compiles prefill and decode from one spec: expert axes and kv left ``auto`` would
    be priced per phase, and a prefill could take other weights than decode (CI failure of
    test_generate_cli_with_a_checkpoint_on_8_devices). fixed_layout decides them once."""
    from compiler.driver import resolved
    from compiler.generation import fixed_layout
    from compiler.spec import apply_overrides

    cfg = dict(model_type="mixtral", num_hidden_layers=1, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=16, vocab_size=64, num_local_experts=8, num_experts_per_tok=2)
    spec = apply_overrides(spec_from_hf(_config(tmp_path, cfg)), mesh="x=2,y=2,z=2")
    fixed = fixed_layout(spec, batch=1)
    assert "auto" not in (fixed.serve.ffn, fixed.serve.attn, fixed.serve.kv, fixed.serve.expert_axes)
    decode = resolved(replace(fixed, serve=replace(fixed.serve, phase="decode", batch=1))).serve
    assert (fixed.serve.kv, fixed.serve.expert_axes) == (decode.kv, decode.expert_axes)
    for length in (1, 16, 256):  # whatever prefill would pick on its own, the fixed spec holds
        s = resolved(replace(fixed, serve=replace(fixed.serve, phase="prefill", batch=1, seq=length))).serve
        assert (s.ffn, s.attn, s.kv, s.expert_axes) == (fixed.serve.ffn, fixed.serve.attn, fixed.serve.kv, fixed.serve.expert_axes)
