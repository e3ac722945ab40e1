"""The sampler (`espc.runtime.sampling`): greedy and top-k 1 are argmax, draws depend only on
(seed, step), temperature sampling follows softmax, top-k / top-p never leave their set."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from espc.runtime.sampling import SamplingParams, sample

LOGITS = st.lists(st.floats(-20, 20, allow_nan=False), min_size=1, max_size=12).map(
    lambda values: torch.tensor(values, dtype=torch.float32)
)
TEMPERATURES = st.floats(0.05, 5.0)


def _first_max(logits: torch.Tensor) -> int:
    values = logits.tolist()
    return values.index(max(values))


@given(LOGITS)
def test_greedy_is_argmax_lowest_index_on_ties(logits):
    assert sample(logits, SamplingParams(), seed=0, step=0) == _first_max(logits)
    assert sample(torch.tensor([1.0, 3.0, 3.0, 3.0]), SamplingParams(), seed=0, step=0) == 1


@given(LOGITS, TEMPERATURES, st.integers(0, 2**31), st.integers(0, 1000))
def test_top_k_one_is_greedy_at_any_temperature(logits, temperature, seed, step):
    params = SamplingParams(temperature=temperature, top_k=1)
    assert sample(logits, params, seed, step) == _first_max(logits)


def test_same_seed_and_step_same_token_and_steps_vary():
    logits = torch.zeros(16)
    params = SamplingParams(temperature=1.0)
    first = [sample(logits, params, seed=42, step=s) for s in range(40)]
    assert first == [sample(logits.clone(), params, seed=42, step=s) for s in range(40)]
    assert len(set(first)) > 8  # 40 draws of a uniform 16-token vocabulary
    assert first != [sample(logits, params, seed=43, step=s) for s in range(40)]


def test_low_precision_logits_are_sampled_in_high_precision():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    params = SamplingParams(temperature=0.7, top_p=0.9)
    assert [sample(logits, params, 5, s) for s in range(20)] == [sample(logits.float(), params, 5, s) for s in range(20)]


@pytest.mark.parametrize(
    "logits, params, allowed",
    [
        ([0.0, 1.0, -1.0, 0.5, 2.0], SamplingParams(temperature=1.0), range(5)),
        ([0.0, 1.0, -1.0, 0.5, 2.0], SamplingParams(temperature=2.5), range(5)),
        ([0.0, 1.0, -1.0, 0.5, 2.0], SamplingParams(temperature=1.0, top_k=3), [1, 3, 4]),
    ],
)
def test_empirical_distribution_matches_softmax(logits, params, allowed):
    # Fixed seed and steps: the draws are deterministic, so the test cannot flake. The bound
    # is the chi-square quantile at p = 1e-4 for 4 degrees of freedom (~23.5).
    logits = torch.tensor(logits)
    draws = 4000
    counts = torch.bincount(torch.tensor([sample(logits, params, seed=1, step=s) for s in range(draws)]), minlength=5)
    expected = torch.zeros(5, dtype=torch.float64)
    expected[list(allowed)] = torch.softmax(logits[list(allowed)].double() / params.temperature, 0) * draws
    assert counts[expected == 0].sum() == 0
    chi2 = float(((counts[expected > 0] - expected[expected > 0]) ** 2 / expected[expected > 0]).sum())
    assert chi2 < 23.5, (counts.tolist(), expected.tolist())


@settings(max_examples=60, deadline=None)
@given(LOGITS, TEMPERATURES, st.integers(1, 15), st.floats(0.01, 1.0), st.integers(0, 2**31))
def test_top_k_and_top_p_stay_in_their_set(logits, temperature, top_k, top_p, seed):
    # The allowed set, computed independently and generous on ties and rounding: the tokens
    # at least as likely as the k-th most likely one, then the same for the nucleus.
    values = logits.double()
    kth = values.sort(descending=True).values[min(top_k, len(values)) - 1]
    in_k = values >= kth
    probs = torch.where(in_k, torch.softmax(values.masked_fill(~in_k, -math.inf) / temperature, 0), 0.0)
    ordered = probs.sort(descending=True).values
    reach = int((ordered.cumsum(0) < top_p * ordered.sum() + 1e-9).sum()) + 1
    allowed = in_k & (probs >= ordered[min(reach, len(ordered)) - 1])
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    for step in range(10):
        assert allowed[sample(logits, params, seed, step)]


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -1),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("top_k", -1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("max_new_tokens", 0),
        ("stop_token_ids", (-1,)),
        ("unknown", 1),
    ],
)
def test_validation_rejects_bad_values(field, value):
    with pytest.raises(ValidationError, match=field):
        SamplingParams(**{field: value})


def test_params_are_frozen_with_documented_defaults():
    params = SamplingParams()
    assert (params.max_new_tokens, params.temperature, params.top_k, params.top_p) == (16, 0.0, 0, 1.0)
    assert (params.seed, params.stop_token_ids, params.return_logits) == (None, (), False)
    with pytest.raises(ValidationError, match="frozen"):
        params.temperature = 1.0


def test_bad_logits_are_rejected():
    with pytest.raises(ValueError, match=r"one non-empty row of logits, got shape \(2, 3\)"):
        sample(torch.zeros(2, 3), SamplingParams(), 0, 0)
    with pytest.raises(ValueError, match="no finite maximum: max is nan"):
        sample(torch.tensor([0.0, math.nan]), SamplingParams(temperature=1.0), 0, 0)


def test_a_tiny_temperature_is_greedy_not_nan():
    logits = torch.tensor([0.5, 3.0, -1.0, 2.9])
    params = SamplingParams(temperature=5e-324)
    assert all(sample(logits, params, seed=1, step=step) == 1 for step in range(20))
