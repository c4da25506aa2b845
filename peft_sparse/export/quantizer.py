"""``SparsityHfQuantizer``: the transformers plugin that reads and writes the packed N:M format.

Registered with ``SparsityConfig`` under ``quant_method="peft_sparse"`` on ``import peft_sparse``, it lets
``from_pretrained`` / ``save_pretrained`` handle packed checkpoints with no other change:

* load: every ``<module>.weight`` is read together with its ``<module>.weight_meta`` (when there is one) and decoded
  back to the exact dense weight (``Unpack``); float values are cast to the requested ``dtype``, the uint8
  metadata never is (``get_new_dtype``). A quantized (v2) weight also brings its ``weight_scale`` (and
  ``weight_zero_point``) and is decoded to the dequantized weight plus those buffers: the in-memory quantized
  model. Side tensors saved next to the weights (SLoRB's ``slorb_S``, WRP's ``recover_*``) are registered as
  buffers of the shapes in the file headers, then filled by the normal loader; layers with recover buffers become
  ``RecoverLinear`` again once loaded;
* save: ``get_state_dict_and_metadata`` packs the sparse modules (quantized ones as their codes) and refuses a
  weight that lost its pattern or its grid; a ``RecoverLinear`` is written under its own name (``<module>.weight``
  packed, ``<module>.recover_*`` as they are);
* prune on load: a dense checkpoint with ``quantization_config=SparsityConfig(method="magnitude")`` is pruned tensor
  by tensor as it is read, exactly like ``peft_sparse.prune``; data-driven methods are refused up front;
* training: PEFT adapters on a packed model train as usual; full fine-tuning with a plain ``Trainer`` is refused
  (it would break the pattern) with a pointer to ``SparseTrainer``.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps, _IdentityOp
from transformers.pytorch_utils import Conv1D
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers import auto as quantizers_auto
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

from ..config import QUANT_METHOD, SparsityConfig
from ..modeling import out_in, select_sparse_modules, to_storage
from ..nn import RecoverLinear, plain_layer
from ..pruning.magnitude import magnitude_prune
from ..quantization import packed
from ..quantization.grid import dequantize
from ..quantization.kernels import IntLinear, dequantize_kernels, kernel_unsupported, kernel_weight, layer_shape
from ..quantization.state import SCALE, ZERO_POINT, grid_of
from ..sparsity import packing
from .modules import SIDE_TENSORS, install_side_tensors, side_tensor_specs, wrap_recovered

META_SUFFIX = "_meta"
logger = logging.getLogger(__name__)


def _parent(model: nn.Module, param_name: str) -> nn.Module:
    return model.get_submodule(param_name.rpartition(".")[0])


class _QuantizerOp(ConversionOps):
    """An op that only reads its quantizer. transformers deep-copies the converter holding it once per checkpoint
    tensor; copying the quantizer (its config, module list, model reference) took longer than decoding the whole
    model, so copies share it."""

    def __init__(self, hf_quantizer: SparsityHfQuantizer) -> None:
        self.hf_quantizer = hf_quantizer

    def __deepcopy__(self, memo: dict[int, Any]) -> _QuantizerOp:
        return type(self)(self.hf_quantizer)


class Unpack(_QuantizerOp):
    """``{weight, weight_meta}`` from the checkpoint -> the dense weight (quantized: ``{weight, weight_meta,
    weight_scale[, weight_zero_point]}`` -> the dequantized weight and its grid buffers); a lone ``weight`` passes
    through."""

    def convert(self, input_dict: dict[str, Any], full_layer_name: str | None = None, model: nn.Module | None = None,
                **kwargs: Any) -> dict[str, torch.Tensor]:
        weight = _single(input_dict["weight"])
        if "weight" + META_SUFFIX not in input_dict:  # norms, embeddings, dense linears
            return {"weight": weight}
        config = self.hf_quantizer.quantization_config
        pattern = config.sparsity_pattern
        module = _parent(model, full_layer_name)
        meta = _single(input_dict["weight" + META_SUFFIX])
        in_features = layer_shape(module)[1]
        if config.scheme is None:
            stored = packing.unpack(weight, meta, in_features, pattern.n, pattern.m, config.resolved_codec,
                                    transpose=isinstance(module, Conv1D))
            return {"weight": stored}  # decoded straight into the storage orientation (Conv1D: (in, out))
        if SCALE not in input_dict:
            raise ValueError(f"{full_layer_name}: a quantized checkpoint without its {SCALE}; the file is incomplete.")
        zero = _single(input_dict[ZERO_POINT]) if ZERO_POINT in input_dict else None
        layer = packed.decode_layer(weight, meta, _single(input_dict[SCALE]), zero, in_features, pattern.n,
                                    pattern.m, config.resolved_codec, config.scheme)
        if isinstance(module, IntLinear):  # the codes go straight into the kernel's int layout, never through floats
            return {"weight": kernel_weight(layer.codes, config.scheme.bits), SCALE: layer.scale}
        weight = to_storage(module, dequantize(layer.codes, layer.scale, layer.zero, layer.scale.dtype))
        return {"weight": weight.contiguous(), SCALE: layer.scale, **({} if zero is None else {ZERO_POINT: zero})}

    @property
    def reverse_op(self) -> ConversionOps:
        return _IdentityOp()  # save_pretrained gets the packed tensors from get_state_dict_and_metadata


class PruneOnLoad(_QuantizerOp):
    """Magnitude-prune one target weight as it is read (in float32 on its (out, in) view, as ``prune`` does)."""

    def convert(self, input_dict: dict[str, Any], full_layer_name: str | None = None, model: nn.Module | None = None,
                **kwargs: Any) -> dict[str, torch.Tensor]:
        ((key, value),) = input_dict.items()
        weight = _single(value)
        module = _parent(model, full_layer_name)
        view = to_storage(module, weight)  # the transpose is its own inverse: storage -> (out, in)
        pruned, _ = magnitude_prune(view.float(), self.hf_quantizer.quantization_config.sparsity_pattern)
        return {key: to_storage(module, pruned.to(weight.dtype)).contiguous()}


def grid_mismatch(name: str, scheme: Any) -> str:
    """Why a sparse module cannot be saved with this config: its grid buffers and the config's ``bits`` disagree."""
    if scheme is None:
        return (f"{name} is quantized (it has a {SCALE}) but the config has no bits; save with the config it was "
                "quantized with (bits, group_size, symmetric).")
    return (f"{name} is not quantized (no {SCALE}) but the config says {scheme}; quantize the model first "
            "(peft_sparse.quantize) or save with bits=None.")


