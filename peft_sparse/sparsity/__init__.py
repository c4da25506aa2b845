"""Pure tensor functions for N:M and unstructured sparsity (torch only, no HF imports)."""

from .masks import apply_mask, nm_mask, pattern_mask, unstructured_mask
from .metrics import SparsityStats, follows_nm, nm_violations, sparsity_stats, validate_nm
from .patterns import SparsityPattern

__all__ = [
    "SparsityPattern",
    "SparsityStats",
    "apply_mask",
    "follows_nm",
    "nm_mask",
    "nm_violations",
    "pattern_mask",
    "sparsity_stats",
    "unstructured_mask",
    "validate_nm",
]
