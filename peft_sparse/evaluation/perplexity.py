"""Perplexity over non-overlapping windows, the protocol of the Wanda/SparseGPT evaluation.

The whole text is tokenized once and cut into consecutive windows of exactly ``seqlen`` tokens (the remainder is
dropped). Every window is scored with the model's own shifted causal-LM loss, so each contributes ``seqlen - 1``
predictions; ``ppl = exp(total NLL / predicted tokens)``. With equal-length windows this equals the reference
``exp(mean of per-window mean losses)``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from ..data.sources import EMBEDDED, embedded_text, hub_texts, is_local_source, read_local


@dataclass(frozen=True)
class PerplexityResult:
    """Outcome of :func:`perplexity`.

    ``nll`` is the mean negative log-likelihood per predicted token (nats), ``tokens`` the number of predicted
    tokens, ``tokens_per_s`` the input tokens processed per second.
    """

    ppl: float
    nll: float
    tokens: int
    windows: int
    seqlen: int
    seconds: float
    tokens_per_s: float

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def load_eval_text(data: str) -> str:
    """``"wikitext2"`` (Hub test split joined like the reference), ``"embedded"``, a file path, or raw text."""
    if data == "wikitext2":
        return "\n\n".join(hub_texts("wikitext2", "test"))
    if data == EMBEDDED:
        return embedded_text("heldout")
    if "\n" not in data and is_local_source(data):
        content = read_local(data)
        return content if isinstance(content, str) else "\n\n".join(content)
    return data


def _check_window_args(seqlen: int, max_windows: int | None, batch_size: int = 1) -> None:
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 2:
        raise ValueError(f"seqlen must be an integer >= 2 (a window needs a token to predict), got {seqlen!r}.")
    if max_windows is not None and (not isinstance(max_windows, int) or max_windows < 1):
        raise ValueError(f"max_windows must be a positive integer or None, got {max_windows!r}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")


def token_windows(tokenizer, text: str, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """``(windows, seqlen)`` consecutive, non-overlapping token windows of ``text``."""
    _check_window_args(seqlen, max_windows)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    count = ids.numel() // seqlen
    if count == 0:
        raise ValueError(f"The text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}.")
    if max_windows is not None:
        count = min(count, max_windows)
    return ids[: count * seqlen].view(count, seqlen)


@torch.no_grad()
def windows_nll(model, windows: torch.Tensor, batch_size: int = 1, progress: bool = True) -> float:
    """Summed NLL (nats, float64) of all shifted next-token predictions in ``windows``."""
    model.eval()
    device = next(model.parameters()).device
    total = 0.0
    batches = windows.split(batch_size)
    for batch in tqdm(batches, desc="perplexity", unit="batch", disable=not progress):
        batch = batch.to(device)
        loss = model(input_ids=batch, labels=batch).loss  # mean over batch * (seqlen - 1) predictions
        total += loss.double().item() * batch.shape[0] * (batch.shape[1] - 1)
    return total


def perplexity(
    model,
    tokenizer,
    data: str,
    seqlen: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``data`` (see :func:`load_eval_text`) in windows of ``seqlen`` tokens.

    Args:
        data: ``"wikitext2"`` (needs the Hub), ``"embedded"`` (built-in held-out text), a ``.txt``/``.raw`` file
            (read as-is), a ``.jsonl`` file (texts joined by blank lines), or raw text.
        max_windows: score only the first windows (e.g. 64 of 512 tokens, the benchmark protocol).
    """
    _check_window_args(seqlen, max_windows, batch_size)
    windows = token_windows(tokenizer, load_eval_text(data), seqlen, max_windows)
    start = time.perf_counter()
    nll_sum = windows_nll(model, windows, batch_size, progress)
    seconds = time.perf_counter() - start
    predicted = windows.shape[0] * (seqlen - 1)
    nll = nll_sum / predicted
    return PerplexityResult(
        ppl=float(torch.tensor(nll, dtype=torch.float64).exp()),
        nll=nll,
        tokens=predicted,
        windows=windows.shape[0],
        seqlen=seqlen,
        seconds=seconds,
        tokens_per_s=windows.numel() / seconds if seconds > 0 else float("inf"),
    )
