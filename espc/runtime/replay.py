"""Replay a request stream (a spec's workload or a trace) on a running Engine, in real time.

Each request is submitted at its arrival time with `prompt_len` token ids from
`workload.prompt_tokens` and `max_new_tokens = output_len` (no stop tokens, so output
lengths are the stream's): the run is the same request stream the simulator replays, which
is what makes `espc simulate` and `espc run` comparable. The token ids carry the stream's
prefix structure: requests whose `prefix_hashes` agree on blocks 0..j share their first
512 (j + 1) ids, so the runtime's prefix cache (whose block size divides 512) hits where
the simulator's does. A next turn's prompt holds the synthetic reply the stream names, not
the tokens the model generated, so it finds its predecessor's prompt blocks in the cache
but not the reply's, in the run as in the simulation. The result is a SimulationResult on the engine's clock, so the
planner's metrics (`summarize`) and plots apply unchanged.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from espc.planner.sim.simulator import SimulationResult
from espc.planner.sim.workload import Request, prompt_tokens
from espc.runtime.engine import Completion, Engine
from espc.runtime.sampling import SamplingParams


@dataclass(frozen=True)
class Replay:
    result: SimulationResult  # the replayed requests only, arrivals relative to the first
    failed: dict[int, str]  # request index in the stream -> error
    output_tokens: int
    wall_s: float

    def dop_decisions(self) -> dict[str, Counter]:
        """Per phase, how many batches ran at each degree of parallelism."""
        decisions: dict[str, Counter] = {"prefill": Counter(), "decode": Counter()}
        for batch in self.result.timeline:
            decisions[batch.phase][len(batch.instances)] += 1
        return decisions


def replay(
    engine: Engine, requests: Sequence[Request], *, seed: int = 0,
    on_progress: Callable[[int, int], None] | None = None, timeout_s: float = 600.0,
) -> Replay:
    """Submit every request at its arrival (relative to now) and wait for all of them."""
    vocab = engine.spec.model.vocab
    prompts = [prompt_tokens(request, vocab, seed).tolist() for request in requests]
    order = sorted(range(len(requests)), key=lambda i: requests[i].arrival_s)
    first_arrival = requests[order[0]].arrival_s if requests else 0.0
    started = time.monotonic()
    handles = {}
    for index in order:
        delay = requests[index].arrival_s - first_arrival - (time.monotonic() - started)
        if delay > 0:
            time.sleep(delay)
        handles[index] = engine.submit(prompts[index], SamplingParams(max_new_tokens=requests[index].output_len))
        if on_progress:
            on_progress(sum(h.done() for h in handles.values()), len(requests))
    deadline = started + timeout_s
    while not all(handle.done() for handle in handles.values()):
        if time.monotonic() > deadline:
            for handle in handles.values():
                handle.cancel()
            break
        time.sleep(0.05)
        if on_progress:
            on_progress(sum(h.done() for h in handles.values()), len(requests))
    completions = {index: handle.result(timeout=60) for index, handle in handles.items()}
    wall_s = time.monotonic() - started
    served = engine.result()
    ids = {completion.request_id for completion in completions.values()}
    records = [record for record in served.records if record.id in ids]
    timeline = [batch for batch in served.timeline if set(batch.request_ids) & ids]
    result = SimulationResult(
        served.strategy, records, _duration(records), served.iterations, served.instance_busy_s,
        served.migrated_tokens, served.migrated_bytes, timeline,
    )
    failed = {index: _failure(c) for index, c in completions.items() if c.finish_reason != "length"}
    return Replay(result, failed, sum(len(c.token_ids) for c in completions.values()), wall_s)


def _failure(completion: Completion) -> str:
    """Why a request ended before its length: its error, else its finish reason."""
    assert completion.finish_reason is not None  # result() returned: the request has finished
    return completion.error or completion.finish_reason


def _duration(records) -> float:
    finished = [r.finish_s for r in records if r.finish_s is not None]
    return max(finished) - min(r.arrival_s for r in records) if finished else 0.0
