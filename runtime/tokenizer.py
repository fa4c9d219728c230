"""Text ↔ token ids with the ``tokenizers`` library, as transformers' tokenizer for the checkpoint does.

Two sources: a Hugging Face directory (``tokenizer.json``, plus ``tokenizer_config.json`` for the
special tokens, BOS/EOS flags and the chat template) and a GGUF file's metadata (vocabulary,
merges, token types, special ids, pre-tokenizer name, chat template), from which a byte-level BPE
``tokenizers.Tokenizer`` is built the way transformers' GGUF converter builds it, so the ids are
the ids transformers gives. Nothing here hand-rolls BPE or byte decoding.

BOS/EOS follow transformers 5: with a tokenizer.json its post-processor alone decides (transformers
drops ``add_bos_token``/``add_eos_token`` from tokenizer_config.json then), and one without a
post-processor adds nothing; a GGUF file's ``tokenizer.ggml.add_bos_token``/``add_eos_token`` decide.

``StreamDecoder`` turns ids into text one at a time: a character split over several byte-level
tokens is held back until it is complete, so a stream never prints U+FFFD for a valid text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from ir.errors import SpecError, WeightsError

if TYPE_CHECKING:
    from runtime.gguf import GGUFCheckpoint

__all__ = ["StreamDecoder", "Tokenizer"]

#: Pre-tokenizer splits of GGUF ``tokenizer.ggml.pre`` names (llama.cpp's), for byte-level BPE
#: vocabularies whose merges were learned on another split than GPT-2's.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GGUF_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
                "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT,
                "deepseek-r1-qwen": _QWEN2_SPLIT}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character table (the alphabet byte-level BPE vocabularies are spelled in)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


def _token_text(v: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


@dataclass
class StreamDecoder:
    """Incremental detokenizer: ``push(id)`` returns the text that became complete, ``flush()`` the rest.

    It decodes a short window of ids (from the last point where text was emitted) and emits the
    growth of that text, holding it back while it ends in an incomplete UTF-8 sequence (U+FFFD).
    Decoding a window rather than single ids keeps tokenizer-specific joins (leading spaces,
    byte fallback) exactly as ``decode`` of the whole sequence gives them.
    """

    tokenizer: "Tokenizer"
    skip_special_tokens: bool = True
    _ids: list[int] = field(default_factory=list)
    _prefix: int = 0  # window start
    _read: int = 0  # ids up to here are already emitted

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        before = self.tokenizer.decode(self._ids[self._prefix:self._read], self.skip_special_tokens)
        now = self.tokenizer.decode(self._ids[self._prefix:], self.skip_special_tokens)
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is held back (an incomplete character decodes as U+FFFD, as ``decode`` gives it)."""
        before = self.tokenizer.decode(self._ids[self._prefix:self._read], self.skip_special_tokens)
        now = self.tokenizer.decode(self._ids[self._prefix:], self.skip_special_tokens)
        self._prefix = self._read = len(self._ids)
        return now[len(before):] if now.startswith(before) else now


