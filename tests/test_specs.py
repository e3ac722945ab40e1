"""The example specs: TOML and DSL twins give equal Specs, fmt round-trips, derived facts hold."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from espc.frontend.loader import load_spec, parse_spec
from espc.frontend.spec import LatencySLO, Spec
from espc.frontend.writer import to_dsl, to_toml

SPECS = Path(__file__).resolve().parent.parent / "specs"
SPEC_FILES = sorted(SPECS.glob("*.toml")) + sorted(SPECS.glob("*.esp"))
STEMS = sorted({path.stem for path in SPEC_FILES})


def test_every_spec_has_both_twins():
    assert "tiny-cpu" in STEMS
    for stem in STEMS:
        assert (SPECS / f"{stem}.toml").exists(), f"{stem}.esp has no TOML twin"
        assert (SPECS / f"{stem}.esp").exists(), f"{stem}.toml has no DSL twin"


@pytest.mark.parametrize("stem", STEMS)
def test_toml_and_dsl_twins_are_the_same_spec(stem):
    assert load_spec(SPECS / f"{stem}.toml") == load_spec(SPECS / f"{stem}.esp")


@pytest.mark.parametrize("path", SPEC_FILES, ids=lambda path: path.name)
@pytest.mark.parametrize("full", [False, True], ids=["compact", "full"])
def test_fmt_round_trips(path, full):
    spec = load_spec(path)
    as_toml, as_dsl = to_toml(spec, full), to_dsl(spec, full)
    assert parse_spec(as_toml, "converted.toml", "toml") == spec
    assert parse_spec(as_dsl, "converted.esp", "dsl") == spec
    # Writing is deterministic and a fixed point: converting the converted text changes nothing.
    assert to_toml(parse_spec(as_dsl, "converted.esp", "dsl"), full) == as_toml
    assert to_dsl(parse_spec(as_toml, "converted.toml", "toml"), full) == as_dsl


def test_compact_form_keeps_only_what_differs():
    text = to_toml(load_spec(SPECS / "lwm7b-a800x8.toml"))
    assert 'preset = "lwm-text-1m"' in text
    assert 'device = "A800-80G"' in text
    assert "layers" not in text  # comes from the preset
    assert "kv_block_size" not in text  # the default
    dsl = to_dsl(load_spec(SPECS / "llama2-70b-a100-2nodes.toml"))
    assert "gpu A100-80G x 8 as a100-0" in dsl
    assert "ttft <= max(25x prefill, 15s) at p90" in dsl


def test_tiny_default_is_a_small_gqa_model_on_four_cpu_workers():
    spec = load_spec(SPECS / "tiny-cpu.toml")
    assert spec.model.heads == 4 and spec.model.kv_heads == 2  # GQA
    assert spec.model.random_seed == 0
    assert spec.cluster.device_kind == "cpu" and spec.cluster.num_devices == 4
    assert (spec.runtime.backend, spec.runtime.attention) == ("gloo", "torch")
    # 2 (K and V) × 2 layers × 2 KV heads × 16 dims × 4 bytes
    assert spec.model.kv_bytes_per_token == 512


def test_published_model_facts():
    lwm = load_spec(SPECS / "lwm7b-a800x8.toml").model
    assert lwm.kv_bytes_per_token == 512 * 1024  # anchors: "KV = 512 KiB per token"
    assert lwm.max_context == 2**20
    assert 6.7e9 < lwm.num_parameters < 6.8e9  # Llama-2-7B: 6.74B
    llama3 = load_spec(SPECS / "llama3-8b-h100x8.toml").model
    assert 8.0e9 < llama3.num_parameters < 8.1e9  # Llama-3-8B: 8.03B
    assert llama3.rope_scaling.type == "llama3" and llama3.max_context == 131_072
    llama70 = load_spec(SPECS / "llama2-70b-a100-2nodes.toml").model
    assert 68.9e9 < llama70.num_parameters < 69.1e9  # Llama-2-70B: 68.98B


def test_runtime_defaults_follow_the_device_kind():
    spec = load_spec(SPECS / "llama3-8b-h100x8.toml")
    assert (spec.runtime.backend, spec.runtime.attention) == ("nccl", "triton")


def test_topology_graph_of_two_nodes():
    cluster = load_spec(SPECS / "llama2-70b-a100-2nodes.toml").cluster
    graph = cluster.topology()
    assert graph.number_of_nodes() == 16
    assert graph.number_of_edges() == 16 * 15 // 2
    assert graph.edges[0, 7]["bandwidth"] == 300e9 and graph.edges[0, 7]["link"] == "intra-node"
    assert graph.edges[0, 8]["bandwidth"] == 100e9 and graph.edges[0, 8]["link"] == "inter-node"
    assert graph.nodes[9]["node"] == "a100-1" and graph.nodes[9]["local_index"] == 1
    instances = cluster.instances()
    assert [tuple(d.index for d in group) for group in instances] == [
        (0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11), (12, 13, 14, 15)
    ]
    ring = cluster.instance_graph()
    assert ring.edges[0, 1]["bandwidth"] == 4 * 300e9  # four tp shards talk pairwise
    assert ring.edges[1, 2]["bandwidth"] == 100e9  # across nodes: the network


BASE = """
[model]
preset = "tiny"
[[cluster.nodes]]
device = "cpu"
devices = 4
[slo]
ttft = "max(25x prefill, 2s) at p90"
tpot = "200ms"
[workload]
arrival = "poisson(1)"
"""


def _spec(extra: str) -> Spec:
    return parse_spec(BASE + extra, "test.toml", "toml")


def test_shorthand_and_table_forms_are_equal():
    short = _spec('lengths = "zipf(1.2, 8, 2K)"')
    table = _spec('lengths = { dist = "zipf", alpha = 1.2, min = 8, max = "2K" }')
    keywords = _spec('lengths = "zipf(alpha=1.2, max=2000, min=8)"')
    assert short == table == keywords
    assert short.workload.lengths.max == 2000


def test_device_aliases_and_overrides():
    base = BASE.replace('device = "cpu"', 'device = "A800"').replace("devices = 4", "devices = 8")
    spec = parse_spec(base + 'lengths = "sharegpt"', "test.toml", "toml")
    assert spec.cluster.nodes[0].device.name == "A800-80G"
    assert spec.cluster.nodes[0].device.link_bandwidth == 200e9
    override = base.replace('device = "A800"', 'device = { name = "A800", memory = "40GiB" }')
    device = parse_spec(override + 'lengths = "sharegpt"', "t.toml", "toml").cluster.nodes[0].device
    assert device.memory == 40 * 2**30 and device.peak_flops == 312e12


def test_ttft_scales_with_isolated_prefill():
    slo = LatencySLO.model_validate("max(25x prefill, 15s) at p99")
    assert slo.percentile == 99
    assert slo.target(0.1) == 15.0
    assert slo.target(2.0) == 50.0
    assert LatencySLO.model_validate("50ms").target(10.0) == 0.05


def test_spec_is_frozen():
    spec = _spec('lengths = "sharegpt"')
    with pytest.raises(ValidationError):
        spec.model.layers = 3  # type: ignore[misc]


def test_prefix_caching_switch_and_prefix_table_in_both_syntaxes():
    default = _spec('lengths = "sharegpt"')
    assert default.runtime.prefix_caching is True and not default.workload.prefix.declared
    assert "prefix" not in to_toml(default) and "prefix" not in to_dsl(default)
    extra = (
        'lengths = "zipf(1.2, 8, 500)"\noutputs = "uniform(1, 32)"\n\n[workload.prefix]\nshared_tokens = "1.5Ki"\n'
        'groups = 2\nturns = 3\nthink_time = "20s"\n\n[runtime]\nprefix_caching = false\n'
    )
    spec = _spec(extra)
    assert spec.runtime.prefix_caching is False
    assert (spec.workload.prefix.shared_tokens, spec.workload.prefix.groups) == (1536, 2)
    assert (spec.workload.prefix.turns, spec.workload.prefix.think_time) == (3, 20.0)
    dsl = """
