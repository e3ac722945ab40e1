"""The endpoints, `GET /v1/models`, `GET /health`, `GET /metrics`, `POST /v1/completions`
and `POST /v1/chat/completions`, over the `ServerState` that `create_app` stores on
`app.state.server`."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any, cast

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from espc.runtime.driver import EngineError, FinishEvent, TokenEvent
from espc.runtime.engine import Engine
from espc.runtime.server.bodies import ChatFormat, ChoiceState, CompletionFormat, ResponseFormat, response_body
from espc.runtime.server.chat import ChatCompletionRequest, _prepare_chat
from espc.runtime.server.detokenize import _Text
from espc.runtime.server.errors import APIError, _bad, finish_error
from espc.runtime.server.metrics import CONTENT_TYPE_LATEST, ServerMetrics, _Timing
from espc.runtime.server.schemas import CompletionRequest, _Job, _prepare, _usage
from espc.runtime.server.streaming import _Disconnected, _Failed, _gather, _pieces, _sse, _unless_disconnected
from espc.runtime.tokenizer import ChatTemplate, TokenizerError, load_chat_template


@dataclass(frozen=True)
class ServerState:
    """What the endpoints share, stored on `app.state.server`."""

    engine: Engine  # started; its owner closes it
    served: str  # the model name requests must name
    created: int  # when the app was built: the model's `created` in /v1/models
    metrics: ServerMetrics

    loaded: dict[str, ChatTemplate] = field(default_factory=dict, repr=False, compare=False)  # the chat template, once read

    def chat_template(self) -> ChatTemplate:
        """The model's chat template, read on the first chat request; a checkpoint whose
        template cannot be read answers 400 to every chat request, naming the file."""
        if "chat" not in self.loaded:
            engine = self.engine
            try:
                self.loaded["chat"] = load_chat_template(engine.spec.model, engine.base_dir)
            except TokenizerError as error:
                raise _bad(f"this model's chat template cannot be used: {error}", "messages") from None
        return self.loaded["chat"]


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
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"], response_model=None, responses=_ERROR_RESPONSES)


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


async def prometheus(request: Request) -> Response:
    state = _state(request)
    stats = await _stats(state.engine)
    return Response(state.metrics.render(stats, state.engine.running), media_type=CONTENT_TYPE_LATEST)


async def completions(body: CompletionRequest, request: Request) -> Response:
    state = _state(request)
    return await _answer(state, request, lambda: _prepare(state.engine, body, state.served), _completion_format(state, body))


async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    state = _state(request)
    return await _answer(state, request, lambda: _prepare_chat(state.engine, state.chat_template(), body, state.served), ChatFormat(_token_text(state.engine)))


def _completion_format(state: ServerState, body: CompletionRequest) -> CompletionFormat:
    return CompletionFormat(_token_text(state.engine), bool(body.return_token_ids))


def _token_text(engine: Engine) -> Callable[[int], str]:
    """A token's text in logprobs: decoded alone, or "token_id:ID" without a tokenizer."""
    tokenizer = engine.tokenizer
    return (lambda token: tokenizer.decode([token])) if tokenizer is not None else (lambda token: f"token_id:{token}")


async def _answer(state: ServerState, request: Request, prepare: Callable[[], _Job], format_: ResponseFormat) -> Response:
    """Answer a request of either endpoint: check it (`prepare`), then serve its choices."""
    metrics = state.metrics
    metrics.in_flight.inc()
    response = None
    try:
        response = await _complete(state, prepare(), format_, request)
        return response
    except APIError as error:
        metrics.outcome("invalid" if error.status in (400, 404) else "rejected" if error.status == 429 or error.code == "unservable" else "error")
        return error.response()
    finally:
        if not isinstance(response, StreamingResponse):  # a stream counts until it ends
            metrics.in_flight.dec()


async def _first_events(request: Request, streams: list[AsyncGenerator]) -> list[TokenEvent | FinishEvent]:
    """Each choice's first event; a failure or a disconnect cancels every choice."""
    firsts = [asyncio.ensure_future(stream.__anext__()) for stream in streams]
    try:
        return await _unless_disconnected(request, asyncio.gather(*firsts))
    except BaseException:
        for first in firsts:
            first.cancel()
        await asyncio.gather(*firsts, return_exceptions=True)
        for stream in streams:
            await stream.aclose()
        raise


async def _complete(state: ServerState, job: _Job, format_: ResponseFormat, request: Request) -> Response:
    """The answer to a checked request, or an APIError."""
    engine, metrics = state.engine, state.metrics
    if not engine.running:
        raise APIError(503, "the engine is not running", "service_unavailable", code="engine_unavailable")
    choices = job.choices()
    timings = [_Timing(metrics) for _ in choices]  # TTFT counts from here
    streams = [engine.stream(prompt, params) for prompt, params in choices]
    try:
        firsts = await _first_events(request, streams)
    except _Disconnected:
        metrics.outcome("cancelled")
        return Response(status_code=499)
    except EngineError as error:
        raise APIError(503, str(error), "service_unavailable", code="engine_unavailable") from None
    except ValueError as error:  # the engine's own checks of the prompt
        raise _bad(str(error), "prompt") from None
    failed = [first for first in firsts if isinstance(first, FinishEvent) and first.reason not in ("length", "stop")]
    if failed:
        for stream in streams:
            await stream.aclose()
        raise finish_error(failed[0])
    request_id = f"{format_.id_prefix}{secrets.token_hex(12)}"
    # With a tokenizer, _decode always returns text.
    decode = cast("Callable[[list[int]], str]", engine._decode) if engine.tokenizer is not None else None
    states = [ChoiceState(index, prompt) for index, (prompt, _) in enumerate(choices)]
    pieces = [
        _pieces(first, stream, _Text(decode, job.stops), timing, choice, engine.cancel)
        for first, stream, timing, choice in zip(firsts, streams, timings, states)
    ]
    if job.stream:
        return StreamingResponse(
            _sse(request_id, job, format_, states, pieces, streams, state.served, metrics), media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    try:
        await _unless_disconnected(request, _gather(states, pieces, metrics))
    except _Disconnected:
        metrics.outcome("cancelled")
        return Response(status_code=499)
    except _Failed as failed_choice:
        raise finish_error(failed_choice.event) from None
    finally:
        for stream in (*pieces, *streams):  # the engine's streams too: a choice whose piece never started
            await stream.aclose()
    wants_logprobs = job.params.logprobs is not None
    bodies = [
        format_.choice(choice, "".join(choice.text), choice.ids, choice.logprobs if wants_logprobs else None, choice.finish or "length", streamed=False)
        for choice in states
    ]
    usage = _usage(job, states)
    return JSONResponse(response_body(format_, request_id, int(time.time()), state.served, bodies, streamed=False) | {"usage": usage})


async def _stats(engine: Engine) -> dict | None:
    """The engine's stats(), or None when it is not running (or does not answer)."""
    if not engine.running:
        return None
    try:
        return await run_in_threadpool(engine.stats)
    except Exception:  # stopped while asked, or the loop did not answer within its timeout
        return None
