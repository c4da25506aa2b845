"""How hard each SR-STE placement pulls pruned weights toward zero, and the λ that equalises the pull.

The three placements (``peft_sparse.training.optim``) put the same decay ``d = λ·(¬m ⊙ W)`` into Adam at different
places, so one λ means different strengths. This measures the *pull*: the extra displacement toward zero that the
decay causes on pruned weights over ``--steps`` Adam steps, against the same run with λ = 0 and the same gradient
noise. The noise scale and the weight magnitudes come from SmolLM2-135M itself (one backward pass of the
``bench/train.py`` batch, 4 x 256 C4 tokens): the RMS loss gradient of the decoder linears and the mean |W| of the
weights a 2:4 magnitude mask prunes. Then, for each pair of placements, it bisects (in log λ) for the λ whose pull
equals the other placement's at the reference λ (the paper's 2e-4).

    python bench/srste_pull.py --out bench/results/srste_pull.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from peft_sparse.modeling import out_in, select_sparse_modules
from peft_sparse.sparsity import SparsityPattern, pattern_mask
from peft_sparse.training import SparseAdamW

C4 = "/work/shared/data/c4/c4-train.00000-of-01024.first1000.jsonl"
PLACEMENTS = ("gradient", "step", "update")


def smollm2_scales(batch: int, seqlen: int) -> tuple[float, float]:
    """(RMS loss gradient, mean |W| of the magnitude-pruned weights) of SmolLM2's decoder linears."""
    from peft_sparse.data import load_calibration
    from peft_sparse.models import smollm2

    model, tokenizer = smollm2()
    ids = load_calibration(C4, tokenizer, nsamples=batch, seqlen=seqlen, seed=1)
    model(input_ids=ids, labels=ids).loss.backward()
    pattern = SparsityPattern.parse("2:4")
    grads, pruned = [], []
    for module in select_sparse_modules(model).values():
        weight = out_in(module).detach()
        grads.append(module.weight.grad.flatten())
        pruned.append(weight[~pattern_mask(weight.abs(), pattern)].abs())
    grad = torch.cat(grads)
    return float(grad.square().mean().sqrt()), float(torch.cat(pruned).mean())


def pull(placement: str, lam: float, sigma: float, w0: float, steps: int, lr: float, n: int = 20000,
         seed: int = 0) -> float:
    """Mean extra displacement toward zero of pruned weights at ``w0`` caused by λ (same noise with and without)."""
    finals = []
    for decay in (0.0, lam):
        generator = torch.Generator().manual_seed(seed)
        param = torch.nn.Parameter(torch.full((n,), w0))
        keep = torch.zeros(n, dtype=torch.bool)  # every weight pruned
        if placement == "gradient":  # decay in the gradient, then plain AdamW (no mask given)
            opt = SparseAdamW([param], masks={}, lr=lr, betas=(0.9, 0.999))
        else:
            opt = SparseAdamW([param], masks={param: lambda keep=keep: keep}, placement=placement, lr=lr,
                              betas=(0.9, 0.999), srste_decay=decay)
        for _ in range(steps):
            noise = torch.randn(n, generator=generator) * sigma
            param.grad = noise + decay * param.detach() if placement == "gradient" else noise
            opt.step()
        finals.append(param.detach().clone())
    return float((finals[0] - finals[1]).mean())


def matching_lambda(placement: str, target: float, low: float, high: float, **kwargs) -> float | None:
    """λ whose pull equals ``target``, by bisection in log λ (the pull grows with λ); None if even ``high`` falls
    short (``"step"`` weights the decay by 1-β1 and saturates at about a tenth of an Adam step)."""
    if pull(placement, high, **kwargs) < target:
        return None
    for _ in range(30):
        mid = math.sqrt(low * high)
        if pull(placement, mid, **kwargs) < target:
            low = mid
        else:
            high = mid
    return math.sqrt(low * high)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="Adam steps (bench/train.py's run length)")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--lam", type=float, default=2e-4, help="reference λ")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("bench/results/srste_pull.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    sigma, w0 = smollm2_scales(args.batch, args.seqlen)
    common = dict(sigma=sigma, w0=w0, steps=args.steps, lr=args.lr)
    pulls = {p: pull(p, args.lam, **common) for p in PLACEMENTS}
    equal = {
        reference: {p: args.lam if p == reference else matching_lambda(p, pulls[reference], 1e-8, 1.0, **common)
                    for p in PLACEMENTS}
        for reference in PLACEMENTS
    }
    print(f"SmolLM2: RMS loss gradient {sigma:.3e}, mean |W| of 2:4-pruned weights {w0:.3e}, {args.steps} steps, "
          f"lr {args.lr:g}")
    pulls = " | ".join(f"λ for the pull of {r!r}" for r in PLACEMENTS)
    print(f"| placement | pull at λ={args.lam:g} | {pulls} |")
    print("|---|---:|" + "---:|" * len(PLACEMENTS))
    for p in PLACEMENTS:
        cells = " | ".join("unreachable" if equal[r][p] is None else f"{equal[r][p]:.3g}" for r in PLACEMENTS)
        print(f"| {p} | {pulls[p]:.3e} | {cells} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(config={k: str(v) for k, v in vars(args).items()}, sigma=sigma, w0=w0,
                                        pull=pulls, equal_pull_lambda=equal), indent=2) + "\n")


if __name__ == "__main__":
    main()
