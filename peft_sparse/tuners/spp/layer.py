"""SPP layer: W' = W * Repeat_0(alpha, m/r) * beta, added residually and merged multiplicatively."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ...modeling import check_sparse_layer, out_in, to_storage
from .._base import AdapterLinearMixin
from .config import SPPConfig


def spp_multiplier(alpha: torch.Tensor, beta: torch.Tensor, out_features: int) -> torch.Tensor:
    """The full (m, n) multiplier ``Repeat_0(alpha, m/r) * beta`` (only for merging and reference checks)."""
    return alpha.repeat_interleave(out_features // alpha.shape[0], dim=0) * beta


def spp_delta_naive(x: torch.Tensor, weight: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """``x (W * M)^T`` with M materialised: the paper's Eq. 4-5 as written (m x n temporaries, kept for backward)."""
    return F.linear(x, weight * spp_multiplier(alpha, beta, weight.shape[0]))


def _block_product(x: torch.Tensor, weight: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``concat_j (x * alpha_j) W_j^T`` (paper Eq. 7 without beta), one row block of W at a time.

    The only transient is one ``x * alpha_j`` buffer the size of x, reused across the r blocks (a batched form
    that builds all r copies at once is ~2x slower on CPU and r times larger).
    """
    rows = x.reshape(-1, x.shape[-1])
    blocks = weight.unflatten(0, (alpha.shape[0], -1))
    out = rows.new_empty(rows.shape[0], alpha.shape[0], blocks.shape[1])
    scaled = torch.empty_like(rows)
    for j, block in enumerate(blocks):
        torch.mm(torch.mul(rows, alpha[j], out=scaled), block.t(), out=out[:, j])
    return out.reshape(*x.shape[:-1], weight.shape[0])


class _BlockedSPP(torch.autograd.Function):
    """Eq. 7 with a hand-written backward that saves only x, W, alpha and beta (no activation-sized copies).

    Plain autograd would keep ``x * alpha_j`` (r copies of the activation) for backward. Here the gradients of
    alpha, beta (and W, if it trains) all come from one weight-sized ``G = grad^T x`` and x's from ``grad * beta``
    times the alpha-scaled row blocks; these transients live only inside backward.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight, alpha, beta)
        return _block_product(x, weight, alpha) * beta.squeeze(-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, alpha, beta = ctx.saved_tensors
        r, n = alpha.shape
        flat_grad = grad.reshape(-1, beta.shape[0])
        blocks = weight.unflatten(0, (r, -1))
        grad_x = grad_weight = grad_alpha = grad_beta = None
        if ctx.needs_input_grad[0]:
            scaled_blocks = (blocks * alpha.unsqueeze(1)).flatten(0, 1)
            grad_x = ((flat_grad * beta.squeeze(-1)) @ scaled_blocks).reshape(x.shape)
        if any(ctx.needs_input_grad[1:]):
            G = flat_grad.T @ x.reshape(-1, n)  # (m, n)
            if ctx.needs_input_grad[1]:
                grad_weight = G * spp_multiplier(alpha, beta, weight.shape[0])
            H = G.mul_(weight).unflatten(0, (r, -1))  # (r, m/r, n)
            grad_alpha = (H * beta.unflatten(0, (r, -1))).sum(1)
            grad_beta = (H * alpha.unsqueeze(1)).sum(-1).reshape(beta.shape)
        return grad_x, grad_weight, grad_alpha, grad_beta


def spp_delta_blocked(x: torch.Tensor, weight: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """``x (W * M)^T`` in the block form of the paper's Eq. 7, never building the (m x n) multiplier."""
    return _BlockedSPP.apply(x, weight, alpha, beta)


def check_spp_target(name: str, out_features: int, r: int) -> None:
    """Raise, naming the layer and the fix, if W_alpha's r rows cannot tile the layer's m outputs."""
    if out_features % r:
        raise ValueError(
            f"SPP r={r} must divide the output size m={out_features} of {name}; choose r among the divisors of "
            f"{out_features} (e.g. {math.gcd(out_features, 16)}), or exclude the module with "
            f"`exclude_modules=[{name!r}]`."
        )


class SPPLayer(BaseTunerLayer):
    """Per-adapter SPP state on top of a frozen Linear/Conv1D base layer."""

    adapter_layer_names = ("spp_alpha", "spp_beta")
    other_param_names = ("r", "scaling", "spp_dropout", "memory_efficient")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        check_sparse_layer(base_layer, "SPP")
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.memory_efficient: dict[str, bool] = {}
        self.spp_alpha = nn.ParameterDict({})
        self.spp_beta = nn.ParameterDict({})
        self.spp_dropout = nn.ModuleDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.out_features, self.in_features = out_in(base_layer).shape
        self.kwargs = kwargs

    def update_layer(self, adapter_name: str, config: SPPConfig, inference_mode: bool = False, **kwargs: Any) -> None:
        """Create (or re-create) the adapter's alpha (r x n) and beta (m x 1)."""
        r = config.r
        check_spp_target(type(self.get_base_layer()).__name__, self.out_features, r)
        self.r[adapter_name] = r
        self.scaling[adapter_name] = config.scaling
        self.memory_efficient[adapter_name] = config.memory_efficient
        self.spp_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        alpha = torch.empty(r, self.in_features)
        nn.init.kaiming_uniform_(alpha, a=math.sqrt(5))
        beta = torch.zeros(self.out_features, 1) if config.init_weights else torch.randn(self.out_features, 1) * 0.1
        self.spp_alpha[adapter_name] = nn.Parameter(alpha)
        self.spp_beta[adapter_name] = nn.Parameter(beta)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def out_in_factor(self, adapter: str) -> torch.Tensor:
        """``1 + s * M`` in float32 on the (out, in) view; differentiable, so the forward can compound with it."""
        alpha, beta = self.spp_alpha[adapter].float(), self.spp_beta[adapter].float()
        return 1.0 + self.scaling[adapter] * spp_multiplier(alpha, beta, self.out_features)

    def merge_factor(self, adapter: str) -> torch.Tensor:
        """``1 + s * M`` in float32, in the base layer's storage orientation."""
        return to_storage(self.get_base_layer(), self.out_in_factor(adapter))

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``s * W'`` for the current base weight, so that merging gives ``W + s * W'`` (Eq. 5)."""
        weight = self.get_base_weight()
        return (weight.float() * (self.merge_factor(adapter) - 1.0)).to(weight.dtype)


class SPPLinear(AdapterLinearMixin, nn.Module, SPPLayer):
    """SPP on ``nn.Linear`` or GPT-2 ``Conv1D``: ``Y = base(X) + s * Dropout(X) W'^T``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: SPPConfig, **kwargs: Any) -> None:
        super().__init__()
        SPPLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """``W <- W * (1 + s * M)``: zeros of W stay exactly zero, so any N:M pattern survives."""
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.spp_alpha:
                continue
            weight = self.get_base_weight()
            factor = self.merge_factor(name)
            merged = weight.float() * factor
            lost = int(((factor == 0) & (weight != 0)).sum())
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"Merging SPP adapter {name!r} gives non-finite weights; the adapter is broken.")
            if lost:
                message = (
                    f"Merging SPP adapter {name!r} zeroes {lost} non-zero weights (1 + s*alpha*beta == 0 there); "
                    "unmerge cannot restore them. Keep the unmerged model if you need to undo the merge."
                )
                if safe_merge:
                    raise ValueError(message)
                warnings.warn(message)
            self.set_base_weight(merged.to(weight.dtype))
            self.merged_adapters.append(name)

    def unmerge_one(self, name: str) -> None:
        """Divide by the adapter's factor (exact up to rounding where it is non-zero; zeroed weights stay zero)."""
        weight = self.get_base_weight()
        factor = self.merge_factor(name)
        safe_factor = torch.where(factor == 0, torch.ones_like(factor), factor)
        self.set_base_weight((weight.float() / safe_factor).to(weight.dtype))

    def adapter_outputs(self, names: list[str], x: torch.Tensor) -> Iterator[torch.Tensor]:
        """Several active adapters compound exactly as merging them does: each acts on W already multiplied by the
        ones before it, so the branches sum to ``x (W * prod_i (1 + s_i M_i))^T``, rounded like the merged weight.

        A single adapter (the training hot path) goes straight to the block form; every further one builds one
        weight-sized product ``W * (1 + s M)``.
        """
        weight = out_in(self.get_base_layer())
        for position, name in enumerate(names):
            if position:
                weight = (weight.float() * self.out_in_factor(names[position - 1])).to(weight.dtype)
            yield self.adapter_output(name, x, weight)

    def adapter_output(self, name: str, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``s * Dropout(x) (weight * M)^T`` in the weight's dtype, block form unless ``memory_efficient=False``.

        ``weight`` is the (out, in) weight the adapter multiplies: the base weight unless given.
        """
        weight = out_in(self.get_base_layer()) if weight is None else weight
        delta = spp_delta_blocked if self.memory_efficient[name] else spp_delta_naive
        x_drop = self.spp_dropout[name](x).to(weight.dtype)
        alpha, beta = self.spp_alpha[name].to(weight.dtype), self.spp_beta[name].to(weight.dtype)
        return self.scaling[name] * delta(x_drop, weight, alpha, beta)

    def __repr__(self) -> str:
        return "spp." + super().__repr__()
