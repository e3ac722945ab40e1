"""Tables and plots of simulation results (`espc simulate`, `espc compare`) and of compiled
policies (`espc inspect`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from espc.planner.compile.artifact import (
    BUCKET_COLUMNS,
    SKIPPED_COLUMNS,
    Artifact,
    bucket_rows,
    prefix_caching_line,
    skipped_rows,
    solver_rows,
    target_line,
    threshold_rows,
)
from espc.planner.compile.evaluation import Comparison
from espc.planner.sim.metrics import GOODPUT_LABELS, LatencyStats, Summary
from espc.planner.sim.simulator import SimulationResult

# Drawing more bars than this makes matplotlib crawl; later batches are left out and the
# title says so.
_MAX_TIMELINE_BATCHES = 20_000


def _ms(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _percentiles(stats: LatencyStats) -> str:
    return f"{_ms(stats.p50)} / {_ms(stats.p90)} / {_ms(stats.p99)}"


def _tokens(count: int) -> str:
    return f"{count // 1024}K" if count >= 1024 else str(count)


def summary_table(summaries: Sequence[Summary], title: str) -> Table:
    """One column per run: latency percentiles, attainment, throughput, traffic."""
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    for summary in summaries:
        table.add_column(summary.strategy, justify="right")
    rows = [
        ("requests (completed / rejected)", lambda s: f"{s.completed} / {s.rejected}"),
        ("SLO attainment (both)", lambda s: f"{s.attainment:.1%}"),
        ("  TTFT met / TPOT met", lambda s: f"{s.ttft_attainment:.1%} / {s.tpot_attainment:.1%}"),
        ("  per prompt-length class", lambda s: " / ".join(f"{_tokens(low)}+: {a:.0%}" for low, a in s.class_attainment)),
        ("TTFT p50 / p90 / p99", lambda s: _percentiles(s.ttft)),
        ("TPOT p50 / p90 / p99", lambda s: _percentiles(s.tpot)),
        ("end-to-end p50 / p90 / p99", lambda s: _percentiles(s.e2e)),
        ("queueing p50 / p90 / p99", lambda s: _percentiles(s.queueing)),
        ("throughput", lambda s: f"{s.throughput_rps:.3g} req/s, {s.output_tokens_per_s:,.0f} tok/s"),
        ("preemptions", lambda s: f"{s.preemptions}"),
        ("KV migrated", lambda s: f"{s.migrated_bytes / 2**30:.2f} GiB"),
        ("mean instance utilisation", lambda s: f"{s.mean_utilisation:.1%}"),
    ]
    for label, cell in rows:
        table.add_row(label, *(cell(summary) for summary in summaries))
    return table


def bucket_table(summary: Summary) -> Table:
    """Latency by prompt length: where long requests starve shows up here."""
    table = Table(title=f"{summary.strategy}: by prompt length", title_justify="left")
    for column in ("prompt tokens", "requests", "attainment", "TTFT p90", "end-to-end p90"):
        table.add_column(column, justify="right")
    for bucket in summary.buckets:
        high = "∞" if math.isinf(bucket.high) else f"{bucket.high:,}"
        table.add_row(
            f"[{bucket.low:,}, {high})", str(bucket.count), f"{bucket.attainment:.1%}",
            _ms(bucket.ttft_p90_s), _ms(bucket.e2e_p90_s),
        )
    return table


def plot_results(results: Sequence[SimulationResult], directory: Path) -> list[Path]:
    """TTFT and TPOT CDFs of every run, and each run's per-instance timeline, as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for result in results:
        for axis, metric in zip(axes, ("ttft_s", "tpot_s")):
            values = sorted(getattr(r, metric) for r in result.records if r.completed)
            if values:
                axis.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=result.strategy)
    for axis, name in zip(axes, ("TTFT (s)", "TPOT (s)")):
        axis.set_xlabel(name)
        axis.set_ylabel("share of requests")
        axis.set_xscale("log")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    written.append(directory / "latency_cdf.png")
    figure.savefig(written[-1], dpi=120)
    plt.close(figure)

    for index, result in enumerate(results):
        if not result.timeline:
            continue
        figure, axis = plt.subplots(figsize=(11, 0.4 * len(result.instance_busy_s) + 1.5))
        # (phase, spans several instances) -> colour
        colours = {
            ("prefill", False): "tab:orange", ("prefill", True): "tab:red",
            ("decode", False): "tab:blue", ("decode", True): "tab:purple",
        }
        shown = result.timeline[:_MAX_TIMELINE_BATCHES]
        for batch in shown:
            colour = colours[batch.phase, len(batch.instances) > 1]
            for instance in batch.instances:
                axis.barh(instance, batch.end_s - batch.start_s, left=batch.start_s, color=colour, linewidth=0)
        axis.set_xlabel("time (s)")
        axis.set_ylabel("instance")
        title = f"{result.strategy}: prefill orange (red: on several instances), decode blue (purple: several)"
        if len(shown) < len(result.timeline):
            title += f"; first {len(shown):,} of {len(result.timeline):,} batches"
        axis.set_title(title, fontsize=9)
        axis.invert_yaxis()
        figure.tight_layout()
        written.append(directory / f"timeline_{index}.png")
        figure.savefig(written[-1], dpi=120)
        plt.close(figure)
    return written


