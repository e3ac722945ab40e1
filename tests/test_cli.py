"""The `espc` command: working verbs, placeholders that say so, no tracebacks."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import espc
from espc.cli.main import app
from espc.frontend.loader import load_spec, parse_spec
from espc.frontend.spec import Spec

SPECS = Path(__file__).resolve().parent.parent / "specs"
TINY = SPECS / "tiny-cpu.toml"
runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"espc {espc.__version__}"


def test_check_prints_the_normalised_spec():
    result = runner.invoke(app, ["check", str(TINY)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"# {TINY}: valid\n")
    assert "# model tiny-llama-gqa: 125,248 parameters" in result.output
    assert "layers = 2" in result.output  # presets expanded
    assert parse_spec(result.output, "normalised.toml", "toml") == load_spec(TINY)


def test_check_json():
    result = runner.invoke(app, ["check", "--json", str(SPECS / "lwm7b-a800x8.esp")])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["cluster"]["nodes"][0]["device"]["memory"] == "80GiB"
    assert Spec.model_validate(data) == load_spec(SPECS / "lwm7b-a800x8.toml")


def test_fmt_writes_the_other_syntax(tmp_path):
    out = tmp_path / "tiny.esp"
    result = runner.invoke(app, ["fmt", str(TINY), "--to", "dsl", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "cpu x 4" in out.read_text()
    assert load_spec(out) == load_spec(TINY)
    back = runner.invoke(app, ["fmt", str(out), "--to", "toml"])
    assert parse_spec(back.output, "back.toml", "toml") == load_spec(TINY)


def test_schema_is_json_schema_of_the_spec():
    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0
    schema = json.loads(result.output)
    assert set(schema["required"]) == {"model", "cluster", "slo", "workload"}
    assert schema["additionalProperties"] is False
    memory = schema["$defs"]["DeviceSpec"]["properties"]["memory"]
    assert {option["type"] for option in memory["anyOf"]} == {"integer", "string"}


def test_every_verb_has_help():
    listing = runner.invoke(app, ["--help"]).output
    for verb in ["check", "fmt", "schema", "compile", "inspect", "simulate", "compare", "profile", "run", "serve"]:
        assert verb in listing
        assert runner.invoke(app, [verb, "--help"]).exit_code == 0


def test_compile_reports_a_broken_spec_before_anything_else(tmp_path):
    broken = tmp_path / "broken.toml"
    broken.write_text(TINY.read_text().replace("tp = 1 ", "tp = 3 "))
    result = runner.invoke(app, ["compile", str(broken), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert f"{broken}:" in result.output and "not implemented" not in result.output


def test_module_entry_point():
    done = subprocess.run(
        [sys.executable, "-m", "espc", "check", str(TINY)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "[model]" in done.stdout


def test_simulate_prints_latencies_and_attainment():
    result = runner.invoke(app, ["simulate", str(TINY), "--strategy", "static-tp", "--requests", "30", "--seeds", "2"])
    assert result.exit_code == 0, result.output
    assert "SLO attainment (both)" in result.output and "static-tp(tp=4)" in result.output
    assert "by prompt length" in result.output
    assert "mean ± spread over 2 seeds" in result.output


def test_compare_json_goodput_and_plots(tmp_path):
    args = ["compare", str(TINY), "--strategies", "static-tp,disaggregated", "--requests", "20", "--seed", "3",
            "--goodput", "--window", "0.05", "--json", "--plot", str(tmp_path)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["seeds"] == [3]
    for strategy in ("static-tp", "disaggregated"):
        entry = data["strategies"][strategy]
        assert len(entry["runs"]) == len(entry["goodput"]) == 1
        assert all(g["rate"] > 0 and g["trials"] for g in entry["goodput"])
    assert data["strategies"]["disaggregated"]["runs"][0]["configurations_searched"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latency_cdf.png", "timeline_0.png", "timeline_1.png"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["simulate", str(TINY)], "strategy 'auto' is decided by `espc compile`"),  # the spec's strategy is auto
        (["simulate", str(TINY), "--strategy", "vllm"], "unknown strategy 'vllm'"),
        (["compare", str(TINY), "--rate", "1", "--goodput"], "give --rate or --goodput, not both"),
        (["simulate", str(TINY), "--strategy", "chunked", "--workload", "zipf(1.0, 8, 1M)"],
         "command line:1:1: workload.lengths: zipf(alpha=1.0, min=8, max=1M) reaches 1,000,000 tokens"),
        (["simulate", str(TINY), "--strategy", "chunked", "--trace", "missing.csv"], "missing.csv: cannot open"),
    ],
    ids=["auto", "unknown", "rate-and-goodput", "workload-too-long", "missing-trace"],
)
def test_simulate_errors(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
