"""SLoRBModel: BaseTuner for SLoRB, plus ``get_slorb_model`` for explicit per-module masks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from peft import PeftModel, get_peft_model
from torch import nn

from ...modeling import out_in
from .._base import ReplacingTuner
from ..spp.model import TRANSFORMERS_MODELS_TO_SPP_TARGET_MODULES_MAPPING
from .config import SLoRBConfig
from .layer import SLoRBLayer, SLoRBLinear, check_slorb_target

# Masks are tensors, so they cannot live in the JSON config; get_slorb_model hands them to _create_and_replace here.
_PENDING_MASKS: ContextVar[dict[str, torch.Tensor] | None] = ContextVar("_PENDING_MASKS", default=None)


def _pending_mask(key: str) -> torch.Tensor | None:
    return (_PENDING_MASKS.get() or {}).get(key)


class SLoRBModel(ReplacingTuner):
    """
    Sparse Low-Rank Boosting model, created with ``get_peft_model(model, SLoRBConfig(...))`` after
    ``import peft_sparse`` (or [`get_slorb_model`] to pass explicit masks).

    ``merge_and_unload`` refuses to densify the sparse weights unless ``allow_dense=True``.
    """

    prefix: str = "slorb_"
    method_name = "SLoRB"
    tuner_layer_cls = SLoRBLayer
    layer_cls = SLoRBLinear
    target_module_mapping = TRANSFORMERS_MODELS_TO_SPP_TARGET_MODULES_MAPPING

    def layer_kwargs(self, current_key: str) -> dict[str, Any]:
        return {"mask": _pending_mask(current_key)}

    def check_target(self, config: SLoRBConfig, key: str, base_layer: nn.Module) -> None:
        super().check_target(config, key, base_layer)
        check_slorb_target(key, tuple(out_in(base_layer).shape), config, _pending_mask(key))

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        self._sync_trainable_base()

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        self._sync_trainable_base()

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._sync_trainable_base()

    def _trains_base(self, adapter_name: str) -> bool:
        """``trainable_base`` applies while the adapter is active and was not loaded for inference."""
        config = self.peft_config.get(adapter_name)
        return (
            config is not None and config.trainable_base and not config.inference_mode
            and adapter_name in self.active_adapters
        )

    def _sync_trainable_base(self) -> None:
        """Set every adapted base weight's requires_grad (and its single gradient-mask hook) from the adapters."""
        for layer in self._slorb_layers():
            layer.set_base_trainable(any(self._trains_base(name) for name in layer.slorb_S))

    def _slorb_layers(self) -> Iterator[SLoRBLayer]:
        return (module for module in self.model.modules() if isinstance(module, SLoRBLayer))

    def extra_parameter_fraction(self, adapter_name: str = "default") -> float:
        """Parameters of S (and of X where it is stored) over parameters of the adapted weights.

        1/k with the fixed block-ones projection; a stored X adds n/k per input row, i.e. another 1/k on a square
        layer.
        """
        layers = [layer for layer in self._slorb_layers() if adapter_name in layer.slorb_S]
        extra = sum(
            layer.slorb_S[adapter_name].numel()
            + (layer.slorb_X[adapter_name].numel() if adapter_name in layer.slorb_X else 0)
            for layer in layers
        )
        return extra / sum(layer.get_base_layer().weight.numel() for layer in layers)

    def side_weights(self, adapter_name: str = "default") -> dict[str, tuple[torch.Tensor, int]]:
        """``{base module name: (S, k)}``: the un-mergeable side-car an exporter stores next to the N:M weights.

        Only for the fixed block-ones projection (implied by k); a stored X is part of the side-car itself.
        """
        if any(adapter_name in layer.slorb_X for layer in self._slorb_layers()):
            raise ValueError(
                f"SLoRB adapter {adapter_name!r} stores its projection X (trainable_projection or init='xavier'), so "
                "(S, k) does not describe it; export S and X from the adapter's state dict (save_pretrained)."
            )
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
                "SLoRB cannot be merged into an N:M weight (S X is dense). Keep S as a separate module "
                "(save the adapter or use side_weights()), or pass allow_dense=True to get a dense model."
            )
        with self._dense_merge_allowed():
            return super().merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any) -> nn.Module:
        """Unloading leaves plain base layers, so their gradient-mask hooks go with the SLoRB layers."""
        layers = list(self._slorb_layers())
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        for layer in layers:
            layer.remove_base_grad_hook()
        return model

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
