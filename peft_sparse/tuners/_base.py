"""What SPP and SLoRB layers and models share: the peft forward/unmerge skeleton and module replacement."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _maybe_include_all_linear_layers
from torch import nn

from ..modeling import check_sparse_layer
from ..quantization.kernels import refuse_kernels


class AdapterLinearMixin:
    """peft's forward/unmerge protocol for a layer whose adapters live in ``adapter_layer_names[0]``.

    Subclasses provide ``adapter_output(name, x)`` (the residual branch) and ``unmerge_one(name)``; a tuner whose
    adapters do not simply add (SPP multiplies W) overrides ``adapter_outputs``.
    """

    def adapters(self) -> nn.ParameterDict:
        return getattr(self, self.adapter_layer_names[0])

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        names = [name for name in self.active_adapters if name in self.adapters()]
        for output in self.adapter_outputs(names, x):
            result = result + output.to(result.dtype)
        return result

    def adapter_outputs(self, names: list[str], x: torch.Tensor) -> Iterator[torch.Tensor]:
        """The residual branches of the active adapters ``names``; independent adapters simply add."""
        return (self.adapter_output(name, x) for name in names)

    def unmerge(self) -> None:
        """Undo merges in reverse order, one adapter at a time."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.adapters():
                self.unmerge_one(name)


class ReplacingTuner(BaseTuner):
    """A BaseTuner that wraps each target in ``layer_cls`` (or adds an adapter to an existing wrapper).

    Every target is checked (``check_target``) before the first one is replaced, so a bad target fails before any
    weight is changed (SLoRB prunes in place) and the error names the module.
    """

    layer_cls: type[nn.Module]
    method_name: str

    def check_target(self, config, key: str, base_layer: nn.Module) -> None:
        """Raise, naming ``key`` and the fix, if ``config`` cannot adapt ``base_layer``."""
        refuse_kernels(base_layer, self.method_name, key)
        try:
            check_sparse_layer(base_layer, self.method_name)
        except TypeError as error:
            raise TypeError(f"{key}: {error}") from None

    def _prepare_model(self, peft_config, model: nn.Module) -> None:
        _maybe_include_all_linear_layers(peft_config, model)  # peft expands "all-linear" only after this hook
        for key, base_layer in self._targets(peft_config, model):
            self.check_target(peft_config, key, base_layer)

    def _targets(self, peft_config, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        """``(key, base layer)`` of each module the adapter will wrap, skipping the insides of tuner layers."""
        tuner_prefixes: list[str] = []
        for key, module in model.named_modules():
            if not key or key.startswith(tuple(tuner_prefixes)):
                continue
            if isinstance(module, BaseTunerLayer):
                tuner_prefixes.append(key + ".")
            if self._check_target_module_exists(peft_config, key):
                yield key, module.get_base_layer() if isinstance(module, BaseTunerLayer) else module

    def layer_kwargs(self, current_key: str) -> dict[str, Any]:
        """Extra keyword arguments for the layer of ``current_key`` (none by default)."""
        return {}

    def _create_and_replace(
        self, config, adapter_name: str, target: nn.Module, target_name: str, parent: nn.Module, current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        kwargs = self.layer_kwargs(current_key)
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, config, **kwargs)
            return
        new_module = self.layer_cls(target, adapter_name, config, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)
