"""What a pruner is: statistics accumulated from layer inputs, then a pure function of (weight, statistics).

The engine owns the forward loop and the module bookkeeping; a pruner only sees tensors. Weights reach a pruner as
fp32 ``(out, in)`` matrices (transformers ``Conv1D`` weights are transposed by the engine) and activations as
``(..., in)`` tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..sparsity import SparsityPattern
from .registry import NoOptions


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

    def prune(self, weight: torch.Tensor, stats: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (pruned fp32 weight, bool keep mask) for an fp32 ``(out, in)`` weight."""
        raise NotImplementedError
