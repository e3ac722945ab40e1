"""The Spec: what a serving engineer declares — model, cluster, SLOs, workload, policy, runtime, serving.

Pydantic v2 models, frozen and `extra="forbid"`, are the single source of truth for
configuration: TOML and the DSL both produce a raw dictionary that is validated here, and
every later pass receives only the slice of the Spec it needs. Quantities accept units
(`80GiB`, `200Gb/s`, `50ms`, `128Ki`); distributions, arrival processes and latency bounds
accept a shorthand (`zipf(1.0, 10, 200K)`, `poisson(2.5)`, `max(25x prefill, 15s) at p90`),
which is also how they are written back out.

Rules that span fields raise `RuleViolation` with the path of the field to change and the
arithmetic that fails ("tp(3) does not divide the 8 devices of node0").
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import PurePath
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, cast

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    Strict,
    WithJsonSchema,
    field_validator,
    model_serializer,
    model_validator,
)

from espc.frontend import units
from espc.frontend.errors import RuleViolation, suggest
from espc.frontend.grammar import ShorthandError, number_or_text, parse_bound, parse_call
from espc.frontend.presets import (
    DATASET_INPUT_RANGES,
    DATASET_OUTPUT_MAX,
    DEVICE_ALIASES,
    DEVICE_PRESETS,
    MODEL_PRESETS,
)
from espc.frontend.units import Kind

if TYPE_CHECKING:
    import networkx


def _quantity(kind: Kind, **constraints: Any) -> Any:
    """A field type that reads a number or a unit string and writes the unit string back."""

    def parse(value: object) -> object:
        return units.parse_quantity(value, kind)

    def write(value: int | float) -> str | int | float:
        return units.format_quantity(value, kind)

    return Annotated[
        int if kind.integral else float,
        BeforeValidator(parse),
        Field(**constraints),
        PlainSerializer(write, when_used="json"),
        WithJsonSchema(units.json_schema(kind)),
    ]


# Numbers are strict: `requests = true` or `layers = "32"` is an error, not 1 or 32.
PositiveInt = Annotated[int, Strict(), Field(gt=0)]
NonNegativeInt = Annotated[int, Strict(), Field(ge=0)]
Real = Annotated[float, Strict()]
Flag = Annotated[bool, Strict()]

if TYPE_CHECKING:
    # A type checker sees the number a quantity field holds once validated; the Annotated
    # form below is built at run time, which static checkers cannot evaluate.
    Bytes = int
    Bandwidth = float
    Duration = float
    FlopRate = float
    Tokens = int
    NonNegativeTokens = int
else:
    Bytes = _quantity(Kind.BYTES, gt=0)
    Bandwidth = _quantity(Kind.BANDWIDTH, gt=0)
    Duration = _quantity(Kind.DURATION, ge=0)
    FlopRate = _quantity(Kind.FLOP_RATE, gt=0)
    Tokens = _quantity(Kind.TOKENS, gt=0)
    NonNegativeTokens = _quantity(Kind.TOKENS, ge=0)  # a token count that may be 0


def _parse_fraction(value: object) -> object:
    """`0.9` or `"90%"` -> 0.9."""
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            return float(value.strip()[:-1]) / 100
        except ValueError:
            raise ValueError(f"cannot read {value!r} as a percentage") from None
    return value


Fraction = Annotated[
    float,
    Strict(),
    BeforeValidator(_parse_fraction),
    Field(gt=0, le=1),
    WithJsonSchema({"anyOf": [{"type": "number", "exclusiveMinimum": 0, "maximum": 1}, {"type": "string", "pattern": r"^[0-9.]+%$"}]}),
]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# ---------------------------------------------------------------------------------- model


class LinearRopeScaling(_Frozen):
    """Position interpolation: positions are divided by `factor`."""

    type: Literal["linear"]
    factor: Real = Field(ge=1)


class Llama3RopeScaling(_Frozen):
    """Llama 3.1's frequency-dependent scaling of the rotary embedding."""

    type: Literal["llama3"]
    factor: Real = Field(ge=1)
    low_freq_factor: Real = Field(1.0, gt=0)
    high_freq_factor: Real = Field(4.0, gt=0)
    original_max_context: Tokens = 8192

    @model_validator(mode="after")
    def _frequencies_ordered(self) -> Llama3RopeScaling:
        if self.high_freq_factor <= self.low_freq_factor:
            raise RuleViolation(
                ("high_freq_factor",),
                f"high_freq_factor({self.high_freq_factor}) must exceed low_freq_factor({self.low_freq_factor})",
            )
        return self


RopeScaling = Annotated[LinearRopeScaling | Llama3RopeScaling, Field(discriminator="type")]

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


