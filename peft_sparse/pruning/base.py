"""What a pruner is: statistics accumulated from layer inputs, then a pure function of (weight, statistics).

The engine owns the forward loop and the module bookkeeping; a pruner only sees tensors. Weights reach a pruner as
fp32 ``(out, in)`` matrices (transformers ``Conv1D`` weights are transposed by the engine) and activations as
``(..., in)`` tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..sparsity import SparsityPattern
from .registry import NoOptions


@dataclass
class PruneResult:
    """What a pruner returns for one layer: the fp32 ``(out, in)`` weight, its bool keep mask, and extra tensors.

    ``extras`` carries per-layer artefacts beyond the N:M weight, e.g. WRP's ``"recover"`` matrix; the engine turns
    them into a module (see :mod:`peft_sparse.nn`) and counts their non-zeros in the report. ``grid`` is
    ``(scale, zero)`` when the kept values were quantized (:mod:`peft_sparse.quantization.grid`); the engine stores
    the weight's codes dequantized in the model's dtype and records the grid on the layer.
    """

    weight: torch.Tensor
    mask: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    grid: tuple[torch.Tensor, torch.Tensor | None] | None = None


@dataclass
class RunningMean:
    """Running mean over calibration *sequences* of a per-sequence sum, as the Wanda/SparseGPT wrappers keep it.

    ``add(batch_sum, count)`` rescales the old mean by ``n / (n + count)`` and adds ``batch_sum / (n + count)``,
    so the result does not depend on how the samples were batched.
    """

    value: torch.Tensor
    count: int = 0

    def add(self, batch_sum: torch.Tensor, count: int) -> None:
        total = self.count + count
        self.value.mul_(self.count / total).add_(batch_sum, alpha=1.0 / total)
        self.count = total


def sequences_and_rows(inp: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Split a linear layer's input ``(..., in)`` into (number of sequences, fp32 ``(tokens, in)`` rows).

    A 2-D input counts as one sequence, as in the reference wrappers.
    """
    count = inp.shape[0] if inp.dim() > 2 else 1
    return count, inp.reshape(-1, inp.shape[-1]).float()


class Pruner:
    """Base class of registered pruners. Subclasses set ``Options`` and override the three hooks they need."""

    Options: ClassVar[type] = NoOptions
    needs_data: ClassVar[bool] = True
    name: ClassVar[str]

    def __init__(self, options: Any, pattern: SparsityPattern) -> None:
        self.options = options
        self.pattern = pattern

    def new_stats(self, in_features: int, device: torch.device) -> Any:
        """Empty statistics for a layer with ``in_features`` inputs (``None`` for data-free pruners)."""
        return None

    def accumulate(self, stats: Any, inp: torch.Tensor) -> None:
        """Fold one batch of layer inputs ``(..., in)`` into ``stats``."""

    def prune(self, weight: torch.Tensor, stats: Any) -> PruneResult:
        """Prune an fp32 ``(out, in)`` weight given its statistics."""
        raise NotImplementedError

    def prune_layer(self, name: str, weight: torch.Tensor, stats: Any) -> PruneResult:
        """What the engine calls; composites (a pruner plus a refiner) use ``name`` to choose the layers they refine."""
        return self.prune(weight, stats)


class Refiner:
    """Base class of registered refiners: statistics like a pruner's, then a pure function of the start result."""

    Options: ClassVar[type] = NoOptions
    name: ClassVar[str]

    def __init__(self, options: Any, pattern: SparsityPattern) -> None:
        self.options = options
        self.pattern = pattern

    def new_stats(self, in_features: int, device: torch.device) -> Any:
        raise NotImplementedError

    def accumulate(self, stats: Any, inp: torch.Tensor) -> None:
        raise NotImplementedError

    def applies_to(self, name: str) -> bool:
        """Whether the layer called ``name`` is refined (the others keep the start pruner's result)."""
        return True

    def refine(self, dense: torch.Tensor, start: PruneResult, stats: Any) -> PruneResult:
        raise NotImplementedError


class Refined(Pruner):
    """A pruner followed by a refiner, as one pruner: both statistics are collected in the same calibration pass.

    The statistics are a pair, so the engine's sharing between layers fed the same input (q/k/v, gate/up) and the
    start pruner's own caches (SparseGPT's prepared inverse) work unchanged. The pair always needs data.
    """

    needs_data = True

    def __init__(self, pruner: Pruner, refiner: Refiner) -> None:
        super().__init__(pruner.options, pruner.pattern)
        self.pruner = pruner
        self.refiner = refiner
        self.name = f"{pruner.name}+{refiner.name}"

    def new_stats(self, in_features: int, device: torch.device) -> tuple[Any, Any]:
        return self.pruner.new_stats(in_features, device), self.refiner.new_stats(in_features, device)

    def accumulate(self, stats: tuple[Any, Any], inp: torch.Tensor) -> None:
        self.pruner.accumulate(stats[0], inp)
        self.refiner.accumulate(stats[1], inp)

    def prune(self, weight: torch.Tensor, stats: tuple[Any, Any]) -> PruneResult:
        return self.refiner.refine(weight, self.pruner.prune(weight, stats[0]), stats[1])

    def prune_layer(self, name: str, weight: torch.Tensor, stats: tuple[Any, Any]) -> PruneResult:
        if self.refiner.applies_to(name):
            return self.prune(weight, stats)
        return self.pruner.prune(weight, stats[0])
