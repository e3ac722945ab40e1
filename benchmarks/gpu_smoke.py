"""GPU readiness smoke: the lowered graphs, the Triton kernels and the point-to-point messages
of elastic sequence parallelism on 2 ranks, every logits row against a float64 reference.

    python benchmarks/gpu_smoke.py                      # >= 2 CUDA devices: NCCL, bfloat16, Triton
    python benchmarks/gpu_smoke.py --device cpu --json smoke.json   # gloo, float32, Triton interpreted

Two ranks (`espc.backend.harness.Harness`: one spawned process per rank, rank r on cuda:r with
its model and KV pool there; each lowers its own graph with `espc.backend.lower.Lowering` and
checks the bytes it sent per channel against what the plan needs) run three checks on two
prompts, one of odd length and one of even length (so each rank answers one of them):

1. ring-prefill: a DoP-2 ring prefill (striped tokens, KV blocks passed around the ring,
   partials merged), each rank retaining half of each prompt's KV.
2. shared-decode: one multi-master decode step over both ranks (the requests' masters on
   different ranks, each context split over both: the peer answers (o, lse) over its shard,
   no KV moves).
3. migrate-decode: one prompt's KV span on rank 0 moves to rank 1 (one packed buffer), then a
   decode step on rank 1 alone reads the whole context there.

The reference is the same model (the weights the ranks hold, cast up) run eagerly in float64
on the CPU over each whole sequence. A check passes when its logits rows stay within
`atol · ranks + rtol · max |reference|` of it (per dtype, `TOLERANCES`) and the KV ends up where
the plan put it. Prints a table; writes JSON to benchmarks/results/gpu_smoke.json when run on
GPUs (elsewhere only to --json); exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from espc.backend.harness import Harness, RankResult
from espc.frontend.spec import ModelSpec
from espc.model.llama import build_model
from espc.planner.plan import (
    DecodeBatch,
    DecodeItem,
    IterationPlan,
    Migration,
    PrefillBatch,
    PrefillItem,
    RequestId,
    TokenRange,
    even_retention,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "gpu_smoke.json"
WORLD = 2
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Whole-model logits against the float64 forward of the same weights: the house's per-dtype
# bounds (DESIGN.md: fp32 1e-5 relative, bf16 1e-2), atol scaled by the ranks, rtol by the
# largest reference logit of the check.
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.bfloat16: {"rtol": 1e-2, "atol": 1e-2},
}
# Per device, when not given: process-group backend, dtype, attention kernel, prompt lengths
# (the Triton interpreter takes minutes over a 1K prompt on a CPU).
DEFAULTS = {"cuda": ("nccl", "bfloat16", "triton", (1001, 334)), "cpu": ("gloo", "float32", "triton", (37, 12))}


class SmokeRefused(RuntimeError):
    """The machine or the flags cannot run the smoke as asked (no process is started)."""


@dataclass(frozen=True)
class Check:
    """One check's logits rows against the float64 reference: the largest absolute error, the
    bound it must stay within, and anything found out of place (KV, answering ranks)."""

    name: str
    rows: int
    max_abs_error: float
    tolerance: float
    problems: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return self.max_abs_error <= self.tolerance and not self.problems


def triton_mode(device: str, attention: str) -> None:
    """Refuse a Triton setting that would not test what it claims: the GPU smoke must compile
    the kernels (TRITON_INTERPRET unset or 0), the CPU one can only interpret them."""
    if attention != "triton":
        return
    interpreted = os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "off", "no")
    if device == "cuda" and interpreted:
        raise SmokeRefused(
            f"TRITON_INTERPRET={os.environ['TRITON_INTERPRET']} would interpret the Triton kernels on the GPU; "
            "unset it (or set TRITON_INTERPRET=0) so the smoke runs the compiled kernels"
        )
    if device == "cpu" and not interpreted:
        raise SmokeRefused(
            f"attention=triton on the CPU runs only under the Triton interpreter, but TRITON_INTERPRET="
            f"{os.environ.get('TRITON_INTERPRET', '')!r}; set TRITON_INTERPRET=1 or use --attention torch"
        )


def start_harness(
    spec: ModelSpec, *, device: str, backend: str, dtype: torch.dtype, attention: str, slots: int, timeout: float,
    threads: int = 1,
) -> Harness:
    """The 2 ranks of the smoke (see `Harness`), after checking the machine can host them."""
    if device == "cuda" and torch.cuda.device_count() < WORLD:
        raise SmokeRefused(
            f"the GPU smoke needs {WORLD} CUDA devices (one per rank), this machine has {torch.cuda.device_count()}; "
            "run with --device cpu for the CPU path (gloo, Triton under TRITON_INTERPRET=1)"
        )
    if device == "cpu" and backend == "nccl":
        raise SmokeRefused("backend nccl needs --device cuda; the CPU path uses gloo")
    triton_mode(device, attention)
    return Harness(
        spec, WORLD, slots=slots, dtype=dtype, attention=attention, timeout=timeout, device=device, backend=backend,
        threads=threads,
    )


def run_checks(harness: Harness, spec: ModelSpec, dtype: torch.dtype, lengths: Sequence[int], seed: int) -> list[Check]:
    """The three checks (module docstring) on `harness`'s 2 ranks, prompts of `lengths` (2)
    tokens. The last check also fails when the plan's frees leave any KV behind."""
    if len(lengths) != 2 or min(lengths) < 2 or max(lengths) + 2 > spec.max_context:
        raise ValueError(
            f"the smoke needs 2 prompts of 2 to max_context - 2 = {spec.max_context - 2} tokens (each decodes twice), "
            f"got lengths {list(lengths)}"
        )
    reference = build_model(spec, dtype=dtype).to(torch.float64)  # the ranks' weights, in float64
    generator = torch.Generator().manual_seed(seed)
    sequences: dict[RequestId, torch.Tensor] = {}
    tolerance = TOLERANCES[dtype]
    iteration = itertools.count()

    def draw(n: int) -> torch.Tensor:
        return torch.randint(0, spec.vocab, (n,), generator=generator)

    def run(batches=(), migrations=(), frees=(), tokens: Mapping[RequestId, torch.Tensor] | None = None):
        plan = IterationPlan(next(iteration), tuple(batches), tuple(migrations), tuple(frees))
        return harness.run(plan, tokens)

    def compare(name: str, results: list[RankResult], answering: Mapping[RequestId, int], expect_held) -> Check:
        problems = []
        errors, scale, rows = [], 0.0, 0
        for result in results:
            for request, row in result.logits.items():
                rows += 1
                if answering.get(request) != result.rank:
                    problems.append(f"request {request} answered by rank {result.rank}, the plan names {answering.get(request)}")
                    continue
                with torch.inference_mode():
                    expected = reference(sequences[request])[-1]
                errors.append((row.double() - expected).abs().max().item())
                scale = max(scale, expected.abs().max().item())
        if rows != len(answering):
            problems.append(f"{rows} logits rows for the {len(answering)} requests {sorted(answering)}")
        for result in results:
            held = {request: list(ranges) for request, ranges in result.held.items()}
            wanted = {request: list(ranges) for request, ranges in expect_held[result.rank].items()}
            if held != wanted:
                problems.append(f"rank {result.rank} holds {held}, the plan leaves it {wanted}")
        bound = tolerance["atol"] * WORLD + tolerance["rtol"] * scale
        return Check(name, rows, max(errors, default=float("inf")), bound, tuple(problems))

    a, b = 0, 1
    checks = []
    # 1. Ring prefill on (0, 1), each rank keeping the first / second half of each prompt.
    prompts = {request: draw(n) for request, n in zip((a, b), lengths)}
    sequences.update(prompts)
    items = tuple(PrefillItem(r, 0, len(t), even_retention(0, len(t), (0, 1))) for r, t in prompts.items())
    results = run([PrefillBatch((0, 1), items)], tokens=prompts)
    halves = {r: {item.instance: item.range for item in even_retention(0, len(t), (0, 1))} for r, t in prompts.items()}
    held = {rank: {r: [halves[r][rank]] for r in prompts} for rank in (0, 1)}
    last_on = {r: (len(t) - 1) % WORLD for r, t in prompts.items()}  # token j is striped onto rank j mod 2
    checks.append(compare("ring-prefill", results, last_on, held))

    # 2. Multi-master decode: a's master is rank 1, b's rank 0, both read shards on both ranks.
    masters = {a: 1, b: 0}
    new = {r: draw(1) for r in masters}
    shards = {r: tuple((rank, len(halves[r][rank])) for rank in (0, 1)) for r in masters}
    results = run([DecodeBatch((0, 1), tuple(DecodeItem(r, m, shards[r]) for r, m in masters.items()))], tokens=new)
    for r, token in new.items():
        sequences[r] = torch.cat((sequences[r], token))
    for r, m in masters.items():  # the master appends the new token's KV
        end = len(sequences[r])
        held[m][r] = [TokenRange(halves[r][m].start, end)] if halves[r][m].end == end - 1 else [halves[r][m], TokenRange(end - 1, end)]
    checks.append(compare("shared-decode", results, masters, held))

    # 3. a's span on rank 0 moves to rank 1; then rank 1 decodes a alone over its whole context.
    span = halves[a][0]
    run(migrations=[Migration(a, 0, 1, span)])
    token = draw(1)
    context = len(sequences[a])
    results = run([DecodeBatch((1,), (DecodeItem(a, 1, ((1, context),)),))], tokens={a: token})
    sequences[a] = torch.cat((sequences[a], token))
    del held[0][a]
    held[1][a] = [TokenRange(0, context + 1)]
    checks.append(compare("migrate-decode", results, {a: 1}, held))
    leaked = {result.rank: result.held for result in run(frees=sorted(sequences)) if result.held}
    if leaked:
        checks[-1] = replace(checks[-1], problems=(*checks[-1].problems, f"KV left after the frees: {leaked}"))
    return checks


