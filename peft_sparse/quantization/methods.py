"""Registered quantizers of the kept values: each fits one layer's grid after (or, ``joint``, during) pruning.

A quantizer mirrors a pruner (``peft_sparse.pruning.base``): statistics accumulated from the layer's calibration
inputs, then a pure function of (pruned fp32 ``(out, in)`` weight, keep mask, statistics) returning the weight on
its grid with the grid itself (``scale``, ``zero``; see :mod:`.grid`). :class:`Quantized` composes a pruner with
a quantizer into one pruner for the engine's block walk: both statistics come from the same calibration pass, and
pass 2 then forwards the quantized block. ``gptq`` and ``joint`` live next to the Hessian code they reuse
(:mod:`peft_sparse.pruning.sparsegpt`), ``awq`` in :mod:`.awq`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from ..pruning.base import Pruner, PruneResult
from ..pruning.registry import NoOptions, register_quantizer
from .grid import QuantScheme, quantize_layer


class Quantizer:
    """Base class of registered quantizers; subclasses set ``Options`` / ``needs_data`` and override the hooks."""

    Options: ClassVar[type] = NoOptions
    needs_data: ClassVar[bool] = True
    name: ClassVar[str]

    def __init__(self, options: Any, scheme: QuantScheme) -> None:
        self.options = options
        self.scheme = scheme

    def new_stats(self, in_features: int, device: torch.device) -> Any:
        """Empty statistics for a layer with ``in_features`` inputs (``None`` for data-free quantizers)."""
        return None

    def accumulate(self, stats: Any, inp: torch.Tensor) -> None:
        """Fold one batch of layer inputs ``(..., in)`` into ``stats``."""

    def quantize(self, weight: torch.Tensor, keep: torch.Tensor, stats: Any
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(fp32 weight on the grid, scale, zero)`` of a pruned fp32 ``(out, in)`` weight and its keep mask."""
        raise NotImplementedError

    def prune_and_quantize(self, pruner: Pruner, name: str, weight: torch.Tensor, pruner_stats: Any, stats: Any
                           ) -> PruneResult:
        """Prune the dense fp32 ``weight`` with ``pruner``, then quantize its kept values (``joint`` does both in
        one sweep)."""
        result = pruner.prune_layer(name, weight, pruner_stats)
        quantized, scale, zero = self.quantize(result.weight, result.mask, stats)
        return dataclasses.replace(result, weight=quantized, grid=(scale, zero))


class Quantized(Pruner):
    """A pruner followed by a quantizer, as one pruner: statistics are the pair, collected in one pass and shared
    between layers fed the same input like any pruner's."""

    def __init__(self, pruner: Pruner, quantizer: Quantizer) -> None:
        super().__init__(pruner.options, pruner.pattern)
        self.pruner = pruner
        self.quantizer = quantizer
        self.needs_data = pruner.needs_data or quantizer.needs_data
        self.name = f"{pruner.name}+{quantizer.name}"

    def new_stats(self, in_features: int, device: torch.device) -> tuple[Any, Any]:
        return self.pruner.new_stats(in_features, device), self.quantizer.new_stats(in_features, device)

    def accumulate(self, stats: tuple[Any, Any], inp: torch.Tensor) -> None:
        self.pruner.accumulate(stats[0], inp)
        self.quantizer.accumulate(stats[1], inp)

    def prune_layer(self, name: str, weight: torch.Tensor, stats: tuple[Any, Any] | None) -> PruneResult:
        pruner_stats, quantizer_stats = (None, None) if stats is None else stats  # None: both data-free
        return self.quantizer.prune_and_quantize(self.pruner, name, weight, pruner_stats, quantizer_stats)


@register_quantizer("rtn")
class RTNQuantizer(Quantizer):
    """Round to nearest on a grid fitted to each group's kept values: the data-free baseline."""

    needs_data = False

    def quantize(self, weight: torch.Tensor, keep: torch.Tensor, stats: Any
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return quantize_layer(weight, keep, self.scheme)
