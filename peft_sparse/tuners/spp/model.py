"""SPPModel: the BaseTuner that swaps targeted Linear/Conv1D layers for SPP layers."""

from __future__ import annotations

from torch import nn

from ...modeling import out_in
from .._base import ReplacingTuner
from .config import SPPConfig
from .layer import SPPLayer, SPPLinear, check_spp_target

_DECODER_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# The paper adapts every projection of attention and MLP (Sec. 4.1), not only q/v as LoRA's defaults do.
TRANSFORMERS_MODELS_TO_SPP_TARGET_MODULES_MAPPING: dict[str, list[str]] = {
    "llama": _DECODER_PROJECTIONS,
    "mistral": _DECODER_PROJECTIONS,
    "qwen2": _DECODER_PROJECTIONS,
    "qwen3": _DECODER_PROJECTIONS,
    "gemma": _DECODER_PROJECTIONS,
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}


class SPPModel(ReplacingTuner):
    """
    Sparsity-Preserved PEFT model, created with ``peft.get_peft_model(model, SPPConfig(...))`` after
    ``import peft_sparse``.

    Example:
        ```py
        >>> import peft_sparse
        >>> from peft import get_peft_model
        >>> model = get_peft_model(pruned_model, peft_sparse.SPPConfig(r=16))
        >>> merged = model.merge_and_unload()  # still exactly N:M
        ```
    """

    prefix: str = "spp_"
    method_name = "SPP"
    tuner_layer_cls = SPPLayer
    layer_cls = SPPLinear
    target_module_mapping = TRANSFORMERS_MODELS_TO_SPP_TARGET_MODULES_MAPPING

    def check_target(self, config: SPPConfig, key: str, base_layer: nn.Module) -> None:
        super().check_target(config, key, base_layer)
        check_spp_target(key, out_in(base_layer).shape[0], config.r)
