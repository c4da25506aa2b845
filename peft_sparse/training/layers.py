"""Masked layers for sparse training: the forward uses ``W ⊙ m``, the gradient goes straight through to dense ``W``.

Design (FSDP/DDP safe, plain checkpoints):

* Each target ``nn.Linear`` / GPT-2 ``Conv1D`` gets its class swapped to a thin subclass. Parameters stay the same
  objects, so optimizers, DDP and FSDP (``use_orig_params``) see ordinary dense parameters; nothing swaps ``.data``.
* The mask is a non-persistent buffer: ``save_pretrained`` writes plain dense weights under the usual names, and
  :class:`SparseTrainer` stores masks in its own checkpoint file.
* Mask recomputation happens *inside* the forward when the trainer flags it, because only there is the full
  (unsharded) weight guaranteed to be visible. Flip counts for telemetry are measured at the same place.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..modeling import out_in, select_sparse_modules, to_storage
from ..sparsity import SparsityPattern, pattern_mask, validate_nm


def magnitude_mask(module: nn.Module, pattern: SparsityPattern) -> torch.Tensor:
    """Magnitude keep-mask of ``module``'s weight (groups along its inputs), in the weight's storage layout."""
    return to_storage(module, pattern_mask(out_in(module).detach().abs(), pattern))


class MaskedWeight(torch.autograd.Function):
    """``W ⊙ m`` whose backward is the straight-through estimator, optionally plus SR-STE decay.

    ``straight_through=False`` masks the gradient too (frozen-mask retraining: pruned weights never move).
    ``decay > 0`` adds ``decay * (¬m ⊙ W)`` to the gradient of ``W`` (classic SR-STE placement).
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, mask: torch.Tensor, decay: float, straight_through: bool) -> torch.Tensor:
        """``mask`` holds 0/1 in ``weight``'s dtype: a bool operand makes the product ~2x slower on CPU."""
        ctx.decay, ctx.straight_through = decay, straight_through
        ctx.save_for_backward(weight, mask)
        return weight * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, mask = ctx.saved_tensors
        if not ctx.straight_through:
            grad = grad * mask
        if ctx.decay:
            grad = grad + ctx.decay * torch.addcmul(weight, weight, mask, value=-1)  # decay * W * (1 - m)
        return grad, None, None, None


class SparseWeightMixin:
    """Shared state and mask logic of :class:`SparseLinear` and :class:`SparseConv1D`.

    Attributes set by :func:`attach_sparse_layers`: ``sparse_mask`` / ``initial_mask`` (bool buffers, ``True`` =
    kept), ``sparse_pattern``, ``sparse_decay`` (decay added in backward), ``sparse_straight_through``,
    ``sparse_update_pending`` (recompute the mask at the next forward) and ``sparse_flips`` (last update's counts).
    """

    dense_class: type[nn.Module]

    def masked_weight(self) -> torch.Tensor:
        if self.sparse_update_pending:
            self.update_mask()
        return MaskedWeight.apply(self.weight, self.mask_values(), self.sparse_decay, self.sparse_straight_through)

    def mask_values(self) -> torch.Tensor:
        """The bool mask as 0/1 in the weight's dtype, cached until the mask tensor changes (in place or replaced)."""
        mask = self.sparse_mask
        key = (id(mask), mask.data_ptr(), mask._version, self.weight.dtype, self.weight.device)
        if getattr(self, "_mask_values_key", None) != key:
            self._mask_values_cache = mask.to(device=self.weight.device, dtype=self.weight.dtype)
            self._mask_values_key = key
        return self._mask_values_cache

    @torch.no_grad()
    def update_mask(self) -> None:
        """Recompute the mask from the live dense weight and record flips vs the previous and initial mask."""
        new = magnitude_mask(self, self.sparse_pattern)
        self.sparse_flips = (int((new != self.sparse_mask).sum()), int((new != self.initial_mask).sum()))
        self.sparse_mask.copy_(new)
        self.sparse_update_pending = False


class SparseLinear(SparseWeightMixin, nn.Linear):
    dense_class = nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.masked_weight(), self.bias)


class SparseConv1D(SparseWeightMixin, Conv1D):
    """GPT-2 style ``Conv1D``: weight is ``[in, out]``, so N:M groups run along dim 0."""

    dense_class = Conv1D

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.masked_weight())
        return out.view(*x.shape[:-1], self.nf)


_SPARSE_ATTRIBUTES = (
    "sparse_mask", "initial_mask", "sparse_pattern", "sparse_decay", "sparse_straight_through", "sparse_update_pending",
    "sparse_flips",
)
SPARSE_CLASSES: dict[type[nn.Module], type[nn.Module]] = {nn.Linear: SparseLinear, Conv1D: SparseConv1D}


