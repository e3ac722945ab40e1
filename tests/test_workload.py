"""Request streams: determinism, length ranges and shapes, arrival statistics, trace readers.

Statistical checks use fixed seeds and large samples, so they are deterministic; their
tolerances are several standard errors wide. The real traces are read from
../shared/traces (or $ESPC_TRACES) and skipped where absent.
"""

import hashlib
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from espc.frontend.presets import DATASET_INPUT_RANGES
from espc.frontend.spec import WorkloadSpec
from espc.planner.sim.workload import (
    DATASETS,
    MIXED_PARTS,
    PREFIX_BLOCK_TOKENS,
    Request,
    TraceError,
    generate,
    prompt_block_reuse,
    prompt_tokens,
    read_azure_csv,
    read_mooncake_jsonl,
    sample_arrivals,
    sample_dataset,
    sample_lengths,
    sample_zipf,
    workload_stats,
)

TRACES = Path(os.environ.get("ESPC_TRACES", Path(__file__).resolve().parent.parent.parent / "shared" / "traces"))


def workload(**fields) -> WorkloadSpec:
    return WorkloadSpec(**{"arrival": "poisson(2.0)", "requests": 300, **fields})


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize(
    "spec",
    [
        workload(lengths="mixed"),
        workload(lengths="zipf(1.2, 10, 200K)", arrival="gamma(1.5, 2.0)"),
        workload(lengths="uniform(8, 64)", outputs="leval"),
    ],
    ids=["mixed-poisson", "zipf-gamma", "uniform-leval-outputs"],
)
def test_same_seed_same_stream_other_seed_other_stream(spec):
    stream = generate(spec)
    assert generate(spec) == stream
    assert generate(spec, seed=spec.seed) == stream
    assert generate(spec, seed=1) != stream
    assert [request.id for request in stream] == list(range(spec.requests))
    arrivals = [request.arrival_s for request in stream]
    assert arrivals[0] == 0.0 and arrivals == sorted(arrivals)
    assert all(type(request.prompt_len) is int and type(request.output_len) is int for request in stream)


def test_rate_override_rescales_time_and_keeps_lengths():
    spec = workload(lengths="mixed", arrival="gamma(1.0, 2.0)")
    slow, fast = generate(spec), generate(spec, rate=4.0)
    assert [(r.prompt_len, r.output_len) for r in slow] == [(r.prompt_len, r.output_len) for r in fast]
    assert np.allclose([r.arrival_s for r in slow], [4.0 * r.arrival_s for r in fast], rtol=1e-12)


def test_requests_override_sets_the_count():
    assert len(generate(workload(lengths="sharegpt"), requests=17)) == 17


@pytest.mark.parametrize("override", [{"rate": 0.0}, {"rate": float("nan")}, {"requests": 0}])
def test_bad_overrides_are_refused(override):
    with pytest.raises(ValueError):
        generate(workload(lengths="sharegpt"), **override)


# ------------------------------------------------------------------------------- lengths

OUTPUT_RANGES = {name: (model.outputs.lo, model.outputs.hi) for name, model in DATASETS.items()}


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**63))
def test_dataset_lengths_stay_in_the_published_ranges(seed):
    rng = np.random.default_rng(seed)
    for name in (*MIXED_PARTS, "mixed"):
        prompts, outputs = sample_dataset(name, 400, rng)
        lo, hi = DATASET_INPUT_RANGES[name]
        assert lo <= prompts.min() and prompts.max() <= hi, name
        output_ranges = [OUTPUT_RANGES[part] for part in (MIXED_PARTS if name == "mixed" else (name,))]
        assert min(r[0] for r in output_ranges) <= outputs.min() and outputs.max() <= max(r[1] for r in output_ranges)
        assert outputs.min() >= 1


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**63), lo=st.integers(1, 5_000), span=st.integers(1, 500_000))
def test_synthetic_lengths_stay_in_their_ranges(seed, lo, span):
    rng = np.random.default_rng(seed)
    for shorthand in (f"zipf(1.1, {lo}, {lo + span})", f"uniform({lo}, {lo + span})"):
        lengths = sample_lengths(workload(lengths=shorthand).lengths, 500, rng)
        assert lo <= lengths.min() and lengths.max() <= lo + span, shorthand
    assert set(sample_lengths(workload(lengths=f"fixed({lo})").lengths, 10, rng).tolist()) == {lo}


