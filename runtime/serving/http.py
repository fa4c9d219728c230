"""The OpenAI-compatible HTTP server (starlette; run by uvicorn): completions, chat completions
(both streamed as server-sent events with ``stream: true``), models, health and metrics.

Parameters are the OpenAI ones (``max_tokens``, ``temperature``, ``top_p``, ``stop``, ``seed``,
``n``, ``stream_options.include_usage``) plus vLLM's ``top_k`` (-1 or 0: off), ``ignore_eos`` and
``return_token_ids``; chat content may be a string or a list of text parts. OpenAI parameters this
server does not implement (``logprobs``, ``echo``, penalties, ``tools``, ...) are refused unless they
have their "off" value, never silently ignored. Errors are OpenAI error bodies
``{"error": {"message", "type", "param", "code"}}``: 400 for bad JSON or parameters (and a prompt
plus max_tokens beyond the context), 404 for an unknown model or path, 503 when the queue is full.
A client that disconnects mid-stream frees its slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncGenerator, AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ir.errors import EinshardError
from runtime.serving.async_engine import AsyncEngine
from runtime.serving.errors import RequestError, ServingError
from runtime.serving.request import Event, Request

DEFAULT_MAX_TOKENS = 16
MAX_N = 16

#: OpenAI request parameters not implemented here, with the values that mean "off" (accepted, as
#: clients send them by default); any other value is a 400 naming the parameter.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "suffix": (None, ""),
    "best_of": (None, 1), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
    "repetition_penalty": (None, 1), "logit_bias": (None, {}), "tools": (None, []), "functions": (None, []),
    "tool_choice": (None, "none", "auto"), "function_call": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
}

#: what ``_run`` yields: (choice index, new text, new token ids, finish reason, error)
_Item = tuple[int, str, list[int], str | None, str | None]


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}}, status)


def _from(e: ServingError) -> JSONResponse:
    msg = e.message + (f" ({e.hint})" if e.hint else "")
    return error_response(e.status, msg, e.type, e.param, type(e).__name__)


@dataclass(frozen=True)
class Params:
    """The validated generation parameters of one HTTP request."""

    prompt: tuple[int, ...]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    n: int
    stop: tuple[str, ...]
    ignore_eos: bool
    stream: bool
    return_token_ids: bool
    include_usage: bool = False


def _num(body: dict, name: str, default: Any, kind: type, lo: float | None = None, hi: float | None = None) -> Any:
    v = body.get(name, default)
    if v is None:
        v = default
    if v is None:
        return None
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (kind is float or float(v).is_integer())
    if not ok:
        raise RequestError(f"'{name}' must be {'a number' if kind is float else 'an integer'}, got {v!r}", param=name)
    v = kind(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise RequestError(f"'{name}' must be {rng}, got {v}", param=name)
    return v


class Server:
    """The endpoints over one engine, one tokenizer and one served model name."""

    def __init__(self, engine: AsyncEngine, tokenizer: Any, model_name: str, context: int):
        self.engine, self.tok, self.model, self.context = engine, tokenizer, model_name, context
        self.created = int(time.time())

    # ---- parameters -----------------------------------------------------------------------

    def params(self, body: dict, prompt: tuple[int, ...], chat: bool) -> Params:
        """The request's parameters, checked. Chat takes ``max_completion_tokens`` before
        ``max_tokens``. Without either a completion makes 16 tokens (the OpenAI default) and a chat
        answer runs to EOS or the end of the context, as OpenAI's chat does (16 cut every chat
        answer from a client that does not set it)."""
        keys = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
        mt = next((body[k] for k in keys if body.get(k) is not None), None)
        default = max(1, self.context - len(prompt)) if chat else DEFAULT_MAX_TOKENS
        max_tokens = _num({"max_tokens": mt}, "max_tokens", default if mt is None else mt, int, 1)
        stop = body.get("stop")
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
            stop = tuple(stop)
        else:
            raise RequestError("'stop' must be a string or a list of up to 4 strings", param="stop")
        if any(not s for s in stop):
            raise RequestError("'stop' strings must not be empty", param="stop")
        top_k = _num(body, "top_k", 0, int, -1)
        for flag in ("ignore_eos", "stream", "return_token_ids"):
            if not isinstance(body.get(flag, False), bool):
                raise RequestError(f"'{flag}' must be true or false", param=flag)
        n = _num(body, "n", 1, int, 1, MAX_N)
        for name, off in UNSUPPORTED.items():
            v = body.get(name)
            if not any(v == o and type(v) in (type(o), int, float) for o in off) and not (name == "best_of" and v == n):
                raise RequestError(f"'{name}' is not supported by this server, got {json.dumps(v)}", param=name,
                                   hint=f"leave it out{' or set it to ' + json.dumps(off[1]) if len(off) > 1 else ''}")
        opts = body.get("stream_options")
        if opts is not None and (not isinstance(opts, dict) or not body.get("stream", False)
                                 or not isinstance(opts.get("include_usage", False), bool)):
            raise RequestError("'stream_options' goes with 'stream': true and is {\"include_usage\": true|false}",
                               param="stream_options")
        return Params(prompt, max_tokens, _num(body, "temperature", 1.0, float, 0.0, 2.0),
                      _num(body, "top_p", 1.0, float, 1e-9, 1.0), max(top_k, 0),
                      _num(body, "seed", None, int, 0, 2**32 - 1), n, stop,
                      body.get("ignore_eos", False), body.get("stream", False), body.get("return_token_ids", False),
                      bool((opts or {}).get("include_usage", False)))

    def _check_model(self, body: dict) -> None:
        m = body.get("model")
        if m is not None and m != self.model:
            raise HTTPException(404, f"the model '{m}' does not exist; this server serves '{self.model}'")

    async def _body(self, request: HTTPRequest) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        return body

    def _prompt(self, body: dict) -> tuple[int, ...]:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]  # a batch of one
        if isinstance(p, str):
            ids = self.tok.encode(p)
        elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            ids = p
        else:
            raise RequestError("'prompt' must be a string or a list of token ids (one prompt per request)",
                               param="prompt")
        return tuple(int(t) for t in ids)

    def _chat_prompt(self, body: dict) -> tuple[int, ...]:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and _text(m.get("content")) is not None
                for m in msgs):
            raise RequestError("'messages' must be a non-empty list of {role, content} objects whose content is a "
                               "string or a list of {\"type\": \"text\", \"text\": ...} parts", param="messages")
        try:
            text = self.tok.apply_chat_template([{"role": m["role"], "content": _text(m["content"])} for m in msgs])
        except EinshardError as e:
            raise RequestError(e.message, param="messages") from None
        return tuple(self.tok.encode(text, add_special_tokens=False))

    # ---- running ---------------------------------------------------------------------------

    def _requests(self, p: Params) -> list[Request]:
        from runtime.sampling import SamplingParams

        base = p.seed if p.seed is not None else secrets.randbits(32)
        stop_ids = () if p.ignore_eos else tuple(self.tok.eos_token_ids)
        rid = uuid.uuid4().hex
        return [Request(f"{rid}-{i}", p.prompt, SamplingParams(p.temperature, p.top_k, p.top_p, (base + i) % 2**32),
                        p.max_tokens, stop_ids) for i in range(p.n)]

    async def _run(self, p: Params) -> AsyncGenerator[_Item, None]:
        """Submits the n requests and yields (index, new text, new token ids, finish, error) as
        tokens arrive; stop strings end a choice (the text before them is kept); aborts every
        unfinished request when the consumer goes away."""
        reqs = self._requests(p)
        queue: asyncio.Queue[Event] = asyncio.Queue()
        index = {r.id: i for i, r in enumerate(reqs)}
        submitted: list[str] = []
        open_ids = set()
        try:
            for r in reqs:
                self.engine.submit(r, queue)
                submitted.append(r.id)
                open_ids.add(r.id)
            decoders = [self.tok.stream() for _ in reqs]
            text = [""] * len(reqs)  # decoded so far
            sent = [0] * len(reqs)  # of which yielded: the rest could still begin a stop string
            hold = max((len(s) for s in p.stop), default=1) - 1
            while open_ids:
                e = await queue.get()
                if e.request_id not in open_ids:
                    continue
                i = index[e.request_id]
                ids = []
                finish = e.finish
                full = text[i]
                if e.token is not None:
                    ids = [e.token]
                    full += decoders[i].push(e.token)
                if finish in ("stop", "length"):
                    full += decoders[i].flush()
                # a stop string ends in the new text; it may begin in held-back text, never in sent text
                cut = min((k for k in (full.find(s, max(0, len(text[i]) - len(s) + 1)) for s in p.stop) if k >= 0),
                          default=-1)
                if cut >= 0:
                    full = full[:cut]
                    if finish is None:
                        self.engine.abort(e.request_id)
                    finish = "stop"
                end = len(full) if finish else max(sent[i], len(full) - hold)
                new = full[sent[i]:end]
                text[i], sent[i] = full, end
                if finish:
                    open_ids.discard(e.request_id)
                yield i, new, ids, finish, e.error
        finally:
            for rid in open_ids:
                self.engine.abort(rid)

    @staticmethod
    def _reason(finish: str | None) -> str | None:
        return {"stop": "stop", "length": "length", "abort": "stop"}.get(finish or "", finish)

    async def completions(self, request: HTTPRequest) -> Response:
        return await self._serve(request, chat=False)

    async def chat(self, request: HTTPRequest) -> Response:
        return await self._serve(request, chat=True)

    async def _serve(self, request: HTTPRequest, chat: bool) -> Response:
        try:
            body = await self._body(request)
            self._check_model(body)
            prompt = self._chat_prompt(body) if chat else self._prompt(body)
            p = self.params(body, prompt, chat)
        except ServingError as e:
            return _from(e)
        gen = self._run(p)
        gone = asyncio.ensure_future(_disconnected(request))  # the body is read: receive() now waits for it
        try:
            first = await _next_unless_gone(gen, gone)  # submits: a refusal is still an HTTP error status
        except ServingError as e:
            gone.cancel()
            return _from(e)
        except StopAsyncIteration:
            gone.cancel()
            return error_response(500, "no output", "internal_error")
        if first is None:  # the client went away while its request waited or prefilled
            return Response(status_code=499)
        kind = ("chat.completion" if chat else "text_completion")
        cid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        if p.stream:
            gone.cancel()  # StreamingResponse watches for the disconnect itself from here on
            return StreamingResponse(self._sse(first, gen, p, chat, cid, created), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        texts = [""] * p.n
        ids: list[list[int]] = [[] for _ in range(p.n)]
        reasons: list[str | None] = [None] * p.n
        item: _Item | None = first
        try:
            while item is not None:
                i, new, toks, finish, error = item
                if error:
                    await gen.aclose()
                    return error_response(500, f"generation failed: {error}", "internal_error")
                texts[i] += new
                ids[i] += toks
                if finish:
                    reasons[i] = self._reason(finish)
                try:
                    item = await _next_unless_gone(gen, gone)
                except StopAsyncIteration:
                    break
                if item is None:  # the client went away: its requests were aborted, slots freed
                    return Response(status_code=499)
        finally:
            gone.cancel()
        choices = []
        for i in range(p.n):
            c: dict[str, Any] = {"index": i, "finish_reason": reasons[i], "logprobs": None}
            if chat:
                c["message"] = {"role": "assistant", "content": texts[i]}
            else:
                c["text"] = texts[i]
            if p.return_token_ids:
                c["token_ids"] = ids[i]
            choices.append(c)
        made = sum(len(t) for t in ids)
        return JSONResponse({"id": cid, "object": kind, "created": created, "model": self.model, "choices": choices,
                             "usage": {"prompt_tokens": len(p.prompt), "completion_tokens": made,
                                       "total_tokens": len(p.prompt) + made}})

    async def _sse(self, first, gen, p: Params, chat: bool, cid: str, created: int) -> AsyncIterator[str]:
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(i: int, delta: str | None, finish: str | None, toks: list[int], role: bool = False) -> str:
            c: dict[str, Any] = {"index": i, "finish_reason": finish, "logprobs": None}
            if chat:
                d: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
                if delta:
                    d["content"] = delta
                c["delta"] = d
            else:
                c["text"] = delta or ""
            if p.return_token_ids:
                c["token_ids"] = toks
            return "data: " + json.dumps({"id": cid, "object": kind, "created": created, "model": self.model,
                                          "choices": [c]}) + "\n\n"

        made = 0
        try:
            if chat:
                for i in range(p.n):
                    yield chunk(i, None, None, [], role=True)
            item = first
            while True:
                i, new, toks, finish, error = item
                made += len(toks)
                if error:
                    yield "data: " + json.dumps({"error": {"message": f"generation failed: {error}",
                                                           "type": "internal_error", "param": None,
                                                           "code": None}}) + "\n\n"
                    break
                if new or toks or finish:
                    yield chunk(i, new, self._reason(finish), toks)
                try:
                    item = await gen.__anext__()
                except StopAsyncIteration:
                    if p.include_usage:  # OpenAI's last chunk: no choices, the whole request's usage
                        yield "data: " + json.dumps({
                            "id": cid, "object": kind, "created": created, "model": self.model, "choices": [],
                            "usage": {"prompt_tokens": len(p.prompt), "completion_tokens": made,
                                      "total_tokens": len(p.prompt) + made}}) + "\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:
            await gen.aclose()  # a client that went away: its requests are aborted, slots freed

    # ---- the rest ----------------------------------------------------------------------------

    async def models(self, request: HTTPRequest) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": self.model, "object": "model", "created": self.created, "owned_by": "einshard",
             "max_model_len": self.context}]})

    async def health(self, request: HTTPRequest) -> Response:
        if not self.engine.alive:
            return JSONResponse({"status": "engine stopped", "error": str(self.engine.error)}, 503)
        return JSONResponse({"status": "ok", **self.engine.status()})

    async def metrics(self, request: HTTPRequest) -> Response:
        return PlainTextResponse(self.engine.engine.metrics.render(), media_type="text/plain; version=0.0.4")


def make_app(engine: AsyncEngine, tokenizer: Any, model_name: str, context: int) -> Starlette:
    """The ASGI app; the engine thread starts with the app and stops with it."""
    s = Server(engine, tokenizer, model_name, context)

    async def http_error(request: HTTPRequest, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
        return error_response(exc.status_code, str(exc.detail), kind, code=str(exc.status_code))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if not engine.alive:
            engine.start()
        yield
        engine.stop()

    routes = [
        Route("/v1/completions", s.completions, methods=["POST"]),
        Route("/v1/chat/completions", s.chat, methods=["POST"]),
        Route("/v1/models", s.models, methods=["GET"]),
        Route("/health", s.health, methods=["GET"]),
        Route("/metrics", s.metrics, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error}, lifespan=lifespan)


def _text(content: Any) -> str | None:
    """A chat message's text: a string, or the concatenated ``text`` of a list of text parts as
    the OpenAI client sends them; None for anything else (images, a missing content)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(c, dict) and c.get("type") == "text"
                                         and isinstance(c.get("text"), str) for c in content):
        return "".join(c["text"] for c in content)
    return None


async def _next_unless_gone(gen: AsyncGenerator[_Item, None], gone: "asyncio.Future[None]") -> _Item | None:
    """The generator's next item, or None once the client is gone (then ``gen`` is closed, which
    aborts its requests). A gone client wins over items already queued: nobody will read them."""
    if not gone.done():
        nxt = asyncio.ensure_future(gen.__anext__())
        either: list[asyncio.Future[Any]] = [nxt, gone]
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if not gone.done():
            return nxt.result()  # raises StopAsyncIteration at the end, ServingError on refusal
        nxt.cancel()
        with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
            await nxt
    await gen.aclose()
    return None


async def _disconnected(request: HTTPRequest) -> None:
    """Returns when the client of a request whose body was read goes away (ASGI servers send
    ``http.disconnect`` then, or once the response is complete)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
