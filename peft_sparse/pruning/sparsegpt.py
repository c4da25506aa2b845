"""SparseGPT (Frantar & Alistarh, 2023, https://arxiv.org/abs/2301.00774): OBS pruning with weight updates.

Faithful to the reference ``SparseGPT.fasterprune``: fp32 Hessian ``H = 2/n sum X X^T`` (n counts sequences), dead
inputs zeroed, ``percdamp * mean(diag H)`` dampening, ``Hinv`` = upper Cholesky factor of ``H^-1``, blocks of
``blocksize`` columns with lazy batch updates, N:M masks chosen at each group start from ``w^2 / d^2`` on the
already-updated weights, and an adaptive unstructured mask per block (pruning exactly floor(numel * s) weights
per block where the reference prunes one more; see ``_prune_block``).

Faster than the reference, and exact: the reference walks the columns one by one, but once the mask of a run of
columns is fixed (a group of M for N:M, the whole block for unstructured) the sequential OBS recursion over those
columns is, per row r, the triangular system ``E_r A_r = w_r * p_r`` with ``A_r = U * (p_r p_r^T) + diag(1 - p_r)``
(``U`` the run's block of ``Hinv``, ``p_r`` the pruned indicator). We take the columns in chunks of up to 8, invert
the 2^k possible systems of a chunk once, and solve every row with one gathered batched product.

With a quantization grid (``bits``) the same Hessian code runs the GPTQ sweep instead (:func:`quantize_with_inverse`):
rounding is not linear in ``w``, so the subset-inverse trick does not apply and the columns go one at a time.
``joint`` (SparseGPT's sparsify+quantize, the masks chosen in the sweep) and ``gptq`` (an already-sparse weight, the
mask fixed) are that one sweep; both quantizers are registered here, next to the Hessian they use.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from ..quantization.grid import QuantScheme, fake_quantize, fit_scales
from ..quantization.methods import Quantizer
from ..sparsity import SparsityPattern, nm_mask, unstructured_mask
from .base import Pruner, PruneResult, RunningMean, sequences_and_rows
from .registry import PrunerOptions, register_pruner, register_quantizer

logger = logging.getLogger(__name__)

_CHUNK = 8  # columns solved together: 2^8 small systems per chunk are inverted once and shared by all rows
_DAMP_RETRIES = 6
_GRAM_PARTS = 4  # Hessian computed as 4 x 4 blocks, 10 of them: 38% fewer flops than a full X^T X


@dataclass(frozen=True)
class SparseGPTOptions(PrunerOptions):
    """Args:
    blocksize: columns per lazy-update block (reference: 128); M must divide it for N:M patterns.
    percdamp: dampening added to the Hessian diagonal, as a fraction of its mean (reference: 0.01).
    """

    blocksize: int = 128
    percdamp: float = 0.01

    def __post_init__(self) -> None:
        if isinstance(self.blocksize, bool) or not isinstance(self.blocksize, int) or self.blocksize < 1:
            raise ValueError(f"sparsegpt blocksize must be a positive integer (e.g. 128), got {self.blocksize!r}.")
        if isinstance(self.percdamp, bool) or not isinstance(self.percdamp, (int, float)) or not self.percdamp > 0:
            raise ValueError(f"sparsegpt percdamp must be a positive number (e.g. 0.01), got {self.percdamp!r}.")

    def check_pattern(self, pattern: SparsityPattern) -> None:
        """N:M groups must not straddle two blocks, as in the reference."""
        if pattern.is_nm and self.blocksize % pattern.m:
            raise ValueError(
                f"sparsegpt blocksize={self.blocksize} is not a multiple of M={pattern.m} (pattern {pattern}); "
                f"set method_options={{'blocksize': {pattern.m * max(1, 128 // pattern.m)}}}."
            )


def symmetric_gram(rows: torch.Tensor, parts: int = _GRAM_PARTS) -> torch.Tensor:
    """``X^T X`` computing only its upper block triangle and mirroring it: (parts + 1) / (2 parts) of the flops."""
    width = rows.shape[1]
    size = -(-width // parts)
    gram = rows.new_empty(width, width)
    for start in range(0, width, size):
        band = rows[:, start : start + size].t() @ rows[:, start:]
        gram[start : start + size, start:] = band
        gram[start + size :, start : start + size] = band[:, size:].t()
    return gram


def accumulate_hessian(stats: RunningMean, inp: torch.Tensor) -> None:
    """Fold a batch of inputs ``(..., in)`` into the running fp32 Hessian ``2/n sum X X^T``."""
    count, rows = sequences_and_rows(inp)
    stats.add(symmetric_gram(rows).mul_(2), count)


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp I)^-1``; retry with 10x the dampening if H is not positive definite."""
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    damp = percdamp * hessian.diagonal().mean()
    for _ in range(_DAMP_RETRIES):
        lower, info = torch.linalg.cholesky_ex(hessian + damp * eye)
        if not info:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if not info:
                return upper
        logger.warning("Hessian not positive definite with dampening %.3g; retrying with 10x more.", float(damp))
        damp = damp * 10
    raise ValueError(
        f"SparseGPT: the Hessian stays singular even with dampening {float(damp):.3g}; "
        "use more calibration samples or a larger `percdamp`."
    )


