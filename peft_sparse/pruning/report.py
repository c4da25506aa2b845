"""What a pruning run did, per layer and in total (JSON-able)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LayerReport:
    """One pruned linear layer.

    ``error`` is the relative reconstruction error ``||X (W - W')^T||^2 / ||X W^T||^2`` on the first calibration
    sample's input to the layer (``None`` when pruned without data).
    """

    name: str
    shape: tuple[int, int]
    sparsity: float
    error: float | None
    seconds: float


@dataclass
class PruneReport:
    method: str
    pattern: str
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def numel(self) -> int:
        return sum(layer.shape[0] * layer.shape[1] for layer in self.layers)

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over all pruned layers."""
        zeros = sum(layer.sparsity * layer.shape[0] * layer.shape[1] for layer in self.layers)
        return zeros / self.numel if self.numel else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.update(numel=self.numel, sparsity=self.sparsity)
        return data
