"""The compile pipeline's search: elastic equivalents of static groupings, and a search that
keeps the best policy it verified; what compile may choose: candidates that cannot run, or
that the spec's tp or the calibration rule out, are left out with the reason."""

import io
from pathlib import Path

import pytest
from rich.console import Console
from small_specs import small_spec_text

from espc import load_spec
from espc.frontend.loader import validate_spec
from espc.frontend.spec import Spec
from espc.planner.compile.artifact import open_artifact, spec_hash, write_artifact
from espc.planner.compile.compiler import SEED_LAYOUTS, CompileOptions, compile_spec, goodput_metric, static_equivalent
from espc.planner.compile.evaluation import Evaluator
from espc.planner.compile.feasibility import (
    UNSERVED_STRATEGIES,
    Limits,
    NothingFeasible,
    runs_by_default,
    runtime_limit,
)
from espc.planner.compile.policy import ElasticPolicy, LengthBucket, SkippedCandidate
from espc.planner.compile.report import render_policy
from espc.planner.sim.costmodel import CostModel
from espc.planner.sim.strategies import StaticLayout

SPECS = Path(__file__).resolve().parent.parent / "specs"
TINY = SPECS / "tiny-cpu.toml"


def template(tp: int = 1) -> ElasticPolicy:
    return ElasticPolicy(
        tp=tp,
        buckets=(
            LengthBucket(0, 100, 0.5, 1, 2_048, 3),
            LengthBucket(100, 1_000, 0.3, 2, 8_192, 4),
            LengthBucket(1_000, 4_097, 0.2, 4, 16_384, 4, within_slo=False),
        ),
        instance_weight=1.5, decode_instance_tokens=65_536, reserve_output_tokens=17, scale_up=True, migration=True,
        cooldown_iterations=8, migration_max_stall_s=0.2, starvation_bound_s=30.0,
    )


PROMPTS = [10] * 5 + [150] * 3 + [600, 3_000]
INSTANCE_TOKENS = 100_000  # KV per instance: every prompt fits one with its output


def test_prompts_a_short_group_cannot_hold_join_the_long_class():
    """StaticScheduler sends a request that no short group holds to the large group, so the
    long class starts below the threshold at the first prompt that, with the template's
    17 expected output tokens, overflows one instance of 700 slots."""
    policy = static_equivalent(StaticLayout(1, (2, 1, 1), 2_000), template(), PROMPTS, 700)
    assert [(b.low, b.high, b.prefill_dop, b.instances) for b in policy.buckets] == [
        (0, 100, 1, (2, 3)), (100, 684, 1, (2, 3)), (684, 4_097, 2, (0, 1)),
    ]


def test_two_class_layout_splits_the_bucket_at_its_threshold_and_merges_the_long_class():
    layout = StaticLayout(tp=1, groups=(2, 1, 1), long_threshold=500)
    shared = static_equivalent(layout, template(), PROMPTS, INSTANCE_TOKENS, partitioned=False)
    shared.verify(4)
    # (low, high, share, dop, batch tokens, max instances, within SLO, instances). The long
    # class is one bucket: a cap of 2 instances per bucket over two buckets would let it hold 4.
    assert [bucket_fields(b) for b in shared.buckets] == [
        (0, 100, 0.5, 1, 2_048, 4, True, None),
        (100, 500, 0.3, 1, 8_192, 4, True, None),
        (500, 4_097, 0.2, 2, 8_192, 2, False, None),
    ]
    kept = ("instance_weight", "decode_instance_tokens", "reserve_output_tokens", "scale_up", "migration")
    assert all(getattr(shared, field) == getattr(template(), field) for field in kept)
    # Partitioned: each class keeps to its static groups' instances, the large group's
    # first (StaticScheduler numbers the groups in order), and may hold all of them.
    partitioned = static_equivalent(layout, template(), PROMPTS, INSTANCE_TOKENS)
    partitioned.verify(4)
    assert [bucket_fields(b) for b in partitioned.buckets] == [
        (0, 100, 0.5, 1, 2_048, 2, True, (2, 3)),
        (100, 500, 0.3, 1, 8_192, 2, True, (2, 3)),
        (500, 4_097, 0.2, 2, 8_192, 2, False, (0, 1)),
    ]
    assert partitioned.instance_classes() == ((2, 3), (0, 1))
    assert "≤ 2 instances at once of instances 0–1" in str(partitioned)


