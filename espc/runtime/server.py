"""`espc serve`: an OpenAI-compatible HTTP API over `espc.Engine` (FastAPI + uvicorn).

    espc serve build/tiny --port 8000
    curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "tiny-llama-gqa", "prompt": "Hello", "max_tokens": 8}'

Endpoints: `POST /v1/completions` (a text or token-id prompt; `"stream": true` answers with
server-sent events, `data: {chunk}` lines and a final `data: [DONE]`), `GET /v1/models`,
`GET /health` (503 while no instance is in service) and `GET /metrics` (Prometheus text).

Errors carry OpenAI's body, `{"error": {"message", "type", "param", "code"}}`:

- 400: malformed JSON, an unknown field, a wrong type or range, a prompt the model cannot
  take (empty, unknown token ids, longer than `max_context` with its `max_tokens`), a value
  espc does not implement (`n` > 1, `echo`, `logprobs`, penalties, batches of prompts);
- 404: another model than the one served;
- 429: admission control refused the request because the server is overloaded (the spec's
  `[serving]` section: too many queued requests, or a TTFT that cannot meet the SLO);
  it carries `Retry-After`;
- 503: no instance group in service can hold the request's KV, or the engine is down or
  failed the request (a worker died under it). A stream that fails after its first token
  ends with one `data: {"error": ...}` event instead of `[DONE]`.

A client that disconnects cancels its request and frees its KV: while it waits for its
first token, while a non-streaming completion is generated, and while it is streamed.

`create_app(engine)` builds the app over a started Engine that the caller owns, to serve or
to mount inside another FastAPI app; `ServerThread` serves an app from a background thread
(tests, benchmarks, notebooks); `serve()` is what `espc serve` runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from espc._version import __version__
from espc.runtime.driver import EngineError, FinishEvent, TokenEvent
from espc.runtime.engine import Engine
from espc.runtime.sampling import SamplingParams

logger = logging.getLogger("espc.server")

_INT64 = 2**63 - 1
# Admission control's rejection codes (espc.runtime.driver.Admission): overload is 429,
# a request no instance group can hold is 503.
OVERLOAD_CODES = frozenset({"queue_full", "ttft_unreachable"})
RETRY_AFTER_S = 1
MAX_STOP_STRINGS = 4


def _integral(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


# A JSON integer: 3 or 3.0 (JSON Schema's integer), never true, "3" or 3.5.
Int = Annotated[int, BeforeValidator(_integral), Strict()]


# ------------------------------------------------------------------------------ requests


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: Optional[bool] = Field(False, description="send a last chunk with the usage (and no choices)")


class CompletionRequest(BaseModel):
    """The body of `POST /v1/completions`: OpenAI's fields, and espc's extensions `top_k`,
    `stop_token_ids`, `ignore_eos` and `return_token_ids`. Fields espc does not implement are
    accepted with their neutral value only (`n` 1, `echo` false, no `logprobs`, penalties 0)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(description="the served model's name (GET /v1/models)")
    prompt: Union[str, list[Int], list[str], list[list[Int]]] = Field(
        description="text, or token ids; a list of one of those is one prompt (batches are not served)",
    )
    max_tokens: Optional[Int] = Field(16, ge=1, description="tokens to generate at most; prompt + max_tokens <= max_context")
    temperature: Optional[float] = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False, description="0: greedy")
    top_p: Optional[float] = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False, description="nucleus sampling; 1: off")
    n: Optional[Int] = Field(1, description="completions per prompt: only 1")
    best_of: Optional[Int] = Field(None, description="only 1")
    stream: Optional[bool] = Field(False, description="answer with server-sent events, one chunk per token")
    stream_options: Optional[StreamOptions] = None
    seed: Optional[Int] = Field(None, ge=-_INT64 - 1, le=_INT64, description="sampling seed: same seed, same tokens")
    stop: Union[str, list[str], None] = Field(None, description="up to 4 strings that end the completion (not returned)")
    echo: Optional[bool] = Field(False, description="only false")
    logprobs: Optional[Int] = Field(None, description="not supported: only null")
    presence_penalty: Optional[float] = Field(0.0, allow_inf_nan=False, description="only 0")
    frequency_penalty: Optional[float] = Field(0.0, allow_inf_nan=False, description="only 0")
    logit_bias: Optional[dict[str, float]] = Field(None, description="only empty")
    suffix: Optional[str] = Field(None, description="only null")
    user: Optional[str] = Field(None, description="accepted and ignored")
    # espc's extensions (vLLM spells them the same)
    top_k: Optional[Int] = Field(0, ge=-1, description="sample from the k most likely tokens; 0 or -1: off")
    stop_token_ids: Optional[list[Int]] = Field(None, description="token ids that end the completion (not returned)")
    ignore_eos: Optional[bool] = Field(False, description="do not stop at the tokenizer's end-of-sequence token")
    return_token_ids: Optional[bool] = Field(False, description="add prompt_token_ids and token_ids to each choice")


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


