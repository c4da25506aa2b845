"""CPU int4 / int8 kernel layers: exact dequantized weights, outputs matching a float matmul on them, fallbacks."""

from __future__ import annotations

import pytest
import torch
from peft_tiny_models import tiny_llama
from torch import nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

from peft_sparse.modeling import select_sparse_modules
from peft_sparse.quantization import QuantScheme, dequantize, grid_of, quantize, quantize_layer, set_grid
from peft_sparse.quantization.kernels import IntLinear, dequantize_kernels, kernel_unsupported, to_kernels
from peft_sparse.sparsity import nm_mask

SCHEMES = [QuantScheme(4, g) for g in (32, 64, 128, 256, -1)] + [QuantScheme(8, -1)]
# the kernels accumulate in their own order: agreement with a float matmul on the same weights, not bit equality
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _codes(out_features: int, in_features: int, scheme: QuantScheme, seed: int = 0):
    """2:4-sparse codes and scales of a random weight, the pruned codes exactly 0."""
    torch.manual_seed(seed)
    weight = torch.randn(out_features, in_features)
    keep = nm_mask(weight.abs(), 2, 4)
    on_grid, scale, zero = quantize_layer(weight, keep, scheme)
    return quantize(on_grid, scale, zero, scheme), scale, keep


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_kernel_layer_matches_dequantized_layer(scheme, dtype):
    in_features = 512 if scheme.group_size != -1 else 256
    codes, scale, keep = _codes(192, in_features, scheme)
    scale = scale.to(dtype)
    bias = torch.randn(192).to(dtype)
    layer = IntLinear.from_codes(codes, scale, scheme, bias)
    dequantized = dequantize(codes, scale, None, dtype)
    assert torch.equal(layer.dequantized_weight(), dequantized)  # the int form holds exactly the grid values
    assert not layer.dequantized_weight()[~keep].any()
    for rows in (1, 7):  # decode and prefill shapes; any leading dims
        x = torch.randn(2, rows, in_features)
        reference = F.linear(x.to(dtype).float(), dequantized.float(), bias.float())
        assert layer(x).dtype == x.dtype
        assert _relative(layer(x), reference) < TOLERANCE[dtype]
        assert _relative(layer(x.to(dtype)), reference) < TOLERANCE[dtype]


def test_to_linear_round_trip_is_bit_exact():
    scheme = QuantScheme(4, 64)
    codes, scale, _ = _codes(64, 128, scheme)
    layer = IntLinear.from_codes(codes, scale.bfloat16(), scheme, None)
    linear = layer.to_linear()
    assert isinstance(linear, nn.Linear) and linear.weight.dtype == torch.bfloat16
    assert torch.equal(linear.weight, dequantize(codes, scale.bfloat16(), None, torch.bfloat16))
    assert torch.equal(grid_of(linear)[0], scale.bfloat16())


@pytest.mark.parametrize(("layer", "scheme", "device", "reason"), [
    (Conv1D(64, 128), QuantScheme(4, 32), "cpu", "Conv1D"),
    (nn.Linear(128, 64), QuantScheme(4, 32, symmetric=False), "cpu", "asymmetric"),
    (nn.Linear(128, 64), QuantScheme(8, 32), "cpu", "int8 with groups"),
    (nn.Linear(128, 64), QuantScheme(4, 16), "cpu", "group of 16"),
    (nn.Linear(96, 64), QuantScheme(4, -1), "cpu", "group of 96"),
    (nn.Linear(128, 40), QuantScheme(4, 32), "cpu", "40 outputs"),
    (nn.Linear(128, 64), QuantScheme(4, 32), "cuda", "CPU kernels"),
])
def test_unsupported_layers_name_the_reason(layer, scheme, device, reason):
    assert reason in kernel_unsupported(layer, scheme, device)


def test_supported_layers():
    assert kernel_unsupported(nn.Linear(128, 64), QuantScheme(4, 128), "cpu") is None
    assert kernel_unsupported(nn.Linear(128, 64), QuantScheme(8, -1), "cpu") is None


def _quantize_in_memory(model: nn.Module, scheme: QuantScheme) -> None:
    """What the quantizing block walk leaves: dequantized weights on their grid, the grid as buffers."""
    for module in select_sparse_modules(model).values():
        weight = module.weight.detach().float()
        set_grid(module, *quantize_layer(weight, weight != 0, scheme), scheme)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_on_kernels_generates_like_the_dequantized_model(dtype):
    scheme = QuantScheme(4, 32)
    model = tiny_llama().to(dtype)
    _quantize_in_memory(model, scheme)
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits
        expected = model.generate(ids, max_new_tokens=12, do_sample=False)
    kernel_model = tiny_llama().to(dtype)
    _quantize_in_memory(kernel_model, scheme)
    assert to_kernels(kernel_model, scheme) == {}
    assert sum(isinstance(m, IntLinear) for m in kernel_model.modules()) == 14
    with torch.no_grad():
        assert _relative(kernel_model(ids).logits, reference) < TOLERANCE[dtype]
        assert torch.equal(kernel_model.generate(ids, max_new_tokens=12, do_sample=False), expected)
    assert dequantize_kernels(kernel_model) == 14  # and back, bit-exactly
    for (name, original), restored in zip(model.named_parameters(), kernel_model.parameters()):
        assert torch.equal(original, restored), name


def test_layers_the_kernels_cannot_take_stay_float():
    scheme = QuantScheme(4, 32, symmetric=False)
    model = tiny_llama()
    _quantize_in_memory(model, scheme)
    left = to_kernels(model, scheme)
    assert len(left) == 14 and all("asymmetric" in reason for reason in left.values())
    assert not any(isinstance(m, IntLinear) for m in model.modules())
