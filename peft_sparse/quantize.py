"""``peft_sparse.quantize``: quantize the kept values of a model that is already sparse, its mask kept."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import SparsityConfig
from .modeling import out_in
from .prune import resolve_calibration
from .pruning import engine
from .pruning.base import Pruner, PruneResult
from .pruning.registry import get_quantizer
from .pruning.report import PruneReport
from .sparsity import SparsityPattern, nm_violations


class ExistingMask(Pruner):
    """The "pruner" of an already-sparse model: keeps exactly its non-zeros (AST / SPP outputs, packed reloads)."""

    needs_data = False
    name = "existing"

    def prune(self, weight: torch.Tensor, stats: Any) -> PruneResult:
        return PruneResult(weight, weight != 0)


def check_sparse(plan: engine.Plan, pattern: SparsityPattern) -> None:
    """Raise, naming the first offending layer, if a target breaks the declared N:M pattern."""
    if not pattern.is_nm:
        return
    for targets in plan.targets:
        for name, module in targets.items():
            violations = nm_violations(out_in(module), pattern.n, pattern.m)
            if violations:
                raise ValueError(
                    f"{name} is not {pattern} sparse ({violations} groups of {pattern.m} hold more than {pattern.n} "
                    f"non-zeros); prune it first (peft_sparse.prune / peft-sparse prune with --bits), or declare the "
                    "pattern it has."
                )


def quantize(
    model: nn.Module,
    config: SparsityConfig,
    calibration: torch.Tensor | str | None = None,
    tokenizer: Any = None,
) -> PruneReport:
    """Quantize the kept values of an already-sparse ``model`` in place with ``config.quantizer``, one decoder block
    at a time (the walk of :func:`peft_sparse.prune`, with the existing mask instead of a pruner).

    ``config`` declares the pattern the model has (checked on every target before any work; ``sparsity=0.0`` for a
    dense model), ``bits`` / ``group_size`` / ``symmetric`` and the quantizer (``"gptq"``, ``"awq"`` or ``"rtn"``;
    ``"joint"`` prunes while it quantizes, so it is refused here). Pruned weights stay exactly +0.0; each layer
    records its grid (``weight_scale``, ``weight_zero_point``).
    """
    if config.bits is None:
        raise ValueError("quantize needs bits=4 or bits=8 in the config.")
    name = config.resolved_quantizer
    if name == "joint":
        raise ValueError("quantize keeps the model's mask: choose quantizer='gptq', 'awq' or 'rtn' ("
                         "'joint' prunes and quantizes in one sweep: use peft_sparse.prune with method='sparsegpt').")
    pattern = config.sparsity_pattern
    options = [config.quantizer_config]
    plan = engine.plan(model, pattern, config.targets, config.ignore, options, config.scheme)
    check_sparse(plan, pattern)
    pruner = engine.with_quantizer(ExistingMask(None, pattern), config)
    ids = resolve_calibration(model, config, calibration, tokenizer, needed=get_quantizer(name).needs_data)
    report = engine.run(model, config, plan, ids, pruner=pruner)
    model.peft_sparse_config = config
    return report
