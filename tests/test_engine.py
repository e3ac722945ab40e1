"""The runtime end to end: `espc.Engine` with real worker processes (gloo on the CPU).

Numerics: greedy tokens and per-step logits of the engine equal a single-process float64
reference of the same weights, for prompts of odd lengths on the GQA tiny model, under
plans of every shape the runtime executes — DoP 1, 2 and 4 (static-sp), scale-up decoding
(the compiled elastic scheduler, and one with instance classes), prefill on 4 instances
retained on 2 (scale-down) with a migration between generated tokens (a scripted
scheduler), disaggregated prefill/decode — and, on a Hugging Face checkpoint at DoP 2 and
with chunked prefill (strategy chunked, test_chunked.py has the rest), equal transformers'
own greedy generation.

Lifecycle and faults: start/stop leaves no process behind; cancellation and streaming free
KV; a killed or stopped worker fails the requests that depended on it, with an error, while
the engine goes on serving on the remaining instances; the KV tables are checked against the
scheduler's state after every run.
"""

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from hf_checkpoints import greedy_continuation, random_llama
from kv_checks import assert_only_cache_holds_kv

from espc.planner.compile.policy import ElasticPolicy, LengthBucket
from espc.planner.compile.scheduler import ElasticScheduler
from espc.planner.plan import (
    DecodeBatch,
    DecodeItem,
    IterationPlan,
    Migration,
    PrefillBatch,
    PrefillItem,
    TokenRange,
    even_retention,
)
from espc.planner.sim.costmodel import CostModel
from espc.planner.sim.metrics import isolated_prefill
from espc.planner.sim.strategies import Deployment, Scheduler
from espc.runtime.driver import FinishEvent, TokenEvent
from espc.runtime.engine import Engine, EngineError
from espc.runtime.sampling import SamplingParams

TINY = Path(__file__).resolve().parent.parent / "specs" / "tiny-cpu.toml"
PROMPTS = [list(range(3, 3 + n)) for n in (7, 13, 33, 61)]
NEW_TOKENS = 6
KV_CAPACITY = 4096
# Engine logits (fp32, attention merged across instances) vs the float64 reference.
LOGITS = {"rtol": 1e-4, "atol": 1e-4}


class ScriptedScheduler(Scheduler):
    """Plans one shape on purpose: every waiting request prefills on all four instances and
    keeps its KV on instances 0 and 1 only (proactive scale-down); after its third token the
    KV on instance 1 migrates to instance 2; decode steps have master 0 and peers holding
    the shards (multi-master decoding over whatever instances hold the request)."""

    name = "scripted"

    def __init__(self, deployment: Deployment):
        super().__init__(deployment)
        self.migrated: set[int] = set()

    def schedule(self, state):
        if state.idle != set(range(4)):
            return None
        waiting = list(state.waiting.values())
        if waiting:
            items = tuple(
                PrefillItem(s.id, 0, s.prefill_target, even_retention(0, s.prefill_target, (0, 1))) for s in waiting
            )
            return IterationPlan(state.iteration, (PrefillBatch((0, 1, 2, 3), items),))
        decoding = [s for s in state.running.values() if s.decoding and not s.busy]
        moving = [s for s in decoding if s.generated >= 3 and s.id not in self.migrated and s.tokens_on(1)]
        if moving:
            self.migrated.update(s.id for s in moving)
            migrations = tuple(Migration(s.id, 1, 2, TokenRange(*s.kv[1][0])) for s in moving)
            return IterationPlan(state.iteration, (), migrations)
        if decoding:
            items = tuple(DecodeItem(s.id, 0, s.shards()) for s in decoding)
            instances = tuple(sorted({0} | {i for s in decoding for i, _ in s.shards()}))
            return IterationPlan(state.iteration, (DecodeBatch(instances, items),))
        return None


def assert_matches_reference(model, prompts, completions):
    for prompt, completion in zip(prompts, completions):
        assert completion.finish_reason == "length", completion.error
        assert len(completion.token_ids) == NEW_TOKENS
        with torch.no_grad():
            expected = model(torch.tensor(prompt + completion.token_ids[:-1]))[len(prompt) - 1:]
        torch.testing.assert_close(torch.stack(completion.logits).double(), expected, **LOGITS)
        assert completion.token_ids == expected.argmax(-1).tolist()


