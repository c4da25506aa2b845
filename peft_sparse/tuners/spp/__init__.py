"""SPP tuner (registered with peft as ``"SPP"`` when imported)."""

from .._peft_types import register_external_peft_method
from .config import SPPConfig
from .layer import SPPLayer, SPPLinear, spp_delta_blocked, spp_delta_naive, spp_multiplier
from .model import SPPModel

register_external_peft_method("spp", config_cls=SPPConfig, model_cls=SPPModel, prefix="spp_")

__all__ = ["SPPConfig", "SPPLayer", "SPPLinear", "SPPModel", "spp_delta_blocked", "spp_delta_naive", "spp_multiplier"]
