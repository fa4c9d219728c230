"""Errors a serving client can cause; each maps to an HTTP status and an OpenAI error type."""

from __future__ import annotations

from ir.errors import EinshardError


class ServingError(EinshardError):
    """A request the engine will not run; ``status``/``type`` are what the HTTP layer returns."""

    kind = "serving error"
    status = 400
    type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.param = param


class RequestError(ServingError):
    """Bad parameters, or a prompt plus ``max_tokens`` longer than the context."""

    kind = "request error"


class OverloadedError(ServingError):
    """The waiting queue is full: the client should retry later (HTTP 503)."""

    kind = "overloaded"
    status = 503
    type = "server_overloaded"
