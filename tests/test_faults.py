"""Faults touch only what they must (the driver, `espc.runtime.driver.Driver._dispatch`), end
to end with real workers (gloo on the CPU):

- a batch the backend cannot lower fails its own requests; the other batch of the same plan
  runs and generates what the float64 reference generates, and the engine goes on serving;
- a KV table that cannot hold what a plan allocates rolls every table back and either
  refuses the request that needed the room (it held no KV) or preempts it (recompute: it
  comes back and still generates the reference's tokens), and counts it in `stats()`.

Since the table compacts (`espc.backend.kvpool`), it holds every token the planner's
capacity admits, so a `KVPoolFull` needs the planner and a table to disagree: these tests
give instance 1 a table smaller than the capacity the scheduler plans with. The backend
lowers every batch shape the planner emits, so the unlowerable batch comes from a Lowering
that, like an older backend, lowers no prefill ring of more than one instance.
"""

from pathlib import Path

import torch

from espc.backend.kvpool import PagedKVTable
from espc.backend.lower import Lowering
from espc.planner.plan import DecodeBatch, DecodeItem, IterationPlan, PrefillBatch, PrefillItem, even_retention
from espc.planner.sim.costmodel import CostModel
from espc.planner.sim.strategies import Deployment, Scheduler
from espc.runtime.engine import Engine
from espc.runtime.sampling import SamplingParams

TINY = Path(__file__).resolve().parent.parent / "specs" / "tiny-cpu.toml"
KV_CAPACITY = 4096  # what the scheduler plans with on every instance
SMALL_TABLE = 40  # tokens instance 1's table holds in the KV tests


class Placed(Scheduler):
    """Plans where the test says. Decoding requests go first, one decode batch per set of
    instances holding them (master: the first). Otherwise the waiting requests prefill in one
    plan, request k (by id) on the instances `rings[k % len(rings)]`, retained evenly there —
    the first time only once `together` requests wait, so they share a plan."""

    name = "placed"

    def __init__(self, deployment: Deployment, rings: list[tuple[int, ...]], together: int):
        super().__init__(deployment)
        self.rings, self.together, self.started = rings, together, False

    def schedule(self, state):
        if state.idle != set(range(state.num_instances)) - state.retired:
            return None
        groups: dict[tuple[int, ...], list] = {}
        for s in sorted(state.running.values(), key=lambda s: s.id):
            if s.decoding and not s.busy:
                groups.setdefault(tuple(sorted(s.kv_tokens)), []).append(s)
        if groups:
            return IterationPlan(state.iteration, tuple(
                DecodeBatch(holders, tuple(DecodeItem(s.id, holders[0], s.shards()) for s in members))
                for holders, members in groups.items()
            ))
        waiting = sorted(state.waiting.values(), key=lambda s: s.id)
        if not waiting or (not self.started and len(waiting) < self.together):
            return None
        self.started = True
        batches: dict[tuple[int, ...], list[PrefillItem]] = {}
        for k, s in enumerate(waiting):
            ring = self.rings[k % len(self.rings)]
            batches.setdefault(ring, []).append(PrefillItem(s.id, 0, s.pending_target, even_retention(0, s.pending_target, ring)))
        return IterationPlan(state.iteration, tuple(PrefillBatch(ring, tuple(items)) for ring, items in batches.items()))


class NoRingLowering(Lowering):
    """A backend that lowers prefill on one instance only (as an older one would)."""

    def lower(self, plan, **options):
        for batch in plan.batches:
            if isinstance(batch, PrefillBatch) and len(batch.instances) > 1:
                raise NotImplementedError(f"prefill on a ring of {len(batch.instances)} instances is not lowered by this backend")
        return super().lower(plan, **options)


def greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    """The float64 reference's greedy continuation."""
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            sequence.append(int(model(torch.tensor(sequence))[-1].argmax()))
    return sequence[len(prompt):]


