"""The artifact directory `espc compile` writes, and its verified loading.

    policy.json      the Policy (espc.planner.compile.policy), JSON, sorted keys
    spec.lock.json   the normalised spec it was compiled from, its hash, the espc version, the
                     compile options and the calibration file (`espc profile`) it used, if any
    report.md        the compile report for people: chosen strategy and why, whether it was
                     compiled to run, predicted goodput per strategy, the candidates left out
                     and why, the elastic policy per length bucket, thresholds, solver
                     statistics, MILP prediction vs simulation, the search trials
    goodput.png      predicted goodput per strategy
    buckets.png      the elastic policy's DoP cap, instance cap and batch budget per bucket
    manifest.json    sha256 and size of every other file

`load_artifact` checks all of it before anything runs from the directory: the manifest
lists every file and each file's hash, the policy schema is the one this espc reads, and
the lock file's spec hashes to what the policy was compiled from. Every failure is an
`ArtifactError` naming the file and what is wrong. JSON only: nothing is unpickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from espc._version import __version__
from espc.frontend.spec import Spec
from espc.planner.compile.policy import POLICY_SCHEMA_VERSION, Policy, PolicyError, format_instances
from espc.planner.sim.metrics import GOODPUT_LABELS

MANIFEST_VERSION = 1
POLICY_FILE = "policy.json"
LOCK_FILE = "spec.lock.json"
REPORT_FILE = "report.md"
MANIFEST_FILE = "manifest.json"
GOODPUT_PLOT = "goodput.png"
BUCKETS_PLOT = "buckets.png"
PLOT_FILES = (GOODPUT_PLOT, BUCKETS_PLOT)
_REQUIRED = (POLICY_FILE, LOCK_FILE)
_RECOMPILE = "recompile with `espc compile SPEC -o DIR`"

if TYPE_CHECKING:  # the compiler pulls in the solver; loading an artifact does not need it
    from espc.planner.compile.compiler import CompileOptions, CompileResult
    from espc.planner.sim.calibration import Calibration


class ArtifactError(Exception):
    """An artifact directory that is missing, incomplete, edited or from another espc."""


def canonical_spec(spec: Spec) -> dict[str, Any]:
    """The normalised spec as JSON data (every field, presets and defaults filled in)."""
    return spec.model_dump(mode="json")


def spec_hash(spec: Spec) -> str:
    """sha256 of the spec's canonical JSON: normalised, sorted keys, no whitespace."""
    text = json.dumps(canonical_spec(spec), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _json_text(data: Any) -> str:
    try:
        return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"
    except ValueError as error:  # NaN or infinity: not JSON, and not a number a policy should hold
        raise ArtifactError(f"cannot write the artifact: {error}") from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------- writing


def write_artifact(
    directory: str | Path, spec: Spec, result: CompileResult, spec_path: str | Path | None = None, *,
    options: CompileOptions | None = None, plots: bool = True, calibration: Calibration | None = None,
) -> list[Path]:
    """Write the artifact directory (see the module docstring); returns the files written,
    the manifest last. `options` (the compile's search budget, trial size, seed) and the
    `calibration` the cost model came from are recorded in the lock file and the report.
    The manifest is removed first and written last, so an interrupted write leaves a
    directory that `load_artifact` refuses rather than a stale one."""
    directory = Path(directory)
    policy = result.policy
    computed = spec_hash(spec)
    if policy.spec_hash != computed:
        raise ArtifactError(f"the policy was compiled from spec {policy.spec_hash[:12]}, not this spec ({computed[:12]})")
    if directory.exists() and not directory.is_dir():
        raise ArtifactError(f"{directory}: exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    for name in (MANIFEST_FILE, *PLOT_FILES):  # a previous compile's files must not linger
        (directory / name).unlink(missing_ok=True)

    written: list[Path] = []

    def write(name: str, text: str) -> None:
        (directory / name).write_text(text, encoding="utf-8")
        written.append(directory / name)

    write(POLICY_FILE, _json_text(policy.to_json()))
    lock = {
        "espc_version": __version__,
        "spec_hash": computed,
        "source": str(Path(spec_path).resolve()) if spec_path is not None else None,
        # What decides the policy: the worker count does not (parallel.fork_map).
        "compile_options": (
            {name: value for name, value in dataclasses.asdict(options).items() if name != "workers"}
            if options is not None else None
        ),
        "calibration": _calibration_record(calibration),
        "spec": canonical_spec(spec),
    }
    write(LOCK_FILE, _json_text(lock))
    if plots:
        written += plot_policy(policy, directory)
    plotted = [path.name for path in written if path.suffix == ".png"]
    write(REPORT_FILE, render_report(spec, result, spec_path, plotted, options, calibration))

    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "espc_version": __version__,
        "files": {
            path.name: {"sha256": _sha256(path), "size": path.stat().st_size} for path in sorted(written)
        },
    }
    write(MANIFEST_FILE, _json_text(manifest))
    return written


def _calibration_record(calibration: Calibration | None) -> dict[str, Any] | None:
    """Which calibration file the cost model came from (its fits are in the policy)."""
    if calibration is None:
        return None
    return {"source": calibration.source, "sha256": calibration.sha256, "conditions": dict(calibration.conditions)}


# ------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Artifact:
    """A verified artifact directory."""

    directory: Path
    policy: Policy
    spec: Spec
    source: Path | None  # the spec file it was compiled from, when recorded
    files: Mapping[str, Mapping[str, Any]]  # the manifest's listing

    @property
    def base_dir(self) -> Path:
        """Where relative paths in the spec (a trace) resolve: the spec file's directory."""
        return self.source.parent if self.source is not None else self.directory

    def plots(self) -> list[Path]:
        return [self.directory / name for name in PLOT_FILES if name in self.files]


def load_artifact(directory: str | Path) -> tuple[Policy, Spec]:
    """The verified policy and spec of an artifact directory; ArtifactError otherwise."""
    artifact = open_artifact(directory)
    return artifact.policy, artifact.spec


def open_artifact(directory: str | Path) -> Artifact:
    """`load_artifact` with the manifest listing and the spec's source path."""
    directory = Path(directory)
    if not directory.exists():
        raise ArtifactError(f"{directory}: no such artifact directory — {_RECOMPILE}")
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: not a directory; an artifact is the directory `espc compile -o DIR` writes")
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ArtifactError(
            f"{manifest_path}: missing — not an espc artifact directory, or its compile did not finish; {_RECOMPILE}"
        )
    manifest = _read_json(manifest_path)
    version = manifest.get("manifest_version")
    if version != MANIFEST_VERSION:
        raise ArtifactError(
            f"{manifest_path}: manifest version {version!r}; this espc {__version__} reads version {MANIFEST_VERSION} — {_RECOMPILE}"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(entry, dict) for entry in files.values()):
        raise ArtifactError(f"{manifest_path}: malformed: 'files' must map file names to {{sha256, size}}")
    for name in _REQUIRED:
        if name not in files:
            raise ArtifactError(f"{manifest_path}: does not list {name} — {_RECOMPILE}")
    for name, entry in sorted(files.items()):
        if Path(name).name != name or name in ("", ".", "..", MANIFEST_FILE):
            raise ArtifactError(f"{manifest_path}: lists {name!r}, which is not a file of the artifact directory")
        path = directory / name
        if not path.is_file():
            raise ArtifactError(f"{path}: missing (listed in {MANIFEST_FILE}) — {_RECOMPILE}")
        if _sha256(path) != entry.get("sha256") or path.stat().st_size != entry.get("size"):
            raise ArtifactError(
                f"{path}: sha256 mismatch with {MANIFEST_FILE} (file edited after compile?) — {_RECOMPILE}"
            )

    policy_path = directory / POLICY_FILE
    data = _read_json(policy_path)
    schema = data.get("schema_version")
    if schema != POLICY_SCHEMA_VERSION:
        raise ArtifactError(
            f"{policy_path}: policy schema version {schema!r}; this espc {__version__} reads version "
            f"{POLICY_SCHEMA_VERSION} — {_RECOMPILE}"
        )
    try:
        policy = Policy.from_json(data)
    except PolicyError as error:
        raise ArtifactError(f"{policy_path}: {error}") from None

    lock_path = directory / LOCK_FILE
    lock = _read_json(lock_path)
    raw_spec, recorded = lock.get("spec"), lock.get("spec_hash")
    if not isinstance(raw_spec, dict) or not isinstance(recorded, str):
        raise ArtifactError(f"{lock_path}: malformed: needs 'spec' (an object) and 'spec_hash' (a string)")
    if recorded != policy.spec_hash:
        raise ArtifactError(
            f"{lock_path}: spec hash {recorded[:12]} does not match {POLICY_FILE} (compiled from spec "
            f"{policy.spec_hash[:12]}); the two files come from different compiles — {_RECOMPILE}"
        )
    try:
        spec = Spec.model_validate(raw_spec)
    except ValidationError as error:
        raise ArtifactError(
            f"{lock_path}: the locked spec is not valid for espc {__version__} "
            f"({error.error_count()} error(s), first: {_first_error(error)}) — {_RECOMPILE}"
        ) from None
    if spec_hash(spec) != recorded:
        raise ArtifactError(
            f"{lock_path}: the locked spec normalises to hash {spec_hash(spec)[:12]} under espc {__version__}, "
            f"not the recorded {recorded[:12]} (compiled by espc {lock.get('espc_version')}) — {_RECOMPILE}"
        )
    source = lock.get("source")
    return Artifact(directory, policy, spec, Path(source) if isinstance(source, str) else None, files)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing — {_RECOMPILE}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ArtifactError(f"{path}: cannot read: {error}") from None
    except json.JSONDecodeError as error:
        raise ArtifactError(f"{path}:{error.lineno}:{error.colno}: not valid JSON: {error.msg}") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path}: does not hold a JSON object")
    return data


