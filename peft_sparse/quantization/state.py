"""Which grid a quantized layer is on: its ``weight_scale`` (and ``weight_zero_point``) buffers.

A quantized sparse layer stays a plain ``Linear`` / ``Conv1D`` in memory whose weight holds the dequantized values
(``grid.dequantize`` in the model's dtype, pruned positions exactly 0); the grid travels as buffers on that layer
(on the plain layer inside a ``RecoverLinear``), under the names the v2 checkpoint uses:

* ``weight_scale``: ``(out, in / group_size)`` in the model's dtype;
* ``weight_zero_point``: ``(out, in / group_size)`` uint8, asymmetric grids only.
"""

from __future__ import annotations

import torch
from torch import nn

from ..modeling import out_in
from ..nn import plain_layer
from .grid import QuantScheme, dequantize, quantize

SCALE = "weight_scale"
ZERO_POINT = "weight_zero_point"


def stored_weight(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: QuantScheme,
                  dtype: torch.dtype) -> torch.Tensor:
    """The ``(out, in)`` weight a layer of ``dtype`` holds for an fp32 ``weight`` already on the grid ``(scale, zero)``.

    It is ``dequantize`` of the codes with the scale rounded to ``dtype``, exactly what a loader rebuilds from the
    codes (casting the fp32 values instead would differ in bfloat16 wherever the fp32 scale is not a bfloat16
    number); pruned entries are +0.0.
    """
    return dequantize(quantize(weight, scale, zero, scheme), scale.to(dtype), zero, dtype)


def record_grid(module: nn.Module, scale: torch.Tensor, zero: torch.Tensor | None) -> None:
    """Record the grid of ``module``'s weight (already its :func:`stored_weight`) as its buffers."""
    layer = plain_layer(module)
    layer.register_buffer(SCALE, scale.to(layer.weight.dtype))
    if zero is None:
        layer._buffers.pop(ZERO_POINT, None)
    else:
        layer.register_buffer(ZERO_POINT, zero.to(torch.uint8))


def set_grid(module: nn.Module, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
             scheme: QuantScheme) -> None:
    """Write an fp32 ``(out, in)`` ``weight`` on the grid ``(scale, zero)`` into ``module`` and record the grid."""
    layer = plain_layer(module)
    with torch.no_grad():
        out_in(layer).copy_(stored_weight(weight, scale, zero, scheme, layer.weight.dtype))
    record_grid(layer, scale, zero)


def grid_of(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(scale, zero point or None)`` of a quantized layer; ``None`` for a layer that is not quantized."""
    layer = plain_layer(module)
    scale = layer._buffers.get(SCALE)
    return None if scale is None else (scale, layer._buffers.get(ZERO_POINT))
