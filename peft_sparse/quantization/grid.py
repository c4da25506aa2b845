"""The integer grid of a quantized sparse weight: scheme, scales fitted on the kept values, codes, dequantization.

Conventions (``FORMAT.md``, v2), on the ``(out, in)`` view of a weight:

* a *group* is ``group_size`` consecutive **dense** input columns (``-1``: the whole row), so the scale tensor is
  ``(out, in / group_size)`` whatever the sparsity, the same tensor as GPTQ / AWQ / compressed-tensors ``g128``;
* symmetric (the default): code ``q`` in ``[-2^(b-1), 2^(b-1) - 1]``, value ``q * s``. Asymmetric (opt-in): code in
  ``[0, 2^b - 1]`` with an integer zero point ``z`` in the same range, value ``(q - z) * s``. The range a group is
  fitted on always contains 0 (as the GPTQ reference's ``find_params`` forces), so 0 is always on the grid;
* scales and zero points are fitted on the **kept** values only: pruned zeros neither widen nor shift a group's range;
* a pruned weight has the zero code, so it dequantizes to ``+0.0`` exactly (``0 * s``), never ``-0.0``;
* dequantization is ``(q - z).to(dtype) * s.to(dtype)`` in the model's dtype: the loader and the in-memory model
  compute it the same way, so a reloaded weight is bit-equal to the quantized one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BITS = (4, 8)


@dataclass(frozen=True)
class QuantScheme:
    """Bit width, group size (dense input columns; ``-1`` = per output channel) and symmetry of the grid."""

    bits: int
    group_size: int = 128
    symmetric: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {self.bits!r}.")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or (
            self.group_size < 1 and self.group_size != -1
        ):
            raise ValueError(f"group_size must be a positive integer (e.g. 128) or -1 (per channel), "
                             f"got {self.group_size!r}.")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric must be True or False, got {self.symmetric!r}.")

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.symmetric else (1 << self.bits) - 1

    def group_width(self, in_features: int) -> int:
        """Dense columns per group for a layer ``in_features`` wide."""
        return in_features if self.group_size == -1 else self.group_size

    def check_width(self, in_features: int, name: str = "weight") -> None:
        """Raise if the groups do not tile the layer's inputs."""
        if in_features % self.group_width(in_features):
            raise ValueError(f"{name}: input width {in_features} is not divisible by group_size={self.group_size}; "
                             "choose a group size that divides every target's width (e.g. 64, 32) or -1 (per "
                             "channel).")

    def __str__(self) -> str:
        group = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        return f"int{self.bits} {group}{'' if self.symmetric else ' asym'}"


def expand_groups(per_group: torch.Tensor, in_features: int) -> torch.Tensor:
    """``(out, groups)`` -> ``(out, in)``: each group's value repeated over its dense columns."""
    repeats = in_features // per_group.shape[1]
    return per_group if repeats == 1 else per_group.repeat_interleave(repeats, dim=1)  # 1: a single column's grid


def fit_scales(weight: torch.Tensor, keep: torch.Tensor, scheme: QuantScheme
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(scale, zero)`` per group of an fp32 ``(out, in)`` weight, from its kept values only.

    ``scale`` is fp32 ``(out, groups)``; ``zero`` is an integer-valued fp32 ``(out, groups)`` tensor when asymmetric,
    else ``None``. A group whose kept values are all 0 gets scale 1 (any positive scale codes it exactly).
    """
    rows, in_features = weight.shape
    width = scheme.group_width(in_features)
    kept = (weight * keep).reshape(rows, in_features // width, width)
    if scheme.symmetric:
        scale = kept.abs().amax(-1) / scheme.qmax
        return torch.where(scale > 0, scale, torch.ones_like(scale)), None
    low = kept.amin(-1).clamp(max=0)  # the range holds 0: pruned zeros and rounding to 0 stay exact
    high = kept.amax(-1).clamp(min=0)
    scale = (high - low) / scheme.qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-low / scale).clamp(0, scheme.qmax)
    return scale, zero


def quantize(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: QuantScheme
             ) -> torch.Tensor:
    """Integer codes (int16, ``(out, in)``) of ``weight`` on the grid ``(scale, zero)``: round to nearest, clamp."""
    in_features = weight.shape[1]
    q = torch.round(weight / expand_groups(scale, in_features))
    if zero is not None:
        q = q + expand_groups(zero, in_features)
    return q.clamp_(scheme.qmin, scheme.qmax).to(torch.int16)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, dtype: torch.dtype
               ) -> torch.Tensor:
    """The ``(out, in)`` weight in ``dtype`` of integer ``codes`` on the grid ``(scale, zero)``; see the module doc."""
    in_features = codes.shape[1]
    q = codes if zero is None else codes - expand_groups(zero.to(codes.dtype), in_features)
    return q.to(dtype) * expand_groups(scale.to(dtype), in_features)


def fake_quantize(weight: torch.Tensor, keep: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                  scheme: QuantScheme) -> torch.Tensor:
    """The kept values of an fp32 weight rounded onto the grid, pruned positions exactly ``+0.0`` (fp32)."""
    codes = quantize(weight, scale, zero, scheme)
    zero_code = 0 if zero is None else expand_groups(zero, weight.shape[1]).to(torch.int16)
    codes = torch.where(keep, codes, zero_code)
    return dequantize(codes, scale, zero, torch.float32)


def quantize_layer(weight: torch.Tensor, keep: torch.Tensor, scheme: QuantScheme
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest of an fp32 ``(out, in)`` weight's kept values: ``(weight on the grid, scale, zero)``."""
    scale, zero = fit_scales(weight, keep, scheme)
    return fake_quantize(weight, keep, scale, zero, scheme), scale, zero


def codes_of(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: QuantScheme,
             name: str = "weight") -> torch.Tensor:
    """The codes whose dequantization in ``weight.dtype`` is exactly ``weight`` (what a writer stores).

    Rounding ``weight / scale`` gives them, except where the dequantized product was itself rounded (int8 in
    bfloat16: two neighbouring codes can land on one bfloat16 value, trap 2 of the design note); there the
    neighbours are tried. Raises, naming ``name``, when a value is on no grid point (the weight was changed after
    quantization, e.g. by training: re-quantize it).
    """
    scale_t = scale.to(weight.dtype)
    found = quantize(weight.float(), scale_t.float(), zero, scheme)
    done = dequantize(found, scale_t, zero, weight.dtype) == weight
    for step in (-1, 1):
        if bool(done.all()):
            break
        candidate = (found + step).clamp_(scheme.qmin, scheme.qmax)
        take = ~done & (dequantize(candidate, scale_t, zero, weight.dtype) == weight)
        found = torch.where(take, candidate, found)
        done |= take
    if not bool(done.all()):
        raise ValueError(f"{name}: {int((~done).sum())} values are not on their quantization grid ({scheme}); the "
                         "weight changed after it was quantized. Quantize it again (peft_sparse.quantize).")
    return found
