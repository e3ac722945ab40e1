"""`espc profile` and `espc compile --calibration`: fitting, calibration files, the CLI.

One quick profile of a 2-worker tiny spec (a few seconds) is shared by the module; the
fitting tests use synthetic measurements and start no workers."""

import hashlib
import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

import espc
from espc.cli.main import app
from espc.frontend.loader import load_spec
from espc.planner.compile.artifact import load_artifact
from espc.planner.sim.calibration import (
    MIN_ITERATION_SHARE,
    CalibrationError,
    Measurement,
    fit,
    iteration_seconds,
    load_calibration,
    write_calibration,
)
from espc.planner.sim.costmodel import CostModel

SPECS = Path(__file__).resolve().parent.parent / "specs"
TINY = SPECS / "tiny-cpu.toml"
ELASTIC = '\n[policy]\nstrategy = "elastic"\nlength_buckets = 3\n'
FAST = ["--search-seconds", "0", "--requests", "60"]
runner = CliRunner()


def write_spec(directory: Path, name: str, *replacements: tuple[str, str]) -> Path:
    """The tiny spec on 2 workers (an elastic-only policy, so compiles stay short), edited;
    its context and prompts halved to what two workers' KV pools hold."""
    text = TINY.read_text().replace("devices = 4", "devices = 2") + ELASTIC
    for old, new in (("max_context = 8192", "max_context = 4096"), ('"zipf(1.1, 16, 6K)"', '"zipf(1.1, 16, 4K)"')):
        assert old in text
        text = text.replace(old, new)
    for old, new in replacements:
        assert old in text
        text = text.replace(old, new)
    path = directory / name
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    """(spec file, calibration file, the profile's CliRunner result)."""
    root = tmp_path_factory.mktemp("profile")
    spec = write_spec(root, "two.toml")
    calibration = root / "calibration.json"
    result = runner.invoke(app, ["profile", str(spec), "-o", str(calibration), "--quick"])
    assert result.exit_code == 0, result.output
    return spec, calibration, result


# --------------------------------------------------------------------------- measuring


def test_profile_prints_measured_vs_fitted_and_writes_the_file(profiled):
    spec, calibration, result = profiled
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["phase", "dop", "shape", "measured", "fitted", "error"]
    for phase, dop in (("prefill", 1), ("prefill", 2), ("decode", 1), ("decode", 2), ("migration", 2)):
        assert any(line.split()[:2] == [phase, str(dop)] for line in lines), phase
    assert f"wrote {calibration}; next: espc compile {spec} --calibration {calibration} -o DIR" in result.stdout
    data = json.loads(calibration.read_text())
    assert data["kind"] == "espc-calibration" and data["conditions"]["world"] == 2


def test_quick_profile_fits_finite_positive_coefficients_for_every_measurement(profiled):
    """What a real profile must give on any machine. How well the fit predicts is not
    asserted on these timings (a busy CI machine makes them anything): the fit's accuracy is
    tested on synthetic measurements below (test_fit_*)."""
    spec, calibration, _ = profiled
    loaded = load_calibration(calibration, load_spec(spec))
    cost = loaded.cost
    assert set(cost.prefill_fits) == set(cost.decode_fits) == {(1, 1), (2, 1)}
    for fitted in [*cost.prefill_fits.values(), *cost.decode_fits.values()]:
        coefficients = (fitted.alpha_s, fitted.beta_s, fitted.gamma_s)
        assert all(math.isfinite(c) and c >= 0 for c in coefficients) and fitted.alpha_s > 0
    p = cost.parameters
    # A busy machine can hide the bandwidth behind the latency: then the link's is kept.
    assert (p.migration_bandwidth is None or p.migration_bandwidth > 0) and p.migration_latency_s >= 0
    # The runtime's dispatch per phase and dop; contention: a factor per number of other
    # instances busy (0 .. world − dop), 1 alone, never below a smaller number's.
    assert {phase: set(by_dop) for phase, by_dop in loaded.conditions["dispatch_s"].items()} == {
        "prefill": {"1", "2"}, "decode": {"1", "2"}
    }
    assert set(cost.contention) == {("prefill", 1), ("prefill", 2), ("decode", 1), ("decode", 2)}
    assert cost.admission_s == loaded.conditions["admission_s"] >= 0
    for (phase, dop), factors in cost.contention.items():
        assert len(factors) == 2 - dop + 1 and factors[0] == 1.0
        assert all(later >= earlier for earlier, later in zip(factors, factors[1:])), (phase, dop, factors)
    errors = loaded.errors()
    assert len(errors) == 18
    assert all(predicted > 0 and math.isfinite(error) for _, predicted, error in errors)


def test_the_calibration_file_round_trips(profiled, tmp_path):
    spec_file, calibration, _ = profiled
    spec = load_spec(spec_file)
    loaded = load_calibration(calibration, spec)
    assert loaded.sha256 == hashlib.sha256(calibration.read_bytes()).hexdigest()
    assert loaded.source == str(calibration.resolve())
    copy = tmp_path / "copy.json"
    write_calibration(copy, loaded)
    again = load_calibration(copy, spec)
    assert again.cost.to_dict() == loaded.cost.to_dict()
    assert again.measurements == loaded.measurements and again.conditions == loaded.conditions
    assert copy.read_bytes() == calibration.read_bytes()