def test_dataset_shapes_are_plausible():
    rng = np.random.default_rng(0)
    medians = {name: np.median(sample_dataset(name, 20_000, rng)[0]) for name in MIXED_PARTS}
    assert 80 < medians["sharegpt"] < 250
    assert 5_000 < medians["leval"] < 20_000
    assert 50_000 < medians["lveval"] < 150_000
    sharegpt_outputs = sample_dataset("sharegpt", 20_000, rng)[1]
    assert 150 < sharegpt_outputs.mean() < 350  # chat replies: a few hundred tokens
    for long_context in ("leval", "lveval"):
        assert 10 < np.median(sample_dataset(long_context, 20_000, rng)[1]) < 200  # short answers


def test_mixed_is_equal_parts_shuffled():
    prompts, _ = sample_dataset("mixed", 3_000, np.random.default_rng(3))
    # ShareGPT ends at 2.3K and L-Eval starts at 2.7K, so short prompts are exactly ShareGPT's.
    sharegpt = prompts <= DATASET_INPUT_RANGES["sharegpt"][1]
    assert sharegpt.sum() == 1_000
    assert 200 < sharegpt[:1_000].sum() < 500  # shuffled, not in blocks


def test_outputs_default_to_the_dataset_or_sharegpt():
    synthetic = generate(workload(lengths="fixed(100)", requests=2_000))
    assert max(r.output_len for r in synthetic) <= OUTPUT_RANGES["sharegpt"][1]
    assert np.mean([r.output_len for r in synthetic]) > 150
    lveval = generate(workload(lengths="lveval", requests=2_000))
    assert max(r.output_len for r in lveval) <= OUTPUT_RANGES["lveval"][1]
    overridden = generate(workload(lengths="lveval", outputs="fixed(7)"))
    assert {r.output_len for r in overridden} == {7}


ZIPF_SAMPLE = 1_000_000


@pytest.fixture(scope="module")
def zipf_samples() -> dict[float, np.ndarray]:
    return {alpha: sample_zipf(alpha, 10, 200_000, ZIPF_SAMPLE, np.random.default_rng(7)) for alpha in (1.0, 1.2, 1.4)}


def test_zipf_neighbouring_frequencies_follow_the_power_law(zipf_samples):
    for alpha, lengths in zipf_samples.items():
        counts = np.bincount(lengths[lengths <= 11] - 10)
        assert counts[0] / counts[1] == pytest.approx((11 / 10) ** alpha, rel=0.06), alpha


def test_zipf_mean_decreases_with_alpha(zipf_samples):
    means = [zipf_samples[alpha].mean() for alpha in (1.0, 1.2, 1.4)]
    assert means[0] > means[1] > means[2]


def test_zipf_reaches_both_ends_of_a_500k_range():
    lengths = sample_zipf(1.0, 10, 500_000, 200_000, np.random.default_rng(1))
    assert lengths.min() == 10 and 400_000 < lengths.max() <= 500_000


# ------------------------------------------------------------------------------ arrivals


def test_poisson_gaps_average_one_over_the_rate():
    spec = workload(lengths="sharegpt", arrival="poisson(4.0)")
    gaps = np.diff(sample_arrivals(spec.arrival, 200_000, np.random.default_rng(11)))
    assert gaps.mean() == pytest.approx(0.25, rel=0.01)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.02)


@pytest.mark.parametrize("cv", [0.5, 2.0])
def test_gamma_gaps_have_the_requested_mean_and_cv(cv):
    spec = workload(lengths="sharegpt", arrival=f"gamma(3.0, {cv})")
    gaps = np.diff(sample_arrivals(spec.arrival, 200_000, np.random.default_rng(12)))
    assert gaps.mean() == pytest.approx(1 / 3, rel=0.02)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.05)


# ------------------------------------------------------------------------ trace readers