def _first_error(error: ValidationError) -> str:
    first = error.errors(include_url=False)[0]
    return f"{'.'.join(map(str, first['loc']))}: {first['msg']}"


# ------------------------------------------------------------------------------- report


def _rate(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4g}"


def _tokens(value: int) -> str:
    return f"{value:,}"


def bucket_rows(policy: Policy) -> list[tuple[str, ...]]:
    """(bucket, prompt tokens, share, DoP cap, batch tokens, max instances, instances,
    within SLO) per length bucket — "any" where the bucket names no instances, "best
    effort" where the compiler gives the bucket's requests up within the attainment's
    slack; shared by report.md and `espc inspect`."""
    if policy.elastic is None:
        return []
    rows: list[tuple[str, ...]] = []
    for index, bucket in enumerate(policy.elastic.buckets):
        rows.append((
            str(index), f"[{bucket.low:,}, {bucket.high:,})", f"{bucket.share:.1%}", str(bucket.prefill_dop),
            _tokens(bucket.batch_tokens), str(bucket.max_instances),
            "any" if bucket.instances is None else format_instances(bucket.instances),
            "yes" if bucket.within_slo else "best effort",
        ))
    return rows


BUCKET_COLUMNS = (
    "bucket", "prompt tokens", "share", "DoP cap", "batch tokens", "max instances", "instances", "within SLO",
)

