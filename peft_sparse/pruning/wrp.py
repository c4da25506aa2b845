"""WRP, Weight Recover Prune (Tan et al., ACL 2024 submission; TanZhendong/WRP): N:M plus a very sparse recover matrix.

After the Wanda N:M mask, the most important weights that the mask removed are kept, at their original values, in a
separate recover matrix ``W_rec`` (disjoint from the N:M support), so the layer computes ``x W_N:M^T + x W_rec^T``:

* element form (paper Algorithm 1): per row, the top ``int(alpha * in)`` weights by Wanda metric over the *whole*
  row, intersected with the pruned set. So ``alpha`` is not the fraction recovered: most of the top weights were
  kept by N:M anyway (``alpha=0.25`` recovers about 1.5% of the weights on LLaMA-2-7B);
* block form (paper Algorithm 2): the metric of kept weights set to zero, the matrix tiled into ``b x b`` blocks,
  the ``k`` blocks with the largest summed metric per block row chosen, and every pruned weight inside them
  recovered (a Blocked-ELL matrix).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..sparsity import SparsityPattern, pattern_mask
from .base import PruneResult, RunningMean
from .registry import PrunerOptions, register_pruner
from .wanda import WandaPruner


@dataclass(frozen=True)
class WRPOptions(PrunerOptions):
    """Args:
    alpha: element form: fraction of each row, by Wanda metric, whose pruned members are recovered (in [0, 1]).
    block_size: block form: side ``b`` of the square blocks; must divide both dimensions of every layer.
    blocks_per_row: block form: blocks ``k`` recovered per block row (at most ``in / b``).
    Give ``block_size`` and ``blocks_per_row`` together for the block form; ``alpha`` is then not used.
    """

    alpha: float = 0.25
    block_size: int | None = None
    blocks_per_row: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 1:
            raise ValueError(f"wrp alpha must be a number in [0, 1] (e.g. 0.25), got {self.alpha!r}.")
        if (self.block_size is None) != (self.blocks_per_row is None):
            raise ValueError(
                "wrp block form needs both block_size and blocks_per_row (e.g. block_size=32, blocks_per_row=4); "
                f"got block_size={self.block_size!r}, blocks_per_row={self.blocks_per_row!r}."
            )
        for name in ("block_size", "blocks_per_row"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"wrp {name} must be a positive integer, got {value!r}.")

    @property
    def blocked(self) -> bool:
        return self.block_size is not None

    def check_layer(self, shape: tuple[int, int], name: str) -> None:
        """The block form needs ``b`` to divide both dimensions and ``k`` blocks to fit in a block row."""
        if not self.blocked:
            return
        out_features, in_features = shape
        b, k = self.block_size, self.blocks_per_row
        if out_features % b or in_features % b:
            raise ValueError(
                f"{name}: wrp block_size={b} does not divide its shape (out={out_features}, in={in_features}); "
                "choose a block size that divides every layer's dimensions (e.g. 16 or 32), or ignore this layer."
            )
        if k > in_features // b:
            raise ValueError(
                f"{name}: wrp blocks_per_row={k} exceeds the {in_features // b} blocks of size {b} in a row; "
                f"use blocks_per_row <= {in_features // b}."
            )


def top_per_row(metric: torch.Tensor, top: int) -> torch.Tensor:
    """Bool mask of each row's ``top`` largest entries, ties going to the lower column (as a stable sort would).

    A selection (``kthvalue``) instead of the reference's full sort: linear time per row.
    """
    if top == 0:
        return torch.zeros_like(metric, dtype=torch.bool)
    threshold = metric.kthvalue(metric.shape[1] - top + 1, dim=1, keepdim=True).values
    above = metric > threshold
    tied = metric == threshold
    room = top - above.sum(1, keepdim=True)
    return above | (tied & (tied.cumsum(1) <= room))


def recover_mask(metric: torch.Tensor, keep: torch.Tensor, alpha: float) -> torch.Tensor:
    """Pruned weights among each row's top ``int(alpha * in)`` by ``metric`` (ties: lower column first)."""
    return top_per_row(metric, int(metric.shape[1] * alpha)) & ~keep


def block_recover_mask(
    metric: torch.Tensor, keep: torch.Tensor, block_size: int, blocks_per_row: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(recover mask, chosen block columns ``(out / b, k)`` sorted): the pruned weights of the top-k blocks per row."""
    out_features, in_features = metric.shape
    b = block_size
    pruned_metric = metric.masked_fill(keep, 0)
    tiles = pruned_metric.reshape(out_features // b, b, in_features // b, b).sum(dim=(1, 3))
    columns = tiles.topk(blocks_per_row, dim=1).indices.sort(dim=1).values
    chosen = torch.zeros_like(tiles, dtype=torch.bool).scatter_(1, columns, True)
    expanded = chosen.repeat_interleave(b, dim=0).repeat_interleave(b, dim=1)
    return expanded & ~keep, columns


def wrp_prune(
    weight: torch.Tensor, scaler_row: torch.Tensor, pattern: SparsityPattern, options: WRPOptions = WRPOptions()
) -> PruneResult:
    """Wanda N:M weight plus ``extras["recover"]``: the recovered weights at their original values, zero elsewhere.

    The block form also returns ``extras["recover_blocks"]``, the chosen block columns per block row.
    """
    metric = weight.abs() * scaler_row.sqrt().unsqueeze(0)
    keep = pattern_mask(metric, pattern)
    extras = {}
    if options.blocked:
        recovered, extras["recover_blocks"] = block_recover_mask(
            metric, keep, options.block_size, options.blocks_per_row
        )
    else:
        recovered = recover_mask(metric, keep, options.alpha)
    extras["recover"] = weight * recovered
    return PruneResult(weight * keep, keep, extras)


@register_pruner("wrp")
class WRPPruner(WandaPruner):
    """Wanda statistics; the result carries the recover matrix, which the engine turns into a ``RecoverLinear``."""

    Options = WRPOptions

    def prune(self, weight: torch.Tensor, stats: RunningMean) -> PruneResult:
        return wrp_prune(weight, stats.value.to(weight.device), self.pattern, self.options)
