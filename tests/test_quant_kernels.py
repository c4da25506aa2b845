"""CPU int4 / int8 kernel layers: exact dequantized weights, outputs matching a float matmul on them, fallbacks."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear
from peft_tiny_models import tiny_llama, token_batch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from peft_sparse import SparsityConfig, SPPConfig, save_pretrained
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


# ---- loading a packed v2 checkpoint onto the kernels ----

def _saved(tmp_path, scheme: QuantScheme, dtype: torch.dtype = torch.float32, model: nn.Module | None = None):
    """A tiny 2:4 Llama quantized in memory, saved packed v2; returns (in-memory model, directory)."""
    model = (model or tiny_llama()).to(dtype)
    _quantize_in_memory(model, scheme)
    config = SparsityConfig(method="magnitude", bits=scheme.bits, group_size=scheme.group_size,
                            symmetric=scheme.symmetric)
    return model, save_pretrained(model, tmp_path / "ckpt", config=config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme", [QuantScheme(4, 32), QuantScheme(4, 64), QuantScheme(8, -1)], ids=str)
def test_from_pretrained_runs_on_kernels_and_round_trips(tmp_path, scheme, dtype):
    model, directory = _saved(tmp_path, scheme, dtype)
    loaded = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    assert sum(isinstance(m, IntLinear) for m in loaded.modules()) == 14
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert _relative(loaded(ids).logits, model(ids).logits) < TOLERANCE[dtype]
        assert torch.equal(loaded.generate(ids, max_new_tokens=8, do_sample=False),
                           model.generate(ids, max_new_tokens=8, do_sample=False))
    again = save_pretrained(loaded, tmp_path / "again")  # saving a kernel model writes v2 again, bit for bit
    assert (again / "config.json").read_text() == (directory / "config.json").read_text()
    first, second = load_file(directory / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)
    loaded.dequantize()  # the dense floats back: exactly the in-memory quantized model
    assert not any(isinstance(m, IntLinear) for m in loaded.modules())
    for (name, expected), actual in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(expected, actual), name


def test_load_time_switch_gives_dequantized_floats(tmp_path):
    model, directory = _saved(tmp_path, QuantScheme(4, 32))
    loaded = AutoModelForCausalLM.from_pretrained(directory,
                                                  quantization_config=SparsityConfig(run_compressed=False))
    assert not any(isinstance(m, IntLinear) for m in loaded.modules())
    for (name, expected), actual in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(expected, actual), name


def test_layers_the_kernels_cannot_take_load_as_floats_with_one_log_line(tmp_path, caplog):
    model = tiny_llama(intermediate_size=96)  # down_proj: 96 inputs, not a group size the int4 kernel takes
    _, directory = _saved(tmp_path, QuantScheme(4, -1), model=model)
    with caplog.at_level("WARNING", logger="peft_sparse.export.quantizer"):
        loaded = AutoModelForCausalLM.from_pretrained(directory)
    assert isinstance(loaded.model.layers[0].mlp.down_proj, nn.Linear)
    assert isinstance(loaded.model.layers[0].mlp.up_proj, IntLinear)
    lines = [r.getMessage() for r in caplog.records if "dequantized float weights" in r.getMessage()]
    assert len(lines) == 1 and "2 quantized layers" in lines[0] and "group of 96" in lines[0]


def test_adapters_that_change_w_refuse_the_kernel_model(tmp_path):
    _, directory = _saved(tmp_path, QuantScheme(4, 32))
    loaded = AutoModelForCausalLM.from_pretrained(directory)
    with pytest.raises(TypeError, match=r"int kernel.*run_compressed=False.*dequantize\(\)"):
        get_peft_model(loaded, SPPConfig(r=4))


def test_lora_trains_on_top_of_the_kernels(tmp_path):
    """LoRA adds a branch: on the int kernels it gives the float model's outputs and gradients."""
    results = []
    for run_compressed in (False, True):
        _, directory = _saved(tmp_path / str(run_compressed), QuantScheme(4, 32))
        base = AutoModelForCausalLM.from_pretrained(
            directory, quantization_config=SparsityConfig(run_compressed=run_compressed))
        config = LoraConfig(target_modules=["q_proj", "down_proj"], r=4, init_lora_weights=False)
        config._register_custom_module({IntLinear: LoraLinear})  # peft's hook for layer types it does not know
        torch.manual_seed(3)
        model = get_peft_model(base, config)
        loss = model(token_batch()).logits.square().mean()
        loss.backward()
        results.append((loss.detach(), model.base_model.model.model.layers[0].self_attn.q_proj.lora_A.default.weight
                        .grad))
    assert torch.allclose(results[0][0], results[1][0], rtol=1e-5)
    assert torch.allclose(results[0][1], results[1][1], rtol=1e-4, atol=1e-7)


def test_sparse_retraining_refuses_the_kernel_model(tmp_path):
    from peft_sparse import SparseTrainer, SparseTrainingArguments

    _, directory = _saved(tmp_path, QuantScheme(4, 32))
    loaded = AutoModelForCausalLM.from_pretrained(directory)
    args = SparseTrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], max_steps=1)
    with pytest.raises(TypeError, match=r"SparseTrainer.*\(and 13 more layers\).*int kernel"):
        SparseTrainer(model=loaded, args=args)


def test_a_dense_save_refuses_kernel_layers_before_writing(tmp_path):
    _, directory = _saved(tmp_path, QuantScheme(4, 32))
    loaded = AutoModelForCausalLM.from_pretrained(directory)
    with pytest.raises(ValueError, match=r"int kernel codes.*format='packed'.*dequantize\(\)"):
        save_pretrained(loaded, tmp_path / "dense", format="dense")
    assert not (tmp_path / "dense").exists()
