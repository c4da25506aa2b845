"""Flip-rate curves (AST section 3.3 / appendix A.5) drawn from Trainer logs. Needs the ``plot`` extra."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

Runs = Mapping[str, "Sequence[dict] | str | os.PathLike"]


def _load_history(source: Sequence[dict] | str | os.PathLike) -> list[dict]:
    """A ``log_history`` list, or the path of a ``trainer_state.json`` holding one."""
    if isinstance(source, (str, os.PathLike)):
        with open(source) as handle:
            return json.load(handle)["log_history"]
    return list(source)


def flip_series(history: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    """Steps and values of ``key`` (``"flip_rate"`` or ``"initial_flip_rate"``) in a log history."""
    rows = [row for row in history if key in row]
    return [row["step"] for row in rows], [row[key] for row in rows]


def plot_flip_rates(runs: Runs, path: str | os.PathLike) -> None:
    """Draw flip rate and initial flip rate of each run (``{label: log_history or trainer_state.json}``) to PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("plot_flip_rates needs matplotlib: pip install 'peft_sparse[plot]'.") from error
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, source in runs.items():
        history = _load_history(source)
        for axis, key in zip(axes, ("flip_rate", "initial_flip_rate")):
            axis.plot(*flip_series(history, key), marker=".", label=label)
    for axis, title in zip(axes, ("flip rate (vs previous mask)", "initial flip rate (vs step-0 mask)")):
        axis.set_title(title)
        axis.set_xlabel("optimizer step")
        axis.set_yscale("symlog", linthresh=1e-6)  # rates span 1e-6 .. 1e-1 and may be exactly 0
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