@dataclass(frozen=True)
class Tokenizer:
    """A ``tokenizers.Tokenizer`` with the checkpoint's special tokens and chat template."""

    backend: tokenizers.Tokenizer = field(repr=False)
    bos_token: str | None
    eos_tokens: tuple[str, ...]
    chat_template: str | None = field(default=None, repr=False)
    special_tokens: Mapping[str, str] = field(default_factory=dict)  # bos_token, eos_token, ... → text
    source: str = "<tokenizer>"
    extra_eos_ids: tuple[int, ...] = ()  # from generation_config.json / config.json

    # -- construction

    @classmethod
    def from_directory(cls, path: str | Path) -> "Tokenizer":
        """From a Hugging Face checkpoint directory; WeightsError when it has no tokenizer.json."""
        d = Path(path)
        tj = d / "tokenizer.json"
        if not tj.is_file():
            raise WeightsError(f"no tokenizer.json in '{d}'",
                               hint="save the tokenizer with the model (tokenizer.save_pretrained(DIR)), "
                                    "or pass token ids instead of text")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tj))
        except Exception as e:  # tokenizers raises plain Exceptions on malformed files
            raise WeightsError(f"cannot read '{tj}': {e}") from None
        cfg = _read_json(d / "tokenizer_config.json")
        special = {k: t for k in ("bos_token", "eos_token", "unk_token", "pad_token")
                   if (t := _token_text(cfg.get(k))) is not None}
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                            None)
        jinja = d / "chat_template.jinja"
        if jinja.is_file():
            template = jinja.read_text(encoding="utf-8")
        if backend.post_processor is None:
            _set_template(backend, None, None)
        extra: list[int] = []
        for name in ("generation_config.json", "config.json"):
            eos = _read_json(d / name).get("eos_token_id")
            ids = eos if isinstance(eos, list) else [eos]
            extra = [int(i) for i in ids if isinstance(i, int) and not isinstance(i, bool)]
            if extra:
                break
        eos_text = special.get("eos_token")
        return cls(backend, special.get("bos_token"), (eos_text,) if eos_text else (),
                   template if isinstance(template, str) else None, special, str(d), tuple(extra))

    @classmethod
    def from_gguf(cls, ck: "GGUFCheckpoint") -> "Tokenizer":
        """From a GGUF file's ``tokenizer.*`` metadata: byte-level BPE (``tokenizer.ggml.model`` gpt2)
        or a sentencepiece BPE vocabulary (``llama``), built as transformers' GGUF converter builds them."""
        kind = ck.field("tokenizer.ggml.model")
        if kind is None:
            raise WeightsError(f"the GGUF file '{ck.path}' has no tokenizer metadata (tokenizer.ggml.model)",
                               hint="pass token ids instead of text")
        if kind not in ("gpt2", "llama"):
            raise SpecError(f"{ck.path}: GGUF tokenizer model {kind!r} is not supported",
                            hint="supported: gpt2 (byte-level BPE), llama (sentencepiece BPE); "
                                 "use the Hugging Face checkpoint's tokenizer.json")
        tokens = [str(t) for t in ck.field("tokenizer.ggml.tokens", [])]
        types = [int(t) for t in ck.field("tokenizer.ggml.token_type", [])] or [1] * len(tokens)
        merges = [str(m) for m in ck.field("tokenizer.ggml.merges", [])]
        bad = [m for m in merges if len(m.split(" ")) != 2]
        if bad:
            raise WeightsError(f"{ck.path}: malformed tokenizer.ggml.merges entry {bad[0]!r}")
        pairs = [(a, b) for a, b in (m.split(" ") for m in merges)]
        alphabet: set[str] | None = None
        if kind == "gpt2":
            spelling = _bytes_to_unicode()
            alphabet = set(spelling.values())
            vocab = {(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
                     for i, t in enumerate(tokens)}
            backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
            split = _GGUF_SPLITS.get(str(ck.field("tokenizer.ggml.pre", "")))
            if split is None:
                backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
            else:
                backend.pre_tokenizer = pre_tokenizers.Sequence([
                    pre_tokenizers.Split(Regex(split), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
            backend.decoder = decoders.ByteLevel()
        else:
            vocab = {t: i for i, t in enumerate(tokens)}
            if not pairs:
                scores = [float(x) for x in ck.field("tokenizer.ggml.scores", [])]
                if len(scores) != len(tokens):
                    raise WeightsError(f"{ck.path}: a sentencepiece vocabulary without merges needs "
                                       "tokenizer.ggml.scores for every token")
                pairs = _merges_from_scores(vocab, dict(zip(tokens, scores)))
            backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=True, byte_fallback=True))
            backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
            backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                                 decoders.Fuse(), decoders.Strip(content=" ", left=1)])
        control = [AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types)
                   if k == _CONTROL and (alphabet is None or set(t) <= alphabet)]
        if control:
            backend.add_special_tokens(control)
        user = [AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types)
                if k == _USER_DEFINED and t in vocab]
        if user:
            backend.add_tokens(user)

        def tok(key: str) -> str | None:
            i = ck.field(f"tokenizer.ggml.{key}")
            return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

        named = (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unknown_token_id"),
                 ("pad_token", "padding_token_id"))
        special = {k: text for k, key in named if (text := tok(key)) is not None}
        add_bos = ck.field("tokenizer.ggml.add_bos_token", kind == "llama")  # llama.cpp's default for sentencepiece
        _set_template(backend, special.get("bos_token") if add_bos else None,
                      special.get("eos_token") if ck.field("tokenizer.ggml.add_eos_token", False) else None)
        eos = special.get("eos_token")
        template = ck.field("tokenizer.chat_template")
        return cls(backend, special.get("bos_token"), (eos,) if eos else (),
                   str(template) if template is not None else None, special, str(ck.path))

    # -- properties

    @property
    def vocab_size(self) -> int:
        """One past the largest id (added tokens included): the model's vocab must be at least this."""
        return max(self.backend.get_vocab(with_added_tokens=True).values(), default=-1) + 1

    @property
    def bos_token_id(self) -> int | None:
        return self.backend.token_to_id(self.bos_token) if self.bos_token is not None else None

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        ids = [i for t in self.eos_tokens if (i := self.backend.token_to_id(t)) is not None]
        return tuple(dict.fromkeys(ids + list(self.extra_eos_ids)))

    def check_vocab(self, model_vocab: int) -> None:
        """SpecError when the tokenizer can produce ids the model has no embedding for."""
        if self.vocab_size > model_vocab:
            raise SpecError(f"the tokenizer of '{self.source}' has ids up to {self.vocab_size - 1}, "
                            f"but the model's vocab is {model_vocab}",
                            hint="the tokenizer does not belong to this model")

    # -- text

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; BOS/EOS added as transformers' tokenizer adds them when ``add_special_tokens``."""
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def stream(self, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation rendered with the checkpoint's jinja2 chat template, as transformers renders it."""
        if not self.chat_template:
            raise SpecError(f"the tokenizer of '{self.source}' has no chat template",
                            hint="give the prompt as plain text (without --chat)")
        import jinja2

        try:
            return _compile(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, tools=None, documents=None,
                **self.special_tokens)
        except jinja2.TemplateError as e:
            raise SpecError(f"the chat template of '{self.source}' failed: {e}") from None


def _merges_from_scores(vocab: Mapping[str, int], scores: Mapping[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a sentencepiece vocabulary: every split of a piece into two pieces of the
    vocabulary, best piece score first; ties by longer left, then longer right part, then vocabulary
    order (the order transformers' ``generate_merges`` gives)."""
    found: list[tuple[float, int, int, int, int, int, str, str]] = []
    for n, (piece, score) in enumerate(scores.items()):
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                found.append((-score, -len(left), -len(right), n, vocab[left], vocab[right], left, right))
    found.sort(key=lambda f: f[:6])
    return [(f[6], f[7]) for f in found]


def _read_json(p: Path) -> dict[str, Any]:
    if not p.is_file():
        return {}
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot read '{p}': {e}") from None
    return data if isinstance(data, dict) else {}


def _set_template(backend: tokenizers.Tokenizer, bos: str | None, eos: str | None) -> None:
    """A post-processor adding exactly ``bos`` before and ``eos`` after (transformers' update_post_processor)."""
    ids = {t: backend.token_to_id(t) for t in (bos, eos) if t is not None}
    bos = bos if bos is not None and ids.get(bos) is not None else None
    eos = eos if eos is not None and ids.get(eos) is not None else None
    single = f"{bos + ':0 ' if bos else ''}$A:0{' ' + eos + ':0' if eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if bos else ''} $B:1{' ' + eos + ':1' if eos else ''}"
    special = [(t, ids[t]) for t in (bos, eos) if t is not None]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def _compile(template: str) -> Any:
    """A sandboxed jinja2 template with the environment transformers gives chat templates."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class Generation(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (marks assistant text for training masks): renders its body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return str(caller())

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)
