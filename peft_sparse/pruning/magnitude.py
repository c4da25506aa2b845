"""Magnitude pruning: keep the largest |W|. No calibration data.

For unstructured sparsity ``scope="layer"`` uses one threshold per matrix, the baseline of the Wanda and SparseGPT
papers; ``scope="row"`` compares within each output row.
"""

from __future__ import annotations

from typing import Any

import torch

from ..sparsity import SparsityPattern, pattern_mask
from .base import Pruner, PruneResult
from .registry import register_pruner


def magnitude_prune(weight: torch.Tensor, pattern: SparsityPattern) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (pruned weight, keep mask) keeping the largest magnitudes under ``pattern``."""
    mask = pattern_mask(weight.abs(), pattern)
    return weight * mask, mask


@register_pruner("magnitude")
class MagnitudePruner(Pruner):
    needs_data = False

    def prune(self, weight: torch.Tensor, stats: Any) -> PruneResult:
        return PruneResult(*magnitude_prune(weight, self.pattern))
