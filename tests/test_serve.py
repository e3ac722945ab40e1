"""`espc serve`: the OpenAI-compatible HTTP server over real engines, on loopback only.

One engine (4 CPU workers, groups 1+1+1+1) behind uvicorn serves most tests: completions
(streamed and not) equal `Engine.generate` for the same seed; stop strings and stop tokens;
bad input gets 400 with OpenAI's error body; a fuzz run over the server's own OpenAPI schema
never gets a 5xx; 64 concurrent streaming clients all finish and leave the KV pools empty;
a client that disconnects cancels its request. A second engine, with a tight TTFT SLO,
admission control on and small KV pools, answers overload with 429 and an unservable
request with 503, and loses a worker mid-load: the requests on it get an error, the server
stays up and serves new requests on the remaining instances.
"""

import asyncio
import contextlib
import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from espc.frontend.loader import parse_spec
from espc.frontend.writer import to_dsl, to_toml
from espc.runtime.driver import Admission, Driver, DriverOptions
from espc.runtime.engine import Engine, EngineOptions, build_scheduler
from espc.runtime.sampling import SamplingParams
from espc.runtime.server import ServerThread, _Text, create_app
from espc.runtime.server.bodies import ChoiceState
from espc.runtime.server.schemas import _Job, _usage
from tests.kv_checks import assert_only_cache_holds_kv

TINY = Path(__file__).resolve().parent.parent / "specs" / "tiny-cpu.toml"
MODEL = "tiny-llama-gqa"
GROUPS = {"strategy": "static-sp", "configuration": "tp=1, groups=1+1+1+1"}
MAX_CONTEXT = 128  # short completions keep the fuzz run and the load test bounded


def tiny_spec(max_context: int = 4096, ttft: str | None = None, serving: str = "", runtime: str = ""):
    """specs/tiny-cpu.toml for serving: `serving` appended (a [serving] section), `runtime`
    lines added to its [runtime] section."""
    text = TINY.read_text()
    changes = {"max_context = 8192": f"max_context = {max_context}",
               '"zipf(1.1, 16, 6K)"': f'"zipf(1.1, 16, {max_context // 2})"',
               "kv_block_size = 16\n": f"kv_block_size = 16\n{runtime}\n" if runtime else "kv_block_size = 16\n"}
    if ttft is not None:
        changes['ttft = "max(3x prefill, 200ms) at p90"'] = f'ttft = "{ttft}"'
    for old, new in changes.items():
        assert old in text, f"specs/tiny-cpu.toml no longer has {old}"  # (the spec changed: update these)
        text = text.replace(old, new)
    return parse_spec(text + serving, "tiny-serve.toml", "toml")


@pytest.fixture(scope="module")
def served():
    spec = tiny_spec(MAX_CONTEXT, serving="\n[serving]\nmax_queued_requests = 256\n")
    with Engine(spec, kv_capacity=1024, **GROUPS) as engine:
        app = create_app(engine)
        with ServerThread(app) as server:
            yield engine, app, server.url


@pytest.fixture()
def client(served):
    with httpx.Client(base_url=served[2], timeout=60) as client:
        yield client


def body(prompt, **fields):
    return {"model": MODEL, "prompt": prompt, **fields}


def read_sse(response: httpx.Response) -> tuple[list[dict], bool]:
    """The data events of a stream and whether it ended with [DONE]."""
    events, done = [], False
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line[len("data: "):]
        if data == "[DONE]":
            done = True
            continue
        assert not done, "data after [DONE]"
        events.append(json.loads(data))
    return events, done


