"""Pack an exactly N:M weight into its kept values plus compact position metadata, and back (pure torch).

The layout is the packed checkpoint format (``FORMAT.md``): for an ``(out, in)`` weight,

* ``values``: ``(out, in*N/M)``, the kept entries of every row in column order, in the weight's dtype;
* ``meta``: uint8 positions, by codec:

  - ``"b6x3"`` (2:4 only): each group's kept pair is one of 6 (``PAIRS_2_4``); three group codes share a byte as
    ``c0 + 6*c1 + 36*c2``, so a row takes ``ceil(in/12)`` bytes (log2(6)/(8/3) = 96.9% of the information limit);
  - ``"bitmask"`` (any N:M): bit ``j`` of byte ``b`` is column ``8b + j`` (little-endian, like
    ``numpy.packbits(bitorder="little")``), ``ceil(in/8)`` bytes a row.

A group with fewer than N nonzeros still stores N values: the kept set is the nonzeros padded with the lowest-index
zeros, so packing is deterministic. Everything is vectorised over the whole tensor; nothing loops over rows or groups.
"""

from __future__ import annotations

import math
from functools import cache

import torch

from .masks import nm_mask

CODECS = ("b6x3", "bitmask")
PAIRS_2_4 = ((0, 1), (0, 2), (1, 2), (0, 3), (1, 3), (2, 3))  # code c -> kept columns of the group (colex order)
_B6_DIGITS = 3  # 6**3 = 216 <= 256 codes per byte
_B6_MAX_BYTE = 6**_B6_DIGITS - 1


def default_codec(n: int, m: int) -> str:
    """The smallest codec for ``n:m``: ``"b6x3"`` for 2:4, ``"bitmask"`` otherwise."""
    return "b6x3" if (n, m) == (2, 4) else "bitmask"


def check_codec(codec: str, n: int, m: int) -> None:
    if codec not in CODECS:
        raise ValueError(f"Unknown codec {codec!r}; choose one of {CODECS}.")
    if codec == "b6x3" and (n, m) != (2, 4):
        raise ValueError(f"codec 'b6x3' encodes 2:4 groups only, not {n}:{m}; use codec='bitmask'.")


