"""DSnoT refinement: against a slow per-row reference, exact N:M, and the error it is meant to lower."""

from __future__ import annotations

import pytest
import torch

from peft_sparse.pruning.dsnot import PAPER_TOKENS, DSnoTOptions, MomentStats, accumulate_moments, dsnot_refine
from peft_sparse.pruning.magnitude import magnitude_prune
from peft_sparse.pruning.wanda import wanda_prune
from peft_sparse.sparsity import SparsityPattern, follows_nm

NM = SparsityPattern.parse("2:4")
HALF = SparsityPattern.parse(0.5)


def _dyadic_case(rows: int = 24, cols: int = 32, seed: int = 0):
    """Weights and activations on a coarse binary grid, so every error sum is exact in fp32 in any order."""
    g = torch.Generator().manual_seed(seed)
    dense = torch.randint(-8, 9, (rows, cols), generator=g).float() / 4
    x = torch.randint(-3, 5, (2, 4, cols), generator=g).float()  # 8 tokens: means are exact
    stats = MomentStats.empty(cols, torch.device("cpu"))
    accumulate_moments(stats, x)
    return dense, x, stats


def _slow_row(dense, weight, keep, stats, pattern, options):
    """Algorithm 1 with the code's stopping rule, one row and one cycle at a time, in plain Python."""
    mean, norm, var = stats.mean, stats.norm, stats.var.clamp_min(torch.finfo(torch.float32).tiny)
    w, keep, init_keep = weight.clone(), keep.clone(), keep.clone()
    error = float(((dense - w) * mean).sum())
    sign = (error > 0) - (error < 0)
    threshold = options.eps / PAPER_TOKENS
    score = (dense * mean / var.pow(options.var_power) * sign).tolist()
    candidates = sorted((j for j in range(len(w)) if not keep[j] and score[j] > 0), key=lambda j: (-score[j], j))
    metric = (w.abs() * norm).tolist()
    qualifies = [
        bool(init_keep[k]) and (not options.same_sign or float(w[k] * mean[k]) * sign < 0) for k in range(len(w))
    ]
    prune_queue = sorted((k for k in range(len(w)) if qualifies[k]), key=lambda k: (metric[k], k))
    if abs(error) <= threshold or sign == 0:
        return w, keep
    for cycle in range(options.max_cycles):
        if cycle >= len(candidates):
            break
        g = candidates[cycle]
        if pattern.is_nm:
            start = g - g % pattern.m
            block = [k for k in range(start, start + pattern.m) if keep[k] and qualifies[k]]
            if not block:
                continue
            p = min(block, key=lambda k: (metric[k], k))
        else:
            if not prune_queue:
                continue
            p = prune_queue[0]
        new_error = error - float(dense[g] * mean[g]) + float(w[p] * mean[p])
        if (new_error > 0) - (new_error < 0) != sign:
            break
        keep[g], keep[p], w[g], w[p] = True, False, dense[g], 0.0
        if not pattern.is_nm:
            prune_queue.pop(0)
        error = new_error
        if abs(error) <= threshold:
            break
    return w, keep


@pytest.mark.parametrize("pattern", [NM, HALF], ids=["2:4", "unstructured"])
@pytest.mark.parametrize(
    "options", [DSnoTOptions(eps=0.0), DSnoTOptions(same_sign=False, max_cycles=7, eps=0.75 * PAPER_TOKENS)]
)
def test_matches_slow_reference(pattern, options):
    dense, _, stats = _dyadic_case()
    weight, keep = wanda_prune(dense, stats.squares.float(), pattern)
    fast_w, fast_keep = dsnot_refine(dense, weight, keep, stats, pattern, options)
    changed = 0
    for r in range(dense.shape[0]):
        slow_w, slow_keep = _slow_row(dense[r], weight[r], keep[r], stats, pattern, options)
        assert torch.equal(fast_keep[r], slow_keep), f"row {r}"
        assert torch.equal(fast_w[r], slow_w), f"row {r}"
        changed += int((slow_keep != keep[r]).any())
    assert changed > 0  # the case exercises real swaps


