"""The artifact directory: written, verified on load, every tampering named.

The policies here are built by hand (no compile), so the whole file runs in seconds."""

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from espc import __version__
from espc.frontend.loader import load_spec, parse_spec
from espc.planner.compile.artifact import (
    ArtifactError,
    load_artifact,
    open_artifact,
    render_ir,
    render_report,
    spec_hash,
    write_artifact,
)
from espc.planner.compile.compiler import CompileResult, Trial
from espc.planner.compile.policy import (
    POLICY_SCHEMA_VERSION,
    ElasticPolicy,
    LengthBucket,
    Policy,
    PolicyError,
    SolverStats,
    StrategyPrediction,
)

SPECS = Path(__file__).resolve().parent.parent / "specs"
TINY = SPECS / "tiny-cpu.toml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_result(spec, strategy: str = "elastic") -> CompileResult:
    elastic = ElasticPolicy(
        tp=1,
        buckets=(
            LengthBucket(0, 64, 0.5, 1, 2_048, 2),
            LengthBucket(64, 512, 0.3, 2, 8_192, 3),
            LengthBucket(512, 4_097, 0.2, 4, 16_384, 4, within_slo=False),
        ),
        instance_weight=1.5, decode_instance_tokens=65_536, reserve_output_tokens=17, scale_up=True, migration=True,
        cooldown_iterations=8, migration_max_stall_s=0.2, starvation_bound_s=30.0,
    )
    predictions = (
        StrategyPrediction("elastic", "tp=1", 12.5, 3),
        StrategyPrediction("chunked", "chunked(tp=1, 2048 tokens)", 9.25, 1),
        StrategyPrediction("static-tp", "static-tp(tp=4)", 4.0, 1),
    )
    policy = Policy(
        schema_version=POLICY_SCHEMA_VERSION, espc_version=__version__, spec_hash=spec_hash(spec), strategy=strategy,
        configuration="tp=1", reason="highest simulated P90 goodput", cost_parameters={"schema": 1, "memory_fraction": 0.5},
        elastic=elastic, solver=SolverStats("HIGHS", "optimal", 10.0, 0.0, 0.05, 26, 27),
        predictions=predictions, milp_predicted_rps=10.0, compile_seconds=1.25,
    )
    policy.verify(4)
    trials = (Trial("verify", "milp tp=1", 12.0), Trial("search", "bucket 2 ≤ 3 instances", 12.5),
              Trial("search", "instance weight 0.75", 11.0))
    return CompileResult(policy, (), trials)


@pytest.fixture(scope="module")
def spec():
    return load_spec(TINY)


@pytest.fixture
def artifact(tmp_path, spec):
    directory = tmp_path / "tiny"
    write_artifact(directory, spec, make_result(spec), TINY)
    return directory


def remanifest(directory: Path) -> None:
    """Make the manifest match the files again, as if the edit had been compiled."""
    manifest = json.loads((directory / "manifest.json").read_text())
    for name in manifest["files"]:
        data = (directory / name).read_bytes()
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (directory / "manifest.json").write_text(json.dumps(manifest))


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


def load_error(directory: Path) -> str:
    with pytest.raises(ArtifactError) as caught:
        load_artifact(directory)
    return str(caught.value)


# ------------------------------------------------------------------- instance classes


def with_classes(policy: Policy, *classes: tuple[int, ...] | None) -> Policy:
    """`policy` (4 instances) with bucket i on instances classes[i], its caps cut to fit."""
    buckets = []
    for bucket, members in zip(policy.elastic.buckets, classes):
        size = 4 if members is None else len(members)
        buckets.append(dataclasses.replace(
            bucket, instances=members, max_instances=min(bucket.max_instances, size),
            prefill_dop=min(bucket.prefill_dop, size),
        ))
    return dataclasses.replace(policy, elastic=dataclasses.replace(policy.elastic, buckets=tuple(buckets)))


def test_instance_classes_round_trip_through_json(spec):
    policy = with_classes(make_result(spec).policy, (2, 3), (2, 3), (0, 1))
    policy.verify(4)
    loaded = Policy.from_json(json.loads(json.dumps(policy.to_json())))
    assert loaded == policy and loaded.elastic.buckets[2].instances == (0, 1)
    assert loaded.elastic.instance_classes() == ((2, 3), (0, 1))
    assert "≤ 2 instances at once of instances 0–1" in str(loaded)