def placed_engine(spec, rings, together) -> tuple[Engine, Placed]:
    scheduler = Placed(Deployment.build(CostModel.from_spec(spec), 1, KV_CAPACITY), rings, together)
    return Engine(spec, scheduler=scheduler, kv_capacity=KV_CAPACITY), scheduler


def prompt(n: int, first: int = 3) -> list[int]:
    return [(first + 7 * i) % 250 + 1 for i in range(n)]


def test_an_unlowerable_batch_fails_only_its_own_requests(spec, reference):
    engine, _ = placed_engine(spec, [(0,), (1, 2)], together=2)
    engine._driver.lowering = NoRingLowering(engine._driver.lowering.model)  # the driver's lowering only
    params = SamplingParams(max_new_tokens=5)
    with engine:
        lowered, unlowerable = engine.generate([prompt(9), prompt(12, 5)], params, timeout=120)
        after = engine.generate(prompt(7, 11), params, timeout=120)[0]  # the engine goes on
        engine.check_kv()
        stats = engine.stats()
    assert unlowerable.finish_reason == "error"
    assert "prefill on a ring of 2 instances is not lowered by this backend" in unlowerable.error
    assert "cannot execute its batch" in unlowerable.error and not unlowerable.token_ids
    assert lowered.finish_reason == "length" and lowered.token_ids == greedy(reference, prompt(9), 5)
    assert after.finish_reason == "length" and after.token_ids == greedy(reference, prompt(7, 11), 5)
    assert stats["running"] == 0 and stats["kv_used_tokens"] == stats["kv_cached_tokens"] and stats["in_service"] == 4


def test_a_full_kv_table_refuses_or_preempts_only_the_request_that_needs_the_room(spec, reference):
    engine, scheduler = placed_engine(spec, [(1,)], together=2)
    driver = engine._driver
    # Instance 1's table holds 40 tokens; the scheduler plans with 4096. Tables other than
    # rank 0's may be smaller: the pool tensors are sized by rank 0's.
    driver.tables[1] = PagedKVTable(SMALL_TABLE, spec.runtime.kv_block_size, driver.options.max_running)
    with engine:
        # 30 + 20 prompt tokens in one prefill: the second does not fit and holds nothing.
        kept, refused = engine.generate([prompt(30), prompt(20, 9)], SamplingParams(max_new_tokens=4), timeout=120)
        refusals = engine.stats()["kv_full"]
        # 20 + 14 tokens prefill together; after 3 decode steps both hold 40, and the 4th step's
        # append of the first does not fit: it is preempted (its 23 tokens freed), the second
        # finishes, then the first recomputes its 24 tokens and finishes too.
        scheduler.started = False
        handles = [
            engine.submit(prompt(20, 2), SamplingParams(max_new_tokens=12)),
            engine.submit(prompt(14, 4), SamplingParams(max_new_tokens=6)),
        ]
        long, short = (handle.result(120) for handle in handles)
        engine.check_kv()
        stats = engine.stats()
    assert refused.finish_reason == "rejected" and refused.code == "kv_full"
    assert refused.error.startswith("instance 1 cannot hold its KV: request 1: 20 tokens do not fit, 10 of 40 tokens free")
    assert kept.finish_reason == "length" and kept.token_ids == greedy(reference, prompt(30), 4)
    assert refusals == {"preempted": 0, "refused": 1}
    assert long.finish_reason == "length" and long.token_ids == greedy(reference, prompt(20, 2), 12)
    assert short.finish_reason == "length" and short.token_ids == greedy(reference, prompt(14, 4), 6)
    assert stats["kv_full"] == {"preempted": 1, "refused": 1} and stats["rejected"] == {"kv_full": 1}
    assert driver.state.requests[long.request_id].preemptions == 1
    assert stats["running"] == 0 and stats["kv_used_tokens"] == stats["kv_cached_tokens"] and stats["in_service"] == 4
