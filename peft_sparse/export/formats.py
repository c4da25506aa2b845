"""The on-disk formats of a sparse model and ``save_pretrained(model, directory, format)``.

* ``dense``: exact zeros in a plain transformers checkpoint with **no** ``quantization_config`` (loaders that do not
  know ``peft_sparse`` would warn or refuse); the sparsity config goes to ``sparsity_config.json`` instead. Any
  transformers loads it.
* ``packed``: ``quantization_config`` in ``config.json`` and, per sparse module, the kept values under
  ``<module>.weight`` plus ``<module>.weight_meta`` (``FORMAT.md``). Loading needs ``import peft_sparse``; without it
  transformers fails on the size mismatch instead of initialising random weights.

Saving is atomic: the checkpoint is written to a temporary sibling directory and renamed into place.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..config import SparsityConfig
from ..io import atomic_directory, check_output_dir, write_json
from ..modeling import select_sparse_modules
from ..nn import RecoverLinear, plain_layer
from ..quantization.kernels import IntLinear, layer_shape
from ..quantization.packed import check_grid
from ..quantization.state import grid_of
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
    if format == "packed":
        _check_grids(model, resolved)
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

    with _quantizer_state(model, None):
        model.save_pretrained(directory, **kwargs)
    write_json(directory / SIDE_FILE, config.to_dict())


FORMATS: dict[str, SaveFormat] = {
    "dense": SaveFormat("dense", "plain transformers checkpoint with exact zeros; loads anywhere", _save_dense),
    "packed": SaveFormat("packed", "kept values + positions (N:M only); needs import peft_sparse", _save_packed),
}


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