def format_table(checks: Sequence[Check]) -> str:
    lines = [f"{'check':16s} {'rows':>4s} {'max abs error':>14s} {'tolerance':>10s}  pass"]
    for check in checks:
        lines.append(
            f"{check.name:16s} {check.rows:4d} {check.max_abs_error:14.3e} {check.tolerance:10.3e}  "
            f"{'yes' if check.passed else 'NO'}"
        )
        lines += [f"    {problem}" for problem in check.problems]
    return "\n".join(lines)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--backend", choices=("nccl", "gloo"), help="default: nccl on cuda, gloo on cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--attention", choices=("triton", "torch"), help="default: triton")
    parser.add_argument("--model", default="tiny", help="model preset (espc.frontend.presets), random weights")
    parser.add_argument("--layers", type=int, help="override the preset's layer count")
    parser.add_argument("--lengths", type=int, nargs=2, metavar=("A", "B"), help="prompt lengths (default: 1001 334 on cuda, 37 12 on cpu)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a rank may take to answer")
    parser.add_argument("--json", type=Path, help=f"default on cuda: {RESULTS.relative_to(ROOT)}; on cpu: none")
    arguments = parser.parse_args(argv)
    backend, dtype, attention, lengths = DEFAULTS[arguments.device]
    arguments.backend = arguments.backend or backend
    arguments.dtype = arguments.dtype or dtype
    arguments.attention = arguments.attention or attention
    arguments.lengths = tuple(arguments.lengths or lengths)
    if arguments.json is None and arguments.device == "cuda":
        arguments.json = RESULTS
    return arguments


