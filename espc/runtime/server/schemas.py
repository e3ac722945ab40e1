"""The body of `POST /v1/completions` and its checks (the fields it shares with chat
completions, `espc.runtime.server.chat`), the checked request (`_Job`), and the OpenAPI
schema with the served model's limits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, cast

from fastapi import FastAPI
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError

from espc.runtime.engine import Engine, Prompt
from espc.runtime.sampling import MAX_LOGPROBS, SamplingParams
from espc.runtime.server.bodies import ChoiceState
from espc.runtime.server.errors import APIError, _bad

_INT64 = 2**63 - 1
MAX_STOP_STRINGS = 4
MAX_N = 16  # choices per prompt
MAX_CHOICES = 64  # choices per request: prompts x n


def _integral(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


# A JSON integer: 3 or 3.0 (JSON Schema's integer), never true, "3" or 3.5.
Int = Annotated[int, BeforeValidator(_integral), Strict()]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool | None = Field(False, description="send a last chunk with the usage (and no choices)")


class SamplingFields(BaseModel):
    """The fields completions and chat completions share: OpenAI's, and espc's extensions
    `top_k`, `stop_token_ids` and `ignore_eos` (vLLM spells them the same). Fields espc does
    not implement are accepted with their neutral value only (penalties 0, no logit_bias)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(description="the served model's name (GET /v1/models)")
    temperature: float | None = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False, description="0: greedy")
    top_p: float | None = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False, description="nucleus sampling; 1: off")
    n: Int | None = Field(
        1, ge=1, le=MAX_N, description="completions per prompt; choice i samples with seed + i (see `seed`)",
    )
    stream: bool | None = Field(False, description="answer with server-sent events, one chunk per token")
    stream_options: StreamOptions | None = None
    seed: Int | None = Field(
        None, ge=-_INT64 - 1, le=_INT64,
        description="sampling seed: same seed, same tokens; choice i of the answer samples with seed + i",
    )
    stop: str | list[str] | None = Field(None, description="up to 4 strings that end the completion (not returned)")
    presence_penalty: float | None = Field(0.0, allow_inf_nan=False, description="only 0")
    frequency_penalty: float | None = Field(0.0, allow_inf_nan=False, description="only 0")
    logit_bias: dict[str, float] | None = Field(None, description="only empty")
    user: str | None = Field(None, description="accepted and ignored")
    top_k: Int | None = Field(0, ge=-1, description="sample from the k most likely tokens; 0 or -1: off")
    stop_token_ids: list[Int] | None = Field(None, description="token ids that end the completion (not returned)")
    ignore_eos: bool | None = Field(False, description="do not stop at the tokenizer's end-of-sequence token")


class CompletionRequest(SamplingFields):
    """The body of `POST /v1/completions`, with espc's extension `return_token_ids`. A list of
    prompts is answered with n choices per prompt, prompt by prompt (choice index = prompt
    index x n + i)."""

    prompt: str | list[Int] | list[str] | list[list[Int]] = Field(
        description="text, or token ids; or a list of texts or of token-id lists (one choice per prompt and n)",
    )
    max_tokens: Int | None = Field(16, ge=1, description="tokens to generate at most; prompt + max_tokens <= max_context")
    best_of: Int | None = Field(None, description="only 1")
    echo: bool | None = Field(False, description="only false")
    logprobs: Int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="each token's log-probability and the k most likely tokens' (k <= 20)",
    )
    suffix: str | None = Field(None, description="only null")
    return_token_ids: bool | None = Field(False, description="add prompt_token_ids and token_ids to each choice")


@dataclass(frozen=True)
class _Job:
    """A checked request: the engine requests it makes (one per choice) and how to answer."""

    prompts: list[list[int]]
    n: int
    params: SamplingParams  # seed: the request's, or None (the engine picks one per choice)
    stops: tuple[str, ...]
    stream: bool
    include_usage: bool
    return_token_ids: bool = False

    def choices(self) -> list[tuple[list[int], SamplingParams]]:
        """(prompt ids, params) of each choice, in index order: n per prompt, choice i with
        the request's seed + i."""
        seed = self.params.seed
        return [
            (prompt, self.params if seed is None else self.params.model_copy(update={"seed": seed + index}))
            for index, prompt in enumerate(prompt for prompt in self.prompts for _ in range(self.n))
        ]


def _check_model(body: SamplingFields, served: str) -> None:
    if body.model != served:
        raise APIError(404, f"the model {body.model!r} does not exist; this server serves {served!r}", param="model", code="model_not_found")


def _refuse_unsupported(unsupported: list[tuple[bool, str, str]]) -> None:
    for refused, param, message in unsupported:
        if refused:
            raise _bad(message, param)


