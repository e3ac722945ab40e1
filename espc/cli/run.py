"""run: serve requests with the compiled policy on the spec's devices, one prompt or a
workload replayed in real time. This module imports the evaluation and the report (so
cvxpy); torch and the workers load inside the verb."""

from __future__ import annotations

import dataclasses
import json
import sys
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from espc.cli.common import ArtifactDir, fail, load_artifact
from espc.frontend import units
from espc.frontend.errors import SpecError
from espc.planner.compile.artifact import Artifact
from espc.planner.compile.evaluation import override_workload
from espc.planner.compile.report import plot_results
from espc.planner.sim.costmodel import CostModel
from espc.planner.sim.workload import TraceError

if TYPE_CHECKING:
    from espc.runtime.engine import EngineOverrides

app = typer.Typer()


class Launcher(str, Enum):
    spawn = "spawn"
    torchrun = "torchrun"


@app.command()
def run(
    artifact: ArtifactDir,
    prompt: Annotated[str | None, typer.Option(help="a text prompt")] = None,
    prompt_ids: Annotated[str | None, typer.Option(help="token ids, e.g. 1,2,3")] = None,
    trace: Annotated[Path | None, typer.Option(help="replay a request trace (default: the spec's workload)")] = None,
    rate: Annotated[float | None, typer.Option(help="rescale the arrivals to this rate (req/s)")] = None,
    requests: Annotated[int | None, typer.Option(help="replay this many requests of the workload")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="tokens to generate for --prompt/--prompt-ids")] = 32,
    temperature: Annotated[float, typer.Option(help="0: greedy")] = 0.0,
    seed: Annotated[int | None, typer.Option(help="sampling seed, and the replayed workload's seed")] = None,
    kv_capacity: Annotated[int | None, typer.Option(help="KV tokens per instance (default: the spec's memory)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print results as JSON")] = False,
    plot: Annotated[Path | None, typer.Option(help="draw the elastic timeline into this directory")] = None,
    launcher: Annotated[
        Launcher, typer.Option(help="spawn: workers on this machine; torchrun: run under torchrun, one process per device")
    ] = Launcher.spawn,
) -> None:
    """Serve requests with the compiled policy on the spec's devices: one prompt, or a
    workload replayed in real time with its latencies, SLO attainment and DoP decisions.

    Across machines: `torchrun --nnodes N --nproc-per-node P --rdzv-endpoint HOST:PORT -m espc
    run DIR --launcher torchrun` on every node; RANK 0 drives, every other rank is a worker."""
    if launcher is Launcher.torchrun:
        from espc.runtime.launch import LaunchError, serve_worker, torchrun_rank

        found = torchrun_rank()
        if found is None:
            fail("espc run --launcher torchrun: RANK, WORLD_SIZE and MASTER_ADDR are not set; start it with torchrun")
        if found[0] != 0:
            try:
                serve_worker()
            except LaunchError as error:
                fail(f"espc run: {error}")
            return
    if prompt is not None and prompt_ids is not None:
        fail("give --prompt or --prompt-ids, not both")
    if (prompt is not None or prompt_ids is not None) and (trace is not None or rate is not None or requests is not None):
        fail("--trace, --rate and --requests replay a workload; they do not apply to --prompt/--prompt-ids")
    if (rate is not None and rate <= 0) or (requests is not None and requests < 1) or max_new_tokens < 1:
        fail("--rate must be positive, --requests and --max-new-tokens at least 1")
    ids = None
    if prompt_ids is not None:
        try:
            ids = [int(token) for token in prompt_ids.split(",")]
        except ValueError:
            fail(f"--prompt-ids {prompt_ids!r}: expected comma-separated integers, e.g. 1,2,3")
    loaded = load_artifact(artifact)
    # Imported here: torch and the worker machinery load only for the verbs that need them.
    from espc.runtime.driver import EngineError
    from espc.runtime.engine import Engine
    from espc.runtime.sampling import SamplingParams

    overrides: EngineOverrides = {"launcher": launcher.value, **({"kv_capacity": kv_capacity} if kv_capacity else {})}
    if prompt is not None or ids is not None:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        request = prompt if ids is None else ids
        assert request is not None  # --prompt or --prompt-ids was given (the test above)
        try:
            with Engine(loaded.spec, loaded.policy, base_dir=loaded.base_dir, **overrides) as engine:
                [completion] = engine.generate(request, params)
                engine.check_kv()
        except (EngineError, ValueError) as error:
            fail(f"espc run: {error}")
        if completion.finish_reason not in ("length", "stop"):
            fail(f"espc run: request {completion.finish_reason}: {completion.error}")
        if as_json:
            typer.echo(json.dumps(dataclasses.asdict(completion) | {"logits": None}))
        else:
            typer.echo(completion.text if completion.text is not None else ",".join(map(str, completion.token_ids)))
        return
    _replay_workload(loaded, trace, rate, requests, seed, overrides, as_json, plot)


