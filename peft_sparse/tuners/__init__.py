"""Sparsity-preserving PEFT tuners. Importing this package registers ``"SPP"`` and ``"SLORB"`` with peft."""

from .slorb import SLoRBConfig, SLoRBModel, get_slorb_model
from .spp import SPPConfig, SPPModel

__all__ = ["SLoRBConfig", "SLoRBModel", "SPPConfig", "SPPModel", "get_slorb_model"]
