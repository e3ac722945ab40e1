"""The body of `POST /v1/chat/completions` and its checks: the messages rendered with the
model's chat template (`espc.runtime.tokenizer.load_chat_template`) into one prompt."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from espc.runtime.engine import Engine
from espc.runtime.sampling import MAX_LOGPROBS
from espc.runtime.server.errors import _bad
from espc.runtime.server.schemas import Int, SamplingFields, _check_model, _Job, _job
from espc.runtime.tokenizer import ChatTemplate, TokenizerError


class TextPart(BaseModel):
    """One part of a message's content: text only (espc serves language models)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """A message of the conversation; content given as parts is their texts joined by newlines
    (as vLLM joins them) before the template sees it."""

    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart]
    name: str | None = None

    def for_template(self) -> dict:
        """The message as the template reads it: role, content as a string (and name when given)."""
        content = self.content if isinstance(self.content, str) else "\n".join(part.text for part in self.content)
        return {"role": self.role, "content": content} | ({"name": self.name} if self.name is not None else {})


class ChatCompletionRequest(SamplingFields):
    """The body of `POST /v1/chat/completions`: OpenAI's fields (`max_completion_tokens`
    before the older `max_tokens`; without either, the rest of the context), and vLLM's
    `add_generation_prompt` (default true: the template opens the assistant's turn)."""

    messages: list[ChatMessage] = Field(min_length=1, description="the conversation so far")
    max_completion_tokens: Int | None = Field(None, ge=1, description="tokens to generate at most (default: the rest of the context)")
    max_tokens: Int | None = Field(None, ge=1, description="the older name of max_completion_tokens")
    logprobs: bool | None = Field(False, description="return each token's log-probability")
    top_logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="and the k most likely tokens' (needs logprobs)")
    add_generation_prompt: bool | None = Field(True, description="end the prompt with the assistant's turn opened")


def _prepare_chat(engine: Engine, template: ChatTemplate, body: ChatCompletionRequest, served: str) -> _Job:
    """The checked request: the rendered, tokenized conversation and the sampling fields."""
    _check_model(body, served)
    tokenizer = engine.tokenizer
    if tokenizer is None:
        raise _bad("chat completions need a tokenizer, and this model has none; use /v1/completions with token ids", "messages")
    if body.top_logprobs is not None and not body.logprobs:
        raise _bad("top_logprobs needs logprobs = true", "top_logprobs")
    try:
        text = template.render([message.for_template() for message in body.messages], add_generation_prompt=body.add_generation_prompt is not False)
    except TokenizerError as error:
        raise _bad(str(error), "messages") from None
    prompt = tokenizer.encode(text, add_special_tokens=False)  # the template wrote the special tokens
    try:
        prompt = engine.encode(prompt)
    except ValueError as error:
        raise _bad(f"the rendered conversation: {error}", "messages") from None
    max_tokens, param = (body.max_completion_tokens, "max_completion_tokens") if body.max_completion_tokens is not None else (body.max_tokens, "max_tokens")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    return _job(engine, body, [prompt], max_tokens, param, logprobs, prompt_param="messages")