@pytest.mark.parametrize("classes, message", [
    (((0, 1), (1, 2), (3,)), "instances 0–1 and 1–2 overlap"),
    (((0, 1), (2, 3), None), "some buckets name their instances and others do not"),
    (((0, 1), (2, 3), (3, 4)), "instances 3–4 outside 0..3"),
    (((0, 1), (2, 3), (3, 2)), "not a non-empty increasing list"),
])
def test_inconsistent_instance_classes_are_named(spec, classes, message):
    with pytest.raises(PolicyError, match=message):
        with_classes(make_result(spec).policy, *classes).verify(4)


def test_a_cap_beyond_the_class_is_named(spec):
    policy = make_result(spec).policy
    buckets = (*policy.elastic.buckets[:2], dataclasses.replace(policy.elastic.buckets[2], instances=(0, 1, 2)))
    with pytest.raises(PolicyError, match=r"max_instances 4 > its 3 instances"):
        dataclasses.replace(policy.elastic, buckets=buckets).verify(4)


# ------------------------------------------------------------------------------ spec hash


def test_spec_hash_is_of_the_normalised_spec(spec):
    assert len(spec_hash(spec)) == 64
    assert spec_hash(spec) == spec_hash(load_spec(SPECS / "tiny-cpu.esp"))  # same spec, other syntax
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert spec_hash(spec) == hashlib.sha256(canonical.encode()).hexdigest()
    changed = parse_spec(TINY.read_text().replace("requests = 64", "requests = 65"), "changed.toml")
    assert spec_hash(changed) != spec_hash(spec)


# ------------------------------------------------------------------------------ round trip


