"""Name -> pruner class registry. Each pruner declares its own options dataclass, validated by SparsityConfig."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T", bound=type)

PRUNERS: dict[str, type] = {}


@dataclass(frozen=True)
class NoOptions:
    """Options of a pruner that has none."""


def register_pruner(name: str) -> Callable[[T], T]:
    def wrap(cls: T) -> T:
        if name in PRUNERS:
            raise ValueError(f"A pruner named {name!r} is already registered ({PRUNERS[name].__qualname__}).")
        cls.name = name
        PRUNERS[name] = cls
        return cls

    return wrap


def get_pruner(name: str) -> type:
    try:
        return PRUNERS[name]
    except KeyError:
        raise ValueError(f"Unknown pruning method {name!r}; choose one of {sorted(PRUNERS)}.") from None
