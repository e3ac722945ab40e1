"""bench: load-test a serving endpoint (`espc bench serve`)."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table

from espc.cli.common import fail

app = typer.Typer()
bench = typer.Typer(help="Measure a running server under load.", no_args_is_help=True)
app.add_typer(bench, name="bench")


def _range(option: str, text: str) -> tuple[int, int]:
    """`N` or `LOW:HIGH` token counts."""
    try:
        low, _, high = text.partition(":")
        bounds = (int(low), int(high or low))
    except ValueError:
        fail(f"{option} {text!r}: expected a token count N or a range LOW:HIGH")
    if not 1 <= bounds[0] <= bounds[1]:
        fail(f"{option} {text!r}: expected 1 <= LOW <= HIGH")
    return bounds


def _seconds(option: str, text: str | None) -> float | None:
    if text is None:
        return None
    from espc.frontend.units import Kind, parse_quantity

    try:
        value = float(parse_quantity(text, Kind.DURATION))
    except ValueError as error:
        fail(f"{option} {text!r}: {error}")
    if value <= 0:
        fail(f"{option} {text!r}: must be positive")
    return value


@bench.command("serve")
def serve(
    base_url: Annotated[str, typer.Option(help="the server, e.g. http://127.0.0.1:8000 (any OpenAI-compatible completions endpoint)")],
    model: Annotated[str | None, typer.Option(help="the model name to send (default: the first of GET /v1/models)")] = None,
    trace: Annotated[Path | None, typer.Option(help="replay a trace's arrivals and lengths: Azure CSV or Mooncake JSONL")] = None,
    request_rate: Annotated[float, typer.Option(help="Poisson arrivals per second (inf: all at once); without --trace")] = math.inf,
    num_requests: Annotated[int | None, typer.Option(help="requests to send (default 100 without --duration; a trace: all)")] = None,
    duration: Annotated[str | None, typer.Option(help="send the requests arriving within this time, e.g. 60s")] = None,
    speedup: Annotated[float, typer.Option(help="replay the trace this many times faster")] = 1.0,
    input_len: Annotated[str, typer.Option(help="prompt tokens: N or LOW:HIGH (uniform); without --trace")] = "128",
    output_len: Annotated[str, typer.Option(help="output tokens: N or LOW:HIGH (uniform); without --trace")] = "16",
    max_input_len: Annotated[int | None, typer.Option(help="cap the trace's prompt lengths")] = None,
    max_output_len: Annotated[int | None, typer.Option(help="cap the trace's output lengths")] = None,
    max_concurrency: Annotated[int | None, typer.Option(help="requests in flight at most (default: no cap)")] = None,
    slo_ttft: Annotated[str | None, typer.Option(help="goodput's TTFT bound, e.g. 2s")] = None,
    slo_tpot: Annotated[str | None, typer.Option(help="goodput's TPOT bound, e.g. 50ms")] = None,
    spec: Annotated[Path | None, typer.Option(help="take the SLO bounds from this spec's slo section")] = None,
    vocab: Annotated[int, typer.Option(help="prompt token ids are drawn below this")] = 256,
    ignore_eos: Annotated[bool, typer.Option(help="send ignore_eos (vLLM/espc) so each request generates its full length")] = True,
    seed: Annotated[int, typer.Option(help="seed of the prompts, lengths and arrivals")] = 0,
    json_path: Annotated[Path | None, typer.Option("--json", help="write the summary and every request's times here")] = None,
    plot: Annotated[Path | None, typer.Option(help="write latency CDFs (TTFT, TPOT, E2E) to this image")] = None,
) -> None:
    """Send streamed completions to a server as a Poisson process or a replayed trace, and
    print TTFT, TPOT and end-to-end percentiles, throughput and goodput against the SLO
    (like `vllm bench serve`). Prompts are random token ids."""
    from espc.runtime import loadgen

    if spec is not None and (slo_ttft or slo_tpot):
        fail("give the SLO with --spec or with --slo-ttft/--slo-tpot, not both")
    if trace is not None and request_rate != math.inf:
        fail("--request-rate is for Poisson arrivals; a trace brings its own (scale them with --speedup)")
    if request_rate <= 0 or speedup <= 0:
        fail("--request-rate and --speedup must be positive")
    for name, value in (("--num-requests", num_requests), ("--max-concurrency", max_concurrency), ("--vocab", vocab),
                        ("--max-input-len", max_input_len), ("--max-output-len", max_output_len)):
        if value is not None and value < 1:
            fail(f"{name} must be at least 1, got {value}")
    window = _seconds("--duration", duration)
    if trace is None and num_requests is None and window is None:
        num_requests = 100
    if trace is None and window is not None and math.isinf(request_rate) and num_requests is None:
        fail("--duration needs a finite --request-rate (or a --num-requests)")
    try:
        if trace is not None:
            requests = loadgen.trace_requests(
                trace, count=num_requests, duration_s=window, speedup=speedup, max_input_len=max_input_len,
                max_output_len=max_output_len, seed=seed, vocab=vocab,
            )
        else:
            requests = loadgen.poisson_requests(
                num_requests, request_rate, _range("--input-len", input_len), _range("--output-len", output_len),
                seed=seed, duration_s=window, vocab=vocab,
            )
    except ValueError as error:  # a TraceError names the file and line
        fail(f"espc bench serve: {error}")
    if not requests:
        fail("espc bench serve: no request arrives within --duration")
    if spec is not None:
        from espc.frontend.errors import SpecError

        try:
            slo = loadgen.slo_from_spec(spec)
        except SpecError as error:
            fail(str(error))
    else:
        ttft, tpot = _seconds("--slo-ttft", slo_ttft), _seconds("--slo-tpot", slo_tpot)
        described = ", ".join(part for part in (f"ttft {slo_ttft}" if ttft else "", f"tpot {slo_tpot}" if tpot else "") if part)
        slo = loadgen.SLO(None if ttft is None else (lambda prompt_len: ttft), tpot, described or "none")

    console, log = Console(), Console(stderr=True)
    try:
        served_model, _ = asyncio.run(loadgen.discover_model(base_url)) if model is None else (model, None)
    except (OSError, ValueError, KeyError, loadgen.HTTPError) as error:
        fail(f"espc bench serve: cannot list the models of {base_url} ({type(error).__name__}: {error}); pass --model")
    run = _run(loadgen, base_url, requests, served_model, max_concurrency, ignore_eos, log)
    run.config = {
        "base_url": base_url, "model": served_model, "trace": str(trace) if trace else None, "request_rate": request_rate,
        "requests": len(requests), "duration": window, "speedup": speedup, "input_len": input_len, "output_len": output_len,
        "max_input_len": max_input_len, "max_output_len": max_output_len, "max_concurrency": max_concurrency,
        "ignore_eos": ignore_eos, "seed": seed, "vocab": vocab,
    }
    summary = loadgen.summarize(run, slo)
    console.print(_table(summary, served_model, trace, request_rate))
    for message in summary["first_errors"]:
        log.print(f"error: {escape(message)}", highlight=False)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(loadgen.report(run, summary), indent=2) + "\n")
        log.print(f"wrote {json_path}")
    if plot is not None:
        loadgen.plot_cdfs(run, plot, slo)
        log.print(f"wrote {plot}")
    if summary["completed"] == 0:
        raise typer.Exit(1)


def _run(loadgen, base_url, requests, model, max_concurrency, ignore_eos, log: Console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[bold]requests"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[failed]} failed"),
        TimeElapsedColumn(), console=log, transient=True,
    ) as progress:
        task = progress.add_task("load", total=len(requests), failed=0)
        failed = 0

        def done(result) -> None:
            nonlocal failed
            failed += result.error is not None
            progress.update(task, advance=1, failed=failed)

        try:
            return asyncio.run(loadgen.run_load(
                base_url, requests, model=model, max_concurrency=max_concurrency, ignore_eos=ignore_eos, on_done=done,
            ))
        except ValueError as error:
            fail(f"espc bench serve: {error}")


def _table(summary: dict, model: str, trace: Path | None, rate: float) -> Group:
    """The run's summary (requests, throughput, goodput) above its latency percentiles."""
    source = f"trace {trace.name}" if trace else f"Poisson {rate:g} req/s" if not math.isinf(rate) else "all at once"
    totals = Table(title=f"espc bench serve: {escape(model)}, {source}", title_justify="left", show_header=False)
    totals.add_column("what")
    totals.add_column("value", justify="right")
    totals.add_row("requests", f"{summary['completed']} completed, {summary['failed']} failed")
    totals.add_row("duration", f"{summary['duration_s']:.2f} s")
    totals.add_row("throughput", f"{summary['request_throughput']:.2f} req/s, {summary['output_token_throughput']:.1f} output tok/s")
    totals.add_row("goodput", f"{summary['goodput']:.2f} req/s ({summary['slo_attainment']:.1%} of requests met the SLO)")
    totals.add_row("SLO", escape(summary["slo"]))
    latencies = Table()
    latencies.add_column("latency (ms)")
    for column in ("mean", "p50", "p90", "p99"):
        latencies.add_column(column, justify="right")
    for label, key in (("TTFT", "ttft_s"), ("TPOT", "tpot_s"), ("E2E", "e2e_s")):
        values = summary[key]
        latencies.add_row(label, *(f"{values[column] * 1e3:.1f}" for column in ("mean", "p50", "p90", "p99")))
    return Group(totals, latencies)