def test_round_trip(artifact, spec):
    policy, loaded_spec = load_artifact(artifact)
    assert policy == make_result(spec).policy
    assert loaded_spec == spec
    files = sorted(path.name for path in artifact.iterdir())
    assert files == ["buckets.png", "goodput.png", "manifest.json", "policy.json", "report.md", "spec.lock.json"]
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["manifest_version"] == 1 and manifest["espc_version"] == __version__
    assert sorted(manifest["files"]) == [name for name in files if name != "manifest.json"]
    for name, entry in manifest["files"].items():
        data = (artifact / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    for plot in ("goodput.png", "buckets.png"):
        assert (artifact / plot).read_bytes().startswith(PNG_MAGIC)
    lock = json.loads((artifact / "spec.lock.json").read_text())
    assert lock["spec_hash"] == spec_hash(spec) and lock["espc_version"] == __version__
    assert lock["source"] == str(TINY) and lock["spec"] == spec.model_dump(mode="json")
    text = (artifact / "policy.json").read_text()
    assert text == json.dumps(policy.to_json(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    opened = open_artifact(artifact)
    assert opened.base_dir == SPECS and [p.name for p in opened.plots()] == ["goodput.png", "buckets.png"]


def test_writing_twice_gives_the_same_bytes(tmp_path, spec):
    result = make_result(spec)
    write_artifact(tmp_path / "a", spec, result, TINY)
    write_artifact(tmp_path / "b", spec, result, TINY)
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()


def test_recompiling_into_a_directory_replaces_it(artifact, spec):
    write_artifact(artifact, spec, make_result(spec, strategy="chunked"), TINY, plots=False)
    policy, _ = load_artifact(artifact)
    assert policy.strategy == "chunked"
    assert not (artifact / "goodput.png").exists()  # the old plots do not linger unlisted


def test_report_has_every_section(artifact):
    report = (artifact / "report.md").read_text()
    for needle in [
        "## Chosen strategy", "**elastic** (tp=1): highest simulated P90 goodput",
        "| elastic | tp=1 | 12.5 | 1.00× | 3 |", "| chunked | chunked(tp=1, 2048 tokens) | 9.25 | 0.74× | 1 |",
        "## Elastic policy (tp=1)", "| 1 | [64, 512) | 30.0% | 2 | 8,192 | 3 | any | yes |",
        "| 2 | [512, 4,097) | 20.0% | 4 | 16,384 | 4 | any | best effort |",
        "## Thresholds", "past 65,536 KV tokens per instance", "## Solver and prediction vs simulation",
        "| MILP predicted rate | 10 req/s |", "| simulated / MILP | 1.25× |",
        "## Search trials", "| 1 | search | bucket 2 ≤ 3 instances | 12.5 |",
        "![predicted goodput per strategy](goodput.png)", "![DoP cap and batch budget per bucket](buckets.png)",
    ]:
        assert needle in report, needle


def test_report_and_ir_without_an_elastic_section(spec):
    result = make_result(spec)
    policy = Policy(**{**result.policy.__dict__, "strategy": "chunked", "elastic": None, "solver": None,
                       "milp_predicted_rps": None})
    baseline = CompileResult(policy, (), ())
    report = render_report(spec, baseline)
    assert "## Elastic policy" not in report and "None: the elastic strategy was not compiled." in report
    ir = render_ir(baseline)
    assert "== stage milp: skipped" in ir and '"strategy": "chunked"' in ir and "compile_seconds" not in ir


def test_write_refuses_a_policy_of_another_spec(tmp_path, spec):
    other = parse_spec(TINY.read_text().replace("requests = 64", "requests = 65"), "other.toml")
    with pytest.raises(ArtifactError, match="compiled from spec"):
        write_artifact(tmp_path / "x", other, make_result(spec))


# ------------------------------------------------------------------------------ verification


@pytest.mark.parametrize("name", ["policy.json", "spec.lock.json", "report.md", "goodput.png", "buckets.png"])
def test_a_tampered_file_is_named(artifact, name):
    path = artifact / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    message = load_error(artifact)
    assert message.startswith(f"{path}: sha256 mismatch with manifest.json (file edited after compile?)")
    assert "recompile" in message


def test_a_missing_listed_file_is_named(artifact):
    (artifact / "buckets.png").unlink()
    assert load_error(artifact).startswith(f"{artifact / 'buckets.png'}: missing (listed in manifest.json)")


def test_missing_manifest(artifact):
    (artifact / "manifest.json").unlink()
    message = load_error(artifact)
    assert message.startswith(f"{artifact / 'manifest.json'}: missing — not an espc artifact directory")


def test_missing_or_wrong_directory(tmp_path, artifact):
    assert load_error(tmp_path / "nowhere").startswith(f"{tmp_path / 'nowhere'}: no such artifact directory")
    assert "not a directory" in load_error(artifact / "policy.json")


def test_wrong_policy_schema_version(artifact):
    edit_json(artifact / "policy.json", lambda data: data.update(schema_version=POLICY_SCHEMA_VERSION + 1))
    remanifest(artifact)
    message = load_error(artifact)
    assert message.startswith(f"{artifact / 'policy.json'}: policy schema version {POLICY_SCHEMA_VERSION + 1}")
    assert f"reads version {POLICY_SCHEMA_VERSION}" in message and "recompile" in message


def test_wrong_manifest_version(artifact):
    edit_json(artifact / "manifest.json", lambda data: data.update(manifest_version=7))
    assert load_error(artifact).startswith(f"{artifact / 'manifest.json'}: manifest version 7")


def test_spec_hash_mismatch_between_lock_and_policy(artifact):
    edit_json(artifact / "spec.lock.json", lambda data: data.update(spec_hash="0" * 64))
    remanifest(artifact)
    message = load_error(artifact)
    assert message.startswith(f"{artifact / 'spec.lock.json'}: spec hash 000000000000 does not match policy.json")


def test_locked_spec_edited_behind_its_hash(artifact):
    edit_json(artifact / "spec.lock.json", lambda data: data["spec"]["workload"].update(requests=65))
    remanifest(artifact)
    message = load_error(artifact)
    assert message.startswith(f"{artifact / 'spec.lock.json'}: the locked spec normalises to hash")


def test_invalid_locked_spec(artifact):
    edit_json(artifact / "spec.lock.json", lambda data: data["spec"]["workload"].update(requests=0))
    remanifest(artifact)
    assert "the locked spec is not valid" in load_error(artifact)


def test_malformed_policy(artifact):
    (artifact / "policy.json").write_text("{ not json")
    remanifest(artifact)
    assert load_error(artifact).startswith(f"{artifact / 'policy.json'}:1:3: not valid JSON")
    edit_json_text = json.dumps({"schema_version": POLICY_SCHEMA_VERSION, "strategy": "elastic"})
    (artifact / "policy.json").write_text(edit_json_text)
    remanifest(artifact)
    assert load_error(artifact).startswith(f"{artifact / 'policy.json'}: policy.json is malformed")


def test_manifest_cannot_point_outside_the_directory(artifact):
    edit_json(artifact / "manifest.json", lambda data: data["files"].update({"../elsewhere": {"sha256": "", "size": 0}}))
    assert "not a file of the artifact directory" in load_error(artifact)


def test_manifest_must_list_the_policy(artifact):
    edit_json(artifact / "manifest.json", lambda data: data["files"].pop("policy.json"))
    assert load_error(artifact).startswith(f"{artifact / 'manifest.json'}: does not list policy.json")