def bucket_fields(b: LengthBucket) -> tuple:
    return (b.low, b.high, b.share, b.prefill_dop, b.batch_tokens, b.max_instances, b.within_slo, b.instances)


def test_a_threshold_on_an_edge_or_past_the_last_bucket_adds_no_bucket():
    on_edge = static_equivalent(StaticLayout(1, (3, 1), 1_000), template(), PROMPTS, INSTANCE_TOKENS)
    assert [b.low for b in on_edge.buckets] == [0, 100, 1_000]
    assert [(b.prefill_dop, b.max_instances, b.instances) for b in on_edge.buckets] == [
        (1, 1, (3,)), (1, 1, (3,)), (3, 3, (0, 1, 2)),
    ]
    beyond = static_equivalent(StaticLayout(1, (3, 1), 10_000), template(), PROMPTS, INSTANCE_TOKENS)
    assert [(b.low, b.high, b.prefill_dop, b.max_instances, b.instances) for b in beyond.buckets] == [
        (0, 100, 1, 4, None), (100, 1_000, 1, 4, None), (1_000, 4_097, 1, 4, None),
    ]


def test_equal_groups_span_up_to_their_size_everywhere():
    policy = static_equivalent(StaticLayout(tp=2, groups=(2, 2)), template(tp=2), PROMPTS, INSTANCE_TOKENS)
    assert [(b.prefill_dop, b.max_instances) for b in policy.buckets] == [(2, 4)] * 3
    singles = static_equivalent(StaticLayout(tp=2, groups=(1,) * 4), template(tp=2), PROMPTS, INSTANCE_TOKENS)
    assert [(b.prefill_dop, b.max_instances) for b in singles.buckets] == [(1, 4)] * 3


def test_a_layout_of_another_tp_is_refused():
    with pytest.raises(ValueError, match="tp=2"):
        static_equivalent(StaticLayout(tp=2, groups=(1, 1)), template(tp=1), PROMPTS, INSTANCE_TOKENS)


def test_the_search_starts_from_static_seeds_and_keeps_the_best_verified_policy(tmp_path):
    """A searching compile simulates the elastic equivalents of the best screened static
    groupings beside the MILP's policies, and what it predicts for elastic is at least every
    policy it verified (the search only ever keeps improvements)."""
    path = tmp_path / "tiny.toml"
    path.write_text(small_spec_text(strategy="elastic"))
    spec = load_spec(path)
    result = compile_spec(spec, spec_hash(spec), tmp_path, CompileOptions(search_seconds=1.0, trial_requests=40))
    seeds = [trial for trial in result.trials if trial.stage == "seed"]
    assert 1 <= len(seeds) <= 2 * SEED_LAYOUTS  # partitioned and shared
    assert all(trial.label.startswith("as static tp=") for trial in seeds)
    assert any("partitioned" in trial.label for trial in seeds)
    elastic = next(p for p in result.policy.predictions if p.strategy == "elastic")
    # (None: a seed rejected by one trial at the goodput it had to clear.)
    verified = [t.goodput_rps for t in result.trials if t.stage in ("verify", "seed") and t.goodput_rps is not None]
    assert elastic.goodput_rps >= max(verified)
    # The ablate stage measured the best policy without ESP's choices: the compiled policy is
    # whichever of the two measured higher (rigid on a tie), and its prediction is that goodput.
    searched = max(trial.goodput_rps for trial in result.trials if trial.stage != "ablate" and trial.goodput_rps is not None)
    ablated = [trial.goodput_rps for trial in result.trials if trial.stage == "ablate"]
    if result.policy.elastic.is_rigid() and ablated:
        assert ablated[0] >= searched and elastic.goodput_rps == ablated[0]
    else:
        assert elastic.goodput_rps == searched and all(rate < searched for rate in ablated)