AZURE_ROWS = [
    "TIMESTAMP,ContextTokens,GeneratedTokens",
    "2023-11-16 23:59:59.9999999,4808,10",
    "2023-11-17 00:00:00.0000000,3180,0",
    "2023-11-17 00:00:00.0000000,110,27",
    "2023-11-17 00:00:01.2500000,7433,14",
]
MOONCAKE_RECORDS = [
    {"timestamp": 0, "input_length": 1030, "output_length": 5, "hash_ids": [0, 1, 2]},
    {"timestamp": 0, "input_length": 600, "output_length": 0, "hash_ids": [0, 3]},
    {"timestamp": 3000, "input_length": 20, "output_length": 9, "hash_ids": [4]},
    {"timestamp": 5999, "input_length": 512, "output_length": 1},
]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


@pytest.fixture
def azure_trace(tmp_path) -> Path:
    return write_lines(tmp_path / "azure.csv", AZURE_ROWS)


@pytest.fixture
def mooncake_trace(tmp_path) -> Path:
    return write_lines(tmp_path / "mooncake.jsonl", [json.dumps(record) for record in MOONCAKE_RECORDS])


def test_read_azure_csv(azure_trace):
    requests = read_azure_csv(azure_trace)
    assert [(r.id, r.prompt_len, r.output_len) for r in requests] == [(0, 4808, 10), (1, 3180, 1), (2, 110, 27), (3, 7433, 14)]
    # 100 ns across midnight, exactly; the zero output is served as one token.
    assert [r.arrival_s for r in requests] == [0.0, 1e-7, 1e-7, 1.2500001]
    assert len(read_azure_csv(azure_trace, limit=2)) == 2


def test_read_mooncake_jsonl(mooncake_trace):
    requests = read_mooncake_jsonl(mooncake_trace)
    assert requests == [
        Request(0, 0.0, 1030, 5, (0, 1, 2)),
        Request(1, 0.0, 600, 1, (0, 3)),
        Request(2, 3.0, 20, 9, (4,)),
        Request(3, 5.999, 512, 1, ()),
    ]


def test_readers_stop_after_the_limit(azure_trace, mooncake_trace):
    # A broken line after the limit is never read.
    write_lines(azure_trace, AZURE_ROWS[:3] + ["garbage"])
    write_lines(mooncake_trace, [json.dumps(record) for record in MOONCAKE_RECORDS[:2]] + ["{"])
    assert len(read_azure_csv(azure_trace, limit=2)) == 2
    assert len(read_mooncake_jsonl(mooncake_trace, limit=2)) == 2


AZURE_CORRUPTIONS = [
    # (line number to replace, replacement, expected message)
    (1, "TIMESTAMP,ContextTokens,Generated", "missing column GeneratedTokens"),
    (3, "2023-11-17 00:00:00.0000000,31.5,0", "ContextTokens is not an integer: '31.5'"),
    (3, "2023-11-17 00:00:00.0000000,3180,many", "GeneratedTokens is not an integer"),
    (4, "2023-11-17 00:00:00.0000000,0,27", "ContextTokens must be positive, got 0"),
    (4, "2023-11-17 00:00:00.0000000,110,-2", "GeneratedTokens must not be negative, got -2"),
    (5, "2023-11-16 23:00:00.0000000,7433,14", "goes back in time"),
    (5, "2023-11-17 25:00:00.0000000,7433,14", "TIMESTAMP is not a time"),
    (5, "yesterday,7433,14", "TIMESTAMP is not a time"),
    (4, "2023-11-17 00:00:00.0000000,110", "expected 3 fields, got 2"),
]


@pytest.mark.parametrize("line, replacement, message", AZURE_CORRUPTIONS)
def test_corrupt_azure_csv_names_path_and_line(tmp_path, line, replacement, message):
    lines = list(AZURE_ROWS)
    lines[line - 1] = replacement
    path = write_lines(tmp_path / "bad.csv", lines)
    with pytest.raises(TraceError) as caught:
        read_azure_csv(path)
    assert str(caught.value).startswith(f"{path}:{line}: ")
    assert message in str(caught.value)


@pytest.mark.parametrize("kept, message", [(0, "empty file"), (1, "no requests after the header")])
def test_azure_csv_without_requests(tmp_path, kept, message):
    path = write_lines(tmp_path / "short.csv", AZURE_ROWS[:kept])
    with pytest.raises(TraceError, match=rf"^{re.escape(str(path))}:1: {message}"):
        read_azure_csv(path)