def scripted(spec):
    cost = CostModel.from_spec(spec)
    return ScriptedScheduler(Deployment.build(cost, 1, KV_CAPACITY))


# Instance classes: the two short prompts on instances 2-3, the two long ones on instances
# 0-1 (DoP ≤ 2); past 16 tokens per instance, decoding scales up within the class.
PARTITION = {(2, 3): (7, 13), (0, 1): (33, 61)}


def partitioned(spec):
    cost = CostModel.from_spec(spec)
    policy = ElasticPolicy(
        tp=1,
        buckets=(LengthBucket(0, 20, 0.5, 1, 2_048, 2, instances=(2, 3)), LengthBucket(20, 4_096, 0.5, 2, 2_048, 2, instances=(0, 1))),
        instance_weight=0.0, decode_instance_tokens=16, reserve_output_tokens=NEW_TOKENS, scale_up=True, migration=True,
        cooldown_iterations=2, migration_max_stall_s=1.0, starvation_bound_s=30.0,
    )
    return ElasticScheduler(Deployment.build(cost, 1, KV_CAPACITY), policy, spec.slo, isolated_prefill(cost))


@pytest.mark.parametrize(
    "how",
    [
        {"strategy": "static-sp", "configuration": "tp=1, groups=1+1+1+1"},
        {"strategy": "static-sp", "configuration": "tp=1, groups=2+2"},
        {"strategy": "static-sp", "configuration": "tp=1, groups=4"},
        {"strategy": "disaggregated", "configuration": "tp=1, 2P+2D"},
        {"strategy": "elastic"},
        {"scheduler": scripted},
        {"scheduler": partitioned},
    ],
    ids=["dop1", "dop2", "dop4", "disaggregated", "elastic", "scale-down+migration", "instance-classes"],
)
def test_greedy_tokens_and_logits_equal_the_float64_reference(spec, reference, how):
    how = dict(how)
    if "scheduler" in how:
        how["scheduler"] = how["scheduler"](spec)
    with Engine(spec, kv_capacity=KV_CAPACITY, **how) as engine:
        handles = [engine.submit(p, SamplingParams(max_new_tokens=NEW_TOKENS, return_logits=True)) for p in PROMPTS]
        completions = [handle.result(timeout=120) for handle in handles]
        engine.check_kv()
        stats = engine.stats()
        timeline = engine.result().timeline
    assert_matches_reference(reference, PROMPTS, completions)
    assert_only_cache_holds_kv(stats)
    if isinstance(how.get("scheduler"), ScriptedScheduler):  # the shapes the script promises actually ran
        assert any(b.phase == "prefill" and len(b.instances) == 4 for b in timeline)
        assert stats["migrated_tokens"] > 0
        assert any(b.phase == "decode" and b.instances == (0, 2) for b in timeline)
    if how.get("strategy") == "disaggregated":
        assert stats["migrated_tokens"] > 0
    if isinstance(how.get("scheduler"), ElasticScheduler):  # each request ran within its class only
        lengths = {index: len(prompt) for index, prompt in enumerate(PROMPTS)}
        for batch in timeline:
            for members, prompt_lens in PARTITION.items():
                ids = {i for i, length in lengths.items() if length in prompt_lens}
                assert not ids.intersection(batch.request_ids) or set(batch.instances) <= set(members), batch
        assert {i for b in timeline if b.phase == "prefill" for i in b.instances} == {0, 1, 2, 3}, timeline


@pytest.mark.parametrize(
    "how",
    [{"strategy": "static-sp", "configuration": "tp=1, groups=2+2"}, {"strategy": "chunked"}],
    ids=["dop2", "chunked"],
)
def test_hugging_face_checkpoint_generates_what_transformers_generates(spec, tmp_path, how):
    from espc.frontend.spec import ModelSpec
    from espc.runtime.weights import model_spec_from_hf_config

    config, hf = random_llama(tmp_path, intermediate_size=80, kv_heads=2, seed=1)
    model = ModelSpec(**model_spec_from_hf_config(config.to_dict(), weights=str(tmp_path), dtype="float32"))
    # Chunks of 8 tokens: the chunked strategy prefills both prompts in continued chunks.
    policy = spec.policy.model_copy(update={"chunk_tokens": 8})
    checkpoint_spec = spec.model_copy(update={"model": model, "policy": policy})
    prompts = [list(range(5, 5 + n)) for n in (9, 21)]
    with Engine(checkpoint_spec, **how, kv_capacity=1024) as engine:
        completions = engine.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS), timeout=120)
    for prompt, completion in zip(prompts, completions):
        assert completion.token_ids == greedy_continuation(hf, prompt, NEW_TOKENS)


