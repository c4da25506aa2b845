"""The on-disk formats of a sparse model and ``save_pretrained(model, directory, format)``.

* ``dense``: exact zeros in a plain transformers checkpoint with **no** ``quantization_config`` (loaders that do not
  know ``peft_sparse`` would warn or refuse); the sparsity config goes to ``sparsity_config.json`` instead. Any
  transformers loads it.
* ``packed``: ``quantization_config`` in ``config.json`` and, per sparse module, the kept values (or, quantized,
  their int4 / int8 codes and scales) under ``<module>.weight*`` plus ``<module>.weight_meta`` (``FORMAT.md``).
  Loading needs ``import peft_sparse``; without it transformers fails on the size mismatch instead of initialising
  random weights.
* ``compressed-tensors``: a symmetric quantized model in compressed-tensors' ``pack-quantized`` layout (pruned
  weights are zero codes of a dense grid); plain transformers and vLLM load it. Needs the optional extra.

Saving is atomic: the checkpoint is written to a temporary sibling directory and renamed into place.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import SparsityConfig
from ..io import atomic_directory, check_output_dir, write_json
from ..modeling import out_in, select_sparse_modules
from ..nn import RecoverLinear, plain_layer
from ..quantization.kernels import IntLinear, layer_shape
from ..quantization.packed import check_grid
from ..quantization.state import grid_of
from ..sparsity.packing import information_limit_nbytes
from .compressed import check_exportable, compressed_copy
from .modules import side_tensor_names
from .quantizer import SparsityHfQuantizer, grid_mismatch

SIDE_FILE = "sparsity_config.json"
_QUANT_ATTRS = ("hf_quantizer", "is_quantized", "quantization_method")


@dataclass(frozen=True)
class SaveFormat:
    name: str
    summary: str
    save: Callable[[nn.Module, Path, SparsityConfig, dict[str, Any]], None]


def sparsity_config_of(model: nn.Module) -> SparsityConfig | None:
    """The SparsityConfig a model carries: from a packed load or prune-on-load, or recorded by ``prune``."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(config, SparsityConfig):
        return config
    return getattr(model, "peft_sparse_config", None)


@contextlib.contextmanager
def _quantizer_state(model: nn.Module, quantizer: SparsityHfQuantizer | None) -> Iterator[None]:
    """Temporarily attach ``quantizer`` (or detach any) so ``save_pretrained`` writes one format; then restore."""
    saved = {attr: model.__dict__[attr] for attr in _QUANT_ATTRS if attr in model.__dict__}
    had_config = hasattr(model.config, "quantization_config")
    saved_config = getattr(model.config, "quantization_config", None)
    for attr in _QUANT_ATTRS:
        model.__dict__.pop(attr, None)
    if had_config:
        del model.config.quantization_config
    try:
        if quantizer is not None:
            quantizer.attach(model)
        yield
    finally:
        for attr in _QUANT_ATTRS:
            model.__dict__.pop(attr, None)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.__dict__.update(saved)
        if had_config:
            model.config.quantization_config = saved_config


def detach_quantizer(model: nn.Module) -> None:
    """Turn a packed-loaded model into a plain one in memory (what ``dequantize()`` does, for any wrapper)."""
    for attr in _QUANT_ATTRS:
        model.__dict__.pop(attr, None)
    if isinstance(getattr(model.config, "quantization_config", None), SparsityConfig):
        del model.config.quantization_config


def resolve_for_save(model: nn.Module, config: SparsityConfig, format: str) -> SparsityConfig:
    """A copy of ``config`` naming the format, codec and the model's sparse modules (checked before writing)."""
    resolved = copy.copy(config)
    resolved.provenance = dict(config.provenance)
    resolved.format = format
    resolved.codec = config.resolved_codec if format == "packed" else config.codec
    resolved.format_version = resolved.layout_version
    if resolved.modules is None:
        recovered = {f"{name}.base" for name, module in model.named_modules() if isinstance(module, RecoverLinear)}
        resolved.modules = [name.removesuffix(".base") if name in recovered else name  # WRP: the wrapper's name
                            for name in select_sparse_modules(model, config.targets, config.ignore)]
    layers = {name: plain_layer(model.get_submodule(name)) for name in resolved.modules}
    missing = [name for name, layer in layers.items()  # an int kernel layer holds its weight as a buffer
               if not isinstance(layer, IntLinear) and not isinstance(getattr(layer, "weight", None), nn.Parameter)]
    if missing:
        raise ValueError(f"Sparse modules {missing[:3]} of the config have no weight in this model; is it the "
                         "model the config was made for?")
    if format in ("packed", "compressed-tensors"):
        _check_grids(model, resolved)
    if format == "compressed-tensors":
        check_exportable(model, resolved)
    return resolved


