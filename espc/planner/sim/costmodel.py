"""The analytical cost model: seconds for one prefill or decode iteration of an elastic group.

An elastic group is `dop` instances of `tp` devices each (sequence parallelism across
instances, tensor parallelism inside one). The model is derived from the Spec slices it
needs — ModelSpec (shapes, dtype), ClusterSpec (devices, links, placement) and the runtime's
memory fraction — plus a handful of physically meaningful efficiency parameters
(`CostParameters`). No torch: the planner calls this in its inner loops.

Notation (per iteration): R requests, new tokens n_r, cached context c_r (chunked prefill),
N = Σ n_r, W = matmul weights of the layers (q, k, v, o, gate, up, down), V·H = LM head,
L layers, H hidden, h query heads, d head dim, b dtype bytes, D = dop·tp devices.

Prefill (compute-bound; token j of the batch lives on instance j mod dop, striped):

    linear_s    = max(F_lin / D / (peak · linear_mfu(N / dop)),            compute roofline
                      W·b / tp / (memory_bandwidth · memory_efficiency))   weights streamed once
    F_lin       = 2·W·N + 2·V·H·R                   LM head on each request's last token only
    attention_s = Σ_r 4·h·d·L·pairs_r / D / (peak · attention_mfu(n_r / dop))
    pairs_r     = n_r·c_r + n_r(n_r+1)/2            causal: query i sees c_r + i keys
    ring_s      = (dop−1)·(p2p_latency + block/ring_bandwidth)   per layer; block = the KV of
                  Σ(c_r+n_r)/dop tokens of one layer; exposed = max(0, ring_s − attention_s/L)
                  because each ring step's send overlaps the previous block's attention
    allreduce_s = 2·(allreduce_latency + 2(tp−1)/tp · (N/dop)·H·b / (link·link_efficiency))
                  per layer (after attention and after the MLP), ring all-reduce
    overhead_s  = iteration_overhead + (dop−1)·instance_overhead + L·layer_overhead
    prefill_s   = overhead_s + linear_s + attention_s + L·(exposed ring_s + allreduce_s)

Decode (one new token per request, B = R, context C = Σ(c_r + 1) keys read):

    compute_s   = (2·(W+V·H)·B + 4·h·d·L·C) / D / (peak · linear_mfu(B / dop))
    memory_s    = (W·b / tp + C·kv_bytes / D) / (memory_bandwidth · memory_efficiency)
    partial_s   = 2·p2p_latency + B(dop−1)/dop · (q + o + lse bytes of one layer) / ring_bandwidth
                  per layer when dop > 1 (multi-master: every request spans the whole group;
                  the master scatters q and gathers (o, lse) from dop−1 peers)
    merge_s     = B · (partials + 1) · h·(d+1)·4 bytes / tp / (memory_bandwidth · memory_efficiency)
                  per layer when dop > 1 (the master reads every fp32 partial once)
    decode_s    = overhead_s + max(compute_s, memory_s) + L·(partial_s + merge_s + allreduce_s(B/dop rows))

That is `decode_time`, the evenly spread group. A plan's real decode step is priced at its
slowest instance (`decode_step_time`): each instance's masters B_i, context C_i and the
partials it asks and serves give its own compute, memory, exchange and merge time, and the
group waits for the slowest — a long request's shard on one instance, or many masters on
one, is what sets the pace.

mfu(n) = mfu_max · n / (n + half_tokens): small GEMMs and short attention blocks reach less
of the peak. The LoongServe anchors (LWM-Text-1M on 8×A800) are reproduced by the default
parameters within 10% (see `anchor_table`); why the numbers come out as they do:

- 512 × 1K tokens: ~6.9 PFLOP of almost only linear work, the same on every split of 8 GPUs.
  What differs is TP all-reduce traffic: each of the 64 all-reduces moves every token's
  hidden state (8 KiB) 2(tp−1)/tp times; SP1·TP8 holds all 512K tokens on one instance
  (~3 s of all-reduce), SP4·TP2 only a quarter of them at 2(tp−1)/tp = 1 (~0.4 s).
- 1 × 500K tokens: ~66 PFLOP of causal attention dominate; ring steps carry ~1 GB per
  device per layer (~6 ms) under ~0.35 s of attention each, so the ring is hidden and all
  splits of 8 GPUs land within a few percent.

Placement: ring and multi-master traffic run over the slowest link between consecutive
instances of the ring. Pass `instances` (indices into `ClusterSpec.instances(tp)`, in ring
order) for an actual group; without it the group is assumed packed into as few nodes as
possible, so it crosses the network only when dop exceeds the instances of the largest node.
A mixed cluster is modelled with its weakest device (element-wise minimum), because a
synchronous group runs at the pace of its slowest member.

Calibration: `calibrate()` fits LoongServe's form α + β·Σn + γ·Σn² per (sp, tp) from measured
prefill iterations (and DistServe's α + β·Σctx + γ·B for decode) by relative-error least
squares; fitted (sp, tp) cases replace the analytical formulas, all others keep them. Both
forms assume an attention kernel that skips other requests' keys (flash attention). A dense
kernel that masks them instead (the torch reference kernel on CPU) computes every query-key
pair of the batch: its quadratic term is (Σn)² for prefill and B·Σctx for decode, so
`calibrate()` fits that "dense" form too and keeps whichever fits the measurements better.
`espc profile` also measures KV migrations and sets `migration_latency_s` and
`migration_bandwidth` (`migration_time` between instances).

Contention: where the instances share fewer CPU cores than they have worker processes (the
tiny spec's four workers on a two-core machine), a batch runs slower while other instances
are busy, and a ring or multi-master group, whose ranks wait on each other, slower still.
`espc profile` measures that slowdown per phase and dop with 0, 1, … other instances busy
(`contention`); the simulator multiplies a batch's seconds by
`contention_factor(phase, dop, busy_others)`, the instances busy outside the batch when it
starts. Without a measurement the factor is 1 (devices that do not share a processor).

Empty batches cost 0 s: the scheduler launches no iteration for them.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, overload

import numpy as np

from espc.frontend.spec import ClusterSpec, Device, DeviceSpec, ModelSpec, Spec

SCHEMA_VERSION = 1
_LSE_BYTES = 4  # the log-sum-exp of a partial attention is kept in fp32


@dataclass(frozen=True)
class CostParameters:
    """Achievable fractions of the hardware peaks and fixed latencies.

    Defaults describe an A100/A800-class GPU running LoongServe's stack (LightLLM kernels,
    NCCL, no CUDA graphs); they reproduce LoongServe's published latencies within 10%.
    """

    linear_mfu: float = 0.70
    """Fraction of peak FLOP/s that large fp16 GEMMs reach (cuBLAS on A100: ~220 of 312 TFLOP/s)."""
    linear_half_tokens: float = 64.0
    """GEMM rows (tokens per instance) at which the linear layers reach half of `linear_mfu`."""
    attention_mfu: float = 0.58
    """Fraction of peak that causal flash attention reaches on long sequences (FA2-class: ~180 TFLOP/s on A100)."""
    attention_half_tokens: float = 512.0
    """Query tokens per instance of one request at which attention reaches half of `attention_mfu`."""
    memory_efficiency: float = 0.85
    """Fraction of the HBM bandwidth that weight and KV streaming reach."""
    link_efficiency: float = 0.80
    """Fraction of a link's bandwidth that NCCL reaches (A800 NVLink: ~160 of 200 GB/s bus bandwidth)."""
    allreduce_latency_s: float = 30e-6
    """Fixed cost of one NCCL all-reduce call inside a node."""
    p2p_latency_s: float = 20e-6
    """Fixed cost of one point-to-point exchange (a ring step, a query scatter, a partial gather)."""
    layer_overhead_s: float = 100e-6
    """Kernel launches and Python per layer and iteration (no CUDA graphs)."""
    iteration_overhead_s: float = 1.5e-3
    """Scheduling, input preparation and sampling per iteration."""
    instance_overhead_s: float = 1.0e-3
    """Extra coordination per additional instance of the group (broadcast inputs, gather outputs)."""
    migration_latency_s: float = 0.0
    """Fixed cost of one KV migration between instances (measured by `espc profile`)."""
    migration_bandwidth: float | None = None
    """Achieved bytes/s of a KV migration (measured by `espc profile`); None: the link's
    bandwidth × link_efficiency."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name.endswith("_mfu") or field.name.endswith("_efficiency"):
                if not 0 < value <= 1:
                    raise ValueError(f"{field.name} must be in (0, 1], got {value}")
            elif field.name == "migration_bandwidth":
                if value is not None and not value > 0:
                    raise ValueError(f"migration_bandwidth must be > 0 bytes/s or None, got {value}")
            elif value < 0:
                raise ValueError(f"{field.name} must be ≥ 0, got {value}")


@dataclass(frozen=True)
class LinearFit:
    """time = alpha_s + beta_s · x1 + gamma_s · x2, fitted on `rows` measurements.

    Prefill: x1 = Σ new tokens, x2 = Σ(n² + 2·n·context) (= Σlen² without a cached context).
    Decode: x1 = Σ context tokens, x2 = batch size.
    With `dense` (a kernel computing every query-key pair of the batch) the quadratic terms
    span the batch: prefill x2 = Σn · Σ(n + context) (= (Σlen)²), decode x1 = B · Σ context.
    """

    alpha_s: float
    beta_s: float
    gamma_s: float
    rows: int
    max_relative_error: float
    dense: bool = False

    def __call__(self, x1: float, x2: float) -> float:
        return self.alpha_s + self.beta_s * x1 + self.gamma_s * x2

    def prefill(self, tokens, cached, squares):
        """Seconds of a prefill batch from its sums Σn, Σc and Σ(n² + 2nc) (floats or arrays)."""
        return self(tokens, tokens * (tokens + cached) if self.dense else squares)

    def decode(self, batch: float, context_tokens: float) -> float:
        """Seconds of a decode step of `batch` requests reading `context_tokens` cached keys."""
        return self(batch * context_tokens if self.dense else context_tokens, batch)


class PrefillSums(NamedTuple):
    """A prefill batch described by its sums: Σlen and Σlen²."""

    tokens: int
    squared_tokens: int


PrefillRow = tuple[int, int, "Sequence[int] | PrefillSums", float]
"""(sp, tp, the batch's lengths or its PrefillSums, measured seconds); any sequence that is
not a PrefillSums is read as lengths."""
DecodeRow = tuple[int, int, int, int, float]
"""(sp, tp, batch size, Σ context tokens, measured seconds)."""


class _Layout(NamedTuple):
    """The instances of one tp, and the largest number of them one node holds."""

    instances: tuple[tuple[Device, ...], ...]
    max_per_node: int


class CostModel:
    """Seconds per iteration for elastic groups of a model on a cluster; see the module docstring."""

    def __init__(
        self,
        model: ModelSpec,
        cluster: ClusterSpec,
        memory_fraction: float = 0.9,
        parameters: CostParameters | None = None,
        prefill_fits: Mapping[tuple[int, int], LinearFit] | None = None,
        decode_fits: Mapping[tuple[int, int], LinearFit] | None = None,
        contention: Mapping[tuple[str, int], Sequence[float]] | None = None,
        admission_s: float = 0.0,
    ):
        if not 0 < memory_fraction <= 1:
            raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction}")
        self.model = model
        self.cluster = cluster
        self.memory_fraction = memory_fraction
        self.parameters = parameters or CostParameters()
        self.prefill_fits = dict(sorted((prefill_fits or {}).items()))
        self.decode_fits = dict(sorted((decode_fits or {}).items()))
        # (phase, dop) -> slowdown with 0, 1, … other instances busy (see the module docstring)
        self.contention = {key: tuple(float(f) for f in factors) for key, factors in sorted((contention or {}).items())}
        for (phase, dop), factors in self.contention.items():
            if not factors or min(factors) <= 0:
                raise ValueError(f"contention {phase} dop {dop}: factors {list(factors)} must be > 0")
        if admission_s < 0:
            raise ValueError(f"admission_s must be ≥ 0, got {admission_s}")
        self.admission_s = float(admission_s)
        """Seconds from a request's arrival until its first batch can start: the runtime's
        driver taking it in, planning, lowering and computing inputs (measured by `espc
        profile`; 0 without a calibration). The simulator lets requests arrive this late."""
        self.device = _weakest_device(cluster)
        self._layouts: dict[int, _Layout] = {}
        self._instance_kv_bytes: dict[int, int] = {}
        self._group_bandwidths: dict[tuple[int, int], float] = {}
        self._decode_terms: dict[tuple[int, int], _DecodeTerms] = {}

        m = model
        self.layer_matmul_params = m.hidden * m.head_dim * (2 * m.heads + 2 * m.kv_heads) + 3 * m.hidden * m.ffn
        self.lm_head_params = m.vocab * m.hidden
        self.streamed_weight_bytes = (m.layers * self.layer_matmul_params + self.lm_head_params) * m.dtype_bytes
        """Weights read by one forward pass: every matmul (the embedding is only gathered)."""
        self.attention_flops_per_pair = 4 * m.heads * m.head_dim * m.layers
        """QKᵀ and PV, 2 FLOPs per multiply-add, for one (query, key) pair over all layers."""
        self._decode_flops_per_request = 2 * (m.layers * self.layer_matmul_params + self.lm_head_params)

    @classmethod
    def from_spec(cls, spec: Spec, parameters: CostParameters | None = None) -> CostModel:
        return cls(spec.model, spec.cluster, spec.runtime.memory_fraction, parameters)

    # ------------------------------------------------------------------------- memory

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of every layer for one token (ModelSpec.kv_bytes_per_token)."""
        return self.model.kv_bytes_per_token

    def instance_kv_bytes_per_token(self, tp: int) -> int:
        """KV bytes one instance stores per token: tp > kv_heads replicates each KV head."""
        found = self._instance_kv_bytes.get(tp)  # (every simulated decode step asks)
        if found is None:
            self._check_tp(tp)
            found = self._instance_kv_bytes[tp] = self.kv_bytes_per_token * max(1, tp // self.model.kv_heads)
        return found

    def instance_memory(self, tp: int) -> float:
        """Bytes one instance may use: memory_fraction × device memory × tp."""
        self._check_tp(tp)
        return self.memory_fraction * self.device.memory * tp

    def kv_capacity_tokens(self, tp: int) -> int:
        """KV slots of one instance: (instance_memory − weights) / instance KV bytes per token."""
        free_bytes = self.instance_memory(tp) - self.model.weight_bytes
        return max(0, int(free_bytes // self.instance_kv_bytes_per_token(tp)))

    def migration_time(
        self,
        tokens: int,
        *,
        bandwidth: float | None = None,
        src: int | None = None,
        dst: int | None = None,
        tp: int | None = None,
    ) -> float:
        """Seconds to move `tokens` tokens of KV: bytes / bandwidth.

        Give either `bandwidth` (bytes/s, achieved) with bytes = tokens × kv_bytes_per_token,
        or `src` and `dst` instance indices of `ClusterSpec.instances(tp)`: then the bytes are
        what the instance stores, the bandwidth is the measured `migration_bandwidth` or else
        their link × link_efficiency, and `migration_latency_s` is added.
        """
        if tokens < 0:
            raise ValueError(f"tokens must be ≥ 0, got {tokens}")
        if bandwidth is not None:
            if src is not None or dst is not None:
                raise ValueError("give either bandwidth or src and dst, not both")
            if bandwidth <= 0:
                raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
            return tokens * self.kv_bytes_per_token / bandwidth
        if src is None or dst is None or tp is None:
            raise ValueError("give bandwidth, or src, dst and tp")
        if src == dst:
            raise ValueError(f"src and dst are the same instance ({src})")
        instances = self._layout(tp).instances
        for name, index in (("src", src), ("dst", dst)):
            if not 0 <= index < len(instances):
                raise ValueError(f"{name}({index}) is not an instance; tp({tp}) gives instances 0..{len(instances) - 1}")
        p = self.parameters
        link = p.migration_bandwidth or self._instance_bandwidth(instances[src], instances[dst]) * p.link_efficiency
        return p.migration_latency_s + tokens * self.instance_kv_bytes_per_token(tp) / link

    # ------------------------------------------------------------------------ prefill

    def prefill_time(
        self,
        lengths: Sequence[int],
        dop: int,
        tp: int,
        context: Sequence[int] | None = None,
        instances: Sequence[int] | None = None,
    ) -> float:
        """Seconds for one prefill iteration computing `lengths` new tokens per request.

        `context[r]` tokens of request r are already cached (chunked prefill): its queries
        attend to context + new keys. `instances` places the group (see the module docstring).
        """
        context = self._checked_context(lengths, context)
        ring_bandwidth = self._ring_bandwidth(dop, tp, instances)
        if not lengths:
            return 0.0
        return float(
            self._prefill_from_sums(
                dop, tp, ring_bandwidth,
                requests=len(lengths),
                tokens=sum(lengths),
                cached=sum(context),
                squares=_prefill_features(lengths, context)[1],
                attention_s=sum(self._attention_s(n, c, dop, tp) for n, c in zip(lengths, context)),
            )
        )

    def alone_prefill_times(self, length: int, tp: int) -> np.ndarray:
        """Analytical seconds to prefill one prompt of `length` tokens alone at every dop of
        tp (entry dop − 1), in one vectorised pass: `prefill_time([length], dop, tp)` where
        no calibrated fit covers (dop, tp)."""
        dops = np.arange(1, len(self._layout(tp).instances) + 1)
        bandwidths = np.array([self._ring_bandwidth(int(dop), tp, None) for dop in dops])
        return self._prefill_from_sums(
            dops, tp, bandwidths, requests=1, tokens=length, cached=0, squares=length * length,
            attention_s=self._attention_s(length, 0, dops, tp), dop_array=True,
        )

    def prefill_segment_times(
        self, lengths: Sequence[int], dop: int, tp: int, starts: np.ndarray, ends: np.ndarray,
        instances: Sequence[int] | None = None,
    ) -> np.ndarray:
        """Seconds of contiguous batches of `lengths` (fresh prefills, no cached context):
        entry p is `prefill_time(lengths[starts[p]:ends[p]], ...)` (every batch non-empty).

        The batching DP reads O(n²) batches per dop, so they come from prefix sums in one
        vectorised pass instead of a call per batch."""
        ring_bandwidth = self._ring_bandwidth(dop, tp, instances)
        values = np.asarray(lengths, dtype=float)
        if np.any(values < 1):
            raise ValueError(f"every request of a prefill batch computes ≥ 1 token, got {int(values.min())}")
        if np.any(np.asarray(ends) <= np.asarray(starts)):
            raise ValueError("every batch needs at least one request: ends must exceed starts")

        def batch_sums(per_request: np.ndarray) -> np.ndarray:
            prefix = np.concatenate(([0.0], np.cumsum(per_request)))
            return prefix[ends] - prefix[starts]

        return self._prefill_from_sums(
            dop, tp, ring_bandwidth,
            requests=(np.asarray(ends) - np.asarray(starts)).astype(float),
            tokens=batch_sums(values),
            cached=0.0,
            squares=batch_sums(values * values),
            attention_s=batch_sums(self._attention_s(values, 0, dop, tp)),
        )

    @overload
    def _attention_s(self, new: int, cached: int, dop: int, tp: int) -> float: ...
    @overload
    def _attention_s(self, new: np.ndarray, cached: int, dop: int, tp: int) -> np.ndarray: ...
    @overload
    def _attention_s(self, new: int, cached: int, dop: np.ndarray, tp: int) -> np.ndarray: ...

    def _attention_s(self, new: Any, cached: int, dop: Any, tp: int) -> Any:
        """Attention seconds of one request's prefill (see the module docstring); element-wise
        for an array of lengths or of dops."""
        p = self.parameters
        pairs = new * cached + new * (new + 1) / 2
        return self.attention_flops_per_pair * pairs / (dop * tp) / (
            self.device.peak_flops * _mfu(p.attention_mfu, p.attention_half_tokens, new / dop)
        )

    def _prefill_from_sums(self, dop, tp, ring_bandwidth, *, requests, tokens, cached, squares, attention_s, dop_array=False):
        """prefill_s from a batch's sums (floats or equally shaped numpy arrays; with
        `dop_array`, dop and ring_bandwidth are arrays too and only the analytical model
        applies): a fitted (dop, tp) case reads (Σn, Σ(n² + 2nc)) or, dense, (Σn, Σn·Σ(n + c)),
        the analytical model the rest."""
        fit = None if dop_array else self.prefill_fits.get((dop, tp))
        if fit is not None:
            return fit.prefill(tokens, cached, squares)
        p, m = self.parameters, self.model
        linear_flops = 2 * m.layers * self.layer_matmul_params * tokens + 2 * self.lm_head_params * requests
        mfu = p.linear_mfu * tokens / (tokens + p.linear_half_tokens * dop)  # _mfu at tokens / dop
        linear_s = np.maximum(linear_flops / (dop * tp) / (self.device.peak_flops * mfu), self._weight_stream_s(tp))
        per_layer_s = self._allreduce_s(tokens / dop, tp)
        if dop_array or dop > 1:  # (a lone instance has no ring: the DP's large tables skip it)
            ring_block_bytes = (tokens + cached) / dop * self.instance_kv_bytes_per_token(tp) / m.layers
            ring_s = (dop - 1) * (p.p2p_latency_s + ring_block_bytes / ring_bandwidth)
            per_layer_s = per_layer_s + np.maximum(0.0, ring_s - attention_s / m.layers)  # exposed ring time
        return self._overhead_s(dop) + linear_s + attention_s + m.layers * per_layer_s

    # ------------------------------------------------------------------------- decode

    def decode_time(self, context_lens: Sequence[int], dop: int, tp: int, instances: Sequence[int] | None = None) -> float:
        """Seconds for one decode step of requests with `context_lens` cached tokens each,
        spread evenly over the group: every instance masters 1/dop of the requests and holds
        1/dop of every context. A plan's real step is priced by `decode_step_time`."""
        if context_lens and min(context_lens) < 0:
            raise ValueError(f"context lengths must be ≥ 0, got {min(context_lens)}")
        ring_bandwidth = self._ring_bandwidth(dop, tp, instances)
        if not context_lens:
            return 0.0
        batch = len(context_lens)
        remote = batch * (dop - 1) / dop  # every master asks dop − 1 peers; every peer serves the rest
        load = DecodeLoad(batch / dop, sum(context_lens) / dop, remote, remote)
        return self._instance_decode_s(load, dop, tp, self._decode_terms_of(dop, tp, ring_bandwidth, instances))

    def decode_step_time(self, loads: Sequence[DecodeLoad], tp: int, instances: Sequence[int] | None = None) -> float:
        """Seconds for one multi-master decode step, priced at its slowest instance: `loads`
        holds each instance's share of the step (in the order of `instances`, the group).
        An instance that masters many requests, or holds most of a long context, keeps the
        whole group waiting: the even spread of `decode_time` is only its best case."""
        dop = len(loads)
        ring_bandwidth = self._ring_bandwidth(dop, tp, instances)
        if not any(load.masters for load in loads):
            return 0.0
        terms = self._decode_terms_of(dop, tp, ring_bandwidth, instances)
        return max(self._instance_decode_s(load, dop, tp, terms) for load in loads)

    def _decode_terms_of(self, dop: int, tp: int, ring_bandwidth: float, instances: Sequence[int] | None) -> _DecodeTerms:
        terms = self._decode_terms.get((dop, tp)) if instances is None else None
        if terms is None:
            terms = self._group_decode_terms(dop, tp, ring_bandwidth)
            if instances is None:  # (every simulated decode step asks: the group's terms are kept)
                self._decode_terms[(dop, tp)] = terms
        return terms

    def _instance_decode_s(self, load: DecodeLoad, dop: int, tp: int, terms: _DecodeTerms) -> float:
        """One instance's time in a decode step of a dop-instance group (see the module docstring)."""
        fit = self.decode_fits.get((dop, tp))
        if fit is not None:  # fitted on evenly loaded groups: price dop instances loaded like this one
            return fit.decode(dop * load.masters, dop * load.context)
        p, m = self.parameters, self.model
        keys = load.context + load.masters  # each new token's KV is written, then read with the rest
        flops = self._decode_flops_per_request * load.masters + self.attention_flops_per_pair * keys
        rows = load.masters or load.partials_served  # a peer's attention runs on the queries it serves
        compute_s = flops / tp / (self.device.peak_flops * _mfu(p.linear_mfu, p.linear_half_tokens, rows)) if flops else 0.0
        memory_s = (terms.weight_stream_s if load.masters else 0.0) + keys * terms.kv_read_s_per_key
        per_layer_s = self._allreduce_s(load.masters, tp)
        if load.partials_requested or load.partials_served:
            # Per direction: q out and (o, lse) back for the partials it asks of peers, the
            # reverse for those it computes for them; then the master merges every partial.
            sent = load.partials_requested * terms.query_bytes + load.partials_served * terms.partial_bytes
            received = load.partials_requested * terms.partial_bytes + load.partials_served * terms.query_bytes
            per_layer_s += terms.partial_fixed_s + max(sent, received) / terms.ring_bandwidth
            per_layer_s += (load.partials_requested + load.masters) * terms.merge_s_per_partial
        return terms.overhead_s + max(compute_s, memory_s) + m.layers * per_layer_s

    def _group_decode_terms(self, dop: int, tp: int, ring_bandwidth: float) -> _DecodeTerms:
        """What a decode step's time at (dop, tp) scales from (see `_instance_decode_s`)."""
        p, m = self.parameters, self.model
        query_bytes = m.heads * m.head_dim * m.dtype_bytes
        memory_bandwidth = self.device.memory_bandwidth * p.memory_efficiency
        return _DecodeTerms(
            kv_read_s_per_key=self.instance_kv_bytes_per_token(tp) / tp / memory_bandwidth,
            weight_stream_s=self._weight_stream_s(tp),
            ring_bandwidth=ring_bandwidth,
            query_bytes=query_bytes,
            partial_bytes=query_bytes + m.heads * _LSE_BYTES,
            partial_fixed_s=2 * p.p2p_latency_s if dop > 1 else 0.0,
            # the merge reads each fp32 partial (o, lse) of one layer once, per device's heads
            merge_s_per_partial=m.heads * (m.head_dim + 1) * _LSE_BYTES / tp / memory_bandwidth,
            overhead_s=self._overhead_s(dop),
        )

    def contention_factor(self, phase: str, dop: int, busy_others: int) -> float:
        """How much slower a `phase` batch of `dop` instances runs while `busy_others` other
        instances are busy (1 when not measured; past the most measured, the last factor)."""
        factors = self.contention.get((phase, dop))
        if not factors:
            return 1.0
        return factors[min(max(busy_others, 0), len(factors) - 1)]

    # -------------------------------------------------------------------- calibration

    def calibrate(
        self, prefill: Iterable[PrefillRow] = (), decode: Iterable[DecodeRow] = (), parameters: CostParameters | None = None,
        contention: Mapping[tuple[str, int], Sequence[float]] | None = None, admission_s: float | None = None,
    ) -> CostModel:
        """A copy using LoongServe's/DistServe's fitted forms for the measured (sp, tp) cases
        (and `parameters`, the measured `contention` and `admission_s` when given).

        Each (sp, tp) group is fitted by minimising Σ((pred − meas)/meas)², i.e. linear least
        squares on rows scaled by 1/meas, with non-negative coefficients (solved exactly by
        trying every support of the three coefficients), once per request and once dense
        (see the module docstring); the smaller error wins, per request on a tie (rows of
        single requests cannot tell them apart). Fitted cases replace earlier fits.
        """
        # Rows as (per-request features, dense features, seconds); prefill rows have no context.
        prefill_groups: dict[tuple[int, int], list[tuple[tuple[float, float], tuple[float, float], float]]] = {}
        for sp, tp, batch, seconds in prefill:
            if isinstance(batch, PrefillSums):
                tokens, squares = float(batch.tokens), float(batch.squared_tokens)
            else:
                tokens, squares = _prefill_features(batch, [0] * len(batch))
            rows = prefill_groups.setdefault(self._check_group(sp, tp), [])
            rows.append(((tokens, squares), (tokens, tokens * tokens), seconds))
        decode_groups: dict[tuple[int, int], list[tuple[tuple[float, float], tuple[float, float], float]]] = {}
        for sp, tp, batch_size, context_tokens, seconds in decode:
            rows = decode_groups.setdefault(self._check_group(sp, tp), [])
            rows.append(
                ((float(context_tokens), float(batch_size)), (float(batch_size * context_tokens), float(batch_size)), seconds)
            )
        return CostModel(
            self.model,
            self.cluster,
            self.memory_fraction,
            parameters or self.parameters,
            self.prefill_fits | {key: _fit_either(rows, f"prefill {key}") for key, rows in prefill_groups.items()},
            self.decode_fits | {key: _fit_either(rows, f"decode {key}") for key, rows in decode_groups.items()},
            self.contention | dict(contention or {}),
            self.admission_s if admission_s is None else admission_s,
        )

    # --------------------------------------------------------------- serialisation

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: specs in their unit spelling, parameters, fits as lists sorted by (sp, tp)."""

        def fits(table: Mapping[tuple[int, int], LinearFit]) -> list[dict[str, Any]]:
            return [{"sp": sp, "tp": tp, **dataclasses.asdict(fit)} for (sp, tp), fit in table.items()]

        return {
            "schema": SCHEMA_VERSION,
            "model": self.model.model_dump(mode="json"),
            "cluster": self.cluster.model_dump(mode="json"),
            "memory_fraction": self.memory_fraction,
            "parameters": dataclasses.asdict(self.parameters),
            "prefill_fits": fits(self.prefill_fits),
            "decode_fits": fits(self.decode_fits),
            "contention": [{"phase": phase, "dop": dop, "factors": list(f)} for (phase, dop), f in self.contention.items()],
            "admission_s": self.admission_s,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CostModel:
        if data.get("schema") != SCHEMA_VERSION:
            raise ValueError(f"cost model schema {data.get('schema')!r} is not {SCHEMA_VERSION}")

        def fits(rows: Iterable[Mapping[str, Any]]) -> dict[tuple[int, int], LinearFit]:
            return {(row["sp"], row["tp"]): LinearFit(**{k: v for k, v in row.items() if k not in ("sp", "tp")}) for row in rows}

        return cls(
            ModelSpec.model_validate(data["model"]),
            ClusterSpec.model_validate(data["cluster"]),
            data["memory_fraction"],
            CostParameters(**data["parameters"]),
            fits(data["prefill_fits"]),
            fits(data["decode_fits"]),
            {(row["phase"], row["dop"]): row["factors"] for row in data.get("contention", ())},  # absent before it was measured
            data.get("admission_s", 0.0),
        )

    def __str__(self) -> str:
        d, m = self.device, self.model
        lines = [
            f"cost model: {m.name} ({m.num_parameters / 1e9:.2f}B params, {m.dtype}) on "
            f"{self.cluster.num_devices} × {d.name}",
            f"  device: peak {d.peak_flops / 1e12:g} TFLOP/s, HBM {d.memory_bandwidth / 1e9:g} GB/s, "
            f"link {d.link_bandwidth / 1e9:g} GB/s, memory {d.memory / 2**30:g} GiB × {self.memory_fraction:g}",
            f"  kv_bytes_per_token: {self.kv_bytes_per_token}",
        ]
        for field in dataclasses.fields(self.parameters):
            value = getattr(self.parameters, field.name)
            lines.append(f"  {field.name}: {'link × link_efficiency' if value is None else format(value, 'g')}")
        for phase, table, terms in (
            ("prefill", self.prefill_fits, ("Σlen, Σlen²", "Σlen, (Σlen)², dense")),
            ("decode", self.decode_fits, ("Σctx, batch", "batch·Σctx, batch, dense")),
        ):
            for (sp, tp), fit in table.items():
                lines.append(
                    f"  {phase} fit SP{sp}·TP{tp}: α={fit.alpha_s * 1e3:.6g} ms β={fit.beta_s * 1e3:.6g} ms "
                    f"γ={fit.gamma_s * 1e3:.6g} ms ({terms[fit.dense]}; {fit.rows} rows, "
                    f"max error {fit.max_relative_error:.2%})"
                )
        return "\n".join(lines)

    def tp_choices(self) -> list[int]:
        """Every tp an instance can have here: it divides each node's devices and suits the
        model's heads (see `_check_tp`)."""
        smallest_node = min(node.devices for node in self.cluster.nodes)
        choices = []
        for tp in range(1, smallest_node + 1):
            try:
                self._layout(tp)
            except ValueError:
                continue
            choices.append(tp)
        return choices

    # ---------------------------------------------------------------------- helpers

    def _check_tp(self, tp: int) -> None:
        m = self.model
        if tp <= 0:
            raise ValueError(f"tp must be ≥ 1, got {tp}")
        if m.heads % tp:
            raise ValueError(f"tp({tp}) does not divide the model's {m.heads} heads")
        if m.kv_heads % tp and tp % m.kv_heads:
            raise ValueError(f"tp({tp}) and kv_heads({m.kv_heads}): neither divides the other")

    def _layout(self, tp: int) -> _Layout:
        layout = self._layouts.get(tp)
        if layout is None:
            self._check_tp(tp)
            instances = tuple(self.cluster.instances(tp))  # raises if tp does not divide a node
            per_node = [len(list(group)) for _, group in itertools.groupby(instances, key=lambda i: i[0].node)]
            layout = self._layouts[tp] = _Layout(instances, max(per_node))
        return layout

    def _check_group(self, dop: int, tp: int) -> tuple[int, int]:
        if dop <= 0:
            raise ValueError(f"dop must be ≥ 1, got {dop}")
        available = len(self._layout(tp).instances)
        if dop > available:
            raise ValueError(f"dop({dop}) exceeds the {available} instances of tp({tp}) in the cluster")
        return dop, tp

    def _checked_context(self, lengths: Sequence[int], context: Sequence[int] | None) -> Sequence[int]:
        if any(n < 1 for n in lengths):
            raise ValueError(f"every request of a prefill batch computes ≥ 1 token, got {min(lengths)}")
        if context is None:
            return [0] * len(lengths)
        if len(context) != len(lengths):
            raise ValueError(f"context has {len(context)} entries for {len(lengths)} requests")
        if any(c < 0 for c in context):
            raise ValueError(f"context lengths must be ≥ 0, got {min(context)}")
        return context

    def _instance_bandwidth(self, a: tuple[Device, ...], b: tuple[Device, ...]) -> float:
        """What one ring step between two instances gets (as ClusterSpec.instance_graph):
        within a node the tp shards talk pairwise in parallel; across nodes they share the network."""
        link = self.cluster.link_bandwidth(a[0], b[0])
        return len(a) * link if a[0].node == b[0].node else link

    def _ring_bandwidth(self, dop: int, tp: int, instances: Sequence[int] | None) -> float:
        """Achieved bytes/s of the slowest ring edge of the group (inf for a single instance)."""
        if instances is None:
            found = self._group_bandwidths.get((dop, tp))  # (every simulated iteration asks)
            if found is None:
                found = self._group_bandwidths[(dop, tp)] = self._default_ring_bandwidth(dop, tp)
            return found
        self._check_group(dop, tp)
        layout = self._layout(tp)
        if len(instances) != dop or len(set(instances)) != dop:
            raise ValueError(f"instances {list(instances)} must name dop({dop}) distinct instances")
        for index in instances:
            if not 0 <= index < len(layout.instances):
                raise ValueError(f"instance {index} does not exist; tp({tp}) gives instances 0..{len(layout.instances) - 1}")
        if dop == 1:
            return float("inf")
        ring = [layout.instances[i] for i in instances]
        slowest = min(self._instance_bandwidth(a, b) for a, b in zip(ring, ring[1:] + ring[:1]))
        return slowest * self.parameters.link_efficiency

    def _default_ring_bandwidth(self, dop: int, tp: int) -> float:
        """_ring_bandwidth of a group placed within a node when one node has room for it."""
        self._check_group(dop, tp)
        if dop == 1:
            return float("inf")
        if dop <= self._layout(tp).max_per_node:
            return tp * self.device.link_bandwidth * self.parameters.link_efficiency
        return self._network_bandwidth() * self.parameters.link_efficiency

    def _network_bandwidth(self) -> float:
        assert self.cluster.inter_node_bandwidth is not None, "validated: multi-node clusters have a network"
        return self.cluster.inter_node_bandwidth

    def _weight_stream_s(self, tp: int) -> float:
        return self.streamed_weight_bytes / tp / (self.device.memory_bandwidth * self.parameters.memory_efficiency)

    def _allreduce_s(self, rows: float, tp: int) -> float:
        """The two ring all-reduces of one layer over `rows` hidden states (0 without TP)."""
        if tp == 1:
            return 0.0
        p = self.parameters
        payload_bytes = rows * self.model.hidden * self.model.dtype_bytes
        wire_s = 2 * (tp - 1) / tp * payload_bytes / (self.device.link_bandwidth * p.link_efficiency)
        return 2 * (p.allreduce_latency_s + wire_s)

    def _overhead_s(self, dop: int) -> float:
        p = self.parameters
        return p.iteration_overhead_s + (dop - 1) * p.instance_overhead_s + self.model.layers * p.layer_overhead_s


class DecodeLoad(NamedTuple):
    """One instance's share of a multi-master decode step (`CostModel.decode_step_time`)."""

    masters: float
    """Requests whose new token this instance appends and whose layers (FFN, LM head) it runs."""
    context: float
    """Cached tokens of any request it reads (its local shards)."""
    partials_requested: float
    """Partial attentions its masters ask of peers: a query out, an (o, lse) back, a merge."""
    partials_served: float
    """Partial attentions it computes over its shards for masters elsewhere."""


class _DecodeTerms(NamedTuple):
    """A decode group's constants at (dop, tp): seconds per KV key read on one instance,
    weight streaming, the multi-master exchange's message sizes, link and fixed cost, the
    merge per partial (per layer) and the iteration overhead."""

    kv_read_s_per_key: float
    weight_stream_s: float
    ring_bandwidth: float
    query_bytes: int
    partial_bytes: int
    partial_fixed_s: float
    merge_s_per_partial: float
    overhead_s: float


def _mfu(peak_fraction: float, half_tokens: float, tokens: float) -> float:
    """peak_fraction · tokens / (tokens + half_tokens)."""
    return peak_fraction * tokens / (tokens + half_tokens)


def _prefill_features(lengths: Sequence[int], context: Sequence[int]) -> tuple[float, float]:
    """(Σn, Σ(n² + 2·n·c)): the second is twice the causal pair count, Σlen² without context."""
    return float(sum(lengths)), float(sum(n * n + 2 * n * c for n, c in zip(lengths, context)))


def _fit_either(rows: Sequence[tuple[tuple[float, float], tuple[float, float], float]], what: str) -> LinearFit:
    """The better of the per-request and the dense fit of rows (per-request features, dense
    features, seconds); see `calibrate`."""
    seconds = np.array([row[2] for row in rows], dtype=float)
    if np.any(seconds <= 0):
        raise ValueError(f"{what}: measured seconds must be > 0")
    fits = []
    for dense in (False, True):
        features = np.array([row[1] if dense else row[0] for row in rows], dtype=float)
        design = np.column_stack([np.ones(len(rows)), features])
        if np.linalg.matrix_rank(design) < 3:  # this form's features do not vary enough
            continue
        coefficients, errors = fit_relative(design, seconds)
        alpha, beta, gamma = (float(x) for x in coefficients)
        fit = LinearFit(alpha, beta, gamma, len(rows), float(np.max(np.abs(errors))), dense)
        fits.append((float(np.sum(errors**2)), dense, fit))
    if not fits:
        raise ValueError(f"{what}: {len(rows)} rows do not determine α, β and γ; vary the batch sizes and lengths")
    return min(fits, key=lambda candidate: candidate[:2])[2]


def fit_relative(design: np.ndarray, seconds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative coefficients c minimising Σ((design·c − t)/t)² over the rows, and each
    row's relative error (design·c − t)/t."""
    columns_total = design.shape[1]
    scaled = design / seconds[:, None]
    best, best_residual = np.zeros(columns_total), float(len(seconds))  # all-zero coefficients: every error is −100%
    # The optimum is the unconstrained solution on its own support, so trying every support
    # and keeping the best non-negative one is exact.
    for support in itertools.product((False, True), repeat=columns_total):
        columns = np.flatnonzero(support)
        if not columns.size:
            continue
        solution, *_ = np.linalg.lstsq(scaled[:, columns], np.ones(len(seconds)), rcond=None)
        if np.any(solution < 0):
            continue
        coefficients = np.zeros(columns_total)
        coefficients[columns] = solution
        residual = float(np.sum((scaled @ coefficients - 1) ** 2))
        if residual < best_residual:
            best, best_residual = coefficients, residual
    return best, (design @ best - seconds) / seconds


def _weakest_device(cluster: ClusterSpec) -> DeviceSpec:
    """The cluster's device, or for a mixed cluster the element-wise minimum of its devices."""
    devices = {node.device for node in cluster.nodes}
    if len(devices) == 1:
        return devices.pop()
    fields = ("memory", "peak_flops", "memory_bandwidth", "link_bandwidth")
    weakest = {field: min(getattr(device, field) for device in devices) for field in fields}
    names = "/".join(sorted(device.name for device in devices))
    return DeviceSpec(name=f"weakest of {names}", kind=cluster.device_kind, **weakest)


# ------------------------------------------------------------------------------ anchors


class Anchor(NamedTuple):
    """A published measurement of LoongServe's testbed (shared/anchors/README.md)."""

    case: str
    phase: str  # "prefill" or "decode"
    sp: int
    tp: int
    lengths: tuple[int, ...]  # prefill: new tokens per request; decode: context per request
    measured_s: float


LOONGSERVE_ANCHORS: tuple[Anchor, ...] = (
    # "LS measured latencies (8 GPUs, artifact notebook)"; 1K read as 1024 tokens.
    Anchor("512 × 1K", "prefill", 1, 8, (1024,) * 512, 7.76),
    Anchor("512 × 1K", "prefill", 2, 4, (1024,) * 512, 5.78),
    Anchor("512 × 1K", "prefill", 4, 2, (1024,) * 512, 5.27),
    Anchor("1 × 500K", "prefill", 1, 8, (500_000,), 51.1),
    Anchor("1 × 500K", "prefill", 2, 4, (500_000,), 51.7),
    Anchor("1 × 500K", "prefill", 4, 2, (500_000,), 53.6),
    # "SP1·TP1, one 1000-token request: prefill 68.9 ms, decode 13.0 ms".
    Anchor("1 × 1000", "prefill", 1, 1, (1000,), 68.9e-3),
    Anchor("1 × ctx 1000", "decode", 1, 1, (1000,), 13.0e-3),
)


class AnchorResult(NamedTuple):
    anchor: Anchor
    predicted_s: float

    @property
    def relative_error(self) -> float:
        return (self.predicted_s - self.anchor.measured_s) / self.anchor.measured_s


def anchor_table(cost: CostModel, anchors: Iterable[Anchor] = LOONGSERVE_ANCHORS) -> list[AnchorResult]:
    """Predictions of `cost` (meant: LWM-Text-1M on 8 × A800-80G) for the published anchors."""
    results = []
    for anchor in anchors:
        if anchor.phase == "prefill":
            predicted = cost.prefill_time(anchor.lengths, anchor.sp, anchor.tp)
        else:
            predicted = cost.decode_time(anchor.lengths, anchor.sp, anchor.tp)
        results.append(AnchorResult(anchor, predicted))
    return results


def format_anchor_table(results: Iterable[AnchorResult]) -> str:
    """config | case | measured | predicted | error, one line per anchor."""
    lines = [f"{'config':<8} {'case':<13} {'phase':<8} {'measured':>10} {'predicted':>10} {'error':>8}"]
    for result in results:
        a = result.anchor
        lines.append(
            f"SP{a.sp}·TP{a.tp:<3} {a.case:<13} {a.phase:<8} {_seconds(a.measured_s):>10} "
            f"{_seconds(result.predicted_s):>10} {result.relative_error:>+8.1%}"
        )
    return "\n".join(lines)


def _seconds(value: float) -> str:
    return f"{value:.3f} s" if value >= 1 else f"{value * 1e3:.1f} ms"
