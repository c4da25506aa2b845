"""Annealing SR-STE decay schedule (AST section 4.3)."""

from __future__ import annotations


def srste_lambda(step: int, final: float, ramp_steps: int) -> float:
    """Decay at optimizer step ``step``: ``final * step / ramp_steps`` during the ramp, then ``final``.

    A low decay early lets masks explore (high flip rate); the full decay later stabilises them, like lowering the
    temperature in simulated annealing. ``ramp_steps=0`` is the static SR-STE ablation.
    """
    if ramp_steps <= 0:
        return final
    return final * min(step, ramp_steps) / ramp_steps


def resolve_ramp_steps(ramp_steps: int | None, total_steps: int) -> int:
    """``None`` means the first quarter of training (the paper ramps over 10k of 40k iterations)."""
    return max(total_steps // 4, 1) if ramp_steps is None else ramp_steps
