"""Packed v2: int4 / int8 codes of the kept values, their grid and positions; from_pretrained restores the in-memory
quantized model bit for bit (fp32 / bf16, sharded, tied, Conv1D, WRP and SLoRB beside it); bad input is refused."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import TINY_VOCAB, _tiny_config, make_tiny_model
from test_export import _GUARD, IDS, _bits, _keys, _nasty_nm, _same_state
from transformers import AutoModelForCausalLM

import peft_sparse
from peft_sparse import SparsityConfig, prune, save_pretrained
from peft_sparse.modeling import out_in, select_sparse_modules
from peft_sparse.nn import RecoverLinear, plain_layer
from peft_sparse.quantization import QuantScheme, codes_of, dequantize, grid_of, quantize_layer, set_grid
from peft_sparse.quantization import packed as v2
from peft_sparse.sparsity import follows_nm, packing

SCHEMES = [QuantScheme(4, 32), QuantScheme(8, 32), QuantScheme(4, 64, symmetric=False),
           QuantScheme(8, -1, symmetric=False), QuantScheme(4, -1)]


def _quantize_modules(model, scheme, modules):
    """RTN-quantize the kept values of ``modules`` (already N:M) in place, as the calibration walk leaves them."""
    for name in modules:
        layer = plain_layer(model.get_submodule(name))
        weight = out_in(layer).detach().float()
        set_grid(layer, *quantize_layer(weight, weight != 0, scheme), scheme)


def _quantized(arch="llama", dtype=torch.float32, scheme=SCHEMES[0], pattern="2:4"):
    """A tiny model, magnitude-pruned to ``pattern`` and its sparse linears quantized; with its config."""
    if arch == "tied":
        torch.manual_seed(0)
        config = _tiny_config("llama", TINY_VOCAB)
        config.tie_word_embeddings = True
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    else:
        model = make_tiny_model(arch).to(dtype)
    prune(model, SparsityConfig(method="magnitude", pattern=pattern))
    _quantize_modules(model, scheme, select_sparse_modules(model))
    return model, SparsityConfig(method="magnitude", pattern=pattern, bits=scheme.bits, group_size=scheme.group_size,
                                 symmetric=scheme.symmetric)


# ---- the code layout against a literal restatement of FORMAT.md ----

@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
@pytest.mark.parametrize("kept", [1, 6, 7])
def test_code_bytes_are_the_documented_layout(scheme, kept):
    g = torch.Generator().manual_seed(kept)
    codes = torch.randint(scheme.qmin, scheme.qmax + 1, (5, kept), generator=g, dtype=torch.int16)
    stored = v2.pack_codes(codes, scheme)
    assert stored.dtype == v2.code_dtype(scheme) and tuple(stored.shape) == v2.codes_shape(5, kept, scheme)
    for row, values in zip(stored.tolist(), codes.tolist()):
        if scheme.bits == 8:
            assert row == values  # int8 as it is; asymmetric 0..255 as uint8
        else:
            nibbles = [q + 8 if scheme.symmetric else q for q in values] + [0]
            assert row == [nibbles[j] | nibbles[j + 1] << 4 for j in range(0, kept, 2)]
    assert torch.equal(v2.unpack_codes(stored, kept, scheme), codes)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 2), (4, 8), (8, 16), (16, 32)])
@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encode_then_decode_is_the_in_memory_layer(n, m, scheme, dtype):
    dense = _nasty_nm(6, 4 * 64, n, m, torch.float32, n).nan_to_num(0.0, 0.0, 0.0) * 0.37  # ties, empty groups
    layer = torch.nn.Linear(dense.shape[1], 6, bias=False).to(dtype)
    layer.weight.data.zero_()
    set_grid(layer, *quantize_layer(dense, dense != 0, scheme), scheme)
    weight, (scale, zero) = layer.weight.data, grid_of(layer)
    codec = packing.default_codec(n, m)
    stored, meta = v2.encode_layer(weight, scale, zero, scheme, n, m, codec)
    decoded = v2.decode_layer(stored, meta, scale, zero, weight.shape[1], n, m, codec, scheme)
    back = dequantize(decoded.codes, decoded.scale, decoded.zero, dtype)
    assert torch.equal(_bits(back), _bits(weight)) and follows_nm(back, n, m)
    assert torch.equal(decoded.keep, packing.kept_positions(weight, n, m))
    assert torch.equal(decoded.codes, codes_of(weight, scale, None if zero is None else zero.float(), scheme))
    assert decoded.codes.dtype == torch.int16 and decoded.scale is scale and decoded.zero is zero


def test_decode_refuses_tensors_that_do_not_fit():
    scheme = QuantScheme(4, 32)
    dense = _nasty_nm(4, 64, 2, 4, torch.float32, 0).nan_to_num(0.0, 0.0, 0.0)
    weight, scale, zero = quantize_layer(dense, dense != 0, scheme)
    stored, meta = v2.encode_layer(weight, scale, zero, scheme, 2, 4, "b6x3")
    with pytest.raises(ValueError, match="stored codes"):
        v2.decode_layer(stored.to(torch.int8), meta, scale, zero, 64, 2, 4, "b6x3", scheme)
    with pytest.raises(ValueError, match="stored codes"):
        v2.decode_layer(stored[:, 1:], meta, scale, zero, 64, 2, 4, "b6x3", scheme)
    with pytest.raises(ValueError, match="weight_scale of shape"):
        v2.decode_layer(stored, meta, scale[:, :1], zero, 64, 2, 4, "b6x3", scheme)
    with pytest.raises(ValueError, match="weight_zero_point"):
        v2.decode_layer(stored, meta, scale, torch.zeros_like(scale, dtype=torch.uint8), 64, 2, 4, "b6x3", scheme)
    corrupt = meta.clone()
    corrupt[0, 0] = 250
    with pytest.raises(ValueError, match="corrupt"):
        v2.decode_layer(stored, corrupt, scale, zero, 64, 2, 4, "b6x3", scheme)
    weight[0, 0] += 1e-3  # changed after quantization: off its grid
    with pytest.raises(ValueError, match="not on their quantization grid"):
        v2.encode_layer(weight, scale, zero, scheme, 2, 4, "b6x3")


# ---- from_pretrained restores the in-memory quantized model ----

def _load_floats(path, **kwargs):
    """The v2 reload as dequantized float layers (the in-memory representation); the kernel load has its own tests
    (test_quant_kernels.py)."""
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=SparsityConfig(run_compressed=False),
                                                **kwargs)


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_round_trip_bit_identical(tmp_path, scheme, dtype):
    model, config = _quantized("tied", dtype, scheme)
    save_pretrained(model, tmp_path / "p", config=config)
    save_pretrained(model, tmp_path / "s", config=config, max_shard_size="20KB")
    assert len(list((tmp_path / "s").glob("*.safetensors"))) > 1
    saved = json.loads((tmp_path / "p" / "config.json").read_text())["quantization_config"]
    assert (saved["format_version"], saved["bits"], saved["group_size"], saved["symmetric"]) == (
        2, scheme.bits, scheme.group_size, scheme.symmetric)
    keys = _keys(tmp_path / "p")
    groups = 128 // scheme.group_width(128)
    name = "model.layers.0.mlp.down_proj"  # (64, 128): 64 kept codes a row
    assert keys[f"{name}.weight"] == ((64, 32 if scheme.bits == 4 else 64),
                                      "I8" if scheme.bits == 8 and scheme.symmetric else "U8")
    assert keys[f"{name}.weight_meta"] == ((64, 11), "U8")
    assert keys[f"{name}.weight_scale"] == ((64, groups), {torch.float32: "F32", torch.bfloat16: "BF16"}[dtype])
    assert (f"{name}.weight_zero_point" in keys) != scheme.symmetric
    assert "lm_head.weight" not in keys
    for sub in ("p", "s"):
        loaded = _load_floats(tmp_path / sub)
        assert loaded.dtype == dtype and _same_state(loaded, model)  # weights, scales and zero points bit-equal
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
        layer = loaded.get_submodule(name)
        assert follows_nm(layer.weight, 2, 4) and grid_of(layer)[0].dtype == dtype
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)
    loaded.save_pretrained(tmp_path / "re")  # a loaded model re-saves to the same tensors
    assert _keys(tmp_path / "re") == keys
    assert _same_state(_load_floats(tmp_path / "re"), model)


@pytest.mark.parametrize("pattern", ["1:2", "4:8", "8:16", "16:32"])
def test_other_patterns_round_trip_with_their_codec(tmp_path, pattern):
    model, config = _quantized("llama", torch.float32, QuantScheme(4, 32), pattern)
    save_pretrained(model, tmp_path / "p", config=config)
    saved = json.loads((tmp_path / "p" / "config.json").read_text())["quantization_config"]
    n, m = map(int, pattern.split(":"))
    assert saved["codec"] == packing.default_codec(n, m) == ("bitmask" if m == 32 else "rank")
    assert _keys(tmp_path / "p")["model.layers.0.mlp.down_proj.weight_meta"][0] == packing.meta_shape(
        64, 128, n, m, saved["codec"])
    loaded = _load_floats(tmp_path / "p")
    assert _same_state(loaded, model) and follows_nm(loaded.model.layers[1].mlp.up_proj.weight, n, m)


def test_gpt2_conv1d_quantized_round_trip(tmp_path):
    model, config = _quantized("gpt2", torch.float32, QuantScheme(4, 32, symmetric=False))
    save_pretrained(model, tmp_path / "p", config=config)
    assert _keys(tmp_path / "p")["transformer.h.0.attn.c_attn.weight_scale"][0] == (192, 2)  # (out, in/G)
    loaded = _load_floats(tmp_path / "p")
    assert _same_state(loaded, model) and torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_minus_zero_comes_back_plus_zero_and_stays(tmp_path):
    model, config = _quantized("llama", torch.float32, QuantScheme(4, 32))
    layer = model.model.layers[0].mlp.down_proj
    with torch.no_grad():
        layer.weight[layer.weight == 0] = -0.0
    assert bool(torch.signbit(layer.weight[layer.weight == 0]).all())
    save_pretrained(model, tmp_path / "p", config=config)
    loaded = _load_floats(tmp_path / "p")
    back = loaded.model.layers[0].mlp.down_proj.weight
    assert torch.equal(_bits(back), _bits(layer.weight + 0.0)) and not bool(torch.signbit(back[back == 0]).any())
    loaded.save_pretrained(tmp_path / "re")
    again = _load_floats(tmp_path / "re").model.layers[0].mlp.down_proj.weight
    assert torch.equal(_bits(again), _bits(back))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_wrp_recover_tensors_beside_quantized_weights(tmp_path, arch):
    model = make_tiny_model(arch)
    prune(model, SparsityConfig(method="wrp", pattern="2:4", method_options={"alpha": 0.25}), calibration=IDS)
    scheme = QuantScheme(8, 32)
    wrapped = [name for name, module in model.named_modules() if isinstance(module, RecoverLinear)]
    assert wrapped
    _quantize_modules(model, scheme, select_sparse_modules(model))
    config = SparsityConfig(method="magnitude", pattern="2:4", bits=8, group_size=32)
    save_pretrained(model, tmp_path / "p", config=config)
    keys = _keys(tmp_path / "p")
    assert f"{wrapped[0]}.weight_scale" in keys and f"{wrapped[0]}.recover_val" in keys
    assert not any(".base." in key for key in keys)
    loaded = _load_floats(tmp_path / "p")
    assert all(isinstance(loaded.get_submodule(name), RecoverLinear) for name in wrapped)
    assert _same_state(loaded, model) and torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_slorb_side_tensors_beside_quantized_weights(tmp_path):
    from peft_sparse.export.modules import add_slorb_side

    model, config = _quantized("llama", torch.float32, QuantScheme(4, 64))
    name = "model.layers.1.mlp.down_proj"
    add_slorb_side(model.get_submodule(name), torch.randn(64, 8, generator=torch.Generator().manual_seed(0)))
    save_pretrained(model, tmp_path / "p", config=config)
    assert _keys(tmp_path / "p")[f"{name}.slorb_S"][0] == (64, 8)
    loaded = _load_floats(tmp_path / "p")
    assert _same_state(loaded, model) and torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_unquantized_saves_stay_v1_and_load(tmp_path):
    model = make_tiny_model("llama")
    prune(model, SparsityConfig(method="magnitude", pattern="2:4"))
    save_pretrained(model, tmp_path / "p")
    saved = json.loads((tmp_path / "p" / "config.json").read_text())["quantization_config"]
    assert saved["format_version"] == 1 and saved["bits"] is None and saved["codec"] == "b6x3"
    assert _same_state(_load_floats(tmp_path / "p"), model)


def test_quantized_save_refuses_before_writing(tmp_path):
    model, config = _quantized("llama", torch.float32, QuantScheme(4, 32))
    with pytest.raises(ValueError, match="is quantized .* but the config has no bits"):
        save_pretrained(model, tmp_path / "x", config=SparsityConfig(method="magnitude"))
    with pytest.raises(ValueError, match="weight_scale of shape"):
        save_pretrained(model, tmp_path / "x", config=SparsityConfig(method="magnitude", bits=4, group_size=64))
    with pytest.raises(ValueError, match="weight_zero_point"):
        save_pretrained(model, tmp_path / "x", config=SparsityConfig(method="magnitude", bits=4, group_size=32,
                                                                     symmetric=False))
    plain = make_tiny_model("llama")
    prune(plain, SparsityConfig(method="magnitude"))
    with pytest.raises(ValueError, match="is not quantized"):
        save_pretrained(plain, tmp_path / "x", config=config)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1.001)  # trained after quantization: off the grid
    with pytest.raises(ValueError, match="not on their quantization grid"):
        save_pretrained(model, tmp_path / "x", config=config)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_no_import_guard_refuses_quantized(tmp_path):
    model, config = _quantized("llama", torch.float32, QuantScheme(4, 32))
    save_pretrained(model, tmp_path / "p", config=config)
    run = subprocess.run([sys.executable, "-c", _GUARD, str(tmp_path / "p")], capture_output=True, text=True,
                         check=False, cwd=tmp_path, timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                                                                      "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stdout + run.stderr
    assert "REFUSED" in run.stdout and "peft_sparse" in run.stderr
    assert peft_sparse.SparsityHfQuantizer.serialized_names["weight"][2:] == ["weight_scale", "weight_zero_point"]


def test_linear_sizes_count_the_files_and_the_limit(tmp_path):
    from peft_sparse.export import linear_sizes

    model, config = _quantized("llama", torch.float32, QuantScheme(4, 32))
    save_pretrained(model, tmp_path / "p", config=config)
    shapes = [tuple(out_in(module).shape) for module in select_sparse_modules(model).values()]
    codes = sum(out * inp // 4 for out, inp in shapes)  # 2 kept of 4, two codes a byte
    meta = sum(out * -(-inp // 12) for out, inp in shapes)  # b6x3: 12 columns a byte
    scales = sum(out * inp // 32 * 4 for out, inp in shapes)
    limit = sum(out * inp / 4 + out * inp / 4 * math.log2(6) / 8 for out, inp in shapes) + scales
    sizes = linear_sizes(tmp_path / "p")
    assert (sizes.modules, sizes.weights) == (len(shapes), sum(out * inp for out, inp in shapes))
    assert (sizes.nbytes, sizes.grid_nbytes) == (codes + meta + scales, scales)
    assert sizes.limit_nbytes == pytest.approx(limit, rel=1e-12) and sizes.ratio_to_limit > 1
    unstructured = make_tiny_model("llama")
    prune(unstructured, SparsityConfig(method="magnitude", sparsity=0.5))
    save_pretrained(unstructured, tmp_path / "d", "dense")
    dense = linear_sizes(tmp_path / "d")
    assert dense.nbytes == 4 * dense.weights and dense.grid_nbytes == 0
    half = sum(math.lgamma(out * inp + 1) - 2 * math.lgamma(out * inp // 2 + 1) for out, inp in shapes)
    assert dense.limit_nbytes == pytest.approx(dense.weights * 2 + half / math.log(2) / 8, rel=1e-9)
