"""The `espc` command. Thin: every verb parses its arguments and calls the library."""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape

import espc
from espc.frontend import units
from espc.frontend.errors import SpecError
from espc.frontend.loader import load_spec
from espc.frontend.spec import Spec
from espc.frontend.writer import to_dsl, to_toml
from espc.planner.compile.artifact import (
    MANIFEST_FILE, POLICY_FILE, Artifact, ArtifactError, open_artifact, plot_policy, render_ir, spec_hash, write_artifact,
)
from espc.planner.compile.compiler import TRIAL_REQUESTS, CompileOptions, compile_spec
from espc.planner.sim.costmodel import CostModel
from espc.planner.compile.evaluation import DEFAULT_WINDOW_S, Evaluator, compare_strategies, override_workload
from espc.planner.compile.ilp import InfeasibleSLO
from espc.planner.compile.policy import Policy, PolicyError
from espc.planner.compile.report import plot_results, render_comparison, render_policy
from espc.planner.sim.strategies import BASELINES
from espc.planner.sim.workload import TraceError

app = typer.Typer(
    name="espc",
    help="Elastic sequence-parallelism compiler for long-context LLM serving.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

SpecFile = Annotated[Path, typer.Argument(help="a spec file: .toml or .esp (DSL)", show_default=False)]
ArtifactOrSpec = Annotated[Path, typer.Argument(help="a compiled artifact directory or a spec file", show_default=False)]
ArtifactDir = Annotated[Path, typer.Argument(help="an artifact directory written by `espc compile`", show_default=False)]


def _fail(message: str) -> NoReturn:
    typer.echo(message, err=True)
    raise typer.Exit(2)


def _load(path: Path) -> Spec:
    try:
        return load_spec(path)
    except SpecError as error:
        _fail(str(error))


def _version(value: bool) -> None:
    if value:
        typer.echo(f"espc {espc.__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = None,
) -> None:
    """Elastic sequence-parallelism compiler for long-context LLM serving."""


def _summary(path: Path, spec: Spec) -> list[str]:
    model, cluster = spec.model, spec.cluster
    describe = units.describe
    tp = f"tp {cluster.tp} -> {cluster.num_devices // cluster.tp} elastic instances" if cluster.tp else "tp chosen by compile"
    return [
        f"{path}: valid",
        f"model {model.name}: {model.num_parameters:,} parameters "
        f"({describe(model.weight_bytes, units.Kind.BYTES)} {model.dtype}), "
        f"KV {describe(model.kv_bytes_per_token, units.Kind.BYTES)}/token, max context {model.max_context:,}",
        f"cluster: {cluster.num_devices} {cluster.device_kind} devices on {len(cluster.nodes)} node(s), {tp}",
    ]


@app.command()
def check(
    spec_file: SpecFile,
    as_json: Annotated[bool, typer.Option("--json", help="print the normalised spec as JSON")] = False,
) -> None:
    """Validate a spec and print it normalised: every field, presets and defaults filled in."""
    spec = _load(spec_file)
    if as_json:
        typer.echo(json.dumps(spec.model_dump(mode="json"), indent=2))
        return
    typer.echo("".join(f"# {line}\n" for line in _summary(spec_file, spec)) + to_toml(spec, full=True), nl=False)


class Syntax(str, Enum):
    toml = "toml"
    dsl = "dsl"


@app.command()
def fmt(
    spec_file: SpecFile,
    to: Annotated[Syntax, typer.Option("--to", help="the syntax to write")],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="write here instead of stdout")] = None,
    full: Annotated[bool, typer.Option("--full", help="write every field, not only what differs from defaults")] = False,
) -> None:
    """Convert a spec between TOML and the DSL (`.esp`)."""
    spec = _load(spec_file)
    text = to_toml(spec, full) if to is Syntax.toml else to_dsl(spec, full)
    if output is None:
        typer.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")


@app.command()
def schema(
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="write here instead of stdout")] = None,
) -> None:
    """Print the JSON Schema of a spec (for editors and validators)."""
    text = json.dumps(Spec.model_json_schema(), indent=2) + "\n"
    if output is None:
        typer.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")


