"""A completion's tokens as text deltas (`_pieces`), the choices of one request merged as
they come (`_merged`), gathered into one answer (`_gather`) or streamed as server-sent
events (`_sse`), and the client's disconnect, which cancels them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable

from fastapi import Request

from espc.runtime.driver import FinishEvent, TokenEvent
from espc.runtime.server.bodies import ChatFormat, ChoiceState, ResponseFormat, response_body
from espc.runtime.server.detokenize import _Text
from espc.runtime.server.errors import finish_error
from espc.runtime.server.metrics import ServerMetrics, _Timing
from espc.runtime.server.schemas import _Job, _usage


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
    state: ChoiceState, cancel: Callable[[int], None],
):
    """(text, token events, finish reason) deltas of one completion, the finish reason set on
    the last; raises _Failed when the engine ends the request otherwise. The request's end
    sets `state.cached_tokens`: a stop string cancels the request (`cancel`, the engine's)
    and reads its FinishEvent after the last delta, so the usage can count them."""
    event = first
    try:
        while True:
            if isinstance(event, TokenEvent):
                timing.token()
                piece, stopped = text.add(event.token)
                if stopped:
                    yield piece, [event], "stop"
                    cancel(event.request_id)
                    async for event in events:  # tokens past the stop string, then the end
                        if isinstance(event, FinishEvent):
                            state.cached_tokens = event.cached_tokens
                    return
                yield piece, [event], None
            elif event.reason in ("length", "stop"):
                state.cached_tokens = event.cached_tokens
                piece, stopped = text.rest()
                yield piece, [], "stop" if stopped else event.reason
                return
            else:
                raise _Failed(event)
            event = await events.__anext__()
    finally:
        timing.done()
        await events.aclose()  # a failure or a disconnect leaves early: cancel the request, free its KV


async def _merged(streams: list[AsyncGenerator]) -> AsyncIterator[tuple[int, tuple]]:
    """(choice index, delta) of several choices' `_pieces` as they come; the first failure
    raises, and leaving early (a failure, a disconnect) cancels every choice still running."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncGenerator) -> None:
        try:
            async for item in stream:
                queue.put_nowait((index, item, None))
            queue.put_nowait((index, None, None))
        except Exception as error:
            queue.put_nowait((index, None, error))

    tasks = [asyncio.ensure_future(pump(index, stream)) for index, stream in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, item, error = await queue.get()
            if error is not None:
                raise error
            if item is None:
                running -= 1
                continue
            yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _add(state: ChoiceState, piece: str, events: list[TokenEvent], reason: str | None) -> None:
    state.text.append(piece)
    state.ids += [event.token for event in events]
    state.logprobs += [event.logprobs for event in events if event.logprobs is not None]
    state.finish = reason or state.finish


async def _gather(states: list[ChoiceState], pieces: list[AsyncGenerator], metrics: ServerMetrics) -> None:
    """Every choice whole, into `states`; raises _Failed when the engine fails one."""
    async for index, (piece, events, reason) in _merged(pieces):
        _add(states[index], piece, events, reason)
        if reason is not None:
            metrics.outcome(reason)


async def _sse(
    request_id: str, job: _Job, format_: ResponseFormat, states: list[ChoiceState], pieces: list[AsyncGenerator],
    streams: list[AsyncGenerator], served: str, metrics: ServerMetrics,
) -> AsyncIterator[str]:
    """A streamed answer's events: a chunk per text delta of each choice (with the tokens'
    logprobs since the choice's last chunk), the usage if asked, `[DONE]`; or an error event
    if the engine fails a choice. The request is in flight until the stream ends."""
    created_s = int(time.time())
    finished = 0
    wants_logprobs = job.params.logprobs is not None

    def chunk(choices: list, usage: dict | None = None) -> str:
        data = response_body(format_, request_id, created_s, served, choices, streamed=True)
        if job.include_usage:
            data["usage"] = usage
        return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"

    try:
        async for index, (piece, events, reason) in _merged(pieces):
            state = states[index]
            _add(state, piece, events, reason)
            if not piece and reason is None and not job.return_token_ids and (state.chunks_sent or not isinstance(format_, ChatFormat)):
                continue  # text held back (an incomplete character, a possible stop string): its tokens go with the next chunk
            ids = state.ids[state.ids_sent:]
            logprobs = state.logprobs[state.ids_sent:] if wants_logprobs else None
            yield chunk([format_.choice(state, piece, ids, logprobs, reason, streamed=True)])
            state.chunks_sent += 1
            state.ids_sent = len(state.ids)
            if reason is not None:
                finished += 1
                metrics.outcome(reason)
        if job.include_usage:
            yield chunk([], _usage(job, states))
        yield "data: [DONE]\n\n"
    except _Failed as failed:
        finished = len(states)
        error = finish_error(failed.event)
        metrics.outcome("error")
        yield f"data: {json.dumps(error.body(), ensure_ascii=False)}\n\n"
    finally:
        metrics.in_flight.dec()
        if finished < len(states):  # the client went away: leaving `_merged` cancelled the choices
            metrics.outcome("cancelled")
        for stream in (*pieces, *streams):  # the engine's streams too: a choice whose piece never started
            await stream.aclose()
