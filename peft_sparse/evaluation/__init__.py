"""Evaluation of (sparse) language models."""

from .perplexity import PerplexityResult, load_eval_text, perplexity, token_windows

__all__ = ["PerplexityResult", "load_eval_text", "perplexity", "token_windows"]