SKIPPED_COLUMNS = ("strategy", "configuration", "left out because")


def skipped_rows(policy: Policy) -> list[tuple[str, str, str]]:
    """(strategy, configuration, reason) per candidate compile left out; shared by report.md
    and `espc inspect`."""
    return [(s.strategy, s.configuration, s.reason) for s in policy.skipped]


def target_line(policy: Policy) -> str:
    """Whether the policy was compiled to run (held to the runtime's limits) or for
    simulation only; shared by report.md and `espc inspect`."""
    if policy.runnable:
        return (
            "compiled to run: every candidate was held to the runtime's limits, so `espc run` serves the choice "
            "(`espc compile --simulation-only` lifts them)"
        )
    return (
        "compiled for simulation only: the runtime's limits were not applied, and `espc run` refuses a choice the "
        "runtime cannot serve (`espc compile --runnable` applies them)"
    )


def prefix_caching_line(policy: Policy, spec: Spec) -> str:
    """Whether prefix caching is on and how much of the workload it reuses, by compile's
    estimate (espc.planner.sim.reuse); shared by report.md and `espc inspect`."""
    if not spec.runtime.prefix_caching:
        return "prefix caching off (runtime.prefix_caching = false): every prompt token is computed"
    if policy.prefix_reusable_share is None:
        return "prefix caching on (this compile recorded no estimate of its reuse)"
    line = (
        f"prefix caching on: {policy.prefix_reusable_share:.1%} of the workload sample's prompt tokens repeat an "
        "earlier request's blocks (the upper bound of the hit rate)"
    )
    if policy.prefix_hit_share is None:
        return line + "; no MILP was solved"
    return line + f"; the MILP priced {policy.prefix_hit_share:.1%} as cache hits (LRU over the cluster's KV)"