@app.command(name="compile")
def compile_(
    spec_file: SpecFile,
    output: Annotated[Path, typer.Option("-o", "--output", help="artifact directory to write")],
    search_seconds: Annotated[
        float, typer.Option(help="time budget of the local search around the MILP and static-seed policies (0: no search, no seeds)")
    ] = CompileOptions.search_seconds,
    requests: Annotated[int, typer.Option(help="requests per simulated trial (at least)")] = TRIAL_REQUESTS,
    seed: Annotated[Optional[int], typer.Option(help="workload seed of the trials (default: the spec's)")] = None,
    calibration: Annotated[Optional[Path], typer.Option(help="cost-model calibration from `espc profile`")] = None,
    dump_ir: Annotated[bool, typer.Option("--dump-ir", help="print every stage's output: MILP solutions, trials, the policy")] = False,
) -> None:
    """Solve the MILP for an elastic scaling policy, verify it in simulation and write an artifact directory."""
    spec = _load(spec_file)
    calibrated = None
    if calibration is not None:
        from espc.planner.sim.calibration import CalibrationError, load_calibration

        try:
            calibrated = load_calibration(calibration, spec)
        except CalibrationError as error:
            _fail(str(error))
    if search_seconds < 0 or requests < 1:
        _fail("--search-seconds must be at least 0 and --requests at least 1")
    if output.exists() and not output.is_dir():
        _fail(f"{output}: exists and is not a directory")
    options = CompileOptions(search_seconds, requests, seed)
    progress = _StageProgress()
    try:
        with _native_stdout_to_stderr():
            result = compile_spec(
                spec, spec_hash(spec), spec_file.parent, options, cost=calibrated.cost if calibrated else None,
                on_progress=progress,
            )
        progress("write", f"writing {output}")
        written = write_artifact(output, spec, result, spec_file, options=options, calibration=calibrated)
    except InfeasibleSLO as error:
        progress.close()
        _fail(f"{spec_file}: the SLOs cannot be met: {error}")
    except SpecError as error:
        progress.close()
        _fail(str(error))
    except (TraceError, ArtifactError, PolicyError, OSError, ValueError) as error:
        progress.close()
        _fail(f"{spec_file}: {error}")
    progress.close()
    if dump_ir:
        typer.echo(render_ir(result))
    typer.echo(str(result.policy))
    typer.echo(f"wrote {output}/: {', '.join(path.name for path in written)}")
    typer.echo(f"next: espc inspect {output}; espc compare {output}")


