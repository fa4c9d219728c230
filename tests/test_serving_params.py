"""The HTTP server's request parameters as an OpenAI client sends them, checked without a model
(``Server.params`` and the chat prompt need only a tokenizer): parameters this server does not
implement are refused unless "off" (they were silently ignored: ``logprobs: 2`` answered
``logprobs: null``, ``echo: true`` left the prompt out), chat content may be a list of text parts
(the openai client's typed form; it was a 400), and ``stream_options`` is checked.
The streamed usage chunk itself is tested against a real server in tests/test_serving_http.py.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from runtime.serving.errors import RequestError
from runtime.serving.http import UNSUPPORTED, Server


class Tok:
    """Just enough tokenizer: one id per character, a template that tags roles."""

    eos_token_ids = (0,)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def apply_chat_template(self, msgs: list[dict[str, str]]) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in msgs)


SERVER = Server(engine=None, tokenizer=Tok(), model_name="m", context=64)  # type: ignore[arg-type]


def params(**body: Any):
    return SERVER.params({"prompt": "x", **body}, (1,), False)


@pytest.mark.parametrize("name,value", [
    ("logprobs", 2), ("logprobs", True), ("top_logprobs", 3), ("echo", True), ("suffix", "end"), ("best_of", 3),
    ("presence_penalty", 0.5), ("frequency_penalty", -1), ("repetition_penalty", 1.2), ("logit_bias", {"5": 10}),
    ("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "required"),
    ("response_format", {"type": "json_object"}),
])
def test_unsupported_parameters_are_refused_by_name(name: str, value: Any) -> None:
    with pytest.raises(RequestError) as ei:
        params(**{name: value})
    assert ei.value.param == name and "not supported" in ei.value.message and ei.value.status == 400
    assert ei.value.message.endswith(f"got {json.dumps(value)}")  # JSON, as the client wrote it (not Python's True)


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_their_off_values_are_accepted(name: str) -> None:
    for off in UNSUPPORTED[name]:
        params(**{name: off})  # what LangChain and others send by default


def test_best_of_equal_to_n_is_accepted() -> None:
    assert params(n=3, best_of=3).n == 3


def test_range_message_reads_as_english() -> None:
    with pytest.raises(RequestError, match=r"'max_tokens' must be >= 1, got -1$"):
        params(max_tokens=-1)
    with pytest.raises(RequestError, match=r"'n' must be in \[1, 16\], got 0$"):
        params(n=0)


def test_stream_options() -> None:
    assert params(stream=True, stream_options={"include_usage": True}).include_usage
    assert not params(stream=True, stream_options={"include_usage": False}).include_usage
    assert not params(stream=True).include_usage
    for bad in ({"stream_options": {"include_usage": True}}, {"stream": True, "stream_options": "yes"},
                {"stream": True, "stream_options": {"include_usage": "yes"}}):
        with pytest.raises(RequestError) as ei:
            params(**bad)
        assert ei.value.param == "stream_options"


def test_chat_content_as_text_parts_equals_the_string() -> None:
    plain = SERVER._chat_prompt({"messages": [{"role": "user", "content": "hi there"}]})
    parts = SERVER._chat_prompt({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}]})
    assert parts == plain == tuple(ord(c) for c in "<user>hi there")


@pytest.mark.parametrize("content", [[{"type": "image_url", "image_url": {"url": "x"}}], None, 3, [{"type": "text"}]])
def test_chat_content_that_is_not_text_is_refused(content: Any) -> None:
    with pytest.raises(RequestError) as ei:
        SERVER._chat_prompt({"messages": [{"role": "user", "content": content}]})
    assert ei.value.param == "messages"


# ---- stop strings over tokens (Server._run with a scripted engine) --------------------------

PIECES = ["A", " Par", "is", ".", "\n\n", "The", " ans", "wer", " is"]  # token i decodes to PIECES[i]


class Decoder:
    def push(self, token: int) -> str:
        return PIECES[token]

    def flush(self) -> str:
        return ""


class PieceTok(Tok):
    def stream(self) -> Decoder:
        return Decoder()


class ScriptedEngine:
    """Emits tokens 0, 1, 2, ... of PIECES for each request, then ``length``; records aborts."""

    def __init__(self, new: int):
        self.new, self.aborted = new, []

    def submit(self, req, queue) -> None:
        from runtime.serving.request import Event

        for t in range(self.new):
            queue.put_nowait(Event(req.id, t, "length" if t == self.new - 1 else None))

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


def run_choices(stop: list[str], new: int = len(PIECES)) -> tuple[list[str], str | None, ScriptedEngine]:
    import asyncio

    eng = ScriptedEngine(new)
    server = Server(engine=eng, tokenizer=PieceTok(), model_name="m", context=64)  # type: ignore[arg-type]
    p = server.params({"prompt": "x", "stop": stop, "max_tokens": new}, (1,), False)

    async def collect() -> tuple[list[str], str | None]:
        chunks, finish = [], None
        async for _, new_text, _, fin, _ in server._run(p):
            chunks.append(new_text)
            finish = fin or finish
        return chunks, finish

    chunks, finish = asyncio.run(collect())
    return chunks, finish, eng


@pytest.mark.parametrize("stop,text", [
    (["The ans"], "A Paris.\n\n"),  # spans two tokens: was "A Paris.\n\nThe" (the first token already sent)
    (["\n\nThe"], "A Paris."),
    (["s.\n"], "A Pari"),  # spans three tokens
    (["Paris"], "A "),
    (["wer is", "Par"], "A "),  # the earliest of several
    (["nowhere"], "".join(PIECES)),  # no stop: everything, the held-back tail flushed at the end
])
def test_stop_strings_spanning_tokens_cut_before_the_stop(stop: list[str], text: str) -> None:
    chunks, finish, eng = run_choices(stop)
    assert "".join(chunks) == text  # what a streaming client sees equals the whole text
    assert finish == ("length" if stop == ["nowhere"] else "stop")
    assert bool(eng.aborted) == (finish == "stop")


def test_default_max_tokens_completion_16_chat_the_rest_of_the_context() -> None:
    assert SERVER.params({"prompt": "x"}, (1, 2, 3), chat=False).max_tokens == 16
    assert SERVER.params({}, (1, 2, 3), chat=True).max_tokens == 64 - 3  # was 16: every chat answer cut there
    assert SERVER.params({"max_tokens": 5}, (1, 2, 3), chat=True).max_tokens == 5
    assert SERVER.params({"max_completion_tokens": 7, "max_tokens": 5}, (1, 2, 3), chat=True).max_tokens == 7