def meta_shape(out_features: int, in_features: int, m: int, codec: str) -> tuple[int, int]:
    """Shape of the uint8 metadata of an ``(out, in)`` weight."""
    if codec == "b6x3":
        return out_features, math.ceil(in_features // m / _B6_DIGITS)
    return out_features, math.ceil(in_features / 8)


def packed_nbytes(out_features: int, in_features: int, n: int, m: int, codec: str, element_size: int) -> int:
    """Bytes of values plus metadata for one packed weight."""
    rows, cols = meta_shape(out_features, in_features, m, codec)
    return out_features * (in_features // m * n) * element_size + rows * cols


def information_limit_nbytes(out_features: int, in_features: int, n: int, m: int, element_size: int) -> float:
    """Fewest bytes any lossless layout needs: the kept values plus log2(C(M, N)) bits per group."""
    groups = out_features * (in_features // m)
    return groups * n * element_size + groups * math.log2(math.comb(m, n)) / 8


@cache
def _pair_tables(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(4-bit group pattern -> code or -1, code -> the two kept columns) for 2:4."""
    code_of = torch.full((16,), -1, dtype=torch.int64)
    for code, (a, b) in enumerate(PAIRS_2_4):
        code_of[(1 << a) | (1 << b)] = code
    return code_of.to(device), torch.tensor(PAIRS_2_4, dtype=torch.int64, device=device)


@cache
def _b6x3_byte_masks(device: str) -> torch.Tensor:
    """Every valid b6x3 byte -> its 12 keep bits (3 groups of 4): decoding is one table lookup per byte."""
    digits = torch.arange(_B6_MAX_BYTE + 1).unsqueeze(-1) // torch.tensor([1, 6, 36]) % 6
    columns = torch.tensor(PAIRS_2_4)[digits]  # (216, 3, 2)
    masks = torch.zeros(_B6_MAX_BYTE + 1, _B6_DIGITS, 4, dtype=torch.bool).scatter_(-1, columns, True)
    return masks.reshape(_B6_MAX_BYTE + 1, -1).to(device)


def kept_positions(weight: torch.Tensor, n: int, m: int, name: str = "weight") -> torch.Tensor:
    """The bool keep set of an N:M ``(out, in)`` weight; raises if any group has more than N nonzeros."""
    if weight.dim() != 2 or weight.shape[1] % m:
        raise ValueError(f"{name}: cannot pack shape {tuple(weight.shape)} as {n}:{m}; the input width must be a "
                         f"multiple of {m}.")
    nonzero = weight != 0
    over = int((nonzero.reshape(weight.shape[0], -1, m).sum(-1) > n).sum())
    if over:
        raise ValueError(f"{name} is not {n}:{m} sparse ({over} groups keep more than {n} nonzeros); prune it "
                         "(peft_sparse.prune) or save with format='dense'.")
    return nm_mask(nonzero.to(torch.int8), n, m)  # every nonzero, padded with the lowest-index zeros


def pack(weight: torch.Tensor, n: int, m: int, codec: str, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, meta)`` of an exactly N:M ``(out, in)`` weight."""
    check_codec(codec, n, m)
    keep = kept_positions(weight, n, m, name)
    out_features, in_features = weight.shape
    values = weight[keep].reshape(out_features, -1)
    if codec == "b6x3":
        shifts = torch.arange(m, device=weight.device)
        patterns = (keep.reshape(out_features, -1, m).to(torch.int64) << shifts).sum(-1)
        codes = _pair_tables(str(weight.device))[0][patterns]
        pad = (-codes.shape[1]) % _B6_DIGITS
        digits = torch.nn.functional.pad(codes, (0, pad)).reshape(out_features, -1, _B6_DIGITS)
        radix = torch.tensor([1, 6, 36], dtype=torch.int64, device=weight.device)
        meta = (digits * radix).sum(-1).to(torch.uint8)
    else:
        bits = torch.nn.functional.pad(keep, (0, (-in_features) % 8)).reshape(out_features, -1, 8)
        meta = (bits.to(torch.int32) << torch.arange(8, device=weight.device, dtype=torch.int32)).sum(-1)
        meta = meta.to(torch.uint8)
    return values, meta


def unpack_mask(meta: torch.Tensor, in_features: int, n: int, m: int, codec: str) -> torch.Tensor:
    """The bool ``(out, in)`` keep set encoded by ``meta``; raises on bytes no packer writes (corruption)."""
    check_codec(codec, n, m)
    meta = meta.to(torch.int64)
    if codec == "b6x3":
        if meta.numel() and int(meta.max()) > _B6_MAX_BYTE:
            raise ValueError(f"corrupt b6x3 metadata: a byte above {_B6_MAX_BYTE}.")
        keep = _b6x3_byte_masks(str(meta.device))[meta]  # (out, bytes, 12)
        return keep.reshape(meta.shape[0], -1)[:, :in_features]
    bits = (meta.unsqueeze(-1) >> torch.arange(8, device=meta.device)) & 1
    return bits.reshape(meta.shape[0], -1)[:, :in_features].bool()


def unpack(values: torch.Tensor, meta: torch.Tensor, in_features: int, n: int, m: int, codec: str) -> torch.Tensor:
    """The dense ``(out, in)`` weight (values' dtype and device) from ``pack``'s output."""
    keep = unpack_mask(meta, in_features, n, m, codec)
    expected = (meta.shape[0], in_features // m * n)
    if tuple(values.shape) != expected or int(keep.sum()) != values.numel():
        raise ValueError(f"packed values of shape {tuple(values.shape)} do not match their metadata "
                         f"(expected {expected} for {n}:{m} over {in_features} inputs).")
    dense = torch.zeros(keep.shape, dtype=values.dtype, device=values.device)
    return dense.masked_scatter_(keep.to(values.device), values)