def _row_errors(x: torch.Tensor, dense: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """|mean over calibration tokens of the output error| per row, straight from the activations."""
    return (x.reshape(-1, x.shape[-1]) @ (dense - weight).t()).mean(0).abs()


@pytest.mark.parametrize("start", ["wanda", "magnitude"])
def test_exact_nm_and_no_row_error_worse(start):
    torch.manual_seed(1)
    dense = torch.randn(64, 128)
    x = torch.randn(4, 50, 128) * torch.rand(128) * 3 + torch.randn(128)
    stats = MomentStats.empty(128, torch.device("cpu"))
    for sample in x:
        accumulate_moments(stats, sample)
    if start == "wanda":
        weight, keep = wanda_prune(dense, stats.squares.float(), NM)
    else:
        weight, keep = magnitude_prune(dense, NM)
    refined, refined_keep = dsnot_refine(dense, weight, keep, stats, NM, DSnoTOptions(eps=0.0))
    assert follows_nm(refined, 2, 4)
    assert torch.equal(refined_keep.reshape(64, -1, 4).sum(-1), keep.reshape(64, -1, 4).sum(-1))
    assert torch.equal(refined, dense * refined_keep)  # values come from the dense weight: no weight update
    before, after = _row_errors(x, dense, weight), _row_errors(x, dense, refined)
    assert torch.all(after <= before + 1e-4)
    assert after.mean() < 0.5 * before.mean()


def test_unstructured_keeps_each_rows_count():
    dense, x, stats = _dyadic_case(seed=3)
    weight, keep = wanda_prune(dense, stats.squares.float(), HALF)
    _, refined_keep = dsnot_refine(dense, weight, keep, stats, HALF, DSnoTOptions(eps=0.0))
    assert not torch.equal(refined_keep, keep)
    assert torch.equal(refined_keep.sum(1), keep.sum(1))
    assert torch.all(_row_errors(x, dense, dense * refined_keep) <= _row_errors(x, dense, weight) + 1e-5)


def test_zero_cycles_and_large_eps_change_nothing():
    dense, _, stats = _dyadic_case()
    weight, keep = wanda_prune(dense, stats.squares.float(), NM)
    for options in (DSnoTOptions(max_cycles=0), DSnoTOptions(eps=1e9)):
        refined, refined_keep = dsnot_refine(dense, weight, keep, stats, NM, options)
        assert torch.equal(refined_keep, keep) and torch.equal(refined, weight)


def test_moments_are_exact_over_batches():
    x = torch.randn(3, 40, 16, dtype=torch.float64)
    stats = MomentStats.empty(16, torch.device("cpu"))
    for part in x.split(1):
        accumulate_moments(stats, part)
    flat = x.reshape(-1, 16)
    torch.testing.assert_close(stats.mean, flat.mean(0).float())
    torch.testing.assert_close(stats.var, flat.var(0, unbiased=False).float())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_cycles": -1}, "max_cycles"),
        ({"max_cycles": 2.5}, "max_cycles"),
        ({"eps": -0.1}, "eps"),
        ({"layers": "ffn"}, "layers"),
        ({"same_sign": "yes"}, "same_sign"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DSnoTOptions(**kwargs)


@pytest.mark.parametrize(
    "name, attention",
    [
        ("model.layers.0.self_attn.q_proj", True),
        ("model.layers.0.mlp.down_proj", False),
        ("transformer.h.1.attn.c_attn", True),
        ("model.decoder.layers.0.fc1", False),
        ("gpt_neox.layers.0.attention.dense", True),
    ],
)
def test_layer_choice(name, attention):
    assert DSnoTOptions(layers="attention").applies_to(name) is attention
    assert DSnoTOptions(layers="mlp").applies_to(name) is not attention
    assert DSnoTOptions(layers="all").applies_to(name)