MOONCAKE_CORRUPTIONS = [
    # (line number to replace, replacement, expected message)
    (2, '{"timestamp": 0, "input_length": 600,', "bad JSON"),
    (2, "[1, 2]", "expected a JSON object, got list"),
    (2, '{"timestamp": 0, "input_length": 600}', "missing key 'output_length'"),
    (3, '{"timestamp": 3000, "input_length": "20", "output_length": 9}', "input_length is not an integer"),
    (3, '{"timestamp": 3000, "input_length": true, "output_length": 9}', "input_length is not an integer"),
    (3, '{"timestamp": 3000, "input_length": 0, "output_length": 9}', "input_length must be positive"),
    (3, '{"timestamp": 3000, "input_length": 20, "output_length": -9}', "output_length must not be negative"),
    (2, '{"timestamp": NaN, "input_length": 20, "output_length": 9}', "timestamp is not a finite number"),
    (3, '{"timestamp": 3000, "input_length": 20, "output_length": 9, "hash_ids": [1.5]}', "hash_ids is not a list"),
    (4, '{"timestamp": 2999, "input_length": 512, "output_length": 1}', "goes back in time"),
]


@pytest.mark.parametrize("line, replacement, message", MOONCAKE_CORRUPTIONS)
def test_corrupt_mooncake_jsonl_names_path_and_line(tmp_path, line, replacement, message):
    lines = [json.dumps(record) for record in MOONCAKE_RECORDS]
    lines[line - 1] = replacement
    path = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(TraceError) as caught:
        read_mooncake_jsonl(path)
    assert str(caught.value).startswith(f"{path}:{line}: ")
    assert message in str(caught.value)


def test_blank_lines_keep_line_numbers_and_bad_bytes_are_reported(tmp_path):
    lines = [json.dumps(MOONCAKE_RECORDS[0]), "", '{"timestamp": 1}']
    path = write_lines(tmp_path / "gaps.jsonl", lines)
    with pytest.raises(TraceError, match=rf"^{re.escape(str(path))}:3: missing key 'input_length'"):
        read_mooncake_jsonl(path)
    path = tmp_path / "binary.csv"
    path.write_bytes(f"{AZURE_ROWS[0]}\n{AZURE_ROWS[1]}\n\xff\xfe,1,1\n".encode("latin-1"))
    with pytest.raises(TraceError, match=rf"^{re.escape(str(path))}:3: not UTF-8"):
        read_azure_csv(path)


def test_missing_trace_file_is_a_trace_error(tmp_path):
    with pytest.raises(TraceError, match="cannot open"):
        read_azure_csv(tmp_path / "absent.csv")


# ---------------------------------------------------------------------- generate(trace)


def test_trace_workload_resolves_against_base_dir_and_caps(azure_trace):
    spec = workload(trace={"path": azure_trace.name}, arrival="trace(2.0)")
    replay = generate(spec, base_dir=azure_trace.parent)
    assert [r.prompt_len for r in replay] == [4808, 3180, 110, 7433]
    assert replay[-1].arrival_s == pytest.approx(1.2500001 / 2)
    assert len(generate(spec, base_dir=azure_trace.parent, requests=3)) == 3
    limited = workload(trace={"path": azure_trace.name, "limit": 2}, arrival="trace(1.0)")
    assert len(generate(limited, base_dir=azure_trace.parent, requests=3)) == 2


def test_trace_rate_override_gives_the_requested_mean_rate(mooncake_trace):
    spec = workload(trace=str(mooncake_trace), arrival="trace(1.0)")
    stats = workload_stats(generate(spec, rate=10.0))
    assert stats["mean_rate"] == pytest.approx(10.0, rel=1e-12)


def test_trace_lengths_with_synthetic_arrivals(mooncake_trace):
    spec = workload(trace=str(mooncake_trace), arrival="poisson(1.0)")
    stream = generate(spec)
    assert [r.prefix_hashes for r in stream] == [(0, 1, 2), (0, 3), (4,), ()]
    assert generate(spec) == stream and generate(spec, seed=5) != stream