@dataclass(frozen=True)
class _Job:
    prompt_ids: list[int]
    params: SamplingParams
    stops: tuple[str, ...]
    stream: bool
    include_usage: bool
    return_token_ids: bool


def _prepare(engine: Engine, body: CompletionRequest, served: str) -> _Job:
    """Check everything the engine would refuse, with the field to blame, before submitting."""
    if body.model != served:
        raise APIError(404, f"the model {body.model!r} does not exist; this server serves {served!r}", param="model", code="model_not_found")
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        if len(prompt) > 1:
            raise _bad(f"batches of prompts are not supported: got {len(prompt)} prompts; send one request per prompt", "prompt")
        prompt = prompt[0]
    unsupported = [
        (body.n not in (None, 1), "n", "only n = 1 is supported"),
        (body.best_of not in (None, 1), "best_of", "only best_of = 1 is supported"),
        (bool(body.echo), "echo", "echo is not supported"),
        (body.logprobs not in (None, 0), "logprobs", "logprobs are not supported"),
        (body.presence_penalty not in (None, 0), "presence_penalty", "presence_penalty is not supported: only 0"),
        (body.frequency_penalty not in (None, 0), "frequency_penalty", "frequency_penalty is not supported: only 0"),
        (bool(body.logit_bias), "logit_bias", "logit_bias is not supported"),
        (bool(body.suffix), "suffix", "suffix is not supported"),
    ]
    for refused, param, message in unsupported:
        if refused:
            raise _bad(message, param)
    stops = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if len(stops) > MAX_STOP_STRINGS:
        raise _bad(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}", "stop")
    if any(not stop for stop in stops):
        raise _bad("stop strings must not be empty", "stop")
    tokenizer = engine.tokenizer
    if stops and tokenizer is None:
        raise _bad("stop strings need a tokenizer, and this model has none; use stop_token_ids", "stop")
    try:
        ids = engine.encode(prompt)
    except ValueError as error:
        raise _bad(str(error), "prompt") from None
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    limit = engine.spec.model.max_context
    if len(ids) + max_tokens > limit:
        raise _bad(
            f"this model's maximum context length is {limit} tokens; the prompt has {len(ids)} and max_tokens asks "
            f"for {max_tokens} more ({len(ids) + max_tokens} in all)",
            "max_tokens" if len(ids) < limit else "prompt", "context_length_exceeded",
        )
    stop_ids = list(body.stop_token_ids or ())
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and not body.ignore_eos and eos not in stop_ids:
        stop_ids.append(eos)
    try:
        params = SamplingParams(
            max_new_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
            top_k=max(0, body.top_k or 0), top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed,
            stop_token_ids=tuple(stop_ids),
        )
    except ValidationError as error:
        first = error.errors()[0]
        field = {"max_new_tokens": "max_tokens"}.get(str(first["loc"][0]), str(first["loc"][0]))
        raise _bad(f"{field}: {first['msg']}", field) from None
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    if body.stream_options is not None and not body.stream:
        raise _bad("stream_options is only allowed with stream = true", "stream_options")
    return _Job(ids, params, stops, bool(body.stream), include_usage, bool(body.return_token_ids))


# ---------------------------------------------------------------------------- detokenizing


