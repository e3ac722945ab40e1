"""`espc bench serve`: the load generator against a live `espc serve` app (tiny engine, 4 CPU
workers, loopback), replaying small Azure and Mooncake traces written here, and its
request streams, percentiles and goodput checked against independent computations."""

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from espc.cli.main import app as cli
from espc.runtime import loadgen
from espc.runtime.engine import Engine
from espc.runtime.server import ServerThread, create_app
from tests.kv_checks import assert_only_cache_holds_kv
from tests.test_serve import GROUPS, MODEL, tiny_spec, wait_idle

AZURE = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.0000000,374,44
2023-11-16 18:15:46.0500000,12,3
2023-11-16 18:15:46.1000000,40,1
2023-11-16 18:15:46.1200000,500,9
2023-11-16 18:15:46.2000000,7,5
2023-11-16 18:15:46.2100000,90,2
"""


@pytest.fixture(scope="module")
def served():
    with Engine(tiny_spec(256), kv_capacity=2048, **GROUPS) as engine:
        app = create_app(engine)
        with ServerThread(app) as server:
            yield engine, app, server.url


def bench(*arguments: str):
    return CliRunner().invoke(cli, ["bench", "serve", *arguments])


def test_trace_replay_prints_percentiles_and_goodput(served, tmp_path):
    engine, app, url = served
    trace = tmp_path / "azure.csv"
    trace.write_text(AZURE)
    before = app.state.metrics.count("length")
    out = tmp_path / "run.json"
    result = bench(
        "--base-url", url, "--trace", str(trace), "--max-input-len", "64", "--max-output-len", "6", "--speedup", "4",
        "--slo-ttft", "1000s", "--slo-tpot", "1000s", "--json", str(out), "--plot", str(tmp_path / "cdf.png"),
    )
    assert result.exit_code == 0, result.output
    for row in ("latency (ms)", "TTFT", "TPOT", "E2E", "p99", "goodput", "throughput", "6 completed, 0 failed", "100.0% of requests met"):
        assert row in result.output, result.output
    report = json.loads(out.read_text())
    requests = report["requests"]
    # The trace's lengths, capped; every request generated its whole (capped) length.
    assert [r["prompt_len"] for r in requests] == [64, 12, 40, 64, 7, 64]
    assert [r["output_tokens"] for r in requests] == [6, 3, 1, 6, 5, 2]
    summary = report["summary"]
    assert summary["completed"] == 6 and summary["goodput"] == pytest.approx(summary["request_throughput"])
    ttfts = [r["ttft_s"] for r in requests]
    for q in (50, 90, 99):  # numpy's linear interpolation as the reference
        assert summary["ttft_s"][f"p{q}"] == pytest.approx(float(np.percentile(ttfts, q)))
    tpots = [(r["e2e_s"] - r["ttft_s"]) / (r["output_tokens"] - 1) for r in requests if r["output_tokens"] > 1]
    assert summary["tpot_s"]["mean"] == pytest.approx(float(np.mean(tpots)))
    assert (tmp_path / "cdf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert app.state.metrics.count("length") == before + 6  # the server saw each request finish
    assert_only_cache_holds_kv(wait_idle(engine))


def test_poisson_load_with_a_concurrency_cap_and_an_unmeetable_slo(served, tmp_path):
    engine, app, url = served
    result = bench(
        "--base-url", url, "--model", MODEL, "--num-requests", "8", "--request-rate", "50", "--input-len", "4:30",
        "--output-len", "2:4", "--max-concurrency", "2", "--slo-ttft", "1us", "--json", str(tmp_path / "run.json"),
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run.json").read_text())["summary"]
    assert summary["completed"] == 8 and summary["goodput"] == 0 and summary["slo_attainment"] == 0
    assert "(0.0% of requests met the SLO)" in result.output


def test_mooncake_traces_and_request_streams(tmp_path):
    trace = tmp_path / "mooncake.jsonl"
    records = [{"timestamp": t, "input_length": n, "output_length": o, "hash_ids": [0]} for t, n, o in [(0, 10, 2), (1000, 30, 0), (3000, 5, 7)]]
    trace.write_text("".join(json.dumps(record) + "\n" for record in records))
    requests = loadgen.trace_requests(trace, speedup=2.0, max_output_len=5, vocab=100, seed=3)
    assert [(r.arrival_s, len(r.prompt), r.output_len) for r in requests] == [(0.0, 10, 2), (0.5, 30, 1), (1.5, 5, 5)]
    assert all(0 <= token < 100 for r in requests for token in r.prompt)
    assert [r.index for r in loadgen.trace_requests(trace, duration_s=1.5)] == [0, 1]  # arrivals before 1.5 s

    poisson = loadgen.poisson_requests(2000, 5.0, (3, 9), (1, 4), seed=1)
    assert poisson == loadgen.poisson_requests(2000, 5.0, (3, 9), (1, 4), seed=1)  # deterministic by seed
    gaps = np.diff([r.arrival_s for r in poisson])
    assert gaps.mean() == pytest.approx(0.2, rel=0.1) and {len(r.prompt) for r in poisson} == set(range(3, 10))
    timed = loadgen.poisson_requests(None, 5.0, (3, 3), (1, 1), duration_s=10.0)
    assert timed and max(r.arrival_s for r in timed) < 10.0
    assert all(r.arrival_s == 0 for r in loadgen.poisson_requests(5, math.inf, (3, 3), (1, 1)))


def test_goodput_bounds_scale_with_the_spec(tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text((tiny_spec.__globals__["TINY"]).read_text())
    slo = loadgen.slo_from_spec(spec)  # tiny-cpu: ttft max(3x prefill, 200ms), tpot from the spec
    assert slo.ttft_s is not None and slo.ttft_s(8) == pytest.approx(0.2) and slo.ttft_s(10**6) > 0.2
    fast = loadgen.RequestResult(0, 8, 4, ttft_s=0.1, e2e_s=0.1 + 3 * 0.9 * slo.tpot_s, output_tokens=4)
    slow = loadgen.RequestResult(1, 8, 4, ttft_s=0.1, e2e_s=0.1 + 3 * 1.1 * slo.tpot_s, output_tokens=4)
    assert slo.met(fast) and not slo.met(slow)
    assert not slo.met(loadgen.RequestResult(2, 8, 4, error="HTTP 503"))


def test_bad_arguments_fail_before_sending(tmp_path):
    missing = bench("--base-url", "http://127.0.0.1:9", "--trace", str(tmp_path / "none.csv"))
    assert missing.exit_code == 2 and "none.csv" in missing.output and "cannot open" in missing.output
    assert bench("--base-url", "http://127.0.0.1:9", "--input-len", "9:3").exit_code == 2
    both = bench("--base-url", "http://127.0.0.1:9", "--spec", "x.toml", "--slo-ttft", "1s")
    assert both.exit_code == 2 and "not both" in both.output
    unreachable = bench("--base-url", "http://127.0.0.1:9", "--num-requests", "1")
    assert unreachable.exit_code == 2 and "pass --model" in unreachable.output
