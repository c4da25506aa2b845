"""Checks and statistics on (possibly) sparse weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def nm_violations(weight: torch.Tensor, n: int, m: int) -> int:
    """Number of groups of ``m`` consecutive inputs that hold more than ``n`` non-zeros."""
    if weight.shape[-1] % m:
        raise ValueError(f"Last dimension {weight.shape[-1]} is not divisible by M={m}.")
    nonzero = (weight != 0).reshape(-1, m).sum(-1)
    return int((nonzero > n).sum())


def follows_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True if every group of ``m`` consecutive inputs holds at most ``n`` non-zeros."""
    return weight.shape[-1] % m == 0 and nm_violations(weight, n, m) == 0


def validate_nm(weight: torch.Tensor, n: int, m: int, name: str = "weight") -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``weight`` is exactly N:M."""
    bad = nm_violations(weight, n, m)
    if bad:
        groups = weight.numel() // m
        raise ValueError(f"{name} is not {n}:{m} sparse: {bad} of {groups} groups hold more than {n} non-zeros.")


@dataclass(frozen=True)
class SparsityStats:
    numel: int
    zeros: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


def sparsity_stats(weight: torch.Tensor) -> SparsityStats:
    return SparsityStats(numel=weight.numel(), zeros=int((weight == 0).sum()))