def _mean_spread(values: Sequence[float]) -> str:
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.4g}"
    spread = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean:.4g} ± {spread:.2g}"


def render_comparison(comparison: Comparison, console: Console) -> None:
    """Goodput (if searched), the latency table of the first seed, per-length tables, and
    mean ± spread over seeds."""
    seeds = comparison.seeds
    if comparison.goodputs is not None:
        title = f"{GOODPUT_LABELS[comparison.metric]} (req/s) over seeds {', '.join(map(str, seeds))}"
        table = Table(title=title, title_justify="left")
        for column in ("strategy", "goodput", "best configuration", "configurations searched"):
            table.add_column(column, justify="right" if column != "strategy" else "left")
        for strategy, found in comparison.goodputs.items():
            table.add_row(
                strategy, _mean_spread([g.goodput.rate for g in found]), found[0].configuration,
                str(found[0].configurations_searched),
            )
        console.print(table)
    first = comparison.first_runs()
    where = "at its goodput" if comparison.goodputs is not None else (
        f"at {comparison.rate} req/s" if comparison.rate else "at the workload's rate"
    )
    console.print(summary_table([run.summary for run in first], f"seed {seeds[0]}, each strategy {where}"))
    for run in first:
        console.print(bucket_table(run.summary))
    if len(seeds) > 1:
        table = Table(title=f"mean ± spread over {len(seeds)} seeds", title_justify="left")
        for column in ("strategy", "attainment", "worst class", "TTFT p90 (s)", "TPOT p90 (ms)"):
            table.add_column(column, justify="right" if column != "strategy" else "left")
        for strategy, runs in comparison.runs.items():
            table.add_row(
                strategy, _mean_spread([r.summary.attainment for r in runs]),
                _mean_spread([r.summary.worst_class_attainment for r in runs]),
                _mean_spread([r.summary.ttft.p90 for r in runs]), _mean_spread([r.summary.tpot.p90 * 1e3 for r in runs]),
            )
        console.print(table)
    for run in first:
        if run.configurations_searched > 1:
            console.print(f"{run.strategy}: best of {run.configurations_searched} configurations: {run.configuration}")


def render_policy(artifact: Artifact, console: Console) -> None:
    """`espc inspect`: the chosen strategy and why, whether it was compiled to run, prefix
    caching's estimated reuse, predicted goodput per strategy and the candidates left out
    (with the reason), the elastic policy per length bucket, its thresholds, solver
    statistics."""
    policy = artifact.policy
    source = f" from {artifact.source}" if artifact.source is not None else ""
    console.print(
        f"{artifact.directory}: policy schema {policy.schema_version}, espc {policy.espc_version}, "
        f"spec {policy.spec_hash[:12]}{source}",
        highlight=False, markup=False,
    )
    console.print(f"strategy {policy.strategy} ({policy.configuration}): {policy.reason}", highlight=False, markup=False)
    console.print(target_line(policy), highlight=False, markup=False)
    console.print(prefix_caching_line(policy, artifact.spec), highlight=False, markup=False)

    table = Table(title=f"predicted {GOODPUT_LABELS[policy.goodput_metric]} per strategy", title_justify="left")
    for column in ("strategy", "best configuration", "goodput (req/s)", "vs chosen", "configurations searched"):
        table.add_column(column, justify="left" if column in ("strategy", "best configuration") else "right")
    chosen = policy.prediction(policy.strategy)
    for p in sorted(policy.predictions, key=lambda p: -p.goodput_rps):
        relative = f"{p.goodput_rps / chosen.goodput_rps:.2f}×" if chosen and chosen.goodput_rps else "-"
        name = f"{p.strategy} (chosen)" if p.strategy == policy.strategy else p.strategy
        table.add_row(name, p.configuration, f"{p.goodput_rps:.4g}", relative, str(p.configurations_searched))
    console.print(table)
    if policy.skipped:
        table = Table(title="candidates left out (not simulated)", title_justify="left")
        for column in SKIPPED_COLUMNS:
            table.add_column(column, overflow="fold")
        for skipped in skipped_rows(policy):
            table.add_row(*map(escape, skipped))  # reasons quote errors: not markup
        console.print(table)

    if policy.elastic is not None:
        table = Table(title=f"elastic policy (tp={policy.elastic.tp}): per prompt-length bucket", title_justify="left")
        for column in BUCKET_COLUMNS:
            table.add_column(column, justify="left" if column == "within SLO" else "right")
        for row in bucket_rows(policy):
            table.add_row(*row)
        console.print(table)
        table = Table(title="thresholds", title_justify="left")
        table.add_column("threshold")
        table.add_column("value")
        for row in threshold_rows(policy):
            table.add_row(*row)
        console.print(table)
    else:
        console.print(f"no elastic policy: the spec asks for {policy.strategy}", highlight=False, markup=False)
    title = "solver and prediction vs simulation" if policy.solver is not None else "compile"
    table = Table(title=title, title_justify="left")
    table.add_column("")
    table.add_column("value", justify="right")
    for row in solver_rows(policy):
        table.add_row(*row)
    console.print(table)