def _check_grids(model: nn.Module, config: SparsityConfig) -> None:
    """Every sparse module is quantized on the config's grid, or none is and the config has no bits."""
    scheme = config.scheme
    for name in config.modules:
        layer = plain_layer(model.get_submodule(name))
        grid = grid_of(layer)
        if (grid is None) != (scheme is None):
            raise ValueError(grid_mismatch(name, scheme))
        if grid is not None:
            check_grid(*grid, layer_shape(layer), scheme, name)


def _save_packed(model: nn.Module, directory: Path, config: SparsityConfig, kwargs: dict[str, Any]) -> None:
    with _quantizer_state(model, SparsityHfQuantizer(config, pre_quantized=True)):
        model.save_pretrained(directory, **kwargs)


def _save_dense(model: nn.Module, directory: Path, config: SparsityConfig, kwargs: dict[str, Any]) -> None:
    carriers = side_tensor_names(model)
    if carriers:
        raise ValueError(f"{carriers[0]} carries a SLoRB side weight, which a plain dense checkpoint would silently "
                         "drop; save with format='packed' (or merge it into a dense weight first).")
    recovered = [name for name, module in model.named_modules() if isinstance(module, RecoverLinear)]
    if recovered:
        raise ValueError(f"{recovered[0]} carries a WRP recover matrix, which a plain dense checkpoint cannot hold; "
                         "save with format='packed', or fold it into the weights first with "
                         "peft_sparse.nn.merge_recovered(model) (no longer exactly N:M).")
    on_kernels = [name for name, module in model.named_modules() if isinstance(module, IntLinear)]
    if on_kernels:
        raise ValueError(f"{on_kernels[0]} holds its weight as int kernel codes, which a plain dense checkpoint cannot "
                         "hold; save with format='packed', or call model.dequantize() first.")

    with _quantizer_state(model, None):
        model.save_pretrained(directory, **kwargs)
    write_json(directory / SIDE_FILE, config.to_dict())


def _save_compressed_tensors(model: nn.Module, directory: Path, config: SparsityConfig,
                             kwargs: dict[str, Any]) -> None:
    with _quantizer_state(model, None):  # the copy carries no peft_sparse quantizer
        export, compressor = compressed_copy(model, config)
    export.save_pretrained(directory, **kwargs)
    compressor.update_config(str(directory))
    write_json(directory / SIDE_FILE, config.to_dict())


FORMATS: dict[str, SaveFormat] = {
    "dense": SaveFormat("dense", "plain transformers checkpoint with exact zeros; loads anywhere", _save_dense),
    "packed": SaveFormat("packed", "kept values + positions (N:M only); needs import peft_sparse", _save_packed),
    "compressed-tensors": SaveFormat("compressed-tensors", "symmetric int4/int8 pack-quantized, pruned weights as "
                                     "zero codes; loads in plain transformers and vLLM", _save_compressed_tensors),
}


_DTYPE_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_GRID_LEAVES = ("weight_scale", "weight_zero_point")


@dataclass(frozen=True)
class LinearSizes:
    """The sparse linears of a checkpoint on disk: how many dense weights they have, the bytes of every tensor they
    store (values or codes, positions, scales, zero points, side tensors), of those the scales and zero points
    (``grid_nbytes``), and the information limit of their content (``limit_nbytes``: the kept values at their bit
    width, ``log2 C(M, N)`` bits per group, or ``log2 C(weights, kept)`` for unstructured sparsity, plus the scales
    and zero points as stored)."""

    modules: int
    weights: int
    nbytes: int
    grid_nbytes: int
    limit_nbytes: float

    @property
    def fraction_of_fp32(self) -> float:
        return self.nbytes / (4 * self.weights)

    @property
    def ratio_to_limit(self) -> float:
        return self.nbytes / self.limit_nbytes


