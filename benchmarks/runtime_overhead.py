"""Runtime overhead: per-iteration time of the graph-executed engine vs the same model called
eagerly (DoP 1), prefill and decode, at tp 1 and tp 2: target ≤ 1.10×.

    python benchmarks/runtime_overhead.py [--models tiny,small] [--lengths 128,512,2048]
        [--tps 1,2] [--repeats 5] [--small-repeats 3] [--decode-steps 32] [--json PATH]

One request at a time, so every iteration runs on one instance (DoP 1). Per model and
prompt length L, each repeat serves one request of L random token ids (vocabulary 256) and
D = --decode-steps greedy decode steps, five ways, interleaved so that a change in the
machine's background load hits all five alike:

- eager (SDPA): the model's modules called directly in this process (embed, per layer
  input norm, `Attention.qkv` with RoPE, a contiguous KV cache, `F.scaled_dot_product_attention`
  with GQA, `o_proj`, MLP; final norm and `lm_head` on the last position, argmax). This is the
  baseline the target is stated against.
- eager (espc kernel): the same code with the engine's attention kernel
  (`espc.backend.kernels.attn_partial`, impl of the spec's runtime.attention) instead of
  SDPA: the difference to the first column is the kernel, not the runtime.
- FX graph, in process: the plan lowered by `espc.backend.lower.Lowering` (cached, as a
  worker does) with its inputs computed against a paged KV table (`PagedKVTable`, as the
  driver does) and the graph executed in this process: no driver loop, no IPC.
- the same FX graph over a slot-major pool ([layers, 2, slots, kv_heads, head_dim] in
  memory, the heads of a slot side by side): the ablation of `pool_tensor`'s head-major
  layout, which the other columns use (the ops index by slot either way).
- engine: `espc.runtime.engine.Engine` on the spec (strategy static-sp, configuration
  "tp=1, groups=1+1+1+1", every instance holding the model's whole context — 8192 tokens, or the
  longest prompt and its decode steps —, 1 torch thread per worker): prefill = the
  request's TTFT, decode = its TPOT, both from the engine's own records (`engine.result()`),
  so they include the driver's scheduling, lowering-cache lookups, input computation, the
  queues to and from the worker process and the gap between iterations. Beside them: the
  worker's own seconds per iteration (its StepResult: lowering-cache lookup, graph, sampling;
  read by wrapping the driver's result handler, as the engine does not expose it) and the
  timeline's batch durations (dispatch to completion of one iteration: worker + driver + IPC).

Every path runs with one torch thread (the worker's default). Times are medians over the
repeats (decode: the mean step of each repeat, then the median) after warm-up (every
instance of the engine serves each length once first). `tiny` is specs/tiny-cpu.toml; `small`
is the same spec with a larger random model (4 layers, hidden 512, 8 query / 4 KV heads of
64, ffn 1536; espc has no model preset between tiny and 7B; devices with the CPU preset's
memory, as its weights outgrow tiny-cpu.toml's 3 MiB), where fixed per-iteration costs
weigh less. Writes benchmarks/results/runtime_overhead.json by default.

At tp 2 (rows with tp = 2) the instance is two processes, so every column is measured on
two: the engine runs specs/tiny-cpu-tp2.toml (the small model swapped in for `small`) as
"tp=2, groups=1+1" (two instances of two TP ranks each, 4 worker processes), and the three
in-process paths run in two spawned processes joined by a gloo group (`TPRanks`), each with
its TP shard of the model (`espc.backend.tensor_parallel.shard_model`) and summing the
partials of o_proj and of the MLP with the engine's own `espc::tp_all_reduce`. The baseline
is therefore the same sharded arithmetic and the same all-reduces, called eagerly: the
ratio is the runtime's overhead at tp 2, not TP's speed-up or its communication (against
the unsharded model in one process, the tp 2 row would mix all three). A path's time is the
slower of the two ranks'. Each rank keeps one torch thread, so tp 2 uses two cores where tp
1 uses one; on a 2-core machine the idle engine's workers and driver share them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "specs" / "tiny-cpu.toml"
SPEC_TP = {1: SPEC, 2: ROOT / "specs" / "tiny-cpu-tp2.toml"}  # the engine's spec per tp
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "runtime_overhead.json"
TARGET = 1.10
CONFIGURATIONS = {1: "tp=1, groups=1+1+1+1", 2: "tp=2, groups=1+1"}
# Tokens each instance holds (and the models' max_context): at least this, more when the
# longest prompt and its decode steps need it.
KV_CAPACITY = 8192
THREADS = 1
VOCAB = 256
SMALL_MODEL = {
    "name": "small-llama-gqa", "arch": "llama", "layers": 4, "hidden": 512, "heads": 8, "kv_heads": 4,
    "head_dim": 64, "ffn": 1536, "vocab": VOCAB, "rope_theta": 10000.0, "dtype": "float32",
    "max_context": 8192, "weights": "random:0",
}
DEVICE_MEMORY = "2GiB"  # the `cpu` device preset's
METHODS = ("eager_sdpa", "eager_kernel", "graph", "graph_slot_major", "engine")
IN_PROCESS = METHODS[:4]


def load_specs(names: list[str], tp: int, context: int):
    """The engine's spec per model, its model's max_context `context`: the KV capacity of
    every instance and of the in-process paths (`kv_capacity`)."""
    from espc import load_spec
    from espc.frontend.spec import Spec

    if tp not in SPEC_TP:
        raise SystemExit(f"tp {tp}: this benchmark has specs for tp {sorted(SPEC_TP)}")
    tiny = load_spec(SPEC_TP[tp]).model_dump(mode="json")
    specs = {}
    for name in names:
        raw = {**tiny, "model": {**tiny["model"], "max_context": context}}
        # tiny-cpu.toml caps a device at 3 MiB (scarce KV at toy scale); here every instance
        # holds `context` tokens, and the small model's weights alone are 49 MiB: give the
        # devices the CPU preset's memory.
        raw["cluster"]["nodes"] = [{**node, "device": {**node["device"], "memory": DEVICE_MEMORY}}
                                   for node in raw["cluster"]["nodes"]]
        if name == "tiny":
            specs[name] = Spec.model_validate(raw)
        elif name == "small":
            raw["model"] = SMALL_MODEL | {"max_context": context}
            specs[name] = Spec.model_validate(raw)
        else:
            raise SystemExit(f"unknown model {name!r}: choose tiny or small")
    return specs


# ----------------------------------------------------------------------------- eager


class Eager:
    """The model called module by module with a contiguous KV cache; `kernel` chooses the
    attention: "sdpa" or the engine's kernel ("torch"/"triton" impl of attn_partial). A TP
    shard of the model (`tp` > 1) holds its own heads and sums the partials of o_proj and of
    the MLP over its TP group with `espc::tp_all_reduce`, as the lowered graph does."""

    def __init__(self, model, kernel: str, capacity: int, tp: int = 1):
        from espc.backend.tensor_parallel import local_heads

        self.model = model
        self.kernel = kernel
        self.tp = tp
        spec = model.spec
        self.scale = 1.0 / math.sqrt(spec.head_dim)
        kv_heads = local_heads(model)[1]
        self.cache = torch.empty((spec.layers, 2, kv_heads, capacity, spec.head_dim), dtype=model.dtype)
        self.length = 0

    def _reduce(self, partial: torch.Tensor) -> torch.Tensor:
        return torch.ops.espc.tp_all_reduce(partial) if self.tp > 1 else partial

    def _attend(self, q: torch.Tensor, layer: int, start: int, end: int) -> torch.Tensor:
        """q [n, H, D] at positions [start, end) over the cache [0, end) -> o [n, H*D]."""
        k, v = self.cache[layer, 0, :, :end], self.cache[layer, 1, :, :end]  # [Hkv, end, D]
        n = q.shape[0]
        if self.kernel == "sdpa":
            o = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None], k[None], v[None], is_causal=n > 1, enable_gqa=True,
            )[0].transpose(0, 1)
        else:
            from espc.backend import kernels

            q_pos = torch.arange(start, end)
            k_pos = torch.arange(end)
            o, _ = kernels.attn_partial(
                q, k.transpose(0, 1), v.transpose(0, 1), q_pos, k_pos, torch.zeros_like(q_pos), torch.zeros_like(k_pos),
                causal=True, scale=self.scale, impl=self.kernel,
            )
            o = o.to(q.dtype)
        return o.reshape(n, -1)

    def forward(self, tokens: torch.Tensor) -> int:
        """Append `tokens` (the prompt, or one decoded token) and return the next token."""
        model = self.model
        start, end = self.length, self.length + len(tokens)
        x = model.embed_tokens(tokens)
        cos, sin = model.rotary(torch.arange(start, end), x.dtype)
        for index, layer in enumerate(model.layers):
            attn = layer.self_attn
            q, k, v = attn.qkv(layer.input_layernorm(x), cos, sin)
            self.cache[index, 0, :, start:end] = k.transpose(0, 1)
            self.cache[index, 1, :, start:end] = v.transpose(0, 1)
            x = x + self._reduce(attn.o_proj(self._attend(q, index, start, end)))
            x = x + self._reduce(layer.mlp(layer.post_attention_layernorm(x)))
        self.length = end
        logits = model.lm_head(model.norm(x[-1:]))[0]
        return int(logits.double().argmax())


def time_eager(model, kernel: str, prompt: list[int], steps: int, tp: int = 1) -> tuple[float, float]:
    """(prefill seconds, mean decode step seconds) of one request."""
    eager = Eager(model, kernel, len(prompt) + steps + 1, tp)
    with torch.inference_mode():
        started = time.perf_counter()
        token = eager.forward(torch.tensor(prompt))
        prefill = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(steps):
            token = eager.forward(torch.tensor([token]))
        decode = (time.perf_counter() - started) / steps
    return prefill, decode


# -------------------------------------------------------------------- graph, in process


class InProcessGraph:
    """The runtime's lowering and paged KV table, executed in this process (DoP 1, instance
    0; as its TP rank `tp_rank` of `tp` when the model is a TP shard). `slot_major`: the pool
    laid out [layers, 2, slots, kv_heads, head_dim] in memory, the heads of a slot together,
    instead of `pool_tensor`'s head-major layout (the ablation of that layout)."""

    def __init__(self, spec, model, tp: int = 1, tp_rank: int = 0, slot_major: bool = False):
        from espc.backend.kvpool import PagedKVTable, pool_tensor
        from espc.backend.lower import Lowering
        from espc.backend.tensor_parallel import local_heads

        self.spec = spec
        self.tp_rank = tp_rank
        self.lowering = Lowering(model, attention=spec.runtime.attention, tp=tp)
        self.table = PagedKVTable(kv_capacity(spec), spec.runtime.kv_block_size, 4)
        self.pool = pool_tensor(spec.model, self.table.num_slots, model.dtype, kv_heads=local_heads(model)[1])
        if slot_major:
            self.pool = torch.empty(self.pool.shape, dtype=self.pool.dtype)
        self.iteration = 0
        self.request = 0

    def _step(self, batch, tokens) -> int:
        from espc.planner.plan import IterationPlan

        self.iteration += 1
        plan = IterationPlan(self.iteration, (batch,), (), ())
        program = self.lowering.lower(plan, ranks=(0,), verify=False)
        inputs = program.inputs(0, self.table, tokens, self.pool, self.tp_rank)
        assert inputs is not None, "instance 0 runs this plan's batch"
        (logits,) = program.graph(0)(**inputs)
        return int(logits[0].double().argmax())

    def time(self, prompt: list[int], steps: int) -> tuple[float, float]:
        from espc.planner.plan import DecodeBatch, DecodeItem, PrefillBatch, PrefillItem, even_retention

        self.request += 1
        request, n = self.request, len(prompt)
        with torch.inference_mode():
            started = time.perf_counter()
            item = PrefillItem(request, 0, n, even_retention(0, n, (0,)))
            token = self._step(PrefillBatch((0,), (item,)), {request: torch.tensor(prompt)})
            prefill = time.perf_counter() - started
            started = time.perf_counter()
            for step in range(steps):
                item = DecodeItem(request, 0, ((0, n + step),))
                token = self._step(DecodeBatch((0,), (item,)), {request: torch.tensor([token])})
            decode = (time.perf_counter() - started) / steps
        self.table.release(request)
        return prefill, decode


