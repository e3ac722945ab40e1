"""Deterministic request streams: synthetic length distributions, arrival processes, traces.

`generate(workload)` turns a WorkloadSpec into a list of `Request`s, the input of the
simulator and of trace replay in the runtime. The same spec and seed always give the same
list. Every stream starts at t = 0 (the first request) and ids are 0..n-1 in arrival order.

Randomness is split into three independent generators (prompt lengths, output lengths,
arrivals) spawned from the seed, so overriding the rate keeps the lengths, and the arrival
times of Poisson and gamma streams are the same unit-rate draws divided by the rate: the
simulator's rate bisection compares time-scaled copies of one stream, not fresh samples.

Named datasets
--------------
shared/anchors/README.md gives only the input ranges of LoongServe's workloads
(`DATASET_INPUT_RANGES`); the shapes below are estimates, chosen as explained, and every
sample is drawn *conditioned on* the published [min, max] (rejection: redraw what falls
outside), never clipped, so no probability mass piles up at a bound. Lengths are log-normal
(the usual fit for text lengths: positive, right-skewed, multiplicative spread) rounded to
integers; prompt and output lengths are drawn independently given the dataset.

- sharegpt: prompts median 128, sigma 1.3, in [4, 2300] (mean ~250, p90 ~620); outputs
  median 180, sigma 1.0, in [1, 1000] (mean ~235). ShareGPT first turns are mostly short
  questions with a tail of pasted text; replies run to a few hundred tokens (the Azure
  conversation trace in shared/traces averages 211); LoongServe caps outputs at 1K.
- leval: prompts median 10K, sigma 1.0, in [2700, 210500] (mean ~17.7K, p90 ~38K); outputs
  median 64, sigma 0.9, in [1, 1000] (mean ~95). L-Eval's per-task mean lengths span
  ~4K-30K (QA and multiple choice over papers, meetings, contracts), with NarrativeQA books
  past 100K; answers are letters, short answers or summaries.
- lveval: prompts an equal-parts mixture of five levels with medians 20.5K, 41K, 82K, 164K,
  328K, sigma 0.25, in [15100, 497300] (mean ~129K); outputs median 32, sigma 0.8, in
  [1, 500] (mean ~44). LV-Eval builds every QA pair at five context levels of 16K, 32K,
  64K, 128K and 256K words; its published 11.9K-387K words against LoongServe's
  15.1K-497.3K tokens give ~1.28 tokens per word. Answers are short phrases.
- mixed: equal parts of the three (n // 3 each, the remainder to the first ones),
  shuffled; each request keeps its dataset's outputs (prompt mean ~49K, output mean ~125).

Synthetic distributions
-----------------------
- ``zipf(alpha, min, max)``: P(k) proportional to k^-alpha on the integers min..max,
  sampled exactly by inverse CDF: the normalised cumulative pmf over the max - min + 1
  lengths is built once per (alpha, min, max) (4 MB and ~10 ms for 10..500K)
  and each sample is one binary search.
- ``uniform(min, max)``: integers, both ends included. ``fixed(tokens)``.
- With ``outputs`` unset, synthetic prompts get ShareGPT's output lengths.

Arrivals
--------
- ``poisson(rate)``: exponential gaps with mean 1/rate.
- ``gamma(rate, cv)``: gamma gaps with shape 1/cv^2 and mean 1/rate (cv > 1 is burstier
  than Poisson, cv = 1 is Poisson).
- ``trace(rate_scale)``: the trace's timestamps relative to its first request, divided by
  rate_scale; `generate(rate=R)` instead rescales them so that the mean rate is R.
- A trace with ``poisson``/``gamma`` arrivals keeps the trace's lengths and draws new times.

The mean rate of a stream is (n - 1) / (last arrival - first arrival): one over the mean
gap, the quantity a Poisson rate parameter estimates.

Traces
------
`read_azure_csv` (Azure LLM inference trace: TIMESTAMP, ContextTokens, GeneratedTokens) and
`read_mooncake_jsonl` (Mooncake: timestamp in ms, input_length, output_length, hash_ids of
512-token prefix blocks, kept as `Request.prefix_hashes`; hash_ids may be absent) read line by
line and stop after `limit` requests. Azure timestamps carry 7 fractional digits (100 ns);
they are parsed into integer nanoseconds so that differences are exact. A malformed file
raises `TraceError` reading ``PATH:LINE: what is wrong``. Rules:

- prompt lengths must be positive: a request without a prompt cannot be served;
- output lengths must not be negative, and 0 is read as 1: serving a request always yields
  its first token from the prefill, so a recorded 0 (a request cut off before a token was
  counted) costs one prefill and one token. The public Azure 2023 and Mooncake
  conversation traces contain no zero (their minima are 6, 7 and 1);
- timestamps must not go backwards; equal timestamps are fine (Mooncake's conversation
  trace is quantised to ~3 s: its 12,031 requests arrive at 1,180 distinct times, in
  bursts of up to 28 at once);
- blank lines are skipped; a file with no request is an error.

With a trace, the spec's `requests` does not cap the replay (it has a default of 1000,
which would silently truncate every trace): `TraceSpec.limit` and `generate(requests=N)` do.

Prefix structure
----------------
`Request.prefix_hashes` names a prompt's blocks of ``PREFIX_BLOCK_TOKENS`` (512) tokens,
Mooncake's convention: ceil(prompt_len / 512) ids, the last one naming a partial block when
512 does not divide the prompt. Equal ids at index j mean equal prompt tokens in block j
*given equal earlier blocks*: a prefix cache chains them (block j's key names ids 0..j), so
an id says nothing on its own. Synthetic ids come from one counter, unique across the
stream; a partial block's id is never repeated (only full blocks are shareable). A
workload without `prefix` structure gives no ids (nothing in it repeats).

A synthetic workload's `[workload.prefix]` table (`prefix { ... }` in the DSL) declares it:

- ``shared_tokens = N``, ``groups = G``: G system prompts of N tokens; each session draws
  one uniformly (a fourth generator spawned from the seed, so the lengths and arrivals of
  every stream stay the ones drawn without prefix structure). A prompt is the system prompt
  followed by its drawn length: prompt_len = N + drawn. Its ids name the system prompt's
  N // 512 full blocks, then blocks of its own (the block where the system prompt ends and
  the message begins is the request's own, so only full blocks of the system prompt are
  shared).
- ``turns = T``, ``think_time = D``: requests come in sessions of T turns. Sessions start
  per the arrival process at rate / T (so requests arrive at the declared rate on average;
  `generate(rate=R)` scales the session starts only) and turn k+1 arrives D after turn k
  (the user's think time, fixed under any rate: a turn whose predecessor is still running
  finds nothing cached, as in a replayed trace). Turn k+1's prompt is turn k's prompt,
  turn k's output and a new message of a drawn length; its ids are those of the full blocks
  of turn k's prompt + output (the concatenated sequence: the blocks turn k's KV holds
  once it finished), then blocks of its own. The block turn k's prompt ends in is named
  anew there, since it then holds output tokens too. n requests form ceil(n / T) sessions,
  the last one cut short; ids are renumbered in arrival order.

`workload_stats` reports ``prompt_block_reuse``: the share of prompt blocks whose chained
key an earlier request's prompt already had, the upper bound of a prefix cache's block hit
rate (36.6% on Mooncake's conversation trace). `prompt_tokens` turns a request into token
ids that carry this structure, for replay on the runtime.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import itertools
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

import numpy as np

from espc.frontend.presets import DATASET_INPUT_RANGES, DATASET_OUTPUT_MAX
from espc.frontend.spec import (
    PREFIX_BLOCK_TOKENS,
    DatasetLengths,
    FixedLengths,
    GammaArrival,
    LengthDist,
    PoissonArrival,
    PrefixSpec,
    TraceArrival,
    TraceSpec,
    UniformLengths,
    WorkloadSpec,
    ZipfLengths,
)


@dataclass(frozen=True, slots=True)
class Request:
    """One request of a stream: when it arrives and how many tokens it reads and writes."""

    id: int
    arrival_s: float
    prompt_len: int
    output_len: int
    # Ids of the prompt's PREFIX_BLOCK_TOKENS-token blocks (Mooncake's hash_ids), for prefix
    # caching: equal ids at index j mean equal tokens in block j given equal earlier blocks.
    prefix_hashes: tuple[int, ...] = ()


# ------------------------------------------------------------------------------- lengths


@dataclass(frozen=True)
class TruncatedLogNormal:
    """Integer lengths round(exp(N(log median, sigma^2))) conditioned on [lo, hi]; with several
    medians, an equal-weight mixture of such components (one sigma, one range)."""

    medians: tuple[float, ...]
    sigma: float
    lo: int
    hi: int

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        log_medians = np.log(self.medians)[rng.integers(len(self.medians), size=n)]
        lengths = np.empty(n, dtype=np.int64)
        pending = np.arange(n)
        while pending.size:
            drawn = np.rint(np.exp(rng.normal(log_medians[pending], self.sigma)))
            inside = (drawn >= self.lo) & (drawn <= self.hi)
            lengths[pending[inside]] = drawn[inside]
            pending = pending[~inside]
        return lengths


@dataclass(frozen=True)
class DatasetModel:
    prompts: TruncatedLogNormal
    outputs: TruncatedLogNormal


def _dataset_model(name: str, prompt_medians: tuple[float, ...], prompt_sigma: float,
                   output_median: float, output_sigma: float) -> DatasetModel:
    return DatasetModel(
        TruncatedLogNormal(prompt_medians, prompt_sigma, *DATASET_INPUT_RANGES[name]),
        TruncatedLogNormal((output_median,), output_sigma, 1, DATASET_OUTPUT_MAX[name]),
    )


_LVEVAL_LEVEL_WORDS = (16_000, 32_000, 64_000, 128_000, 256_000)
_LVEVAL_TOKENS_PER_WORD = 1.28

# The parameters and their reasoning are in the module docstring.
DATASETS: dict[str, DatasetModel] = {
    "sharegpt": _dataset_model("sharegpt", (128,), 1.3, 180, 1.0),
    "leval": _dataset_model("leval", (10_000,), 1.0, 64, 0.9),
    "lveval": _dataset_model(
        "lveval", tuple(_LVEVAL_TOKENS_PER_WORD * words for words in _LVEVAL_LEVEL_WORDS), 0.25, 32, 0.8
    ),
}
MIXED_PARTS = ("sharegpt", "leval", "lveval")


def sample_dataset(name: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Prompt and output lengths of n requests drawn like dataset `name` (see the module docstring)."""
    if name != "mixed":
        model = DATASETS[name]
        return model.prompts.sample(n, rng), model.outputs.sample(n, rng)
    part_of_request = rng.permutation(np.arange(n) % len(MIXED_PARTS))
    prompts = np.empty(n, dtype=np.int64)
    outputs = np.empty(n, dtype=np.int64)
    for part, part_name in enumerate(MIXED_PARTS):
        members = part_of_request == part
        prompts[members], outputs[members] = sample_dataset(part_name, int(members.sum()), rng)
    return prompts, outputs


