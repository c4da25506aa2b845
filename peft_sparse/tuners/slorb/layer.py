"""SLoRB layer: ``y = base(x) + x X^T S^T`` with S (m x n/k) and the projection X (n/k x n).

With the paper's fixed block-ones X the projection is a group sum and is never built; it is materialised only when
it trains (``trainable_projection``) or is random (``init="xavier"``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from torch.utils.hooks import RemovableHandle

from ...modeling import check_sparse_layer, out_in, to_storage
from ...sparsity import SparsityPattern, apply_mask, pattern_mask
from .._base import AdapterLinearMixin
from .config import SLoRBConfig


def slorb_group_sum(x: torch.Tensor, k: int) -> torch.Tensor:
    """``x X^T`` for the block-ones projection X: sum every k consecutive inputs (n -> n/k)."""
    return x.unflatten(-1, (-1, k)).sum(-1)


def slorb_mean_init(weight: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """S_ij = (1/k) * sum of the pruned weights of group G_ij (kept entries count as zero), shape (m, n/k)."""
    return weight.masked_fill(mask, 0).unflatten(-1, (-1, k)).mean(-1)


def slorb_dense_delta(S: torch.Tensor, k: int, X: torch.Tensor | None = None) -> torch.Tensor:
    """The dense (m, n) matrix ``S X`` that SLoRB adds to W (only built for an explicit dense merge).

    Without ``X`` the projection is the block-ones one, so ``S X`` is S with every column repeated k times.
    """
    return S.repeat_interleave(k, dim=-1) if X is None else S @ X


def slorb_init(weight: torch.Tensor, mask: torch.Tensor, k: int, init: str) -> torch.Tensor:
    """Initial S in float32: the mean of the pruned weights per group for ``"mean"``, else zero (the paper's Xavier
    goes on X, so ``"zero"`` and ``"xavier"`` both leave the output unchanged at step 0). A weight on ``meta`` (an
    adapter attached to a skeleton, as ``check_adapter`` does) gets an S on ``meta``: there is nothing to copy."""
    if init == "mean":
        S = slorb_mean_init(weight.float(), mask, k)
        return S if S.is_meta else S.cpu()
    return torch.zeros(weight.shape[0], weight.shape[1] // k)


def slorb_projection(in_features: int, k: int, init: str) -> torch.Tensor:
    """Materialised X (n/k, n) in float32: Xavier-uniform for ``"xavier"`` (AST Table 7), else the block ones."""
    if init == "xavier":
        return nn.init.xavier_uniform_(torch.empty(in_features // k, in_features))
    return torch.kron(torch.eye(in_features // k), torch.ones(1, k))


def needs_projection(config: SLoRBConfig) -> bool:
    """X must be stored when it trains or is random; the fixed block ones are a group sum instead."""
    return config.trainable_projection or config.init == "xavier"


def check_slorb_target(name: str, shape: tuple[int, int], config: SLoRBConfig, mask: torch.Tensor | None) -> None:
    """Raise, naming the layer and the fix, if SLoRB ``config`` cannot adapt an (out, in) = ``shape`` weight."""
    in_features = shape[1]
    group = SparsityPattern.parse(config.pattern).m if mask is None and config.pattern is not None else None
    if mask is not None and tuple(mask.shape) != tuple(shape):
        problem = f"SLoRB mask has shape {tuple(mask.shape)}, expected (out, in) = {tuple(shape)}"
        fix = "pass the keep-mask in the (out, in) orientation of the weight"
    elif in_features % config.k:
        problem = f"SLoRB k={config.k} must divide the input size n={in_features}"
        fix = f"pick a k that divides {in_features}"
    elif group is not None and in_features % group:
        problem = f"SLoRB pattern {config.pattern!r} needs M={group} to divide the input size n={in_features}"
        fix = f"pick a pattern whose M divides {in_features}"
    else:
        return
    raise ValueError(f"{problem} of {name}; {fix}, or exclude the module with `exclude_modules=[{name!r}]`.")


def _masked_grad(masks: dict[str, torch.Tensor]):
    """Gradient hook zeroing the entries pruned by any adapter; it reads ``masks`` live, so one hook serves all."""

    def hook(grad: torch.Tensor) -> torch.Tensor:
        for mask in masks.values():
            grad = grad * mask.to(grad.device, grad.dtype)
        return grad

    return hook


def resolve_mask(weight: torch.Tensor, pattern: str | None, mask: torch.Tensor | None) -> torch.Tensor:
    """Keep-mask (out, in): the explicit one, else the pattern's magnitude mask, else the non-zeros of W."""
    if mask is not None:
        return mask.to(device=weight.device, dtype=torch.bool)
    if pattern is None:
        return weight != 0
    return pattern_mask(weight.abs().float(), SparsityPattern.parse(pattern))