def _subset_inverses(u: torch.Tensor, k: int) -> torch.Tensor:
    """``A_S^-1`` for each k-column chunk of the block ``u`` and every pruned subset S of its columns.

    ``A_S = U_c * p p^T + diag(1 - p)`` with ``U_c`` the chunk's diagonal block of ``Hinv`` and ``p`` the pruned
    indicator of S. Row r of the OBS recursion over a chunk solves ``E_r A_{S_r} = w_r * p_r``; with at most 2^k
    distinct systems it is cheaper to invert them all once than to solve one system per row.
    Returns ``(chunks, 2^k, k, k)``; subset S is indexed by ``sum_j p_j 2^j``.
    """
    chunks = u.shape[0] // k
    diag_blocks = u.reshape(chunks, k, chunks, k).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    p = ((torch.arange(2**k, device=u.device).unsqueeze(1) >> torch.arange(k, device=u.device)) & 1).to(u.dtype)
    systems = diag_blocks.unsqueeze(1) * (p.unsqueeze(2) * p.unsqueeze(1)) + torch.diag_embed(1 - p)
    eye = torch.eye(k, dtype=u.dtype, device=u.device).expand_as(systems)
    return torch.linalg.solve_triangular(systems, eye, upper=True)


def _obs_chunk(
    w: torch.Tensor, u: torch.Tensor, keep: torch.Tensor, inverses: torch.Tensor, powers: torch.Tensor
) -> torch.Tensor:
    """Prune the first ``k = keep.shape[1]`` columns of ``w`` in place and compensate all later columns.

    Exactly the reference's column-by-column recursion, done for the k columns at once. ``u`` holds the matching
    rows of ``Hinv`` from the first column on, ``inverses`` the chunk's ``(2^k, k, k)`` subset inverses, indexed by
    ``pruned @ powers`` (``powers = 2^j``). Returns the errors ``(rows, k)`` for the lazy batch update.
    """
    k = keep.shape[1]
    pruned = (~keep).to(w.dtype)
    errors = torch.bmm((w[:, :k] * pruned).unsqueeze(1), inverses[(pruned @ powers).long()]).squeeze(1)
    w.addmm_(errors, u, alpha=-1)
    w[:, :k].mul_(keep)  # the pruned entries are now ~0 up to rounding: make them exact zeros
    return errors


