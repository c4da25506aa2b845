"""What a pruning run did, per layer and in total (JSON-able)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LayerReport:
    """One pruned linear layer.

    ``error`` is the relative reconstruction error ``||X (W - W')^T||^2 / ||X W^T||^2`` on the first calibration
    sample's input to the layer (``None`` when pruned without data); ``W'`` includes any recover matrix.
    ``sparsity`` is that of the N:M weight; ``extra_nonzeros`` counts the weights kept beside it (WRP's recover
    matrix), which a dense save adds back into the weight.
    """

    name: str
    shape: tuple[int, int]
    sparsity: float
    error: float | None
    seconds: float
    extra_nonzeros: int = 0

    @property
    def extra_density(self) -> float:
        return self.extra_nonzeros / (self.shape[0] * self.shape[1])


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

    @property
    def extra_nonzeros(self) -> int:
        return sum(layer.extra_nonzeros for layer in self.layers)

    @property
    def extra_density(self) -> float:
        """Extra non-zeros (recover matrices) as a fraction of all pruned layers' weights."""
        return self.extra_nonzeros / self.numel if self.numel else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for layer, entry in zip(self.layers, data["layers"]):
            entry["extra_density"] = layer.extra_density
        data.update(
            numel=self.numel,
            sparsity=self.sparsity,
            extra_nonzeros=self.extra_nonzeros,
            extra_density=self.extra_density,
        )
        return data
