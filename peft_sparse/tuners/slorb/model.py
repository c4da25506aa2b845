"""SLoRBModel: BaseTuner for SLoRB, plus ``get_slorb_model`` for explicit per-module masks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from peft import PeftModel, get_peft_model
from torch import nn

from .._base import ReplacingTuner
from .._weights import from_out_in
from ..spp.model import TRANSFORMERS_MODELS_TO_SPP_TARGET_MODULES_MAPPING
from .config import SLoRBConfig
from .layer import SLoRBLayer, SLoRBLinear

# Masks are tensors, so they cannot live in the JSON config; get_slorb_model hands them to _create_and_replace here.
_PENDING_MASKS: ContextVar[dict[str, torch.Tensor]] = ContextVar("_PENDING_MASKS", default={})


def _mask_grad(mask: torch.Tensor):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        return grad * mask.to(grad.device, grad.dtype)

    return hook


class SLoRBModel(ReplacingTuner):
    """
    Sparse Low-Rank Boosting model, created with ``get_peft_model(model, SLoRBConfig(...))`` after
    ``import peft_sparse`` (or [`get_slorb_model`] to pass explicit masks).

    ``merge_and_unload`` refuses to densify the sparse weights unless ``allow_dense=True``.
    """

    prefix: str = "slorb_"
    tuner_layer_cls = SLoRBLayer
    layer_cls = SLoRBLinear
    target_module_mapping = TRANSFORMERS_MODELS_TO_SPP_TARGET_MODULES_MAPPING

    def layer_kwargs(self, current_key: str) -> dict[str, Any]:
        return {"mask": _PENDING_MASKS.get().get(current_key)}

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        for layer in self._slorb_layers():
            for name in layer.slorb_S:
                if not self.peft_config[name].trainable_base or name not in self.active_adapters:
                    continue
                weight = layer.get_base_layer().weight
                weight.requires_grad_(True)
                if name in layer.base_masks:
                    weight.register_hook(_mask_grad(from_out_in(layer.get_base_layer(), layer.base_masks[name])))

    def _slorb_layers(self) -> Iterator[SLoRBLayer]:
        return (module for module in self.model.modules() if isinstance(module, SLoRBLayer))

    def extra_parameter_fraction(self, adapter_name: str = "default") -> float:
        """Parameters of S over parameters of the adapted weights (1/k for every layer)."""
        extra = sum(layer.slorb_S[adapter_name].numel() for layer in self._slorb_layers())
        base = sum(layer.get_base_layer().weight.numel() for layer in self._slorb_layers())
        return extra / base

    def side_weights(self, adapter_name: str = "default") -> dict[str, tuple[torch.Tensor, int]]:
        """``{base module name: (S, k)}``: the un-mergeable side-car an exporter stores next to the N:M weights."""
        return {
            name: (module.slorb_S[adapter_name].detach(), module.k[adapter_name])
            for name, module in self.model.named_modules()
            if isinstance(module, SLoRBLayer) and adapter_name in module.slorb_S
        }

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
        allow_dense: bool = False,
    ) -> nn.Module:
        """Merge S into W. This densifies W, so it is refused unless ``allow_dense=True``."""
        if not allow_dense:
            raise ValueError(
                "SLoRB cannot be merged into an N:M weight (S P is dense). Keep S as a separate module "
                "(save the adapter or use side_weights()), or pass allow_dense=True to get a dense model."
            )
        with self._dense_merge_allowed():
            return super().merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)

    @contextmanager
    def _dense_merge_allowed(self) -> Iterator[None]:
        layers = list(self._slorb_layers())
        for layer in layers:
            layer.allow_dense_merge = True
        try:
            yield
        finally:
            for layer in layers:
                layer.allow_dense_merge = False


def get_slorb_model(
    model: nn.Module,
    config: SLoRBConfig,
    masks: dict[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
    **kwargs: Any,
) -> PeftModel:
    """``get_peft_model`` with explicit keep-masks ``{module name: bool (out, in)}`` for the mean init.

    Module names are those of ``model.named_modules()`` (a trailing ``.weight`` is accepted). Masks take precedence
    over ``config.pattern``; the AST trainer uses this with ``prune_base=False``.
    """
    pending = {name.removesuffix(".weight"): mask for name, mask in (masks or {}).items()}
    token = _PENDING_MASKS.set(pending)
    try:
        return get_peft_model(model, config, adapter_name=adapter_name, **kwargs)
    finally:
        _PENDING_MASKS.reset(token)