def _sparse_class(module: nn.Module, name: str) -> type[nn.Module]:
    """The masked class to swap ``module`` to; subclasses with their own forward cannot be swapped."""
    if type(module) not in SPARSE_CLASSES:
        raise TypeError(
            f"{name} is a {type(module).__name__}, a subclass of {type(module).__mro__[1].__name__} with its own "
            "forward, which sparse training cannot mask; leave it out with `ignore`."
        )
    return SPARSE_CLASSES[type(module)]


def attach_sparse_layer(
    module: nn.Module, pattern: SparsityPattern, mask: torch.Tensor, straight_through: bool = True
) -> SparseWeightMixin:
    """Swap ``module`` to its sparse class in place with ``mask`` as current and initial mask."""
    module.__class__ = _sparse_class(module, type(module).__name__)
    module.register_buffer("sparse_mask", mask.to(device=module.weight.device, dtype=torch.bool), persistent=False)
    module.register_buffer("initial_mask", module.sparse_mask.clone(), persistent=False)
    module.sparse_pattern = pattern
    module.sparse_decay = 0.0
    module.sparse_straight_through = straight_through
    module.sparse_update_pending = False
    module.sparse_flips = (0, 0)
    return module


def attach_sparse_layers(
    model: nn.Module,
    pattern: SparsityPattern,
    targets: list[str] | None = None,
    ignore: list[str] | tuple[str, ...] = (),
    straight_through: bool = True,
) -> dict[str, SparseWeightMixin]:
    """Sparsify the selected modules (:func:`~peft_sparse.modeling.select_sparse_modules`, the same default as
    :func:`peft_sparse.prune`) with their magnitude masks (= the existing mask of an already pruned model)."""
    selected = select_sparse_modules(model, targets, ignore)
    for name, module in selected.items():
        _sparse_class(module, name)
        pattern.check_width(out_in(module).shape[1], name)
    return {
        name: attach_sparse_layer(module, pattern, magnitude_mask(module, pattern), straight_through)
        for name, module in selected.items()
    }


def _like(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``mask`` laid out like ``weight``: under FSDP2 (``fully_shard``) the weight is a DTensor shard while buffers
    stay whole, so each rank takes its own piece of the mask (the masks are equal on every rank: no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(weight, DTensor):
        return distribute_tensor(mask, weight.device_mesh, weight.placements, src_data_rank=None)
    return mask


def _whole(weight: torch.Tensor) -> torch.Tensor:
    """The full weight: gathered from every rank for an FSDP2 DTensor (a collective: every rank must call it)."""
    from torch.distributed.tensor import DTensor

    return weight.full_tensor() if isinstance(weight, DTensor) else weight


@torch.no_grad()
def detach_sparse_layer(module: SparseWeightMixin) -> None:
    """Hard-prune the dense weight to the current mask and restore the plain class (buffers removed)."""
    module.weight.mul_(_like(module.weight, module.sparse_mask))
    for name in _SPARSE_ATTRIBUTES:
        delattr(module, name)
    for name in ("_mask_values_cache", "_mask_values_key"):
        module.__dict__.pop(name, None)
    module.__class__ = module.dense_class


def full_weights(model: nn.Module) -> contextlib.AbstractContextManager:
    """Context in which every weight is whole: FSDP1's ``summon_full_params(writeback=True)`` for an FSDP1 root.
    FSDP2 (``fully_shard``) needs none: its DTensor weights are pruned shard by shard and checked gathered."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if isinstance(model, FSDP):
        return FSDP.summon_full_params(model, writeback=True)
    return contextlib.nullcontext()


def finalize_sparse_layers(model: nn.Module, layers: dict[str, SparseWeightMixin], pattern: SparsityPattern) -> None:
    """Hard-prune every layer of ``model`` to its mask, check N:M and restore plain modules (also under FSDP 1/2)."""
    with full_weights(model):
        for name, layer in layers.items():
            detach_sparse_layer(layer)
            if pattern.is_nm:
                validate_nm(to_storage(layer, _whole(layer.weight)), pattern.n, pattern.m, name)


def mask_state_dict(layers: dict[str, SparseWeightMixin]) -> dict[str, torch.Tensor]:
    """The masks as flat tensors ``"{module}.mask"`` / ``"{module}.initial_mask"`` (they are non-persistent buffers,
    in no ``state_dict``): what a checkpoint needs beside the weights, e.g. with ``torch.distributed.checkpoint``
    under FSDP2, where they are the same whole tensor on every rank."""
    state = {}
    for name, layer in layers.items():
        state[f"{name}.mask"] = layer.sparse_mask
        state[f"{name}.initial_mask"] = layer.initial_mask
    return state
