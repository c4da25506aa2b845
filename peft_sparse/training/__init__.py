"""Adaptive Sparse Training (AST): dynamic N:M masks, annealed SR-STE, KL distillation, SLoRB boosting."""

from .config import SparseTrainingArguments
from .data import TokenWindowDataset
from .layers import (
    MaskedWeight,
    SparseConv1D,
    SparseLinear,
    attach_sparse_layers,
    detach_sparse_layer,
    finalize_sparse_layers,
)
from .losses import kl_distill_sum
from .optim import SparseAdamW
from .plot import plot_flip_rates
from .schedule import srste_lambda
from .trainer import SparseTrainer

__all__ = [
    "MaskedWeight",
    "SparseAdamW",
    "SparseConv1D",
    "SparseLinear",
    "SparseTrainer",
    "SparseTrainingArguments",
    "TokenWindowDataset",
    "attach_sparse_layers",
    "detach_sparse_layer",
    "finalize_sparse_layers",
    "kl_distill_sum",
    "plot_flip_rates",
    "srste_lambda",
]
