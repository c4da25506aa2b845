"""One-shot pruners (magnitude, Wanda, SparseGPT, WRP), the DSnoT refiner, and the engine that walks decoder blocks."""

from . import dsnot, magnitude, sparsegpt, wanda, wrp  # noqa: F401  (importing registers the pruners and refiners)
from .base import Pruner, PruneResult, Refined, Refiner, RunningMean
from .registry import PRUNERS, REFINERS, get_pruner, get_refiner, register_pruner, register_refiner

__all__ = [
    "PRUNERS",
    "REFINERS",
    "PruneResult",
    "Pruner",
    "Refined",
    "Refiner",
    "RunningMean",
    "get_pruner",
    "get_refiner",
    "register_pruner",
    "register_refiner",
]
