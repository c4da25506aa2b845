"""Side tensors that travel with the packed weights: SLoRB's ``S`` as a ``<module>.slorb_S`` buffer.

SLoRB adds ``(x X^T) S^T`` to an N:M layer, where X is the fixed block-ones projection (a sum over every k inputs),
so ``S`` (out, in/k) cannot be merged into the sparse weight. In a packed checkpoint it is a plain tensor next to the
weight; the layer gets a forward hook that adds the branch, so the loaded model computes what the SLoRB model did.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from safetensors import safe_open
from torch import nn
from torch.nn import functional as F

from ..modeling import out_in
from ..tuners.slorb.layer import slorb_group_sum

SIDE_TENSORS = ("slorb_S",)
_HOOK_FLAG = "_peft_sparse_slorb_hook"
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def side_tensor_specs(files: Iterable[str]) -> dict[str, tuple[list[int], torch.dtype]]:
    """``{key: (shape, dtype)}`` of the side tensors in safetensors ``files``, read from the headers only."""
    specs = {}
    for path in files:
        if not str(path).endswith(".safetensors"):
            continue
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():  # noqa: SIM118  (safe_open is not a dict)
                if key.rpartition(".")[2] in SIDE_TENSORS:
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
    """Create the side buffers a checkpoint holds (empty, to be filled by the loader)."""
    for key, (shape, dtype) in specs.items():
        module_name = key.rpartition(".")[0]
        add_slorb_side(model.get_submodule(module_name), torch.empty(shape, dtype=dtype, device=device))


def side_tensor_names(model: nn.Module) -> list[str]:
    """Modules of ``model`` that carry a side tensor."""
    return [name for name, module in model.named_modules() if any(t in module._buffers for t in SIDE_TENSORS)]