def test_trace_arriving_at_once_cannot_be_rescaled(tmp_path):
    path = write_lines(tmp_path / "burst.jsonl", [json.dumps(MOONCAKE_RECORDS[0])] * 2)
    with pytest.raises(TraceError, match="arrive at once"):
        generate(workload(trace=str(path), arrival="trace(1.0)"), rate=2.0)


def test_workload_stats():
    requests = [Request(0, 0.0, 10, 1), Request(1, 1.0, 30, 3), Request(2, 4.0, 20, 5)]
    assert workload_stats(requests) == {
        "count": 3, "duration_s": 4.0, "mean_rate": 0.5, "prompt_mean": 20.0,
        "prompt_p50": 20.0, "prompt_p90": 28.0, "prompt_max": 30, "output_mean": 3.0,
        "prompt_block_reuse": None,
    }
    assert workload_stats(requests[:1])["mean_rate"] is None


# ------------------------------------------------------------------------- real traces

REAL_TRACES = [
    # file, rows, mean input (shared/anchors/README.md)
    ("AzureLLMInferenceTrace_code.csv", 8_819, 2_048),
    ("AzureLLMInferenceTrace_conv.csv", 19_366, 1_155),
    ("mooncake_conversation.jsonl", 12_031, 12_035),
]


@pytest.mark.parametrize("name, rows, mean_input", REAL_TRACES)
def test_real_traces_match_the_anchors(name, rows, mean_input):
    path = TRACES / name
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared traces are not in a user's clone; set ESPC_TRACES)")
    spec = workload(trace=str(path), arrival="trace(1.0)")
    stats = workload_stats(generate(spec))
    assert stats["count"] == rows
    assert round(stats["prompt_mean"]) == mean_input
    if name.startswith("mooncake"):
        assert round(stats["prompt_block_reuse"], 3) == 0.366  # anchors: "36.6% reuse"
    assert workload_stats(generate(spec, rate=7.5))["mean_rate"] == pytest.approx(7.5, rel=1e-9)


# ---------------------------------------------------------------------- prefix structure

BLOCK = PREFIX_BLOCK_TOKENS


def test_prefix_free_streams_are_drawn_as_before():
    """Prefix structure has a generator of its own: a stream without it is still the one the
    first three children of the seed draw (lengths, outputs, arrivals), and declaring a
    shared prompt changes neither the drawn lengths nor the arrivals."""
    spec = workload(lengths="zipf(1.2, 10, 20K)", outputs="uniform(1, 100)", seed=7)
    prompt_seed, output_seed, arrival_seed = np.random.SeedSequence(7).spawn(3)
    prompts = sample_lengths(spec.lengths, 300, np.random.default_rng(prompt_seed))
    outputs = sample_lengths(spec.outputs, 300, np.random.default_rng(output_seed))
    arrivals = sample_arrivals(spec.arrival, 300, np.random.default_rng(arrival_seed))
    expected = [Request(i, a, p, o) for i, (a, p, o) in enumerate(zip(arrivals.tolist(), prompts.tolist(), outputs.tolist()))]
    assert generate(spec) == expected
    shared = generate(workload(lengths="zipf(1.2, 10, 20K)", outputs="uniform(1, 100)", seed=7,
                               prefix={"shared_tokens": 1100, "groups": 3}))
    assert [(r.arrival_s, r.prompt_len - 1100, r.output_len) for r in shared] == [(r.arrival_s, r.prompt_len, r.output_len) for r in expected]


def _id_positions(stream: list[Request]) -> dict[int, set[tuple[int, int]]]:
    """block id -> {(request id, index)} where it occurs."""
    where: dict[int, set[tuple[int, int]]] = {}
    for request in stream:
        for index, block_id in enumerate(request.prefix_hashes):
            where.setdefault(block_id, set()).add((request.id, index))
    return where


