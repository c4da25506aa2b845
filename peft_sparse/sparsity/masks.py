"""Vectorised mask builders. A mask is a bool tensor with ``True`` = weight kept.

Scores are "higher is more important" and groups run along the last (input) dimension.
Tie-breaking is deterministic: among equal scores the weight with the **lower column index is kept**.
This matters in practice: dequantised 4-bit checkpoints (GGUF Q4) have ~16% of 2:4 groups tied at the boundary.
"""

from __future__ import annotations

import torch

from .patterns import SparsityPattern


def _keep_top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Keep the ``keep`` highest scores along the last dim; stable sort makes ties favour lower indices."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    return mask.scatter_(-1, order[..., :keep], True)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest scores of every ``m`` consecutive entries along the last dimension."""
    width = scores.shape[-1]
    if width % m:
        raise ValueError(f"Last dimension {width} is not divisible by M={m}.")
    grouped = scores.reshape(*scores.shape[:-1], width // m, m)
    return _keep_top(grouped, n).reshape(scores.shape)


def unstructured_mask(scores: torch.Tensor, sparsity: float, scope: str = "row") -> torch.Tensor:
    """Prune ``int(width * sparsity)`` lowest scores per row (``scope="row"``) or over the whole tensor."""
    flat = scores.reshape(1, -1) if scope == "layer" else scores.reshape(-1, scores.shape[-1])
    keep = flat.shape[-1] - int(flat.shape[-1] * sparsity)
    return _keep_top(flat, keep).reshape(scores.shape)


def pattern_mask(scores: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
    """Dispatch to :func:`nm_mask` or :func:`unstructured_mask` for ``pattern``."""
    if pattern.is_nm:
        return nm_mask(scores, pattern.n, pattern.m)
    return unstructured_mask(scores, pattern.sparsity, pattern.scope)


def apply_mask(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero the pruned entries of ``weight`` in place and return it."""
    return weight.masked_fill_(~mask, 0)
