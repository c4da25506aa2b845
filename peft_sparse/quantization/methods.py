"""Registered quantizers of the kept values: each fits one layer's grid after (or, ``joint``, during) pruning.

A quantizer mirrors a pruner (``peft_sparse.pruning.base``): statistics accumulated from the layer's calibration
inputs, then a pure function of (pruned fp32 ``(out, in)`` weight, keep mask, statistics) returning the weight on
its grid with the grid itself (``scale``, ``zero``; see :mod:`.grid`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

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


@register_quantizer("rtn")
class RTNQuantizer(Quantizer):
    """Round to nearest on a grid fitted to each group's kept values: the data-free baseline."""

    needs_data = False

    def quantize(self, weight: torch.Tensor, keep: torch.Tensor, stats: Any
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return quantize_layer(weight, keep, self.scheme)