def test_shared_system_prompt_names_its_full_blocks_and_groups_are_uniform():
    spec = workload(lengths="uniform(16, 2000)", requests=4000, prefix={"shared_tokens": 1100, "groups": 4})
    stream = generate(spec)
    assert generate(spec) == stream
    system_blocks = 1100 // BLOCK  # 2 full blocks; the third holds the message too
    heads = {}
    for request in stream:
        assert len(request.prefix_hashes) == math.ceil(request.prompt_len / BLOCK)  # Mooncake's convention
        assert 1100 + 16 <= request.prompt_len <= 1100 + 2000
        heads.setdefault(request.prefix_hashes[:system_blocks], []).append(request.id)
    assert len(heads) == 4
    # Each group is drawn with probability 1/4: counts within 4 standard deviations.
    sd = math.sqrt(4000 * 0.25 * 0.75)
    assert all(abs(len(members) - 1000) < 4 * sd for members in heads.values())
    # Every other id belongs to one request only: the system prompts' are the only shared ones.
    for block_id, places in _id_positions(stream).items():
        indices = {index for _, index in places}
        assert len(places) == 1 or indices < set(range(system_blocks)), (block_id, places)
    # Share of repeated blocks: all but each group's first request repeat the system blocks.
    blocks = sum(len(r.prefix_hashes) for r in stream)
    assert prompt_block_reuse(stream) == pytest.approx(system_blocks * (4000 - 4) / blocks, rel=1e-12)


def test_multi_turn_sessions_resend_the_conversation():
    # Prompt, output and message ranges keep the turns apart by length alone.
    shared, turns, requests = 1024, 3, 3001
    spec = workload(lengths="uniform(100, 300)", outputs="uniform(600, 700)", requests=requests,
                    prefix={"shared_tokens": shared, "turns": turns, "think_time": "10s"})
    stream = generate(spec)
    assert [r.id for r in stream] == list(range(requests))
    assert [r.arrival_s for r in stream] == sorted(r.arrival_s for r in stream) and stream[0].arrival_s == 0.0

    def turn(request: Request) -> int:
        return 0 if request.prompt_len <= shared + 300 else 1 if request.prompt_len <= shared + 2 * 300 + 700 else 2

    by_turn = [[r for r in stream if turn(r) == k] for k in range(turns)]
    sessions = math.ceil(requests / turns)
    # The draws fill sessions in order: the last session is cut short after its first turn.
    assert [len(members) for members in by_turn] == [sessions, sessions - 1, sessions - 1]
    # Sessions start at rate / turns, so requests arrive at the declared rate on average.
    assert stream[-1].arrival_s == pytest.approx((sessions - 1) / (2.0 / turns) + 20, rel=0.1)
    # A turn's successor arrives the think time after it.
    successor_of = [{round(r.arrival_s + 10.0, 6): r for r in members} for members in by_turn]
    for later in (1, 2):
        for request in by_turn[later]:
            before = successor_of[later - 1][round(request.arrival_s, 6)]
            message = request.prompt_len - before.prompt_len - before.output_len
            assert 100 <= message <= 300
            # The previous prompt's full blocks keep their ids; its partial block is named anew.
            kept = before.prompt_len // BLOCK
            assert request.prefix_hashes[:kept] == before.prefix_hashes[:kept]
            if before.prompt_len % BLOCK:
                assert request.prefix_hashes[kept] != before.prefix_hashes[kept]
            if later == 2:
                # Turn 1 holds turn 0's reply in full blocks; turn 2 resends them under the same ids.
                first = successor_of[0][round(before.arrival_s, 6)]
                reply_blocks = (first.prompt_len + first.output_len) // BLOCK
                assert reply_blocks > first.prompt_len // BLOCK
                assert request.prefix_hashes[:reply_blocks] == before.prefix_hashes[:reply_blocks]
    # Equal ids sit at equal indices behind equal ids: the chain is consistent.
    for places in _id_positions(stream).values():
        assert len({index for _, index in places}) == 1


def test_prompt_block_reuse_of_a_mooncake_trace(tmp_path):
    records = [
        {"timestamp": 0, "input_length": 1500, "output_length": 5, "hash_ids": [0, 1, 2]},
        {"timestamp": 1, "input_length": 1400, "output_length": 5, "hash_ids": [0, 1, 3]},  # repeats 0, 1
        {"timestamp": 2, "input_length": 1300, "output_length": 5, "hash_ids": [4, 1, 2]},  # 1, 2 behind another block
        {"timestamp": 3, "input_length": 1600, "output_length": 5, "hash_ids": [0, 1, 2, 5]},  # repeats 0, 1, 2
        {"timestamp": 4, "input_length": 100, "output_length": 5},
    ]
    path = write_lines(tmp_path / "reuse.jsonl", [json.dumps(record) for record in records])
    stream = read_mooncake_jsonl(path)
    assert workload_stats(stream)["prompt_block_reuse"] == pytest.approx(5 / 13, rel=1e-12)
    assert prompt_block_reuse(stream[:1]) == 0.0
    assert prompt_block_reuse([Request(0, 0.0, 100, 1)]) is None


