"""Export: the dense and packed checkpoint formats, the transformers quantizer that loads them, cards and the Hub."""

from .card import Perplexity, model_card
from .formats import FORMATS, LinearSizes, SaveFormat, get_format, linear_sizes, save_pretrained, sparsity_config_of
from .quantizer import SparsityHfQuantizer, register
from .semi_structured import to_semi_structured

register()  # on import: from_pretrained of a packed checkpoint needs quant_method "peft_sparse" known

from .hub import push_to_hub  # noqa: E402 (after register(): the Hub helpers load packed checkpoints)

__all__ = [
           "FORMATS",
           "LinearSizes",
           "Perplexity",
           "SaveFormat",
           "SparsityHfQuantizer",
           "get_format",
           "linear_sizes",
           "model_card",
           "push_to_hub",
           "register",
           "save_pretrained",
           "sparsity_config_of",
           "to_semi_structured",
]
