"""Side tensors that travel with the packed weights: SLoRB's ``S`` as a ``<module>.slorb_S`` buffer, WRP's recover
matrix as the ``<module>.recover_*`` buffers of a :class:`~peft_sparse.nn.RecoverLinear`.

SLoRB adds ``(x X^T) S^T`` to an N:M layer, where X is the fixed block-ones projection (a sum over every k inputs),
so ``S`` (out, in/k) cannot be merged into the sparse weight. In a packed checkpoint it is a plain tensor next to the
weight; the layer gets a forward hook that adds the branch, so the loaded model computes what the SLoRB model did.

WRP's recover matrix is stored under the plain layer's name (``<module>.weight`` stays the packed N:M part), so the
checkpoint's module tree is the plain model's; the buffers are loaded onto the plain layer, which is then wrapped
into the ``RecoverLinear`` the pruned model had.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from safetensors import safe_open
from torch import nn
from torch.nn import functional as F

from ..modeling import out_in
from ..nn import RecoverLinear
from ..tuners.slorb.layer import slorb_group_sum

SIDE_TENSORS = ("slorb_S",)
RECOVER_TENSORS = ("recover_crow", "recover_col", "recover_val", "recover_blocks")
_HOOK_FLAG = "_peft_sparse_slorb_hook"
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                       "I32": torch.int32}


def side_tensor_specs(files: Iterable[str]) -> dict[str, tuple[list[int], torch.dtype]]:
    """``{key: (shape, dtype)}`` of the side and recover tensors in safetensors ``files``, from the headers only."""
    specs = {}
    for path in files:
        if not str(path).endswith(".safetensors"):
            continue
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():  # noqa: SIM118  (safe_open is not a dict)
                if key.rpartition(".")[2] in SIDE_TENSORS + RECOVER_TENSORS:
                    view = handle.get_slice(key)
                    specs[key] = (list(view.get_shape()), _SAFETENSORS_DTYPES[view.get_dtype()])
    return specs


def _slorb_branch(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    S = module.slorb_S
    k = out_in(module).shape[1] // S.shape[1]
    return output + F.linear(slorb_group_sum(args[0].to(S.dtype), k), S).to(output.dtype)


def add_slorb_side(module: nn.Module, S: torch.Tensor) -> None:
    """Give ``module`` the SLoRB branch with side weight ``S`` (out, in/k): a buffer plus a forward hook."""
    in_features = out_in(module).shape[1]
    if S.dim() != 2 or S.shape[0] != out_in(module).shape[0] or S.shape[1] < 1 or in_features % S.shape[1]:
        raise ValueError(f"SLoRB side weight of shape {tuple(S.shape)} does not fit a layer of (out, in) "
                         f"{tuple(out_in(module).shape)}: expected (out, in/k).")
    module.register_buffer("slorb_S", S)
    if not getattr(module, _HOOK_FLAG, False):
        module.register_forward_hook(_slorb_branch)
        setattr(module, _HOOK_FLAG, True)


def install_side_tensors(model: nn.Module, specs: dict[str, tuple[list[int], torch.dtype]], device: str) -> None:
    """Create the side and recover buffers a checkpoint holds (empty, to be filled by the loader)."""
    for key, (shape, dtype) in specs.items():
        module_name, _, leaf = key.rpartition(".")
        module, empty = model.get_submodule(module_name), torch.empty(shape, dtype=dtype, device=device)
        if leaf in RECOVER_TENSORS:
            module.register_buffer(leaf, empty)
        else:
            add_slorb_side(module, empty)


def wrap_recovered(model: nn.Module) -> int:
    """Turn every plain layer that was loaded with recover buffers into its :class:`RecoverLinear`; how many."""
    carriers = [(name, module) for name, module in model.named_modules()
                if any(leaf in module._buffers for leaf in RECOVER_TENSORS)]
    for name, module in carriers:
        buffers = {leaf: module._buffers.pop(leaf) for leaf in RECOVER_TENSORS if leaf in module._buffers}
        model.set_submodule(name, RecoverLinear.from_buffers(module, buffers))
    return len(carriers)


def side_tensor_names(model: nn.Module) -> list[str]:
    """Modules of ``model`` that carry a side tensor."""
    return [name for name, module in model.named_modules() if any(t in module._buffers for t in SIDE_TENSORS)]