def _chained_block_digests(tokens: np.ndarray, block: int) -> list[bytes]:
    """What a block-hashing prefix cache computes: digests chaining full blocks of token ids."""
    digests, digest = [], b""
    for start in range(0, len(tokens) - block + 1, block):
        digest = hashlib.sha256(digest + tokens[start : start + block].astype(np.int64).tobytes()).digest()
        digests.append(digest)
    return digests


def test_prompt_tokens_carry_the_prefix_structure():
    vocab = 256
    a = Request(0, 0.0, 3 * BLOCK + 100, 1, (7, 8, 9, 10))
    b = Request(1, 0.0, 4 * BLOCK, 1, (7, 8, 11, 12))  # shares blocks 0..1
    c = Request(2, 0.0, 2 * BLOCK, 1, (5, 8))  # shares block 1's id, not block 0's
    d = Request(3, 0.0, 4 * BLOCK, 1, (7, 8, 9, 10))  # a's partial block 3 is d's full one
    tokens = {r.id: prompt_tokens(r, vocab, seed=3) for r in (a, b, c, d)}
    for r in (a, b, c, d):
        assert tokens[r.id].shape == (r.prompt_len,) and tokens[r.id].min() >= 0 and tokens[r.id].max() < vocab
        assert np.array_equal(prompt_tokens(r, vocab, seed=3), tokens[r.id])
    assert np.array_equal(tokens[0][: 2 * BLOCK], tokens[1][: 2 * BLOCK])
    assert np.array_equal(tokens[0][: 3 * BLOCK], tokens[3][: 3 * BLOCK])
    # A runtime cache hashing blocks of 16 tokens finds exactly the shared 512-token blocks.
    digests = {r.id: _chained_block_digests(tokens[r.id], 16) for r in (a, b, c, d)}
    common = [sum(1 for x, y in zip(digests[0], digests[other]) if x == y) for other in (1, 2, 3)]
    assert common == [2 * BLOCK // 16, 0, 3 * BLOCK // 16]
    assert not np.array_equal(tokens[0][BLOCK : 2 * BLOCK], tokens[2][BLOCK : 2 * BLOCK])  # same id, other chain
    assert not np.array_equal(prompt_tokens(a, vocab, seed=4), tokens[0])
    # Without ids every token is the request's own.
    plain = [prompt_tokens(Request(i, 0.0, BLOCK, 1), vocab) for i in (0, 1)]
    assert not np.array_equal(plain[0], plain[1])


def test_generated_sessions_share_tokens_exactly_where_they_share_blocks():
    spec = workload(lengths="uniform(100, 900)", outputs="uniform(200, 600)", requests=40,
                    prefix={"shared_tokens": 1536, "groups": 2, "turns": 2, "think_time": "5s"})
    stream = generate(spec)
    tokens = [prompt_tokens(r, 128, seed=0) for r in stream]
    pairs_sharing = 0
    for x in stream:
        for y in stream[x.id + 1 :]:
            common = next((j for j, (p, q) in enumerate(zip(x.prefix_hashes, y.prefix_hashes)) if p != q),
                          min(len(x.prefix_hashes), len(y.prefix_hashes)))
            shortest = min(x.prompt_len, y.prompt_len)
            equal_up_to = min(common * BLOCK, shortest)
            assert np.array_equal(tokens[x.id][:equal_up_to], tokens[y.id][:equal_up_to])
            # The next block is drawn apart (equal by chance with probability 128^-512 at most).
            beyond = slice(equal_up_to, min(equal_up_to + BLOCK, shortest))
            assert beyond.start == beyond.stop or not np.array_equal(tokens[x.id][beyond], tokens[y.id][beyond])
            pairs_sharing += common >= 3
    assert pairs_sharing > 40 * 39 / 2 / 3  # a system prompt of two groups: about half the pairs
