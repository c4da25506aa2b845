"""Sparsity patterns.

Convention (NVIDIA / AST / apex): ``"N:M"`` keeps **N** of every M consecutive weights along the *input*
dimension, so ``"1:4"`` is 75% sparse. Note that the Wanda, SparseGPT and DSnoT scripts pass the number of
*zeros* instead; the two readings only agree at 2:4.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
SCOPES = ("row", "layer")


@dataclass(frozen=True)
class SparsityPattern:
    """Either N:M semi-structured (``n`` kept per group of ``m``) or unstructured (``sparsity`` zeros).

    ``scope`` only matters for unstructured patterns: ``"row"`` compares weights within each output row (Wanda,
    SparseGPT), ``"layer"`` uses one threshold for the whole matrix (the magnitude baseline of the papers).
    """

    n: int | None = None
    m: int | None = None
    sparsity: float | None = None
    scope: str = "row"

    def __post_init__(self) -> None:
        if self.is_nm:
            if self.sparsity is not None:
                raise ValueError("A pattern is either N:M or unstructured; got both n:m and sparsity.")
            if not (isinstance(self.n, int) and isinstance(self.m, int)) or not 0 < self.n < self.m:
                raise ValueError(
                    f"Invalid N:M pattern {self.n}:{self.m}: need integers 0 < N < M (N kept of every M), e.g. '2:4'."
                )
        elif self.sparsity is None:
            raise ValueError("Give an N:M pattern such as '2:4' or an unstructured sparsity ratio such as 0.5.")
        elif not 0.0 <= float(self.sparsity) < 1.0:
            raise ValueError(f"Unstructured sparsity must be in [0, 1), got {self.sparsity}.")
        if self.scope not in SCOPES:
            raise ValueError(f"Unknown sparsity scope {self.scope!r}; choose one of {SCOPES}.")

    @classmethod
    def parse(cls, spec: str | float | SparsityPattern, scope: str = "row") -> SparsityPattern:
        """``"2:4"`` -> N:M; ``0.5``, ``"0.5"`` or ``"50%"`` -> unstructured."""
        if isinstance(spec, SparsityPattern):
            return spec
        if isinstance(spec, str):
            match = _NM_RE.match(spec)
            if match:
                return cls(n=int(match.group(1)), m=int(match.group(2)))
            text = spec.strip()
            try:
                value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
            except ValueError:
                raise ValueError(
                    f"Cannot parse sparsity pattern {spec!r}: use 'N:M' (N kept of every M, e.g. '2:4') "
                    "or an unstructured ratio such as '0.5'."
                ) from None
            return cls(sparsity=value, scope=scope)
        if isinstance(spec, (int, float)) and not isinstance(spec, bool):
            return cls(sparsity=float(spec), scope=scope)
        raise TypeError(f"A sparsity pattern must be a string or a float, got {type(spec).__name__}.")

    @property
    def is_nm(self) -> bool:
        return self.n is not None or self.m is not None

    @property
    def ratio(self) -> float:
        """Fraction of weights set to zero."""
        return 1.0 - self.n / self.m if self.is_nm else float(self.sparsity)

    def check_width(self, width: int, layer: str = "weight") -> None:
        """Raise if ``width`` input features cannot be split into groups of M."""
        if self.is_nm and width % self.m:
            raise ValueError(
                f"{layer}: input width {width} is not divisible by M={self.m}, so it cannot be pruned {self}. "
                f"Choose a pattern whose M divides {width}, or leave this layer out with `ignore`."
            )

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.sparsity:g} unstructured ({self.scope})"