def packed_state_dict(module: nn.Module, targets: set[str], config: SparsityConfig,
                      prefix: str = "") -> dict[str, torch.Tensor]:
    """``module``'s state dict as the packed format stores it, keys prefixed with ``prefix`` (``module``'s name in
    the model: the whole model's or one block's): each target's weight (full names) packed into values (quantized:
    codes) + ``_meta``, refusing one that lost its pattern or its grid; a ``RecoverLinear`` under its own name
    (``X.base.weight`` -> ``X.weight``, ``X.recover_*`` as they are); grid buffers as they are."""
    pattern, codec, scheme = config.sparsity_pattern, config.resolved_codec, config.scheme
    recovered = {f"{name}.base" for name, child in module.named_modules() if isinstance(child, RecoverLinear)}
    state = {}
    for key, tensor in module.state_dict().items():
        local, _, leaf = key.rpartition(".")
        local = local.removesuffix(".base") if local in recovered else local  # X.base.weight -> X.weight
        name = prefix + local
        if leaf == "weight" and name in targets:
            layer = plain_layer(module.get_submodule(local))
            grid = grid_of(layer)
            if (grid is None) != (scheme is None):
                raise ValueError(grid_mismatch(name, scheme))
            if isinstance(layer, IntLinear):  # its weight is the kernel's int layout
                tensor = layer.dequantized_weight()
            if scheme is None:
                stored = packing.pack(to_storage(layer, tensor), pattern.n, pattern.m, codec, name=name)
            else:
                stored = packed.encode_layer(to_storage(layer, tensor), *grid, scheme, pattern.n, pattern.m, codec,
                                             name)
            state[f"{name}.{leaf}"], state[f"{name}.{leaf}{META_SUFFIX}"] = stored
        else:
            state[f"{name}.{leaf}" if local else prefix + leaf] = tensor
    return state


def format_metadata(config: SparsityConfig) -> dict[str, str]:
    """The safetensors header entry of a packed checkpoint's shards."""
    scheme = config.scheme
    layout = f"v{config.format_version} {config.resolved_codec} {config.sparsity_pattern}"
    return {"peft_sparse_format": layout + ("" if scheme is None else f" {scheme}")}


