"""A completion's tokens as text deltas (`_pieces`), gathered into one answer (`_gather`) or
streamed as server-sent events (`_sse`), and the client's disconnect, which cancels it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable

from fastapi import Request

from espc.runtime.driver import FinishEvent, TokenEvent
from espc.runtime.server.detokenize import _Text
from espc.runtime.server.errors import finish_error
from espc.runtime.server.metrics import ServerMetrics, _Timing
from espc.runtime.server.schemas import _Job, _usage, choice_body, completion_body


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


async def _pieces(
    first: TokenEvent | FinishEvent, events: AsyncGenerator[TokenEvent | FinishEvent, None], text: _Text, timing: _Timing,
):
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


async def _gather(pieces) -> tuple[str, list[int], str]:
    """A whole completion: its text, token ids and finish reason."""
    text, ids, finish = [], [], "length"
    async for piece, tokens, reason in pieces:
        text.append(piece)
        ids += tokens
        finish = reason or finish
    return "".join(text), ids, finish


async def _sse(request_id: str, job: _Job, pieces, served: str, metrics: ServerMetrics) -> AsyncIterator[str]:
    """A streamed completion's events: a chunk per text delta, the usage if asked, `[DONE]`;
    or an error event if the engine fails it. The request is in flight until the stream ends."""
    created_s = int(time.time())
    generated = 0
    finished = False

    def chunk(choices: list, usage: dict | None = None) -> str:
        data = completion_body(request_id, created_s, served, choices)
        if job.include_usage:
            data["usage"] = usage
        return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"

    try:
        async for piece, tokens, reason in pieces:
            generated += len(tokens)
            if not piece and reason is None and not job.return_token_ids:
                continue  # text held back (an incomplete character, a possible stop string)
            choice = choice_body(piece, reason)
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
