"""Export: the dense and packed checkpoint formats, the transformers quantizer that loads them, cards and the Hub."""

from .formats import FORMATS, SaveFormat, get_format, save_pretrained, sparsity_config_of
from .quantizer import SparsityHfQuantizer, register

register()  # on import: from_pretrained of a packed checkpoint needs quant_method "peft_sparse" known

__all__ = ["FORMATS", "SaveFormat", "SparsityHfQuantizer", "get_format", "register", "save_pretrained",
           "sparsity_config_of"]
