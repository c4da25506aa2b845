"""Adaptive Sparse Training (AST): dynamic N:M masks, annealed SR-STE, KL distillation, SLoRB boosting.

``SparseSFTTrainer`` / ``SparseSFTConfig`` (TRL) load on first use, so ``import peft_sparse.training`` does not import
trl.
"""

from .config import SparseArgumentsMixin, SparseTrainingArguments
from .data import TokenWindowDataset
from .layers import (
    MaskedWeight,
    SparseConv1D,
    SparseLinear,
    attach_sparse_layers,
    detach_sparse_layer,
    finalize_sparse_layers,
    mask_state_dict,
)
from .losses import ce_kl_distill_sum, chunked_kl_distill_sum, kl_distill_sum
from .optim import SparseAdamW
from .plot import plot_flip_rates
from .schedule import srste_lambda
from .trainer import SparseScheduleCallback, SparseTrainer, SparseTrainingMixin

_TRL_NAMES = ("SparseSFTConfig", "SparseSFTTrainer")


def __getattr__(name: str):
    if name in _TRL_NAMES:  # TRL is imported on first use only: it is slow to import
        from . import sft

        return getattr(sft, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "MaskedWeight",
    "SparseAdamW",
    "SparseArgumentsMixin",
    "SparseConv1D",
    "SparseLinear",
    "SparseSFTConfig",
    "SparseSFTTrainer",
    "SparseScheduleCallback",
    "SparseTrainer",
    "SparseTrainingArguments",
    "SparseTrainingMixin",
    "TokenWindowDataset",
    "attach_sparse_layers",
    "ce_kl_distill_sum",
    "chunked_kl_distill_sum",
    "detach_sparse_layer",
    "finalize_sparse_layers",
    "mask_state_dict",
    "kl_distill_sum",
    "plot_flip_rates",
    "srste_lambda",
]
