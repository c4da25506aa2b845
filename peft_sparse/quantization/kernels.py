"""Running a quantized sparse layer on torch's own CPU weight-only integer kernels, keeping the weight in int form.

* int4: ``aten._weight_int4pack_mm_for_cpu`` (group-wise scales, ``w = (u - 8) * scale + zero`` with ``u`` the
  unsigned nibble). We pass ``zero = 0``, so ``w = q * scale`` exactly as :func:`.grid.dequantize` computes it and a
  pruned weight (``q = 0``) is exactly 0. The kernel takes groups of 32, 64, 128 or 256 inputs and N % 16 == 0;
  the weight is packed by torch's own ``_convert_weight_to_int4pack_for_cpu`` (its blocked layout is private);
* int8: ``aten._weight_int8pack_mm`` (one scale per output channel, no zero point), weight kept as ``(out, in)`` int8.

Neither kernel reads the 2:4 positions: the sparse codes are decoded into the kernel's dense int layout, never into a
float weight. What they cannot take (asymmetric grids, whose float zero would move pruned weights off 0; int8 with
groups; an unsupported group size or width; GPT-2 ``Conv1D``; a non-CPU device) stays a dequantized float layer:
:func:`kernel_unsupported` says why, and the loader logs it once.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..modeling import is_sparse_layer, out_in
from .grid import QuantScheme, codes_of, dequantize
from .state import grid_of, set_grid

INT4_GROUP_SIZES = (32, 64, 128, 256)
_INT4_N_MULTIPLE = 16


def kernel_unsupported(layer: nn.Module, scheme: QuantScheme, device: torch.device | str) -> str | None:
    """Why ``layer`` (a plain Linear / Conv1D of the model) cannot run on a CPU int kernel, or ``None`` if it can."""
    if not isinstance(layer, nn.Linear):
        return f"{type(layer).__name__} layers have no int kernel"
    if torch.device(device).type != "cpu":
        return f"the int kernels are CPU kernels, not {torch.device(device).type}"
    if not scheme.symmetric:
        return "asymmetric grids: the kernel's float zero point would make pruned weights nonzero"
    out_features, in_features = layer.out_features, layer.in_features
    if scheme.bits == 8:
        return None if scheme.group_size == -1 else "int8 with groups (torch's int8 kernel takes one scale per channel)"
    group = scheme.group_width(in_features)
    if group not in INT4_GROUP_SIZES:
        return f"int4 group of {group} inputs (the kernel takes {INT4_GROUP_SIZES})"
    if out_features % _INT4_N_MULTIPLE:
        return f"{out_features} outputs (the int4 kernel needs a multiple of {_INT4_N_MULTIPLE})"
    return None


def kernel_weight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed ``(out, in)`` integer codes -> the kernel's weight tensor (int4: torch's packed uint8; int8: int8)."""
    if bits == 4:
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu((codes + 8).to(torch.int32), 1)
    return codes.to(torch.int8).contiguous()


class IntLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` held as int4 / int8 codes plus scales and run by torch's CPU int kernels.

    Buffers: ``weight`` (int4: torch's packed uint8 layout of the codes; int8: ``(out, in)`` int8 codes; named like a
    Linear's weight so a checkpoint loads straight into it), ``weight_scale`` ``(out, in / group)`` in the compute
    dtype (the model's), and ``bias`` as a frozen parameter. Inputs of another dtype are cast to the compute dtype
    and the output cast back. Not trainable: attach adapters that add a branch (LoRA, SLoRB), or dequantize the model
    for anything that changes ``W``.
    """

    def __init__(self, in_features: int, out_features: int, scheme: QuantScheme, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        """An empty layer (e.g. on ``meta``) of the right shapes, for a loader to fill; see :meth:`from_codes`."""
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.group = scheme.group_width(in_features)
        packed = (out_features, in_features // 2) if scheme.bits == 4 else (out_features, in_features)
        self.register_buffer("weight", torch.empty(packed, dtype=torch.uint8 if scheme.bits == 4 else torch.int8,
                                                   device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, in_features // self.group, dtype=dtype,
                                                         device=device))
        self.register_buffer("scales_and_zeros", None, persistent=False)
        self.bias = None if not bias else nn.Parameter(torch.empty(out_features, dtype=dtype, device=device),
                                                       requires_grad=False)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, scheme: QuantScheme, bias: torch.Tensor | None
                   ) -> IntLinear:
        """From signed integer ``(out, in)`` codes of a symmetric grid and their ``(out, in / group)`` scales."""
        layer = cls(codes.shape[1], codes.shape[0], scheme, bias is not None, scale.dtype, device="meta")
        layer.weight = kernel_weight(codes, scheme.bits)
        layer.weight_scale = scale.contiguous()
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().to(scale.dtype), requires_grad=False)
        return layer.ready()

    def ready(self) -> IntLinear:
        """Derive the int4 kernel's ``(in / group, out, 2)`` scale-and-zero tensor (zero = 0) once the buffers hold
        their values (after :meth:`from_codes`, or after a loader filled them)."""
        if self.scheme.bits == 4:
            scale = self.weight_scale.t()
            self.scales_and_zeros = torch.stack([scale, torch.zeros_like(scale)], -1).contiguous()
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.weight_scale.dtype

    def matmul(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows @ W^T`` on the int kernel for ``(tokens, in)`` rows in the compute dtype."""
        if self.scheme.bits == 4:
            return torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.weight, self.group, self.scales_and_zeros)
        return torch.ops.aten._weight_int8pack_mm(rows, self.weight, self.weight_scale.reshape(-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(self.dtype)
        out = _KernelMatmul.apply(rows, self) if rows.requires_grad else self.matmul(rows)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """The ``(out, in)`` float weight, bit-equal to :func:`.grid.dequantize` of the codes.

        int4 is read back through the kernel itself (an identity input, in chunks): the packed layout is torch's
        private one, and reading it this way costs one ``in x in x out`` product, paid only when dequantizing or
        saving.
        """
        if self.scheme.bits == 8:
            return dequantize(self.weight, self.weight_scale, None, self.dtype)
        eye = torch.eye(self.in_features, dtype=self.dtype)
        return torch.cat([self.matmul(part) for part in eye.split(1024)]).t().contiguous()

    def to_linear(self) -> nn.Linear:
        """The equivalent float ``nn.Linear`` carrying its grid (``weight_scale``), as a dequantized load has it."""
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, dtype=self.dtype)
        if self.bias is not None:
            layer.bias = nn.Parameter(self.bias.detach().clone())
        set_grid(layer, self.dequantized_weight().float(), self.weight_scale.float(), None, self.scheme)
        return layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme}"


def refuse_kernels(model: nn.Module, user: str, name: str = "") -> None:
    """Raise, naming the fix, when ``user`` (something that changes ``W`` itself) meets an :class:`IntLinear`."""
    found = [key for key, module in model.named_modules() if isinstance(module, IntLinear)]
    if found:
        more = f" (and {len(found) - 1} more layers)" if len(found) > 1 else ""
        where = f"{name or found[0] or 'the model'}{more}"
        raise TypeError(f"{user} changes the weights themselves, but {where} runs on an int kernel (a quantized "
                        "checkpoint loaded as it is): load it with quantization_config=SparsityConfig("
                        "run_compressed=False), or call model.dequantize() first.")


def layer_shape(layer: nn.Module) -> tuple[int, int]:
    """The ``(out, in)`` shape of a sparse layer, a float one or an :class:`IntLinear` (whose ``weight`` is packed)."""
    if isinstance(layer, IntLinear):
        return layer.out_features, layer.in_features
    return tuple(out_in(layer).shape)


class _KernelMatmul(torch.autograd.Function):
    """The kernel's product with a gradient for its input (adapters below this layer train); ``W`` gets none."""

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor, layer: IntLinear) -> torch.Tensor:
        ctx.layer = layer
        return layer.matmul(rows)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad @ ctx.layer.dequantized_weight(), None


def to_kernels(model: nn.Module, scheme: QuantScheme) -> dict[str, str]:
    """Swap every quantized layer of an in-memory ``model`` (one carrying its grid, see :mod:`.state`) for an
    :class:`IntLinear`; returns ``{layer: reason}`` for those left as dequantized float layers."""
    left = {}
    for name, module in list(model.named_modules()):
        grid = grid_of(module) if is_sparse_layer(module) else None
        if grid is None:
            continue
        reason = kernel_unsupported(module, scheme, module.weight.device)
        if reason is not None:
            left[name] = reason
            continue
        codes = codes_of(module.weight.detach(), grid[0], grid[1], scheme, name)
        model.set_submodule(name, IntLinear.from_codes(codes, grid[0], scheme, module.bias))
    return left


def dequantize_kernels(model: nn.Module) -> int:
    """Swap every :class:`IntLinear` of ``model`` back for its float ``nn.Linear``; how many."""
    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, IntLinear)]
    for name, module in layers:
        model.set_submodule(name, module.to_linear())
    return len(layers)
