"""``peft_sparse.prune``: one-shot pruning of a Hugging Face causal LM in place."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import SparsityConfig
from .pruning import engine
from .pruning.report import PruneReport


def _check_token_ids(calibration: torch.Tensor, model: nn.Module) -> torch.Tensor:
    vocab = model.get_input_embeddings().weight.shape[0]
    if calibration.dim() != 2 or calibration.dtype.is_floating_point or calibration.dtype == torch.bool:
        raise ValueError(
            f"calibration must be integer token ids of shape (nsamples, seqlen), got {tuple(calibration.shape)} "
            f"{calibration.dtype}; tokenize the text first or pass a dataset name/path with a tokenizer."
        )
    if calibration.numel() == 0 or int(calibration.min()) < 0 or int(calibration.max()) >= vocab:
        raise ValueError(f"calibration token ids must lie in [0, {vocab}) for this model's vocabulary.")
    return calibration.long()


def resolve_calibration(
    model: nn.Module, config: SparsityConfig, calibration: torch.Tensor | str | None, tokenizer: Any,
    needed: bool | None = None,
) -> torch.Tensor | None:
    """Token ids ``(nsamples, seqlen)`` to calibrate with, or ``None`` for data-free methods (which ignore it).
    ``needed`` overrides ``config.needs_calibration`` (quantizing an already-sparse model runs no pruner)."""
    if not (config.needs_calibration if needed is None else needed):
        return None  # data-free: skip the capture and the two forward passes per block
    if isinstance(calibration, torch.Tensor):
        return _check_token_ids(calibration, model)
    if calibration is not None and not isinstance(calibration, str):
        raise TypeError(
            f"calibration must be a LongTensor of token ids, a dataset name/path or None, got {type(calibration)}."
        )
    if tokenizer is None:
        raise ValueError(
            f"Method {config.resolved_quantizer if needed else config.method!r} needs calibration data: pass "
            "`calibration` as token ids (nsamples, seqlen), "
            "or a `tokenizer` (with an optional dataset name/path in `calibration`)."
        )
    from .data import load_calibration  # lazy: the data module pulls in datasets

    ids = load_calibration(calibration, tokenizer, nsamples=config.nsamples, seqlen=config.seqlen, seed=config.seed)
    return _check_token_ids(ids, model)


def prune(
    model: nn.Module,
    config: SparsityConfig,
    calibration: torch.Tensor | str | None = None,
    tokenizer: Any = None,
) -> PruneReport:
    """Prune ``model`` in place with ``config.method`` to ``config``'s pattern, one decoder block at a time.

    Args:
        model: a decoder-only ``transformers`` causal LM (Llama, Mistral, Qwen2, Gemma, Phi, OPT, GPT-2, ...).
        config: what to prune and how (a method, optionally followed by a refiner such as DSnoT).
        calibration: token ids ``(nsamples, seqlen)``, or a dataset name / local file path resolved with
            ``tokenizer`` (``None``: the embedded default corpus). Data-free methods (magnitude) need none.
        tokenizer: used to tokenize a calibration source.

    Returns:
        A :class:`PruneReport` with per-layer sparsity, reconstruction error, time and extra non-zeros. With
        ``method="wrp"`` each pruned layer becomes a :class:`peft_sparse.nn.RecoverLinear`;
        :func:`peft_sparse.nn.merge_recovered` folds the recover matrices back into plain (no longer N:M) weights.

    Bad input (unknown layers, widths not divisible by M, missing calibration) raises before the model is touched.
    """
    plan = engine.plan(model, config.sparsity_pattern, config.targets, config.ignore, config.all_options,
                         config.scheme)
    ids = resolve_calibration(model, config, calibration, tokenizer)
    report = engine.run(model, config, plan, ids)
    model.peft_sparse_config = config  # what peft_sparse.save_pretrained(model, ...) writes
    return report