def _load_device(device_map: Any) -> torch.device:
    """Where ``from_pretrained``'s ``device_map`` puts the weights: the first place that is not the CPU or disk."""
    places = list(device_map.values()) if isinstance(device_map, dict) else [device_map]
    for place in places:
        if place is None or str(place) in ("cpu", "disk", "meta"):
            continue
        if str(place) in ("auto", "balanced", "balanced_low_0", "sequential"):
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(place)
    return torch.device("cpu")


def _single(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, (list, tuple)) else value


class SparsityHfQuantizer(HfQuantizer):
    requires_calibration = False
    serialized_names: ClassVar[dict[str, list[str]]] = {"weight": ["weight", "weight" + META_SUFFIX, SCALE,
                                                                   ZERO_POINT]}

    def __init__(self, quantization_config: SparsityConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self._targets: set[str] = set(quantization_config.modules or ())
        self._model: weakref.ReferenceType | None = None
        self._float_dtype: torch.dtype | None = None  # the model's, set before loading

    # ---- loading ----
    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        config = self.quantization_config
        if kwargs.get("distributed_config") is not None or kwargs.get("tp_plan") is not None:
            raise ValueError("Tensor parallelism would slice packed tensors like dense ones; load the packed "
                             "checkpoint without tp_plan / distributed_config (or export it with format='dense').")
        if self.pre_quantized:
            return
        if config.needs_calibration:
            name = config.method if config.refine is None else f"{config.method}+{config.refine}"
            raise ValueError(
                f"Pruning on load supports method='magnitude' only: {name!r} needs calibration data. Load "
                "the dense model, run peft_sparse.prune(model, config, calibration=..., tokenizer=...), then "
                "peft_sparse.save_pretrained(model, directory)."
            )
        if not config.sparsity_pattern.is_nm:
            raise ValueError("Pruning on load needs an N:M pattern (it saves packed); for unstructured sparsity use "
                             "peft_sparse.prune and save with format='dense'.")
        if config.method_options:
            raise ValueError(f"method_options {sorted(config.method_options)} do not apply to magnitude pruning.")

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype

    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files: list[str] | None = None,
                                             **kwargs: Any) -> nn.Module:
        config = self.quantization_config
        self._float_dtype = model.dtype
        if not self.pre_quantized:
            selected = select_sparse_modules(model, config.targets, config.ignore)
            for name, module in selected.items():
                config.sparsity_pattern.check_width(out_in(module).shape[1], name)
            self._targets = set(selected)
            config.modules = list(selected)
            config.format, config.codec = "packed", config.resolved_codec
            config.format_version = config.layout_version
        specs = side_tensor_specs(checkpoint_files or [])
        install_side_tensors(model, specs, device="meta")
        if self.pre_quantized and config.scheme is not None:
            if config.run_compressed:
                self._install_kernels(model, {key.rpartition(".")[0] for key in specs}, kwargs.get("device_map"))
            self._install_grid_buffers(model)
        return model

    def _install_kernels(self, model: nn.Module, with_side_tensors: set[str], device_map: Any) -> None:
        """Swap each quantized layer the CPU int kernels can run for an empty :class:`IntLinear`; log, once, which
        stay dequantized float layers and why."""
        scheme, device = self.quantization_config.scheme, _load_device(device_map)
        left: dict[str, list[str]] = {}
        for name in sorted(self._targets):
            layer = model.get_submodule(name)
            reason = ("it carries a SLoRB / WRP side tensor" if name in with_side_tensors
                      else kernel_unsupported(layer, scheme, device))
            if reason is None:
                model.set_submodule(name, IntLinear(layer.in_features, layer.out_features, scheme,
                                                    layer.bias is not None, layer.weight.dtype, device="meta"))
            else:
                left.setdefault(reason, []).append(name)
        for reason, names in left.items():
            logger.warning("peft_sparse: %d quantized layers (e.g. %s) load as dequantized float weights: %s.",
                           len(names), names[0], reason)

    def _install_grid_buffers(self, model: nn.Module) -> None:
        """Empty ``weight_scale`` (and ``weight_zero_point``) buffers on each quantized module, filled by ``Unpack``."""
        scheme = self.quantization_config.scheme
        for name in self._targets:
            layer = model.get_submodule(name)
            if isinstance(layer, IntLinear):  # has its own
                continue
            out_features, in_features = out_in(layer).shape
            scheme.check_width(in_features, name)
            shape = (out_features, in_features // scheme.group_width(in_features))
            layer.register_buffer(SCALE, torch.empty(shape, dtype=layer.weight.dtype, device="meta"))
            if not scheme.symmetric:
                layer.register_buffer(ZERO_POINT, torch.empty(shape, dtype=torch.uint8, device="meta"))

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
        return (not self.pre_quantized and param_name.endswith(".weight")
                and param_name.rpartition(".")[0] in self._targets)

    def get_quantize_ops(self) -> ConversionOps:
        return PruneOnLoad(self)

    def get_load_operations(self) -> dict[str, type[ConversionOps]]:
        return {"deserialize": Unpack, "dequantize": Unpack}

    def get_new_dtype(self, converter: Any, param: Any, dtype: torch.dtype | None) -> torch.dtype | None:
        """Cast float tensors (packed values, scales) to the model's dtype, never integer codes and metadata. (The
        loader offers the target parameter's dtype, which is an integer one for an :class:`IntLinear`'s weight.)"""
        get_dtype = getattr(param, "get_dtype", None)
        is_float = get_dtype().startswith(("F", "BF")) if get_dtype else param.is_floating_point()
        return (self._float_dtype or dtype) if is_float else None

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        for module in model.modules():
            if isinstance(module, IntLinear):
                module.ready()
        wrap_recovered(model)
        self._model = weakref.ref(model)
        return model

    # ---- saving ----
    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        return packed_state_dict(model, self._targets, self.quantization_config), format_metadata(
            self.quantization_config)

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    # ---- training ----
    @property
    def is_trainable(self) -> bool:
        return True  # PEFT adapters on a packed base

    @property
    def is_qat_trainable(self) -> bool:
        """Asked by ``Trainer`` only; adapters (peft tuner layers) make it a PEFT run, anything else is refused."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        model = self._model() if self._model is not None else None
        if model is not None and not any(isinstance(module, BaseTunerLayer) for module in model.modules()):
            raise ValueError(
                "This model is N:M sparse in peft_sparse's packed format; full fine-tuning with a plain Trainer "
                "would break the pattern and its checkpoints could not be saved. Use peft_sparse.SparseTrainer "
                "(sparse retraining that keeps N:M), or attach adapters (peft_sparse.SPPConfig / SLoRBConfig, LoRA)."
            )
        return False

    def _dequantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        """Int kernel layers become float layers with the same values (and their grid); then transformers drops the
        quantization_config."""
        dequantize_kernels(model)
        return model

    def attach(self, model: nn.Module) -> nn.Module:
        """Mark an in-memory sparse ``model`` so ``save_pretrained`` writes this quantizer's packed format."""
        model.config.quantization_config = self.quantization_config
        model.hf_quantizer = self
        model.is_quantized = True
        model.quantization_method = QUANT_METHOD
        self._model = weakref.ref(model)
        return model


def register() -> None:
    """Register the config and the quantizer with transformers; a second call (or a module reload) is harmless."""
    for mapping, decorator, cls in ((AUTO_QUANTIZATION_CONFIG_MAPPING, register_quantization_config, SparsityConfig),
                                    (AUTO_QUANTIZER_MAPPING, register_quantizer, SparsityHfQuantizer)):
        current = mapping.get(QUANT_METHOD)
        if current is None:
            decorator(QUANT_METHOD)(cls)
        elif current.__module__ == cls.__module__:
            mapping[QUANT_METHOD] = cls  # this module reloaded: point at the fresh class
        else:
            raise ValueError(f"quant_method {QUANT_METHOD!r} is already registered by {current.__module__}."
                             f"{current.__qualname__}; two packages claim the same name.")
    # so that from_pretrained(..., quantization_config=SparsityConfig(run_compressed=False)) overrides that loading
    # attribute of the checkpoint's config, as it does for GPTQ, AWQ or compressed-tensors configs
    if SparsityConfig not in quantizers_auto.LOADING_ATTRIBUTES_CONFIG_TYPES:
        quantizers_auto.LOADING_ATTRIBUTES_CONFIG_TYPES += (SparsityConfig,)


__all__ = ["SIDE_TENSORS", "SparsityHfQuantizer", "register"]