def _job(
    engine: Engine, body: SamplingFields, prompts: list[list[int]], max_tokens: int | None, max_param: str,
    logprobs: int | None, return_token_ids: bool = False, prompt_param: str = "prompt",
) -> _Job:
    """What completions and chat check alike; `max_tokens` None: the rest of the context.
    `max_param` and `prompt_param` name the fields an error blames."""
    _refuse_unsupported([
        (body.presence_penalty not in (None, 0), "presence_penalty", "presence_penalty is not supported: only 0"),
        (body.frequency_penalty not in (None, 0), "frequency_penalty", "frequency_penalty is not supported: only 0"),
        (bool(body.logit_bias), "logit_bias", "logit_bias is not supported"),
    ])
    n = 1 if body.n is None else body.n
    if len(prompts) * n > MAX_CHOICES:
        raise _bad(f"{len(prompts)} prompts x n = {n} asks for {len(prompts) * n} choices; at most {MAX_CHOICES}", "n")
    stops = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if len(stops) > MAX_STOP_STRINGS:
        raise _bad(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}", "stop")
    if any(not stop for stop in stops):
        raise _bad("stop strings must not be empty", "stop")
    tokenizer = engine.tokenizer
    if stops and tokenizer is None:
        raise _bad("stop strings need a tokenizer, and this model has none; use stop_token_ids", "stop")
    limit = engine.spec.model.max_context
    longest = max(len(ids) for ids in prompts)
    if max_tokens is None:
        max_tokens = limit - longest
        if max_tokens < 1:
            raise _bad(
                f"this model's maximum context length is {limit} tokens; the prompt has {longest}, which leaves no room "
                "for a completion", prompt_param, "context_length_exceeded",
            )
    if longest + max_tokens > limit:
        raise _bad(
            f"this model's maximum context length is {limit} tokens; the prompt has {longest} and {max_param} asks "
            f"for {max_tokens} more ({longest + max_tokens} in all)",
            max_param if longest < limit else prompt_param, "context_length_exceeded",
        )
    stop_ids = list(body.stop_token_ids or ())
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and not body.ignore_eos and eos not in stop_ids:
        stop_ids.append(eos)
    try:
        params = SamplingParams(
            max_new_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
            top_k=max(0, body.top_k or 0), top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed,
            stop_token_ids=tuple(stop_ids), logprobs=logprobs,
        )
    except ValidationError as error:
        first = error.errors()[0]
        field = {"max_new_tokens": max_param}.get(str(first["loc"][0]), str(first["loc"][0]))
        raise _bad(f"{field}: {first['msg']}", field) from None
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    if body.stream_options is not None and not body.stream:
        raise _bad("stream_options is only allowed with stream = true", "stream_options")
    return _Job(prompts, n, params, stops, bool(body.stream), include_usage, return_token_ids)


def _prepare(engine: Engine, body: CompletionRequest, served: str) -> _Job:
    """Check everything the engine would refuse, with the field to blame, before submitting."""
    _check_model(body, served)
    _refuse_unsupported([
        (body.best_of not in (None, 1), "best_of", "only best_of = 1 is supported"),
        (bool(body.echo), "echo", "echo is not supported"),
        (bool(body.suffix), "suffix", "suffix is not supported"),
    ])
    prompt = body.prompt
    batch = isinstance(prompt, list) and bool(prompt) and not isinstance(prompt[0], int)
    texts_or_ids = cast("list[Prompt]", prompt if batch else [prompt])
    prompts = []
    for index, one in enumerate(texts_or_ids):
        try:
            prompts.append(engine.encode(one))
        except ValueError as error:
            raise _bad(f"prompt {index}: {error}" if batch else str(error), "prompt") from None
    return _job(engine, body, prompts, 16 if body.max_tokens is None else body.max_tokens, "max_tokens", body.logprobs, bool(body.return_token_ids))


def _usage(job: _Job, states: Sequence[ChoiceState]) -> dict:
    """OpenAI's usage: each prompt counted once (whatever n), every choice's tokens, and in
    `prompt_tokens_details.cached_tokens` the prompt tokens the prefix cache served, each
    prompt counted once too: those of its first choice, whose prompt `prompt_tokens` counts
    (the other choices are prefilled beside it, wherever the scheduler places them)."""
    prompt = sum(len(ids) for ids in job.prompts)
    generated = sum(len(state.ids) for state in states)
    cached = sum(states[index * job.n].cached_tokens for index in range(len(job.prompts)))
    return {
        "prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def openapi_schema(app: FastAPI, served: str, max_context: int, vocab: int) -> dict:
    """FastAPI's schema, with this server's model name and context length filled in, and what
    the handlers accept beyond the field types (they answer 400 otherwise)."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)
        shared: dict[str, dict[str, Any]] = {
            "model": {"enum": [served]},
            "presence_penalty": {"minimum": 0, "maximum": 0}, "frequency_penalty": {"minimum": 0, "maximum": 0},
            "logit_bias": {"maxProperties": 0},
            "stop": {"minLength": 1, "maxItems": MAX_STOP_STRINGS, "items": {"type": "string", "minLength": 1}},
            "stop_token_ids": {"items": {"type": "integer", "minimum": 0}},
        }
        token = {"type": "integer", "minimum": 0, "maximum": vocab - 1}
        per_request: dict[str, dict[str, dict[str, Any]]] = {
            "CompletionRequest": shared | {
                "max_tokens": {"maximum": max_context}, "best_of": {"minimum": 1, "maximum": 1}, "echo": {"enum": [False]},
                "suffix": {"maxLength": 0},
                "prompt": {"anyOf": [
                    {"type": "string", "minLength": 1},
                    {"type": "array", "items": token, "minItems": 1},
                    {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": MAX_CHOICES},
                    {"type": "array", "items": {"type": "array", "items": token, "minItems": 1}, "minItems": 1, "maxItems": MAX_CHOICES},
                ]},
            },
            "ChatCompletionRequest": shared | {
                "max_tokens": {"maximum": max_context}, "max_completion_tokens": {"maximum": max_context},
            },
        }
        for name, constraints in per_request.items():
            fields = schema["components"]["schemas"][name]["properties"]
            for field, extra in constraints.items():
                if "anyOf" in extra:
                    fields[field]["anyOf"] = extra["anyOf"]
                    continue
                for option in fields[field].get("anyOf", [fields[field]]):
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
