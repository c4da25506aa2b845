"""format="compressed-tensors": a symmetric quantized sparse model through compressed-tensors' own pack-quantized
compressor; plain transformers (no peft_sparse) loads it bit-exactly, still N:M (the design note's traps 1-4)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from test_export import IDS, _bits, _keys
from test_export_quantized import _quantize_modules, _quantized
from transformers import AutoModelForCausalLM, LlamaConfig

from peft_sparse import SparsityConfig, prune, save_pretrained
from peft_sparse.cli import main
from peft_sparse.export import linear_sizes
from peft_sparse.modeling import select_sparse_modules
from peft_sparse.quantization import QuantScheme, grid_of
from peft_sparse.sparsity import follows_nm

pytest.importorskip("compressed_tensors")

_PLAIN_LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM, CompressedTensorsConfig
assert "peft_sparse" not in sys.modules
ids = torch.arange(1, 25).reshape(2, 12)
modes = (("lazy", {}), ("dequantize", {"quantization_config": CompressedTensorsConfig(dequantize=True)}))
for directory in sys.argv[1:]:
    for mode, kwargs in modes:
        model = AutoModelForCausalLM.from_pretrained(directory, device_map="cpu", **kwargs).eval()
        with torch.no_grad():
            logits = model(ids).logits  # the lazy mode decompresses on the first forward
        weights = {k: v for k, v in model.state_dict().items() if k.endswith(".weight")}
        torch.save({"logits": logits, "weights": weights}, f"{directory}/plain_{mode}.pt")
assert "peft_sparse" not in sys.modules
"""
CASES = [(4, torch.float32, 32), (4, torch.bfloat16, 32), (4, torch.bfloat16, -1), (8, torch.float32, 32),
         (8, torch.bfloat16, 32), (8, torch.bfloat16, -1)]


def _wide_bf16_model():
    """A bf16 Llama 256 wide, 2:4, int4 with 256-column groups (wider than Marlin's 128)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    prune(model, SparsityConfig(method="magnitude", pattern="2:4"))
    _quantize_modules(model, QuantScheme(4, 256), select_sparse_modules(model))
    return model, SparsityConfig(method="magnitude", bits=4, group_size=256)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every case saved as compressed-tensors (one through the CLI from a packed v2 checkpoint), then loaded in one
    process without peft_sparse: ``{case: (model, directory, {mode: loaded})}``."""
    root = tmp_path_factory.mktemp("ct")
    cases = {}
    for bits, dtype, group_size in CASES:
        model, config = _quantized("tied", dtype, QuantScheme(bits, group_size))  # trap 3: from_config(dtype=...)
        if dtype == torch.bfloat16 and group_size == 32:  # trap 1: -0.0 at pruned positions comes back +0.0
            layer = model.model.layers[0].self_attn.q_proj
            with torch.no_grad():
                layer.weight[layer.weight == 0] = -0.0
        directory = root / f"int{bits}-{str(dtype)[6:]}-g{group_size}"
        save_pretrained(model, directory, "compressed-tensors", config=config)
        cases[bits, dtype, group_size] = (model, directory)
    model, config = _wide_bf16_model()
    save_pretrained(model, root / "wide", "compressed-tensors", config=config)
    cases["wide"] = model, root / "wide"
    model, config = _quantized("llama", torch.float32, QuantScheme(4, 32))
    save_pretrained(model, root / "v2", config=config)
    assert main(["export", str(root / "v2"), "--format", "compressed-tensors", "--output", str(root / "cli")]) == 0
    cases["cli"] = (model, root / "cli")
    run = subprocess.run([sys.executable, "-c", _PLAIN_LOAD, *(str(d) for _, d in cases.values())],
                         capture_output=True, text=True, check=False, timeout=900,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stdout + run.stderr
    modes = ("lazy", "dequantize")
    return {key: (model, directory, {mode: torch.load(directory / f"plain_{mode}.pt") for mode in modes})
            for key, (model, directory) in cases.items()}


def _check_plain(loaded, model):
    """Both load modes: every sparse weight bit-equal to the in-memory one (-0.0 as +0.0), still 2:4, same logits."""
    for result in loaded.values():
        for name, module in select_sparse_modules(model).items():
            weight = result["weights"][f"{name}.weight"]
            assert torch.equal(_bits(weight), _bits(module.weight.detach() + 0.0))
            assert follows_nm(weight, 2, 4)
        assert torch.equal(result["logits"], model(IDS).logits)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"int{c[0]}-{str(c[1])[6:]}-g{c[2]}")
