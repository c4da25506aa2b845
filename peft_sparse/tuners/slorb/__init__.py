"""SLoRB tuner (registered with peft as ``"SLORB"`` when imported)."""

from .._peft_types import register_external_peft_method
from .config import SLORB_INITS, SLoRBConfig
from .layer import SLoRBLayer, SLoRBLinear, slorb_dense_delta, slorb_group_sum, slorb_mean_init
from .model import SLoRBModel, get_slorb_model

register_external_peft_method("slorb", config_cls=SLoRBConfig, model_cls=SLoRBModel, prefix="slorb_")

__all__ = [
    "SLORB_INITS",
    "SLoRBConfig",
    "SLoRBLayer",
    "SLoRBLinear",
    "SLoRBModel",
    "get_slorb_model",
    "slorb_dense_delta",
    "slorb_group_sum",
    "slorb_mean_init",
]