def test_auto_goodput_metric_is_per_class_when_a_prompt_needs_several_instances():
    spec = load_spec(TINY)
    longest = max(r.prompt_len + r.output_len for r in Evaluator(spec, TINY.parent).workload())
    assert goodput_metric(spec, Evaluator(spec, TINY.parent, kv_capacity=longest)) == "p90"
    assert goodput_metric(spec, Evaluator(spec, TINY.parent, kv_capacity=longest - 1)) == "per-class"
    pinned = validate_spec(spec.model_dump(mode="json") | {
        "policy": spec.policy.model_dump(mode="json") | {"goodput_metric": "p90"}}, {}, "test")
    assert goodput_metric(pinned, Evaluator(pinned, TINY.parent, kv_capacity=1)) == "p90"



@pytest.mark.parametrize("caching", [True, False])
def test_report_and_inspect_show_the_reuse_the_milp_priced(tmp_path, caching):
    """The tiny prefix spec (every prompt opens with one of two 1,536-token system prompts)
    compiled with caching on records the share of its sample's prompt tokens that repeat an
    earlier request's blocks (reference: all requests but the first of each system prompt
    reuse 1,536 tokens) and the share the MILP priced as hits; report.md and `espc inspect`
    show both. With caching off, neither is estimated and both say caching is off."""
    text = (SPECS / "tiny-cpu-prefix.toml").read_text()
    for old, new in (("prefix_caching = true", f"prefix_caching = {str(caching).lower()}"),
                     ("[runtime]", '[policy]\nstrategy = "elastic"\n\n[runtime]')):
        assert old in text
        text = text.replace(old, new)
    path = tmp_path / "prefix.toml"
    path.write_text(text)
    spec = load_spec(path)
    result = compile_spec(spec, spec_hash(spec), tmp_path, CompileOptions(search_seconds=0, trial_requests=40))
    policy = result.policy
    write_artifact(tmp_path / "out", spec, result, plots=False)
    shown = io.StringIO()
    render_policy(open_artifact(tmp_path / "out"), Console(file=shown, width=400))
    report = (tmp_path / "out" / "report.md").read_text()
    if not caching:
        assert policy.prefix_reusable_share is None and policy.prefix_hit_share is None
        assert result.milp[0].prefix_hit_share is None
        line = "prefix caching off (runtime.prefix_caching = false): every prompt token is computed"
        assert f"- {line}" in report and line in shown.getvalue()
        return
    sample = Evaluator(spec, tmp_path).workload(requests=spec.workload.requests)
    firsts = {r.prefix_hashes[:3] for r in sample}
    reused = 1536 * (len(sample) - len(firsts)) / sum(r.prompt_len for r in sample)
    assert len(firsts) == 2 and policy.prefix_reusable_share == pytest.approx(reused, rel=1e-12)
    assert policy.prefix_hit_share == result.milp[0].prefix_hit_share
    assert 0 < policy.prefix_hit_share <= policy.prefix_reusable_share
    line = (
        f"prefix caching on: {reused:.1%} of the workload sample's prompt tokens repeat an earlier request's blocks "
        f"(the upper bound of the hit rate); the MILP priced {policy.prefix_hit_share:.1%} as cache hits"
    )
    assert f"- {line}" in report and line in shown.getvalue()
    assert f"| {policy.prefix_hit_share:.1%} | optimal |" in report  # the MILP solutions' table


# ------------------------------------------------------------------ what compile may choose


def small_variant(tmp_path: Path, *replacements: tuple[str, str], **spec) -> Spec:
    """tests/small_specs.py's spec (the tiny model on 4 CPUs, tp = 1 pinned, strategy auto
    unless `spec` says otherwise), edited."""
    text = small_spec_text(**spec)
    for old, new in replacements:
        assert old in text
        text = text.replace(old, new)
    path = tmp_path / "spec.toml"
    path.write_text(text)
    return load_spec(path)




