"""AdamW with the SR-STE decay inside the optimizer: the ``"step"`` and ``"update"`` placements of AST.

With ``d = λ·(¬m ⊙ W)`` (pruned weights only) and loss gradient ``g̃``, the three placements of :class:`SparseTrainer`
differ in where ``d`` enters Adam. ``"gradient"`` adds ``d`` to ``g̃`` in the backward pass (classic SR-STE, ref. [21]
of the paper, and the paper's sentence "adding decay to the gradient"); it needs no special optimizer. This module
implements the other two:

``"step"``, one literal reading of the paper's section 3.2 formula ``β1·u_{t-1} + (1-β1)·g_t`` with the decay in
``g_t`` but not in the momentum::

    u_t = β1·u_{t-1} + (1-β1)·g̃             v_t = β2·v_{t-1} + (1-β2)·(g̃ + d)²
    W  -= lr · (u_t + (1-β1)·d) / (1-β1^t) / (sqrt(v_t / (1-β2^t)) + eps)

``"update"``, the authors' optimizer (thu-ml/Adaptive-Sparse-Trainer ``adamw.py``), with which the paper's λ values
were tuned: the decay joins the update with weight 1 and the second moment tracks the update itself::

    u_t = β1·u_{t-1} + (1-β1)·g̃             a_t = u_t + d
    v_t = β2·v_{t-1} + (1-β2)·a_t²
    W  -= lr · a_t / (1-β1^t) / (sqrt(v_t / (1-β2^t)) + eps)

So at equal λ, ``"step"`` weights the decay by ``1-β1`` (10x less than ``"gradient"`` once the momentum has filled),
and ``"update"`` pulls hardest. Unlike AdamW, ``"update"``'s second moment is that of the smoothed update, not of the
gradient, so even at ``λ = 0`` its masked-parameter steps are larger (the authors' code does the same); parameters
without a mask, and ``"step"`` at ``λ = 0``, step exactly like :class:`torch.optim.AdamW`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

OPTIMIZER_PLACEMENTS = ("step", "update")


class SparseAdamW(torch.optim.Optimizer):
    """AdamW whose parameters listed in ``masks`` get the SR-STE decay ``group["srste_decay"]`` at ``placement``.

    Args:
        params: parameters or groups, as for :class:`torch.optim.AdamW`.
        masks: maps a parameter to a function returning its current keep-mask (bool, or 0/1 in the parameter's
            dtype). A function, not a tensor, because wrappers (DDP) may replace a layer's mask buffer by a new tensor.
        placement: ``"step"`` or ``"update"`` (module docstring).
        srste_decay: initial decay; :class:`SparseTrainer` sets ``group["srste_decay"]`` every step (annealing).
    """

    def __init__(
        self,
        params,
        masks: Mapping[torch.Tensor, Callable[[], torch.Tensor]],
        placement: str = "step",
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        srste_decay: float = 0.0,
    ):
        if placement not in OPTIMIZER_PLACEMENTS:
            raise ValueError(f"placement={placement!r} is not one of {OPTIMIZER_PLACEMENTS}.")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, srste_decay=srste_decay)
        super().__init__(params, defaults)
        self.masks = masks
        self.placement = placement
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

    def _decay(self, param: torch.Tensor, decay: float) -> torch.Tensor:
        """``λ · W · (1 - m)``: the decay acts on pruned weights only."""
        keep = self.masks[param]()
        keep = keep.to(param.dtype) if keep.dtype == torch.bool else keep  # float operands are ~2x faster on CPU
        return torch.addcmul(param, param, keep, value=-1).mul_(decay)

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
        masked, decay = param in self.masks, group["srste_decay"]
        term = self._decay(param, decay) if masked and decay else None  # of W before this step's weight decay
        param.mul_(1 - group["lr"] * group["weight_decay"])
        exp_avg.lerp_(grad, 1 - beta1)
        if masked and self.placement == "update":  # the authors' path for every masked parameter, even at λ = 0
            numerator = exp_avg if term is None else exp_avg + term
            second = numerator
        elif term is not None:  # "step"
            numerator, second = torch.add(exp_avg, term, alpha=1 - beta1), grad + term
        else:
            numerator, second = exp_avg, grad
        exp_avg_sq.mul_(beta2).addcmul_(second, second, value=1 - beta2)
        denom = (exp_avg_sq / (1 - beta2**step)).sqrt_().add_(group["eps"])
        param.addcdiv_(numerator, denom, value=-group["lr"] / (1 - beta1**step))
