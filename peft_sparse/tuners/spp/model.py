"""SPPModel: the BaseTuner that swaps targeted Linear/Conv1D layers for SPP layers."""

from __future__ import annotations

from typing import Any

from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from .config import SPPConfig
from .layer import SPPLayer, SPPLinear

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


class SPPModel(BaseTuner):
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
    tuner_layer_cls = SPPLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_SPP_TARGET_MODULES_MAPPING

    def _create_and_replace(
        self,
        spp_config: SPPConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if isinstance(target, SPPLayer):
            target.update_layer(adapter_name, spp_config)
            return
        new_module = SPPLinear(target, adapter_name, spp_config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)