def _headers(directory: Path) -> dict[str, tuple[int, int]]:
    """``{key: (elements, bytes per element)}`` of every tensor in ``directory``'s safetensors files."""
    from safetensors import safe_open

    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():  # noqa: SIM118  (safe_open is not a dict)
                view = handle.get_slice(key)
                out[key] = (math.prod(view.get_shape()), _DTYPE_BYTES[view.get_dtype()])
    return out


def linear_sizes(directory: str | Path) -> LinearSizes:
    """Measure the sparse linears of a saved checkpoint (any format; the config names them) from the file headers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    side = directory / SIDE_FILE
    if side.exists():
        config = SparsityConfig.from_dict(json.loads(side.read_text()))
    else:
        config = SparsityConfig.from_dict(json.loads((directory / "config.json").read_text())["quantization_config"])
    with torch.device("meta"):  # the dense shapes, without reading a weight
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory))
    headers, pattern = _headers(directory), config.sparsity_pattern
    weights = nbytes = grid = 0
    limit = 0.0
    for name in config.modules or ():
        out_features, in_features = out_in(plain_layer(skeleton.get_submodule(name))).shape
        stored = {key.rpartition(".")[2]: size for key, size in headers.items() if key.rpartition(".")[0] == name}
        value_bytes = config.bits / 8 if config.bits else stored["weight"][1]
        if pattern.is_nm:
            limit += information_limit_nbytes(out_features, in_features, pattern.n, pattern.m, value_bytes)
        else:
            total = out_features * in_features
            kept = total - round(total * pattern.sparsity)
            log_choices = math.lgamma(total + 1) - math.lgamma(kept + 1) - math.lgamma(total - kept + 1)
            limit += kept * value_bytes + log_choices / math.log(2) / 8
        grid_bytes = sum(count * size for leaf, (count, size) in stored.items() if leaf in _GRID_LEAVES)
        limit += grid_bytes
        grid += grid_bytes
        weights += out_features * in_features
        nbytes += sum(count * size for count, size in stored.values())
    return LinearSizes(len(config.modules or ()), weights, nbytes, grid, limit)


def get_format(name: str) -> SaveFormat:
    if name not in FORMATS:
        raise ValueError(f"Unknown save format {name!r}; choose one of {sorted(FORMATS)}.")
    return FORMATS[name]


def save_pretrained(model: nn.Module, directory: str | Path, format: str | None = None,
                    config: SparsityConfig | None = None, tokenizer: Any = None, overwrite: bool = True,
                    **save_kwargs: Any) -> Path:
    """Save a sparse ``model`` to ``directory`` in ``format`` (default: the config's, packed for N:M).

    Args:
        config: the model's SparsityConfig; default the one it carries (packed load, prune-on-load, ``prune``).
        tokenizer: saved alongside when given.
        overwrite: replace a non-empty ``directory`` (else refuse).
        save_kwargs: passed to ``model.save_pretrained`` (``max_shard_size``, ...).

    Everything is checked and packed into a temporary sibling first; ``directory`` appears only when complete.
    """

    config = config or sparsity_config_of(model)
    if config is None:
        raise ValueError("This model carries no SparsityConfig: pass config=SparsityConfig(pattern=...) describing "
                         "its sparsity (peft_sparse.prune records it on the model).")
    fmt = get_format(format or config.resolved_format)
    if fmt.name == "packed" and not config.sparsity_pattern.is_nm:
        raise ValueError(f"The packed format stores N:M patterns only, not {config.sparsity_pattern}; use "
                         "format='dense'.")
    resolved = resolve_for_save(model, config, fmt.name)
    target = check_output_dir(str(directory), overwrite)
    with atomic_directory(target) as staging:
        fmt.save(model, staging, resolved, save_kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    return target