model tiny
cluster { cpu x 4 }
slo { ttft <= max(25x prefill, 2s) at p90; tpot <= 200ms }
workload {
    lengths zipf(1.2, 8, 500); outputs uniform(1, 32); arrival poisson(1)
    prefix { shared_tokens 1536; groups 2; turns 3; think_time 20s }
}
runtime { prefix_caching false }
"""
    assert parse_spec(dsl.replace("model tiny", "model tiny {}"), "test.esp", "dsl") == spec
    as_toml, as_dsl = to_toml(spec), to_dsl(spec)
    assert 'prefix = { shared_tokens = 1536, groups = 2, turns = 3, think_time = "20s" }' in as_toml
    assert "prefix_caching = false" in as_toml and "    prefix_caching false" in as_dsl
    assert "        think_time 20s" in as_dsl
    assert parse_spec(as_toml, "converted.toml", "toml") == spec == parse_spec(as_dsl, "converted.esp", "dsl")


def test_dataset_outputs_are_bounded_by_their_own_output_lengths():
    # leval's prompts reach 210,500 tokens but its answers 1,000: they fit the tiny 4K context.
    spec = _spec('lengths = "uniform(8, 64)"\noutputs = "leval"')
    assert spec.workload.max_output_tokens == 1000


def test_tiny_prefix_spec_fits_one_instance():
    spec = load_spec(SPECS / "tiny-cpu-prefix.toml")
    assert spec.model == load_spec(SPECS / "tiny-cpu.toml").model
    prefix = spec.workload.prefix
    assert (prefix.shared_tokens, prefix.groups, prefix.turns) == (1536, 2, 1)
    # The longest prompt with its output fits one worker's KV pool (2,093 tokens).
    usable = spec.cluster.nodes[0].device.memory * spec.runtime.memory_fraction - spec.model.weight_bytes
    pool = int(usable // spec.model.kv_bytes_per_token)
    assert pool == 2093
    assert prefix.shared_tokens + spec.workload.lengths.max_tokens + spec.workload.max_output_tokens <= pool