@contextmanager
def _native_stdout_to_stderr() -> Iterator[None]:
    """Native code (the HiGHS solver prints a banner) writes to file descriptor 1, around
    sys.stdout; while it runs, descriptor 1 points at stderr so that stdout holds only the
    command's output (tables, JSON, --dump-ir)."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):
        yield
        return
    try:
        os.dup2(2, 1)
        yield
    finally:
        try:
            ctypes.CDLL(None).fflush(None)  # C stdio buffers still hold text meant for stderr
        except (OSError, AttributeError, TypeError):  # no C library to ask (Windows)
            pass
        os.dup2(saved, 1)
        os.close(saved)


class _StageProgress:
    """Compile progress on stderr: on a terminal a spinner with the current step and one
    line per finished stage with its time; otherwise one plain line per stage."""

    def __init__(self) -> None:
        self.console = Console(stderr=True, highlight=False)
        self.live = self.console.is_terminal
        self.status = self.console.status("")
        self.stage: str | None = None
        self.part: str | None = None
        self.stage_started = self.started = time.perf_counter()
        self.steps = 0
        if self.live:
            self.status.start()

    def __call__(self, stage: str, message: str) -> None:
        if stage != self.stage:
            self._finish()
            self.stage, self.stage_started, self.steps, self.part = stage, time.perf_counter(), 0, None
        # a plain line per stage, and per baseline in "strategies" (their messages start "name: ")
        part = message.split(":", 1)[0] if stage == "strategies" else ""
        if not self.live and part != self.part:
            self.console.print(f"espc compile: {stage}: {message}", markup=False)
        self.part = part
        self.steps += 1
        if self.live:
            self.status.update(f"[bold]{stage}[/bold] {escape(message)}")

    def _finish(self) -> None:
        if self.stage is not None and self.live:
            elapsed = time.perf_counter() - self.stage_started
            steps = f" ({self.steps} steps)" if self.steps > 1 else ""
            self.console.print(f"[green]✓[/green] {self.stage:<10} {elapsed:7.1f} s{escape(steps)}")

    def close(self) -> None:
        self._finish()
        self.stage = None
        if self.live:
            self.status.stop()
            self.console.print(f"  {'total':<10} {time.perf_counter() - self.started:7.1f} s")


@app.command()
def inspect(
    artifact: ArtifactDir,
    plot: Annotated[bool, typer.Option("--plot", help="write the policy plots (PNG) into DIR and print their paths")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print policy.json")] = False,
) -> None:
    """Show a compiled policy: DoP per length bucket, budgets, thresholds, predicted goodput."""
    loaded = _open_artifact(artifact)
    if as_json:
        typer.echo((artifact / POLICY_FILE).read_text(encoding="utf-8"), nl=False)
    else:
        render_policy(loaded, Console(width=None if sys.stdout.isatty() else 160))
    if plot:
        paths = loaded.plots()
        if len(paths) < (2 if loaded.policy.elastic else 1):
            # compiled without plots: draw them (they are not in the manifest, so not verified)
            paths = plot_policy(loaded.policy, artifact)
        for path in paths:
            typer.echo(f"plot {path}", err=True)
        if sys.stdout.isatty() and (sys.platform in ("darwin", "win32") or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
            for path in paths:
                typer.launch(str(path))


_STRATEGIES = ("elastic", *BASELINES)
_SIMULATE_HELP = {
    "rate": typer.Option(help="arrival rate (req/s) instead of the workload's own"),
    "goodput": typer.Option("--goodput", help="find P90 goodput by bisection over the rate instead"),
    "requests": typer.Option(help="number of requests (caps a trace)"),
    "seed": typer.Option(help="first workload seed (default: the spec's)"),
    "seeds": typer.Option(help="repeat over this many seeds and report mean ± spread"),
    "workload": typer.Option(help="replace the prompt lengths, e.g. leval or 'zipf(1.2, 10, 200K)'"),
    "trace": typer.Option(help="replay an Azure CSV or Mooncake JSONL trace instead"),
    "as_json": typer.Option("--json", help="print the results as JSON"),
    "plot": typer.Option(help="write latency CDFs and instance timelines (PNG) here"),
    "window": typer.Option(help="with --goodput: each trial spans at least this many seconds of arrivals"),
}


@app.command()
def simulate(
    target: ArtifactOrSpec,
    strategy: Annotated[
        Optional[str], typer.Option(help=f"one of {', '.join(_STRATEGIES)} (default: the compiled or the spec's)")
    ] = None,
    rate: Annotated[Optional[float], _SIMULATE_HELP["rate"]] = None,
    goodput: Annotated[bool, _SIMULATE_HELP["goodput"]] = False,
    requests: Annotated[Optional[int], _SIMULATE_HELP["requests"]] = None,
    seed: Annotated[Optional[int], _SIMULATE_HELP["seed"]] = None,
    seeds: Annotated[int, _SIMULATE_HELP["seeds"]] = 1,
    workload: Annotated[Optional[str], _SIMULATE_HELP["workload"]] = None,
    trace: Annotated[Optional[Path], _SIMULATE_HELP["trace"]] = None,
    as_json: Annotated[bool, _SIMULATE_HELP["as_json"]] = False,
    plot: Annotated[Optional[Path], _SIMULATE_HELP["plot"]] = None,
    window: Annotated[float, _SIMULATE_HELP["window"]] = DEFAULT_WINDOW_S,
) -> None:
    """Replay the workload in the discrete-event simulator: latencies, SLO attainment, goodput.

    On an artifact directory the compiled spec and policy are used (strategy elastic: the
    compiled elastic policy); on a spec file, strategy elastic solves the policy MILP first."""
    loaded = _load_target(target)
    chosen = strategy or (loaded.policy.strategy if loaded.policy else loaded.spec.policy.strategy)
    _compare(loaded, [chosen], rate, goodput, requests, seed, seeds, workload, trace, as_json, plot, window)


@app.command()
def compare(
    target: ArtifactOrSpec,
    strategies: Annotated[
        Optional[str],
        typer.Option(help=f"comma-separated strategies (default: {','.join(BASELINES)}; on an artifact elastic too)"),
    ] = None,
    rate: Annotated[Optional[float], _SIMULATE_HELP["rate"]] = None,
    goodput: Annotated[bool, _SIMULATE_HELP["goodput"]] = False,
    requests: Annotated[Optional[int], _SIMULATE_HELP["requests"]] = None,
    seed: Annotated[Optional[int], _SIMULATE_HELP["seed"]] = None,
    seeds: Annotated[int, _SIMULATE_HELP["seeds"]] = 1,
    workload: Annotated[Optional[str], _SIMULATE_HELP["workload"]] = None,
    trace: Annotated[Optional[Path], _SIMULATE_HELP["trace"]] = None,
    as_json: Annotated[bool, _SIMULATE_HELP["as_json"]] = False,
    plot: Annotated[Optional[Path], _SIMULATE_HELP["plot"]] = None,
    window: Annotated[float, _SIMULATE_HELP["window"]] = DEFAULT_WINDOW_S,
) -> None:
    """Simulate several strategies on the same workload and print them side by side."""
    loaded = _load_target(target)
    if strategies is None:
        names = list(_STRATEGIES if loaded.policy is not None and loaded.policy.elastic is not None else BASELINES)
    else:
        names = [name.strip() for name in strategies.split(",") if name.strip()]
    _compare(loaded, names, rate, goodput, requests, seed, seeds, workload, trace, as_json, plot, window)


@dataclass(frozen=True)
class _Target:
    """What simulate, compare and graph run on: a spec file or a verified artifact."""

    path: Path
    spec: Spec
    base_dir: Path  # relative paths in the spec (a trace) resolve here
    policy: Policy | None  # compiled, for an artifact directory


def _open_artifact(directory: Path) -> Artifact:
    try:
        return open_artifact(directory)
    except ArtifactError as error:
        _fail(str(error))


def _load_target(target: Path) -> _Target:
    if target.is_dir():
        loaded = _open_artifact(target)
        return _Target(target, loaded.spec, loaded.base_dir, loaded.policy)
    if target.name == MANIFEST_FILE or target.name == POLICY_FILE:
        _fail(f"{target}: give the artifact directory ({target.parent}), not a file inside it")
    return _Target(target, _load(target), target.parent, None)


def _load_spec_target(target: Path) -> Spec:
    return _load_target(target).spec


def _compare(
    target: _Target, strategies: list[str], rate: float | None, goodput: bool, requests: int | None,
    seed: int | None, seeds: int, workload: str | None, trace: Path | None, as_json: bool, plot: Path | None,
    window: float,
) -> None:
    path, spec = target.path, target.spec
    for name in strategies:
        if name == "auto":
            _fail(
                f"strategy 'auto' is decided by `espc compile`: compile the spec (espc compile SPEC -o DIR) and "
                f"simulate DIR, or choose one of {', '.join(_STRATEGIES)}"
            )
        if name not in _STRATEGIES:
            _fail(f"unknown strategy {name!r}; choose from {', '.join(_STRATEGIES)}")
    if rate is not None and goodput:
        _fail("give --rate or --goodput, not both")
    if seeds < 1 or (requests is not None and requests < 1) or (rate is not None and rate <= 0) or window <= 0:
        _fail("--seeds and --requests must be at least 1, --rate and --window positive")
    printer = _progress_printer()
    try:
        spec = override_workload(spec, workload, trace)
        evaluator = Evaluator(
            spec, base_dir=target.base_dir, requests=requests, window_s=window,
            elastic=target.policy.elastic if target.policy is not None else None,
            # The compiled cost model: a calibrated artifact is simulated with its measured times.
            cost=CostModel.from_dict(target.policy.cost_parameters) if target.policy is not None else None,
        )
        first_seed = spec.workload.seed if seed is None else seed
        with _native_stdout_to_stderr():  # strategy elastic on a spec file solves the MILP
            report = compare_strategies(
                evaluator, strategies, range(first_seed, first_seed + seeds), rate, goodput, timeline=plot is not None,
                on_progress=printer,
            )
    except SpecError as error:
        printer(None)
        _fail(str(error))
    except InfeasibleSLO as error:
        printer(None)
        _fail(f"{path}: strategy elastic: the SLOs cannot be met: {error}")
    except (TraceError, ValueError) as error:
        printer(None)
        _fail(f"{path}: {error}")
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2))
    else:
        # Tables are wide: give pipes and files room instead of rich's 80 columns.
        render_comparison(report, Console(width=None if sys.stdout.isatty() else 160))
    if plot is not None:
        for written in plot_results([run.result for run in report.first_runs()], plot):
            typer.echo(f"wrote {written}", err=True)


def _progress_printer():
    """A transient status line on stderr for long searches (nothing when not a terminal)."""
    console = Console(stderr=True)
    status = console.status("")
    if console.is_terminal:
        status.start()

    def update(message: str | None) -> None:
        if message is None:
            status.stop()
        else:
            status.update(message)

    return update


class Launcher(str, Enum):
    spawn = "spawn"
    torchrun = "torchrun"


class Phase(str, Enum):
    prefill = "prefill"
    decode = "decode"


class GraphFormat(str, Enum):
    table = "table"
    code = "code"
    dot = "dot"
    svg = "svg"


@app.command()
def graph(
    target: ArtifactOrSpec,
    phase: Annotated[Phase, typer.Option(help="which iteration to lower")] = Phase.prefill,
    dop: Annotated[int, typer.Option(help="instances in the batch")] = 2,
    rank: Annotated[Optional[int], typer.Option(help="show one rank only")] = None,
    format_: Annotated[GraphFormat, typer.Option("--format", help="output format")] = GraphFormat.table,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="write here instead of stdout")] = None,
    dump_ir: Annotated[Optional[Path], typer.Option("--dump-ir", help="also write every pass's graphs into this directory")] = None,
) -> None:
    """Lower a representative iteration plan and show the per-rank FX graphs."""
    spec = _load_spec_target(target)
    from espc.backend.dump import GraphvizMissing, render_graph  # torch loads only for this verb

    try:
        text = render_graph(spec, phase.value, dop, rank, format_.value, dump_ir)
    except (ValueError, NotImplementedError, GraphvizMissing) as error:
        _fail(f"espc graph: {error}")
    if output is None:
        typer.echo(text)
    else:
        output.write_text(text + "\n", encoding="utf-8")


@app.command()
def run(
    artifact: ArtifactDir,
    prompt: Annotated[Optional[str], typer.Option(help="a text prompt")] = None,
    prompt_ids: Annotated[Optional[str], typer.Option(help="token ids, e.g. 1,2,3")] = None,
    trace: Annotated[Optional[Path], typer.Option(help="replay a request trace (default: the spec's workload)")] = None,
    rate: Annotated[Optional[float], typer.Option(help="rescale the arrivals to this rate (req/s)")] = None,
    requests: Annotated[Optional[int], typer.Option(help="replay this many requests of the workload")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="tokens to generate for --prompt/--prompt-ids")] = 32,
    temperature: Annotated[float, typer.Option(help="0: greedy")] = 0.0,
    seed: Annotated[Optional[int], typer.Option(help="sampling seed, and the replayed workload's seed")] = None,
    kv_capacity: Annotated[Optional[int], typer.Option(help="KV tokens per instance (default: the spec's memory)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print results as JSON")] = False,
    plot: Annotated[Optional[Path], typer.Option(help="draw the elastic timeline into this directory")] = None,
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
            _fail("espc run --launcher torchrun: RANK, WORLD_SIZE and MASTER_ADDR are not set; start it with torchrun")
        if found[0] != 0:
            try:
                serve_worker()
            except LaunchError as error:
                _fail(f"espc run: {error}")
            return
    if prompt is not None and prompt_ids is not None:
        _fail("give --prompt or --prompt-ids, not both")
    if (prompt is not None or prompt_ids is not None) and (trace is not None or rate is not None or requests is not None):
        _fail("--trace, --rate and --requests replay a workload; they do not apply to --prompt/--prompt-ids")
    if (rate is not None and rate <= 0) or (requests is not None and requests < 1) or max_new_tokens < 1:
        _fail("--rate must be positive, --requests and --max-new-tokens at least 1")
    ids = None
    if prompt_ids is not None:
        try:
            ids = [int(token) for token in prompt_ids.split(",")]
        except ValueError:
            _fail(f"--prompt-ids {prompt_ids!r}: expected comma-separated integers, e.g. 1,2,3")
    loaded = _open_artifact(artifact)
    # Imported here: torch and the worker machinery load only for the verbs that need them.
    from espc.runtime.driver import EngineError
    from espc.runtime.engine import Engine
    from espc.runtime.sampling import SamplingParams

    overrides = {"launcher": launcher.value} | ({"kv_capacity": kv_capacity} if kv_capacity else {})
    if prompt is not None or ids is not None:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        try:
            with Engine(loaded.spec, loaded.policy, base_dir=loaded.base_dir, **overrides) as engine:
                [completion] = engine.generate(prompt if ids is None else ids, params)
                engine.check_kv()
        except (EngineError, ValueError) as error:
            _fail(f"espc run: {error}")
        if completion.finish_reason not in ("length", "stop"):
            _fail(f"espc run: request {completion.finish_reason}: {completion.error}")
        if as_json:
            typer.echo(json.dumps(dataclasses.asdict(completion) | {"logits": None}))
        else:
            typer.echo(completion.text if completion.text is not None else ",".join(map(str, completion.token_ids)))
        return
    _replay_workload(loaded, trace, rate, requests, seed, overrides, as_json, plot)


def _replay_workload(loaded: Artifact, trace, rate, requests, seed, overrides, as_json: bool, plot: Path | None) -> None:
    from rich.progress import Progress

    from espc.planner.sim.metrics import isolated_prefill, summarize
    from espc.planner.compile.report import summary_table
    from espc.planner.sim.workload import generate
    from espc.runtime.driver import EngineError
    from espc.runtime.engine import Engine
    from espc.runtime.replay import replay

    try:
        spec = override_workload(loaded.spec, None, trace)
        workload = generate(spec.workload, base_dir=loaded.base_dir, rate=rate, seed=seed, requests=requests)
    except (SpecError, TraceError, ValueError) as error:
        _fail(f"espc run: {error}")
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
        _fail(f"espc run: {error}")
    summary = summarize(done.result, spec.slo, isolated_prefill(cost))
    decisions = {phase: dict(sorted(counts.items())) for phase, counts in done.dop_decisions().items()}
    runtime = {
        "requests": len(workload), "failed": len(done.failed), "wall_s": done.wall_s,
        "output_tokens_per_s": done.output_tokens / done.wall_s if done.wall_s else 0.0,
        "iterations": stats["iterations"], "dop_decisions": decisions,
        "migrated_tokens": stats["migrated_tokens"], "migrated_bytes": stats["migrated_bytes"],
        "kv_after_run": stats["kv_used_tokens"], "graph_cache": stats["graph_cache"], "failures": stats["failures"],
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
            f"KV pools after the run: {sum(stats['kv_used_tokens'])} tokens held (all freed)"
        )
        for index, error in list(done.failed.items())[:5]:
            out.print(f"request {index} failed: {error}")
    if plot is not None:
        for written in plot_results([done.result], plot):
            typer.echo(f"wrote {written}", err=True)


@app.command()
def profile(
    spec_file: SpecFile,
    output: Annotated[Path, typer.Option("-o", "--output", help="calibration file to write")] = Path("calibration.json"),
    quick: Annotated[bool, typer.Option("--quick", help="a small grid that takes seconds (tests, CI); not for planning")] = False,
    repeats: Annotated[int, typer.Option(help="timed runs per grid point after a warm-up; the median counts")] = 3,
) -> None:
    """Measure prefill, decode and KV migration on the spec's devices and fit the cost model.

    Prints measured vs fitted time per grid point and writes the calibration file that
    `espc compile --calibration FILE` reads."""
    spec = _load(spec_file)
    if repeats < 1:
        _fail(f"--repeats must be at least 1, got {repeats}")
    if output.is_dir() or not output.parent.is_dir():
        _fail(f"{output}: cannot write the calibration file there (a directory, or its directory does not exist)")
    from rich.progress import Progress

    from espc.backend.harness import HarnessError  # torch loads only for this verb
    from espc.planner.sim.calibration import format_calibration, write_calibration
    from espc.runtime.profile import Grid
    from espc.runtime.profile import profile as measure

    console = Console(stderr=True)
    with Progress(console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("starting the workers", total=None)
        try:
            calibration = measure(
                spec, grid=Grid.quick(spec) if quick else None, repeats=repeats,
                on_progress=lambda done, total, what: bar.update(task, completed=done, total=total, description=what),
            )
        except (HarnessError, ValueError) as error:  # a ProfileError, or a fit the measurements cannot determine
            _fail(f"{spec_file}: espc profile: {error}")
    try:
        write_calibration(output, calibration)
    except OSError as error:
        _fail(f"{output}: cannot write the calibration file: {error.strerror or error}")
    typer.echo(format_calibration(calibration))
    typer.echo(f"wrote {output}; next: espc compile {spec_file} --calibration {output} -o DIR")


_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


@app.command()
def serve(
    artifact: ArtifactDir,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    served_model_name: Annotated[
        Optional[str], typer.Option(help="the model name clients send (default: the spec's model.name)")
    ] = None,
    kv_capacity: Annotated[Optional[int], typer.Option(help="KV tokens per instance (default: the spec's memory)")] = None,
    log_level: Annotated[str, typer.Option(help="the HTTP server's log level: " + ", ".join(_LOG_LEVELS))] = "info",
) -> None:
    """Serve the compiled policy over an OpenAI-compatible HTTP API: /v1/completions (streamed
    with server-sent events), /v1/models, /health and /metrics (Prometheus); admission control
    comes from the spec's `serving` section. Stops on Ctrl-C."""
    if not 0 <= port <= 65535:
        _fail(f"--port {port}: expected 0..65535")
    if kv_capacity is not None and kv_capacity < 1:
        _fail("--kv-capacity must be at least 1")
    if log_level not in _LOG_LEVELS:
        _fail(f"--log-level {log_level!r}: expected one of {', '.join(_LOG_LEVELS)}")
    loaded = _open_artifact(artifact)
    try:  # imported here: the web stack and torch load only for this verb
        from espc.runtime.server import bind, terminate_as_interrupt
        from espc.runtime.server import serve as serve_http
    except ImportError as error:
        _fail(f"espc serve needs FastAPI and uvicorn ({error}): pip install fastapi uvicorn")
    terminate_as_interrupt()  # SIGTERM, even while the workers start, closes them like Ctrl-C
    from espc.runtime.driver import EngineError
    from espc.runtime.engine import Engine

    try:
        sock = bind(host, port)  # before the workers start: a busy port fails at once
    except OSError as error:
        _fail(f"espc serve: cannot listen on {host}:{port}: {error.strerror or error}")
    name = served_model_name or loaded.spec.model.name
    overrides = {"kv_capacity": kv_capacity} if kv_capacity else {}
    console = Console(stderr=True)

    def ready(url: str) -> None:
        console.print(
            f"espc serve: {escape(name)} ({loaded.policy.strategy}, {loaded.spec.cluster.num_devices} workers) at {url}\n"
            f"  curl {url}/v1/completions -H 'Content-Type: application/json' "
            f"-d '{{\"model\": \"{escape(name)}\", \"prompt\": \"Hello\", \"max_tokens\": 16}}'",
            highlight=False, soft_wrap=True,
        )

    try:
        with sock, Engine(loaded.spec, loaded.policy, base_dir=loaded.base_dir, **overrides) as engine:
            serve_http(engine, sock, model_name=name, log_level=log_level, on_ready=ready)
    except (EngineError, ValueError) as error:
        _fail(f"espc serve: {error}")
    except KeyboardInterrupt:
        pass


def main() -> None:
    app(prog_name="espc")
