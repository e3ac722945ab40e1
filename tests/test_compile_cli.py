"""`espc compile` and `espc inspect`, and simulate / compare on an artifact directory.

One compile of a small elastic-only spec (tests/small_specs.py: no baselines, no search) is
shared by the module; its CPU is slowed down so that goodput trials stay at a few dozen
requests."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from small_specs import small_spec_text
from typer.testing import CliRunner

from espc.cli.main import app
from espc.planner.compile.artifact import load_artifact
from espc.planner.compile.feasibility import UNSERVED_STRATEGIES, runtime_limit
from espc.planner.compile.policy import format_instances

FAST = ["--search-seconds", "0", "--requests", "60"]
runner = CliRunner()


def write_spec(directory: Path, name: str, replace: tuple[str, str] | None = None) -> Path:
    text = small_spec_text(strategy="elastic")
    if replace:
        assert replace[0] in text
        text = text.replace(*replace)
    path = directory / name
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """(spec file, artifact directory, the compile's CliRunner result)."""
    root = tmp_path_factory.mktemp("compile")
    spec = write_spec(root, "elastic.toml")
    out = root / "build" / "elastic"
    result = runner.invoke(app, ["compile", str(spec), "-o", str(out), *FAST, "--dump-ir"])
    assert result.exit_code == 0, result.output
    return spec, out, result


def dump_of(stdout: str) -> str:
    start = stdout.index("== stage milp")
    return stdout[start:stdout.index("\npolicy (schema", start)]


def test_compile_writes_the_artifact_and_prints_the_policy(compiled):
    spec, out, result = compiled
    assert sorted(p.name for p in out.iterdir()) == [
        "buckets.png", "goodput.png", "manifest.json", "policy.json", "report.md", "spec.lock.json"
    ]
    policy, loaded = load_artifact(out)
    assert policy.strategy == "elastic" and policy.elastic is not None
    assert [p.strategy for p in policy.predictions] == ["elastic"]  # an elastic spec skips the baselines
    assert policy.elastic.buckets[0].low == 0 and len(policy.elastic.buckets) <= 3
    lock = json.loads((out / "spec.lock.json").read_text())
    assert lock["compile_options"] == {"search_seconds": 0.0, "trial_requests": 60, "seed": None, "runnable": None}
    assert lock["source"] == str(spec)
    report = (out / "report.md").read_text()
    assert "- compile options: search 0 s, ≥ 60 requests per trial, workload seed 0" in report
    assert "| 0 | verify | milp tp=1 |" in report
    assert f"wrote {out}/: policy.json, spec.lock.json" in result.stdout
    assert "strategy elastic (tp=1): the spec asks for elastic" in result.stdout
    assert "elastic policy (tp=1)" in result.stdout
    # progress goes to stderr, one line per stage when not a terminal
    for stage in ("milp", "verify", "choose", "write"):
        assert f"espc compile: {stage}:" in result.stderr
    assert "espc compile:" not in result.stdout


def test_dump_ir_prints_every_stage_deterministically(compiled, tmp_path):
    spec, out, first = compiled
    dump = dump_of(first.stdout)
    stages = ["== stage milp: tp=1 ==", "== stage verify: 1 trial(s) ==", "== stage seed: 0 trial(s) ==",
              "== stage search: 0 trial(s) ==",
              "== stage strategies: predicted P90 goodput ==", "== stage choose: policy.json"]
    positions = [dump.index(stage) for stage in stages]
    assert positions == sorted(positions)
    assert "compile_seconds" not in dump and '"seconds"' not in dump  # no wall-clock in the dump
    # A separate process: the solver's native banner must not land in stdout either.
    again = subprocess.run(
        [sys.executable, "-m", "espc", "compile", str(spec), "-o", str(tmp_path / "again"), *FAST, "--dump-ir"],
        capture_output=True, text=True, timeout=120,
    )
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("== stage milp: tp=1 ==\n")
    assert dump_of(again.stdout) == dump


def test_inspect_tables(compiled):
    _, out, _ = compiled
    policy, _ = load_artifact(out)
    result = runner.invoke(app, ["inspect", str(out)])
    assert result.exit_code == 0, result.output
    for title in ("predicted P90 goodput per strategy", "elastic policy (tp=1): per prompt-length bucket",
                  "thresholds", "solver and prediction vs simulation", "MILP predicted rate", "DoP cap"):
        assert title in result.stdout, title
    lines = result.stdout.splitlines()
    for index, bucket in enumerate(policy.elastic.buckets):
        row = next(line for line in lines if f"[{bucket.low:,}, {bucket.high:,})" in line)
        cells = [cell.strip() for cell in row.strip("│ ").split("│")]
        assert cells == [str(index), f"[{bucket.low:,}, {bucket.high:,})", f"{bucket.share:.1%}", str(bucket.prefill_dop),
                         f"{bucket.batch_tokens:,}", str(bucket.max_instances),
                         "any" if bucket.instances is None else format_instances(bucket.instances),
                         "yes" if bucket.within_slo else "best effort"]
    assert f"instance weight (batching DP) │ {policy.elastic.instance_weight:g} requests" in result.stdout


def test_inspect_json_and_plot(compiled):
    _, out, _ = compiled
    policy, _ = load_artifact(out)
    result = runner.invoke(app, ["inspect", str(out), "--json", "--plot"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == json.loads(json.dumps(policy.to_json()))
    assert result.stdout == (out / "policy.json").read_text()
    assert f"plot {out / 'goodput.png'}" in result.stderr and f"plot {out / 'buckets.png'}" in result.stderr
    assert runner.invoke(app, ["inspect", str(out)]).exit_code == 0  # the plots still match the manifest


def test_simulate_and_compare_an_artifact(compiled):
    _, out, _ = compiled
    result = runner.invoke(app, ["simulate", str(out), "--requests", "30"])  # the compiled strategy: elastic
    assert result.exit_code == 0, result.output
    assert "elastic(tp=1)" in result.stdout and "SLO attainment (both)" in result.stdout
    result = runner.invoke(app, ["compare", str(out), "--strategies", "elastic,static-tp", "--requests", "30", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data["strategies"]) == {"elastic", "static-tp"}
    assert data["strategies"]["elastic"]["runs"][0]["configuration"] == "tp=1"
    assert "elastic" in runner.invoke(app, ["compare", "--help"]).stdout


def test_simulate_elastic_on_a_spec_file_solves_the_milp(tmp_path):
    spec = write_spec(tmp_path, "elastic.toml")
    result = runner.invoke(app, ["simulate", str(spec), "--requests", "20"])
    assert result.exit_code == 0, result.output
    assert "elastic(tp=1)" in result.stdout


def test_a_baseline_only_compile(tmp_path):
    spec = write_spec(tmp_path, "static.toml", ('strategy = "elastic"', 'strategy = "static-sp"\nsp_size = 4'))
    out = tmp_path / "static"
    result = runner.invoke(app, ["compile", str(spec), "-o", str(out), *FAST, "--dump-ir"])
    assert result.exit_code == 0, result.output
    assert "== stage milp: skipped" in result.stdout
    assert "espc compile: strategies: static-sp: measuring tp=1, groups=4" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["goodput.png", "manifest.json", "policy.json", "report.md", "spec.lock.json"]
    shown = runner.invoke(app, ["inspect", str(out)])
    assert shown.exit_code == 0, shown.output
    assert "no elastic policy: the spec asks for static-sp" in shown.stdout and "DoP cap" not in shown.stdout
    simulated = runner.invoke(app, ["simulate", str(out), "--requests", "20"])
    assert simulated.exit_code == 0, simulated.output
    assert "static-sp(tp=1, groups=4)" in simulated.stdout


def test_nothing_to_compile_exits_2_with_every_reason(tmp_path):
    """static-tp is one replica of the node (tp = 4), which the tiny spec's tp = 1 rules out —
    for simulation too: the pin is the spec's."""
    spec = write_spec(tmp_path, "static.toml", ('strategy = "elastic"', 'strategy = "static-tp"'))
    for flags in ([], ["--simulation-only"]):
        result = runner.invoke(app, ["compile", str(spec), "-o", str(tmp_path / "out"), *FAST, *flags])
        assert result.exit_code == 2, result.output
        assert result.stderr.splitlines()[-1] == (
            f"{spec}: no candidate can be compiled: static-tp (tp=4): the spec pins tp = 1 (cluster.tp); "
            "this configuration has tp = 4"
        )
        assert "Traceback" not in result.output and not (tmp_path / "out" / "manifest.json").exists()


def test_a_strategy_the_runtime_cannot_serve_compiles_for_simulation_only(tmp_path, monkeypatch):
    """A strategy in the runtime's table of unserved ones compiles only with
    --simulation-only; the report and inspect say so, and the Engine refuses the artifact
    with the reason before starting a worker. (The table is empty today: the test enters
    disaggregated in it.)"""
    from espc.runtime.engine import Engine, EngineError

    monkeypatch.setitem(UNSERVED_STRATEGIES, "disaggregated", "a limit this test declares")
    spec = write_spec(tmp_path, "pd.toml", ('strategy = "elastic"', 'strategy = "disaggregated"\nprefill_instances = 2'))
    out = tmp_path / "pd"
    refused = runner.invoke(app, ["compile", str(spec), "-o", str(out), *FAST])
    assert refused.exit_code == 2
    assert refused.stderr.splitlines()[-1] == (
        f"{spec}: no candidate can be compiled: disaggregated (tp=1, 2P+2D): {runtime_limit('disaggregated', 1)}; "
        "`--simulation-only` lifts the runtime's limits (for `espc simulate` and `espc compare`)"
    )
    result = runner.invoke(app, ["compile", str(spec), "-o", str(out), *FAST, "--simulation-only"])
    assert result.exit_code == 0, result.output
    policy, _ = load_artifact(out)
    assert (policy.strategy, policy.configuration, policy.runnable) == ("disaggregated", "tp=1, 2P+2D", False)
    assert "compiled for simulation only" in (out / "report.md").read_text()
    assert "compiled for simulation only" in runner.invoke(app, ["inspect", str(out)]).stdout
    with pytest.raises(EngineError) as raised:
        Engine.from_artifact(out)
    assert str(raised.value) == (
        "strategy disaggregated (tp=1, 2P+2D): the runtime does not serve disaggregated: a limit this test declares; "
        "recompile with `espc compile --runnable`"
    )


def test_report_and_inspect_list_the_candidates_left_out(tmp_path):
    """600 KB per CPU and tp free: the weights fill an instance of tp 1, and at tp 2 the
    longest prompts need more instances than a node has: compile leaves both out, each with
    its reason, in report.md and `espc inspect`, and compiles tp 4."""
    spec = write_spec(tmp_path, "small.toml", ("tp = 1 ", "# tp unset "))
    text = spec.read_text().replace('memory_bandwidth = "200MB/s"', 'memory_bandwidth = "200MB/s", memory = "600KB"')
    spec.write_text(text.replace("max_context = 4096", "max_context = 1024").replace("zipf(1.2, 8, 2K)", "zipf(1.2, 8, 900)"))
    out = tmp_path / "small"
    result = runner.invoke(app, ["compile", str(spec), "-o", str(out), *FAST])
    assert result.exit_code == 0, result.output
    policy, _ = load_artifact(out)
    assert policy.runnable and policy.elastic.tp == 4
    assert [(s.strategy, s.configuration) for s in policy.skipped] == [("elastic", "tp=1"), ("elastic", "tp=2")]
    no_kv, slo = (s.reason for s in policy.skipped)
    assert no_kv == "an instance of tp = 1 may use 293KiB (memory_fraction × device memory × tp), and the weights take 489KiB: no KV fits"
    assert slo.startswith("the SLOs cannot be met: ") and "193 KV slots at tp(2)" in slo
    report = (out / "report.md").read_text()
    assert "compiled to run" in report and "## Candidates left out" in report
    assert f"| elastic | tp=1 | {no_kv} |" in report
    shown = runner.invoke(app, ["inspect", str(out)])
    assert shown.exit_code == 0, shown.output
    assert "candidates left out (not simulated)" in shown.stdout and "compiled to run" in shown.stdout
    left_out = shown.stdout[shown.stdout.index("candidates left out"):]
    rows = [line for line in left_out.splitlines() if line.startswith("│ elastic ")]
    assert [[cell.strip() for cell in row.strip("│ ").split("│")][:2] for row in rows] == [["elastic", "tp=1"], ["elastic", "tp=2"]]


def test_an_edited_artifact_is_refused(compiled, tmp_path):
    _, out, _ = compiled
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in out.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    text = (copy / "policy.json").read_text()
    flipped = text.replace('"migration": true', '"migration": false')  # turn migration off, or on if it was off
    if flipped == text:
        flipped = text.replace('"migration": false', '"migration": true')
    assert flipped != text
    (copy / "policy.json").write_text(flipped)
    for args in (["inspect", str(copy)], ["simulate", str(copy)], ["compare", str(copy)]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, args
        assert f"{copy / 'policy.json'}: sha256 mismatch with manifest.json (file edited after compile?)" in result.stderr
        assert "Traceback" not in result.output
    missing = runner.invoke(app, ["inspect", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "no such artifact directory" in missing.stderr


def test_infeasible_slo_exits_2_with_the_reason(tmp_path):
    spec = write_spec(tmp_path, "strict.toml", ('tpot = "200ms at p90"', 'tpot = "1ms at p90"'))
    out = tmp_path / "out"
    result = runner.invoke(app, ["compile", str(spec), "-o", str(out), *FAST])
    assert result.exit_code == 2
    assert f"{spec}: the SLOs cannot be met: TPOT 1ms at p90 is infeasible" in result.stderr
    assert "Traceback" not in result.output
    assert not (out / "manifest.json").exists()


def test_compile_option_errors(tmp_path):
    spec = write_spec(tmp_path, "elastic.toml")
    (tmp_path / "file").write_text("")
    result = runner.invoke(app, ["compile", str(spec), "-o", str(tmp_path / "file")])
    assert result.exit_code == 2 and "exists and is not a directory" in result.stderr
    result = runner.invoke(app, ["compile", str(spec), "-o", str(tmp_path / "x"), "--requests", "0"])
    assert result.exit_code == 2 and "--requests at least 1" in result.stderr
    result = runner.invoke(app, ["compile", str(spec), "-o", str(tmp_path / "x"), "--workers", "0"])
    assert result.exit_code == 2 and "--workers at least 1" in result.stderr


def test_the_library_compile_matches_the_command(compiled, tmp_path):
    """`espc.compile` is `espc compile` as a function: the same policy, the same artifact."""
    import espc

    spec, out, _ = compiled
    policy = espc.compile(spec, tmp_path / "lib", search_seconds=0, requests=60)
    loaded, _ = load_artifact(tmp_path / "lib")
    assert loaded == policy
    from_command, _ = load_artifact(out)
    assert policy.elastic == from_command.elastic and policy.spec_hash == from_command.spec_hash


def test_run_an_artifact_replays_its_workload_and_serves_a_prompt(compiled):
    """`espc run`: the compiled policy on real worker processes (gloo), end to end."""
    _, out, _ = compiled
    result = runner.invoke(app, ["run", str(out), "--requests", "6", "--kv-capacity", "4096", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    runtime = report["runtime"]
    assert runtime["requests"] == 6 and runtime["failed"] == 0, runtime
    assert runtime["kv_after_run"] == runtime["kv_cached_after_run"]  # nothing but cached prefixes
    # Batches, not requests: requests that arrive together may share a prefill batch.
    assert sum(runtime["dop_decisions"]["prefill"].values()) >= 1 and sum(runtime["dop_decisions"]["decode"].values()) >= 1
    assert report["summary"]["completed"] == 6
    prompt = runner.invoke(app, ["run", str(out), "--prompt-ids", "1,2,3", "--max-new-tokens", "3", "--json"])
    assert prompt.exit_code == 0, prompt.output
    completion = json.loads(prompt.stdout)
    assert completion["finish_reason"] == "length" and len(completion["token_ids"]) == 3
    both = runner.invoke(app, ["run", str(out), "--prompt", "hi", "--prompt-ids", "1"])
    assert both.exit_code == 2 and "not both" in both.output and "Traceback" not in both.output