@pytest.mark.parametrize(
    "replacement, message",
    [
        (('device = { name = "cpu", memory = "3MiB" }', 'device = "A100"'),
         "measures CPU workers only for now; the spec's cluster has cuda devices"),
        (("tp = 1 ", "tp = 2 "), "measures instances of tp = 1 only for now; the spec sets cluster.tp = 2"),
    ],
    ids=["cuda", "tp2"],
)
def test_profile_refuses_what_it_cannot_measure(tmp_path, replacement, message):
    spec = write_spec(tmp_path, "spec.toml", replacement)
    result = runner.invoke(app, ["profile", str(spec), "-o", str(tmp_path / "c.json"), "--quick"])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "c.json").exists()


@pytest.mark.parametrize(
    "args, message",
    [(["--repeats", "0"], "--repeats must be at least 1, got 0"), (["-o", "missing/c.json"], "cannot write the calibration file")],
)
def test_profile_argument_errors(tmp_path, args, message):
    spec = write_spec(tmp_path, "spec.toml")
    result = runner.invoke(app, ["profile", str(spec), *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


# ---------------------------------------------------------------------- compiling with it


def test_compile_uses_the_calibration_and_records_it(profiled, tmp_path):
    spec_file, calibration, _ = profiled
    out = tmp_path / "artifact"
    result = runner.invoke(app, ["compile", str(spec_file), "--calibration", str(calibration), "-o", str(out), *FAST])
    assert result.exit_code == 0, result.output
    policy, spec = load_artifact(out)
    calibrated = load_calibration(calibration, spec).cost.to_dict()
    assert policy.cost_parameters == calibrated
    assert calibrated != CostModel.from_spec(spec).to_dict()  # what a compile without --calibration records
    lock = json.loads((out / "spec.lock.json").read_text())
    assert lock["calibration"]["sha256"] == hashlib.sha256(calibration.read_bytes()).hexdigest()
    assert f"`{calibration.resolve()}` (sha256 `{lock['calibration']['sha256']}`)" in (out / "report.md").read_text()
    shown = runner.invoke(app, ["inspect", str(out)])
    assert "calibrated: prefill SP1,2·TP1; decode SP1,2·TP1; migration" in shown.stdout


@pytest.mark.parametrize(
    "replacement, difference",
    [
        (("devices = 2", "devices = 3"), "cluster.nodes[0].devices: measured 2, the spec has 3"),
        (('preset = "tiny"', 'preset = "tiny"\nlayers = 1'), "model.layers: measured 2, the spec has 1"),
    ],
    ids=["cluster", "model"],
)
def test_a_calibration_of_another_spec_is_refused(profiled, tmp_path, replacement, difference):
    _, calibration, _ = profiled
    other = write_spec(tmp_path, "other.toml", replacement)
    result = runner.invoke(app, ["compile", str(other), "--calibration", str(calibration), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert f"{calibration}: measured for another spec — " in result.output and difference in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()
    with pytest.raises(CalibrationError, match="measured for another spec"):
        espc.compile(other, calibration=calibration)


def _edited(calibration: Path, edit) -> str:
    data = json.loads(calibration.read_text())
    edit(data)
    return json.dumps(data)


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "cannot read the calibration file: No such file or directory"),
        ("{not json", "not a calibration file (invalid JSON"),
        ("[1, 2]", 'not a calibration file (no "kind": "espc-calibration")'),
        (lambda data: data.update(schema=99), "calibration schema 99; this espc reads schema 1 — profile again"),
        (lambda data: data.pop("measurements"), "malformed calibration file: KeyError: 'measurements'"),
        (lambda data: data["measurements"][0].update(samples=[0.0]), "samples [0.0] must be > 0 seconds"),
        (lambda data: data["cost_model"].update(prefill_fits=[{"sp": 1}]), "malformed calibration file: KeyError: 'tp'"),
    ],
    ids=["missing", "invalid-json", "not-an-object", "schema", "no-measurements", "zero-sample", "bad-fit"],
)
def test_bad_calibration_files_give_clear_errors(profiled, tmp_path, content, message):
    spec, calibration, _ = profiled
    bad = tmp_path / "bad.json"
    if callable(content):
        bad.write_text(_edited(calibration, content))
    elif content is not None:
        bad.write_text(content)
    result = runner.invoke(app, ["compile", str(spec), "--calibration", str(bad), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"{bad}: ") and message in result.output, result.output
    assert "Traceback" not in result.output


# ----------------------------------------------------------------------------- fitting


def synthetic(phase, dop, batches, seconds_of):
    return [Measurement(phase, dop, tuple(lengths), (seconds_of(lengths),)) for lengths in batches]


PREFILL_BATCHES = [(16,), (256,), (1024,), (64,) * 4, (128,) * 8, (512,) * 2]
DECODE_BATCHES = [(64,), (64,) * 8, (512,), (512,) * 8, (2048,) * 2]


def test_fit_tells_a_dense_kernel_from_a_per_request_one():
    """A masked kernel over the batch costs (Σn)² in prefill and B·Σctx in decode; flash
    attention Σn² and Σctx. `calibrate` keeps the form that fits."""
    spec = load_spec(TINY)
    dense = fit(spec, [
        *synthetic("prefill", 2, PREFILL_BATCHES, lambda b: 2e-3 + 1e-6 * sum(b) + 4e-8 * sum(b) ** 2),
        *synthetic("decode", 2, DECODE_BATCHES, lambda b: 3e-3 + 2e-8 * len(b) * sum(b) + 1e-4 * len(b)),
    ], {}).cost
    per_request = fit(spec, [
        *synthetic("prefill", 2, PREFILL_BATCHES, lambda b: 2e-3 + 1e-6 * sum(b) + 4e-8 * sum(n * n for n in b)),
        *synthetic("decode", 2, DECODE_BATCHES, lambda b: 3e-3 + 2e-8 * sum(b) + 1e-4 * len(b)),
    ], {}).cost
    assert dense.prefill_fits[(2, 1)].dense and dense.decode_fits[(2, 1)].dense
    assert not per_request.prefill_fits[(2, 1)].dense and not per_request.decode_fits[(2, 1)].dense
    assert dense.prefill_time([100, 300], 2, 1) == pytest.approx(2e-3 + 1e-6 * 400 + 4e-8 * 400**2)
    assert per_request.prefill_time([100, 300], 2, 1) == pytest.approx(2e-3 + 1e-6 * 400 + 4e-8 * (100**2 + 300**2))
    assert dense.decode_time([100, 300], 2, 1) == pytest.approx(3e-3 + 2e-8 * 2 * 400 + 2e-4)
    assert per_request.decode_time([100, 300], 2, 1) == pytest.approx(3e-3 + 2e-8 * 400 + 2e-4)
    # Batches of one request cannot tell the forms apart: the per-request one is kept.
    singles = fit(spec, synthetic("prefill", 1, [(16,), (256,), (1024,)], lambda b: 1e-3 + 4e-8 * b[0] ** 2), {}).cost
    assert not singles.prefill_fits[(1, 1)].dense
    restored = CostModel.from_dict(json.loads(json.dumps(dense.to_dict())))
    assert restored.to_dict() == dense.to_dict() and str(restored) == str(dense)
    assert "(Σlen, (Σlen)², dense;" in str(dense) and "(batch·Σctx, batch, dense;" in str(dense)


def test_fit_measures_migration_latency_and_bandwidth():
    spec = load_spec(TINY)
    kv = spec.model.kv_bytes_per_token
    moves = synthetic("migration", 2, [(16,), (256,), (2048,)], lambda b: 5e-4 + b[0] * kv / 2e9)
    cost = fit(spec, moves, {}).cost
    assert cost.parameters.migration_latency_s == pytest.approx(5e-4)
    assert cost.parameters.migration_bandwidth == pytest.approx(2e9)
    assert cost.migration_time(1000, src=0, dst=3, tp=1) == pytest.approx(5e-4 + 1000 * kv / 2e9)
    assert "migration_bandwidth: link × link_efficiency" in str(CostModel.from_spec(spec))
    # All latency (the larger move even measured faster, as under load): the latency is
    # fitted alone and the bandwidth stays the link's.
    flat = synthetic("migration", 2, [(16,), (2048,)], lambda b: 2e-3 - b[0] * 1e-7)
    flat_cost = fit(spec, flat, {}).cost
    assert flat_cost.parameters.migration_bandwidth is None
    assert 2e-3 - 2048e-7 < flat_cost.parameters.migration_latency_s < 2e-3


def test_a_negative_dispatch_lowers_the_fit_but_never_below_half_the_workers_time():
    """The engine ran a DoP-2 decode faster than the grid's harness timed it: the fit follows
    the engine (the dispatch is signed), but a grid point keeps at least MIN_ITERATION_SHARE
    of its measured time."""
    spec = load_spec(TINY)
    grid = synthetic("decode", 2, DECODE_BATCHES, lambda b: 5e-3 + 1e-7 * sum(b) + 1e-4 * len(b))
    plain = fit(spec, grid, {}).cost
    faster = fit(spec, grid, {"dispatch_s": {"decode": {"2": -2e-3}}}).cost
    assert faster.decode_time([100, 300], 2, 1) == pytest.approx(plain.decode_time([100, 300], 2, 1) - 2e-3)
    point = grid[0]  # 5.1 ms measured
    assert iteration_seconds(point, {"dispatch_s": {"decode": {"2": -2e-3}}}) == pytest.approx(point.seconds - 2e-3)
    assert iteration_seconds(point, {"dispatch_s": {"decode": {"2": -1.0}}}) == pytest.approx(MIN_ITERATION_SHARE * point.seconds)