def main(argv: Sequence[str] | None = None) -> int:
    """Run the smoke; 0 when every check passes, 1 when one fails, 2 when refused."""
    arguments = parse(argv)
    if arguments.device == "cpu" and arguments.attention == "triton":
        # Before any rank starts: the spawned ranks read it when they import Triton.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    overrides = {"layers": arguments.layers} if arguments.layers else {}
    spec = ModelSpec(preset=arguments.model, **overrides)
    dtype = DTYPES[arguments.dtype]
    try:
        harness = start_harness(
            spec, device=arguments.device, backend=arguments.backend, dtype=dtype, attention=arguments.attention,
            slots=2 * sum(arguments.lengths) + 64, timeout=arguments.timeout,
        )
    except SmokeRefused as refusal:
        print(f"gpu_smoke: {refusal}", file=sys.stderr)
        return 2
    with harness:
        checks = run_checks(harness, spec, dtype, arguments.lengths, arguments.seed)
    devices = (
        [torch.cuda.get_device_name(rank) for rank in range(WORLD)] if arguments.device == "cuda" else [platform.processor() or "cpu"] * WORLD
    )
    print(
        f"{WORLD} ranks on {arguments.device} ({', '.join(devices)}), {arguments.backend}, {arguments.dtype}, "
        f"attention={arguments.attention}, model {arguments.model} ({spec.layers} layers), prompts {list(arguments.lengths)}"
    )
    print(format_table(checks))
    passed = all(check.passed for check in checks)
    if arguments.json is not None:
        arguments.json.parent.mkdir(parents=True, exist_ok=True)
        config = {
            key: getattr(arguments, key) for key in ("device", "backend", "dtype", "attention", "model", "seed")
        } | {
            "layers": spec.layers, "lengths": list(arguments.lengths), "world": WORLD, "devices": devices,
            "torch": torch.__version__, "tolerance": TOLERANCES[dtype],
        }
        rows = [asdict(check) | {"passed": check.passed} for check in checks]
        arguments.json.write_text(json.dumps({"config": config, "checks": rows, "passed": passed}, indent=2) + "\n")
        print(f"wrote {arguments.json}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
