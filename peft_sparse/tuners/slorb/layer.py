"""SLoRB layer: ``y = base(x) + group_sum_k(x) S^T`` with S (m x n/k); the group projection is never built."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ...sparsity import SparsityPattern, apply_mask, pattern_mask
from .._base import AdapterLinearMixin
from .._weights import check_supported, from_out_in, out_in_weight
from .config import SLoRBConfig


def slorb_group_sum(x: torch.Tensor, k: int) -> torch.Tensor:
    """``x P^T`` for the block-ones projection P: sum every k consecutive inputs (n -> n/k)."""
    return x.unflatten(-1, (-1, k)).sum(-1)


def slorb_mean_init(weight: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """S_ij = (1/k) * sum of the pruned weights of group G_ij (kept entries count as zero), shape (m, n/k)."""
    return weight.masked_fill(mask, 0).unflatten(-1, (-1, k)).mean(-1)


def slorb_dense_delta(S: torch.Tensor, k: int) -> torch.Tensor:
    """The dense (m, n) matrix ``S P`` that SLoRB adds to W (only built for an explicit dense merge)."""
    return S.repeat_interleave(k, dim=-1)


def slorb_init(weight: torch.Tensor, mask: torch.Tensor, k: int, init: str) -> torch.Tensor:
    """Initial S for ``init`` in {"mean", "zero", "xavier"}, in float32."""
    S = torch.zeros(weight.shape[0], weight.shape[1] // k)
    if init == "mean":
        return slorb_mean_init(weight.float(), mask, k).cpu()
    if init == "xavier":
        nn.init.xavier_uniform_(S)
    return S


def resolve_mask(weight: torch.Tensor, pattern: str | None, mask: torch.Tensor | None) -> torch.Tensor:
    """Keep-mask (out, in): the explicit one, else the pattern's magnitude mask, else the non-zeros of W."""
    if mask is not None:
        if mask.shape != weight.shape:
            raise ValueError(f"SLoRB mask has shape {tuple(mask.shape)}, expected (out, in) = {tuple(weight.shape)}.")
        return mask.to(device=weight.device, dtype=torch.bool)
    if pattern is None:
        return weight != 0
    return pattern_mask(weight.abs().float(), SparsityPattern.parse(pattern))


class SLoRBLayer(BaseTunerLayer):
    """Per-adapter SLoRB state (S and k) on top of a Linear/Conv1D base layer."""

    adapter_layer_names = ("slorb_S",)
    other_param_names = ("k",)

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        check_supported(base_layer, "SLoRB")
        self.base_layer = base_layer
        self.k: dict[str, int] = {}
        self.slorb_S = nn.ParameterDict({})
        self.base_masks: dict[str, torch.Tensor] = {}  # only kept to mask a trainable base weight's gradient
        self.allow_dense_merge = False
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.out_features, self.in_features = out_in_weight(base_layer).shape
        self.kwargs = kwargs

    def update_layer(
        self,
        adapter_name: str,
        config: SLoRBConfig,
        mask: torch.Tensor | None = None,
        inference_mode: bool = False,
        **kwargs: Any,
    ) -> None:
        """Create S from the dense weight and the keep-mask, then prune the base weight if asked."""
        k = config.k
        if self.in_features % k:
            raise ValueError(
                f"SLoRB k={k} must divide the input size n={self.in_features} of {self.base_layer}; pick a k that "
                f"divides {self.in_features} or exclude this module."
            )
        weight = out_in_weight(self.get_base_layer()).data
        keep = resolve_mask(weight, config.pattern, mask)
        self.k[adapter_name] = k
        self.slorb_S[adapter_name] = nn.Parameter(slorb_init(weight, keep, k, config.init))
        if config.prune_base:
            apply_mask(weight, keep)
            if config.trainable_base:
                self.base_masks[adapter_name] = keep
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)


class SLoRBLinear(AdapterLinearMixin, nn.Module, SLoRBLayer):
    """SLoRB on ``nn.Linear`` or GPT-2 ``Conv1D``. Merging densifies W, so it is refused unless asked for."""

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: SLoRBConfig, mask: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        SLoRBLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, mask=mask)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The dense ``S P`` in the base layer's storage orientation."""
        return from_out_in(self.get_base_layer(), slorb_dense_delta(self.slorb_S[adapter], self.k[adapter]))

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        if not self.allow_dense_merge:
            raise ValueError(
                "SLoRB cannot be merged into an N:M weight: S P is dense and would destroy the sparsity pattern. "
                "Keep S as a separate module (save the adapter, or use SLoRBModel.side_weights()), or densify "
                "explicitly with merge_and_unload(allow_dense=True)."
            )
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.slorb_S:
                continue
            weight = self.get_base_weight()
            merged = weight.float() + self.get_delta_weight(name).float()
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"Merging SLoRB adapter {name!r} gives non-finite weights; the adapter is broken.")
            self.set_base_weight(merged.to(weight.dtype))
            self.merged_adapters.append(name)

    def unmerge_one(self, name: str) -> None:
        weight = self.get_base_weight()
        self.set_base_weight((weight.float() - self.get_delta_weight(name).float()).to(weight.dtype))

    def adapter_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``group_sum_k(x) S^T``, computed in S's dtype (float32 unless cast)."""
        S = self.slorb_S[name]
        return F.linear(slorb_group_sum(x.to(S.dtype), self.k[name]), S)

    def __repr__(self) -> str:
        return "slorb." + super().__repr__()
