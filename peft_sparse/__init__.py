"""peft_sparse: HuggingFace-native N:M sparsity."""

from .config import SparsityConfig
from .export import (  # registers quant_method "peft_sparse" with transformers
           Perplexity,
           SparsityHfQuantizer,
           model_card,
           push_to_hub,
           save_pretrained,
           to_semi_structured,
)
from .sparsity import SparsityPattern

__version__ = "0.1.0"

__all__ = ["Perplexity", "SparsityConfig", "SparsityHfQuantizer", "SparsityPattern", "__version__", "model_card",
           "push_to_hub", "save_pretrained", "to_semi_structured"]

# Importing the tuners registers the "SPP" and "SLORB" PEFT types with peft (the only import-time side effect).
from .tuners import SLoRBConfig, SLoRBModel, SPPConfig, SPPModel, get_slorb_model

__all__ += ["SLoRBConfig", "SLoRBModel", "SPPConfig", "SPPModel", "get_slorb_model"]

from .training import SparseTrainer, SparseTrainingArguments, plot_flip_rates

__all__ += ["SparseTrainer", "SparseTrainingArguments", "plot_flip_rates"]

from .prune import prune
from .pruning.report import PruneReport

__all__ += ["PruneReport", "prune"]

from .data import embedded_text, load_calibration
from .evaluation import PerplexityResult, perplexity
from .models import load_model_and_tokenizer, smollm2

__all__ += ["PerplexityResult", "embedded_text", "load_calibration", "load_model_and_tokenizer", "perplexity", "smollm2"]