class _Text:
    """Incremental detokenizing and stop strings. Each step decodes only the ids since the
    last clean boundary, with the previous step's ids as context (text-generation-inference's
    two offsets), so a long completion costs linear time. Text that may still change (an
    incomplete character) or may begin a stop string is held back until it is certain."""

    def __init__(self, decode: Callable[[list[int]], str] | None, stops: Sequence[str]):
        self.decode = decode
        self.stops = tuple(stops)
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] decode to the context of the next step
        self.pending = ""  # decoded, not sent

    def add(self, token: int) -> tuple[str, bool]:
        """The new text that is safe to send, and whether a stop string ended the completion."""
        self.ids.append(token)
        if self.decode is None:
            return "", False
        before, after = self.decode(self.ids[self.prefix:self.read]), self.decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.pending += after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
        return self._release(final=False)

    def rest(self) -> tuple[str, bool]:
        """At the end: everything not sent yet (an incomplete character as U+FFFD), cut at a
        stop string if one is in it."""
        if self.decode is not None and self.read < len(self.ids):
            before, after = self.decode(self.ids[self.prefix:self.read]), self.decode(self.ids[self.prefix:])
            self.pending += after[len(before):]
            self.prefix = self.read = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> tuple[str, bool]:
        text = self.pending
        hits = [index for index in (text.find(stop) for stop in self.stops) if index >= 0]
        if hits:
            self.pending = ""
            return text[:min(hits)], True
        keep = 0 if final else max((_overlap(text, stop) for stop in self.stops), default=0)
        self.pending = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False


def _overlap(text: str, stop: str) -> int:
    """The length of the longest end of `text` that begins `stop` (shorter than `stop`)."""
    for size in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:size]):
            return size
    return 0


class _Failed(Exception):
    def __init__(self, event: FinishEvent):
        super().__init__(event.error)
        self.event = event


class _Disconnected(Exception):
    pass


async def _disconnect(request: Request) -> None:
    """Returns when the client has gone (after the request body was read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable):
    """`await work`, cancelled (raising _Disconnected) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watcher.cancel()
        raise
    if task in done:
        watcher.cancel()
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    raise _Disconnected


# ----------------------------------------------------------------------------- metrics