def test_a_six_head_model_compiles_on_the_tiny_spec(tmp_path):
    """static-tp's replica of a node (tp = 4) cannot split 6 heads: compile leaves the family
    out with the reason instead of failing, and compares every other strategy at the
    spec's tp = 1."""
    spec = small_variant(tmp_path, heads=6)
    result = compile_spec(spec, spec_hash(spec), tmp_path, CompileOptions(search_seconds=0, trial_requests=40))
    policy = result.policy
    assert policy.runnable
    assert SkippedCandidate("static-tp", "every configuration", "tp(4) does not divide the model's 6 heads") in policy.skipped
    assert {p.strategy for p in policy.predictions} == {"elastic", "static-sp", "chunked", "disaggregated", "best-static"}
    assert all(p.configuration.startswith("tp=1") for p in policy.predictions)
    assert policy.strategy in {p.strategy for p in policy.predictions}


def test_a_pinned_tp_binds_every_strategy(tmp_path):
    """The tiny spec pins tp = 1: static-tp (a replica of the node, tp = 4) is left out, in
    simulation-only compiles too — the pin is the spec's, not the runtime's."""
    spec = small_variant(tmp_path)
    for runnable in (True, False):
        evaluator = Evaluator(spec, tmp_path, limits=Limits.of(spec, CostModel.from_spec(spec), runnable))
        assert evaluator.candidates("static-tp") == []
        assert evaluator.skipped == [
            SkippedCandidate("static-tp", "tp=4", "the spec pins tp = 1 (cluster.tp); this configuration has tp = 4")
        ]
        assert {c.label.split(",")[0] for c in evaluator.candidates("best-static")} == {"tp=1"}
    # Without limits (`espc compare`, the benchmarks) static-tp stays vLLM's deployment.
    assert [c.label for c in Evaluator(spec, tmp_path).candidates("static-tp")] == ["tp=4"]


def test_cpu_specs_compile_to_run_at_every_tp_the_model_allows(tmp_path):
    """With tp free, a CPU spec compiles to run at tp 1, 2 and 4 alike (the runtime shards an
    instance's model over its tp ranks: `espc.backend.tensor_parallel`), the MILP included;
    --simulation-only considers the same candidates."""
    spec = small_variant(tmp_path, tp=None)
    assert spec.cluster.tp is None and runs_by_default(spec)
    runnable = Evaluator(spec, tmp_path, limits=Limits.of(spec, CostModel.from_spec(spec)))
    assert {c.label.split(",")[0] for c in runnable.candidates("best-static")} == {"tp=1", "tp=2", "tp=4"}
    assert runnable.skipped == []
    assert all(runtime_limit(strategy, tp) is None for strategy in ("elastic", "best-static") for tp in (1, 2, 4))
    simulated = Evaluator(spec, tmp_path, limits=Limits.of(spec, CostModel.from_spec(spec), runnable=False))
    assert {c.label.split(",")[0] for c in simulated.candidates("best-static")} == {"tp=1", "tp=2", "tp=4"}
    assert simulated.skipped == []


def test_a_strategy_the_runtime_does_not_serve_is_left_out_unless_for_simulation(tmp_path, monkeypatch):
    """A CPU spec compiles to run by default: a strategy in the runtime's table of unserved
    ones (empty today: the test enters disaggregated) is left out, every configuration with
    the table's reason; --simulation-only keeps it. Accelerator specs compile for
    simulation by default."""
    monkeypatch.setitem(UNSERVED_STRATEGIES, "disaggregated", "a limit this test declares")
    spec = small_variant(tmp_path)
    assert not runs_by_default(load_spec(SPECS / "lwm7b-a800x8.toml"))
    runnable = Evaluator(spec, tmp_path, limits=Limits.of(spec, CostModel.from_spec(spec)))
    assert runnable.candidates("disaggregated") == []
    reason = "the runtime does not serve disaggregated: a limit this test declares"
    assert runtime_limit("disaggregated", 1) == reason
    assert runnable.skipped == [SkippedCandidate("disaggregated", f"tp=1, {p}P+{4 - p}D", reason) for p in (1, 2, 3)]
    simulated = Evaluator(spec, tmp_path, limits=Limits.of(spec, CostModel.from_spec(spec), runnable=False))
    assert [c.label for c in simulated.candidates("disaggregated")] == [f"tp=1, {p}P+{4 - p}D" for p in (1, 2, 3)]
    assert simulated.skipped == []


