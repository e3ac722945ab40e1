"""Sampling parameters of a request and the sampler that turns one row of logits into a token.

The runtime samples on whichever worker holds a request's logits, and that worker changes as
the request's KV migrates. So the draw must not depend on process-local random state: its
only randomness is one uniform number from a `torch.Generator` seeded from (seed, step), which
makes the token a function of the logits, the parameters, the seed and the step alone.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field

MAX_LOGPROBS = 20  # most alternatives a token's logprobs list (OpenAI's top_logprobs limit)


class SamplingParams(BaseModel):
    """How a request picks its tokens. `temperature` 0 is greedy; `top_k` 0 and `top_p` 1 are
    off. `seed` None lets the runtime choose the request's seed. `logprobs` k (0..20) returns
    each generated token's log-probability and the k most likely tokens' (`TokenLogprobs`);
    None computes nothing."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_new_tokens: int = Field(16, ge=1)
    temperature: float = Field(0.0, ge=0.0, allow_inf_nan=False)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop_token_ids: tuple[Annotated[int, Field(ge=0)], ...] = ()
    return_logits: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """A generated token's log-probability and the `k` most likely tokens' as (id, logprob),
    most likely first: log_softmax of the model's fp32 logits row, before temperature, top-k
    and top-p (the distribution of the model, as OpenAI and vLLM report it)."""

    logprob: float
    top: tuple[tuple[int, float], ...]


def token_logprobs(logits: torch.Tensor, token: int, k: int) -> TokenLogprobs:
    """`TokenLogprobs` of `token` from one row of logits [vocab], computed in float32 (ties
    in the top k: lowest index first)."""
    logprobs = torch.log_softmax(logits.detach().float(), dim=0)
    top = logprobs.sort(descending=True, stable=True) if k else None
    pairs = () if top is None else tuple(zip(top.indices[:k].tolist(), top.values[:k].tolist()))
    return TokenLogprobs(float(logprobs[token]), pairs)


def _uniform(seed: int, step: int) -> float:
    """A uniform number in [0, 1) determined by (seed, step) alone. The pair is hashed rather
    than summed so that neighbouring seeds do not share draws at shifted steps."""
    key = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(key, "little"))
    return float(torch.rand((), generator=generator, dtype=torch.float64))


def sample(logits: torch.Tensor, params: SamplingParams, seed: int, step: int) -> int:
    """The next token from one row of logits [vocab]: argmax when greedy (lowest index on
    ties); otherwise softmax(logits / temperature) cut to the `top_k` most likely tokens, then
    to the smallest prefix of those whose mass reaches `top_p` (renormalised, at least one
    token), and drawn by inverse CDF with the (seed, step) uniform. Computed in float64 on the
    logits' device whatever their dtype."""
    if logits.dim() != 1 or len(logits) == 0:
        raise ValueError(f"sample needs one non-empty row of logits, got shape {tuple(logits.shape)}")
    x = logits.detach().to(torch.float64)
    top = float(x.max())
    if not math.isfinite(top):  # NaN or +inf anywhere, or nothing above -inf
        raise ValueError(f"logits of shape {tuple(logits.shape)} have no finite maximum: max is {top}")
    if params.temperature == 0:
        return int(x.argmax())
    # A stable sort of the logits themselves fixes the order of ties (lowest index first)
    # before temperature scaling could merge nearly equal values.
    ordered, order = x.sort(descending=True, stable=True)
    if params.top_k:
        ordered, order = ordered[: params.top_k], order[: params.top_k]
    # Shifted by the maximum first: with a tiny temperature, logits / temperature overflow
    # to inf (and softmax to NaN), while (logit - max) / temperature only reaches -inf.
    probs = torch.softmax((ordered - ordered[0]) / params.temperature, dim=0)
    cdf = probs.cumsum(0)
    if params.top_p < 1:
        nucleus = int(torch.searchsorted(cdf, params.top_p * cdf[-1])) + 1  # first prefix reaching top_p
        cdf = cdf[:nucleus]
    target = torch.tensor(_uniform(seed, step), dtype=torch.float64, device=cdf.device) * cdf[-1]
    # right=True skips tokens whose probability underflowed to 0 (their cdf equals the one before).
    index = int(torch.searchsorted(cdf, target, right=True).clamp(max=len(cdf) - 1))
    return int(order[index])