class Histogram:
    """A Prometheus histogram (cumulative buckets, sum, count)."""

    def __init__(self, name: str, help_: str, buckets: Sequence[float]):
        self.name, self.help, self.buckets = name, help_, tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for index, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[index] += 1
        self.sum += value
        self.count += 1

    def lines(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        out += [f'{self.name}_bucket{{le="{bound:g}"}} {count}' for bound, count in zip(self.buckets, self.counts)]
        out += [f'{self.name}_bucket{{le="+Inf"}} {self.count}', f"{self.name}_sum {self.sum!r}", f"{self.name}_count {self.count}"]
        return out


class ServerMetrics:
    """What the server observes itself (latencies as its clients see them, outcomes); the
    engine's state comes from `Engine.stats()` when /metrics is read."""

    def __init__(self) -> None:
        self.ttft = Histogram(
            "espc_time_to_first_token_seconds", "Time from a completion request's arrival to its first token.",
            (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.tpot = Histogram(
            "espc_time_per_output_token_seconds", "Mean time between a request's tokens after the first (requests with two or more).",
            (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.outcomes: dict[str, int] = {}
        self.in_flight = 0

    def outcome(self, what: str) -> None:
        self.outcomes[what] = self.outcomes.get(what, 0) + 1

    def render(self, stats: dict | None, running: bool) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: Sequence[tuple[str, float]]) -> None:
            lines.extend((f"# HELP {name} {help_}", f"# TYPE {name} {kind}"))
            lines.extend(f"{name}{labels} {value:g}" if isinstance(value, int) else f"{name}{labels} {value!r}" for labels, value in samples)

        metric("espc_up", "gauge", "1 while the engine runs.", [("", int(running))])
        metric("espc_http_requests_in_flight", "gauge", "Completion requests being answered (streams until they end).", [("", self.in_flight)])
        metric(
            "espc_requests_total", "counter", "Completion requests by outcome (finish reason, rejected, error, cancelled, invalid).",
            [(f'{{outcome="{what}"}}', count) for what, count in sorted(self.outcomes.items())],
        )
        lines += self.ttft.lines() + self.tpot.lines()
        if stats is not None:
            instances = range(stats["instances"])
            used, capacity = stats["kv_used_tokens"], stats["kv_capacity_tokens"]
            metric("espc_queue_length", "gauge", "Requests waiting for their first prefill.", [("", stats["queued"] + stats["waiting"])])
            metric("espc_requests_running", "gauge", "Requests prefilled or decoding.", [("", stats["running"])])
            metric("espc_instances", "gauge", "Elastic instances of the deployment.", [("", stats["instances"])])
            metric("espc_instances_in_service", "gauge", "Instances whose worker has not failed.", [("", stats["in_service"])])
            metric(
                "espc_instance_dop", "gauge", "Degree of parallelism of the batch each instance runs (0: idle).",
                [(f'{{instance="{i}"}}', stats["dop"][i]) for i in instances],
            )
            metric("espc_kv_used_tokens", "gauge", "KV slots in use per instance.", [(f'{{instance="{i}"}}', used[i]) for i in instances])
            metric("espc_kv_capacity_tokens", "gauge", "KV slots per instance.", [(f'{{instance="{i}"}}', capacity[i]) for i in instances])
            metric(
                "espc_kv_usage_ratio", "gauge", "KV slots in use over all slots.",
                [("", sum(used) / sum(capacity) if sum(capacity) else 0.0)],
            )
            metric("espc_iterations_total", "counter", "Scheduling iterations dispatched.", [("", stats["iterations"])])
            metric("espc_migrations_total", "counter", "KV migrations between instances.", [("", stats["migrations"])])
            metric("espc_migrated_bytes_total", "counter", "KV bytes moved by migrations.", [("", stats["migrated_bytes"])])
            codes = {"queue_full": 0, "ttft_unreachable": 0, "unservable": 0} | stats["rejected"]
            metric(
                "espc_rejected_requests_total", "counter", "Requests refused by admission control, by reason.",
                [(f'{{code="{code}"}}', count) for code, count in sorted(codes.items())],
            )
            metric("espc_worker_failures_total", "counter", "Workers taken out of service.", [("", len(stats["failures"]))])
        return "\n".join(lines) + "\n"


class _Timing:
    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics
        self.start = time.monotonic()
        self.first: float | None = None
        self.last: float | None = None
        self.tokens = 0

    def token(self) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = now
            self.metrics.ttft.observe(now - self.start)
        self.last = now
        self.tokens += 1

    def done(self) -> None:
        if self.tokens >= 2:
            self.metrics.tpot.observe((self.last - self.first) / (self.tokens - 1))


# --------------------------------------------------------------------------------- app


_UNIONS = {
    "prompt": "prompt must be a string, a list of token ids, or a list holding one of those",
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


async def _pieces(first: TokenEvent | FinishEvent, events: AsyncIterator, text: _Text, timing: _Timing):
    """(text, token ids, finish reason) deltas of one completion, the finish reason set on the
    last; raises _Failed when the engine ends the request otherwise."""
    event = first
    try:
        while True:
            if isinstance(event, TokenEvent):
                timing.token()
                piece, stopped = text.add(event.token)
                if stopped:
                    yield piece, [event.token], "stop"
                    return
                yield piece, [event.token], None
            elif event.reason in ("length", "stop"):
                piece, stopped = text.rest()
                yield piece, [], "stop" if stopped else event.reason
                return
            else:
                raise _Failed(event)
            event = await events.__anext__()
    finally:
        timing.done()
        await events.aclose()  # a stop string ends it early: cancel it, free its KV


def create_app(engine: Engine, *, model_name: str | None = None) -> FastAPI:
    """The OpenAI-compatible app over `engine` (started; the caller starts and closes it)."""
    served = model_name or engine.spec.model.name
    created = int(time.time())
    metrics = ServerMetrics()
    app = FastAPI(
        title="espc", version=__version__,
        description=f"OpenAI-compatible completions of {served}, served by espc's elastic sequence-parallel runtime.",
    )
    app.state.engine, app.state.metrics = engine, metrics

    def openapi() -> dict:
        """FastAPI's schema, with this server's model name and context length filled in."""
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            fields = schema["components"]["schemas"]["CompletionRequest"]["properties"]
            fields["model"]["enum"] = [served]
            # What the handler accepts beyond the field types (it answers 400 otherwise).
            constraints = {
                "max_tokens": {"maximum": engine.spec.model.max_context},
                "n": {"minimum": 1, "maximum": 1}, "best_of": {"minimum": 1, "maximum": 1},
                "echo": {"enum": [False]}, "logprobs": {"minimum": 0, "maximum": 0},
                "presence_penalty": {"minimum": 0, "maximum": 0}, "frequency_penalty": {"minimum": 0, "maximum": 0},
                "logit_bias": {"maxProperties": 0}, "suffix": {"maxLength": 0},
                "stop": {"minLength": 1, "maxItems": MAX_STOP_STRINGS, "items": {"type": "string", "minLength": 1}},
            }
            token = {"type": "integer", "minimum": 0, "maximum": engine.spec.model.vocab - 1}
            fields["prompt"]["anyOf"] = [
                {"type": "string", "minLength": 1},
                {"type": "array", "items": token, "minItems": 1},
                {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": 1},
                {"type": "array", "items": {"type": "array", "items": token, "minItems": 1}, "minItems": 1, "maxItems": 1},
            ]
            constraints["stop_token_ids"] = {"items": {"type": "integer", "minimum": 0}}
            for name, extra in constraints.items():
                for option in fields[name].get("anyOf", [fields[name]]):
                    if option.get("type") != "null":
                        option.update({key: value for key, value in extra.items() if _applies(key, option["type"])})
        return app.openapi_schema

    app.openapi = openapi

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
        metrics.outcome("invalid")
        return APIError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return APIError(error.status_code, str(error.detail), kind, headers=getattr(error, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, error: Exception):
        logger.exception("unhandled error answering %s", request.url.path)
        return APIError(500, f"internal error: {type(error).__name__}: {error}", "internal_error").response()

    error_responses: dict[int | str, dict[str, Any]] = {
        400: {"description": "invalid request (OpenAI error body)"},
        404: {"description": "unknown model"},
        429: {"description": "overloaded: refused by admission control; retry later"},
        503: {"description": "no instance can serve it, or the engine is down or failed it"},
    }

    @app.get("/v1/models")
    async def models() -> dict:
        return {
            "object": "list",
            "data": [{
                "id": served, "object": "model", "created": created, "owned_by": "espc",
                "max_model_len": engine.spec.model.max_context,
            }],
        }

    @app.get("/health", response_model=None, responses={503: {"description": "no instance in service"}})
    async def health() -> JSONResponse:
        stats = await _stats(engine)
        if stats is None or stats["in_service"] == 0:
            return JSONResponse({"status": "unavailable", "in_service": 0 if stats is None else stats["in_service"]}, status_code=503)
        return JSONResponse({"status": "ok", "instances": stats["instances"], "in_service": stats["in_service"]})

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> PlainTextResponse:
        stats = await _stats(engine)
        return PlainTextResponse(metrics.render(stats, engine.running), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/completions", response_model=None, responses=error_responses)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        metrics.in_flight += 1
        response = None
        try:
            response = await _complete(body, request)
            return response
        except APIError as error:
            metrics.outcome("invalid" if error.status in (400, 404) else "rejected" if error.status == 429 or error.code == "unservable" else "error")
            return error.response()
        finally:
            if not isinstance(response, StreamingResponse):  # a stream counts until it ends
                metrics.in_flight -= 1

    async def _complete(body: CompletionRequest, request: Request) -> Response:
        job = _prepare(engine, body, served)
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
        decode = engine._decode if engine.tokenizer is not None else None
        pieces = _pieces(first, events, _Text(decode, job.stops), timing)
        if job.stream:
            return StreamingResponse(
                _sse(request_id, job, pieces), media_type="text/event-stream",
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
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
        if job.return_token_ids:
            choice |= {"prompt_token_ids": job.prompt_ids, "token_ids": ids}
        return JSONResponse({
            "id": request_id, "object": "text_completion", "created": int(time.time()), "model": served,
            "choices": [choice], "usage": _usage(job, len(ids)),
        })

    async def _gather(pieces) -> tuple[str, list[int], str]:
        text, ids, finish = [], [], "length"
        async for piece, tokens, reason in pieces:
            text.append(piece)
            ids += tokens
            finish = reason or finish
        return "".join(text), ids, finish

    async def _sse(request_id: str, job: _Job, pieces) -> AsyncIterator[str]:
        created_s = int(time.time())
        generated = 0
        finished = False

        def chunk(choices: list, usage: dict | None = None) -> str:
            data = {"id": request_id, "object": "text_completion", "created": created_s, "model": served, "choices": choices}
            if job.include_usage:
                data["usage"] = usage
            return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"

        try:
            async for piece, tokens, reason in pieces:
                generated += len(tokens)
                if not piece and reason is None and not job.return_token_ids:
                    continue  # text held back (an incomplete character, a possible stop string)
                choice = {"text": piece, "index": 0, "logprobs": None, "finish_reason": reason}
                if job.return_token_ids:
                    choice["token_ids"] = tokens
                    if generated == len(tokens):
                        choice["prompt_token_ids"] = job.prompt_ids
                yield chunk([choice])
                if reason is not None:
                    finished = True
                    metrics.outcome(reason)
            if job.include_usage:
                yield chunk([], _usage(job, generated))
            yield "data: [DONE]\n\n"
        except _Failed as failed:
            finished = True
            error = finish_error(failed.event)
            metrics.outcome("error")
            yield f"data: {json.dumps(error.body(), ensure_ascii=False)}\n\n"
        finally:
            metrics.in_flight -= 1
            if not finished:  # the client went away: leaving `pieces` cancelled the request
                metrics.outcome("cancelled")
            await pieces.aclose()

    return app


def _applies(keyword: str, json_type: str) -> bool:
    """Whether a JSON-schema keyword constrains values of the type."""
    return {
        "minimum": json_type in ("integer", "number"), "maximum": json_type in ("integer", "number"),
        "minLength": json_type == "string", "maxLength": json_type == "string",
        "maxItems": json_type == "array", "items": json_type == "array", "maxProperties": json_type == "object",
    }.get(keyword, True)


def _usage(job: _Job, generated: int) -> dict:
    prompt = len(job.prompt_ids)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


async def _stats(engine: Engine) -> dict | None:
    """The engine's stats(), or None when it is not running (or does not answer)."""
    if not engine.running:
        return None
    try:
        return await run_in_threadpool(engine.stats)
    except Exception:  # stopped while asked, or the loop did not answer within its timeout
        return None


# ------------------------------------------------------------------------------ serving


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 picks a free one. Raises OSError."""
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = info[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _config(app: FastAPI, sock: socket.socket, log_level: str):
    import uvicorn

    host, port = sock.getsockname()[:2]
    return uvicorn.Config(
        app, host=host, port=port, log_level=log_level, lifespan="off", timeout_graceful_shutdown=5,
        timeout_keep_alive=30,
    )


class ServerThread:
    """Serve an app with uvicorn from a background thread (tests, benchmarks, notebooks):

        with ServerThread(create_app(engine)) as server:
            httpx.get(server.url + "/health")
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.socket = bind(host, port)
        self.server = uvicorn.Server(_config(app, self.socket, log_level))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True, name="espc-http")
        host, port = self.socket.getsockname()[:2]
        self.url = f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.socket.close()


def terminate_as_interrupt() -> None:
    """Make SIGTERM raise KeyboardInterrupt in the main thread, as Ctrl-C does, so that the
    engine's `with` block closes the workers. uvicorn shuts down gracefully on SIGTERM and
    then raises the signal again; with the default handler that would kill the process and
    leave the worker processes behind."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def serve(
    engine: Engine, sock: socket.socket, *, model_name: str | None = None, log_level: str = "info",
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve `engine` (started) on a bound socket until Ctrl-C or SIGTERM, which end in a
    graceful shutdown and then KeyboardInterrupt (close the engine on the way out); what
    `espc serve` runs."""
    import uvicorn

    app = create_app(engine, model_name=model_name)
    server = uvicorn.Server(_config(app, sock, log_level))
    terminate_as_interrupt()
    if on_ready is not None:
        host, port = sock.getsockname()[:2]
        on_ready(f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}")
    server.run(sockets=[sock])
