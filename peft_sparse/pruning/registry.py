"""Name -> class registries of pruners and refiners; each declares its options dataclass, validated by the config."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from torch import nn

    from ..sparsity import SparsityPattern

T = TypeVar("T", bound=type)

PRUNERS: dict[str, type] = {}
REFINERS: dict[str, type] = {}
QUANTIZERS: dict[str, type] = {}


@dataclass(frozen=True)
class PrunerOptions:
    """Base of every pruner's and refiner's options: checks against the pattern and each layer, run before any work."""

    def check_pattern(self, pattern: SparsityPattern) -> None:
        """Raise if these options cannot be used with ``pattern``."""

    def check_layer(self, shape: tuple[int, int], name: str) -> None:
        """Raise if these options cannot prune the ``(out, in)`` layer ``name``."""

    def check_blocks(self, blocks: nn.ModuleList) -> None:
        """Raise if these options cannot work on the model's decoder ``blocks`` (AWQ: unknown norm/linear pairs)."""


@dataclass(frozen=True)
class NoOptions(PrunerOptions):
    """Options of a pruner that has none."""


def _register(table: dict[str, type], kind: str, name: str) -> Callable[[T], T]:
    def wrap(cls: T) -> T:
        if name in table:
            raise ValueError(f"A {kind} named {name!r} is already registered ({table[name].__qualname__}).")
        cls.name = name
        table[name] = cls
        return cls

    return wrap


def register_pruner(name: str) -> Callable[[T], T]:
    return _register(PRUNERS, "pruner", name)


def register_refiner(name: str) -> Callable[[T], T]:
    return _register(REFINERS, "refiner", name)


def register_quantizer(name: str) -> Callable[[T], T]:
    return _register(QUANTIZERS, "quantizer", name)


def get_pruner(name: str) -> type:
    try:
        return PRUNERS[name]
    except KeyError:
        raise ValueError(f"Unknown pruning method {name!r}; choose one of {sorted(PRUNERS)}.") from None


def get_refiner(name: str) -> type:
    try:
        return REFINERS[name]
    except KeyError:
        raise ValueError(f"Unknown refiner {name!r}; choose one of {sorted(REFINERS)} (or no refine).") from None


def get_quantizer(name: str) -> type:
    try:
        return QUANTIZERS[name]
    except KeyError:
        raise ValueError(f"Unknown quantization method {name!r}; choose one of {sorted(QUANTIZERS)}.") from None
