"""The bodies answered: OpenAI's completion (`text_completion`) and chat completion
(`chat.completion`, streamed as `chat.completion.chunk`) objects, their choices and their
logprobs, in one shape per endpoint (`CompletionFormat`, `ChatFormat`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from espc.runtime.sampling import TokenLogprobs

# A token's text in logprobs: the tokenizer's decoding of the token alone, or
# "token_id:ID" without a tokenizer (vLLM's spelling).
TokenText = Callable[[int], str]


@dataclass
class ChoiceState:
    """One choice as it is answered: its text, tokens and logprobs so far, and its end."""

    index: int
    prompt_ids: list[int]
    text: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish: str | None = None
    chunks_sent: int = 0
    ids_sent: int = 0  # tokens already sent in chunks (the rest go with the next one)
    text_offset: int = 0  # where the next token's text starts in the completion (completions' logprobs)
    cached_tokens: int = 0  # prompt tokens the prefix cache served (FinishEvent.cached_tokens), once it ended


class CompletionFormat:
    """`POST /v1/completions`: choices carry `text`; logprobs in the legacy shape (tokens,
    token_logprobs, top_logprobs, text_offset)."""

    object = chunk_object = "text_completion"
    id_prefix = "cmpl-"

    def __init__(self, token_text: TokenText, return_token_ids: bool):
        self.token_text, self.return_token_ids = token_text, return_token_ids

    def choice(self, state: ChoiceState, text: str, ids: Sequence[int], logprobs: Sequence[TokenLogprobs] | None,
               finish: str | None, streamed: bool) -> dict:
        """The whole choice, or (streamed) the chunk's part of it: text, ids and logprobs of the chunk."""
        body = {"text": text, "index": state.index, "logprobs": None, "finish_reason": finish}
        if logprobs is not None:
            body["logprobs"] = self._logprobs(state, ids, logprobs)
        if self.return_token_ids:
            body["token_ids"] = list(ids)
            if not streamed or state.chunks_sent == 0:
                body["prompt_token_ids"] = state.prompt_ids
        return body

    def _logprobs(self, state: ChoiceState, ids: Sequence[int], logprobs: Sequence[TokenLogprobs]) -> dict:
        tokens = [self.token_text(token) for token in ids]
        offsets = []
        for token in tokens:
            offsets.append(state.text_offset)
            state.text_offset += len(token)
        return {
            "tokens": tokens, "token_logprobs": [entry.logprob for entry in logprobs],
            "top_logprobs": [self._top(entry) for entry in logprobs],
            "text_offset": offsets,
        }


    def _top(self, entry: TokenLogprobs) -> dict[str, float]:
        """The alternatives by text; tokens with the same text (bytes of a partial character)
        keep the most likely one's logprob."""
        top: dict[str, float] = {}
        for token, logprob in entry.top:
            top.setdefault(self.token_text(token), logprob)
        return top


class ChatFormat:
    """`POST /v1/chat/completions`: choices carry the assistant's `message` (streamed: a
    `delta`, the role in a choice's first chunk); logprobs as `{"content": [...]}`."""

    object, chunk_object = "chat.completion", "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def __init__(self, token_text: TokenText):
        self.token_text = token_text

    def choice(self, state: ChoiceState, text: str, ids: Sequence[int], logprobs: Sequence[TokenLogprobs] | None,
               finish: str | None, streamed: bool) -> dict:
        content = None if logprobs is None else {"content": [self._entry(token, entry) for token, entry in zip(ids, logprobs)], "refusal": None}
        if not streamed:
            message = {"role": "assistant", "content": text, "refusal": None}
            return {"index": state.index, "message": message, "logprobs": content, "finish_reason": finish}
        delta = {"role": "assistant", "content": text} if state.chunks_sent == 0 else {"content": text} if text or finish is None else {}
        return {"index": state.index, "delta": delta, "logprobs": content, "finish_reason": finish}

    def _entry(self, token: int, entry: TokenLogprobs) -> dict:
        top = [self._token(alternative, logprob) for alternative, logprob in entry.top]
        return self._token(token, entry.logprob) | {"top_logprobs": top}

    def _token(self, token: int, logprob: float) -> dict:
        text = self.token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


ResponseFormat = CompletionFormat | ChatFormat


def response_body(format_: ResponseFormat, request_id: str, created: int, model: str, choices: list[dict], streamed: bool) -> dict:
    """The completion object, or one chunk of a stream, without its usage."""
    return {
        "id": request_id, "object": format_.chunk_object if streamed else format_.object, "created": created,
        "model": model, "choices": choices,
    }
