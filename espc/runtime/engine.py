"""`espc.Engine`: serve a compiled policy from Python.

    with espc.Engine.from_artifact("build/tiny") as engine:
        [completion] = engine.generate("Hello", espc.SamplingParams(max_new_tokens=8))
        print(completion.text, completion.token_ids)

The engine starts one worker process per instance of the spec's cluster, and a driver
thread in this process that runs the policy's scheduler (`espc.runtime.driver`). Prompts
are text (through the checkpoint's tokenizer, or bytes for random weights) or token ids.
`generate` blocks; `submit` returns a handle at once; `stream` is an async iterator of
tokens for asyncio services; `cancel` ends a request and frees its KV.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypedDict, TypeVar, Unpack, cast

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt

from espc.frontend.spec import Spec
from espc.planner.compile.feasibility import runtime_limit
from espc.planner.compile.policy import Policy
from espc.planner.sim.costmodel import CostModel
from espc.planner.sim.strategies import Scheduler
from espc.runtime.driver import Admission, Driver, DriverOptions, EngineError, FinishEvent, TokenEvent
from espc.runtime.sampling import SamplingParams, TokenLogprobs

Prompt = str | Sequence[int]
EngineDType = Literal["float32", "float16", "bfloat16", "float64"]
LauncherName = Literal["spawn", "torchrun"]
_Result = TypeVar("_Result")  # what a function run on the driver thread returns


class EngineOptions(BaseModel):
    """What `Engine.from_artifact(path, **overrides)` accepts besides the artifact."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kv_capacity: PositiveInt | None = Field(None, description="KV tokens per instance (default: the spec's memory)")
    max_running: PositiveInt = Field(256, description="requests the scheduler holds at once; more wait before it")
    threads: PositiveInt = Field(1, description="torch threads per worker process")
    dtype: EngineDType | None = Field(None, description="default: the spec's")
    strategy: str | None = Field(None, description="serve a baseline instead of the compiled strategy")
    configuration: str | None = Field(None, description="the strategy's configuration label (see `espc compare`)")
    seed: int = Field(0, description="sampling seed of requests that give none")
    launcher: LauncherName = Field(
        "spawn", description="spawn: worker processes on this machine; torchrun: this is RANK 0 of a torchrun job",
    )
    start_timeout_s: PositiveFloat = 180.0
    heartbeat_timeout_s: PositiveFloat = 10.0
    comm_timeout_s: PositiveFloat = 60.0
    stall_timeout_s: PositiveFloat = 30.0
    warm_up: bool = Field(
        True, description="build every batch shape's graphs at start-up, not in the first request of each shape"
    )


class EngineOverrides(TypedDict, total=False):
    """The fields of `EngineOptions` as keyword arguments (`Engine(spec, **overrides)`,
    `from_artifact`, `from_spec`); EngineOptions validates them."""

    kv_capacity: int | None
    max_running: int
    threads: int
    dtype: EngineDType | None
    strategy: str | None
    configuration: str | None
    seed: int
    launcher: LauncherName
    start_timeout_s: float
    heartbeat_timeout_s: float
    comm_timeout_s: float
    stall_timeout_s: float
    warm_up: bool


@dataclass
class Completion:
    """One request as `Engine.generate` (or a RequestHandle) answers it: its prompt and
    generated token ids, why it ended, and how much of its prompt the prefix cache served."""

    request_id: int
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # length, stop, cancelled, rejected, error
    error: str | None = None
    code: str | None = None  # a rejection's code: queue_full, ttft_unreachable (overload) or unservable
    text: str | None = None  # decoded when the engine has a tokenizer
    logits: list[torch.Tensor] | None = None  # one fp32 row per generated token, with return_logits
    logprobs: list[TokenLogprobs] | None = None  # one per generated token, with SamplingParams.logprobs
    # Prompt tokens whose KV came from the prefix cache (a block-aligned prefix a finished
    # request left behind) instead of being prefilled; 0 without a hit or with
    # `[runtime] prefix_caching = false`.
    cached_tokens: int = 0


class RequestHandle:
    """A submitted request: its tokens as they arrive and, once done, its Completion."""

    def __init__(self, engine: Engine, prompt: list[int], params: SamplingParams):
        self._engine = engine
        self._done = threading.Event()
        self.completion = Completion(
            -1, prompt, logits=[] if params.return_logits else None, logprobs=[] if params.logprobs is not None else None,
        )

    @property
    def request_id(self) -> int:
        return self.completion.request_id

    def _on_event(self, event: TokenEvent | FinishEvent) -> None:
        completion = self.completion
        if isinstance(event, TokenEvent):
            completion.token_ids.append(event.token)
            if completion.logits is not None and event.logits is not None:
                completion.logits.append(event.logits)
            if completion.logprobs is not None and event.logprobs is not None:
                completion.logprobs.append(event.logprobs)
            return
        completion.finish_reason, completion.error, completion.code = event.reason, event.error, event.code
        completion.cached_tokens = event.cached_tokens
        completion.text = self._engine._decode(completion.token_ids)
        self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> Completion:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
        return self.completion

    def cancel(self) -> None:
        self._engine.cancel(self.request_id)


class Engine:
    """Workers + driver for one spec and policy; use as a context manager."""

    def __init__(
        self, spec: Spec, policy: Policy | None = None, *, base_dir: Path | None = None,
        scheduler: Scheduler | None = None, **overrides: Unpack[EngineOverrides],
    ):
        """`scheduler`: any planner Scheduler over the spec's cluster instead of the policy's
        (a hand-written elastic policy, a baseline configured in code)."""
        self.options = EngineOptions(**overrides)
        self.spec = spec
        self.policy = policy
        self.base_dir = base_dir
        self.scheduler = scheduler or build_scheduler(spec, policy, base_dir, self.options)
        self._tokenizer = None
        self._tokenizer_error: str | None = None
        options = self.options
        self._driver = Driver(
            spec, self.scheduler,
            DriverOptions(
                self.scheduler.deployment.capacity[0], options.max_running, options.threads, options.start_timeout_s,
                options.heartbeat_timeout_s, options.comm_timeout_s, options.stall_timeout_s,
                options.dtype or spec.model.dtype, admission(spec, self.scheduler), options.launcher, options.warm_up,
            ),
            base_dir,
        )
        self._started = False

    @classmethod
    def from_artifact(cls, path: str | os.PathLike, **overrides: Unpack[EngineOverrides]) -> Engine:
        """The engine of a compiled artifact directory (`espc compile -o DIR`)."""
        from espc.planner.compile.artifact import open_artifact

        artifact = open_artifact(Path(path))
        return cls(artifact.spec, artifact.policy, base_dir=artifact.base_dir, **overrides)

    @classmethod
    def from_spec(cls, spec: Spec | str | os.PathLike, **overrides: Unpack[EngineOverrides]) -> Engine:
        """An engine without a compiled artifact: the spec's strategy (or `strategy=`);
        elastic solves the policy MILP now, without the compiler's search."""
        from espc.frontend.loader import load_spec

        base_dir = None
        if not isinstance(spec, Spec):
            base_dir = Path(spec).parent
            spec = load_spec(Path(spec))
        return cls(spec, None, base_dir=base_dir, **overrides)

    # ------------------------------------------------------------------------- lifecycle

    def start(self) -> Engine:
        if not self._started:
            self._driver.start()
            self._started = True
        return self

    def close(self) -> None:
        if self._started:
            self._driver.close()
            self._started = False

    @property
    def running(self) -> bool:
        """Started and its driver loop alive (it stops when every instance has failed)."""
        return self._started and self._driver.running

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------------------- requests

    def submit(self, prompt: Prompt, params: SamplingParams | None = None) -> RequestHandle:
        """Queue one request; returns at once. Raises ValueError for a prompt that can never
        be served (empty, unknown token ids, longer than max_context with its output)."""
        if not self._started or not self._driver.running:
            raise EngineError("the engine is not running: use it as a context manager or call start()")
        params = params or SamplingParams()
        ids = self._checked(prompt, params)
        handle = RequestHandle(self, ids, params)
        handle.completion.request_id = self._driver.submit(ids, params, params.seed, handle._on_event, self.options.seed)
        return handle

    def generate(self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | None = None,
                 timeout: float | None = None) -> list[Completion]:
        """Serve the prompts concurrently and wait for all: one Completion per prompt, in order."""
        single = isinstance(prompts, str) or (len(prompts) > 0 and all(isinstance(t, int) for t in prompts))
        batch = cast("Sequence[Prompt]", [prompts] if single else prompts)  # not single: a sequence of prompts
        handles = [self.submit(prompt, params) for prompt in batch]
        return [handle.result(timeout) for handle in handles]

    async def stream(
        self, prompt: Prompt, params: SamplingParams | None = None,
    ) -> AsyncGenerator[TokenEvent | FinishEvent, None]:
        """Each generated token as a TokenEvent, then one FinishEvent. Leaving the loop early
        (a client disconnect) cancels the request and frees its KV."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        params = params or SamplingParams()
        ids = self._checked(prompt, params)
        if not self._started or not self._driver.running:
            raise EngineError("the engine is not running: use it as a context manager or call start()")

        def listener(event: TokenEvent | FinishEvent) -> None:
            if not loop.is_closed():  # a consumer that left: its request is being cancelled
                loop.call_soon_threadsafe(events.put_nowait, event)

        request_id = self._driver.submit(ids, params, params.seed, listener, self.options.seed)
        finished = False
        try:
            while not finished:
                event = await events.get()
                finished = isinstance(event, FinishEvent)
                yield event
        finally:
            if not finished:
                self.cancel(request_id)

    def cancel(self, request_id: int) -> None:
        """End the request (queued or running) with finish_reason "cancelled"; no-op when done."""
        self._driver.cancel(request_id)

    # ------------------------------------------------------------------------- tokenizing

    @property
    def tokenizer(self):
        if self._tokenizer is None and self._tokenizer_error is None:
            from espc.runtime.tokenizer import load_tokenizer

            try:
                self._tokenizer = load_tokenizer(self.spec.model, base_dir=self.base_dir)
            except ValueError as error:
                self._tokenizer_error = str(error)
        return self._tokenizer

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"text prompts need a tokenizer: {self._tokenizer_error}")
            ids = list(self.tokenizer.encode(prompt))
        else:
            ids = [int(token) for token in prompt]
        model = self.spec.model
        if not ids:
            raise ValueError("the prompt is empty")
        bad = [token for token in ids if not 0 <= token < model.vocab]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {model.vocab})")
        return ids

    def _checked(self, prompt: Prompt, params: SamplingParams) -> list[int]:
        ids = self.encode(prompt)
        limit = self.spec.model.max_context
        if len(ids) + params.max_new_tokens > limit:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({params.max_new_tokens}) = "
                f"{len(ids) + params.max_new_tokens} > the model's max_context ({limit})"
            )
        return ids

    def _decode(self, ids: list[int]) -> str | None:
        tokenizer = self.tokenizer
        return None if tokenizer is None else tokenizer.decode(ids)

    # --------------------------------------------------------------------------- reports

    def _on_loop(self, function: Callable[[], _Result]) -> _Result:
        """Run `function` on the driver thread (consistent state) and return its result."""
        future: concurrent.futures.Future[_Result] = concurrent.futures.Future()
        self._driver.call(function, future)
        return future.result(timeout=60)

    def check_kv(self) -> None:
        """Assert that every worker's table holds exactly what the scheduler's state says, and
        nothing when no request is live (call between runs)."""
        if self._started and self._driver.running:
            self._on_loop(self._driver.check_kv)
        else:
            self._driver.check_kv()

    def stats(self) -> dict:
        """A snapshot: requests by stage, KV per instance, iterations, migrations, failures."""
        return self._on_loop(self._driver.stats) if self._started and self._driver.running else self._driver.stats()

    def result(self):
        """Every request served so far as a SimulationResult (see espc.planner.sim.metrics)."""
        return self._on_loop(self._driver.result) if self._started and self._driver.running else self._driver.result()

    def batch_costs(self) -> list:
        """Every finished batch: driver-clock start and end, and the slowest worker's own time."""
        return self._on_loop(lambda: list(self._driver.batch_costs)) if self._started and self._driver.running else list(self._driver.batch_costs)

    @property
    def failures(self) -> list[str]:
        return list(self._driver.failures)

    def worker_pids(self) -> list[int | None]:
        return self._driver.pids()


def admission(spec: Spec, scheduler: Scheduler) -> Admission:
    """The spec's `[serving]` admission control, with TTFT targets from the scheduler's cost model."""
    serving = spec.serving
    target = None
    if serving.reject_unreachable_ttft:
        from espc.planner.sim.metrics import isolated_prefill

        isolated = isolated_prefill(scheduler.deployment.cost)

        def target(prompt_len: int) -> float:
            return spec.slo.ttft.target(isolated(prompt_len))

    return Admission(serving.max_queued_requests, target)


def build_scheduler(spec: Spec, policy: Policy | None, base_dir: Path | None, options: EngineOptions):
    """The scheduler the artifact was compiled for (or `options.strategy`), sized to the
    runtime's KV capacity: the same object the simulator drives."""
    from espc.planner.compile.evaluation import Evaluator

    strategy = options.strategy or (policy.strategy if policy else spec.policy.strategy)
    if strategy == "auto":
        raise EngineError("the spec's strategy is auto: compile it first (espc compile) or pass strategy=")
    elastic = policy.elastic if policy is not None else None
    # The compiled cost model (calibrated when the artifact was): the scheduler's timing
    # decisions (TTFT/TPOT slack) use the times it was compiled with.
    cost = CostModel.from_dict(policy.cost_parameters) if policy is not None else None
    evaluator = Evaluator(spec, base_dir, cost=cost, elastic=elastic, kv_capacity=options.kv_capacity)
    family = evaluator.candidates(strategy)
    configuration = options.configuration
    if configuration is None and policy is not None and policy.strategy == strategy:
        configuration = policy.configuration
    if configuration is not None:
        chosen = [candidate for candidate in family if candidate.label == configuration]
        if not chosen:
            labels = ", ".join(repr(candidate.label) for candidate in family)
            raise EngineError(f"strategy {strategy} has no configuration {configuration!r}; it has {labels}")
    elif len(family) > 1:
        labels = ", ".join(repr(candidate.label) for candidate in family)
        raise EngineError(f"strategy {strategy} has {len(family)} configurations; choose one with configuration=: {labels}")
    else:
        chosen = family
    scheduler = chosen[0].make()
    # The table compile consults: an artifact compiled for simulation only may hold a choice
    # the runtime cannot serve.
    limit = runtime_limit(strategy, scheduler.deployment.tp)
    if limit is not None:
        recompile = "; recompile with `espc compile --runnable`" if policy is not None and not policy.runnable else ""
        raise EngineError(f"strategy {strategy} ({chosen[0].label}): {limit}{recompile}")
    return scheduler
