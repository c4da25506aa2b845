"""User-facing configuration of one-shot pruning."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .pruning.registry import get_pruner
from .sparsity import SparsityPattern
from .sparsity.patterns import SCOPES

DEFAULT_PATTERN = "2:4"


@dataclass
class SparsityConfig:
    """What to prune and how; validated at construction so bad input fails before any work is done.

    Args:
        method: registered pruner name (``"magnitude"``, ``"wanda"``, ``"sparsegpt"``).
        pattern: ``"N:M"`` = keep N of every M consecutive input weights (default ``"2:4"``).
        sparsity: unstructured ratio of zeros instead of ``pattern`` (e.g. ``0.5``).
        sparsity_scope: for unstructured, compare weights per output ``"row"`` or per ``"layer"``.
        targets: regular expressions over module names (``re.search``); default: every Linear/Conv1D inside the
            decoder blocks. Embeddings and ``lm_head`` are never targets unless named here.
        ignore: regular expressions of module names to leave dense.
        nsamples / seqlen / seed: calibration windows (count, tokens each, sampling seed).
        method_options: options of the chosen method, e.g. ``{"blocksize": 128, "percdamp": 0.01}`` for SparseGPT.
    """

    method: str = "wanda"
    pattern: str | None = None
    sparsity: float | None = None
    sparsity_scope: str = "row"
    targets: list[str] | None = None
    ignore: list[str] = field(default_factory=list)
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    method_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.pattern is not None and self.sparsity is not None:
            raise ValueError(
                f"Give either pattern={self.pattern!r} (N:M) or sparsity={self.sparsity} (unstructured), not both."
            )
        if self.pattern is None and self.sparsity is None:
            self.pattern = DEFAULT_PATTERN
        if self.pattern is not None and not SparsityPattern.parse(self.pattern).is_nm:
            raise ValueError(
                f"pattern must look like 'N:M' (e.g. '2:4'); for a ratio use sparsity=, got {self.pattern!r}."
            )
        if self.sparsity_scope not in SCOPES:
            raise ValueError(f"sparsity_scope must be one of {SCOPES}, got {self.sparsity_scope!r}.")
        self.sparsity_pattern  # validates numbers
        for name in ("nsamples", "seqlen", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "seed" else 1):
                raise ValueError(f"{name} must be a {'non-negative' if name == 'seed' else 'positive'} integer, "
                                 f"got {value!r}.")
        if isinstance(self.targets, str) or isinstance(self.ignore, str):
            raise TypeError("targets and ignore are lists of regular expressions, not single strings.")
        self.options  # validates method name and method_options

    @property
    def sparsity_pattern(self) -> SparsityPattern:
        if self.pattern is not None:
            return SparsityPattern.parse(self.pattern)
        return SparsityPattern(sparsity=float(self.sparsity), scope=self.sparsity_scope)

    @property
    def options(self) -> Any:
        """The method's own options dataclass, built from ``method_options``."""
        options_cls = get_pruner(self.method).Options
        known = {f.name for f in dataclasses.fields(options_cls)}
        unknown = sorted(set(self.method_options) - known)
        if unknown:
            raise ValueError(
                f"Unknown option(s) {unknown} for method {self.method!r}; valid options: {sorted(known) or 'none'}."
            )
        options = options_cls(**self.method_options)
        check_pattern = getattr(options, "check_pattern", None)  # e.g. SparseGPT needs M | blocksize
        if check_pattern is not None:
            check_pattern(self.sparsity_pattern)
        return options

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SparsityConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown SparsityConfig key(s) {unknown}; valid keys: {sorted(known)}.")
        return cls(**data)
