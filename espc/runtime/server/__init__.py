"""`espc serve`: an OpenAI-compatible HTTP API over `espc.Engine` (FastAPI + uvicorn).

    espc serve build/tiny --port 8000
    curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "tiny-llama-gqa", "prompt": "Hello", "max_tokens": 8}'

Endpoints: `POST /v1/completions` (text or token-id prompts, one or a list; `"stream": true`
answers with server-sent events, `data: {chunk}` lines and a final `data: [DONE]`),
`POST /v1/chat/completions` (messages rendered with the model's chat template), `GET
/v1/models`, `GET /health` (503 while no instance is in service) and `GET /metrics`
(Prometheus, through prometheus_client). Both completion endpoints take `n` (choice i
samples with the request's seed + i) and `logprobs` (computed by the worker from the fp32
logits row it samples from). Their `usage` reports the prompt tokens read from the prefix
cache in `prompt_tokens_details.cached_tokens`.

Errors carry OpenAI's body, `{"error": {"message", "type", "param", "code"}}`:

- 400: malformed JSON, an unknown field, a wrong type or range, a prompt the model cannot
  take (empty, unknown token ids, longer than `max_context` with its `max_tokens`), a value
  espc does not implement (`echo`, penalties, `logit_bias`), more than 64 choices, a chat
  template that refuses the messages;
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

The modules: `app` (`create_app`, serving), `routes` (the endpoints), `schemas` (the
completions body, the fields it shares with chat, their checks, the OpenAPI schema), `chat`
(the chat body and its rendering), `bodies` (the response objects and logprobs),
`streaming` (text deltas, merged choices, SSE, disconnects), `detokenize` (incremental
text, stop strings), `metrics` (prometheus_client) and `errors` (OpenAI's error body).
"""

from espc.runtime.server.app import ServerThread, bind, create_app, serve, terminate_as_interrupt
from espc.runtime.server.detokenize import _Text as _Text  # the tests check it directly

__all__ = ["ServerThread", "bind", "create_app", "serve", "terminate_as_interrupt"]
