"""DSnoT (Zhang et al., ICLR 2024, https://arxiv.org/abs/2310.08915): training-free refinement of a pruning mask.

Per output row ``r`` the expected reconstruction error is ``e_r = sum_j (W_rj - W'_rj) E[x_j]`` (``W`` dense,
``W'`` pruned). Each cycle a row grows one pruned weight and prunes one kept weight to drive ``e_r`` toward zero:

* grow: the pruned ``j`` that lowers ``|e_r|`` most per unit variance, ``sign(e_r) W_rj E[x_j] / Var(x_j)^gamma``
  largest (paper Eq. 2). A grown weight gets its dense value back;
* prune: the kept weight with the smallest Wanda metric ``|W'_rk| ||x_k||``, in the grown weight's M-block for
  N:M (so the result stays exactly N:M) or anywhere in the row for unstructured. With ``same_sign`` (paper Eq. 3)
  only weights whose removal also moves ``e_r`` toward zero qualify;
* a row stops when the swap would flip the sign of ``e_r``, when ``|e_r| <= eps``, or after ``max_cycles``.

Where the paper and the authors' code (zyxxmu/DSnoT ``prune_DSnoT``) differ, and what we do:

* stopping: the paper's Algorithm 1 stops on ``e_r < eps``; the code stops when a swap would flip the error's sign
  or ``|e_r| <= eps``. We follow the code (the issue's rule); since a row never changes sign, its growth
  direction and pruning sign condition are fixed per row, so one candidate pointer per row suffices.
* pruning sign condition (Eq. 3): the code drops it for N:M (and ``--without_same_sign`` is always on for
  unstructured); we keep it by default (``same_sign=True``) and expose the choice.
* statistics: the code's E[x] is a per-sample sum over the sequence (not divided by tokens) and its variance a
  token-weighted mean of per-sample variances; we use exact per-token mean and variance over all calibration tokens
  and express ``eps`` in the paper's unit (see :class:`DSnoTOptions`).
* start weights: the code refines the mask only, on the original weights (its SparseGPT start never fills the
  Hessian and applies no update). We refine the given pruned weights: after SparseGPT the error and the pruning
  metric use the compensated kept values, and a grown weight takes its dense value.

Everything is vectorised over the rows of a layer (an active-row indicator); the only loop is over cycles.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..sparsity import SparsityPattern
from .base import PruneResult, Refiner
from .registry import PrunerOptions, register_refiner

PAPER_TOKENS = 2048  # tokens per calibration sequence in the paper and its code: the unit of ``eps``
LAYER_CHOICES = ("attention", "mlp", "all")
_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)


@dataclass(frozen=True)
class DSnoTOptions(PrunerOptions):
    """Args:
    max_cycles: grow-and-prune cycles per row at most (paper and code: 50).
    eps: stop a row once ``|e_r| <= eps``, with ``e_r`` the row's expected output error summed over one
        2048-token sequence, the unit of the paper and its code (their ``update_threshold=0.1``). Our statistics are
        per token, so the per-token threshold is ``eps / 2048`` whatever the calibration length.
    var_power: exponent ``gamma`` of ``Var(x)`` in the growth criterion (code: ``pow_of_var_regrowing=1``).
    same_sign: prune only weights whose removal lowers ``|e_r|`` (paper Eq. 3; the code's N:M path omits it).
    layers: which projections to refine: ``"attention"`` (the code's default ``skip_layer="mlp"``), ``"mlp"``
        or ``"all"``; the others keep the start pruner's result.
    """

    max_cycles: int = 50
    eps: float = 0.1
    var_power: float = 1.0
    same_sign: bool = True
    layers: str = "attention"

    def __post_init__(self) -> None:
        if isinstance(self.max_cycles, bool) or not isinstance(self.max_cycles, int) or self.max_cycles < 0:
            raise ValueError(f"dsnot max_cycles must be a non-negative integer (e.g. 50), got {self.max_cycles!r}.")
        for name in ("eps", "var_power"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"dsnot {name} must be a non-negative number, got {value!r}.")
        if not isinstance(self.same_sign, bool) or self.layers not in LAYER_CHOICES:
            raise ValueError(
                f"dsnot same_sign must be true or false and layers one of {LAYER_CHOICES}; "
                f"got same_sign={self.same_sign!r}, layers={self.layers!r}."
            )

    def applies_to(self, name: str) -> bool:
        """Whether the layer called ``name`` is refined; attention layers are those whose name says attn/attention."""
        if self.layers == "all":
            return True
        return bool(_ATTENTION.search(name)) == (self.layers == "attention")


@dataclass
class MomentStats:
    """Per input feature: token count, sum and sum of squares (fp64), for E[x], Var(x) and ||x||."""

    total: torch.Tensor
    squares: torch.Tensor
    tokens: int = 0

    @classmethod
    def empty(cls, in_features: int, device: torch.device) -> MomentStats:
        zeros = torch.zeros(in_features, dtype=torch.float64, device=device)
        return cls(zeros, zeros.clone())

    @property
    def mean(self) -> torch.Tensor:
        return (self.total / max(self.tokens, 1)).float()

    @property
    def var(self) -> torch.Tensor:
        """Population variance over all calibration tokens (not a mean of per-sample variances)."""
        mean = self.total / max(self.tokens, 1)
        return (self.squares / max(self.tokens, 1) - mean.square()).clamp_min(0).float()

    @property
    def norm(self) -> torch.Tensor:
        """``||x_j||`` up to a constant factor, which the per-row comparisons of the Wanda metric ignore."""
        return self.squares.sqrt().float()


def accumulate_moments(stats: MomentStats, inp: torch.Tensor) -> None:
    """Fold a batch of layer inputs ``(..., in)`` into ``stats``."""
    rows = inp.reshape(-1, inp.shape[-1]).float()
    stats.total += rows.sum(0)
    stats.squares += rows.square().sum(0)
    stats.tokens += rows.shape[0]


def _growth_order(score: torch.Tensor, sign: torch.Tensor, pruned: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the pruned weights whose growth moves the error toward zero, best first; (order, usable)."""
    gain = torch.where(pruned, score * sign.unsqueeze(1), -torch.inf)
    gain = gain.masked_fill(gain <= 0, -torch.inf)
    sorted_gain, order = gain.sort(dim=1, descending=True, stable=True)
    return order, torch.isfinite(sorted_gain)


def _nm_prune_choice(
    grow: torch.Tensor, metric: torch.Tensor, prunable: torch.Tensor, m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The prunable weight with the smallest metric in each row's M-block of ``grow``; (index, exists)."""
    block = (grow - grow % m).unsqueeze(1) + torch.arange(m, device=grow.device)
    candidates = torch.where(prunable.gather(1, block), metric.gather(1, block), torch.inf)
    best, offset = candidates.min(dim=1)
    return block.gather(1, offset.unsqueeze(1)).squeeze(1), torch.isfinite(best)


def dsnot_refine(
    dense: torch.Tensor,
    weight: torch.Tensor,
    keep: torch.Tensor,
    stats: MomentStats,
    pattern: SparsityPattern,
    options: DSnoTOptions = DSnoTOptions(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Refine a pruned ``(out, in)`` ``weight`` with keep mask ``keep`` (``dense``: the weight before pruning).

    Returns the refined (weight, keep mask); the number of kept weights per row (per M-block for N:M) is unchanged.
    """
    dense, w, keep = dense.float(), weight.float().clone(), keep.clone()
    mean, norm = stats.mean.to(w.device), stats.norm.to(w.device)
    var = stats.var.to(w.device).clamp_min(torch.finfo(torch.float32).tiny)
    rows = torch.arange(w.shape[0], device=w.device)
    error = (dense - w) @ mean  # per token; growing j lowers it by dense_rj mean_j, pruning k raises it by w_rk mean_k
    sign = error.sign()
    threshold = options.eps / PAPER_TOKENS
    grow_delta = dense * mean
    order, usable = _growth_order(grow_delta / var.pow(options.var_power), sign, ~keep)
    prunable = keep.clone()  # initially kept weights still kept: a grown weight is never pruned again
    if options.same_sign:
        prunable &= (w * mean) * sign.unsqueeze(1) < 0
    metric = w.abs() * norm
    if not pattern.is_nm:  # one pointer per row over the prunable weights, smallest metric first
        prune_order = torch.where(prunable, metric, torch.inf).sort(dim=1, stable=True).indices
        prune_ptr = torch.zeros_like(rows)
    ptr = torch.zeros_like(rows)
    active = (error.abs() > threshold) & (sign != 0)
    width = w.shape[1]
    for _ in range(options.max_cycles):
        if not active.any():
            break
        at = ptr.clamp_max(width - 1).unsqueeze(1)
        grow = order.gather(1, at).squeeze(1)
        can_grow = usable.gather(1, at).squeeze(1) & (ptr < width)
        if pattern.is_nm:
            prune, can_prune = _nm_prune_choice(grow, metric, prunable, pattern.m)
        else:
            prune = prune_order.gather(1, prune_ptr.clamp_max(width - 1).unsqueeze(1)).squeeze(1)
            can_prune = prunable[rows, prune] & (prune_ptr < width)
        new_error = error - grow_delta[rows, grow] + w[rows, prune] * mean[prune]
        active &= can_grow & (~can_prune | (new_error.sign() == sign))
        update = active & can_prune
        u, g, p = rows[update], grow[update], prune[update]
        keep[u, g], keep[u, p], prunable[u, p] = True, False, False
        w[u, g], w[u, p] = dense[u, g], 0.0
        error = torch.where(update, new_error, error)
        active &= error.abs() > threshold
        ptr += 1
        if not pattern.is_nm:
            prune_ptr += update.long()
    return w, keep


@register_refiner("dsnot")
class DSnoTRefiner(Refiner):
    Options = DSnoTOptions

    def new_stats(self, in_features: int, device: torch.device) -> MomentStats:
        return MomentStats.empty(in_features, device)

    def accumulate(self, stats: MomentStats, inp: torch.Tensor) -> None:
        accumulate_moments(stats, inp)

    def applies_to(self, name: str) -> bool:
        return self.options.applies_to(name)

    def refine(self, dense: torch.Tensor, start: PruneResult, stats: MomentStats) -> PruneResult:
        weight, mask = dsnot_refine(dense, start.weight, start.mask, stats, self.pattern, self.options)
        return PruneResult(weight, mask, start.extras)
