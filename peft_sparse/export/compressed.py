"""``format="compressed-tensors"``: a symmetric quantized sparse model through compressed-tensors' own
``pack-quantized`` compressor, so plain transformers (no peft_sparse) loads it and vLLM serves it as W4A16 / W8A16.

compressed-tensors has no sparse format any more (its sparse compressors are legacy, ``sparsity_config`` is written
empty), so the N:M structure travels as zero codes inside a dense int grid: dense-sized, still exactly N:M after a
load. The export works on a copy of the model (the compressor rewrites weights in place) and avoids the design note's
traps: the weights are upcast to float32 before the library derives codes as ``round(weight / scale)`` (in bfloat16 a
code above 64 can land one off, trap 2), and a group wider than 128 columns is written as 128-column groups with each
scale repeated (Marlin takes G <= 128, trap 4); the written codes are then checked against the model's own. Pruned
``-0.0`` comes back ``+0.0`` (trap 1): the in-memory quantized model already holds ``+0.0`` there.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..config import SparsityConfig
from ..nn import RecoverLinear
from ..quantization.grid import QuantScheme, codes_of, expand_groups
from ..quantization.kernels import IntLinear, dequantize_kernels
from ..quantization.state import SCALE, ZERO_POINT, grid_of
from .modules import SIDE_TENSORS

INSTALL = "pip install 'peft_sparse[compressed-tensors]'"
MARLIN_MAX_GROUP = 128  # the widest group vLLM's Marlin WNA16 kernels take


def require_library() -> None:
    """Raise, naming the install command, when compressed-tensors is not installed."""
    try:
        import compressed_tensors  # noqa: F401
    except ImportError as error:
        raise ImportError(f"format='compressed-tensors' needs the compressed-tensors library: {INSTALL}") from error


def export_group_size(scheme: QuantScheme, in_features: int) -> int:
    """Columns per written scale: the model's group, or for a group wider than 128 the widest of 128 / 64 / 32
    dividing it (each scale then repeats). ``-1`` stays per channel."""
    if scheme.group_size == -1 or scheme.group_size <= MARLIN_MAX_GROUP:
        return scheme.group_size
    return next((g for g in (128, 64, 32) if scheme.group_size % g == 0), scheme.group_size)


def check_exportable(model: nn.Module, config: SparsityConfig) -> None:
    """Refuse, before anything is written, what compressed-tensors' pack-quantized cannot hold exactly."""
    scheme = config.scheme
    if scheme is None:
        raise ValueError("format='compressed-tensors' stores quantized models only; quantize the model first "
                         "(peft_sparse.quantize, or prune with bits=4 / 8), or save with format='packed' or 'dense'.")
    if not scheme.symmetric:
        raise ValueError("format='compressed-tensors' takes symmetric grids only (its int4/int8 pack-quantized "
                         "kernels have no integer zero point that keeps pruned weights 0); quantize with "
                         "symmetric=True, or save the asymmetric model with format='packed'.")
    for name in config.modules or ():
        module = model.get_submodule(name)
        if isinstance(module, RecoverLinear):
            raise ValueError(f"{name} carries a WRP recover matrix, which compressed-tensors cannot hold; save with "
                             "format='packed'.")
        if any(leaf in module._buffers for leaf in SIDE_TENSORS):
            raise ValueError(f"{name} carries a SLoRB side weight, which compressed-tensors cannot hold; save with "
                             "format='packed'.")
        if type(module) is not nn.Linear and not isinstance(module, IntLinear):
            raise ValueError(f"{name} is a {type(module).__name__}; compressed-tensors quantizes nn.Linear layers "
                             "only (GPT-2's Conv1D stores the transpose). Save with format='packed'.")
    require_library()


def compressed_copy(model: nn.Module, config: SparsityConfig) -> tuple[nn.Module, object]:
    """A copy of ``model`` compressed by compressed-tensors (``pack-quantized``) and its ``ModelCompressor``, whose
    ``update_config(directory)`` writes the quantization config after ``copy.save_pretrained(directory)``."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )

    scheme = config.scheme
    export = copy.deepcopy(model)
    dequantize_kernels(export)  # layers loaded onto the int kernels: their float form, same grid
    layers = {name: export.get_submodule(name) for name in config.modules}
    expected = {}
    for name, layer in layers.items():
        scale, _ = grid_of(layer)
        expected[name] = (codes_of(layer.weight.detach(), scale, None, scheme, name).to(torch.int8), scale)
        layer._buffers.pop(SCALE)  # compressed-tensors registers its own weight_scale parameter
        layer._buffers.pop(ZERO_POINT, None)
    widths = {export_group_size(scheme, layer.in_features) for layer in layers.values()}
    group = widths.pop()  # one per model: it is a function of the model's group size
    args = QuantizationArgs(num_bits=scheme.bits, type="int", symmetric=True,
                            strategy="channel" if group == -1 else "group", group_size=None if group == -1 else group)
    ignore = [name for name, module in export.named_modules() if isinstance(module, nn.Linear) and name not in layers]
    apply_quantization_config(export, QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)}, ignore=ignore),
        show_progress=False)
    for name, layer in layers.items():
        codes, scale = expected[name]
        written = scale if group == -1 else expand_groups(scale, layer.in_features // group)
        layer.weight_scale.data.copy_(written.reshape(layer.weight_scale.shape))
        layer.weight.data = layer.weight.data.float()  # codes are round(weight / scale): divide in float32
    compressor = ModelCompressor.from_pretrained_model(export, quantization_format="pack-quantized")
    compressor.compress_model(export)
    for name, layer in layers.items():
        written = unpack_from_int32(layer.weight_packed.data, scheme.bits, torch.Size(layer.weight_shape.tolist()))
        if not torch.equal(written, expected[name][0]):
            raise RuntimeError(f"{name}: compressed-tensors wrote codes other than the model's "
                               f"({int((written != expected[name][0]).sum())} differ); please report this with "
                               "your compressed-tensors version.")
    return export, compressor
