"""Quantization of the kept values of an N:M sparse model (4 / 8 bit integer grids with per-group scales)."""

from . import awq, methods  # noqa: F401  (importing registers the quantizers)
from .grid import BITS, QuantScheme, codes_of, dequantize, fake_quantize, fit_scales, quantize, quantize_layer
from .methods import Quantizer
from .state import grid_of, set_grid

__all__ = ["BITS", "QuantScheme", "Quantizer", "codes_of", "dequantize", "fake_quantize", "fit_scales", "grid_of",
           "quantize", "quantize_layer", "set_grid"]
