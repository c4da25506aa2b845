"""Quantizers of the kept values vs slow literal restatements: the joint SparseGPT sweep, GPTQ on a fixed mask (column
by column, on random and on tied 4-bit data), and the quantization stage of the block walk."""

from __future__ import annotations

import pytest
import torch
from test_pruners import (
    _hessian,
    _quantised_weights,
    _tied_hessian,
    _weights_and_inputs,
    lowest_first,
    slow_scores_mask,
)

from peft_sparse import SparsityConfig, SparsityPattern, prune
from peft_sparse.modeling import find_decoder_blocks, is_sparse_layer, out_in
from peft_sparse.pruning.sparsegpt import prepare_hessian, quantize_with_inverse
from peft_sparse.quantization import QuantScheme, codes_of, grid_of
from peft_sparse.sparsity import nm_violations

# ---------- slow references ----------


def slow_grid(values: torch.Tensor, keep: torch.Tensor, scheme: QuantScheme):
    """Per row of one group: (scale, zero) from the kept values, the range widened to contain 0 (a loop over rows,
    arithmetic in the values' dtype)."""
    qmax = 2 ** (scheme.bits - 1) - 1 if scheme.symmetric else 2**scheme.bits - 1
    zero_value = torch.zeros((), dtype=values.dtype)
    scales, zeros = torch.ones(values.shape[0], dtype=values.dtype), torch.zeros(values.shape[0], dtype=values.dtype)
    for r in range(values.shape[0]):
        kept = torch.cat([values[r][keep[r]], zero_value[None]])
        low, high = kept.min(), kept.max()
        scale = (torch.maximum(low.abs(), high) if scheme.symmetric else high - low) / qmax
        if scale > 0:
            scales[r] = scale
        if not scheme.symmetric:
            zeros[r] = torch.clamp(torch.round(-low / scales[r]), 0, qmax)
    return scales, zeros


