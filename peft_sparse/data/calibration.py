"""Seeded calibration windows, drawn exactly like the Wanda/SparseGPT loaders.

Document sources (``.jsonl``, the embedded corpus, C4) follow the reference C4 sampler: pick a random document until
one is longer than ``seqlen`` tokens, then a random window inside it. Plain text (a ``.txt``/``.raw`` file,
WikiText-2) follows the reference WikiText-2 sampler: tokenize the whole text once and draw random offsets. Both use
Python's ``random`` seeded with ``seed`` and the same call sequence, so a seed and a file give the very windows the
reference scripts would.
"""

from __future__ import annotations

import random

import torch

from .sources import EMBEDDED, embedded_documents, hub_texts, is_local_source, read_local


def _check_counts(nsamples: int, seqlen: int) -> None:
    for name, value in (("nsamples", nsamples), ("seqlen", seqlen)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _token_ids(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt").input_ids


def sample_document_windows(
    docs: list[str], tokenizer, nsamples: int, seqlen: int, seed: int = 0
) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens, each from a random document longer than ``seqlen`` tokens.

    Documents found too short are remembered, so if none is long enough the loop stops with an error (naming the
    longest length) instead of spinning forever; this does not change the random sequence.
    """
    _check_counts(nsamples, seqlen)
    if not docs:
        raise ValueError("No documents to sample calibration windows from.")
    rng_state = random.getstate()
    random.seed(seed)
    too_short: set[int] = set()
    longest = 0
    windows = []
    try:
        for _ in range(nsamples):
            while True:
                index = random.randint(0, len(docs) - 1)
                if index in too_short:
                    continue
                ids = _token_ids(tokenizer, docs[index])
                if ids.shape[1] > seqlen:
                    break
                too_short.add(index)
                longest = max(longest, ids.shape[1])
                if len(too_short) == len(docs):
                    raise ValueError(
                        f"No document is longer than seqlen={seqlen} tokens (the longest has {longest}); "
                        f"use a smaller seqlen (at most {longest - 1}) or a source with longer documents."
                    )
            start = random.randint(0, ids.shape[1] - seqlen - 1)
            windows.append(ids[:, start : start + seqlen])
    finally:
        random.setstate(rng_state)  # seeding must not leak into the caller's global random stream
    return torch.cat(windows).long()


def sample_text_windows(text: str, tokenizer, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens from one text tokenized as a whole."""
    _check_counts(nsamples, seqlen)
    ids = _token_ids(tokenizer, text)
    total = ids.shape[1]
    if total <= seqlen:
        raise ValueError(
            f"The text has only {total} tokens, not more than seqlen={seqlen}; use a smaller seqlen or more text."
        )
    rng_state = random.getstate()
    random.seed(seed)
    try:
        starts = [random.randint(0, total - seqlen - 1) for _ in range(nsamples)]
    finally:
        random.setstate(rng_state)
    return torch.cat([ids[:, start : start + seqlen] for start in starts]).long()


def _calibration_corpus(source: str | None) -> str | list[str]:
    """Resolve ``source`` to one text (offset sampling) or a list of documents (document sampling)."""
    if source is None or source == EMBEDDED:
        return embedded_documents("calibration")
    if source == "c4":
        return hub_texts("c4", "train")
    if source == "wikitext2":
        return " ".join(hub_texts("wikitext2", "train"))  # the reference joins the train rows with a space
    if is_local_source(source):
        return read_local(source)
    return hub_texts(source, "train")  # raises the "unknown dataset" error


def load_calibration(
    source: str | None, tokenizer, nsamples: int = 128, seqlen: int = 2048, seed: int = 0
) -> torch.Tensor:
    """Calibration token windows, a ``LongTensor`` of shape ``(nsamples, seqlen)``.

    Args:
        source: ``None`` or ``"embedded"`` (built-in offline text), ``"c4"`` / ``"wikitext2"`` (Hub), or a local
            ``.txt``/``.raw`` text file or ``.jsonl`` file with a ``text`` field.
        tokenizer: a Hugging Face tokenizer; special tokens are added as the reference loaders do.
        nsamples / seqlen / seed: number of windows, tokens per window, seed of Python's ``random``.
    """
    _check_counts(nsamples, seqlen)
    corpus = _calibration_corpus(source)
    if isinstance(corpus, str):
        return sample_text_windows(corpus, tokenizer, nsamples, seqlen, seed)
    return sample_document_windows(corpus, tokenizer, nsamples, seqlen, seed)