def test_a_calibrated_compile_compares_only_calibrated_candidates(tmp_path):
    """`espc profile` measures tp = 1: with tp free, a calibrated compile leaves tp 2 and 4 out
    rather than rank their analytic guesses against measured tp = 1 — even for simulation."""
    spec = small_variant(tmp_path, tp=None)
    analytic = CostModel.from_spec(spec)
    shapes = [(sp, [n] * batch) for sp in (1, 2, 4) for n, batch in ((64, 1), (512, 2), (2048, 1))]
    rows = [(sp, 1, lengths, analytic.prefill_time(lengths, sp, 1)) for sp, lengths in shapes]  # measured: tp 1
    calibrated = analytic.calibrate(prefill=rows)
    limits = Limits.of(spec, calibrated, runnable=False)
    assert limits.calibrated_tps == {1}
    evaluator = Evaluator(spec, tmp_path, cost=calibrated, limits=limits)
    assert {c.label.split(",")[0] for c in evaluator.candidates("best-static")} == {"tp=1"}
    assert evaluator.candidates("static-tp") == []
    assert SkippedCandidate(
        "static-tp", "tp=4",
        "tp = 4 is not calibrated (the calibration measured tp 1): its goodput would be the analytic model's guess "
        "beside measured ones",
    ) in evaluator.skipped


def test_compile_fails_only_when_nothing_is_left_and_names_every_reason(tmp_path, monkeypatch):
    monkeypatch.setitem(UNSERVED_STRATEGIES, "disaggregated", "a limit this test declares")
    spec = small_variant(
        tmp_path, ('strategy = "disaggregated"', 'strategy = "disaggregated"\nprefill_instances = 1'), strategy="disaggregated",
    )
    with pytest.raises(NothingFeasible) as raised:
        compile_spec(spec, spec_hash(spec), tmp_path, CompileOptions(search_seconds=0, trial_requests=40))
    assert raised.value.runtime_bound
    assert str(raised.value) == f"no candidate can be compiled: disaggregated (tp=1, 1P+3D): {runtime_limit('disaggregated', 1)}"
    pinned = small_variant(tmp_path, strategy="static-tp")
    with pytest.raises(NothingFeasible) as raised:  # a pinned tp binds simulation-only compiles too
        compile_spec(pinned, spec_hash(pinned), tmp_path, CompileOptions(search_seconds=0, trial_requests=40, runnable=False))
    assert not raised.value.runtime_bound
    assert str(raised.value) == (
        "no candidate can be compiled: static-tp (tp=4): the spec pins tp = 1 (cluster.tp); this configuration has tp = 4"
    )


def test_a_tp_whose_instances_hold_no_kv_is_left_out(tmp_path):
    """600 KB per CPU: one device's half (293 KiB) cannot hold the 489 KiB of weights, two can
    (193 KV slots). A simulation-only compile compares tp 2 and 4; tp 1 is left out with the
    arithmetic, instead of being simulated at goodput 0."""
    spec = small_variant(
        tmp_path, ('device = { name = "cpu"', 'device = { name = "cpu", memory = "600KB"'),
        ("max_context = 4096", "max_context = 1024"), ("zipf(1.2, 8, 2K)", "zipf(1.2, 8, 900)"), tp=None,
    )
    cost = CostModel.from_spec(spec)
    assert [cost.kv_capacity_tokens(tp) for tp in (1, 2, 4)] == [0, 193, 682]
    evaluator = Evaluator(spec, tmp_path, limits=Limits.of(spec, cost, runnable=False))
    assert evaluator.candidates("static-sp") == []  # static-sp runs at the spec's tp, 1 when unset
    assert {c.label.split(",")[0] for c in evaluator.candidates("best-static")} == {"tp=2", "tp=4"}
    assert {s.configuration.split(",")[0] for s in evaluator.skipped} == {"tp=1"}
    assert evaluator.skipped[0].reason == (
        "an instance of tp = 1 may use 293KiB (memory_fraction × device memory × tp), and the weights take 489KiB: "
        "no KV fits"
    )