def _replay_workload(
    loaded: Artifact, trace, rate, requests, seed, overrides: EngineOverrides, as_json: bool, plot: Path | None,
) -> None:
    from rich.progress import Progress

    from espc.planner.compile.report import summary_table
    from espc.planner.sim.metrics import isolated_prefill, summarize
    from espc.planner.sim.workload import generate
    from espc.runtime.driver import EngineError
    from espc.runtime.engine import Engine
    from espc.runtime.replay import replay

    try:
        spec = override_workload(loaded.spec, None, trace)
        workload = generate(spec.workload, base_dir=loaded.base_dir, rate=rate, seed=seed, requests=requests)
    except (SpecError, TraceError, ValueError) as error:
        fail(f"espc run: {error}")
    cost = CostModel.from_dict(loaded.policy.cost_parameters)
    console = Console(stderr=True)
    try:
        with Engine(spec, loaded.policy, base_dir=loaded.base_dir, **overrides) as engine:
            with Progress(console=console, transient=True, disable=as_json) as progress:
                task = progress.add_task(f"replaying {len(workload)} requests", total=len(workload))
                done = replay(engine, workload, seed=seed or 0, on_progress=lambda n, total: progress.update(task, completed=n))
            engine.check_kv()
            stats = engine.stats()
    except (EngineError, ValueError) as error:
        fail(f"espc run: {error}")
    summary = summarize(done.result, spec.slo, isolated_prefill(cost))
    decisions = {phase: dict(sorted(counts.items())) for phase, counts in done.dop_decisions().items()}
    runtime = {
        "requests": len(workload), "failed": len(done.failed), "wall_s": done.wall_s,
        "output_tokens_per_s": done.output_tokens / done.wall_s if done.wall_s else 0.0,
        "iterations": stats["iterations"], "dop_decisions": decisions,
        "migrated_tokens": stats["migrated_tokens"], "migrated_bytes": stats["migrated_bytes"],
        "kv_after_run": stats["kv_used_tokens"], "kv_cached_after_run": stats["kv_cached_tokens"],
        "prefix_cache": stats["prefix_cache"], "graph_cache": stats["graph_cache"], "failures": stats["failures"],
    }
    if as_json:
        typer.echo(json.dumps({"summary": dataclasses.asdict(summary), "runtime": runtime}, indent=2, default=str))
    else:
        out = Console(width=None if sys.stdout.isatty() else 160)
        out.print(summary_table([summary], f"espc run: {loaded.policy.strategy} ({loaded.policy.configuration}), measured"))
        dop = "; ".join(
            f"{phase} " + ", ".join(f"dop {d}: {n}" for d, n in counts.items()) for phase, counts in decisions.items()
        )
        out.print(
            f"{len(workload)} requests in {done.wall_s:.1f} s ({len(done.failed)} failed), "
            f"{runtime['output_tokens_per_s']:.1f} output tokens/s, {stats['iterations']} iterations\n"
            f"batches by degree of parallelism: {dop}\n"
            f"migrations: {stats['migrated_tokens']:,} tokens, {units.describe(stats['migrated_bytes'], units.Kind.BYTES)}\n"
            f"{stats['graph_cache']}\n"
            f"{_prefix_line(stats['prefix_cache'])}\n"
            f"KV pools after the run: {sum(stats['kv_used_tokens']):,} tokens held, "
            + ("all by cached prefixes" if stats["kv_used_tokens"] == stats["kv_cached_tokens"]
               else f"{sum(stats['kv_used_tokens']) - sum(stats['kv_cached_tokens']):,} of them leaked (not cached prefixes)")
        )
        for index, failure in list(done.failed.items())[:5]:
            out.print(f"request {index} failed: {failure}")
    if plot is not None:
        for written in plot_results([done.result], plot):
            typer.echo(f"wrote {written}", err=True)


def _prefix_line(cache: dict) -> str:
    """The prefix cache's use in one line."""
    if not cache["enabled"]:
        return "prefix cache: off"
    share = cache["hit_tokens"] / cache["queried_tokens"] if cache["queried_tokens"] else 0.0
    return (
        f"prefix cache: {cache['hit_tokens']:,} of {cache['queried_tokens']:,} prompt tokens read from it ({share:.1%}), "
        f"{cache['entries']} entries holding {cache['cached_blocks']:,} blocks, {cache['evicted_blocks']:,} blocks evicted"
    )