def _prune_block(w: torch.Tensor, u: torch.Tensor, keep: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
    """Prune one block ``w`` (rows, B) in place given its ``Hinv`` block ``u``; fill ``keep``; return the errors.

    Unstructured count: we prune exactly ``floor(rows * B * sparsity)`` weights per block (the lowest ``w^2 / d^2``,
    ties keeping the lower row-major index). The reference IST-DASLab/sparsegpt prunes ``tmp <= sort(tmp)[k]``,
    i.e. ``floor(rows * B * sparsity) + 1`` per block (more when scores tie at the threshold); we keep the
    exact count so that the achieved sparsity is the one asked for.
    """
    saliency_scale = u.diagonal().square()
    if pattern.is_nm:
        step = math.gcd(pattern.m, _CHUNK)
    else:  # adaptive mask over the whole block, fixed before any update; exact count, see the docstring
        step = math.gcd(w.shape[1], _CHUNK)
        keep.copy_(unstructured_mask(w.square() / saliency_scale, pattern.sparsity, scope="layer"))
    inverses = _subset_inverses(u, step)
    powers = 2.0 ** torch.arange(step, device=w.device)
    errors = torch.empty_like(w)
    for g in range(0, w.shape[1], step):  # chunks are sequential: each sees the updates of the earlier ones
        if pattern.is_nm and g % pattern.m == 0:  # N:M: choose the group's mask on the updated weights
            group = slice(g, g + pattern.m)
            keep[:, group] = nm_mask(w[:, group].square() / saliency_scale[group], pattern.n, pattern.m)
        chunk = slice(g, g + step)
        errors[:, chunk] = _obs_chunk(w[:, g:], u[chunk, g:], keep[:, chunk], inverses[g // step], powers)
    return errors


@dataclass
class HessianStats(RunningMean):
    """The running Hessian, plus its prepared inverse factor once computed (shared by layers with the same input)."""

    prepared: tuple[torch.Tensor, torch.Tensor] | None = None


def prepare_hessian(hessian: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (``Hinv`` upper factor, dead-input mask); dead inputs (zero diagonal) get ``H_jj = 1``."""
    h = hessian.float().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    return inverse_hessian_factor(h, percdamp), dead


def prune_with_inverse(
    weight: torch.Tensor, hinv: torch.Tensor, dead: torch.Tensor, pattern: SparsityPattern, blocksize: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocked OBS pruning of an ``(out, in)`` weight given the prepared Hessian; returns (weight, keep mask)."""
    w = weight.float().clone()
    w[:, dead] = 0
    keep = torch.ones_like(w, dtype=torch.bool)
    for i1 in range(0, w.shape[1], blocksize):
        i2 = min(i1 + blocksize, w.shape[1])
        errors = _prune_block(w[:, i1:i2], hinv[i1:i2, i1:i2], keep[:, i1:i2], pattern)
        w[:, i2:].addmm_(errors, hinv[i1:i2, i2:], alpha=-1)  # lazy batch update of the later columns
    return w, keep


def sparsegpt_prune(
    weight: torch.Tensor, hessian: torch.Tensor, pattern: SparsityPattern, blocksize: int = 128, percdamp: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pruned and compensated fp32 weight, keep mask) for an ``(out, in)`` weight and its ``(in, in)`` Hessian."""
    return prune_with_inverse(weight, *prepare_hessian(hessian, percdamp), pattern, blocksize)


def _sweep_bounds(columns: int, blocksize: int, width: int) -> list[int]:
    """Block boundaries of the quantized sweep: every ``blocksize`` columns and at every group start.

    At a block start every later column has received all earlier errors (the lazy update is flushed), so a group
    that starts there fits its mask and scales on fully updated weights, whatever ``blocksize`` and the group width.
    """
    return sorted(set(range(0, columns, blocksize)) | set(range(0, columns, width)) | {columns})


def _chunk_width(m: int) -> int:
    """Columns per chunk of the quantized sweep of an N:M pattern: every M-group starts at a chunk start or lies
    inside one chunk, so its columns have received every earlier error when its mask is chosen."""
    return _CHUNK if _CHUNK % m == 0 else math.gcd(m, _CHUNK)


def _quantize_block(w: torch.Tensor, u: torch.Tensor, keep: torch.Tensor, scale: torch.Tensor,
                    zero: torch.Tensor | None, scheme: QuantScheme, pattern: SparsityPattern | None = None
                    ) -> torch.Tensor:
    """The GPTQ recursion over one block ``w`` (rows, B) of a single group, in place; returns the errors.

    Column j's target is its kept value rounded onto the group's grid (0 where pruned); the error
    ``(w_j - t_j) / U_jj`` is spread over the later columns: rank-1 inside a chunk of ``_CHUNK`` columns (fewer for
    an M neither dividing nor a multiple of it, see :func:`_chunk_width`), one
    ``addmm`` for the rest of the block (the same arithmetic as the reference's per-column ``W1[:, i:]`` update,
    in cache-sized pieces). With an N:M ``pattern`` each M-group's mask is chosen at its first column from
    ``w^2 / U_jj^2`` on the fully updated weights, as SparseGPT does (the block starts on an M-group start).
    """
    step = _CHUNK if pattern is None else _chunk_width(pattern.m)
    saliency_scale = u.diagonal().square()
    errors = torch.empty_like(w)
    for c1 in range(0, w.shape[1], step):
        c2 = min(c1 + step, w.shape[1])
        for j in range(c1, c2):
            if pattern is not None and j % pattern.m == 0:  # inside the chunk or at its start: fully updated
                group = slice(j, j + pattern.m)
                keep[:, group] = nm_mask(w[:, group].square() / saliency_scale[group], pattern.n, pattern.m)
            column = w[:, j : j + 1]
            target = fake_quantize(column, keep[:, j : j + 1], scale, zero, scheme)
            errors[:, j : j + 1] = (column - target) / u[j, j]
            w[:, j + 1 : c2].addmm_(errors[:, j : j + 1], u[j : j + 1, j + 1 : c2], alpha=-1)
            column.copy_(target)
        w[:, c2:].addmm_(errors[:, c1:c2], u[c1:c2, c2:], alpha=-1)
    return errors


def quantize_with_inverse(
    weight: torch.Tensor, hinv: torch.Tensor, dead: torch.Tensor, scheme: QuantScheme,
    keep: torch.Tensor | None = None, pattern: SparsityPattern | None = None, blocksize: int = 128,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The OBS/GPTQ sweep onto ``scheme``'s grid: ``(weight on the grid, keep, scale, zero)`` of an (out, in) weight.

    * ``keep`` given (``gptq`` on an already-sparse weight): the mask is fixed, pruned columns are forced to 0;
    * ``pattern`` given (``joint``): the masks are chosen in the sweep from ``w^2 / U_jj^2`` on the updated weights.
      N:M: each M-group's mask at its first column, once every earlier error has reached it, as SparseGPT does
      without bits (:func:`prune_with_inverse`); the grid's scale needs the group's kept values before its first
      column, so at each group start a provisional N:M mask of the whole group (same score, same weights) is
      chosen for the fit only. Unstructured: the group's lowest scores at the group start (one threshold per
      group, as SparseGPT's per block), fixed for the group.

    Scales are fitted per group of G dense columns on the **updated** kept weights at the group's start, the group
    then swept column by column (Babai's nearest plane: ``t_j = Q(w_j)``, ``e_j = (w_j - t_j) / U_jj``), the
    errors propagated as in SparseGPT (lazy blocks); the largest values are nearly always kept, so the provisional
    mask rarely narrows the range that the final masks need.

    The references differ: IST-DASLab/sparsegpt ``--wbits`` fits one per-channel asymmetric min/max grid
    (``Quantizer.find_params``, no groups) on the whole dense weight before the sweep, before pruning and before
    dead inputs are zeroed, so pruned weights shape the range; it then chooses each M-group's mask every M columns
    on the updated weights, as here, and rounds the pruned entries' zeros (0 is on its grid). IST-DASLab/gptq
    ``--groupsize`` refits at group start from ``W`` (missing the in-block updates of a group starting mid-block)
    and ``--static-groups`` fits every group up front on the original weights. Ours fits on what is actually
    quantized: the updated kept values.
    """
    if (keep is None) == (pattern is None):
        raise ValueError("Give exactly one of keep (a fixed mask) or pattern (masks chosen in the sweep).")
    w = weight.float().clone()
    w[:, dead] = 0
    rows, columns = w.shape
    width = scheme.group_width(columns)
    keep = torch.zeros_like(w, dtype=torch.bool) if keep is None else keep.clone()
    scale = w.new_empty(rows, columns // width)
    zero = None if scheme.symmetric else torch.empty_like(scale)
    saliency_scale = hinv.diagonal().square()
    remask = pattern if pattern is not None and pattern.is_nm else None  # N:M masks re-chosen per M-group
    bounds = _sweep_bounds(columns, blocksize, width)
    for i1, i2 in zip(bounds[:-1], bounds[1:]):
        g = i1 // width
        if i1 % width == 0:
            group = slice(i1, i1 + width)
            if pattern is not None:
                scores = w[:, group].square() / saliency_scale[group]
                keep[:, group] = (nm_mask(scores, pattern.n, pattern.m) if pattern.is_nm
                                  else unstructured_mask(scores, pattern.sparsity, scope="layer"))
            fitted_scale, fitted_zero = fit_scales(w[:, group], keep[:, group], scheme)
            scale[:, g : g + 1] = fitted_scale
            if zero is not None:
                zero[:, g : g + 1] = fitted_zero
        errors = _quantize_block(w[:, i1:i2], hinv[i1:i2, i1:i2], keep[:, i1:i2], scale[:, g : g + 1],
                                 None if zero is None else zero[:, g : g + 1], scheme, remask)
        w[:, i2:].addmm_(errors, hinv[i1:i2, i2:], alpha=-1)  # lazy batch update of the later columns
    return w, keep, scale, zero


def _prepared(stats: HessianStats, device: torch.device, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse factor of the (shared) statistics, computed once for all layers fed the same input."""
    if stats.prepared is None:
        stats.prepared = prepare_hessian(stats.value.to(device), percdamp)
    return stats.prepared


@register_pruner("sparsegpt")
class SparseGPTPruner(Pruner):
    Options = SparseGPTOptions

    def new_stats(self, in_features: int, device: torch.device) -> HessianStats:
        return HessianStats(torch.zeros(in_features, in_features, device=device))

    def accumulate(self, stats: HessianStats, inp: torch.Tensor) -> None:
        accumulate_hessian(stats, inp)

    def prune(self, weight: torch.Tensor, stats: HessianStats) -> PruneResult:
        prepared = _prepared(stats, weight.device, self.options.percdamp)
        return PruneResult(*prune_with_inverse(weight, *prepared, self.pattern, self.options.blocksize))

    def prune_quantized(self, weight: torch.Tensor, stats: HessianStats, scheme: QuantScheme) -> PruneResult:
        """Joint sparsify+quantize in the one sweep (:func:`quantize_with_inverse` with the masks chosen in it)."""
        prepared = _prepared(stats, weight.device, self.options.percdamp)
        w, keep, scale, zero = quantize_with_inverse(weight, *prepared, scheme, pattern=self.pattern,
                                                     blocksize=self.options.blocksize)
        return PruneResult(w, keep, grid=(scale, zero))


@register_quantizer("gptq")
class GPTQQuantizer(Quantizer):
    """GPTQ (Frantar et al., 2023) of an already-pruned weight: the mask fixed, static contiguous groups (no
    act-order: it would scatter each M-group over the sweep), the options of SparseGPT's sweep."""

    Options = SparseGPTOptions

    def new_stats(self, in_features: int, device: torch.device) -> HessianStats:
        return HessianStats(torch.zeros(in_features, in_features, device=device))

    def accumulate(self, stats: HessianStats, inp: torch.Tensor) -> None:
        accumulate_hessian(stats, inp)

    def quantize(self, weight: torch.Tensor, keep: torch.Tensor, stats: HessianStats
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        prepared = _prepared(stats, weight.device, self.options.percdamp)
        w, _, scale, zero = quantize_with_inverse(weight, *prepared, self.scheme, keep=keep,
                                                  blocksize=self.options.blocksize)
        return w, scale, zero


@register_quantizer("joint")
class JointQuantizer(Quantizer):
    """SparseGPT's joint mode: the pruner's own sweep quantizes as it prunes, on the pruner's Hessian (no
    statistics of its own). Only with ``method="sparsegpt"`` and no refiner (checked by the config)."""

    def prune_and_quantize(self, pruner: Pruner, name: str, weight: torch.Tensor, pruner_stats: Any, stats: Any
                           ) -> PruneResult:
        if not isinstance(pruner, SparseGPTPruner):
            raise ValueError(f"quantizer='joint' needs method='sparsegpt', not {pruner.name!r}.")
        return pruner.prune_quantized(weight, pruner_stats, self.scheme)