def slow_round(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    qmin = -(2 ** (scheme.bits - 1)) if scheme.symmetric else 0
    qmax = 2 ** (scheme.bits - 1) - 1 if scheme.symmetric else 2**scheme.bits - 1
    return (torch.clamp(torch.round(w / scale) + zero, qmin, qmax) - zero) * scale


def slow_obs_quantize(w, h, scheme: QuantScheme, keep=None, pattern=None, percdamp=0.01, dtype=torch.float64):
    """The joint sweep, literally: no blocks (every error goes straight to all later columns), one column at a time.
    At each group start the group's grid is fitted on the updated weights kept by a provisional mask of the group
    (joint; the fixed mask for gptq); an N:M mask is then chosen again at each M-group start on the updated weights,
    an unstructured one stays the group's."""
    w, h = w.clone().to(dtype), h.clone().to(dtype)
    rows, cols = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += percdamp * torch.mean(torch.diag(h)) * torch.eye(cols, dtype=dtype)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    width = cols if scheme.group_size == -1 else scheme.group_size
    keep = torch.zeros(rows, cols, dtype=torch.bool) if keep is None else keep.clone()
    scale = zero = None
    for i in range(cols):
        if i % width == 0:
            group = slice(i, i + width)
            if pattern is not None:
                keep[:, group] = slow_group_mask(w[:, group] ** 2 / torch.diag(u)[group] ** 2, pattern)
            scale, zero = slow_grid(w[:, group], keep[:, group], scheme)
        if pattern is not None and pattern.is_nm and i % pattern.m == 0:
            group = slice(i, i + pattern.m)
            keep[:, group] = slow_scores_mask(w[:, group] ** 2 / torch.diag(u)[group] ** 2, pattern)
        target = torch.where(keep[:, i], slow_round(w[:, i], scale, zero, scheme), torch.zeros((), dtype=dtype))
        error = (w[:, i] - target) / u[i, i]
        w[:, i:] -= error[:, None] * u[i, i:][None, :]
        w[:, i] = target
    return w.float(), keep


def slow_group_mask(scores: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
    """A group's mask: N:M per M columns; unstructured: the group's int(numel * sparsity) lowest scores, row-major
    ties (one threshold per group, as SparseGPT's per block)."""
    if pattern.is_nm:
        return slow_scores_mask(scores, pattern)
    keep = torch.ones_like(scores, dtype=torch.bool)
    flat = scores.flatten().tolist()
    keep.view(-1)[lowest_first(flat)[: int(len(flat) * pattern.sparsity)]] = False
    return keep


def _assert_on_grid(weight: torch.Tensor, keep: torch.Tensor, scale, zero, scheme: QuantScheme) -> None:
    codes_of(weight, scale, zero, scheme)  # raises if any value is off its group's grid
    assert torch.equal(weight[~keep], torch.zeros_like(weight[~keep]))
    assert not torch.signbit(weight[~keep]).any()  # +0.0, never -0.0


# ---------- the sweep vs the literal restatement ----------

CASES = [  # pattern or None (gptq: the mask of a SparseGPT prune, fixed), scheme, cols, blocksize
    ("2:4", QuantScheme(4, 16), 64, 32),
    ("2:4", QuantScheme(4, 32), 64, 16),  # a group spanning two blocks
    ("4:8", QuantScheme(4, -1), 64, 16),  # per channel: one group, the whole row
    ("2:4", QuantScheme(8, 16, symmetric=False), 64, 64),
    ("0.5", QuantScheme(4, 32), 64, 128),
    ("2:4", QuantScheme(4, 24), 48, 16),  # groups not aligned with blocks: every group start is a block start
    ("8:16", QuantScheme(4, 32), 64, 32),  # an M-group spanning chunks of the sweep
    ("3:6", QuantScheme(4, 24), 48, 24),  # M neither dividing nor a multiple of the chunk: chunks of gcd(M, 8)
    (None, QuantScheme(4, 16), 64, 32),
    (None, QuantScheme(4, 16, symmetric=False), 64, 16),
]


@pytest.mark.parametrize("spec, scheme, cols, blocksize", CASES)
def test_sweep_matches_column_by_column_reference(spec, scheme, cols, blocksize):
    w, x = _weights_and_inputs(rows=20, cols=cols)
    h = _hessian(x)
    hinv, dead = prepare_hessian(h, 0.01)
    if spec is None:  # gptq: a fixed 2:4 mask (the weight is already sparse)
        fixed = slow_scores_mask(w.abs(), SparsityPattern.parse("2:4"))
        w = w * fixed
        ours, keep, scale, zero = quantize_with_inverse(w, hinv, dead, scheme, keep=fixed, blocksize=blocksize)
        expected, expected_keep = slow_obs_quantize(w, h, scheme, keep=fixed)
    else:
        pattern = SparsityPattern.parse(spec)
        ours, keep, scale, zero = quantize_with_inverse(w, hinv, dead, scheme, pattern=pattern, blocksize=blocksize)
        expected, expected_keep = slow_obs_quantize(w, h, scheme, pattern=pattern)
        if pattern.is_nm:
            assert nm_violations(ours, pattern.n, pattern.m) == 0
            assert int(keep.sum()) == w.numel() * pattern.n // pattern.m
    assert torch.equal(keep, expected_keep)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
    _assert_on_grid(ours, keep, scale, zero, scheme)


@pytest.mark.parametrize("spec", ["2:4", None])
@pytest.mark.parametrize("symmetric", [True, False])
def test_sweep_on_tied_4bit_data_is_bit_exact(spec, symmetric):
    """4-bit weights (many equal magnitudes, rounding ties at .5 codes) and a tied diagonal Hessian: no error crosses
    columns, so every mask tie and every rounding tie must be resolved as the literal sweep does, bit for bit."""
    scheme = QuantScheme(4, 16, symmetric)
    w, h = _quantised_weights(rows=16, cols=64), _tied_hessian(64)
    hinv, dead = prepare_hessian(h, 0.01)
    if spec is None:
        fixed = slow_scores_mask(w.abs(), SparsityPattern.parse("2:4"))
        w = w * fixed
        ours, keep, scale, zero = quantize_with_inverse(w, hinv, dead, scheme, keep=fixed, blocksize=32)
        expected, expected_keep = slow_obs_quantize(w, h, scheme, keep=fixed, dtype=torch.float32)
    else:
        ours, keep, scale, zero = quantize_with_inverse(w, hinv, dead, scheme, pattern=SparsityPattern.parse(spec),
                                                        blocksize=32)
        expected, expected_keep = slow_obs_quantize(w, h, scheme, pattern=SparsityPattern.parse(spec),
                                                    dtype=torch.float32)
    codes = (w * keep) / scale.repeat_interleave(16, dim=1)
    assert int(((codes - codes.floor()) == 0.5).sum()) > 0  # rounding ties are exercised
    assert torch.equal(keep, expected_keep)
    assert torch.equal(ours, expected)
    _assert_on_grid(ours, keep, scale, zero, scheme)


def test_gptq_keeps_a_weight_already_on_its_grid():
    """A fixed-mask weight already on the grid its kept values fit: nothing to round, nothing propagated."""
    w, x = _weights_and_inputs(rows=16, cols=64)
    keep = slow_scores_mask(w.abs(), SparsityPattern.parse("2:4"))
    scheme = QuantScheme(4, 32)
    scale = (w * keep).abs().reshape(16, 2, 32).amax(-1) / 7
    on_grid = torch.round(w / scale.repeat_interleave(32, dim=1)) * scale.repeat_interleave(32, dim=1) * keep
    hinv, dead = prepare_hessian(_hessian(x), 0.01)
    ours, _, fitted, _ = quantize_with_inverse(on_grid, hinv, dead, scheme, keep=keep)
    torch.testing.assert_close(ours, on_grid, rtol=0, atol=1e-6)
    torch.testing.assert_close(fitted, scale)


def test_joint_is_better_than_prune_then_round():
    """The point of the joint sweep: lower output error than SparseGPT followed by round-to-nearest (note P1)."""
    from peft_sparse.pruning.sparsegpt import prune_with_inverse
    from peft_sparse.quantization import quantize_layer

    w, x = _weights_and_inputs(rows=32, cols=128, tokens=512)
    hinv, dead = prepare_hessian(_hessian(x), 0.01)
    pattern, scheme = SparsityPattern.parse("2:4"), QuantScheme(4, 32)
    joint, *_ = quantize_with_inverse(w, hinv, dead, scheme, pattern=pattern)
    pruned, keep = prune_with_inverse(w, hinv, dead, pattern)
    after, *_ = quantize_layer(pruned, keep, scheme)

    def error(q):
        return float(((w - q) @ x.T).norm())

    assert error(joint) < error(after)


# ---------- the stage in the block walk ----------


def _block_linears(model) -> dict[str, torch.nn.Module]:
    prefix = find_decoder_blocks(model)[0] + "."
    return {n: m for n, m in model.named_modules() if is_sparse_layer(m) and n.startswith(prefix)}


def _ids(model, nsamples: int = 4, seqlen: int = 16) -> torch.Tensor:
    vocab = model.get_input_embeddings().weight.shape[0]
    return torch.randint(0, vocab, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method, quantizer", [("sparsegpt", None), ("wanda", "gptq"), ("magnitude", "rtn"),
                                               ("sparsegpt", "gptq")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_walk_quantizes_every_target(tiny_model_factory, method, quantizer, dtype):
    model = tiny_model_factory("llama").to(dtype)
    config = SparsityConfig(method=method, pattern="2:4", bits=4, group_size=32, quantizer=quantizer)
    report = prune(model, config, calibration=_ids(model))
    if config.needs_calibration:
        assert all(layer.error > 0 for layer in report.layers)
    for name, module in _block_linears(model).items():
        weight = out_in(module)
        scale, zero = grid_of(module)
        assert weight.dtype == dtype and scale.dtype == dtype and zero is None
        assert scale.shape == (weight.shape[0], weight.shape[1] // 32)
        assert nm_violations(weight, 2, 4) == 0, name
        codes = codes_of(weight, scale, zero, config.scheme, name)
        assert int(codes.abs().amax()) <= 8
        assert not torch.signbit(weight[weight == 0]).any()


def test_walk_asymmetric_records_zero_points(tiny_model_factory):
    model = tiny_model_factory("gpt2")  # Conv1D: the grid is on the (out, in) view
    config = SparsityConfig(method="sparsegpt", pattern="2:4", bits=8, group_size=-1, symmetric=False)
    prune(model, config, calibration=_ids(model))
    for name, module in _block_linears(model).items():
        weight = out_in(module)
        scale, zero = grid_of(module)
        assert zero.dtype == torch.uint8 and zero.shape == scale.shape == (weight.shape[0], 1)
        codes = codes_of(weight, scale, zero.float(), config.scheme, name)
        assert torch.equal(codes[weight == 0], zero.expand_as(weight)[weight == 0].to(codes.dtype))


def test_unquantized_walk_records_no_grid(tiny_model_factory):
    model = tiny_model_factory("llama")
    prune(model, SparsityConfig(method="sparsegpt", pattern="2:4"), calibration=_ids(model))
    assert all(grid_of(module) is None for module in _block_linears(model).values())


def test_group_size_not_dividing_a_width_fails_before_any_work(tiny_model_factory):
    model = tiny_model_factory("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="not divisible by group_size=48"):
        prune(model, SparsityConfig(method="magnitude", pattern="2:4", bits=4, group_size=48))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_joint_with_a_refiner_is_refused():
    with pytest.raises(ValueError, match="quantizer='gptq'"):
        SparsityConfig(method="sparsegpt", pattern="2:4", bits=4, refine="dsnot")


def test_pass_two_forwards_the_quantized_block(tiny_model_factory):
    """magnitude + gptq in the walk == the walk written out: block i+1's Hessians come from block i quantized."""
    from peft_sparse.pruning.engine import capture_inputs, forward_block
    from peft_sparse.pruning.magnitude import magnitude_prune
    from peft_sparse.pruning.sparsegpt import HessianStats, accumulate_hessian

    model = tiny_model_factory("llama")
    expected = tiny_model_factory("llama")
    ids = _ids(model)
    config = SparsityConfig(method="magnitude", pattern="2:4", bits=4, group_size=32, quantizer="gptq")
    prune(model, config, calibration=ids)

    _, blocks = find_decoder_blocks(expected)
    with torch.no_grad():
        batches = capture_inputs(expected, blocks, ids)
        for block in blocks:
            targets = {n: m for n, m in block.named_modules() if is_sparse_layer(m)}
            stats = {n: HessianStats(torch.zeros(out_in(m).shape[1], out_in(m).shape[1])) for n, m in targets.items()}
            hooks = [m.register_forward_pre_hook(lambda mod, args, s=stats[n]: accumulate_hessian(s, args[0]))
                     for n, m in targets.items()]
            forward_block(block, batches)
            for hook in hooks:
                hook.remove()
            for name, module in targets.items():
                weight, keep = magnitude_prune(out_in(module).float(), config.sparsity_pattern)
                hinv, dead = prepare_hessian(stats[name].value, 0.01)
                quantized, *_ = quantize_with_inverse(weight, hinv, dead, config.scheme, keep=keep)
                out_in(module).copy_(quantized)
            batches = forward_block(block, batches)
    got, want = _block_linears(model), _block_linears(expected)
    for name in got:
        torch.testing.assert_close(out_in(got[name]), out_in(want[name]), rtol=1e-5, atol=1e-6)


# ---------- peft_sparse.quantize: an already-sparse model ----------


@pytest.mark.parametrize("quantizer", ["gptq", "rtn"])
def test_quantize_keeps_the_existing_mask(tiny_model_factory, quantizer):
    from peft_sparse import quantize

    model = tiny_model_factory("llama")
    prune(model, SparsityConfig(method="wanda", pattern="2:4"), calibration=_ids(model))
    before = {name: out_in(module).clone() for name, module in _block_linears(model).items()}
    config = SparsityConfig(pattern="2:4", bits=4, group_size=32, quantizer=quantizer)
    quantize(model, config, calibration=_ids(model))
    for name, module in _block_linears(model).items():
        weight = out_in(module)
        assert torch.equal(weight[before[name] == 0], torch.zeros_like(weight[before[name] == 0])), name  # mask kept
        codes_of(weight, *grid_of(module), config.scheme, name)
    assert model.peft_sparse_config is config


def test_quantize_refuses_a_model_that_is_not_nm_before_any_work(tiny_model_factory):
    from peft_sparse import quantize

    model = tiny_model_factory("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="is not 2:4 sparse"):
        quantize(model, SparsityConfig(pattern="2:4", bits=4, group_size=32, quantizer="gptq"), calibration=_ids(model))
    with pytest.raises(ValueError, match="'joint' prunes"):
        quantize(model, SparsityConfig(method="sparsegpt", pattern="2:4", bits=4, group_size=32))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_quantize_a_dense_model(tiny_model_factory):
    from peft_sparse import quantize

    model = tiny_model_factory("llama")
    config = SparsityConfig(sparsity=0.0, bits=8, group_size=-1, quantizer="gptq")
    quantize(model, config, calibration=_ids(model))
    for name, module in _block_linears(model).items():
        codes_of(out_in(module), *grid_of(module), config.scheme, name)
