"""Every error the server answers, in OpenAI's shape:
``{"error": {"message", "type", "param", "code"}}``.

kvshare's named exceptions map to statuses here (bad input 400, auth 401, limits 429,
capacity 503); FastAPI's own 404/405 and body validation errors (400, not FastAPI's 422: what
OpenAI answers, naming the field as ``param``) go through the same shape; anything else is a
500 for that request only, its message generic (the details go to the server's log).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from kvshare.errors import (
    ConfigError,
    ContextLengthError,
    DecodeCapacityError,
    KVShareError,
    PromptError,
    ScopeError,
)
from kvshare.serve.auth import AuthError
from kvshare.serve.limits import OverLimitError
from kvshare.serve.schema import UnsupportedError

log = logging.getLogger("kvshare.serve")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class ServeError(KVShareError):
    """An error with its HTTP status, OpenAI ``param`` and ``code`` already decided."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


def body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object."""
    kind = _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def classify(exc: BaseException) -> ServeError:
    """The status, param and code of an exception raised while serving a request."""
    if isinstance(exc, ServeError):
        return exc
    if isinstance(exc, UnsupportedError):
        return ServeError(400, str(exc), exc.param, "unsupported_parameter")
    if isinstance(exc, ContextLengthError):
        return ServeError(400, str(exc), "messages", "context_length_exceeded")
    if isinstance(exc, AuthError):
        return ServeError(401, str(exc), None, "invalid_api_key")
    if isinstance(exc, OverLimitError):
        return ServeError(429, str(exc), None, "rate_limit_exceeded")
    if isinstance(exc, DecodeCapacityError):
        return ServeError(400, str(exc), "max_tokens", "decode_capacity")
    if isinstance(exc, PromptError | ScopeError | ConfigError):
        return ServeError(400, str(exc), None, "invalid_value")
    log.error("request failed", exc_info=exc)
    return ServeError(500, "the server failed on this request (see its log)", None, None)


def response(exc: BaseException) -> JSONResponse:
    """The JSON response of ``exc`` (``Retry-After`` on 429)."""
    err = classify(exc)
    headers = {}
    if isinstance(exc, OverLimitError):
        headers["Retry-After"] = str(exc.retry_after_s)
    if err.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(body(err.status, str(err), err.param, err.code), err.status, headers)


def _param(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) if parts else "body"


async def _validation(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid body"}
    param = _param(tuple(first.get("loc", ())))
    message = f"{param}: {first.get('msg', 'invalid value')}"
    return JSONResponse(body(400, message, param, "invalid_value"), 400)


async def _http(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return JSONResponse(
        body(exc.status_code, str(exc.detail), None, code), exc.status_code, exc.headers
    )


async def _kvshare(_: Request, exc: Exception) -> JSONResponse:
    return response(exc)


def install(app: FastAPI) -> None:
    """Route every error of ``app`` through OpenAI's shape."""
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(HTTPException, _http)
    app.add_exception_handler(KVShareError, _kvshare)
    app.add_exception_handler(Exception, _kvshare)
