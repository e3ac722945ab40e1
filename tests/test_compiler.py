"""The compile pipeline's search: elastic equivalents of static groupings, and a search that
keeps the best policy it verified."""

from pathlib import Path

import pytest

from espc import load_spec
from espc.frontend.loader import validate_spec
from espc.planner.compile.artifact import spec_hash
from espc.planner.compile.compiler import SEED_LAYOUTS, CompileOptions, compile_spec, goodput_metric, static_equivalent
from espc.planner.compile.evaluation import Evaluator
from espc.planner.compile.policy import ElasticPolicy, LengthBucket
from espc.planner.sim.strategies import StaticLayout

SPECS = Path(__file__).resolve().parent.parent / "specs"
TINY = SPECS / "tiny-cpu.toml"
SLOW_CPU = 'device = { name = "cpu", peak_flops = "1GFLOP/s", memory_bandwidth = "200MB/s" }'


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
    path.write_text(TINY.read_text().replace('device = "cpu"', SLOW_CPU) + '\n[policy]\nstrategy = "elastic"\nlength_buckets = 3\n')
    spec = load_spec(path)
    result = compile_spec(spec, spec_hash(spec), tmp_path, CompileOptions(search_seconds=1.0, trial_requests=40))
    seeds = [trial for trial in result.trials if trial.stage == "seed"]
    assert 1 <= len(seeds) <= 2 * SEED_LAYOUTS  # partitioned and shared
    assert all(trial.label.startswith("as static tp=") for trial in seeds)
    assert any(trial.label.endswith("partitioned") for trial in seeds)
    elastic = next(p for p in result.policy.predictions if p.strategy == "elastic")
    verified = [trial.goodput_rps for trial in result.trials if trial.stage in ("verify", "seed")]
    assert elastic.goodput_rps >= max(verified)
    # The ablate stage measured the best policy without ESP's choices: the compiled policy is
    # whichever of the two measured higher, and its prediction is that goodput.
    searched = max(trial.goodput_rps for trial in result.trials if trial.stage != "ablate")
    ablated = [trial.goodput_rps for trial in result.trials if trial.stage == "ablate"]
    if result.policy.elastic.is_rigid() and ablated:
        assert ablated[0] > searched and elastic.goodput_rps == ablated[0]
    else:
        assert elastic.goodput_rps == searched and all(rate <= searched for rate in ablated)


def test_auto_goodput_metric_is_per_class_when_a_prompt_needs_several_instances():
    spec = load_spec(TINY)
    longest = max(r.prompt_len + r.output_len for r in Evaluator(spec, TINY.parent).workload())
    assert goodput_metric(spec, Evaluator(spec, TINY.parent, kv_capacity=longest)) == "p90"
    assert goodput_metric(spec, Evaluator(spec, TINY.parent, kv_capacity=longest - 1)) == "per-class"
    pinned = validate_spec(spec.model_dump(mode="json") | {
        "policy": spec.policy.model_dump(mode="json") | {"goodput_metric": "p90"}}, {}, "test")
    assert goodput_metric(pinned, Evaluator(pinned, TINY.parent, kv_capacity=1)) == "p90"

