"""The graph cache of a `Lowering`: one finished GraphModule per rank shape signature (`Role`),
and the communication signatures of plans whose per-rank graphs were already proven to match."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

import torch.fx as fx


@dataclass
class GraphCache:
    graphs: dict[Hashable, fx.GraphModule] = field(default_factory=dict)
    verified: set[Hashable] = field(default_factory=set)
    hits: int = 0
    misses: int = 0

    def get(self, role: Hashable) -> fx.GraphModule | None:
        graph = self.graphs.get(role)
        if graph is None:
            self.misses += 1
        else:
            self.hits += 1
        return graph

    def put(self, role: Hashable, graph: fx.GraphModule) -> None:
        self.graphs[role] = graph

    @property
    def hit_rate(self) -> float:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0

    def clear(self) -> None:
        self.graphs.clear()
        self.verified.clear()
        self.hits = self.misses = 0

    def __str__(self) -> str:
        return (
            f"graph cache: {len(self.graphs)} graphs, {len(self.verified)} verified plan shapes, "
            f"{self.hits} hits / {self.misses} misses ({self.hit_rate:.1%})"
        )
