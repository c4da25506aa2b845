"""``push_to_hub``: one commit holding the checkpoint and its peft_sparse card.

``model.push_to_hub`` and ``PeftModel.push_to_hub`` overwrite any README that saving wrote, so this helper saves to a
temporary directory, writes the card there, and uploads the folder once.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi
from torch import nn

from ..config import SparsityConfig
from .card import Perplexity, model_card
from .formats import linear_sizes, resolve_for_save, save_pretrained, sparsity_config_of


def _stage(obj: Any, directory: Path, format: str | None, config: SparsityConfig | None, tokenizer: Any,
           perplexity: Perplexity | None, card_kwargs: dict[str, Any]) -> None:
    """Save ``obj`` (a model, a PeftModel with SPP/SLoRB adapters, or a finalized SparseTrainer) plus its card."""
    from peft import PeftModel

    from ..training import SparseTrainer

    if isinstance(obj, SparseTrainer):
        if obj.sparse_layers:
            raise ValueError("Call trainer.finalize() before pushing: the model still has its training masks.")
        model = obj.accelerator.unwrap_model(obj.model)
        config = config or obj.sparsity_config
        card_kwargs.setdefault("tags", ["sparse-retraining"])
        obj = model
    if isinstance(obj, PeftModel):
        base = obj.get_base_model()
        config = config or sparsity_config_of(base)
        if config is None:
            raise ValueError("The adapter's base model carries no SparsityConfig; pass config=SparsityConfig(...).")
        obj.save_pretrained(directory)  # the adapter; its base model is referenced by base_model in the card
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        resolved = resolve_for_save(base, config, format or config.resolved_format)
        peft_type = next(iter(obj.peft_config.values())).peft_type
        snippet = ("from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n"
                   'base = AutoModelForCausalLM.from_pretrained("{base_model}")\n'
                   'model = PeftModel.from_pretrained(base, "{repo}")')
        card = model_card(base, resolved, resolved.format, library_name="peft", perplexity=perplexity,
                          load_snippet=snippet, tags=[str(getattr(peft_type, "value", peft_type)).lower()],
                          **card_kwargs)
    else:
        if not isinstance(obj, nn.Module):
            raise TypeError(f"push_to_hub takes a model, a PeftModel or a SparseTrainer, not {type(obj).__name__}.")
        config = config or sparsity_config_of(obj)
        save_pretrained(obj, directory, format, config=config, tokenizer=tokenizer)
        resolved = resolve_for_save(obj, config, format or config.resolved_format)
        card = model_card(obj, resolved, resolved.format, perplexity=perplexity, sizes=linear_sizes(directory),
                          **card_kwargs)
    card.save(directory / "README.md")


def push_to_hub(obj: Any, repo_id: str, *, format: str | None = None, config: SparsityConfig | None = None,
                tokenizer: Any = None, perplexity: Perplexity | None = None, private: bool | None = None,
                token: str | None = None, commit_message: str = "Upload sparse model (peft_sparse)",
                **card_kwargs: Any) -> str:
    """Upload ``obj`` and its card to ``repo_id`` in one commit; returns the commit URL.

    Args:
        obj: a sparse model, a ``PeftModel`` (SPP / SLoRB adapters on a sparse base) or a finalized ``SparseTrainer``.
        format: ``"packed"`` / ``"dense"`` (default: the config's).
        perplexity: a measured :class:`Perplexity` for the card's model-index.
        card_kwargs: passed to :func:`peft_sparse.export.card.model_card` (``base_model``: by default the model's
            (or the adapter's base model's) own Hub name; ``calibration``, ...).
    """
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="peft-sparse-push-") as scratch:
        directory = Path(scratch) / "repo"
        _stage(obj, directory, format, config, tokenizer, perplexity,  # all checks before the Hub
               {"repo_id": repo_id, **card_kwargs})
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(directory), commit_message=commit_message)
    return str(getattr(info, "commit_url", info))
