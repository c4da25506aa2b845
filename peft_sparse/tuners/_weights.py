"""Orientation helpers shared by the SPP and SLoRB layers.

``nn.Linear`` stores its weight as (out, in); GPT-2's ``Conv1D`` stores (in, out). The tuners do all their maths on
the (out, in) = (m, n) view so that "rows" always mean output features and N:M groups run along inputs.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

SUPPORTED_LAYERS = (nn.Linear, Conv1D)


def check_supported(base_layer: nn.Module, method: str) -> None:
    """Fail early, naming the layer type, for anything that is not Linear or Conv1D."""
    if not isinstance(base_layer, SUPPORTED_LAYERS):
        raise TypeError(
            f"{method} supports torch.nn.Linear and transformers Conv1D, got {type(base_layer).__name__}; "
            "remove it from `target_modules`."
        )


def out_in_weight(base_layer: nn.Module) -> torch.Tensor:
    """The base weight as an (out, in) view (no copy)."""
    weight = base_layer.weight
    return weight.T if isinstance(base_layer, Conv1D) else weight


def from_out_in(base_layer: nn.Module, weight_out_in: torch.Tensor) -> torch.Tensor:
    """Bring an (out, in) tensor back to the layer's storage orientation."""
    return weight_out_in.T if isinstance(base_layer, Conv1D) else weight_out_in
