"""Wanda (Sun et al., 2023, https://arxiv.org/abs/2306.11695): score |W_ij| * ||X_j||_2, no weight update.

``scaler_row`` is the running mean over calibration sequences of each input feature's summed squared activation,
as the reference ``WrappedGPT.add_batch`` keeps it. Unstructured masks compare within each output row (the paper's
choice; ``scope="layer"`` compares over the matrix); N:M masks compare within groups of M input columns.
"""

from __future__ import annotations

import torch

from ..sparsity import SparsityPattern, pattern_mask
from .base import Pruner, PruneResult, RunningMean, sequences_and_rows
from .registry import register_pruner


def accumulate_row_scalars(stats: RunningMean, inp: torch.Tensor) -> None:
    """Fold a batch of inputs ``(..., in)`` into the running per-feature squared norm."""
    count, rows = sequences_and_rows(inp)
    stats.add(rows.square().sum(0), count)


def wanda_prune(
    weight: torch.Tensor, scaler_row: torch.Tensor, pattern: SparsityPattern
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (pruned weight, keep mask) for the Wanda score ``|W| * sqrt(scaler_row)``."""
    mask = pattern_mask(weight.abs() * scaler_row.sqrt().unsqueeze(0), pattern)
    return weight * mask, mask


@register_pruner("wanda")
class WandaPruner(Pruner):
    def new_stats(self, in_features: int, device: torch.device) -> RunningMean:
        return RunningMean(torch.zeros(in_features, device=device))

    def accumulate(self, stats: RunningMean, inp: torch.Tensor) -> None:
        accumulate_row_scalars(stats, inp)

    def prune(self, weight: torch.Tensor, stats: RunningMean) -> PruneResult:
        return PruneResult(*wanda_prune(weight, stats.value.to(weight.device), self.pattern))
