"""AdamW with the SR-STE decay kept out of the first moment (AST section 3.2, "decoupled" placement).

With ``d = λ·(¬m ⊙ W)`` and loss gradient ``g̃``, one step is::

    u_t = β1·u_{t-1} + (1-β1)·g̃            # first moment: loss gradient only
    g_t = g̃ + d
    v_t = β2·v_{t-1} + (1-β2)·g_t²          # second moment: gradient + decay
    W  -= lr · (u_t + (1-β1)·d) / (1-β1^t) / (sqrt(v_t / (1-β2^t)) + eps)   (+ decoupled weight decay)

i.e. the numerator is ``β1·u_{t-1} + (1-β1)·g_t`` as in the paper: the decay acts on the current step only and never
accumulates in the momentum. Accumulated in the momentum (classic SR-STE placement) it keeps pushing pruned weights
for ~1/(1-β1) steps after they were pruned, and Adam's normalisation turns a tiny decay into a full-size step, so
pruned weights chase kept ones and masks flip far more (a SmolLM2 trial of the classic placement flipped ~10% of
kept weights in its first 10 steps and diverged).
With ``λ = 0`` or no mask the step is exactly :class:`torch.optim.AdamW`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch


class SparseAdamW(torch.optim.Optimizer):
    """AdamW whose parameters listed in ``masks`` get the decoupled SR-STE decay ``group["srste_decay"]``.

    Args:
        params: parameters or groups, as for :class:`torch.optim.AdamW`.
        masks: maps a parameter to a function returning its current keep-mask (bool, or 0/1 in the parameter's
            dtype). A function, not a tensor, because wrappers (DDP) may replace a layer's mask buffer by a new tensor.
        srste_decay: initial decay; :class:`SparseTrainer` sets ``group["srste_decay"]`` every step (annealing).
    """

    def __init__(
        self,
        params,
        masks: Mapping[torch.Tensor, Callable[[], torch.Tensor]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        srste_decay: float = 0.0,
    ):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, srste_decay=srste_decay)
        super().__init__(params, defaults)
        self.masks = masks
        for param, mask_fn in masks.items():
            mask = mask_fn()
            if param.shape != mask.shape:
                raise ValueError(
                    f"SparseAdamW needs whole (unsharded) parameters, got shape {tuple(param.shape)} for a "
                    f"{tuple(mask.shape)} mask (FSDP shards parameters). Use srste_placement='gradient' there."
                )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, group)
        return loss

    def _update(self, param: torch.Tensor, group: dict) -> None:
        beta1, beta2 = group["betas"]
        state = self.state[param]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(param)
            state["exp_avg_sq"] = torch.zeros_like(param)
        state["step"] += 1
        step = state["step"].item()
        grad, exp_avg, exp_avg_sq = param.grad, state["exp_avg"], state["exp_avg_sq"]

        mask_fn = self.masks.get(param)
        decay = None
        if mask_fn is not None and group["srste_decay"]:
            keep = mask_fn()
            keep = keep.to(param.dtype) if keep.dtype == torch.bool else keep  # float operands are ~2x faster on CPU
            decay = torch.addcmul(param, param, keep, value=-1).mul_(group["srste_decay"])  # λ · W · (1 - m)
        param.mul_(1 - group["lr"] * group["weight_decay"])
        exp_avg.lerp_(grad, 1 - beta1)
        full_grad = grad if decay is None else grad + decay
        exp_avg_sq.mul_(beta2).addcmul_(full_grad, full_grad, value=1 - beta2)
        numerator = exp_avg if decay is None else torch.add(exp_avg, decay, alpha=1 - beta1)
        denom = (exp_avg_sq / (1 - beta2**step)).sqrt_().add_(group["eps"])
        param.addcdiv_(numerator, denom, value=-group["lr"] / (1 - beta1**step))