def test_sampling_is_seeded_and_stop_tokens_end_requests(spec):
    greedy = SamplingParams(max_new_tokens=NEW_TOKENS)
    sampled = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    with Engine(spec, strategy="static-sp", configuration="tp=1, groups=2+2", kv_capacity=KV_CAPACITY) as engine:
        [first] = engine.generate(PROMPTS[1], greedy, timeout=120)
        stop = first.token_ids[2]
        [stopped] = engine.generate(PROMPTS[1], greedy.model_copy(update={"stop_token_ids": (stop,)}), timeout=120)
        one, two = engine.generate([PROMPTS[2], PROMPTS[2]], sampled, timeout=120)
        text = engine.generate("héllo", greedy, timeout=120)[0]
        engine.check_kv()
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == first.token_ids[: first.token_ids.index(stop)]
    assert one.token_ids == two.token_ids  # the same seed on whichever worker samples
    assert text.prompt_token_ids == list("héllo".encode()) and isinstance(text.text, str)


def test_a_repeated_prompt_reads_its_prefix_from_the_cache(spec, reference):
    """`Completion.cached_tokens`: 0 the first time, the block-aligned prefix short of the
    last prompt token the second, whose tokens and logits still equal the reference."""
    block = spec.runtime.kv_block_size
    prompt = list(range(100, 100 + 3 * block + 5))
    params = SamplingParams(max_new_tokens=NEW_TOKENS, return_logits=True)
    with Engine(spec, strategy="static-sp", configuration="tp=1, groups=2+2", kv_capacity=KV_CAPACITY) as engine:
        [first] = engine.generate(prompt, params, timeout=120)
        [second] = engine.generate(prompt, params, timeout=120)
        engine.check_kv()
    assert (first.cached_tokens, second.cached_tokens) == (0, 3 * block)
    assert_matches_reference(reference, [prompt, prompt], [first, second])


def test_start_stop_repeatedly_leaves_no_process(spec):
    pids = []
    for _ in range(2):
        with Engine(spec, strategy="static-sp", configuration="tp=1, groups=4", kv_capacity=KV_CAPACITY) as engine:
            pids += engine.worker_pids()
            assert engine.generate(PROMPTS[0], SamplingParams(max_new_tokens=2), timeout=120)[0].finish_reason == "length"
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_cancel_and_abandoned_stream_free_kv(spec):
    long_run = SamplingParams(max_new_tokens=400)
    with Engine(spec, strategy="static-sp", configuration="tp=1, groups=1+1+1+1", kv_capacity=KV_CAPACITY) as engine:
        handle = engine.submit(PROMPTS[3], long_run)
        deadline = time.monotonic() + 60
        while not handle.completion.token_ids and time.monotonic() < deadline:
            time.sleep(0.01)
        handle.cancel()
        cancelled = handle.result(timeout=60)

        async def first_tokens_then_leave():
            events = []
            async for event in engine.stream(PROMPTS[2], long_run):
                events.append(event)
                if len(events) == 3:
                    break  # a client that disconnects
            return events

        events = asyncio.run(first_tokens_then_leave())

        async def whole_stream():
            return [event async for event in engine.stream(PROMPTS[0], SamplingParams(max_new_tokens=4))]

        streamed = asyncio.run(whole_stream())
        deadline = time.monotonic() + 60
        while engine.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        engine.check_kv()
        stats = engine.stats()
    assert cancelled.finish_reason == "cancelled" and 0 < len(cancelled.token_ids) < 400
    assert all(isinstance(event, TokenEvent) for event in events)
    assert [type(event) for event in streamed] == [TokenEvent] * 4 + [FinishEvent]
    assert streamed[-1].reason == "length"
    assert stats["running"] == 0 and stats["kv_used_tokens"] == stats["kv_cached_tokens"]


