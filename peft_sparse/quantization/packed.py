"""A quantized N:M layer as the packed v2 checkpoint stores it (``FORMAT.md``), and back.

On the ``(out, in)`` view, a quantized sparse layer is stored as

* ``weight``: the integer codes of the kept values, row by row in column order (the positions are ``weight_meta``,
  any codec of :mod:`peft_sparse.sparsity.packing`). int4: two codes a byte, the first in the low nibble, each as
  ``q + 8`` (symmetric) or ``q`` (asymmetric, already in 0..15); an odd row ends with a zero high nibble. int8:
  ``int8`` codes (symmetric) or ``uint8`` codes (asymmetric);
* ``weight_scale`` (model dtype) and ``weight_zero_point`` (uint8, asymmetric only), ``(out, in / group_size)``, as
  they are in memory (:mod:`.state`).

``decode_layer`` is the one reader: ``(stored tensors) -> (dense codes, scale, zero, keep)``; the loader dequantizes
its output (``grid.dequantize`` in the scale's dtype, exactly as the in-memory model was made), a kernel layer can
take the codes as they are.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..sparsity import packing
from .grid import QuantScheme, codes_of, expand_groups


class DecodedLayer(NamedTuple):
    """A decoded quantized layer on its ``(out, in)`` view: int16 ``codes`` (pruned positions hold the zero code:
    0, or the group's zero point), ``scale``, ``zero`` (uint8 or ``None``) per group, bool ``keep``."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    keep: torch.Tensor


def code_dtype(scheme: QuantScheme) -> torch.dtype:
    """dtype of the stored codes: uint8 for int4 (two a byte) and asymmetric int8, int8 for symmetric int8."""
    return torch.int8 if scheme.bits == 8 and scheme.symmetric else torch.uint8


def codes_shape(out_features: int, kept: int, scheme: QuantScheme) -> tuple[int, int]:
    """Shape of the stored codes of ``kept`` values per row."""
    return out_features, math.ceil(kept / 2) if scheme.bits == 4 else kept


def _nibble_offset(scheme: QuantScheme) -> int:
    return 8 if scheme.symmetric else 0


def pack_codes(codes: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Integer codes ``(out, K)`` -> their stored form (``code_dtype``, ``codes_shape``)."""
    if scheme.bits == 8:
        return codes.to(code_dtype(scheme))
    nibbles = (codes + _nibble_offset(scheme)).to(torch.uint8)
    if nibbles.shape[1] % 2:
        nibbles = torch.nn.functional.pad(nibbles, (0, 1))
    return nibbles[:, 0::2] | nibbles[:, 1::2] << 4


def unpack_codes(stored: torch.Tensor, kept: int, scheme: QuantScheme) -> torch.Tensor:
    """Stored codes -> int16 codes ``(out, kept)``."""
    if scheme.bits == 8:
        return stored.to(torch.int16)
    nibbles = torch.stack((stored & 15, stored >> 4), dim=-1).view(stored.shape[0], -1)[:, :kept]
    return nibbles.to(torch.int16) - _nibble_offset(scheme)


@torch.no_grad()
def encode_layer(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: QuantScheme, n: int,
                 m: int, codec: str, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """``(stored codes, meta)`` of an in-memory quantized N:M ``(out, in)`` weight (raises if it is off its grid or
    not N:M). The positions are the weight's, as the unquantized format stores them."""
    check_grid(scale, zero, weight.shape, scheme, name)
    values, meta = packing.pack(weight, n, m, codec, name)
    columns = packing.kept_positions(weight, n, m, name).nonzero()[:, 1].view(weight.shape[0], -1)
    group = columns // scheme.group_width(weight.shape[1])  # each kept value's group: codes of the kept values only
    zero = None if zero is None else zero.gather(1, group).float()
    return pack_codes(codes_of(values, scale.gather(1, group), zero, scheme, name), scheme), meta


def check_grid(scale: torch.Tensor, zero: torch.Tensor | None, shape: torch.Size | tuple[int, int],
               scheme: QuantScheme, name: str = "weight") -> None:
    """Raise unless ``scale`` / ``zero`` are the grid of an ``(out, in)`` = ``shape`` weight under ``scheme``."""
    out_features, in_features = shape
    scheme.check_width(in_features, name)
    expected = (out_features, in_features // scheme.group_width(in_features))
    if not scale.is_floating_point() or tuple(scale.shape) != expected:
        raise ValueError(f"{name}: weight_scale of shape {tuple(scale.shape)} and dtype {scale.dtype} is not the "
                         f"grid of {scheme} for a {tuple(shape)} weight (expected a float {expected}); quantize it "
                         "with this config (peft_sparse.quantize) or pass the config it was quantized with.")
    if scheme.symmetric != (zero is None):
        raise ValueError(f"{name}: {'has' if zero is not None else 'has no'} weight_zero_point, but the config says "
                         f"symmetric={scheme.symmetric}; pass the config the model was quantized with.")
    if zero is not None and (tuple(zero.shape) != expected or zero.dtype != torch.uint8
                             or (zero.numel() and int(zero.max()) > scheme.qmax)):
        raise ValueError(f"{name}: weight_zero_point must be uint8 {expected} in 0..{scheme.qmax}, got "
                         f"{zero.dtype} {tuple(zero.shape)}.")


def decode_layer(stored: torch.Tensor, meta: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                 in_features: int, n: int, m: int, codec: str, scheme: QuantScheme) -> DecodedLayer:
    """The codes, grid and keep set of a stored v2 layer; raises on tensors that do not fit each other."""
    out_features, kept = meta.shape[0], in_features // m * n
    check_grid(scale, zero, (out_features, in_features), scheme, "stored layer")
    expected = codes_shape(out_features, kept, scheme)
    if stored.dtype != code_dtype(scheme) or tuple(stored.shape) != expected:
        raise ValueError(f"stored codes of dtype {stored.dtype} and shape {tuple(stored.shape)} do not match "
                         f"{scheme} for {n}:{m} over {in_features} inputs (expected {code_dtype(scheme)} "
                         f"{expected}).")
    keep = packing.unpack_mask(meta, in_features, n, m, codec)
    codes = packing.unpack(unpack_codes(stored, kept, scheme), meta, in_features, n, m, codec)
    if zero is not None:
        codes = torch.where(keep, codes, expand_groups(zero.to(torch.int16), in_features))
    return DecodedLayer(codes, scale, zero, keep)