def threshold_rows(policy: Policy) -> list[tuple[str, str]]:
    elastic = policy.elastic
    if elastic is None:
        return []
    return [
        ("tp per instance", str(elastic.tp)),
        ("instance weight (batching DP)", f"{elastic.instance_weight:g} requests"),
        ("decode scale-up", f"{'on' if elastic.scale_up else 'off'}, past {elastic.decode_instance_tokens:,} KV tokens per instance"),
        ("admission reserve", f"{elastic.reserve_output_tokens:,} output tokens per request"),
        ("migration", f"{'on' if elastic.migration else 'off'}, cooldown {elastic.cooldown_iterations} iterations, "
                      f"stall ≤ {elastic.migration_max_stall_s * 1e3:g} ms"),
        ("starvation bound", f"{elastic.starvation_bound_s:g} s"),
    ]


def solver_rows(policy: Policy) -> list[tuple[str, str]]:
    rows = []
    if policy.solver is not None:
        s = policy.solver
        rows += [
            ("solver", s.solver),
            ("status", s.status),
            ("objective (req/s)", _rate(s.objective)),
            ("MIP gap", "-" if s.gap is None else f"{s.gap:.3g}"),
            ("solve time", f"{s.seconds:.2f} s"),
            ("variables / constraints", f"{s.variables:,} / {s.constraints:,}"),
        ]
    simulated = policy.prediction("elastic")
    if policy.milp_predicted_rps is not None:
        rows.append(("MILP predicted rate", f"{_rate(policy.milp_predicted_rps)} req/s"))
    if simulated is not None:
        rows.append((f"simulated {GOODPUT_LABELS[policy.goodput_metric]} (elastic)", f"{_rate(simulated.goodput_rps)} req/s"))
        if policy.milp_predicted_rps:
            rows.append(("simulated / MILP", f"{simulated.goodput_rps / policy.milp_predicted_rps:.2f}×"))
    rows.append(("cost model", cost_model_summary(policy.cost_parameters)))
    rows.append(("compile time", f"{policy.compile_seconds:.1f} s"))
    return rows


