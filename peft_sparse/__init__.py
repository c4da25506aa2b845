"""peft_sparse: HuggingFace-native N:M sparsity.

Importing the package registers the "SPP" and "SLORB" PEFT types with peft and the "peft_sparse" quantization
method with transformers (import-time side effects, so the tuners and the export layer load eagerly). Everything
else (the trainers, pruning, data, evaluation, model loading) loads on first use, so ``import peft_sparse`` and
``peft-sparse --help`` do not pay for ``transformers.Trainer``, datasets or trl.
"""

from __future__ import annotations

import importlib

from .config import SparsityConfig
from .export import (  # registers quant_method "peft_sparse" with transformers
    Perplexity,
    SparsityHfQuantizer,
    model_card,
    push_to_hub,
    save_pretrained,
    to_semi_structured,
)
from .prune import prune  # eager: the submodule of the same name would otherwise shadow the function
from .quantize import quantize  # eager, for the same reason
from .sparsity import SparsityPattern
from .tuners import SLoRBConfig, SLoRBModel, SPPConfig, SPPModel, get_slorb_model

__version__ = "0.1.0"

_LAZY = {
    "SparseTrainer": ".training",
    "SparseTrainingArguments": ".training",
    "SparseSFTTrainer": ".training",
    "SparseSFTConfig": ".training",
    "plot_flip_rates": ".training",
    "PruneReport": ".pruning.report",
    "embedded_text": ".data",
    "load_calibration": ".data",
    "PerplexityResult": ".evaluation",
    "perplexity": ".evaluation",
    "load_model_and_tokenizer": ".models",
    "smollm2": ".models",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "Perplexity", "SLoRBConfig", "SLoRBModel", "SPPConfig", "SPPModel", "SparsityConfig", "SparsityHfQuantizer",
    "SparsityPattern", "__version__", "get_slorb_model", "model_card", "prune", "push_to_hub", "quantize",
    "save_pretrained", "to_semi_structured", *_LAZY,
]