class ModelSpec(_Frozen):
    """A Llama-family decoder. `preset` fills every field not given explicitly."""

    preset: str | None = Field(None, description=f"architecture preset: {', '.join(MODEL_PRESETS)}")
    name: str = Field("custom", min_length=1)
    arch: Literal["llama"] = "llama"
    layers: PositiveInt
    hidden: PositiveInt
    heads: PositiveInt
    kv_heads: PositiveInt = Field(description="KV heads (GQA); defaults to heads")
    head_dim: PositiveInt = Field(description="defaults to hidden / heads")
    ffn: PositiveInt = Field(description="SwiGLU intermediate size")
    vocab: PositiveInt
    rope_theta: Real = Field(10000.0, gt=0)
    rope_scaling: RopeScaling | None = None
    norm_eps: Real = Field(1e-5, gt=0)
    tie_embeddings: Flag = False
    dtype: Literal["float32", "float16", "bfloat16"]
    max_context: Tokens
    weights: str = Field(
        "random:0", min_length=1, description="a Hugging Face checkpoint directory, or random:<seed>"
    )

    @model_validator(mode="before")
    @classmethod
    def _expand_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        preset = data.get("preset")
        if preset is not None:
            if not isinstance(preset, str) or preset not in MODEL_PRESETS:
                raise RuleViolation(("preset",), f"unknown model preset {preset!r}", hint=suggest(str(preset), MODEL_PRESETS))
            data = {**MODEL_PRESETS[preset], "name": preset, **data}
        if "kv_heads" not in data and "heads" in data:
            data = {**data, "kv_heads": data["heads"]}
        hidden, heads = data.get("hidden"), data.get("heads")
        if "head_dim" not in data and isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
            if hidden % heads:
                raise RuleViolation(("head_dim",), f"hidden({hidden}) is not a multiple of heads({heads}); give head_dim")
            data = {**data, "head_dim": hidden // heads}
        return data

    @field_validator("weights")
    @classmethod
    def _weights_form(cls, weights: str) -> str:
        if weights.startswith("random:"):
            seed = weights.removeprefix("random:")
            if not seed.isdigit():
                raise ValueError(f"random weights need a seed: random:<non-negative integer>, got {weights!r}")
        return weights

    @model_validator(mode="after")
    def _check_shape(self) -> ModelSpec:
        if self.heads % self.kv_heads:
            raise RuleViolation(
                ("kv_heads",),
                f"heads({self.heads}) is not a multiple of kv_heads({self.kv_heads})",
                hint="grouped-query attention shares each KV head among heads / kv_heads query heads",
            )
        scaling = self.rope_scaling
        if isinstance(scaling, Llama3RopeScaling) and scaling.original_max_context > self.max_context:
            raise RuleViolation(
                ("rope_scaling", "original_max_context"),
                f"original_max_context({scaling.original_max_context}) exceeds max_context({self.max_context})",
            )
        return self

    @property
    def dtype_bytes(self) -> int:
        return _DTYPE_BYTES[self.dtype]

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of every layer for one token."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def num_parameters(self) -> int:
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * self.ffn
        per_layer = attention + mlp + 2 * self.hidden  # two RMSNorm weights
        embeddings = self.vocab * self.hidden * (1 if self.tie_embeddings else 2)
        return self.layers * per_layer + embeddings + self.hidden

    @property
    def weight_bytes(self) -> int:
        return self.num_parameters * self.dtype_bytes

    @property
    def random_seed(self) -> int | None:
        """The seed of `random:<seed>` weights, or None for a checkpoint directory."""
        return int(self.weights.removeprefix("random:")) if self.weights.startswith("random:") else None


# -------------------------------------------------------------------------------- cluster


class DeviceSpec(_Frozen):
    """One accelerator (or one CPU worker). A preset `name` fills the fields not given."""

    name: str = Field(min_length=1, description=f"a preset ({', '.join(DEVICE_PRESETS)}) or your own name")
    kind: Literal["cuda", "cpu"]
    memory: Bytes
    peak_flops: FlopRate = Field(description="dense bf16/fp16 peak")
    memory_bandwidth: Bandwidth
    link_bandwidth: Bandwidth = Field(description="intra-node link, one direction, one device (NVLink or PCIe)")

    @model_validator(mode="before")
    @classmethod
    def _expand_preset(cls, data: Any) -> Any:
        if isinstance(data, str):
            data = {"name": data}
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            return data
        given: str = data["name"]
        name = DEVICE_ALIASES.get(given, given)
        preset = DEVICE_PRESETS.get(name)
        if preset is None:
            missing = [field for field in cls.model_fields if field not in data]
            if missing:
                raise RuleViolation(
                    ("name",),
                    f"unknown device {name!r} and no {', '.join(missing)} given",
                    hint=suggest(name, list(DEVICE_PRESETS) + list(DEVICE_ALIASES)),
                )
            return data
        if "kind" in data and data["kind"] != preset["kind"]:
            raise RuleViolation(
                ("kind",),
                f"device {name!r} is a {preset['kind']} device, not {data['kind']}",
                hint="write `cpu x N` for CPU workers and `gpu NAME x N` for accelerators",
            )
        return {**preset, **data, "name": name}


class NodeSpec(_Frozen):
    name: str = Field(min_length=1)
    device: DeviceSpec
    devices: PositiveInt = Field(le=1024, description="devices of this kind in the node")


def _divisors(number: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(number) + 1) if number % d == 0]
    return sorted(set(small + [number // d for d in small]))


@dataclass(frozen=True)
class Device:
    """One device of the cluster: its global index, node and index within the node."""

    index: int
    node: str
    local_index: int
    spec: DeviceSpec


class ClusterSpec(_Frozen):
    nodes: tuple[NodeSpec, ...]
    inter_node_bandwidth: Bandwidth | None = Field(None, description="network bandwidth of one node, one direction")
    tp: PositiveInt | None = Field(None, description="tensor parallelism inside one elastic instance; unset = chosen by compile")

    @model_validator(mode="before")
    @classmethod
    def _name_nodes(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("nodes"), (list, tuple)):
            nodes = [
                {"name": f"node{index}", **node} if isinstance(node, dict) and "name" not in node else node
                for index, node in enumerate(data["nodes"])
            ]
            data = {**data, "nodes": nodes}
        return data

    @model_validator(mode="after")
    def _check_topology(self) -> ClusterSpec:
        if not self.nodes:
            raise RuleViolation(("nodes",), "a cluster needs at least one node", hint='e.g. nodes = [{ device = "H100", devices = 8 }]')
        first = self.nodes[0]
        seen: dict[str, int] = {}
        for index, node in enumerate(self.nodes):
            if node.device.kind != first.device.kind:
                raise RuleViolation(
                    ("nodes", index, "device", "kind"),
                    f"{node.name} has {node.device.kind} devices but {first.name} has {first.device.kind}; "
                    "one cluster runs one communication backend",
                )
            if node.name in seen:
                raise RuleViolation(("nodes", index, "name"), f"node name {node.name!r} is also used by nodes[{seen[node.name]}]")
            seen[node.name] = index
            if self.tp is not None and node.devices % self.tp:
                divisors = _divisors(node.devices)
                raise RuleViolation(
                    ("tp",),
                    f"tp({self.tp}) does not divide the {node.devices} devices of nodes[{index}] ({node.name})",
                    hint=f"an instance cannot span nodes; tp can be {', '.join(map(str, divisors))}",
                )
        if len(self.nodes) > 1 and self.inter_node_bandwidth is None:
            raise RuleViolation(
                ("inter_node_bandwidth",),
                f"required with {len(self.nodes)} nodes",
                hint="e.g. 4 x 200Gb/s InfiniBand = 100GB/s",
            )
        return self

    @property
    def device_kind(self) -> str:
        return self.nodes[0].device.kind

    @property
    def num_devices(self) -> int:
        return sum(node.devices for node in self.nodes)

    def devices(self) -> list[Device]:
        indices = itertools.count()
        return [
            Device(next(indices), node.name, local, node.device)
            for node in self.nodes
            for local in range(node.devices)
        ]

    def instances(self, tp: int | None = None) -> list[tuple[Device, ...]]:
        """Elastic instances: groups of `tp` consecutive devices of one node."""
        tp = tp or self.tp or 1
        groups: list[tuple[Device, ...]] = []
        for node_devices in itertools.groupby(self.devices(), key=lambda device: device.node):
            devices = list(node_devices[1])
            if len(devices) % tp:
                raise ValueError(f"tp({tp}) does not divide the {len(devices)} devices of {devices[0].node}")
            groups.extend(tuple(devices[start : start + tp]) for start in range(0, len(devices), tp))
        return groups

    def link_bandwidth(self, a: Device, b: Device) -> float:
        """One direction of the link between two devices (NVLink/PCIe within a node, network across)."""
        if a.node == b.node:
            return min(a.spec.link_bandwidth, b.spec.link_bandwidth)
        assert self.inter_node_bandwidth is not None, "validated: multi-node clusters have a network"
        return self.inter_node_bandwidth

    def topology(self) -> networkx.Graph:
        """Devices as vertices, links as edges with `bandwidth` (B/s, one direction) and `link`."""
        import networkx

        graph = networkx.Graph(name="devices")
        devices = self.devices()
        for device in devices:
            graph.add_node(device.index, node=device.node, local_index=device.local_index, device=device.spec.name)
        for a, b in itertools.combinations(devices, 2):
            link = "intra-node" if a.node == b.node else "inter-node"
            graph.add_edge(a.index, b.index, bandwidth=self.link_bandwidth(a, b), link=link)
        return graph

    def instance_graph(self, tp: int | None = None) -> networkx.Graph:
        """Instances as vertices; an edge's bandwidth is what a ring step between them gets.

        Within a node the tp shards of two instances talk pairwise in parallel (tp links);
        across nodes they share the node's network.
        """
        import networkx

        graph = networkx.Graph(name="instances")
        instances = self.instances(tp)
        for index, devices in enumerate(instances):
            graph.add_node(index, node=devices[0].node, devices=tuple(d.index for d in devices))
        for (i, a), (j, b) in itertools.combinations(enumerate(instances), 2):
            if a[0].node == b[0].node:
                bandwidth = len(a) * self.link_bandwidth(a[0], b[0])
            else:
                bandwidth = self.link_bandwidth(a[0], b[0])
            graph.add_edge(i, j, bandwidth=bandwidth)
        return graph


# ------------------------------------------------------------------------------- shorthand


class _Shorthand(_Frozen):
    """A model that reads from and writes to a one-line call form, e.g. `zipf(1.0, 10, 200K)`.

    The first field is the discriminating tag (the call's name); `call_parameters` gives
    the positional order of the call's arguments.
    """

    call_parameters: ClassVar[tuple[str, ...]] = ()

    def shorthand(self) -> str:
        # The JSON dump goes through `_as_shorthand` below, which returns the call string.
        return cast(str, self.model_dump(mode="json"))

    @classmethod
    def tag_field(cls) -> str:
        return next(iter(cls.model_fields))

    @model_serializer(mode="wrap", when_used="json")
    def _as_shorthand(self, handler: Any) -> str:
        values = handler(self)
        tag = values[self.tag_field()]
        arguments = ", ".join(f"{name}={_shorthand_value(values[name])}" for name in self.call_parameters)
        return f"{tag}({arguments})" if arguments else tag


def _shorthand_value(value: object) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def _from_shorthand(members: tuple[type[_Shorthand], ...], what: str) -> Any:
    """A before-validator turning `name(args)` strings into the dict of the matching member."""
    by_tag: dict[str, type[_Shorthand]] = {}
    for member in members:
        annotation = member.model_fields[member.tag_field()].annotation
        assert annotation is not None  # the tag field of every shorthand model is annotated Literal[...]
        by_tag.update((tag, member) for tag in annotation.__args__)

    def parse(value: Any) -> Any:
        if not isinstance(value, str):
            return value
        call = parse_call(value)
        member = by_tag.get(call.name)
        if member is None:
            raise ShorthandError(f"unknown {what} {call.name!r}", hint=suggest(call.name, by_tag))
        parameters = member.call_parameters
        usage = f"{call.name}({', '.join(parameters)})"
        if len(call.positional) > len(parameters):
            raise ShorthandError(f"{usage} takes {len(parameters)} arguments, got {len(call.positional)} in {value!r}")
        data = {member.tag_field(): call.name, **dict(zip(parameters, call.positional))}
        for name, argument in call.keyword.items():
            if name not in parameters:
                raise ShorthandError(f"{usage} has no argument {name!r}")
            if name in data:
                raise ShorthandError(f"argument {name!r} of {usage} is given twice in {value!r}")
            data[name] = argument
        return data

    return parse


# ------------------------------------------------------------------------------------- slo


class LatencySLO(_Frozen):
    """A latency bound: `limit`, or `max(prefill_multiple x isolated prefill time, limit)`."""

    limit: Duration = Field(description="the bound, or its floor when prefill_multiple is set")
    prefill_multiple: Real | None = Field(None, gt=0, description="scale with the request's isolated prefill time")
    percentile: Real = Field(90.0, gt=0, le=100)

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, data: Any) -> Any:
        if not isinstance(data, str):
            return data
        bound = parse_bound(data)
        result: dict[str, Any] = {"limit": bound.limit}
        if bound.prefill_multiple is not None:
            result["prefill_multiple"] = bound.prefill_multiple
        if bound.percentile is not None:
            percentile = number_or_text(bound.percentile[1:]) if bound.percentile.startswith("p") else None
            if not isinstance(percentile, (int, float)):
                raise ShorthandError(f"write the percentile as p<number>, e.g. p90, not {bound.percentile!r}")
            result["percentile"] = percentile
        return result

    def target(self, isolated_prefill_seconds: float = 0.0) -> float:
        """The bound in seconds for a request whose prefill alone takes the given time."""
        if self.prefill_multiple is None:
            return self.limit
        return max(self.prefill_multiple * isolated_prefill_seconds, self.limit)

    def shorthand(self) -> str:
        limit = units.format_quantity(self.limit, Kind.DURATION)
        percentile = f"p{self.percentile:g}"
        if self.prefill_multiple is None:
            return f"{limit} at {percentile}"
        multiple = f"{self.prefill_multiple:g}x prefill"
        if self.limit == 0:
            return f"{multiple} at {percentile}"
        return f"max({multiple}, {limit}) at {percentile}"

    @model_serializer(mode="wrap", when_used="json")
    def _as_shorthand(self, handler: Any) -> str:
        return self.shorthand()


class SLOSpec(_Frozen):
    ttft: LatencySLO = Field(description="time to first token, e.g. max(25x prefill, 15s) at p90")
    tpot: LatencySLO = Field(description="time per output token, e.g. 50ms at p90")
    attainment: Fraction = Field(0.9, description="share of requests that must meet both bounds (goodput)")

    @model_validator(mode="after")
    def _tpot_is_absolute(self) -> SLOSpec:
        if self.tpot.prefill_multiple is not None:
            raise RuleViolation(("tpot",), "only ttft can scale with the prefill time; give tpot as a duration, e.g. 50ms at p90")
        return self


# -------------------------------------------------------------------------------- workload


class DatasetLengths(_Shorthand):
    """Prompt and output lengths drawn like a published dataset (LoongServe's workloads)."""

    dist: Literal["sharegpt", "leval", "lveval", "mixed"]

    @property
    def max_tokens(self) -> int:
        return DATASET_INPUT_RANGES[self.dist][1]


class ZipfLengths(_Shorthand):
    dist: Literal["zipf"]
    alpha: Real = Field(gt=0)
    min: Tokens
    max: Tokens
    call_parameters = ("alpha", "min", "max")

    @model_validator(mode="after")
    def _ordered(self) -> ZipfLengths:
        if self.min >= self.max:
            raise RuleViolation(("max",), f"max({self.max}) must exceed min({self.min})")
        return self

    @property
    def max_tokens(self) -> int:
        return self.max


class UniformLengths(_Shorthand):
    dist: Literal["uniform"]
    min: Tokens
    max: Tokens
    call_parameters = ("min", "max")

    @model_validator(mode="after")
    def _ordered(self) -> UniformLengths:
        if self.min > self.max:
            raise RuleViolation(("max",), f"max({self.max}) is below min({self.min})")
        return self

    @property
    def max_tokens(self) -> int:
        return self.max


class FixedLengths(_Shorthand):
    dist: Literal["fixed"]
    tokens: Tokens
    call_parameters = ("tokens",)

    @property
    def max_tokens(self) -> int:
        return self.tokens


_LENGTH_MEMBERS = (DatasetLengths, ZipfLengths, UniformLengths, FixedLengths)
LengthDist = Annotated[
    DatasetLengths | ZipfLengths | UniformLengths | FixedLengths,
    Field(discriminator="dist"),
    BeforeValidator(_from_shorthand(_LENGTH_MEMBERS, "length distribution")),
]


class PoissonArrival(_Shorthand):
    process: Literal["poisson"]
    rate: Real = Field(gt=0, description="requests per second")
    call_parameters = ("rate",)


class GammaArrival(_Shorthand):
    """Bursty arrivals: gamma inter-arrival times with coefficient of variation `cv`."""

    process: Literal["gamma"]
    rate: Real = Field(gt=0, description="requests per second")
    cv: Real = Field(gt=0)
    call_parameters = ("rate", "cv")


class TraceArrival(_Shorthand):
    """Replay the trace's own timestamps, compressed or stretched by `rate_scale`."""

    process: Literal["trace"]
    rate_scale: Real = Field(1.0, gt=0)
    call_parameters = ("rate_scale",)


_ARRIVAL_MEMBERS = (PoissonArrival, GammaArrival, TraceArrival)
Arrival = Annotated[
    PoissonArrival | GammaArrival | TraceArrival,
    Field(discriminator="process"),
    BeforeValidator(_from_shorthand(_ARRIVAL_MEMBERS, "arrival process")),
]

_TRACE_SUFFIXES = {".csv": "azure", ".jsonl": "mooncake"}


class TraceSpec(_Frozen):
    """A request trace: Azure LLM inference CSV or Mooncake JSONL. Relative paths are
    resolved against the spec file's directory."""

    path: str = Field(min_length=1)
    format: Literal["azure", "mooncake"]
    limit: PositiveInt | None = Field(None, description="replay only the first N requests")

    @model_validator(mode="before")
    @classmethod
    def _infer_format(cls, data: Any) -> Any:
        if isinstance(data, str):
            data = {"path": data}
        if isinstance(data, dict) and "format" not in data and isinstance(data.get("path"), str):
            suffix = PurePath(data["path"]).suffix
            if suffix not in _TRACE_SUFFIXES:
                what = f"the suffix {suffix!r}" if suffix else "a path without a suffix"
                raise RuleViolation(
                    ("format",), f"cannot tell the trace format from {what}",
                    hint='set format = "azure" (CSV) or "mooncake" (JSONL)',
                )
            data = {**data, "format": _TRACE_SUFFIXES[suffix]}
        return data


# The block size of every workload's `Request.prefix_hashes` (Mooncake's); the planner's
# workload module exports it as PREFIX_BLOCK_TOKENS.
PREFIX_BLOCK_TOKENS = 512


class PrefixSpec(_Frozen):
    """Prefix structure of a synthetic workload: what prefix caching can reuse.

    A shared system prompt (`shared_tokens`, one of `groups` prompts per session) starts
    every prompt, and sessions of `turns` requests extend each other: turn k+1's prompt is
    turn k's prompt and output plus a new user message. Prompts are cut into 512-token
    blocks; only full blocks are shareable. The defaults declare no structure.
    """

    shared_tokens: NonNegativeTokens = Field(
        0, description="system prompt before every prompt's drawn length; only its full 512-token blocks are shareable",
    )
    groups: PositiveInt = Field(1, description="distinct system prompts; each session draws one uniformly")
    turns: PositiveInt = Field(
        1, description="requests per session: each turn's prompt is the previous turn's prompt and output plus a new message",
    )
    think_time: Duration | None = Field(
        None, description="from one turn's arrival to the next turn's (required with turns > 1)",
    )

    @model_validator(mode="after")
    def _consistent(self) -> PrefixSpec:
        if 0 < self.shared_tokens < PREFIX_BLOCK_TOKENS:
            raise RuleViolation(
                ("shared_tokens",),
                f"shared_tokens({self.shared_tokens}) < one {PREFIX_BLOCK_TOKENS}-token block: nothing of it is shareable",
                hint=f"use 0 or at least {PREFIX_BLOCK_TOKENS}",
            )
        if self.groups > 1 and self.shared_tokens == 0:
            raise RuleViolation(("groups",), f"groups({self.groups}) of system prompts need shared_tokens > 0")
        if self.turns > 1 and self.think_time is None:
            raise RuleViolation(("think_time",), f"turns({self.turns}) need the time between turns", hint='e.g. think_time = "20s"')
        if self.turns == 1 and self.think_time is not None:
            raise RuleViolation(("think_time",), "think_time is the time between turns; it needs turns > 1")
        return self

    @property
    def declared(self) -> bool:
        """Whether it declares any structure (the defaults declare none)."""
        return self.shared_tokens > 0 or self.turns > 1


class WorkloadSpec(_Frozen):
    """Either synthetic lengths with an arrival process, or a trace."""

    lengths: LengthDist | None = Field(None, description="prompt lengths: sharegpt, leval, lveval, mixed, zipf(alpha, min, max), uniform(min, max), fixed(tokens)")
    outputs: LengthDist | None = Field(None, description="output lengths; default: the dataset's own (sharegpt's for synthetic prompts)")
    trace: TraceSpec | None = None
    arrival: Arrival = Field(description="poisson(rate), gamma(rate, cv) or trace(rate_scale)")
    requests: PositiveInt = 1000
    seed: NonNegativeInt = 0
    prefix: PrefixSpec = Field(
        PrefixSpec(), description="synthetic prefix structure: shared system prompts, multi-turn sessions",
    )

    @model_validator(mode="after")
    def _one_source(self) -> WorkloadSpec:
        if self.trace is None and self.lengths is None:
            raise RuleViolation(("lengths",), "give prompt lengths (e.g. lengths = \"mixed\") or a trace")
        if self.trace is not None:
            for field in ("lengths", "outputs"):
                if getattr(self, field) is not None:
                    raise RuleViolation((field,), f"a trace carries its own lengths; remove {field} or the trace")
            if self.prefix.declared:
                raise RuleViolation(
                    ("prefix",), "a trace carries its own prefix structure (Mooncake's hash_ids); remove prefix or the trace",
                )
        elif isinstance(self.arrival, TraceArrival):
            raise RuleViolation(("arrival",), "trace arrivals need a trace", hint="add trace = \"path/to/trace.csv\"")
        return self

    @property
    def max_output_tokens(self) -> int | None:
        """The longest output the synthetic lengths draw; None for a trace."""
        if self.lengths is None:
            return None
        if self.outputs is None:
            # The dataset's own outputs; synthetic prompts get ShareGPT's.
            return DATASET_OUTPUT_MAX[self.lengths.dist if isinstance(self.lengths, DatasetLengths) else "sharegpt"]
        return _most_output_tokens(self.outputs)


def _most_output_tokens(outputs: LengthDist) -> int:
    """The longest output `outputs` draws: a named dataset gives its answers' lengths, not its prompts'."""
    return DATASET_OUTPUT_MAX[outputs.dist] if isinstance(outputs, DatasetLengths) else outputs.max_tokens


# ---------------------------------------------------------------------- policy and runtime

Strategy = Literal["auto", "elastic", "static-sp", "static-tp", "chunked", "disaggregated"]


class PolicySpec(_Frozen):
    """What `espc compile` may choose from, and the knobs of each strategy."""

    strategy: Strategy = Field("auto", description="auto evaluates every strategy and keeps the best")
    max_dop: PositiveInt | None = Field(None, description="elastic: most instances one prefill may span")
    scale_up: Flag = Field(True, description="elastic: multi-master decode across instances")
    migration: Flag = Field(True, description="elastic: explicit KV migration when it pays off")
    cooldown_iterations: NonNegativeInt = Field(8, description="elastic: iterations before a scaling decision is reversed")
    starvation_bound: Duration = Field(30.0, description="longest a queued request may be bypassed")
    goodput_metric: Literal["auto", "p90", "per-class"] = Field(
        "auto",
        description="what compile maximises: p90 (the rate at which the attainment target holds over all "
        "requests), per-class (it holds in every prompt-length class: long requests cannot be dropped); "
        "auto: per-class when some prompt needs more KV than one instance holds, else p90",
    )
    sp_size: PositiveInt | None = Field(None, description="static-sp: instances per group; unset = searched")
    chunk_tokens: Tokens = Field(2048, description="chunked: token budget per iteration")
    prefill_instances: PositiveInt | None = Field(None, description="disaggregated: prefill pool size")
    decode_instances: PositiveInt | None = Field(None, description="disaggregated: decode pool size")
    length_buckets: PositiveInt = Field(8, description="MILP: prompt-length buckets")
    solver: Literal["HIGHS", "GLPK_MI", "CBC"] = "HIGHS"
    solver_time_limit: Duration = Field(60.0, gt=0)


class RuntimeSpec(_Frozen):
    backend: Literal["nccl", "gloo"] = Field(description="default: nccl on cuda, gloo on cpu")
    attention: Literal["triton", "torch"] = Field(description="default: triton on cuda, torch on cpu")
    kv_block_size: PositiveInt = Field(16, description="tokens per KV block")
    memory_fraction: Fraction = Field(0.9, description="share of device memory espc may use")
    prefix_caching: Flag = Field(
        True,
        description="reuse the KV of repeated prompt prefixes: a finished request's KV stays cached (LRU-evicted when "
        "an instance needs room) and a later prompt that starts with the same blocks borrows it instead of prefilling them",
    )


class ServingSpec(_Frozen):
    """Admission control of `espc.Engine` and `espc serve` (Mooncake's early rejection): a
    request that cannot be served well is refused at once, with its reason, instead of
    queueing behind work it can never overtake and slowing everyone down."""

    max_queued_requests: PositiveInt = Field(
        1024, description="requests that may wait for their first prefill at once; more are refused (HTTP 429)",
    )
    reject_unreachable_ttft: Flag = Field(
        False,
        description="refuse (HTTP 429) a request when the prefill work queued before it, spread over the instances "
        "in service, plus its own prefill already exceeds its ttft target (cost-model estimate: calibrate first)",
    )


_RUNTIME_DEFAULTS = {
    "cuda": {"backend": "nccl", "attention": "triton"},
    "cpu": {"backend": "gloo", "attention": "torch"},
}


def _declared_device_kind(raw_cluster: Any) -> str | None:
    """The device kind of raw (unvalidated) cluster data, if it can be told."""
    try:
        device = raw_cluster["nodes"][0]["device"]
        if isinstance(device, dict):
            device = device.get("kind") or device["name"]
        return device if device in _RUNTIME_DEFAULTS else DEVICE_PRESETS[DEVICE_ALIASES.get(device, device)]["kind"]
    except (KeyError, IndexError, TypeError):
        return None


# ------------------------------------------------------------------------------------ spec


class Spec(_Frozen):
    """Everything `espc compile` and `espc run` need to know."""

    model: ModelSpec
    cluster: ClusterSpec
    slo: SLOSpec
    workload: WorkloadSpec
    policy: PolicySpec = PolicySpec()
    runtime: RuntimeSpec = Field(default=None, validate_default=True)  # filled per device kind
    serving: ServingSpec = ServingSpec()

    @model_validator(mode="before")
    @classmethod
    def _runtime_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        # An unreadable cluster is reported on its own; cpu defaults keep runtime quiet then.
        kind = _declared_device_kind(data.get("cluster")) or "cpu"
        runtime = data.get("runtime", {})
        if isinstance(runtime, dict):
            data = {**data, "runtime": {**_RUNTIME_DEFAULTS[kind], **runtime}}
        return data

    @model_validator(mode="after")
    def _check_fit(self) -> Spec:
        model, cluster, runtime = self.model, self.cluster, self.runtime
        tp = cluster.tp
        if tp is not None:
            if model.heads % tp:
                raise RuleViolation(("cluster", "tp"), f"tp({tp}) does not divide model.heads({model.heads})")
            if model.kv_heads % tp and tp % model.kv_heads:
                raise RuleViolation(
                    ("cluster", "tp"),
                    f"tp({tp}) and model.kv_heads({model.kv_heads}): neither divides the other",
                    hint="each tp shard holds kv_heads / tp KV heads, or replicates one when tp > kv_heads",
                )
        self._check_memory()
        if cluster.device_kind == "cpu":
            if runtime.backend == "nccl":
                raise RuleViolation(("runtime", "backend"), "nccl needs cuda devices; the cluster has cpu devices", hint='use backend = "gloo"')
            if runtime.attention == "triton":
                raise RuleViolation(
                    ("runtime", "attention"), "triton attention needs cuda devices; the cluster has cpu devices",
                    hint='use attention = "torch"',
                )
        self._check_policy(tp)
        self._check_workload_fits()
        return self

    def _check_workload_fits(self) -> None:
        workload, max_context = self.workload, self.model.max_context
        for field in ("lengths", "outputs"):
            lengths = getattr(workload, field)
            if lengths is None:
                continue
            tokens = lengths.max_tokens if field == "lengths" else _most_output_tokens(lengths)
            if tokens > max_context:
                raise RuleViolation(
                    ("workload", field),
                    f"{lengths.shorthand()} reaches {tokens:,} tokens > model.max_context ({max_context:,})",
                    hint="lower the distribution's max or raise max_context",
                )
        prefix = workload.prefix
        if workload.lengths is None or not prefix.declared:
            return
        message, output = workload.lengths.max_tokens, workload.max_output_tokens
        assert output is not None  # synthetic lengths
        longest = prefix.shared_tokens + prefix.turns * message + (prefix.turns - 1) * output
        if longest > max_context:
            replies = prefix.turns - 1
            turns = (
                f" + {prefix.turns} messages × {message:,} + {replies} repl{'ies' if replies > 1 else 'y'} × {output:,}"
                if replies else f" + {message:,}"
            )
            raise RuleViolation(
                ("workload", "prefix"),
                f"the longest prompt reaches shared_tokens({prefix.shared_tokens:,}){turns} = {longest:,} tokens "
                f"> model.max_context ({max_context:,})",
                hint="fewer turns, a shorter shared prompt or shorter lengths, or raise max_context",
            )

    def _check_memory(self) -> None:
        model, cluster, fraction = self.model, self.cluster, self.runtime.memory_fraction
        # Without a fixed tp, the check assumes the widest tp a node allows.
        tp = cluster.tp or min(node.devices for node in cluster.nodes)
        weights = model.weight_bytes / tp
        kv_capacity = 0.0
        for index, node in enumerate(cluster.nodes):
            usable = fraction * node.device.memory
            if weights > usable:
                raise RuleViolation(
                    ("cluster", "tp") if cluster.tp else ("cluster", "nodes", index, "device", "memory"),
                    f"weights {units.describe(model.weight_bytes, Kind.BYTES)} / tp({tp}) = {units.describe(weights, Kind.BYTES)} per device "
                    f"exceed memory_fraction({fraction:g}) × {units.describe(node.device.memory, Kind.BYTES)} = {units.describe(usable, Kind.BYTES)}",
                    hint="raise tp, use larger devices or a smaller model",
                )
            kv_capacity += node.devices * (usable - weights)
        needed = model.max_context * model.kv_bytes_per_token
        if needed > kv_capacity:
            raise RuleViolation(
                ("model", "max_context"),
                f"one {model.max_context:,}-token request needs {model.max_context:,} × "
                f"{units.describe(model.kv_bytes_per_token, Kind.BYTES)} = {units.describe(needed, Kind.BYTES)} of KV cache, "
                f"but the cluster holds {units.describe(kv_capacity, Kind.BYTES)} after weights "
                f"({cluster.num_devices} devices × (memory_fraction({fraction:g}) × memory − {units.describe(weights, Kind.BYTES)} of weights))",
                hint="lower max_context or add devices",
            )

    def _check_policy(self, tp: int | None) -> None:
        if tp is None:
            return
        policy = self.policy
        instances = self.cluster.num_devices // tp
        where = f"instances({instances}) = devices({self.cluster.num_devices}) / tp({tp})"
        if policy.max_dop is not None and policy.max_dop > instances:
            raise RuleViolation(("policy", "max_dop"), f"max_dop({policy.max_dop}) > {where}")
        if policy.sp_size is not None and instances % policy.sp_size:
            raise RuleViolation(("policy", "sp_size"), f"sp_size({policy.sp_size}) does not divide {where}")
        prefill, decode = policy.prefill_instances, policy.decode_instances
        if prefill is not None and decode is not None and prefill + decode != instances:
            raise RuleViolation(("policy", "decode_instances"), f"prefill_instances({prefill}) + decode_instances({decode}) ≠ {where}")
        for field, count in (("prefill_instances", prefill), ("decode_instances", decode)):
            if count is not None and count >= instances:
                raise RuleViolation(("policy", field), f"{field}({count}) leaves no instance for the other pool: {where}")
