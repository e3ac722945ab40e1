"""A load generator for any OpenAI-compatible completions endpoint (`espc bench serve`):
requests arrive as a Poisson process or replay a trace, stream their tokens, and each is
timed by the client; the run reports TTFT, TPOT and end-to-end percentiles, throughput, and
goodput against SLOs.

    requests = poisson_requests(count=200, rate=4.0, input_len=(64, 256), output_len=(16, 16), seed=0)
    run = asyncio.run(run_load("http://127.0.0.1:8000", requests, model="tiny-llama-gqa", max_concurrency=32))
    summary = summarize(run, SLO(ttft_s=lambda n: 2.0, tpot_s=0.05))

A request's prompt is token ids (random ids below `vocab`, drawn from the seed), sent to
`POST /v1/completions` with `stream: true` and `stream_options.include_usage` (for the
token count), `temperature` 0 and, unless turned off, `ignore_eos` (vLLM's and espc's
extension) so that it generates exactly its output length. Times are the client's own,
from sending the request: TTFT to the first streamed choice, E2E to the end of the stream,
TPOT = (E2E - TTFT) / (tokens - 1) for requests with two tokens or more. A request that
waits for the concurrency cap is timed from when it is sent; its wait shows in the run's
duration and throughput. Goodput is the completed requests per second that meet both SLO
bounds (DistServe's definition); a request of one token meets any TPOT bound.

The client is a minimal HTTP/1.1 reader on asyncio streams with kept-alive connections
(http:// only): a load generator shares the machine with what it measures, and a general
HTTP client parsing every event of many streams would cost more CPU than the server
producing them.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from espc.planner.sim.workload import read_azure_csv, read_mooncake_jsonl

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class LoadRequest:
    """One request of the load: when it is sent (seconds after the start), its prompt, and
    how many tokens it asks for."""

    index: int
    arrival_s: float
    prompt: list[int]
    output_len: int


@dataclass
class RequestResult:
    """What the client saw of one request."""

    index: int
    prompt_len: int
    output_len: int  # asked for
    sent_s: float = 0.0  # after the start of the run
    ttft_s: float | None = None
    e2e_s: float | None = None
    output_tokens: int = 0  # the usage's completion_tokens (else the streamed choices)
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        if self.error is not None or self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass
class LoadRun:
    """Every request's result and the run's wall time (first send to last answer)."""

    results: list[RequestResult]
    duration_s: float
    config: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SLO:
    """Latency bounds a request must meet to count in goodput: TTFT as a function of the
    prompt length (specs may scale it with the isolated prefill time), TPOT in seconds;
    None: no bound."""

    ttft_s: Callable[[int], float] | None = None
    tpot_s: float | None = None
    description: str = "none"

    def met(self, result: RequestResult) -> bool:
        if result.error is not None or result.ttft_s is None:
            return False
        if self.ttft_s is not None and result.ttft_s > self.ttft_s(result.prompt_len):
            return False
        tpot = result.tpot_s
        return self.tpot_s is None or tpot is None or tpot <= self.tpot_s


def slo_from_spec(path: str | Path) -> SLO:
    """The `slo` section of a spec: its TTFT bound (scaled with the isolated prefill time of
    the spec's cost model when it says so) and its TPOT bound."""
    from espc.frontend.loader import load_spec
    from espc.planner.sim.costmodel import CostModel
    from espc.planner.sim.metrics import isolated_prefill

    spec = load_spec(path)
    ttft = spec.slo.ttft
    if ttft.prefill_multiple is None:
        limit = ttft.limit
        return SLO(lambda prompt_len: limit, spec.slo.tpot.limit, f"{path}: ttft {ttft.shorthand()}, tpot {spec.slo.tpot.shorthand()}")
    alone = isolated_prefill(CostModel.from_spec(spec))
    return SLO(lambda prompt_len: ttft.target(alone(prompt_len)), spec.slo.tpot.limit,
               f"{path}: ttft {ttft.shorthand()}, tpot {spec.slo.tpot.shorthand()}")


# ------------------------------------------------------------------------------ requests


def _draw(length: tuple[int, int], rng: random.Random) -> int:
    low, high = length
    return rng.randint(low, high)


def _prompt(length: int, vocab: int, rng: random.Random) -> list[int]:
    return [rng.randrange(vocab) for _ in range(length)]


def poisson_requests(
    count: int | None, rate: float, input_len: tuple[int, int], output_len: tuple[int, int], *, seed: int = 0,
    duration_s: float | None = None, vocab: int = 256,
) -> list[LoadRequest]:
    """Requests arriving as a Poisson process of `rate` per second (inf: all at once), with
    lengths uniform in the given [low, high]: `count` of them, or as many as arrive within
    `duration_s`."""
    if count is None and (duration_s is None or math.isinf(rate)):
        raise ValueError("give a request count, or a duration with a finite rate")
    rng = random.Random(seed)
    requests: list[LoadRequest] = []
    clock = 0.0
    while count is None or len(requests) < count:
        if requests and not math.isinf(rate):
            clock += rng.expovariate(rate)
        if duration_s is not None and clock >= duration_s:
            break
        length = _draw(input_len, rng)
        requests.append(LoadRequest(len(requests), clock, _prompt(length, vocab, rng), _draw(output_len, rng)))
    return requests


def trace_requests(
    path: str | Path, *, count: int | None = None, duration_s: float | None = None, speedup: float = 1.0,
    max_input_len: int | None = None, max_output_len: int | None = None, seed: int = 0, vocab: int = 256,
) -> list[LoadRequest]:
    """A trace's requests (Azure CSV or Mooncake JSONL, told by the file's suffix; read by
    espc.planner.sim.workload), arrivals divided by `speedup`, lengths capped (a small model
    cannot take a production trace's prompts), at most `count` or those within `duration_s`."""
    path = Path(path)
    reader = read_mooncake_jsonl if path.suffix in (".jsonl", ".json") else read_azure_csv
    rng = random.Random(seed)
    requests: list[LoadRequest] = []
    for record in reader(path, count):
        arrival = record.arrival_s / speedup
        if duration_s is not None and arrival >= duration_s:
            break
        prompt_len = min(record.prompt_len, max_input_len or record.prompt_len)
        output_len = min(record.output_len, max_output_len or record.output_len)
        requests.append(LoadRequest(len(requests), arrival, _prompt(prompt_len, vocab, rng), output_len))
    return requests


# -------------------------------------------------------------------------------- client


class HTTPError(Exception):
    pass


class Connection:
    """One kept-alive HTTP/1.1 connection that POSTs JSON and reads server-sent events."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.reusable = True  # false once the server said it closes the connection

    async def stream(self, path: str, body: dict, on_event: Callable[[dict], None]) -> None:
        """POST `body`; call `on_event` with each `data:` event's JSON until `[DONE]` or the
        end. Raises HTTPError for an error status or an error event."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        payload = json.dumps(body).encode()
        self.writer.write(
            b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nAccept: text/event-stream\r\n"
            b"Content-Length: %d\r\n\r\n" % (path.encode(), self.host.encode(), len(payload)) + payload
        )
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        status = int(head.split(" ", 2)[1])
        headers = {line.split(":", 1)[0].strip().lower(): line.split(":", 1)[1].strip() for line in head.split("\r\n")[1:] if ":" in line}
        self.reusable = headers.get("connection", "").lower() != "close"
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body_bytes = self._chunks()
        else:
            body_bytes = self._sized(int(headers.get("content-length", "0")))
        if status != 200:
            text = b"".join([part async for part in body_bytes])
            raise HTTPError(f"HTTP {status}: {text[:300].decode('utf-8', 'replace')}")
        buffer = b""
        async for part in body_bytes:
            buffer += part
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                for line in event.split(b"\n"):
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        continue
                    message = json.loads(data)
                    if "error" in message and "choices" not in message:
                        raise HTTPError(f"error event: {message['error'].get('message', message['error'])}")
                    on_event(message)

    async def _chunks(self):
        assert self.reader is not None
        while True:
            size = int((await self.reader.readline()).split(b";")[0].strip(), 16)
            data = await self.reader.readexactly(size + 2)
            if size == 0:
                return
            yield data[:-2]

    async def _sized(self, length: int):
        assert self.reader is not None
        if length:
            yield await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


async def discover_model(base_url: str) -> tuple[str, int | None]:
    """The first model `GET /v1/models` lists, and its context length when it says."""
    parts = urlsplit(base_url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
    try:
        path = parts.path.rstrip("/") + "/v1/models"
        writer.write(b"GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % (path.encode(), (parts.hostname or "").encode()))
        response = await reader.read()
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    if b"chunked" in head.lower():
        body = _unchunk(body)
    models = json.loads(body)["data"]
    if not models:
        raise HTTPError(f"{base_url}/v1/models lists no model")
    return models[0]["id"], models[0].get("max_model_len")


def _unchunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, body = out + body[:size], body[size + 2:]
    return out


async def run_load(
    base_url: str, requests: Sequence[LoadRequest], *, model: str, max_concurrency: int | None = None,
    ignore_eos: bool = True, extra_body: dict | None = None, on_done: Callable[[RequestResult], None] | None = None,
) -> LoadRun:
    """Send every request at its arrival time (at most `max_concurrency` in flight), stream
    it, and time it."""
    parts = urlsplit(base_url)
    if parts.scheme != "http" or parts.hostname is None:
        raise ValueError(f"--base-url {base_url!r}: expected http://HOST:PORT (https is not supported)")
    host, port, path = parts.hostname, parts.port or 80, parts.path.rstrip("/") + "/v1/completions"
    idle: list[Connection] = []
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    started = time.perf_counter()

    async def one(request: LoadRequest) -> RequestResult:
        await asyncio.sleep(max(0.0, request.arrival_s - (time.perf_counter() - started)))
        if gate is not None:
            await gate.acquire()
        try:
            return await send(request)
        finally:
            if gate is not None:
                gate.release()

    async def send(request: LoadRequest) -> RequestResult:
        result = RequestResult(request.index, len(request.prompt), request.output_len)
        body = {
            "model": model, "prompt": request.prompt, "max_tokens": request.output_len, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True},
        } | ({"ignore_eos": True} if ignore_eos else {}) | (extra_body or {})
        connection = idle.pop() if idle else Connection(host, port)
        sent = time.perf_counter()
        result.sent_s = sent - started
        streamed = 0

        def on_event(event: dict) -> None:
            nonlocal streamed
            if event.get("choices"):
                if result.ttft_s is None:
                    result.ttft_s = time.perf_counter() - sent
                streamed += 1
            if event.get("usage"):
                result.output_tokens = int(event["usage"].get("completion_tokens", 0))

        try:
            await connection.stream(path, body, on_event)
            result.e2e_s = time.perf_counter() - sent
            result.output_tokens = result.output_tokens or streamed
            if result.ttft_s is None:
                result.error = "the stream ended without a token"
            if connection.reusable:
                idle.append(connection)
            else:
                connection.close()
        except (OSError, asyncio.IncompleteReadError, ValueError, HTTPError) as failure:
            result.error = f"{type(failure).__name__}: {failure}" if not isinstance(failure, HTTPError) else str(failure)
            connection.close()
        if on_done is not None:
            on_done(result)
        return result

    try:
        results = await asyncio.gather(*(one(request) for request in requests))
    finally:
        for connection in idle:
            connection.close()
    return LoadRun(list(results), time.perf_counter() - started)


# ------------------------------------------------------------------------------- summary


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """Mean and the PERCENTILES (linear interpolation between order statistics); NaN if empty."""
    if not values:
        return {"mean": math.nan} | {f"p{q}": math.nan for q in PERCENTILES}
    ordered = sorted(values)
    out = {"mean": statistics.fmean(ordered)}
    for q in PERCENTILES:
        position = (len(ordered) - 1) * q / 100
        low = math.floor(position)
        high = min(low + 1, len(ordered) - 1)
        out[f"p{q}"] = ordered[low] + (ordered[high] - ordered[low]) * (position - low)
    return out


def summarize(run: LoadRun, slo: SLO) -> dict:
    """The run's table: counts, throughput, goodput and SLO attainment, latency percentiles."""
    done = [result for result in run.results if result.error is None]
    good = [result for result in done if slo.met(result)]
    duration = run.duration_s or math.nan
    tokens = sum(result.output_tokens for result in done)
    return {
        "requests": len(run.results), "completed": len(done), "failed": len(run.results) - len(done),
        "duration_s": run.duration_s, "request_throughput": len(done) / duration, "output_token_throughput": tokens / duration,
        "total_output_tokens": tokens, "total_input_tokens": sum(result.prompt_len for result in done),
        "slo": slo.description, "goodput": len(good) / duration,
        "slo_attainment": len(good) / len(run.results) if run.results else math.nan,
        "ttft_s": percentiles([r.ttft_s for r in done if r.ttft_s is not None]),
        "tpot_s": percentiles([tpot for r in done if (tpot := r.tpot_s) is not None]),
        "e2e_s": percentiles([r.e2e_s for r in done if r.e2e_s is not None]),
        "first_errors": [result.error for result in run.results if result.error is not None][:5],
    }


def report(run: LoadRun, summary: dict) -> dict:
    """The JSON document of a run: its summary, configuration and every request's times."""
    return {"summary": summary, "config": run.config, "requests": [asdict(result) | {"tpot_s": result.tpot_s} for result in run.results]}


def plot_cdfs(run: LoadRun, path: str | Path, slo: SLO | None = None) -> None:
    """Latency CDFs (TTFT, TPOT, E2E) of the completed requests, one panel each, to an image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [result for result in run.results if result.error is None]
    panels = [
        ("TTFT (s)", [r.ttft_s for r in done if r.ttft_s is not None], None),
        ("TPOT (s)", [tpot for r in done if (tpot := r.tpot_s) is not None], slo.tpot_s if slo else None),
        ("E2E (s)", [r.e2e_s for r in done if r.e2e_s is not None], None),
    ]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for axis, (label, values, bound) in zip(axes, panels):
        ordered = sorted(values)
        axis.step(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], where="post")
        if bound is not None:
            axis.axvline(bound, color="tab:red", linestyle="--", label="SLO")
            axis.legend()
        axis.set(xlabel=label, ylabel="fraction of requests", ylim=(0, 1.02))
        axis.grid(alpha=0.3)
    figure.suptitle(f"{len(done)} requests in {run.duration_s:.1f} s")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