@functools.lru_cache(maxsize=8)
def _zipf_cdf(alpha: float, lo: int, hi: int) -> np.ndarray:
    cdf = np.cumsum(np.arange(lo, hi + 1, dtype=np.float64) ** -alpha)
    cdf /= cdf[-1]  # exactly 1.0 at the end, so a uniform draw in [0, 1) never runs past it
    cdf.flags.writeable = False  # shared by every caller through the cache
    return cdf


def sample_zipf(alpha: float, lo: int, hi: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """n integers in [lo, hi] with P(k) proportional to k^-alpha (exact inverse CDF)."""
    return lo + np.searchsorted(_zipf_cdf(alpha, lo, hi), rng.random(n), side="right")


def sample_lengths(dist: LengthDist, n: int, rng: np.random.Generator) -> np.ndarray:
    """n lengths from `dist`; a named dataset gives its prompt lengths."""
    match dist:
        case DatasetLengths(dist=name):
            return sample_dataset(name, n, rng)[0]
        case ZipfLengths(alpha=alpha, min=lo, max=hi):
            return sample_zipf(alpha, lo, hi, n, rng)
        case UniformLengths(min=lo, max=hi):
            return rng.integers(lo, hi, size=n, endpoint=True)
        case FixedLengths(tokens=tokens):
            return np.full(n, tokens, dtype=np.int64)
    raise TypeError(f"not a length distribution: {dist!r}")


def _synthetic_lengths(workload: WorkloadSpec, n: int, prompt_rng: np.random.Generator,
                       output_rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Prompt and output lengths; outputs default to the dataset's own, ShareGPT's for
    synthetic prompts."""
    lengths = workload.lengths
    assert lengths is not None, "validated: a workload without a trace has prompt lengths"
    if isinstance(lengths, DatasetLengths):
        prompts, own_outputs = sample_dataset(lengths.dist, n, prompt_rng)
    else:
        prompts, own_outputs = sample_lengths(lengths, n, prompt_rng), None
    match workload.outputs:
        case None if own_outputs is not None:
            outputs = own_outputs
        case None:
            outputs = DATASETS["sharegpt"].outputs.sample(n, output_rng)
        case DatasetLengths(dist=name):
            outputs = sample_dataset(name, n, output_rng)[1]
        case dist:
            outputs = sample_lengths(dist, n, output_rng)
    return prompts, outputs


# ------------------------------------------------------------------------------ arrivals


def sample_arrivals(arrival: PoissonArrival | GammaArrival, n: int, rng: np.random.Generator,
                    rate: float | None = None) -> np.ndarray:
    """n arrival times in seconds, the first at 0; `rate` overrides the process's rate."""
    rate = arrival.rate if rate is None else rate
    match arrival:
        case PoissonArrival():
            unit_gaps = rng.standard_exponential(n - 1)
        case GammaArrival(cv=cv):
            shape = 1.0 / cv**2
            unit_gaps = rng.standard_gamma(shape, n - 1) / shape
        case _:
            raise TypeError(f"not a synthetic arrival process: {arrival!r}")
    return np.concatenate(([0.0], np.cumsum(unit_gaps) / rate))


def mean_rate(arrivals: Sequence[float] | np.ndarray) -> float | None:
    """(n - 1) / duration in requests per second; None when every request arrives at once."""
    duration = float(np.max(arrivals) - np.min(arrivals)) if len(arrivals) else 0.0
    return (len(arrivals) - 1) / duration if duration > 0 else None


# -------------------------------------------------------------------------------- traces


class TraceError(ValueError):
    """A trace that cannot be read; the message is ``PATH:LINE: what is wrong``."""

    def __init__(self, path: Path, line: int | None, problem: str) -> None:
        self.path, self.line, self.problem = path, line, problem
        super().__init__(f"{path}:{line}: {problem}" if line is not None else f"{path}: {problem}")


def _open(path: Path) -> BinaryIO:
    try:
        return path.open("rb")
    except OSError as error:
        raise TraceError(path, None, f"cannot open: {error.strerror}") from None


def _text_lines(path: Path, file: BinaryIO) -> Iterator[str]:
    """The file's lines as text, decoded one by one so that a bad byte is reported on its line."""
    for number, raw in enumerate(file, 1):
        try:
            yield raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as error:
            raise TraceError(path, number, f"not UTF-8 text (byte {error.start + 1} of the line)") from None


def _output_len(tokens: int) -> int:
    return max(tokens, 1)  # a recorded 0 still costs the first token (module docstring)


AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
_AZURE_TIMESTAMP = re.compile(
    r"([0-9]{4}-[0-9]{2}-[0-9]{2}[ T][0-9]{2}:[0-9]{2}:[0-9]{2})(?:\.([0-9]{1,9}))?"
)
_INTEGER = re.compile(r"[+-]?[0-9]+")


def _azure_nanoseconds(text: str) -> int | None:
    """`2023-11-16 18:17:03.9799600` -> integer nanoseconds since 0001-01-01, exactly; None if malformed."""
    match = _AZURE_TIMESTAMP.fullmatch(text.strip())
    if match is None:
        return None
    try:
        moment = datetime.fromisoformat(match[1])  # validates the calendar and the clock
    except ValueError:
        return None
    seconds = moment.toordinal() * 86_400 + moment.hour * 3_600 + moment.minute * 60 + moment.second
    return seconds * 10**9 + int((match[2] or "").ljust(9, "0"))


def _azure_count(path: Path, line: int, column: str, text: str) -> int:
    if _INTEGER.fullmatch(text.strip()) is None:
        raise TraceError(path, line, f"{column} is not an integer: {text!r}")
    return int(text)


def read_azure_csv(path: Path | str, limit: int | None = None) -> list[Request]:
    """The requests of an Azure LLM inference trace (CSV: TIMESTAMP, ContextTokens,
    GeneratedTokens), at most `limit`, timed relative to the first."""
    path = Path(path)
    requests: list[Request] = []
    with _open(path) as file:
        rows = csv.reader(_text_lines(path, file))
        try:
            header = [name.strip() for name in next(rows)]
        except StopIteration:
            raise TraceError(path, 1, f"empty file; expected the header {','.join(AZURE_COLUMNS)}") from None
        missing = [column for column in AZURE_COLUMNS if column not in header]
        if missing:
            raise TraceError(path, 1, f"missing column {', '.join(missing)} (the header has {', '.join(header)})")
        time_at, prompt_at, output_at = (header.index(column) for column in AZURE_COLUMNS)
        first = previous = 0
        for row in rows:
            if not row:
                continue
            line = rows.line_num
            if len(row) != len(header):
                raise TraceError(path, line, f"expected {len(header)} fields, got {len(row)}")
            nanoseconds = _azure_nanoseconds(row[time_at])
            if nanoseconds is None:
                raise TraceError(path, line, f"TIMESTAMP is not a time like 2023-11-16 18:17:03.9799600: {row[time_at]!r}")
            if not requests:
                first = previous = nanoseconds
            elif nanoseconds < previous:
                raise TraceError(path, line, f"TIMESTAMP {row[time_at].strip()} goes back in time from the previous request")
            previous = nanoseconds
            prompt_len = _azure_count(path, line, "ContextTokens", row[prompt_at])
            output_len = _azure_count(path, line, "GeneratedTokens", row[output_at])
            if prompt_len <= 0:
                raise TraceError(path, line, f"ContextTokens must be positive, got {prompt_len}")
            if output_len < 0:
                raise TraceError(path, line, f"GeneratedTokens must not be negative, got {output_len}")
            requests.append(Request(len(requests), (nanoseconds - first) / 1e9, prompt_len, _output_len(output_len)))
            if len(requests) == limit:
                break
        if not requests:
            raise TraceError(path, rows.line_num, "no requests after the header")
    return requests


MOONCAKE_KEYS = ("timestamp", "input_length", "output_length")


def _is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON `true` is no length


def read_mooncake_jsonl(path: Path | str, limit: int | None = None) -> list[Request]:
    """The requests of a Mooncake trace (JSONL: timestamp in ms, input_length, output_length,
    hash_ids), at most `limit`, timed relative to the first."""
    path = Path(path)
    requests: list[Request] = []
    with _open(path) as file:
        first = previous = 0.0
        line = 0
        for line, text in enumerate(_text_lines(path, file), 1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                raise TraceError(path, line, f"bad JSON: {error.msg} at column {error.colno}") from None
            if not isinstance(record, dict):
                raise TraceError(path, line, f"expected a JSON object, got {type(record).__name__}")
            for key in MOONCAKE_KEYS:
                if key not in record:
                    raise TraceError(path, line, f"missing key {key!r}")
            timestamp, prompt_len, output_len = (record[key] for key in MOONCAKE_KEYS)
            hashes = record.get("hash_ids", [])
            if not (_is_integer(timestamp) or isinstance(timestamp, float)) or not math.isfinite(timestamp):
                raise TraceError(path, line, f"timestamp is not a finite number of milliseconds: {timestamp!r}")
            for key, value in (("input_length", prompt_len), ("output_length", output_len)):
                if not _is_integer(value):
                    raise TraceError(path, line, f"{key} is not an integer: {value!r}")
            if prompt_len <= 0:
                raise TraceError(path, line, f"input_length must be positive, got {prompt_len}")
            if output_len < 0:
                raise TraceError(path, line, f"output_length must not be negative, got {output_len}")
            if not isinstance(hashes, list) or not all(_is_integer(block) for block in hashes):
                raise TraceError(path, line, "hash_ids is not a list of integers")
            if not requests:
                first = previous = timestamp
            elif timestamp < previous:
                raise TraceError(path, line, f"timestamp {timestamp} goes back in time from the previous request's {previous}")
            previous = timestamp
            requests.append(
                Request(len(requests), (timestamp - first) / 1e3, prompt_len, _output_len(output_len), tuple(hashes))
            )
            if len(requests) == limit:
                break
        if not requests:
            raise TraceError(path, max(line, 1), "no requests in the file")
    return requests


def read_trace(trace: TraceSpec, *, base_dir: Path | None = None, limit: int | None = None) -> list[Request]:
    """The trace's requests, its path resolved against `base_dir` (the spec file's directory;
    default: the working directory), capped at the smaller of `trace.limit` and `limit`."""
    path = Path(trace.path)
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    caps = [cap for cap in (trace.limit, limit) if cap is not None]
    reader = read_azure_csv if trace.format == "azure" else read_mooncake_jsonl
    return reader(path, min(caps) if caps else None)


# ------------------------------------------------------------------------------ generate


def generate(
    workload: WorkloadSpec,
    *,
    base_dir: Path | None = None,
    rate: float | None = None,
    seed: int | None = None,
    requests: int | None = None,
) -> list[Request]:
    """The workload's request stream, sorted by arrival, ids 0..n-1, the first at t = 0.

    `rate` overrides the arrival rate (a trace replayed with trace arrivals is rescaled to
    that mean rate; multi-turn sessions start at rate / turns, their think time unscaled),
    `seed` the spec's seed, `requests` the number of requests (with a
    trace: caps the replay). Trace paths are resolved against `base_dir`.
    """
    if rate is not None and not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"rate must be a positive number of requests per second, got {rate}")
    if requests is not None and requests < 1:
        raise ValueError(f"requests must be at least 1, got {requests}")
    seed = workload.seed if seed is None else seed
    # The first three children are those of spawn(3): streams drawn before prefix structure existed stay the same.
    prompt_seed, output_seed, arrival_seed, prefix_seed = np.random.SeedSequence(seed).spawn(4)
    arrival_rng = np.random.default_rng(arrival_seed)

    if workload.trace is None:
        assert not isinstance(workload.arrival, TraceArrival), "validated: trace arrivals need a trace"
        count = workload.requests if requests is None else requests
        prompts, outputs = _synthetic_lengths(
            workload, count, np.random.default_rng(prompt_seed), np.random.default_rng(output_seed)
        )
        if workload.prefix.declared:
            return _prefixed_stream(
                workload.prefix, workload.arrival, prompts.tolist(), outputs.tolist(), arrival_rng,
                np.random.default_rng(prefix_seed), rate,
            )
        arrivals = sample_arrivals(workload.arrival, count, arrival_rng, rate)
        return [
            Request(index, arrival, prompt, output)
            for index, (arrival, prompt, output) in enumerate(zip(arrivals.tolist(), prompts.tolist(), outputs.tolist()))
        ]

    replay = read_trace(workload.trace, base_dir=base_dir, limit=requests)
    recorded = np.array([request.arrival_s for request in replay])
    match workload.arrival:
        case TraceArrival(rate_scale=rate_scale) if rate is None:
            arrivals = recorded / rate_scale
        case TraceArrival():
            assert rate is not None  # the case above took rate None
            recorded_rate = mean_rate(recorded)
            if recorded_rate is None and len(replay) > 1:
                raise TraceError(Path(workload.trace.path), None,
                                 f"its {len(replay)} requests arrive at once; there is no rate to rescale to {rate} req/s")
            arrivals = recorded if recorded_rate is None else recorded * (recorded_rate / rate)
        case synthetic:
            arrivals = sample_arrivals(synthetic, len(replay), arrival_rng, rate)
    return [replace(request, arrival_s=arrival) for request, arrival in zip(replay, arrivals.tolist())]


def _prefixed_stream(prefix: PrefixSpec, arrival: PoissonArrival | GammaArrival, messages: list[int],
                     outputs: list[int], arrival_rng: np.random.Generator, group_rng: np.random.Generator,
                     rate: float | None) -> list[Request]:
    """Requests with shared system prompts and multi-turn sessions (the module docstring):
    request i of the draws is turn i % turns of session i // turns."""
    block = PREFIX_BLOCK_TOKENS
    turns, count = prefix.turns, len(messages)
    sessions = -(-count // turns)
    rate = arrival.rate if rate is None else rate
    starts = sample_arrivals(arrival, sessions, arrival_rng, rate / turns).tolist()
    groups = group_rng.integers(prefix.groups, size=sessions).tolist()
    think = prefix.think_time or 0.0  # validated: set exactly when turns > 1
    new_id = itertools.count()
    system = [tuple(itertools.islice(new_id, prefix.shared_tokens // block)) for _ in range(prefix.groups)]
    drawn: list[tuple[float, int, int, int, tuple[int, ...]]] = []  # arrival, draw index, prompt, output, ids
    for session in range(sessions):
        # The conversation so far: its length and the ids of its full blocks.
        context, context_ids = prefix.shared_tokens, system[groups[session]]
        for turn in range(min(turns, count - session * turns)):
            index = session * turns + turn
            prompt_len = context + messages[index]
            own = -(-prompt_len // block) - len(context_ids)  # blocks that hold this turn's message
            prompt_ids = context_ids + tuple(itertools.islice(new_id, own))
            drawn.append((starts[session] + turn * think, index, prompt_len, outputs[index], prompt_ids))
            # The next turn resends this prompt and its output: the prompt's full blocks keep
            # their ids, the blocks the output completes (the partial one included) get new ones.
            context += messages[index] + outputs[index]
            full_in_prompt = prompt_len // block
            context_ids = prompt_ids[:full_in_prompt] + tuple(itertools.islice(new_id, context // block - full_in_prompt))
    drawn.sort(key=lambda request: request[:2])
    return [
        Request(index, arrival, prompt_len, output, ids)
        for index, (arrival, _, prompt_len, output, ids) in enumerate(drawn)
    ]


def block_keys(prefix_hashes: Sequence[int]) -> list[int]:
    """Chained 64-bit keys of a prompt's blocks: key j names ids 0..j together, so equal keys
    mean equal tokens in blocks 0..j. Stable across processes and Python versions (BLAKE2b)."""
    keys: list[int] = []
    key = 0
    for block_id in prefix_hashes:
        key = int.from_bytes(hashlib.blake2b(f"{key}:{block_id}".encode(), digest_size=8).digest(), "little")
        keys.append(key)
    return keys


def prompt_tokens(request: Request, vocab: int, seed: int = 0) -> np.ndarray:
    """`request.prompt_len` token ids in [0, vocab) that carry its prefix structure.

    Full block j's PREFIX_BLOCK_TOKENS ids are drawn from a generator seeded by (seed, the
    chained key of blocks 0..j), so two requests whose prefix_hashes agree on blocks 0..j get
    the same ids in [0, 512 (j + 1)), and a block-hashing prefix cache (whose block size
    divides 512) hits exactly where the workload's ids repeat. The tokens past the last full
    named block (a partial block, or a prompt without ids) are the request's own: drawn from
    a generator seeded by (seed, request id).
    """
    block = PREFIX_BLOCK_TOKENS
    named = min(len(request.prefix_hashes), request.prompt_len // block)
    parts = [
        np.random.default_rng([seed, 0, key]).integers(0, vocab, block)
        for key in block_keys(request.prefix_hashes[:named])
    ]
    parts.append(np.random.default_rng([seed, 1, request.id]).integers(0, vocab, request.prompt_len - named * block))
    return np.concatenate(parts)


def workload_stats(requests: Sequence[Request]) -> dict[str, int | float | None]:
    """Summary of a stream for reports: count, duration, mean rate, prompt and output lengths,
    and `prompt_block_reuse` (None when no request names its blocks)."""
    if not requests:
        raise ValueError("no requests to summarise")
    arrivals = np.array([request.arrival_s for request in requests])
    prompts = np.array([request.prompt_len for request in requests])
    outputs = np.array([request.output_len for request in requests])
    p50, p90 = np.percentile(prompts, [50, 90]).tolist()
    return {
        "count": len(requests),
        "duration_s": float(arrivals.max() - arrivals.min()),
        "mean_rate": mean_rate(arrivals),
        "prompt_mean": float(prompts.mean()),
        "prompt_p50": p50,
        "prompt_p90": p90,
        "prompt_max": int(prompts.max()),
        "output_mean": float(outputs.mean()),
        "prompt_block_reuse": prompt_block_reuse(requests),
    }


def prompt_block_reuse(requests: Sequence[Request]) -> float | None:
    """The share of prompt blocks whose chained key (ids 0..j) an earlier request's prompt
    had: the most of its blocks a prefix cache could serve, were nothing ever evicted and
    every earlier request finished in time. None when no request names its blocks."""
    seen: set[int] = set()
    blocks = repeated = 0
    for request in sorted(requests, key=lambda request: request.arrival_s):
        keys = block_keys(request.prefix_hashes)
        blocks += len(keys)
        repeated += sum(key in seen for key in keys)
        seen.update(keys)
    return repeated / blocks if blocks else None
