"""Serving load: requests/s and TTFT/TPOT percentiles of `espc serve` at 1, 8 and 64
concurrent streaming clients on the tiny CPU spec, and the server's overhead vs calling the
Engine directly with the same load.

    python benchmarks/serve_load.py [--clients 1,8,64] [--requests 16,48,128]
        [--max-tokens 16] [--prompt-lengths 16,128] [--artifact DIR] [--json PATH]

Two runs of the same workload, one engine each (specs/tiny-cpu.toml, strategy static-sp,
configuration "tp=1, groups=1+1+1+1", kv_capacity 8192, unless --artifact names a compiled
one):

- server: the engine behind the OpenAI-compatible server (`espc.runtime.server`, uvicorn)
  in a child process; this process runs the clients with espc's load generator
  (`espc.runtime.loadgen`, what `espc bench serve` runs): kept-alive loopback connections
  POSTing `/v1/completions` with `stream: true`, read by a minimal HTTP/1.1 reader;
- direct: the engine in this process, each client iterating `Engine.stream` (what a
  service embedding the engine does): no HTTP, no JSON, no second process.

Per concurrency level C, N requests (--requests, one number per level) are served by C
clients, each taking the next request when its last one ended. A request is a prompt of
random token ids, its length uniform in --prompt-lengths, and greedy decoding of exactly
--max-tokens tokens (no stop tokens), so both runs do the same work. TTFT is measured by
the client from sending the request to receiving its first token, TPOT as (last token -
first token) / (tokens - 1) (the server run: to the end of the stream); requests/s is N
over the wall time of the level. Before each run, every instance serves a few requests to
warm the lowering cache. The overhead table
gives server / direct for requests/s and the medians of TTFT and TPOT.

The machine's other load shows in every number: on a shared 2-core machine read the ratios,
not the absolute times. Writes benchmarks/results/serve_load.json by default.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from espc.runtime import loadgen

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "specs" / "tiny-cpu.toml"
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "serve_load.json"
STRATEGY = {"strategy": "static-sp", "configuration": "tp=1, groups=1+1+1+1", "kv_capacity": 8192}
WARMUP_REQUESTS = 8


def make_engine(artifact: str | None):
    from espc import load_spec
    from espc.runtime.engine import Engine

    if artifact:
        return Engine.from_artifact(artifact, kv_capacity=STRATEGY["kv_capacity"])
    return Engine(load_spec(SPEC), **STRATEGY)


def workload(count: int, lengths: tuple[int, int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(rng.randint(*lengths))] for _ in range(count)]


def summarize(mode: str, clients: int, samples: list[dict], wall_s: float) -> dict:
    ok = [s for s in samples if s["error"] is None]
    ttft = [s["ttft_s"] for s in ok]
    tpot = [s["tpot_s"] for s in ok if s["tpot_s"] is not None]
    tokens = sum(s["tokens"] for s in ok)
    return {
        "mode": mode, "clients": clients, "requests": len(samples), "errors": len(samples) - len(ok), "wall_s": wall_s,
        "requests_per_s": len(ok) / wall_s if wall_s else 0.0, "output_tokens_per_s": tokens / wall_s if wall_s else 0.0,
        "ttft_s": loadgen.percentiles(ttft), "tpot_s": loadgen.percentiles(tpot),
        "first_errors": [s["error"] for s in samples if s["error"] is not None][:3],
    }


async def run_level(one, prompts: list[list[int]], clients: int) -> tuple[list[dict], float]:
    """Serve `prompts` with `clients` concurrent clients; `one(prompt)` -> sample."""
    queue = list(reversed(prompts))
    samples: list[dict] = []

    async def client():
        while queue:
            samples.append(await one(queue.pop()))

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return samples, time.perf_counter() - started


def sample(started: float, times: list[float], error: str | None = None) -> dict:
    ttft = times[0] - started if times else None
    tpot = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None
    return {"ttft_s": ttft, "tpot_s": tpot, "tokens": len(times), "error": error}


# ------------------------------------------------------------------------------- server


def serve_child(artifact: str | None) -> None:
    """The server process: print the URL once listening, serve until SIGTERM."""
    from espc.runtime.server import bind, serve

    sock = bind("127.0.0.1", 0)
    try:
        with make_engine(artifact) as engine:
            serve(engine, sock, log_level="warning", on_ready=lambda url: print(url, flush=True))
    except KeyboardInterrupt:  # SIGTERM from the parent: the engine closed its workers
        pass


async def run_server(url: str, plan, max_tokens: int, name: str, warmup: list[list[int]]) -> list[dict]:
    """Each level through espc's load generator (`espc bench serve`): every request arrives at
    once and at most `clients` are in flight, which is `clients` closed-loop clients."""

    def requests(prompts: list[list[int]]) -> list[loadgen.LoadRequest]:
        return [loadgen.LoadRequest(index, 0.0, prompt, max_tokens) for index, prompt in enumerate(prompts)]

    await loadgen.run_load(url, requests(warmup), model=name, max_concurrency=4)
    results = []
    for clients, prompts in plan:
        run = await loadgen.run_load(url, requests(prompts), model=name, max_concurrency=clients)
        samples = [{"ttft_s": r.ttft_s, "tpot_s": r.tpot_s, "tokens": r.output_tokens, "error": r.error} for r in run.results]
        results.append(summarize("server", clients, samples, run.duration_s))
        print(f"  server, {clients} clients: {results[-1]['requests_per_s']:.1f} req/s", flush=True)
    return results


def server_run(arguments, plan, warmup) -> tuple[list[dict], dict]:
    child = subprocess.Popen(
        [sys.executable, __file__, "--serve-child"] + (["--artifact", arguments.artifact] if arguments.artifact else []),
        stdout=subprocess.PIPE, text=True,
    )
    try:
        url = child.stdout.readline().strip()
        if not url.startswith("http"):
            raise SystemExit(f"the server did not start (exit code {child.poll()})")
        import httpx

        name = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        results = asyncio.run(run_server(url, plan, arguments.max_tokens, name, warmup))
        metrics = httpx.get(url + "/metrics").text
        kv = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith("espc_kv_used_tokens{"))
        return results, {"kv_used_tokens_after": kv}
    finally:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()


# ------------------------------------------------------------------------------- direct


def direct_run(arguments, plan, warmup) -> tuple[list[dict], dict]:
    from espc.runtime.driver import TokenEvent
    from espc.runtime.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=arguments.max_tokens)
    with make_engine(arguments.artifact) as engine:

        async def one_request(prompt):
            started = time.perf_counter()
            times: list[float] = []
            async for event in engine.stream(prompt, params):
                if isinstance(event, TokenEvent):
                    times.append(time.perf_counter())
                elif event.reason not in ("length", "stop"):
                    return sample(started, times, event.error or event.reason)
            return sample(started, times)

        async def levels():
            await run_level(one_request, warmup, min(4, len(warmup)))
            results = []
            for clients, prompts in plan:
                samples, wall = await run_level(one_request, prompts, clients)
                results.append(summarize("direct", clients, samples, wall))
                print(f"  direct, {clients} clients: {results[-1]['requests_per_s']:.1f} req/s", flush=True)
            return results

        results = asyncio.run(levels())
        time.sleep(0.2)
        stats = engine.stats()
        engine.check_kv()
    return results, {"kv_used_tokens_after": sum(stats["kv_used_tokens"])}


# --------------------------------------------------------------------------------- main


def format_table(rows: list[dict]) -> str:
    header = ("mode", "clients", "requests", "errors", "req/s", "tok/s", "TTFT p50", "p90", "p99", "TPOT p50", "p90", "p99")
    lines = [header]
    for r in rows:
        t, p = r["ttft_s"], r["tpot_s"]
        lines.append((
            r["mode"], str(r["clients"]), str(r["requests"]), str(r["errors"]), f"{r['requests_per_s']:.1f}",
            f"{r['output_tokens_per_s']:.0f}", *(f"{t[k] * 1e3:.0f} ms" for k in ("p50", "p90", "p99")),
            *(f"{p[k] * 1e3:.1f} ms" for k in ("p50", "p90", "p99")),
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in lines)


def overhead(rows: list[dict]) -> list[dict]:
    by = {(r["mode"], r["clients"]): r for r in rows}
    out = []
    for (mode, clients), server in sorted(by.items(), key=lambda item: item[0][1]):
        direct = by.get(("direct", clients))
        if mode != "server" or direct is None:
            continue
        out.append({
            "clients": clients,
            "requests_per_s": server["requests_per_s"] / direct["requests_per_s"],
            "ttft_p50": server["ttft_s"]["p50"] / direct["ttft_s"]["p50"],
            "tpot_p50": server["tpot_s"]["p50"] / direct["tpot_s"]["p50"],
            "ttft_p50_added_ms": (server["ttft_s"]["p50"] - direct["ttft_s"]["p50"]) * 1e3,
        })
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,8,64", help="concurrency levels")
    parser.add_argument("--requests", default="16,48,128", help="requests per level (one number, or one per level)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--prompt-lengths", default="16,128", help="min,max prompt tokens (uniform)")
    parser.add_argument("--artifact", default=None, help="serve a compiled artifact instead of static-sp 1+1+1+1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--serve-child", action="store_true", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.serve_child:
        serve_child(arguments.artifact)
        return
    clients = [int(c) for c in arguments.clients.split(",")]
    counts = [int(n) for n in arguments.requests.split(",")]
    counts = counts * len(clients) if len(counts) == 1 else counts
    if len(counts) != len(clients):
        raise SystemExit("--requests: one number, or one per --clients level")
    low, high = (int(n) for n in arguments.prompt_lengths.split(","))
    plan = [(c, workload(n, (low, high), arguments.seed + i)) for i, (c, n) in enumerate(zip(clients, counts))]
    warmup = workload(WARMUP_REQUESTS, (low, high), arguments.seed + 1000)

    print("server run (the engine behind HTTP in a child process) ...", flush=True)
    server_rows, server_end = server_run(arguments, plan, warmup)
    print("direct run (Engine.stream in this process) ...", flush=True)
    direct_rows, direct_end = direct_run(arguments, plan, warmup)
    rows = [row for pair in zip(server_rows, direct_rows) for row in pair]
    ratios = overhead(rows)

    print()
    print(f"espc serve under load: tiny CPU spec, {'artifact ' + arguments.artifact if arguments.artifact else 'static-sp 1+1+1+1'}, "
          f"prompts {low}..{high} tokens, {arguments.max_tokens} output tokens, greedy, streamed")
    print(format_table(rows))
    print()
    print("server overhead (server / direct):")
    for r in ratios:
        print(f"  {r['clients']:>3} clients: requests/s x{r['requests_per_s']:.2f}, TTFT p50 x{r['ttft_p50']:.2f} "
              f"({r['ttft_p50_added_ms']:+.1f} ms), TPOT p50 x{r['tpot_p50']:.2f}")
    print(f"KV held after the runs: server {server_end['kv_used_tokens_after']:.0f} tokens, direct {direct_end['kv_used_tokens_after']} tokens")
    for r in rows:
        for error in r["first_errors"]:
            print(f"  {r['mode']} {r['clients']} clients: error: {error}")
    report = {
        "benchmark": "serve_load", "rows": rows, "overhead": ratios, "end": {"server": server_end, "direct": direct_end},
        "config": {
            "spec": str(SPEC.relative_to(ROOT)), "artifact": arguments.artifact, "engine": STRATEGY,
            "clients": clients, "requests": counts, "max_tokens": arguments.max_tokens, "prompt_lengths": [low, high],
            "seed": arguments.seed,
        },
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
    }
    arguments.json.parent.mkdir(parents=True, exist_ok=True)
    arguments.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {arguments.json}")


if __name__ == "__main__":
    main()
