"""Evaluation of (sparse) language models: perplexity, and task accuracy through lm-evaluation-harness."""

from .harness import evaluate, prepare_tasks, task_metrics
from .perplexity import PerplexityResult, load_eval_text, perplexity, token_windows

__all__ = ["PerplexityResult", "evaluate", "load_eval_text", "perplexity", "prepare_tasks", "task_metrics",
           "token_windows"]