def cost_model_summary(cost_parameters: Mapping[str, Any]) -> str:
    """Whether the cost model (CostModel.to_dict) is analytical or which (sp, tp) cases and
    migration parameters `espc profile` calibrated."""
    fitted = []
    for phase in ("prefill", "decode"):
        sps_per_tp: dict[int, list[str]] = {}
        for fit in cost_parameters.get(f"{phase}_fits", ()):
            sps_per_tp.setdefault(fit["tp"], []).append(str(fit["sp"]))
        if sps_per_tp:
            fitted.append(f"{phase} " + ", ".join(f"SP{','.join(sps)}·TP{tp}" for tp, sps in sps_per_tp.items()))
    bandwidth = cost_parameters.get("parameters", {}).get("migration_bandwidth")
    if bandwidth is not None:
        latency_s = cost_parameters["parameters"]["migration_latency_s"]
        fitted.append(f"migration {latency_s * 1e3:.3g} ms + {bandwidth / 1e9:.3g} GB/s")
    return f"calibrated: {'; '.join(fitted)}" if fitted else "analytical (not calibrated)"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool] | None = None) -> list[str]:
    right = right or [False] * len(header)
    cells = [[cell.replace("|", "\\|") for cell in row] for row in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if r else "---" for r in right) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return lines


