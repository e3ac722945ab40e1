"""The compile pipeline's search: elastic equivalents of static groupings, and a search that
keeps the best policy it verified."""

from pathlib import Path

import pytest

from espc import load_spec
from espc.planner.artifact import spec_hash
from espc.planner.compiler import SEED_LAYOUTS, CompileOptions, compile_spec, static_equivalent
from espc.planner.policy import ElasticPolicy, LengthBucket
from espc.planner.strategies import StaticLayout

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


def test_two_class_layout_splits_the_bucket_at_its_threshold_and_merges_the_long_class():
    layout = StaticLayout(tp=1, groups=(2, 1, 1), long_threshold=500)
    policy = static_equivalent(layout, template(), PROMPTS)
    policy.verify(4)
    # (low, high, share, dop, batch tokens, max instances, within SLO). The long class is one
    # bucket: a cap of 2 instances per bucket over two buckets would let it hold 4.
    assert [(b.low, b.high, b.share, b.prefill_dop, b.batch_tokens, b.max_instances, b.within_slo) for b in policy.buckets] == [
        (0, 100, 0.5, 1, 2_048, 4, True),
        (100, 500, 0.3, 1, 8_192, 4, True),
        (500, 4_097, 0.2, 2, 8_192, 2, False),
    ]
    kept = ("instance_weight", "decode_instance_tokens", "reserve_output_tokens", "scale_up", "migration")
    assert all(getattr(policy, field) == getattr(template(), field) for field in kept)


def test_a_threshold_on_an_edge_or_past_the_last_bucket_adds_no_bucket():
    on_edge = static_equivalent(StaticLayout(1, (3, 1), 1_000), template(), PROMPTS)
    assert [b.low for b in on_edge.buckets] == [0, 100, 1_000]
    assert [(b.prefill_dop, b.max_instances) for b in on_edge.buckets] == [(1, 4), (1, 4), (3, 3)]
    beyond = static_equivalent(StaticLayout(1, (3, 1), 10_000), template(), PROMPTS)
    assert [(b.low, b.high, b.prefill_dop, b.max_instances) for b in beyond.buckets] == [
        (0, 100, 1, 4), (100, 1_000, 1, 4), (1_000, 4_097, 1, 4),
    ]


def test_equal_groups_span_up_to_their_size_everywhere():
    policy = static_equivalent(StaticLayout(tp=2, groups=(2, 2)), template(tp=2), PROMPTS)
    assert [(b.prefill_dop, b.max_instances) for b in policy.buckets] == [(2, 4)] * 3
    singles = static_equivalent(StaticLayout(tp=2, groups=(1,) * 4), template(tp=2), PROMPTS)
    assert [(b.prefill_dop, b.max_instances) for b in singles.buckets] == [(1, 4)] * 3


def test_a_layout_of_another_tp_is_refused():
    with pytest.raises(ValueError, match="tp=2"):
        static_equivalent(StaticLayout(tp=2, groups=(1, 1)), template(tp=1), PROMPTS)


def test_the_search_starts_from_static_seeds_and_keeps_the_best_verified_policy(tmp_path):
    """A searching compile simulates the elastic equivalents of the best screened static
    groupings beside the MILP's policies, and what it predicts for elastic is at least every
    policy it verified (the search only ever keeps improvements)."""
    path = tmp_path / "tiny.toml"
    path.write_text(TINY.read_text().replace('device = "cpu"', SLOW_CPU) + '\n[policy]\nstrategy = "elastic"\nlength_buckets = 3\n')
    spec = load_spec(path)
    result = compile_spec(spec, spec_hash(spec), tmp_path, CompileOptions(search_seconds=1.0, trial_requests=40))
    seeds = [trial for trial in result.trials if trial.stage == "seed"]
    assert 1 <= len(seeds) <= SEED_LAYOUTS
    assert all(trial.label.startswith("as static tp=") for trial in seeds)
    elastic = next(p for p in result.policy.predictions if p.strategy == "elastic")
    verified = [trial.goodput_rps for trial in result.trials if trial.stage in ("verify", "seed")]
    assert elastic.goodput_rps >= max(verified)
