"""What the driver sends its workers: the plan and new token ids, never the slots of the
context (the worker keeps its own table). Driven without worker processes: the workers'
handles are replaced by ones that keep what they are sent, and batches are answered by hand."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import torch

from espc import load_spec
from espc.backend.kvpool import PagedKVTable
from espc.runtime.driver import Admission, Driver, DriverOptions
from espc.runtime.engine import EngineOptions, build_scheduler
from espc.runtime.sampling import SamplingParams
from espc.runtime.worker import Step, StepResult, apply_step

SPEC = Path(__file__).resolve().parent.parent / "specs" / "tiny-cpu.toml"


class Kept:
    """A `WorkerHandle` that keeps its commands instead of running them."""

    pid = None

    def __init__(self) -> None:
        self.sent: list[Step] = []

    def send(self, command) -> None:
        self.sent.append(command)

    def exitcode(self) -> None:
        return None

    def kill(self) -> None:
        pass

    def join(self, timeout: float) -> None:
        pass


def driver_for(capacity: int, configuration: str = "tp=1, groups=1+1+1+1") -> tuple[Driver, list[Kept]]:
    spec = load_spec(SPEC)
    spec = spec.model_copy(update={
        "model": spec.model.model_copy(update={"max_context": capacity}),
        "runtime": spec.runtime.model_copy(update={"prefix_caching": False}),  # a finished request is released
    })
    options = EngineOptions(strategy="static-sp", configuration=configuration, kv_capacity=capacity)
    scheduler = build_scheduler(spec, None, SPEC.parent, options)
    driver = Driver(spec, scheduler, DriverOptions(capacity, 8, 1, 10.0, 10.0, 10.0, 10.0, "float32", Admission(None, None)))
    handles = [Kept() for _ in range(driver.world)]
    driver._workers = handles
    return driver, handles


def serve(
    driver: Driver, handles: list[Kept], prompt_len: int, new_tokens: int,
    on_step: Callable[[int, Step], None] = lambda rank, step: None,
) -> list[tuple[int, Step]]:
    """Submit one request and answer every batch with token 7 until it finishes: the
    (instance, step) pairs sent, in order; `on_step` sees each before it is answered."""
    driver.submit(list(range(prompt_len)), SamplingParams(max_new_tokens=new_tokens, temperature=0.0), 0, lambda event: None)
    driver._handle(driver._inbox.get_nowait())
    sent: list[tuple[int, Step]] = []
    while driver._live:
        driver._schedule()
        new = [(rank, step) for rank, handle in enumerate(handles) for step in handle.sent]
        for handle in handles:
            handle.sent.clear()
        assert new, "the driver planned nothing for a live request"
        for rank, step in new:
            on_step(rank, step)
            sent.append((rank, step))
        for rank, step in new:
            driver._answer(rank, step.plan.iteration, StepResult(rank, step.plan.iteration, dict.fromkeys(step.sampling, 7)))
    return sent


def test_a_decode_step_carries_the_same_bytes_whatever_the_context():
    sizes = {}
    for prompt_len in (1000, 60_000):
        driver, handles = driver_for(65_536)
        steps = serve(driver, handles, prompt_len, 4)
        prefill, *decodes = [step for _, step in steps]
        assert prefill.plan.batches[0].phase == "prefill" and len(decodes) == 3
        assert [len(chunk) for chunk in prefill.tokens.values()] == [prompt_len]  # the prompt travels once
        assert all([len(chunk) for chunk in step.tokens.values()] == [1] for step in decodes)
        sizes[prompt_len] = [len(pickle.dumps(step)) for step in decodes]
    # Only the integers naming the context length grow (a few bytes), not a tensor of it.
    assert all(abs(long - short) <= 16 for short, long in zip(sizes[1000], sizes[60_000])), sizes


def test_worker_tables_replaying_the_steps_name_the_mirrors_slots():
    """Apply what each instance is sent to a fresh table, as its worker does (releases,
    then the plan through `Program.inputs` with the reads): after every step it holds the
    same tokens in the same slots as the driver's mirror, through a DoP-4 ring prefill, a
    decode spread over four instances and the release of a finished request, which reaches
    each worker with its next step."""
    driver, handles = driver_for(8192, "tp=1, groups=4")
    replicas = [PagedKVTable(table.capacity_tokens, table.page_size, table.max_requests) for table in driver.tables]

    def replay(rank: int, step: Step) -> None:
        table = replicas[rank]
        apply_step(rank, table, driver.lowering.lower(step.plan), step, None)  # raises unless (tokens, pages) match
        mirror = driver.tables[rank]
        assert table.held() == mirror.held()
        for request in mirror.requests():
            assert all(torch.equal(a, b) for a, b in zip(table.resident(request), mirror.resident(request)))

    first = serve(driver, handles, 701, 5, replay)
    assert {len(step.plan.batches[0].instances) for _, step in first} == {4}
    second = serve(driver, handles, 333, 2, replay)
    assert [step.releases for _, step in second[:4]] == [(0,)] * 4  # the first request's, once per instance
    assert all(not step.releases for _, step in second[4:])
