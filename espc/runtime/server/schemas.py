"""The body of `POST /v1/completions` and its checks, the bodies answered, and the OpenAPI
schema with the served model's limits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, cast

from fastapi import FastAPI
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError

from espc.runtime.engine import Engine, Prompt
from espc.runtime.sampling import SamplingParams
from espc.runtime.server.errors import APIError, _bad

_INT64 = 2**63 - 1
MAX_STOP_STRINGS = 4


def _integral(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


# A JSON integer: 3 or 3.0 (JSON Schema's integer), never true, "3" or 3.5.
Int = Annotated[int, BeforeValidator(_integral), Strict()]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool | None = Field(False, description="send a last chunk with the usage (and no choices)")


class CompletionRequest(BaseModel):
    """The body of `POST /v1/completions`: OpenAI's fields, and espc's extensions `top_k`,
    `stop_token_ids`, `ignore_eos` and `return_token_ids`. Fields espc does not implement are
    accepted with their neutral value only (`n` 1, `echo` false, no `logprobs`, penalties 0)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(description="the served model's name (GET /v1/models)")
    prompt: str | list[Int] | list[str] | list[list[Int]] = Field(
        description="text, or token ids; a list of one of those is one prompt (batches are not served)",
    )
    max_tokens: Int | None = Field(16, ge=1, description="tokens to generate at most; prompt + max_tokens <= max_context")
    temperature: float | None = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False, description="0: greedy")
    top_p: float | None = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False, description="nucleus sampling; 1: off")
    n: Int | None = Field(1, description="completions per prompt: only 1")
    best_of: Int | None = Field(None, description="only 1")
    stream: bool | None = Field(False, description="answer with server-sent events, one chunk per token")
    stream_options: StreamOptions | None = None
    seed: Int | None = Field(None, ge=-_INT64 - 1, le=_INT64, description="sampling seed: same seed, same tokens")
    stop: str | list[str] | None = Field(None, description="up to 4 strings that end the completion (not returned)")
    echo: bool | None = Field(False, description="only false")
    logprobs: Int | None = Field(None, description="not supported: only null")
    presence_penalty: float | None = Field(0.0, allow_inf_nan=False, description="only 0")
    frequency_penalty: float | None = Field(0.0, allow_inf_nan=False, description="only 0")
    logit_bias: dict[str, float] | None = Field(None, description="only empty")
    suffix: str | None = Field(None, description="only null")
    user: str | None = Field(None, description="accepted and ignored")
    # espc's extensions (vLLM spells them the same)
    top_k: Int | None = Field(0, ge=-1, description="sample from the k most likely tokens; 0 or -1: off")
    stop_token_ids: list[Int] | None = Field(None, description="token ids that end the completion (not returned)")
    ignore_eos: bool | None = Field(False, description="do not stop at the tokenizer's end-of-sequence token")
    return_token_ids: bool | None = Field(False, description="add prompt_token_ids and token_ids to each choice")


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
        ids = engine.encode(cast(Prompt, prompt))  # text or token ids: a list of one prompt was unwrapped above
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


def choice_body(text: str, finish_reason: str | None) -> dict:
    """One choice of a completion or of a stream's chunk: espc answers one, index 0."""
    return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}


def completion_body(request_id: str, created: int, model: str, choices: list[dict]) -> dict:
    """OpenAI's completion object, or one chunk of a stream, without its usage."""
    return {"id": request_id, "object": "text_completion", "created": created, "model": model, "choices": choices}


def _usage(job: _Job, generated: int) -> dict:
    prompt = len(job.prompt_ids)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


def openapi_schema(app: FastAPI, served: str, max_context: int, vocab: int) -> dict:
    """FastAPI's schema, with this server's model name and context length filled in."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)
        fields = schema["components"]["schemas"]["CompletionRequest"]["properties"]
        fields["model"]["enum"] = [served]
        # What the handler accepts beyond the field types (it answers 400 otherwise).
        constraints: dict[str, dict[str, Any]] = {
            "max_tokens": {"maximum": max_context},
            "n": {"minimum": 1, "maximum": 1}, "best_of": {"minimum": 1, "maximum": 1},
            "echo": {"enum": [False]}, "logprobs": {"minimum": 0, "maximum": 0},
            "presence_penalty": {"minimum": 0, "maximum": 0}, "frequency_penalty": {"minimum": 0, "maximum": 0},
            "logit_bias": {"maxProperties": 0}, "suffix": {"maxLength": 0},
            "stop": {"minLength": 1, "maxItems": MAX_STOP_STRINGS, "items": {"type": "string", "minLength": 1}},
        }
        token = {"type": "integer", "minimum": 0, "maximum": vocab - 1}
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
    assert app.openapi_schema is not None  # FastAPI.openapi keeps the schema it built there
    return app.openapi_schema


def _applies(keyword: str, json_type: str) -> bool:
    """Whether a JSON-schema keyword constrains values of the type."""
    return {
        "minimum": json_type in ("integer", "number"), "maximum": json_type in ("integer", "number"),
        "minLength": json_type == "string", "maxLength": json_type == "string",
        "maxItems": json_type == "array", "items": json_type == "array", "maxProperties": json_type == "object",
    }.get(keyword, True)