def render_report(
    spec: Spec, result: CompileResult, spec_path: str | Path | None = None, plots: Sequence[str] = (),
    options: CompileOptions | None = None, calibration: Calibration | None = None,
) -> str:
    """report.md: what compile chose and why, with the numbers behind it."""
    policy = result.policy
    lines = [f"# espc compile report: {spec.model.name} on {spec.cluster.num_devices} {spec.cluster.device_kind} device(s)", ""]
    if spec_path is not None:
        lines.append(f"- spec: `{spec_path}` (sha256 `{policy.spec_hash}`)")
    else:
        lines.append(f"- spec sha256: `{policy.spec_hash}`")
    lines += [
        f"- espc {policy.espc_version}, policy schema {policy.schema_version}, compiled in {policy.compile_seconds:.1f} s",
        f"- SLOs: TTFT {spec.slo.ttft.shorthand()}, TPOT {spec.slo.tpot.shorthand()}, attainment {spec.slo.attainment:.0%}",
        f"- requested strategy: `{spec.policy.strategy}`",
        f"- {target_line(policy)}",
        f"- {prefix_caching_line(policy, spec)}",
    ]
    if options is not None:
        seed = spec.workload.seed if options.seed is None else options.seed
        lines.append(
            f"- compile options: search {options.search_seconds:g} s, ≥ {options.trial_requests} requests per trial, "
            f"workload seed {seed}"
        )
    if calibration is not None:
        lines.append(f"- cost model calibrated by `espc profile`: `{calibration.source}` (sha256 `{calibration.sha256}`)")
    lines += [
        "",
        "## Chosen strategy",
        "",
        f"**{policy.strategy}** ({policy.configuration}): {policy.reason}.",
        "",
        f"## Predicted {GOODPUT_LABELS[policy.goodput_metric]} per strategy",
        "",
    ]
    chosen = policy.prediction(policy.strategy)
    rows = []
    for p in sorted(policy.predictions, key=lambda p: -p.goodput_rps):
        relative = f"{p.goodput_rps / chosen.goodput_rps:.2f}×" if chosen and chosen.goodput_rps else "-"
        rows.append((p.strategy, p.configuration, _rate(p.goodput_rps), relative, str(p.configurations_searched)))
    lines += _table(("strategy", "best configuration", "goodput (req/s)", "vs chosen", "configurations searched"),
                    rows, (False, False, True, True, True))
    if GOODPUT_PLOT in plots:
        lines += ["", f"![predicted goodput per strategy]({GOODPUT_PLOT})"]
    if policy.skipped:
        lines += ["", "## Candidates left out", "",
                  "Compile compares only candidates it can price alike and emit: these were not simulated.", ""]
        lines += _table(SKIPPED_COLUMNS, skipped_rows(policy))

    if policy.elastic is not None:
        lines += ["", f"## Elastic policy (tp={policy.elastic.tp})", "",
                  "Per prompt-length bucket: the most instances one prefill batch may span (DoP cap), the token "
                  "budget of a batch whose longest prompt falls in the bucket, and the most instances the "
                  "bucket's prefills may hold at once. A best-effort bucket's requests are expected to "
                  "miss their SLOs (within the attainment's slack).", ""]
        lines += _table(BUCKET_COLUMNS, bucket_rows(policy), (True, True, True, True, True, True, False))
        if BUCKETS_PLOT in plots:
            lines += ["", f"![DoP cap and batch budget per bucket]({BUCKETS_PLOT})"]
        lines += ["", "## Thresholds", ""]
        lines += _table(("threshold", "value"), threshold_rows(policy))

    lines += ["", "## Solver and prediction vs simulation", ""]
    lines += _table(("", "value"), solver_rows(policy))
    if result.milp:
        lines += ["", "MILP solutions (one per tp the spec allows):", ""]
        lines += _table(
            ("tp", "predicted rate (req/s)", "load", "prompt tokens priced as cache hits", "status", "solve time"),
            [
                (str(s.tp), _rate(s.rate), f"{s.load:.2f}", "off" if s.prefix_hit_share is None else f"{s.prefix_hit_share:.1%}",
                 s.solver.status, f"{s.solver.seconds:.2f} s")
                for s in result.milp
            ],
            (True, True, True, True, False, True),
        )

    lines += ["", "## Search trials", ""]
    if result.trials:
        lines.append("Every candidate simulated: `verify` runs each MILP policy, `seed` the elastic equivalents of the "
                     "best screened static groupings, `search` the neighbours of the best two "
                     "(kept when the goodput improves by more than the bisection tolerance).")
        lines.append("")
        lines += _table(("#", "stage", "candidate", "goodput (req/s)"),
                        [(str(i), t.stage, t.label, _rate(t.goodput_rps)) for i, t in enumerate(result.trials)],
                        (True, False, False, True))
    else:
        lines.append("None: the elastic strategy was not compiled.")
    lines += ["", "## Files", "",
              f"- `{POLICY_FILE}`: the policy (`espc inspect DIR`, `espc simulate DIR`, `espc compare DIR`)",
              f"- `{LOCK_FILE}`: the normalised spec, its sha256 and the espc version",
              f"- `{MANIFEST_FILE}`: sha256 and size of every file; `espc` refuses a directory that does not match",
              ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------- plots


def _short_rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 1000 else f"{value:.3g}"


def plot_policy(policy: Policy, directory: Path) -> list[Path]:
    """goodput.png (every strategy's predicted goodput) and, with an elastic policy,
    buckets.png (DoP cap, instance cap and batch budget per length bucket)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

    directory.mkdir(parents=True, exist_ok=True)
    metadata = {"Software": None}  # the same policy draws the same bytes
    written = []

    predictions = sorted(policy.predictions, key=lambda p: -p.goodput_rps)
    figure, axis = plt.subplots(figsize=(max(5.0, 1.1 * len(predictions) + 2), 3.6))
    colours = ["tab:red" if p.strategy == policy.strategy else "tab:gray" for p in predictions]
    bars = axis.bar([p.strategy for p in predictions], [p.goodput_rps for p in predictions], color=colours, width=0.6)
    axis.set_xlim(-0.8, max(len(predictions), 2) - 0.2)
    axis.bar_label(bars, labels=[_short_rate(p.goodput_rps) for p in predictions], fontsize=8)
    axis.set_ylabel(f"{GOODPUT_LABELS[policy.goodput_metric]} (req/s)")
    axis.set_title(f"predicted goodput per strategy (chosen: {policy.strategy}, red)", fontsize=9)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    written.append(directory / GOODPUT_PLOT)
    figure.savefig(written[-1], dpi=110, metadata=metadata)
    plt.close(figure)

    if policy.elastic is not None:
        buckets = policy.elastic.buckets
        best_effort = [not getattr(b, "within_slo", True) for b in buckets]
        labels = [f"[{b.low:,},\n{b.high:,})" + ("*" if given_up else "") for b, given_up in zip(buckets, best_effort)]
        positions = list(range(len(buckets)))
        figure, (left, right) = plt.subplots(1, 2, figsize=(max(8.0, 1.1 * len(buckets) + 3), 3.8))
        width = 0.4
        left.bar([x - width / 2 for x in positions], [b.prefill_dop for b in buckets], width, label="DoP cap")
        left.bar([x + width / 2 for x in positions], [b.max_instances for b in buckets], width, label="max instances")
        left.set_ylabel("instances")
        left.yaxis.set_major_locator(MaxNLocator(integer=True))
        left.set_title(f"prefill instances per bucket (tp={policy.elastic.tp})", fontsize=9)
        left.legend(fontsize=7)
        budget_bars = right.bar(positions, [b.batch_tokens for b in buckets], color="tab:green")
        right.bar_label(budget_bars, labels=[f"{b.batch_tokens:,}" for b in buckets], fontsize=7)
        right.set_yscale("log")
        right.set_ylim(bottom=min(b.batch_tokens for b in buckets) / 2, top=max(b.batch_tokens for b in buckets) * 2)
        right.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
        right.yaxis.set_minor_formatter(NullFormatter())
        right.set_ylabel("batch budget (tokens)")
        right.set_title("prefill batch token budget per bucket", fontsize=9)
        for axis in (left, right):
            axis.set_xticks(positions, labels, fontsize=7)
            axis.set_xlabel("prompt tokens" + (" (* best effort)" if any(best_effort) else ""))
            axis.grid(axis="y", alpha=0.3)
        figure.tight_layout()
        written.append(directory / BUCKETS_PLOT)
        figure.savefig(written[-1], dpi=110, metadata=metadata)
        plt.close(figure)
    return written


# ------------------------------------------------------------------------------- --dump-ir


def _timeless_policy(policy: Policy) -> dict[str, Any]:
    """policy.json without wall-clock fields, so dumps of the same compile compare equal."""
    data = policy.to_json()
    data.pop("compile_seconds", None)
    if data.get("solver") is not None:
        data["solver"] = {key: value for key, value in data["solver"].items() if key != "seconds"}
    return data


def render_ir(result: CompileResult) -> str:
    """Every stage's output of a compile, in order, as deterministic text (`--dump-ir`):
    the MILP solution per tp, the simulated trials (verify, seed, search) and the final Policy.
    Wall-clock times are left out; everything else is printed in full precision."""
    lines = []
    for solution in result.milp:
        s = solution.solver
        lines += [
            f"== stage milp: tp={solution.tp} ==",
            f"predicted rate {solution.rate!r} req/s, load {solution.load!r}",
            f"solver {s.solver}: {s.status}, objective {s.objective!r}, gap {s.gap!r}, "
            f"{s.variables} variables, {s.constraints} constraints",
            str(solution.policy),
            "",
        ]
    if not result.milp:
        lines += ["== stage milp: skipped (the spec's strategy is a baseline) ==", ""]
    lines += [f"== stage metric: {result.policy.goodput_metric} ==", ""]
    for stage in ("verify", "seed", "search", "ablate"):
        trials = [(index, trial) for index, trial in enumerate(result.trials) if trial.stage == stage]
        lines.append(f"== stage {stage}: {len(trials)} trial(s) ==")
        lines += [f"{index:4d}  {trial.label:40s} {trial.goodput_rps!r} req/s" for index, trial in trials]
        lines.append("")
    lines.append(f"== stage strategies: predicted {GOODPUT_LABELS[result.policy.goodput_metric]} ==")
    lines += [
        f"{p.strategy:14s} {p.goodput_rps!r} req/s  {p.configuration} ({p.configurations_searched} searched)"
        for p in result.policy.predictions
    ]
    lines += ["", "== stage choose: policy.json (wall-clock fields left out) =="]
    lines.append(json.dumps(_timeless_policy(result.policy), indent=2, sort_keys=True, ensure_ascii=False))
    return "\n".join(lines) + "\n"
