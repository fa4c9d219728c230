"""Tiny random Hugging Face checkpoints of every supported family, and their greedy reference.

Shared by the generation tests (test_generate.py, test_sampling.py, test_score.py,
test_generate_cli.py). Each model is built from a config with a fixed torch seed, its 1-D
parameters (norm scales, biases) perturbed so that they matter and greedy decoding does not
collapse onto one token, saved with ``save_pretrained`` and loaded back through einshard's
checkpoint reader, exactly as a user's checkpoint would be.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

import torch
import transformers

from compiler.generation import make_runner, weight_types
from compiler.spec import Spec, apply_overrides
from runtime.checkpoint import open_checkpoint
from runtime.generator import GenerateRequest, Generator
from runtime.sampling import SamplingParams

VOCAB = 96
CONTEXT = 64
NEW = 16
WINDOW = 8  # Mistral's sliding window: the prompts + 16 new tokens are longer
FAMILIES = ("llama", "mistral", "qwen2", "falcon", "gptj")
#: torch seeds whose greedy continuations of PROMPTS use many distinct tokens
SEEDS = {"llama": 0, "mistral": 0, "qwen2": 3, "falcon": 3, "gptj": 4}
#: three prompts of different lengths (the first is longer than Mistral's window)
PROMPTS = ((5, 17, 42, 9, 3, 77, 60, 11, 2, 8), (33, 4), (1, 2, 3, 4, 5, 6))


def hf_config(family: str, **over: object) -> transformers.PretrainedConfig:
    """A 2-layer, d_model 32 config of ``family`` (Llama/Mistral/Qwen2 grouped: 4 heads, 2 KV)."""
    no_ids = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False)
    llama_like = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      initializer_range=0.2, **no_ids)
    if family == "llama":
        cfg = transformers.LlamaConfig(**llama_like)
    elif family == "mistral":
        cfg = transformers.MistralConfig(sliding_window=WINDOW, **llama_like)
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(**llama_like)
    elif family == "falcon":
        cfg = transformers.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        multi_query=True, parallel_attn=True, new_decoder_architecture=False,
                                        bias=False, initializer_range=0.2, **no_ids)
    elif family == "gptj":
        cfg = transformers.GPTJConfig(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=128,
                                      initializer_range=0.2, **no_ids)
    else:
        raise ValueError(family)
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def hf_model(family: str, seed: int | None = None, **over: object) -> transformers.PreTrainedModel:
    torch.manual_seed(SEEDS[family] if seed is None else seed)
    m = transformers.AutoModelForCausalLM.from_config(hf_config(family, **over))
    with torch.no_grad():
        for _, p in m.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return m.eval()


def hf_greedy(model: transformers.PreTrainedModel, prompt: Sequence[int], new: int = NEW,
              eos: int | None = None) -> list[int]:
    """transformers' greedy continuation of ``prompt`` alone (stops after ``eos`` when given)."""
    ids = torch.tensor([list(prompt)])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                             pad_token_id=0, eos_token_id=eos)
    return out[0, len(prompt):].tolist()


@dataclass
class Tiny:
    """A saved tiny checkpoint: its directory, the HF model, an einshard spec and a Generator."""

    family: str
    path: Path
    hf: transformers.PreTrainedModel
    spec: Spec
    weights: dict
    gen: Generator
    memo: dict = field(default_factory=dict)

    def want(self, prompt: Sequence[int], new: int = NEW, eos: int | None = None) -> list[int]:
        key = (tuple(prompt), new, eos)
        if key not in self.memo:
            self.memo[key] = hf_greedy(self.hf, prompt, new, eos)
        return self.memo[key]

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
                 new: int = NEW, eos: Sequence[int] = (), batch: int | None = None, stream=None):
        return self.gen.generate(GenerateRequest.of(prompts, params, new, eos), stream=stream, batch=batch)


def load_spec_and_weights(path: Path, **overrides: str | None) -> tuple[Spec, dict]:
    ck = open_checkpoint(path)
    spec = apply_overrides(Spec(ck.model_spec(), path=str(path)), **overrides)
    return spec, ck.load_weights(spec.model, weight_types(spec))


def tiny(family: str, directory: Path, seed: int | None = None, **overrides: str | None) -> Tiny:
    m = hf_model(family, seed)
    m.save_pretrained(directory)
    spec, weights = load_spec_and_weights(directory, **overrides)
    return Tiny(family, directory, m, spec, weights, Generator(make_runner(spec, weights, CONTEXT)))


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def write_tokenizer(directory: Path, vocab: int, corpus: Sequence[str]) -> None:
    """A byte-level BPE trained on ``corpus`` (at most ``vocab`` ids; EOS ``</s>`` = id 2) with a
    chat template, as ``tokenizer.json`` + ``tokenizer_config.json`` in ``directory``."""
    import json

    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(corpus, trainer)
    tk.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<|endoftext|>", "chat_template": CHAT_TEMPLATE}))


def checkpoint_with_tokenizer(directory: Path, family: str = "llama", vocab: int = 320,
                              corpus: Sequence[str] = ("The quick brown fox jumps over the lazy dog. " * 3,)) -> transformers.PreTrainedModel:
    """A tiny ``family`` checkpoint of ``vocab`` ids plus a trained tokenizer, saved in ``directory``."""
    m = hf_model(family, vocab_size=vocab)
    m.save_pretrained(directory)
    write_tokenizer(directory, vocab, corpus)
    return m


def hf_logits(model: Any, tokens: np.ndarray, prompt_len: int) -> tuple[np.ndarray, np.ndarray]:
    """transformers' logits for ``tokens`` [B, L] in float64: the full-sequence forward, and its
    own prefill of ``prompt_len`` tokens followed by KV-cache decode steps (both [B, L, V])."""
    ids = torch.tensor(tokens, dtype=torch.long)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits.double().numpy()
        cache = transformers.DynamicCache(config=model.config)
        out = model(ids[:, :prompt_len], cache=cache, use_cache=True)
        steps = [out.logits]
        for t in range(prompt_len, tokens.shape[1]):
            out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
    return full, torch.cat(steps, dim=1).double().numpy()


def saved_once(root: Path, save: Callable[[str, Path], tuple[Path, Any]]) -> Callable[[str], tuple[Path, Any]]:
    """``save(name, root)`` memoized by name: each test checkpoint is written once per module."""
    cache: dict[str, tuple[Path, Any]] = {}

    def get(name: str) -> tuple[Path, Any]:
        if name not in cache:
            cache[name] = save(name, root)
        return cache[name]

    return get