class SLoRBLayer(BaseTunerLayer):
    """Per-adapter SLoRB state (S, k and, when materialised, X) on top of a Linear/Conv1D base layer."""

    adapter_layer_names = ("slorb_S", "slorb_X")
    other_param_names = ("k", "base_masks")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        check_sparse_layer(base_layer, "SLoRB")
        self.base_layer = base_layer
        self.k: dict[str, int] = {}
        self.slorb_S = nn.ParameterDict({})
        self.slorb_X = nn.ParameterDict({})
        # Keep-masks (storage orientation) of adapters that pruned a trainable base weight, to mask its gradient.
        self.base_masks: dict[str, torch.Tensor] = {}
        self._base_grad_hook: RemovableHandle | None = None
        self.frozen_peft_weight_names: dict[str, tuple[str, ...]] = {}
        self.allow_dense_merge = False
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.out_features, self.in_features = out_in(base_layer).shape
        self.kwargs = kwargs

    def update_layer(
        self,
        adapter_name: str,
        config: SLoRBConfig,
        mask: torch.Tensor | None = None,
        inference_mode: bool = False,
        **kwargs: Any,
    ) -> None:
        """Create S (and X if it is stored) from the dense weight and the keep-mask, then prune the base if asked."""
        base = self.get_base_layer()
        weight = out_in(base).data
        check_slorb_target(type(base).__name__, tuple(weight.shape), config, mask)
        keep = resolve_mask(weight, config.pattern, mask)
        k = config.k
        self.k[adapter_name] = k
        self.slorb_S[adapter_name] = nn.Parameter(slorb_init(weight, keep, k, config.init))
        if adapter_name in self.slorb_X:  # re-created without a stored projection
            del self.slorb_X[adapter_name]
        self.frozen_peft_weight_names.pop(adapter_name, None)
        if needs_projection(config):
            self.slorb_X[adapter_name] = nn.Parameter(slorb_projection(self.in_features, k, config.init))
            if not config.trainable_projection:
                self.frozen_peft_weight_names[adapter_name] = ("slorb_X",)
        if config.prune_base:
            apply_mask(weight, keep)
            if config.trainable_base:
                self.base_masks[adapter_name] = to_storage(base, keep)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def set_base_trainable(self, trainable: bool) -> None:
        """Train or freeze the base weight; while it trains under stored keep-masks, exactly one hook masks its
        gradient (so repeated calls never stack hooks)."""
        self.get_base_layer().weight.requires_grad_(trainable)
        if trainable and self.base_masks:
            if self._base_grad_hook is None:
                self._base_grad_hook = self.get_base_layer().weight.register_hook(_masked_grad(self.base_masks))
        else:
            self.remove_base_grad_hook()

    def remove_base_grad_hook(self) -> None:
        """Detach the gradient mask from the base weight (on freeze, and before the layer is unloaded)."""
        if self._base_grad_hook is not None:
            self._base_grad_hook.remove()
            self._base_grad_hook = None


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
        """The dense ``S X`` in the base layer's storage orientation."""
        delta = slorb_dense_delta(self.slorb_S[adapter], self.k[adapter], self.slorb_X.get(adapter))
        return to_storage(self.get_base_layer(), delta)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        if not self.allow_dense_merge:
            raise ValueError(
                "SLoRB cannot be merged into an N:M weight: S X is dense and would destroy the sparsity pattern. "
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
        """``x X^T S^T`` in S's dtype (float32 unless cast); a group sum when X is the fixed block ones."""
        S = self.slorb_S[name]
        x = x.to(S.dtype)
        projected = F.linear(x, self.slorb_X[name]) if name in self.slorb_X else slorb_group_sum(x, self.k[name])
        return F.linear(projected, S)

    def __repr__(self) -> str:
        return "slorb." + super().__repr__()