class InProcessPaths:
    """The three in-process paths (`IN_PROCESS`) over one model, or over one TP shard of it."""

    def __init__(self, spec, model, tp: int = 1, tp_rank: int = 0):
        self.model, self.kernel, self.tp = model, spec.runtime.attention, tp
        self.graphs = {
            "graph": InProcessGraph(spec, model, tp, tp_rank),
            "graph_slot_major": InProcessGraph(spec, model, tp, tp_rank, slot_major=True),
        }

    def time(self, method: str, prompt: list[int], steps: int) -> tuple[float, float]:
        if method in self.graphs:
            return self.graphs[method].time(prompt, steps)
        return time_eager(self.model, "sdpa" if method == "eager_sdpa" else self.kernel, prompt, steps, self.tp)

    def close(self) -> None:
        pass


def _tp_rank(rank: int, tp: int, port: int, spec, commands, results) -> None:
    """One TP rank of `TPRanks`: its shard of the model, the in-process paths on it."""
    import traceback

    from espc.backend.tensor_parallel import init_tp_group, shard_model
    from espc.model.llama import build_model

    torch.set_num_threads(THREADS)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=tp)
        init_tp_group(tp, tp, rank)
        paths = InProcessPaths(spec, shard_model(build_model(spec.model), tp, rank), tp, rank)
        results.put((rank, None, None))
        while (command := commands.get()) is not None:
            results.put((rank, paths.time(*command), None))
    except Exception:
        results.put((rank, None, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class TPRanks:
    """The in-process paths at tp > 1: `tp` spawned processes, one per TP rank of one
    instance, joined by a gloo group; each runs the same path on the same prompt over its
    shard, and the path's time is the slowest rank's."""

    def __init__(self, spec, tp: int):
        from espc.backend.harness import free_port

        context = mp.get_context("spawn")
        self._results = context.Queue()
        self._commands = [context.Queue() for _ in range(tp)]
        port = free_port()
        self._processes = [
            context.Process(target=_tp_rank, args=(rank, tp, port, spec, self._commands[rank], self._results), daemon=True)
            for rank in range(tp)
        ]
        for process in self._processes:
            process.start()
        self._collect("start-up")

    def _collect(self, what: str) -> list:
        answers = []
        for _ in self._processes:
            rank, answer, error = self._results.get(timeout=600)
            if error is not None:
                self.close()
                raise RuntimeError(f"TP rank {rank}, {what}:\n{error}")
            answers.append(answer)
        return answers

    def time(self, method: str, prompt: list[int], steps: int) -> tuple[float, float]:
        for command in self._commands:
            command.put((method, prompt, steps))
        answers = self._collect(method)
        return max(a[0] for a in answers), max(a[1] for a in answers)

    def close(self) -> None:
        for command in self._commands:
            command.put(None)
        for process in self._processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()


# -------------------------------------------------------------------------------- engine


def watch_worker_seconds(engine) -> list:
    """The workers' own StepResults as the driver receives them: their `seconds` (lowering
    lookup, inputs to device, graph, sampling) is not exposed by the engine, so the driver's
    `_answer` is wrapped (read-only: the result is passed on unchanged)."""
    log: list = []
    driver = engine._driver
    answer = driver._answer

    def logged(rank, iteration, result):
        if result is not None:
            log.append(result)
        answer(rank, iteration, result)

    driver._answer = logged
    return log


def time_engine(engine, prompt: list[int], steps: int, worker_log: list) -> dict:
    """TTFT and TPOT of one request from the engine's records, the durations of its
    iterations on the timeline (dispatch to completion) and the worker's own seconds."""
    from espc.runtime.sampling import SamplingParams

    seen = len(worker_log)
    completion = engine.submit(prompt, SamplingParams(max_new_tokens=steps + 1)).result(timeout=300)
    if completion.error or len(completion.token_ids) != steps + 1:
        raise RuntimeError(f"engine request failed: {completion.finish_reason} {completion.error}")
    result = engine.result()
    request = completion.request_id
    record = next(r for r in result.records if r.id == request)
    batches = [b for b in result.timeline if request in b.request_ids]
    prefill = [b.end_s - b.start_s for b in batches if b.phase == "prefill"]
    decode = [b.end_s - b.start_s for b in batches if b.phase == "decode"]
    worker = [r.seconds for r in worker_log[seen:] if request in r.tokens]  # prefill first, then each step
    return {
        "ttft": record.ttft_s, "tpot": record.tpot_s, "prefill_iteration": prefill[0],
        "decode_iteration": statistics.median(decode), "prefill_worker": worker[0],
        "decode_worker": statistics.median(worker[1:]), "instance": batches[0].instances[0],
    }


# ------------------------------------------------------------------------------ driver


def measure_model(
    name: str, spec, tp: int, lengths: list[int], repeats: int, steps: int, rng: random.Random
) -> list[dict]:
    from espc.model.llama import build_model
    from espc.runtime.engine import Engine

    # The workers' weights: same seed, same dtype (sharded the same way at tp > 1).
    paths = InProcessPaths(spec, build_model(spec.model)) if tp == 1 else TPRanks(spec, tp)
    name_tp = f"{name}, tp {tp}"
    print(f"[{name_tp}] starting the engine ({spec.model.num_parameters:,} parameters) ...", flush=True)
    started = time.perf_counter()
    rows = []
    with Engine.from_spec(
        spec, strategy="static-sp", configuration=CONFIGURATIONS[tp], kv_capacity=kv_capacity(spec), threads=THREADS,
    ) as engine:
        workers = engine.stats()["instances"]
        worker_log = watch_worker_seconds(engine)
        print(f"[{name_tp}] {workers} instances up in {time.perf_counter() - started:.1f} s", flush=True)
        for length in lengths:
            def prompt() -> list[int]:
                return [rng.randrange(VOCAB) for _ in range(length)]

            # Warm-up: every engine instance serves this length once (graphs of each role
            # are built per worker; allocators grow), and each in-process path once.
            warm = [engine.submit(prompt(), _params(2)) for _ in range(workers)]
            for handle in warm:
                handle.result(timeout=600)
            for method in IN_PROCESS:
                paths.time(method, prompt(), steps)
            samples: dict[str, list] = {method: [] for method in METHODS}
            instances = set()
            for _ in range(repeats):
                p = prompt()
                for method in IN_PROCESS:
                    samples[method].append(paths.time(method, p, steps))
                measured = time_engine(engine, p, steps, worker_log)
                instances.add(measured["instance"])
                samples["engine"].append(measured)
            for phase, index, key in (("prefill", 0, "ttft"), ("decode", 1, "tpot")):
                row = {
                    "model": name, "tp": tp, "phase": phase, "length": length, "repeats": repeats,
                    "decode_steps": steps if phase == "decode" else None,
                    "eager_sdpa_s": statistics.median(s[index] for s in samples["eager_sdpa"]),
                    "eager_kernel_s": statistics.median(s[index] for s in samples["eager_kernel"]),
                    "graph_s": statistics.median(s[index] for s in samples["graph"]),
                    "graph_slot_major_s": statistics.median(s[index] for s in samples["graph_slot_major"]),
                    "engine_s": statistics.median(s[key] for s in samples["engine"]),
                    "engine_iteration_s": statistics.median(s[f"{phase}_iteration"] for s in samples["engine"]),
                    "engine_worker_s": statistics.median(s[f"{phase}_worker"] for s in samples["engine"]),
                    "engine_instances": sorted(instances),
                    "samples": {
                        method: [s[key] if method == "engine" else s[index] for s in samples[method]] for method in METHODS
                    },
                }
                row["ratio_vs_eager_sdpa"] = row["engine_s"] / row["eager_sdpa_s"]
                row["ratio_vs_eager_kernel"] = row["engine_s"] / row["eager_kernel_s"]
                row["within_target"] = row["ratio_vs_eager_sdpa"] <= TARGET
                rows.append(row)
            print(f"[{name_tp}] L={length} done at {time.perf_counter() - started:.0f} s", flush=True)
        stats = engine.stats()
    paths.close()
    print(f"[{name_tp}] {stats['graph_cache']}", flush=True)
    return rows


def kv_capacity(spec) -> int:
    """Tokens per instance: the model's whole context (see load_specs)."""
    return spec.model.max_context


def _params(steps: int):
    from espc.runtime.sampling import SamplingParams

    return SamplingParams(max_new_tokens=steps + 1)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:9.2f}"


def format_table(rows: list[dict]) -> str:
    header = (
        f"{'model':<6} {'tp':>2} {'phase':<8} {'length':>6} │ {'eager ms':>9} {'engine ms':>9} {'ratio':>6} {'≤1.10?':>6} │ "
        f"{'eager, espc kernel':>18} {'FX graph in-proc':>16} {'slot-major pool':>15} {'engine worker':>13} {'engine iteration':>16} "
        f"{'engine / eager, espc kernel':>27}"
    )
    lines = [header, "─" * len(header)]
    for r in rows:
        lines.append(
            f"{r['model']:<6} {r['tp']:>2} {r['phase']:<8} {r['length']:>6} │ {_ms(r['eager_sdpa_s'])} {_ms(r['engine_s'])} "
            f"{r['ratio_vs_eager_sdpa']:>5.2f}× {'yes' if r['within_target'] else 'no':>6} │ "
            f"{_ms(r['eager_kernel_s']):>18} {_ms(r['graph_s']):>16} {_ms(r['graph_slot_major_s']):>15} {_ms(r['engine_worker_s']):>13} "
            f"{_ms(r['engine_iteration_s']):>16} {r['ratio_vs_eager_kernel']:>26.2f}×"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,small", help="comma-separated: tiny, small")
    parser.add_argument("--lengths", default="128,512,2048", help="prompt lengths (decode runs at these contexts)")
    parser.add_argument("--tps", default="1,2", help="comma-separated tensor-parallel degrees: 1, 2")
    parser.add_argument("--small-lengths", default=None, help="lengths for the small model (default: --lengths)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--small-repeats", type=int, default=3, help="repeats for the small model (its prefills take seconds)")
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    arguments = parser.parse_args()
    torch.set_num_threads(THREADS)
    torch.manual_seed(arguments.seed)
    rng = random.Random(arguments.seed)
    lengths = [int(n) for n in arguments.lengths.split(",")]
    small_lengths = [int(n) for n in arguments.small_lengths.split(",")] if arguments.small_lengths else lengths
    names = [name.strip() for name in arguments.models.split(",") if name.strip()]
    tps = [int(t) for t in arguments.tps.split(",")]
    context = max(KV_CAPACITY, max(lengths + small_lengths) + arguments.decode_steps + 1)
    specs = {tp: load_specs(names, tp, context) for tp in tps}
    started = time.perf_counter()
    rows = []
    for tp in tps:
        for name, spec in specs[tp].items():
            rows += measure_model(
                name, spec, tp, small_lengths if name == "small" else lengths,
                arguments.small_repeats if name == "small" else arguments.repeats, arguments.decode_steps, rng,
            )
    elapsed = time.perf_counter() - started
    print()
    print(
        f"Runtime overhead (DoP 1 at tp {arguments.tps}, one request at a time, {THREADS} torch thread per process; medians of "
        f"{arguments.repeats} repeats (small: {arguments.small_repeats}); decode = mean of {arguments.decode_steps} steps): "
        f"target engine ≤ {TARGET:.2f}× eager"
    )
    print(format_table(rows))
    print(
        "all columns in ms. eager = eager SDPA (the target's baseline); engine = TTFT (prefill) / TPOT (decode); "
        "engine worker = the worker's StepResult.seconds (graph + sampling); engine iteration = the timeline's "
        f"dispatch-to-completion of one batch (worker + driver + IPC); {elapsed:.0f} s in all"
    )
    report = {
        "benchmark": "runtime_overhead",
        "target_ratio": TARGET,
        "machine": {"python": platform.python_version(), "processor": platform.machine(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "load_average": list(os.getloadavg())},
        "configuration": {"spec": str(SPEC.relative_to(ROOT)), "strategy": "static-sp", "configuration": CONFIGURATIONS[1],
                          "tps": tps, "tp_specs": {tp: str(SPEC_TP[tp].relative_to(ROOT)) for tp in tps},
                          "tp_configurations": {tp: CONFIGURATIONS[tp] for tp in tps},
                          "kv_capacity": context, "threads": THREADS, "repeats": arguments.repeats,
                          "small_repeats": arguments.small_repeats,
                          "decode_steps": arguments.decode_steps, "small_model": SMALL_MODEL},
        "models": {name: spec.model.model_dump(mode="json") for name, spec in specs[tps[0]].items()},
        "rows": rows,
        "elapsed_s": elapsed,
    }
    arguments.json.parent.mkdir(parents=True, exist_ok=True)
    arguments.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {arguments.json}")


if __name__ == "__main__":
    main()
