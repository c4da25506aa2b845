"""Modules for sparse layers that carry more than one weight: ``RecoverLinear`` (WRP's N:M part plus recover matrix).

Kept outside ``pruning`` so that export and training can use the module type without importing the pruners.
"""

from __future__ import annotations

import torch
from torch import nn

from .modeling import check_sparse_layer, out_in


class RecoverLinear(nn.Module):
    """``y = base(x) + x W_rec^T``: ``base`` is the original Linear/Conv1D holding the N:M weight (and the bias).

    The recover matrix is stored compactly, as buffers (so it is part of the state dict):

    * element form, CSR-style: ``recover_crow (out + 1)``, ``recover_col (nnz)`` int32 and ``recover_val (nnz)``;
    * block form (Blocked-ELL): ``recover_blocks (out / b, k)`` int32 block columns per block row and
      ``recover_val (out / b, k, b, b)``, the dense tiles (kept N:M positions inside them are zero).
    """

    def __init__(self, base: nn.Module, recover: torch.Tensor, blocks: torch.Tensor | None = None) -> None:
        super().__init__()
        self._set_base(base)
        out_features, in_features = self.shape
        if tuple(recover.shape) != (out_features, in_features):
            raise ValueError(
                f"recover matrix {tuple(recover.shape)} does not match the layer's {out_features, in_features}."
            )
        recover = recover.detach().to(out_in(base).dtype)
        if blocks is None:
            self.block_size = None
            nonzero = recover != 0
            crow = torch.zeros(out_features + 1, dtype=torch.int32, device=recover.device)
            crow[1:] = nonzero.sum(1).cumsum(0)
            self.register_buffer("recover_crow", crow)
            self.register_buffer("recover_col", nonzero.nonzero()[:, 1].to(torch.int32))
            self.register_buffer("recover_val", recover[nonzero])
        else:
            rows, k = blocks.shape
            b = out_features // rows
            self.block_size = b
            tiles = recover.reshape(rows, b, in_features // b, b).permute(0, 2, 1, 3)  # (rows, in/b, b, b)
            index = blocks.long().reshape(rows, k, 1, 1).expand(rows, k, b, b)
            self.register_buffer("recover_blocks", blocks.to(torch.int32))
            self.register_buffer("recover_val", tiles.gather(1, index).contiguous())

    def _set_base(self, base: nn.Module) -> None:
        check_sparse_layer(base, "RecoverLinear")
        self.base = base
        self.shape = tuple(out_in(base).shape)

    @classmethod
    def from_buffers(cls, base: nn.Module, buffers: dict[str, torch.Tensor]) -> RecoverLinear:
        """Rebuild from the stored buffers (``recover_crow/col/val`` or ``recover_blocks/val``), taken as they are."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._set_base(base)
        out_features, in_features = module.shape
        if set(buffers) == {"recover_crow", "recover_col", "recover_val"}:
            crow, col, val = buffers["recover_crow"], buffers["recover_col"], buffers["recover_val"]
            fits = crow.shape == (out_features + 1,) and col.dim() == 1 and val.shape == col.shape
            module.block_size = None
        elif set(buffers) == {"recover_blocks", "recover_val"}:
            blocks, val = buffers["recover_blocks"], buffers["recover_val"]
            b = val.shape[-1] if val.dim() == 4 else 0
            fits = (b > 0 and blocks.dim() == 2 and val.shape == (*blocks.shape, b, b)
                    and blocks.shape[0] * b == out_features and in_features % b == 0)
            module.block_size = b
        else:
            raise ValueError(f"recover buffers {sorted(buffers)} are neither the element form (recover_crow, "
                             "recover_col, recover_val) nor the block form (recover_blocks, recover_val).")
        if not fits:
            raise ValueError(f"recover buffers of shapes { {k: tuple(v.shape) for k, v in buffers.items()} } do not "
                             f"fit a layer of (out, in) {module.shape}.")
        for name, tensor in buffers.items():
            module.register_buffer(name, tensor)
        return module

    @property
    def extra_nonzeros(self) -> int:
        """Non-zero recovered weights (the block form stores ``recover_val.numel()`` values for them)."""
        return int(self.recover_val.count_nonzero())

    def _csr(self, values: torch.Tensor) -> torch.Tensor:
        return torch.sparse_csr_tensor(
            self.recover_crow, self.recover_col, values, size=self.shape, check_invariants=False
        )

    def recover_dense(self) -> torch.Tensor:
        """The recover matrix as a dense ``(out, in)`` tensor (exact)."""
        out_features, in_features = self.shape
        if self.block_size is None:
            return self._csr(self.recover_val).to_dense()
        b = self.block_size
        rows, k = self.recover_blocks.shape
        tiles = self.recover_val.new_zeros(rows, in_features // b, b, b)
        index = self.recover_blocks.long().reshape(rows, k, 1, 1).expand(rows, k, b, b)
        tiles.scatter_(1, index, self.recover_val)
        return tiles.permute(0, 2, 1, 3).reshape(out_features, in_features)

    def _recover_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x W_rec^T`` for ``x`` of shape ``(tokens, in)`` without materialising ``W_rec`` (a transposed view)."""
        if self.block_size is None:
            return (self._csr(self.recover_val.to(x.dtype)) @ x.t()).t()
        b = self.block_size
        gathered = x.reshape(x.shape[0], -1, b)[:, self.recover_blocks.long()]  # (tokens, rows, k, b)
        return torch.einsum("tpkj,pkqj->tpq", gathered, self.recover_val.to(x.dtype)).reshape(x.shape[0], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)  # a fresh tensor the linear's backward does not need: safe to add into in place
        out.view(-1, out.shape[-1]).add_(self._recover_matmul(x.reshape(-1, x.shape[-1])))
        return out

    def merged(self) -> nn.Module:
        """``base`` with the recover matrix added into its weight: one dense weight, no longer exactly N:M."""
        with torch.no_grad():
            out_in(self.base).add_(self.recover_dense().to(self.base.weight.dtype))
        return self.base


def merge_recovered(model: nn.Module) -> int:
    """Replace every :class:`RecoverLinear` in ``model`` by its merged base layer; returns how many were merged."""
    names = [name for name, module in model.named_modules() if isinstance(module, RecoverLinear)]
    for name in names:
        model.set_submodule(name, model.get_submodule(name).merged())
    return len(names)


def plain_layer(module: nn.Module) -> nn.Module:
    """The Linear/Conv1D holding the N:M weight: ``module`` itself, or the base of a :class:`RecoverLinear`."""
    return module.base if isinstance(module, RecoverLinear) else module
