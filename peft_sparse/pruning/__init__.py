"""One-shot pruners (magnitude, Wanda, SparseGPT) and the engine that walks a model's decoder blocks."""

from . import magnitude, sparsegpt, wanda  # noqa: F401  (importing registers the pruners)
from .base import Pruner, RunningMean
from .registry import PRUNERS, get_pruner, register_pruner

__all__ = ["PRUNERS", "Pruner", "RunningMean", "get_pruner", "register_pruner"]
