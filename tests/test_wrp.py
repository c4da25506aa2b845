"""WRP: the recover set against slow references, the RecoverLinear module and its exact round trips."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peft_sparse.nn import RecoverLinear, merge_recovered
from peft_sparse.pruning.wanda import wanda_prune
from peft_sparse.pruning.wrp import WRPOptions, wrp_prune
from peft_sparse.sparsity import SparsityPattern, follows_nm

NM = SparsityPattern.parse("2:4")


def _case(rows: int = 32, cols: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randint(-6, 7, (rows, cols), generator=g).float() / 8  # coarse grid: many metric ties
    return weight, torch.rand(cols, generator=g) + 0.5


def _slow_recover(weight, scaler, keep, alpha):
    """Paper Algorithm 1, row by row: the top int(alpha * in) by metric (ties: lower column), minus the N:M kept."""
    metric = (weight.abs() * scaler.sqrt()).tolist()
    out = torch.zeros_like(keep)
    for r, row in enumerate(metric):
        top = sorted(range(len(row)), key=lambda j: (-row[j], j))[: int(len(row) * alpha)]
        for j in top:
            out[r, j] = not keep[r, j]
    return out


def _slow_blocks(weight, scaler, keep, b, k):
    """Paper Algorithm 2 with loops: per block row, the k tiles of largest summed pruned metric."""
    metric = weight.abs() * scaler.sqrt()
    out = torch.zeros_like(keep)
    for i in range(0, weight.shape[0], b):
        tiles = range(0, weight.shape[1], b)
        sums = [float((metric[i : i + b, j : j + b] * ~keep[i : i + b, j : j + b]).sum()) for j in tiles]
        for t in sorted(range(len(sums)), key=lambda t: -sums[t])[:k]:
            out[i : i + b, t * b : (t + 1) * b] = ~keep[i : i + b, t * b : (t + 1) * b]
    return out


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.25, 0.4, 1.0])
def test_recover_set_matches_slow_reference(alpha):
    weight, scaler = _case()
    result = wrp_prune(weight, scaler, NM, WRPOptions(alpha=alpha))
    _, keep = wanda_prune(weight, scaler, NM)
    assert torch.equal(result.mask, keep) and follows_nm(result.weight, 2, 4)
    expected = _slow_recover(weight, scaler, keep, alpha)
    assert torch.equal(result.extras["recover"], weight * expected)
    if alpha == 1.0:
        assert torch.equal(result.weight + result.extras["recover"], weight)


def test_recover_set_breaks_ties_toward_lower_columns():
    weight, _ = _case(seed=2)
    flat = torch.ones(weight.shape[1])  # |W| on a coarse grid, equal scalers: many tied metrics in every row
    result = wrp_prune(weight, flat, NM, WRPOptions(alpha=0.3))
    _, keep = wanda_prune(weight, flat, NM)
    assert torch.equal(result.extras["recover"], weight * _slow_recover(weight, flat, keep, 0.3))


def test_block_form_matches_slow_reference():
    weight, scaler = _case(seed=1)
    weight = weight + torch.rand_like(weight) * 1e-3  # distinct tile sums: topk order is then unambiguous
    result = wrp_prune(weight, scaler, NM, WRPOptions(block_size=8, blocks_per_row=3))
    _, keep = wanda_prune(weight, scaler, NM)
    expected = _slow_blocks(weight, scaler, keep, 8, 3)
    assert torch.equal(result.extras["recover"], weight * expected)
    assert result.extras["recover_blocks"].shape == (4, 3)


@pytest.mark.parametrize("options", [WRPOptions(alpha=0.3), WRPOptions(block_size=8, blocks_per_row=2)])
@pytest.mark.parametrize("layer", ["linear", "conv1d"])
def test_recover_linear_forward_round_trip_and_merge(options, layer):
    torch.manual_seed(0)
    dense = torch.randn(32, 64)
    result = wrp_prune(dense, torch.rand(64) + 0.5, NM, options)
    base = nn.Linear(64, 32) if layer == "linear" else Conv1D(32, 64)
    with torch.no_grad():
        (base.weight if layer == "linear" else base.weight.t()).copy_(result.weight)
    module = RecoverLinear(base, result.extras["recover"], result.extras.get("recover_blocks"))
    x = torch.randn(2, 5, 64)
    expected = x @ (result.weight + result.extras["recover"]).t() + base.bias
    torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(module.recover_dense(), result.extras["recover"])
    assert module.extra_nonzeros == int(result.extras["recover"].count_nonzero()) > 0
    if options.blocked:
        assert module.recover_val.shape == (4, 2, 8, 8)
    else:
        assert module.recover_val.numel() == module.extra_nonzeros  # CSR stores the non-zeros only

    copy = RecoverLinear(
        Conv1D(32, 64) if layer == "conv1d" else nn.Linear(64, 32),
        torch.zeros(32, 64),
        None if not options.blocked else torch.zeros(4, 2, dtype=torch.int32),
    )
    if not options.blocked:  # CSR buffers change size with the number of non-zeros
        for name in ("recover_col", "recover_val"):
            setattr(copy, name, torch.empty_like(getattr(module, name)))
    copy.load_state_dict(module.state_dict())
    assert torch.equal(copy.recover_dense(), module.recover_dense())

    holder = nn.Sequential(module)
    assert merge_recovered(holder) == 1 and holder[0] is base
    merged_weight = base.weight if layer == "linear" else base.weight.t()
    assert torch.equal(merged_weight, result.weight + result.extras["recover"])
    assert not follows_nm(merged_weight, 2, 4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"alpha": 1.5}, r"alpha must be a number in \[0, 1\]"),
        ({"alpha": -0.1}, "alpha"),
        ({"block_size": 16}, "needs both block_size and blocks_per_row"),
        ({"block_size": 0, "blocks_per_row": 2}, "block_size must be a positive integer"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WRPOptions(**kwargs)


def test_block_size_must_divide_the_layer():
    options = WRPOptions(block_size=24, blocks_per_row=1)
    with pytest.raises(ValueError, match="block_size=24 does not divide"):
        options.check_layer((64, 96), "mlp.up_proj")
    with pytest.raises(ValueError, match="blocks_per_row=5 exceeds"):
        WRPOptions(block_size=24, blocks_per_row=5).check_layer((48, 96), "mlp.up_proj")


@pytest.mark.parametrize("options", [WRPOptions(alpha=0.3), WRPOptions(block_size=8, blocks_per_row=2)])
def test_from_buffers_rebuilds_exactly_and_checks_shapes(options):
    result = wrp_prune(torch.randn(32, 64), torch.rand(64) + 0.5, NM, options)
    module = RecoverLinear(nn.Linear(64, 32), result.extras["recover"], result.extras.get("recover_blocks"))
    rebuilt = RecoverLinear.from_buffers(module.base, dict(module.named_buffers()))
    assert rebuilt.block_size == module.block_size and torch.equal(rebuilt.recover_dense(), module.recover_dense())
    with pytest.raises(ValueError, match="do not fit a layer"):
        RecoverLinear.from_buffers(nn.Linear(64, 16), dict(module.named_buffers()))
    with pytest.raises(ValueError, match="neither the element form"):
        RecoverLinear.from_buffers(module.base, {"recover_val": module.recover_val})