@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_a_failed_worker_fails_its_requests_and_the_rest_go_on(spec, fault):
    params = SamplingParams(max_new_tokens=300)
    options = {"strategy": "static-sp", "configuration": "tp=1, groups=1+1+1+1", "kv_capacity": KV_CAPACITY}
    # The default heartbeat timeout (10 s, 20 missed beats): a busy CI machine can delay a
    # healthy worker's beat by seconds, and a false fault would fail a second request.
    with Engine(spec, **options) as engine:
        handles = [engine.submit(prompt, params) for prompt in PROMPTS]
        deadline = time.monotonic() + 60
        while not all(h.completion.token_ids for h in handles) and time.monotonic() < deadline:
            time.sleep(0.01)
        victim = engine.worker_pids()[1]
        os.kill(victim, fault)
        started = time.monotonic()
        completions = [handle.result(timeout=120) for handle in handles]
        detected_s = time.monotonic() - started
        after = engine.generate(PROMPTS[:2], SamplingParams(max_new_tokens=4), timeout=120)
        engine.check_kv()
        stats = engine.stats()
    failed = [c for c in completions if c.finish_reason == "error"]
    assert len(failed) == 1 and "instance 1 failed" in failed[0].error
    assert all(c.finish_reason == "length" for c in completions if c not in failed)
    assert all(c.finish_reason == "length" for c in after)
    assert stats["in_service"] == 3 and stats["kv_used_tokens"][1] == 0 and stats["kv_used_tokens"] == stats["kv_cached_tokens"]
    assert detected_s < 60


def test_bad_requests_and_options_are_refused_with_reasons(spec):
    with pytest.raises(ValueError, match="max_context"):
        Engine(spec, strategy="static-sp", configuration="tp=1, groups=4")._checked(
            [1] * (spec.model.max_context - 6), SamplingParams(max_new_tokens=16)
        )
    engine = Engine(spec, strategy="static-sp", configuration="tp=1, groups=4", kv_capacity=KV_CAPACITY)
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 256\)"):
        engine._checked([1, 999], SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        engine._checked([], SamplingParams())
    with pytest.raises(EngineError, match="not running"):
        engine.submit([1, 2, 3])
    with pytest.raises(EngineError, match="has no configuration 'tp=1, groups=3'"):
        Engine(spec, strategy="static-sp", configuration="tp=1, groups=3")
    with pytest.raises(ValueError, match="kv_capacty"):
        Engine(spec, kv_capacty=5)


TORCHRUN_SCRIPT = """
import json, sys
from espc import load_spec
from espc.runtime.engine import Engine
from espc.runtime.launch import serve_worker, torchrun_rank
from espc.runtime.sampling import SamplingParams

if __name__ == "__main__":
    rank, _ = torchrun_rank()
    if rank:
        serve_worker()
    else:
        options = dict(strategy="static-sp", configuration="tp=1, groups=2+2", kv_capacity=4096, launcher="torchrun")
        with Engine(load_spec(sys.argv[1]), **options) as engine:
            completions = engine.generate(json.loads(sys.argv[2]), SamplingParams(max_new_tokens=int(sys.argv[3])))
            engine.check_kv()
        print("TOKENS", json.dumps([c.token_ids for c in completions]))
"""


def test_torchrun_launcher_serves_from_rank_zero(tmp_path, reference):
    """Four torchrun processes: RANK 0 drives (its worker spawned beside it), ranks 1-3 connect
    to it as workers; the tokens are the float64 reference's greedy ones."""
    import json
    import subprocess
    import sys

    script = tmp_path / "serve.py"
    script.write_text(TORCHRUN_SCRIPT)
    torchrun = Path(sys.executable).parent / "torchrun"
    done = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "4", str(script), str(TINY), json.dumps(PROMPTS[:2]), str(NEW_TOKENS)],
        capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    tokens = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("TOKENS"))[len("TOKENS "):])
    for prompt, generated in zip(PROMPTS, tokens):
        with torch.no_grad():
            expected = reference(torch.tensor(prompt + generated[:-1]))[len(prompt) - 1:].argmax(-1).tolist()
        assert generated == expected
