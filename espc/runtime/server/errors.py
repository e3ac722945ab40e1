"""OpenAI's error body, `{"error": {"message", "type", "param", "code"}}`, for every error
the server answers: its own (`APIError`), a request that fails validation, an unknown path
or method, and an unhandled exception."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from espc.runtime.driver import FinishEvent

logger = logging.getLogger("espc.server")

# Admission control's rejection codes (espc.runtime.driver.Admission): overload is 429,
# a request no instance group can hold is 503.
OVERLOAD_CODES = frozenset({"queue_full", "ttft_unreachable"})
RETRY_AFTER_S = 1


class APIError(Exception):
    """An error answered with OpenAI's body."""

    def __init__(
        self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
        code: str | None = None, headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type_, param, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _bad(message: str, param: str | None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def finish_error(event: FinishEvent) -> APIError:
    """The HTTP error of a request the engine ended without a completion."""
    why = event.error or event.reason
    if event.reason == "rejected" and event.code in OVERLOAD_CODES:
        return APIError(429, f"request rejected: {why}", "overloaded", code=event.code, headers={"Retry-After": str(RETRY_AFTER_S)})
    if event.reason == "rejected":
        return APIError(503, f"request rejected: {why}", "service_unavailable", code=event.code or "unservable")
    return APIError(503, f"the engine could not complete the request: {why}", "engine_error", code=event.reason)


_UNIONS = {
    "prompt": "prompt must be a string, a list of token ids, or a list of strings or of token-id lists",
    "stop": "stop must be a string or a list of strings",
}


def _validation_message(error: dict) -> tuple[str, str | None]:
    location = [str(part) for part in error.get("loc", ()) if part != "body"]
    param = location[0] if location else None  # the request's field, as OpenAI names it
    if param in _UNIONS and len(location) > 1:
        return _UNIONS[param], param
    if error.get("type") == "extra_forbidden":
        return f"unrecognized request argument supplied: {param}", param
    if error.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {error.get('ctx', {}).get('error', error.get('msg'))}", None
    if error.get("type") == "missing" and param is None:
        return "the request needs a JSON body", None
    return (f"{'.'.join(location)}: {error.get('msg')}" if param else str(error.get("msg"))), param


def add_error_handlers(app: FastAPI) -> None:
    """Answer every error of `app` with OpenAI's body."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError):
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError):
        errors = error.errors()
        message, param = _validation_message(errors[0]) if errors else ("invalid request", None)
        others = {_validation_message(other)[1] for other in errors} - {param, None}
        if others:
            message += f" (and errors in {', '.join(sorted(str(other) for other in others))})"
        request.app.state.server.metrics.outcome("invalid")
        return APIError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return APIError(error.status_code, str(error.detail), kind, headers=getattr(error, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, error: Exception):
        logger.exception("unhandled error answering %s", request.url.path)
        return APIError(500, f"internal error: {type(error).__name__}: {error}", "internal_error").response()