def test_plain_transformers_loads_it_bit_exactly(exported, case):
    bits, dtype, group_size = case
    model, directory, loaded = exported[case]
    _check_plain(loaded, model)
    written = json.loads((directory / "config.json").read_text())["quantization_config"]
    weights = written["config_groups"]["group_0"]["weights"]
    assert (written["quant_method"], written["format"]) == ("compressed-tensors", "pack-quantized")
    assert (weights["num_bits"], weights["symmetric"], weights["group_size"]) == (
        bits, True, None if group_size == -1 else group_size)
    assert json.loads((directory / "sparsity_config.json").read_text())["format"] == "compressed-tensors"
    assert _keys(directory)["model.layers.0.mlp.down_proj.weight_packed"] == ((64, 128 * bits // 32), "I32")
    if bits == 8 and dtype == torch.bfloat16 and group_size == 32:  # trap 2 is exercised: codes above 64
        layer = model.model.layers[0].mlp.up_proj
        codes = layer.weight.float() / grid_of(layer)[0].float().repeat_interleave(32, 1)
        assert int((codes.abs().round() > 64).sum()) > 50
    assert not hasattr(model, "hf_quantizer") and grid_of(model.model.layers[0].mlp.up_proj) is not None


def test_groups_wider_than_128_repeat_their_scales(exported):
    from safetensors import safe_open

    model, directory, loaded = exported["wide"]
    _check_plain(loaded, model)
    written = json.loads((directory / "config.json").read_text())["quantization_config"]
    assert written["config_groups"]["group_0"]["weights"]["group_size"] == 128  # trap 4: Marlin takes G <= 128
    with safe_open(str(directory / "model.safetensors"), "pt") as handle:
        scale = handle.get_tensor("model.layers.0.mlp.down_proj.weight_scale")
    ours = grid_of(model.model.layers[0].mlp.down_proj)[0]
    assert scale.shape == (256, 4) and torch.equal(scale, ours.repeat_interleave(2, dim=1))


def test_cli_exports_a_packed_v2_checkpoint(exported):
    model, directory, loaded = exported["cli"]
    _check_plain(loaded, model)
    packed, dense_int4 = linear_sizes(directory.parent / "v2"), linear_sizes(directory)
    assert packed.weights == dense_int4.weights and packed.nbytes < dense_int4.nbytes
    assert dense_int4.nbytes == packed.weights // 2 + packed.grid_nbytes + 16 * packed.modules  # + weight_shape


def test_bad_input_is_refused_before_writing(tmp_path, monkeypatch):
    model, config = _quantized("llama", torch.float32, QuantScheme(4, 32, symmetric=False))
    with pytest.raises(ValueError, match="symmetric grids only"):
        save_pretrained(model, tmp_path / "x", "compressed-tensors", config=config)
    plain = AutoModelForCausalLM.from_config(model.config)
    prune(plain, SparsityConfig(method="magnitude"))
    with pytest.raises(ValueError, match="quantized models only"):
        save_pretrained(plain, tmp_path / "x", "compressed-tensors", config=SparsityConfig(method="magnitude"))
    gpt2, gpt2_config = _quantized("gpt2", torch.float32, QuantScheme(4, 32))
    with pytest.raises(ValueError, match="Conv1D; compressed-tensors quantizes nn.Linear"):
        save_pretrained(gpt2, tmp_path / "x", "compressed-tensors", config=gpt2_config)
    symmetric, symmetric_config = _quantized("llama", torch.float32, QuantScheme(4, 32))
    from peft_sparse.export.modules import add_slorb_side

    add_slorb_side(symmetric.model.layers[0].mlp.down_proj, torch.zeros(64, 8))
    with pytest.raises(ValueError, match="SLoRB side weight"):
        save_pretrained(symmetric, tmp_path / "x", "compressed-tensors", config=symmetric_config)
    monkeypatch.setitem(sys.modules, "compressed_tensors", None)  # not installed
    fresh, fresh_config = _quantized("llama", torch.float32, QuantScheme(4, 32))
    with pytest.raises(ImportError, match=r"pip install 'peft_sparse\[compressed-tensors\]'"):
        save_pretrained(fresh, tmp_path / "x", "compressed-tensors", config=fresh_config)
    assert list(tmp_path.iterdir()) == []
