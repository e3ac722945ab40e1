"""The endpoints, `GET /v1/models`, `GET /health`, `GET /metrics` and `POST /v1/completions`,
over the `ServerState` that `create_app` stores on `app.state.server`."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from espc.runtime.driver import EngineError, FinishEvent
from espc.runtime.engine import Engine
from espc.runtime.server.detokenize import _Text
from espc.runtime.server.errors import APIError, _bad, finish_error
from espc.runtime.server.metrics import ServerMetrics, _Timing
from espc.runtime.server.schemas import CompletionRequest, _prepare, _usage, choice_body, completion_body
from espc.runtime.server.streaming import _Disconnected, _Failed, _gather, _pieces, _sse, _unless_disconnected


@dataclass(frozen=True)
class ServerState:
    """What the endpoints share, stored on `app.state.server`."""

    engine: Engine  # started; its owner closes it
    served: str  # the model name requests must name
    created: int  # when the app was built: the model's `created` in /v1/models
    metrics: ServerMetrics


_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "invalid request (OpenAI error body)"},
    404: {"description": "unknown model"},
    429: {"description": "overloaded: refused by admission control; retry later"},
    503: {"description": "no instance can serve it, or the engine is down or failed it"},
}


def add_routes(app: FastAPI) -> None:
    """The endpoints, in the order the OpenAPI schema lists them."""
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/health", health, methods=["GET"], response_model=None, responses={503: {"description": "no instance in service"}})
    app.add_api_route("/metrics", prometheus, methods=["GET"], response_class=PlainTextResponse)
    app.add_api_route("/v1/completions", completions, methods=["POST"], response_model=None, responses=_ERROR_RESPONSES)


def _state(request: Request) -> ServerState:
    return request.app.state.server


async def models(request: Request) -> dict:
    state = _state(request)
    return {
        "object": "list",
        "data": [{
            "id": state.served, "object": "model", "created": state.created, "owned_by": "espc",
            "max_model_len": state.engine.spec.model.max_context,
        }],
    }


async def health(request: Request) -> JSONResponse:
    stats = await _stats(_state(request).engine)
    if stats is None or stats["in_service"] == 0:
        return JSONResponse({"status": "unavailable", "in_service": 0 if stats is None else stats["in_service"]}, status_code=503)
    return JSONResponse({"status": "ok", "instances": stats["instances"], "in_service": stats["in_service"]})


async def prometheus(request: Request) -> PlainTextResponse:
    state = _state(request)
    stats = await _stats(state.engine)
    return PlainTextResponse(state.metrics.render(stats, state.engine.running), media_type="text/plain; version=0.0.4; charset=utf-8")


async def completions(body: CompletionRequest, request: Request) -> Response:
    state = _state(request)
    metrics = state.metrics
    metrics.in_flight += 1
    response = None
    try:
        response = await _complete(state, body, request)
        return response
    except APIError as error:
        metrics.outcome("invalid" if error.status in (400, 404) else "rejected" if error.status == 429 or error.code == "unservable" else "error")
        return error.response()
    finally:
        if not isinstance(response, StreamingResponse):  # a stream counts until it ends
            metrics.in_flight -= 1


async def _complete(state: ServerState, body: CompletionRequest, request: Request) -> Response:
    """The answer to a checked request, or an APIError."""
    engine, metrics = state.engine, state.metrics
    job = _prepare(engine, body, state.served)
    timing = _Timing(metrics)
    if not engine.running:
        raise APIError(503, "the engine is not running", "service_unavailable", code="engine_unavailable")
    events = engine.stream(job.prompt_ids, job.params)
    try:
        first = await _unless_disconnected(request, events.__anext__())
    except _Disconnected:
        metrics.outcome("cancelled")
        return Response(status_code=499)
    except EngineError as error:
        raise APIError(503, str(error), "service_unavailable", code="engine_unavailable") from None
    except ValueError as error:  # the engine's own checks of the prompt
        raise _bad(str(error), "prompt") from None
    if isinstance(first, FinishEvent) and first.reason not in ("length", "stop"):
        raise finish_error(first)
    request_id = f"cmpl-{secrets.token_hex(12)}"
    # With a tokenizer, _decode always returns text.
    decode = cast("Callable[[list[int]], str]", engine._decode) if engine.tokenizer is not None else None
    pieces = _pieces(first, events, _Text(decode, job.stops), timing)
    if job.stream:
        return StreamingResponse(
            _sse(request_id, job, pieces, state.served, metrics), media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    try:
        text, ids, finish = await _unless_disconnected(request, _gather(pieces))
    except _Disconnected:
        metrics.outcome("cancelled")
        return Response(status_code=499)
    except _Failed as failed:
        raise finish_error(failed.event) from None
    metrics.outcome(finish)
    choice = choice_body(text, finish)
    if job.return_token_ids:
        choice |= {"prompt_token_ids": job.prompt_ids, "token_ids": ids}
    return JSONResponse(completion_body(request_id, int(time.time()), state.served, [choice]) | {"usage": _usage(job, len(ids))})


async def _stats(engine: Engine) -> dict | None:
    """The engine's stats(), or None when it is not running (or does not answer)."""
    if not engine.running:
        return None
    try:
        return await run_in_threadpool(engine.stats)
    except Exception:  # stopped while asked, or the loop did not answer within its timeout
        return None
