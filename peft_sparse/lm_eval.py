"""lm-evaluation-harness plugin: ``--model peft_sparse`` and lm-eval's unchanged command line.

lm-eval has no hook that imports a plugin, so its own ``lm-eval`` command cannot load a packed checkpoint (``Unknown
quantization type, got peft_sparse``) or an SPP / SLoRB adapter (``KeyError: 'SPP'``). This module imports
peft_sparse (which registers both), registers the model name ``peft_sparse`` and then runs lm-eval's CLI as is::

    python -m peft_sparse.lm_eval run --model peft_sparse --model_args pretrained=DIR,peft=ADAPTER --tasks boolq
    peft-sparse lm-eval run --model peft_sparse ...          # the same

``--model hf`` works there too; ``peft_sparse`` adds the checkpoint's sparsity to ``results["config"]``.
Importing this module needs lm-eval (``pip install peft_sparse[eval]``).
"""

from __future__ import annotations

import sys

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from . import __version__
from .export import sparsity_config_of


@register_model("peft_sparse")
class SparseHFLM(HFLM):
    """lm-eval's ``HFLM`` with peft_sparse loaded; ``get_model_info`` also records the sparsity and adapter."""

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        model = self._model
        adapter = getattr(model, "peft_config", {}).get("default") if hasattr(model, "get_base_model") else None
        config = sparsity_config_of(model.get_base_model() if adapter is not None else model)
        info["peft_sparse"] = {
            "version": __version__,
            "pattern": None if config is None else str(config.sparsity_pattern),
            "method": None if config is None else config.method,
            "adapter": None if adapter is None else str(getattr(adapter.peft_type, "value", adapter.peft_type)),
        }
        return info


def main(argv: list[str] | None = None) -> None:
    """lm-eval's own command line (``argv``, default ``sys.argv[1:]``) with the ``peft_sparse`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = ["lm-eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