def stream(client: httpx.Client, request: dict) -> tuple[list[dict], bool]:
    with client.stream("POST", "/v1/completions", json=request | {"stream": True}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return read_sse(response)


def wait_idle(engine: Engine, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = engine.stats()
        if not (stats["running"] or stats["waiting"] or stats["queued"]) or time.monotonic() > deadline:
            return stats
        time.sleep(0.02)


def scrape(url: str) -> dict[str, float]:
    """GET /metrics as {sample name with its labels: value}."""
    response = httpx.get(url + "/metrics", timeout=60)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = {}
    for line in response.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def assert_error(response: httpx.Response, status: int, param: str | None = None, contains: str = "") -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert contains in error["message"]
    if param is not None:
        assert error["param"] == param
    return error


# ----------------------------------------------------------------------------- spec


def test_the_serving_section_reads_and_writes_in_both_syntaxes():
    spec = tiny_spec(serving="\n[serving]\nmax_queued_requests = 8\nreject_unreachable_ttft = true\n")
    assert (spec.serving.max_queued_requests, spec.serving.reject_unreachable_ttft) == (8, True)
    assert "serving {\n    max_queued_requests 8\n    reject_unreachable_ttft true\n}" in to_dsl(spec)
    for full in (False, True):
        assert parse_spec(to_dsl(spec, full), "x.esp", "dsl") == spec
        assert parse_spec(to_toml(spec, full), "x.toml", "toml") == spec
    assert tiny_spec().serving.max_queued_requests == 1024  # the default bound


def test_admission_refuses_early_with_a_code():
    """The driver's arrival check, without workers: a full queue and an unreachable TTFT."""
    spec = tiny_spec(ttft="10ms at p90")
    scheduler = build_scheduler(spec, None, None, EngineOptions(kv_capacity=1024, **GROUPS))
    prefill = lambda n: scheduler.deployment.cost.prefill_time([n], 1, 1)  # noqa: E731
    assert prefill(2000) > 0.010 > 2 * prefill(60)  # what the numbers below rely on

    def driver(admission):
        options = DriverOptions(1024, 256, 1, 60.0, 10.0, 60.0, 30.0, "float32", admission=admission)
        return Driver(spec, scheduler, options)

    def arrive(driver, prompt_len):
        events = []
        driver.submit([1] * prompt_len, SamplingParams(max_new_tokens=4), 0, events.append)
        driver._handle(driver._inbox.get_nowait())
        return events

    full = driver(Admission(max_queued=2))
    assert arrive(full, 10) == [] and arrive(full, 10) == []
    [refused] = arrive(full, 10)
    assert (refused.reason, refused.code) == ("rejected", "queue_full") and "max_queued_requests = 2" in refused.error
    slow = driver(Admission(ttft_target=lambda n: 0.010))
    assert arrive(slow, 60) == []
    [refused] = arrive(slow, 2000)
    assert refused.code == "ttft_unreachable" and "ttft target" in refused.error
    assert slow.stats()["rejected"] == {"ttft_unreachable": 1}


def test_usage_counts_each_prompt_once_with_its_first_choices_cached_tokens():
    prompts, n = [[1] * 40, [2] * 20], 2
    job = _Job(prompts, n, SamplingParams(max_new_tokens=4), (), stream=False, include_usage=False)
    cached = [32, 0, 16, 0]  # choice index = prompt index x n + i; a choice beside the first may miss the cache
    states = [
        ChoiceState(index, prompts[index // n], ids=[7] * (index + 1), cached_tokens=cached[index]) for index in range(len(cached))
    ]
    assert _usage(job, states) == {
        "prompt_tokens": 60, "completion_tokens": 1 + 2 + 3 + 4, "total_tokens": 70,
        "prompt_tokens_details": {"cached_tokens": 32 + 16},
    }


def test_stop_strings_are_held_back_across_tokens():
    text = _Text(lambda ids: bytes(ids).decode("utf-8", errors="replace"), ["ab", "é"])
    pieces = [text.add(token) for token in b"xya"]  # "a" may begin "ab": held back
    assert pieces == [("x", False), ("y", False), ("", False)]
    assert text.add(ord("c")) == ("ac", False)
    first = text.add(0xC3)  # half of "é": held back
    assert first == ("", False)
    assert text.add(0xA9) == ("", True)  # "é" is a stop string: nothing more, stopped
    several = _Text(lambda ids: bytes(ids).decode("utf-8", errors="replace"), ["abc", "bd"])
    assert [several.add(token) for token in b"xab"] == [("x", False), ("", False), ("", False)]  # "ab" may begin "abc"
    assert several.add(ord("d")) == ("a", True)  # "bd"
    ending = _Text(lambda ids: bytes(ids).decode("utf-8", errors="replace"), ["zz"])
    assert [ending.add(token) for token in b"az"] == [("a", False), ("", False)]
    assert ending.add(0xE2) == ("", False) and ending.rest() == ("z\ufffd", False)  # at the end: all of it
    whole = bytes(range(0x70, 0x100)) + "héllo wörld €".encode() + bytes([0xE2, 0x82, 0x41, 0xC3])
    streamed = _Text(lambda ids: bytes(ids).decode("utf-8", errors="replace"), [])
    pieces = [streamed.add(token)[0] for token in whole]
    assert "".join(pieces) + streamed.rest()[0] == whole.decode("utf-8", errors="replace")


# ----------------------------------------------------------------------- completions


@pytest.mark.parametrize(
    "prompt, sampling",
    [
        ("Hello, espc", {"temperature": 0}),
        (list(range(40, 73)), {"temperature": 0.9, "top_p": 0.9, "top_k": 50, "seed": 7}),
        ([[5, 6, 7, 8, 9]], {"temperature": 1.3, "seed": 11}),
        (["text in a batch of one"], {"temperature": 0.5, "seed": 3}),
    ],
    ids=["greedy-text", "sampled-ids", "ids-batch-of-one", "text-batch-of-one"],
)
def test_completions_equal_engine_generate(served, client, prompt, sampling):
    engine = served[0]
    max_tokens = 12
    params = SamplingParams(
        max_new_tokens=max_tokens, temperature=sampling["temperature"], top_p=sampling.get("top_p", 1.0),
        top_k=sampling.get("top_k", 0), seed=sampling.get("seed"),
    )
    single = prompt[0] if isinstance(prompt, list) and not isinstance(prompt[0], int) else prompt
    [expected] = engine.generate(single, params, timeout=60)
    assert expected.finish_reason == "length"
    request = body(prompt, max_tokens=max_tokens, return_token_ids=True, **sampling)

    response = client.post("/v1/completions", json=request)
    assert response.status_code == 200, response.text
    completion = response.json()
    assert completion["object"] == "text_completion" and completion["model"] == MODEL
    assert completion["id"].startswith("cmpl-") and isinstance(completion["created"], int)
    [choice] = completion["choices"]
    assert choice["token_ids"] == expected.token_ids
    assert choice["text"] == expected.text
    assert choice["prompt_token_ids"] == expected.prompt_token_ids
    assert (choice["index"], choice["logprobs"], choice["finish_reason"]) == (0, None, "length")
    prompt_len = len(expected.prompt_token_ids)
    # Engine.generate left the prompt's full blocks in the prefix cache: all but the last
    # prompt token's block-aligned prefix is read from there.
    block = engine.spec.runtime.kv_block_size
    assert completion["usage"] == {
        "prompt_tokens": prompt_len, "completion_tokens": max_tokens, "total_tokens": prompt_len + max_tokens,
        "prompt_tokens_details": {"cached_tokens": (prompt_len - 1) // block * block},
    }

    events, done = stream(client, request | {"stream_options": {"include_usage": True}})
    assert done
    *chunks, usage = events
    assert usage["choices"] == [] and usage["usage"] == completion["usage"]
    assert all(chunk["id"] == chunks[0]["id"] and chunk["object"] == "text_completion" for chunk in chunks)
    assert [token for chunk in chunks for token in chunk["choices"][0]["token_ids"]] == expected.token_ids
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == expected.text
    assert [chunk["choices"][0]["finish_reason"] for chunk in chunks] == [None] * (len(chunks) - 1) + ["length"]


def test_streams_without_extensions_look_like_openai(client):
    events, done = stream(client, body("Once upon a time", max_tokens=6, temperature=0))
    assert done and events
    for event in events:
        assert set(event) == {"id", "object", "created", "model", "choices"}
        [choice] = event["choices"]
        assert set(choice) == {"text", "index", "logprobs", "finish_reason"}
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_stop_strings_and_stop_token_ids_end_the_completion(served, client):
    engine = served[0]
    [full] = engine.generate("Stop here", SamplingParams(max_new_tokens=40), timeout=60)
    printable = [token for token in full.token_ids[1:] if 32 < token < 127]
    assert printable, f"the greedy completion {full.token_ids} has no printable ASCII byte after the first"
    stop = chr(printable[0])
    cut = full.text.index(stop)
    request = body("Stop here", max_tokens=40, temperature=0, stop=[stop])
    completion = client.post("/v1/completions", json=request).json()
    assert completion["choices"][0]["text"] == full.text[:cut]
    assert completion["choices"][0]["finish_reason"] == "stop"
    events, done = stream(client, request)
    assert done and "".join(event["choices"][0]["text"] for event in events) == full.text[:cut]
    assert events[-1]["choices"][0]["finish_reason"] == "stop"

    stop_id = full.token_ids[3]
    by_id = client.post("/v1/completions", json=body("Stop here", max_tokens=40, temperature=0, stop_token_ids=[stop_id], return_token_ids=True)).json()
    assert by_id["choices"][0]["token_ids"] == full.token_ids[: full.token_ids.index(stop_id)]
    assert by_id["choices"][0]["finish_reason"] == "stop"
    assert_only_cache_holds_kv(wait_idle(engine))


@pytest.mark.parametrize(
    "request_body, param, contains",
    [
        (body("a", temperatre=0.5), "temperatre", "unrecognized request argument"),
        (body("a", max_tokens=0), "max_tokens", "greater than or equal to 1"),
        (body("a", max_tokens=-3), "max_tokens", ""),
        (body("a", max_tokens=MAX_CONTEXT), "max_tokens", "maximum context length is 128"),
        (body("a" * (MAX_CONTEXT + 1)), "prompt", "maximum context length"),
        (body("a", max_tokens="8"), "max_tokens", ""),
        (body("a", temperature=-1), "temperature", ""),
        (body("a", temperature=2.5), "temperature", ""),
        (body("a", top_p=0), "top_p", ""),
        (body("a", top_p=1.5), "top_p", ""),
        (body("a", top_k=-2), "top_k", ""),
        (body("a", seed=2**64), "seed", ""),
        (body("a", n=0), "n", "greater than or equal to 1"),
        (body("a", n=17), "n", "less than or equal to 16"),
        (body(["a"] * 8, n=9), "n", "72 choices; at most 64"),
        (body("a", echo=True), "echo", ""),
        (body("a", logprobs=21), "logprobs", "less than or equal to 20"),
        (body("a", presence_penalty=0.5), "presence_penalty", ""),
        (body("a", stop=["x", "y", "z", "w", "v"]), "stop", "at most 4"),
        (body("a", stop=""), "stop", "must not be empty"),
        (body("a", stop_token_ids=[-1]), "stop_token_ids", ""),
        (body("a", stream_options={"include_usage": True}), "stream_options", "stream = true"),
        (body(""), "prompt", "empty"),
        (body([]), "prompt", "empty"),
        (body([1, 999]), "prompt", "outside the vocabulary"),
        (body([1, True]), "prompt", ""),
        (body(["a", ""]), "prompt", "prompt 1: the prompt is empty"),
        (body([[1, 2], [3, 999]]), "prompt", "prompt 1: prompt token ids [999] are outside the vocabulary"),
        ({"prompt": "a"}, "model", "Field required"),
        ({"model": MODEL}, "prompt", "Field required"),
    ],
)
def test_bad_requests_get_400_with_an_openai_error(client, request_body, param, contains):
    error = assert_error(client.post("/v1/completions", json=request_body), 400, param, contains)
    assert error["type"] == "invalid_request_error"


def test_malformed_bodies_unknown_models_and_routes(client):
    for content in (b"{not json", b"[1, 2]", b"", b'{"model": "tiny-llama-gqa", "prompt": "a", "temperature": NaN}', b"\xff\xfe"):
        assert_error(client.post("/v1/completions", content=content, headers={"content-type": "application/json"}), 400)
    assert_error(client.post("/v1/completions", json=body("a") | {"model": "gpt-4"}), 404, "model", "does not exist")
    assert_error(client.get("/v1/nothing"), 404)
    assert_error(client.get("/v1/completions"), 405)


def test_models_health_and_metrics(served, client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [model["id"] for model in models["data"]] == [MODEL]
    assert client.get("/health").json() == {"status": "ok", "instances": 4, "in_service": 4}
    client.post("/v1/completions", json=body("metrics", max_tokens=3))
    samples = scrape(served[2])
    for name in (
        "espc_queue_length", "espc_requests_running", "espc_time_to_first_token_seconds_count",
        "espc_time_per_output_token_seconds_count", 'espc_instance_dop{instance="3"}', "espc_migrations_total",
        'espc_kv_used_tokens{instance="0"}', 'espc_kv_cached_tokens{instance="0"}', "espc_kv_usage_ratio", 'espc_rejected_requests_total{code="queue_full"}',
        "espc_prefix_cache_queried_tokens_total", "espc_prefix_cache_hit_tokens_total", "espc_prefix_cache_hit_ratio",
        "espc_prefix_cache_cached_tokens", "espc_prefix_cache_cached_blocks", "espc_prefix_cache_entries",
        "espc_prefix_cache_evicted_blocks_total",
    ):
        assert name in samples, name
    assert samples["espc_time_to_first_token_seconds_count"] >= 1
    assert samples['espc_time_to_first_token_seconds_bucket{le="+Inf"}'] == samples["espc_time_to_first_token_seconds_count"]
    assert samples['espc_kv_capacity_tokens{instance="0"}'] == 1024
    assert samples["espc_up"] == 1 and samples['espc_requests_total{outcome="length"}'] >= 1
    assert samples["espc_prefix_cache_enabled"] == 1  # the default
    assert samples["process_resident_memory_bytes"] > 0  # prometheus_client's standard metrics
    assert any(name.startswith("python_info{") for name in samples)


def test_fuzzing_the_openapi_schema_never_gets_a_server_error(served):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    engine, app, url = served
    schema = schemathesis.openapi.from_dict(app.openapi())
    operations = {(op.method.upper(), op.path): op for op in (result.ok() for result in schema.get_all_operations())}
    assert set(operations) == {
        ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/health"), ("GET", "/metrics"),
    }
    completions = operations.pop(("POST", "/v1/completions"))
    chat = operations.pop(("POST", "/v1/chat/completions"))
    positive, negative = schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE
    runs = [  # (strategy, examples): valid completions exercise the engine; the rest the checks
        (completions.as_strategy(generation_mode=positive), 40),
        (completions.as_strategy(generation_mode=negative), 25),
        (chat.as_strategy(generation_mode=positive), 25),
        (chat.as_strategy(generation_mode=negative), 15),
        (st.one_of(*[op.as_strategy(generation_mode=positive) for op in operations.values()]), 6),
    ]
    statuses: dict[int, int] = {}

    def call(case):
        response = case.call(base_url=url, timeout=60)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert response.status_code < 500, f"{case.method} {case.path} {case.body!r} -> {response.status_code}: {response.text[:500]}"
        if response.status_code >= 400:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}

    for strategy, examples in runs:
        settings(max_examples=examples, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))(
            given(case=strategy)(call)
        )()
    assert statuses.get(200, 0) >= 10 and statuses.get(400, 0) >= 10, statuses
    stats = wait_idle(engine)
    assert_only_cache_holds_kv(stats)
    assert stats["in_service"] == 4
    engine.check_kv()


def test_64_concurrent_streaming_clients_all_finish_and_free_kv(served):
    engine, app, url = served
    requests = 128
    clients = 64

    async def one(client: httpx.AsyncClient, index: int) -> tuple[int, bool, str | None]:
        prompt = [(index * 7 + j) % 256 for j in range(4 + index % 37)]
        request = body(prompt, max_tokens=1 + index % 8, temperature=0.8, seed=index, stream=True)
        async with client.stream("POST", "/v1/completions", json=request) as response:
            assert response.status_code == 200, await response.aread()
            tokens, done, finish = 0, False, None
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    choice = json.loads(line[6:])["choices"][0]
                    tokens += 1
                    finish = choice["finish_reason"] or finish
            return tokens, done, finish

    async def load():
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
            gate = asyncio.Semaphore(clients)

            async def gated(index):
                async with gate:
                    return await one(client, index)

            return await asyncio.wait_for(asyncio.gather(*(gated(i) for i in range(requests))), timeout=120)

    results = asyncio.run(load())
    assert all(done and finish == "length" for _, done, finish in results), results
    stats = wait_idle(engine)
    assert_only_cache_holds_kv(stats)
    assert stats["running"] == 0
    engine.check_kv()


def test_a_client_disconnect_cancels_its_request_and_frees_kv(served, client):
    engine, app, url = served
    metrics = app.state.metrics
    cancelled = metrics.count("cancelled")

    def wait_cancelled(count: int) -> None:
        deadline = time.monotonic() + 30
        while metrics.count("cancelled") < count and time.monotonic() < deadline:
            time.sleep(0.02)
        assert metrics.count("cancelled") == count

    async def give_up_while_generating():  # a non-streaming request whose client leaves
        async with httpx.AsyncClient(base_url=url, timeout=60) as aclient:
            post = asyncio.ensure_future(aclient.post("/v1/completions", json=body([4, 5, 6], max_tokens=MAX_CONTEXT - 3)))
            deadline = time.monotonic() + 30
            while (await asyncio.to_thread(engine.stats))["running"] == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert not post.done()
            post.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await post

    asyncio.run(give_up_while_generating())
    wait_cancelled(cancelled + 1)
    request = body([1, 2, 3], max_tokens=MAX_CONTEXT - 3, temperature=0, stream=True)
    with client.stream("POST", "/v1/completions", json=request) as response:  # a stream whose client leaves
        received = [line for _, line in zip(range(6), response.iter_lines())]
    assert any(line.startswith("data: ") for line in received)
    wait_cancelled(cancelled + 2)
    stats = wait_idle(engine)
    assert_only_cache_holds_kv(stats)
    engine.check_kv()


# ------------------------------------------------------------ admission and faults


def test_espc_serve_refuses_bad_arguments_before_starting_anything(tmp_path):
    from typer.testing import CliRunner

    from espc.cli.main import app

    runner = CliRunner()
    for args, message in [
        (["serve", str(tmp_path / "missing")], "missing"),
        (["serve", str(tmp_path), "--port", "70000"], "--port 70000"),
        (["serve", str(tmp_path), "--log-level", "loud"], "--log-level"),
    ]:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output


def test_overload_unservable_and_a_killed_worker(tmp_path):
    """429 for a request whose TTFT cannot meet the SLO, 503 for one no instance can hold;
    then a worker killed under four streams, one holding KV: its streams get an error event, the others
    finish, /health reports 3 of 4 instances and new requests are served."""
    spec = tiny_spec(ttft="10ms at p90", serving="\n[serving]\nreject_unreachable_ttft = true\n")
    # The default heartbeat timeout: a killed worker is found by its exit, and a 2 s one lets a
    # busy CI machine fail a healthy worker (and a stream with it) before any was killed.
    with Engine(spec, kv_capacity=1024, **GROUPS) as engine, ServerThread(create_app(engine)) as server:
        client = httpx.Client(base_url=server.url, timeout=60)
        overload = client.post("/v1/completions", json=body([7] * 2000, max_tokens=1))
        error = assert_error(overload, 429, contains="ttft target")
        assert error["code"] == "ttft_unreachable" and overload.headers["retry-after"] == "1"
        unservable = client.post("/v1/completions", json=body([7] * 100, max_tokens=1000))
        assert assert_error(unservable, 503, contains="1,100")["code"] == "unservable"
        assert engine.stats()["rejected"] == {"ttft_unreachable": 1, "unservable": 1}

        async def streams():
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as aclient:
                started = asyncio.Event()
                first_tokens = [0]
                victim: list[int] = []

                async def one(index):
                    request = body(list(range(3, 3 + 7 + 11 * index)), max_tokens=300, temperature=0, stream=True)
                    events, done = [], False
                    async with aclient.stream("POST", "/v1/completions", json=request) as response:
                        assert response.status_code == 200
                        async for line in response.aiter_lines():
                            if not line:
                                continue
                            if line == "data: [DONE]":
                                done = True
                                continue
                            events.append(json.loads(line[6:]))
                            if len(events) == 1:
                                first_tokens[0] += 1
                                if first_tokens[0] == 4:
                                    started.set()
                    return events, done

                async def kill():  # a worker holding a stream's KV (the scheduler may leave one idle)
                    await asyncio.wait_for(started.wait(), 60)
                    used = (await asyncio.to_thread(engine.stats))["kv_used_tokens"]
                    victim.append(next(instance for instance, tokens in enumerate(used) if tokens))
                    os.kill(engine.worker_pids()[victim[0]], signal.SIGKILL)

                *results, _ = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(4)), kill()), 120)
                return results, victim[0]

        results, victim = asyncio.run(streams())
        failed = [events for events, done in results if not done]
        assert 1 <= len(failed) < 4
        for events in failed:
            assert "error" in events[-1] and f"instance {victim} failed" in events[-1]["error"]["message"]
            assert events[-1]["error"]["type"] == "engine_error"
        for events, done in results:
            if done:
                assert events[-1]["choices"][0]["finish_reason"] == "length"
        assert client.get("/health").json() == {"status": "ok", "instances": 4, "in_service": 3}
        for index in range(4):
            after = client.post("/v1/completions", json=body(f"after the fault {index}", max_tokens=4))
            assert after.status_code == 200 and after.json()["choices"][0]["finish_reason"] == "length"
        assert "\nespc_worker_failures_total 1.0\n" in client.get("/metrics").text
        stats = wait_idle(engine)
        assert_only_cache_holds_kv(stats)
        engine.check_kv()
        client.close()


def test_strategy_chunked_is_served_and_equals_the_engine():
    """`espc serve` of strategy chunked (prefills continued in 8-token chunks, decodes
    piggybacked): a completion, streamed and not, is the engine's own greedy continuation."""
    spec = tiny_spec(MAX_CONTEXT)
    spec = spec.model_copy(update={"policy": spec.policy.model_copy(update={"chunk_tokens": 8})})
    prompt = list(range(3, 3 + 29))  # four chunks of 8, the last one short
    with Engine(spec, strategy="chunked", kv_capacity=1024) as engine, ServerThread(create_app(engine)) as server:
        [expected] = engine.generate([prompt], SamplingParams(max_new_tokens=6), timeout=120)
        with httpx.Client(base_url=server.url, timeout=60) as client:
            whole = client.post("/v1/completions", json=body(prompt, max_tokens=6, temperature=0, return_token_ids=True))
            events, done = stream(client, body(prompt, max_tokens=6, temperature=0, stream=True, return_token_ids=True))
        assert whole.status_code == 200, whole.text
        assert whole.json()["choices"][0]["token_ids"] == expected.token_ids
        assert done and [t for event in events for choice in event["choices"] for t in choice.get("token_ids") or []] == expected.token_ids
        assert_only_cache_holds_kv(wait_idle(engine))
