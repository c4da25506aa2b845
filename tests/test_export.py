"""Packed / dense export: codec round trips, the quantization config, from_pretrained round trips, the no-import guard,
prune on load, training policy, adapters and SLoRB side weights."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_VOCAB, _tiny_config, make_tiny_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

import peft_sparse
from peft_sparse import SparsityConfig, prune, save_pretrained
from peft_sparse.export import register
from peft_sparse.sparsity import follows_nm, nm_mask, packing

IDS = torch.arange(1, 25).reshape(2, 12)


def _nm_tensor(rows, cols, n, m, dtype=torch.float32, seed=0):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return w * nm_mask(w.abs().float(), n, m)


@pytest.mark.parametrize("n,m,codec", [(2, 4, "b6x3"), (2, 4, "bitmask"), (1, 4, "bitmask"), (4, 8, "bitmask"),
                                       (1, 2, "bitmask"), (1, 2, "rank"), (4, 8, "rank"), (8, 16, "rank")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pack_round_trip_is_exact(n, m, codec, dtype):
    w = _nm_tensor(24, {8: 48, 16: 160}.get(m, 40), n, m, dtype)
    w[3, :m] = 0  # a group with fewer than N nonzeros
    w[5, m: 2 * m] = 0
    values, meta = packing.pack(w, n, m, codec)
    assert values.shape == (w.shape[0], w.shape[1] * n // m) and values.dtype == dtype
    assert meta.dtype == torch.uint8 and tuple(meta.shape) == packing.meta_shape(*w.shape, n, m, codec)
    assert torch.equal(packing.unpack(values, meta, w.shape[1], n, m, codec), w)


def test_b6x3_layout_and_size():
    w = torch.tensor([[1.0, 2.0, 0, 0, 0, 0, 3.0, 4.0, 5.0, 0, 0, 6.0, 0, 7.0, 8.0, 0]])
    values, meta = packing.pack(w, 2, 4, "b6x3")
    assert values.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]
    # groups: {0,1} -> 0, {2,3} -> 5, {0,3} -> 3 | {1,2} -> 2 (next byte, padded)
    assert meta.tolist() == [[0 + 6 * 5 + 36 * 3, 2]]
    bf16 = packing.packed_nbytes(576, 1536, 2, 4, "b6x3", 2)
    limit = packing.information_limit_nbytes(576, 1536, 2, 4, 2)
    assert bf16 / (576 * 1536 * 2) == pytest.approx(0.541667, abs=1e-6) and bf16 / limit - 1 < 0.003


@pytest.mark.parametrize("n,m", [(1, 2), (4, 8), (8, 16)])
def test_rank_codec_round_trips_random_masks(n, m):
    g = torch.Generator().manual_seed(n)
    keep = torch.zeros(96, 210 * m, dtype=torch.bool)  # 20160 groups, every rank of C(8, 4) = 70 many times
    keep.view(96, -1, m).scatter_(-1, torch.rand(96, 210, m, generator=g).argsort(-1)[..., :n], True)
    meta = packing.pack(keep.float(), n, m, "rank")[1]
    assert tuple(meta.shape) == packing.meta_shape(96, 210 * m, n, m, "rank")
    assert torch.equal(packing.unpack_mask(meta, 210 * m, n, m, "rank"), keep)
    assert packing.default_codec(n, m) == "rank"


def test_rank_of_2_4_groups_is_the_b6x3_code():
    keep = torch.zeros(6, 4)
    for code, pair in enumerate(packing.PAIRS_2_4):
        keep[code, list(pair)] = 1
    ranks = [int(meta) for meta in packing.pack(keep, 2, 4, "rank")[1][:, 0]]
    assert ranks == list(range(6))  # one group per row: the byte is its rank
    w = _nasty_nm(16, 4 * 37, 2, 4, torch.float32, 5)
    assert torch.equal(packing.pack(w, 2, 4, "rank")[1], packing.pack(w, 2, 4, "b6x3")[1])
    assert packing.default_codec(2, 4) == "b6x3" and packing.default_codec(16, 32) == "bitmask"


def test_pack_refuses_dense_and_corrupt_input():
    w = torch.randn(8, 16)
    with pytest.raises(ValueError, match="is not 2:4 sparse"):
        packing.pack(w, 2, 4, "b6x3", name="layer")
    with pytest.raises(ValueError, match="2:4 groups only"):
        packing.pack(_nm_tensor(8, 16, 1, 4), 1, 4, "b6x3")
    with pytest.raises(ValueError, match=r"codec 'rank' has word sizes for 1:2, 2:4, 4:8, 8:16 only, not 16:32"):
        packing.pack(_nm_tensor(8, 64, 16, 32), 16, 32, "rank")
    with pytest.raises(ValueError, match="is not 4:8 sparse"):
        packing.pack(torch.randn(8, 16), 4, 8, "rank", name="layer")
    values, meta = packing.pack(_nm_tensor(8, 24, 2, 4), 2, 4, "b6x3")
    meta[0, 0] = 250
    with pytest.raises(ValueError, match="corrupt"):
        packing.unpack(values, meta, 24, 2, 4, "b6x3")


def test_config_is_a_registered_quantization_config():
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["peft_sparse"] is SparsityConfig
    assert AUTO_QUANTIZER_MAPPING["peft_sparse"] is peft_sparse.SparsityHfQuantizer
    register()  # twice is harmless
    with pytest.raises(TypeError):
        SparsityConfig(method="magnitude", patern="2:4")  # user-built: typos fail
    with pytest.raises(ValueError, match="packed format stores N:M"):
        SparsityConfig(method="magnitude", sparsity=0.5, format="packed")
    with pytest.raises(ValueError, match="Unknown method|unknown method|method"):
        SparsityConfig(method="future-method")
    saved = {**SparsityConfig(method="magnitude").to_dict(), "method": "future-method",
             "method_options": {"alpha": 1}, "new_recipe_key": 3}
    loaded = SparsityConfig.from_dict(saved)  # what a newer version wrote still loads
    assert loaded.method == "future-method" and loaded.provenance == {"new_recipe_key": 3}
    assert loaded.quant_method == "peft_sparse" and loaded.to_dict()["method_options"] == {"alpha": 1}
    with pytest.raises(ValueError, match="pip install -U peft_sparse"):
        SparsityConfig.from_dict({**saved, "format_version": 99})
    with pytest.raises(ValueError, match="N:M"):
        SparsityConfig.from_dict({**saved, "pattern": "2:x"})


def _tied_llama():
    torch.manual_seed(0)
    config = _tiny_config("llama", TINY_VOCAB)
    config.tie_word_embeddings = True
    return AutoModelForCausalLM.from_config(config).eval()


def _pruned(arch="llama", dtype=torch.float32):
    model = (_tied_llama() if arch == "tied" else make_tiny_model(arch)).to(dtype)
    prune(model, SparsityConfig(method="magnitude", pattern="2:4"))
    return model


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa)


def _keys(directory):
    out = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            out.update({k: (tuple(handle.get_slice(k).get_shape()), handle.get_slice(k).get_dtype())
                        for k in handle.keys()})  # noqa: SIM118
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_packed_round_trip_bit_identical(tmp_path, dtype):
    model = _pruned("tied", dtype=dtype)
    save_pretrained(model, tmp_path / "p", "packed")
    save_pretrained(model, tmp_path / "s", "packed", max_shard_size="40KB")
    assert len(list((tmp_path / "s").glob("*.safetensors"))) > 1
    keys = _keys(tmp_path / "p")
    assert keys["model.layers.0.mlp.down_proj.weight"][0] == (64, 64)  # in 128 -> 64 kept values
    assert keys["model.layers.0.mlp.down_proj.weight_meta"] == ((64, 11), "U8")
    assert "lm_head.weight" not in keys  # tied embeddings stored once
    save_pretrained(model, tmp_path / "dense", "dense")  # reference logits: a fresh load (rotary buffers in fp32)
    logits = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")(IDS).logits
    for sub in ("p", "s"):
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / sub)
        assert loaded.dtype == dtype and _same_state(loaded, model)
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
        assert torch.equal(loaded(IDS).logits, logits)
    loaded.save_pretrained(tmp_path / "re")  # re-save of a loaded model: packed again, same bytes per tensor
    assert _keys(tmp_path / "re") == keys
    assert _same_state(AutoModelForCausalLM.from_pretrained(tmp_path / "re"), model)
    other = torch.float32 if dtype != torch.float32 else torch.bfloat16
    cast = AutoModelForCausalLM.from_pretrained(tmp_path / "p", dtype=other)
    assert all(torch.equal(v, model.state_dict()[k].to(other)) for k, v in cast.state_dict().items())
    dense = loaded.dequantize()
    assert not getattr(dense, "is_quantized", False) and not hasattr(dense.config, "quantization_config")
    dense.save_pretrained(tmp_path / "d")
    assert "quantization_config" not in json.loads((tmp_path / "d" / "config.json").read_text())
    assert _keys(tmp_path / "d")["model.layers.0.mlp.down_proj.weight"][0] == (64, 128)


def test_gpt2_conv1d_round_trip(tmp_path):
    model = _pruned("gpt2")
    save_pretrained(model, tmp_path / "p")
    assert _keys(tmp_path / "p")["transformer.h.0.mlp.c_fc.weight"][0] == (256, 32)  # packed on W^T (out, in/2)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "p")
    assert _same_state(loaded, model) and torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_dense_format_loads_plainly_with_side_file(tmp_path):
    model = _pruned()
    save_pretrained(model, tmp_path / "d", "dense")
    assert "quantization_config" not in json.loads((tmp_path / "d" / "config.json").read_text())
    assert json.loads((tmp_path / "d" / "sparsity_config.json").read_text())["format"] == "dense"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "d")
    assert not getattr(loaded, "is_quantized", False) and _same_state(loaded, model)
    assert not hasattr(model, "hf_quantizer")  # saving packed/dense leaves the in-memory model as it was


def test_save_refuses_before_writing(tmp_path):
    model = make_tiny_model("llama")
    with pytest.raises(ValueError, match="carries no SparsityConfig"):
        save_pretrained(model, tmp_path / "x")
    with pytest.raises(ValueError, match="is not 2:4 sparse"):
        save_pretrained(model, tmp_path / "x", config=SparsityConfig(method="magnitude"))
    assert not (tmp_path / "x").exists() and list(tmp_path.iterdir()) == []  # nothing half-written


_GUARD = """
import sys, torch
from transformers import AutoModelForCausalLM
assert "peft_sparse" not in sys.modules
try:
    AutoModelForCausalLM.from_pretrained(sys.argv[1])
except Exception as error:
    print("REFUSED", type(error).__name__, error)
    sys.exit(0)
print("LOADED")
sys.exit(1)
"""


def test_no_import_guard_fails_loudly(tmp_path):
    save_pretrained(_pruned(), tmp_path / "p")
    run = subprocess.run([sys.executable, "-c", _GUARD, str(tmp_path / "p")], capture_output=True, text=True,
                         check=False, cwd=tmp_path, timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                                                        "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stdout + run.stderr
    assert "REFUSED RuntimeError" in run.stdout and "peft_sparse" in run.stderr  # the unknown-method warning


def test_prune_on_load_equals_prune_and_saves_packed(tmp_path):
    for arch in ("llama", "gpt2"):
        dense = make_tiny_model(arch)
        dense.save_pretrained(tmp_path / arch)
        loaded = AutoModelForCausalLM.from_pretrained(
            tmp_path / arch, quantization_config=SparsityConfig(method="magnitude", pattern="2:4"))
        reference = AutoModelForCausalLM.from_pretrained(tmp_path / arch)
        prune(reference, SparsityConfig(method="magnitude", pattern="2:4"))
        assert _same_state(loaded, reference)
        loaded.save_pretrained(tmp_path / f"{arch}-packed")
        assert any(k.endswith("weight_meta") for k in _keys(tmp_path / f"{arch}-packed"))
        assert _same_state(AutoModelForCausalLM.from_pretrained(tmp_path / f"{arch}-packed"), reference)
    with pytest.raises(ValueError, match="peft_sparse.prune"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "llama", quantization_config=SparsityConfig(method="wanda"))


def test_plain_trainer_full_finetune_is_refused(tmp_path):
    save_pretrained(_pruned(), tmp_path / "p")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "p")
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=1, report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="SparseTrainer"):
        Trainer(model=model, args=args, train_dataset=[{"input_ids": IDS[0], "labels": IDS[0]}])


def test_spp_adapter_on_packed_model_merges_and_saves_packed(tmp_path):
    from peft import get_peft_model

    save_pretrained(_pruned(), tmp_path / "p")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "p")
    peft_model = get_peft_model(base, peft_sparse.SPPConfig(r=4))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, report_to=[], use_cpu=True,
                             learning_rate=1e-2, per_device_train_batch_size=2, save_strategy="no")
    Trainer(model=peft_model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in IDS]).train()
    expected = peft_model(IDS).logits
    merged = peft_model.merge_and_unload()
    modules = merged.config.quantization_config.modules
    assert all(follows_nm(merged.get_submodule(name).weight, 2, 4) for name in modules)
    merged.save_pretrained(tmp_path / "merged")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert _same_state(again, merged) and torch.allclose(again(IDS).logits, expected, atol=1e-5)
    assert torch.equal(again(IDS).logits, merged(IDS).logits)


def test_slorb_side_weights_travel_in_the_packed_files(tmp_path):
    from peft_sparse.export.modules import add_slorb_side

    dense = make_tiny_model("llama")
    slorb = peft_sparse.get_slorb_model(dense, peft_sparse.SLoRBConfig(k=16, pattern="2:4"))
    expected = slorb(IDS).logits
    side = slorb.base_model.side_weights()
    base = slorb.unload()
    for name, (S, _k) in side.items():
        add_slorb_side(base.get_submodule(name), S.clone())
    assert torch.allclose(base(IDS).logits, expected, atol=1e-6)
    save_pretrained(base, tmp_path / "p", config=SparsityConfig(method="magnitude", pattern="2:4"))
    assert _keys(tmp_path / "p")["model.layers.0.mlp.down_proj.slorb_S"][0] == (64, 128 // 16)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "p")
    assert _same_state(loaded, base) and torch.equal(loaded(IDS).logits, base(IDS).logits)
    with pytest.raises(ValueError, match="SLoRB side weight"):
        save_pretrained(base, tmp_path / "d", "dense", config=SparsityConfig(method="magnitude"))


def _wrp_pruned(arch, options):
    model = make_tiny_model(arch)
    prune(model, SparsityConfig(method="wrp", pattern="2:4", method_options=options), calibration=IDS)
    return model


@pytest.mark.parametrize("options", [{"alpha": 0.25}, {"block_size": 16, "blocks_per_row": 2}])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_wrp_recover_matrices_travel_in_the_packed_files(tmp_path, arch, options):
    from peft_sparse.modeling import out_in
    from peft_sparse.nn import RecoverLinear, merge_recovered

    model = _wrp_pruned(arch, options)
    save_pretrained(model, tmp_path / "p", "packed")
    keys = _keys(tmp_path / "p")
    names = json.loads((tmp_path / "p" / "config.json").read_text())["quantization_config"]["modules"]
    form = ("recover_blocks",) if "block_size" in options else ("recover_crow", "recover_col")
    assert names and not any(".base." in key for key in keys)  # stored under the plain model's module names
    for name in names:
        wrapper = model.get_submodule(name)
        assert isinstance(wrapper, RecoverLinear) and keys[f"{name}.weight_meta"][1] == "U8"
        assert keys[f"{name}.weight"][0] == (wrapper.shape[0], wrapper.shape[1] // 2)  # N:M part packed
        assert keys[f"{name}.recover_val"][0] == tuple(wrapper.recover_val.shape)
        assert all(keys[f"{name}.{leaf}"] == (tuple(getattr(wrapper, leaf).shape), "I32") for leaf in form)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "p")
    assert _same_state(loaded, model) and torch.equal(loaded(IDS).logits, model(IDS).logits)
    for name in names:
        module = loaded.get_submodule(name)
        assert isinstance(module, RecoverLinear) and module.block_size == model.get_submodule(name).block_size
        assert follows_nm(out_in(module.base), 2, 4)
    loaded.save_pretrained(tmp_path / "re")  # re-save of the loaded model: the same tensors again
    assert _keys(tmp_path / "re") == keys
    assert _same_state(AutoModelForCausalLM.from_pretrained(tmp_path / "re"), model)
    with pytest.raises(ValueError, match="merge_recovered"):
        save_pretrained(model, tmp_path / "d", "dense")
    dense = loaded.dequantize()
    assert merge_recovered(dense) == merge_recovered(model) == len(names)
    assert _same_state(dense, model)


def test_no_import_guard_refuses_wrp_packed(tmp_path):
    save_pretrained(_wrp_pruned("llama", {"alpha": 0.25}), tmp_path / "p", "packed")
    run = subprocess.run([sys.executable, "-c", _GUARD, str(tmp_path / "p")], capture_output=True, text=True,
                         check=False, cwd=tmp_path, timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                                                                      "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stdout + run.stderr
    assert "REFUSED RuntimeError" in run.stdout and "recover_val" in run.stdout + run.stderr


def test_cli_prune_packed_and_export_both_ways(tmp_path, tiny_model_dir):
    from peft_sparse.cli import main

    assert main(["prune", str(tiny_model_dir), "--method", "magnitude", "--save-format", "packed",
                 "--output", str(tmp_path / "packed")]) == 0
    packed = AutoModelForCausalLM.from_pretrained(tmp_path / "packed")
    assert packed.config.quantization_config.provenance["calibration"] == "embedded"
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prune(reference, SparsityConfig(method="magnitude"))
    assert _same_state(packed, reference)
    report = json.loads((tmp_path / "packed" / "prune_report.json").read_text())
    assert report["save_format"] == "packed" and (tmp_path / "packed" / "tokenizer.json").exists()
    assert main(["export", str(tmp_path / "packed"), "--format", "dense", "--output", str(tmp_path / "dense")]) == 0
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    assert main(["export", str(tmp_path / "dense"), "--format", "packed", "--dtype", "bfloat16",
                 "--output", str(tmp_path / "bf16")]) == 0
    bf16 = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert bf16.dtype == torch.bfloat16
    assert all(torch.equal(v, reference.state_dict()[k].bfloat16()) for k, v in bf16.state_dict().items())
    assert main(["export", str(tiny_model_dir), "--format", "packed", "--output", str(tmp_path / "x")]) == 2
    assert main(["prune", str(tiny_model_dir), "--method", "magnitude", "--sparsity", "0.5", "--save-format",
                 "packed", "--output", str(tmp_path / "y")]) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# ---- codec against a slow, loop-by-loop reference of FORMAT.md ----

def _ref_kept(group: list[float], n: int) -> list[int]:
    """The kept columns of one group: its nonzeros padded with the lowest-index zeros (FORMAT.md)."""
    nonzero = [j for j, x in enumerate(group) if x != 0]
    assert len(nonzero) <= n
    zeros = [j for j, x in enumerate(group) if x == 0]
    return sorted(nonzero + zeros[: n - len(nonzero)])


def _ref_pack(w: torch.Tensor, n: int, m: int, codec: str) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = w.shape
    values, meta = [], []
    for r in range(rows):
        kept = [[g * m + j for j in _ref_kept(w[r, g * m:(g + 1) * m].tolist(), n)] for g in range(cols // m)]
        values.append(w[r, [c for group in kept for c in group]])
        if codec == "b6x3":
            codes = [packing.PAIRS_2_4.index((a - 4 * g, b - 4 * g)) for g, (a, b) in enumerate(kept)]
            codes += [0] * (-len(codes) % 3)
            meta.append([codes[i] + 6 * codes[i + 1] + 36 * codes[i + 2] for i in range(0, len(codes), 3)])
        elif codec == "rank":
            k, nbytes = packing.RANK_WORDS[n, m]
            ranks = [sum(math.comb(c - g * m, i + 1) for i, c in enumerate(group)) for g, group in enumerate(kept)]
            ranks += [0] * (-len(ranks) % k)
            row = []
            for start in range(0, len(ranks), k):
                word = sum(r * math.comb(m, n) ** j for j, r in enumerate(ranks[start:start + k]))
                row += [word >> 8 * b & 255 for b in range(nbytes)]
            meta.append(row)
        else:
            bits = [0] * (cols + (-cols) % 8)
            for c in (c for group in kept for c in group):
                bits[c] = 1
            meta.append([sum(bits[b + j] << j for j in range(8)) for b in range(0, len(bits), 8)])
    return torch.stack(values), torch.tensor(meta, dtype=torch.uint8)


def _ref_unpack(values: torch.Tensor, meta: torch.Tensor, cols: int, n: int, m: int, codec: str) -> torch.Tensor:
    dense = torch.zeros(meta.shape[0], cols, dtype=values.dtype)
    for r, row in enumerate(meta.tolist()):
        if codec == "b6x3":
            codes = [byte // 6**d % 6 for byte in row for d in range(3)][: cols // 4]
            kept = [4 * g + c for g, code in enumerate(codes) for c in packing.PAIRS_2_4[code]]
        elif codec == "rank":
            k, nbytes = packing.RANK_WORDS[n, m]
            words = [sum(row[b + j] << 8 * j for j in range(nbytes)) for b in range(0, len(row), nbytes)]
            ranks = [word // math.comb(m, n) ** j % math.comb(m, n) for word in words for j in range(k)][: cols // m]
            kept = []
            for g, rest in enumerate(ranks):  # greedy colex unrank: the largest c with C(c, i) <= rest, i = n .. 1
                group = []
                for i in range(n, 0, -1):
                    c = max(c for c in range(m) if math.comb(c, i) <= rest)
                    group.append(g * m + c)
                    rest -= math.comb(c, i)
                kept += sorted(group)
        else:
            kept = [8 * b + j for b, byte in enumerate(row) for j in range(8) if byte >> j & 1]
        dense[r, kept] = values[r]
    return dense


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor (so NaN, inf and -0.0 compare exactly)."""
    return t.contiguous().view({4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


def _nasty_nm(rows: int, cols: int, n: int, m: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random exactly-N:M data with ties, short groups, an all-zero row, -0.0, inf and NaN among the kept values."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-2, 3, (rows, cols), generator=g).to(dtype)  # many ties and zeros
    w = w * nm_mask(w.abs().float() + torch.rand(rows, cols, generator=g), n, m)
    w[0] = 0
    w[1, :m] = 0
    w[1, 0], w[1, m - 1] = float("nan"), float("-inf") if n == 1 else float("inf")
    w[1, m - 1] = 0 if n == 1 else w[1, m - 1]
    w[2] = torch.where(w[2] == 0, torch.tensor(-0.0, dtype=dtype), w[2])  # -0.0 never counts as a nonzero
    return w


CODEC_CASES = [(2, 4, "b6x3"), (2, 4, "bitmask"), (1, 4, "bitmask"), (4, 8, "bitmask"), (1, 2, "bitmask"),
               (1, 3, "bitmask"), (2, 16, "bitmask"), (1, 2, "rank"), (2, 4, "rank"), (4, 8, "rank"),
               (8, 16, "rank")]


@pytest.mark.parametrize("n,m,codec", CODEC_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pack_and_unpack_match_the_reference(n, m, codec, dtype):
    for seed, groups in enumerate((1, 2, 3, 5, 6, 7, 12)):  # full and partial metadata bytes
        cols = groups * m
        w = _nasty_nm(5, cols, n, m, dtype, seed)
        ref_values, ref_meta = _ref_pack(w, n, m, codec)
        values, meta = packing.pack(w, n, m, codec)
        assert torch.equal(meta, ref_meta) and torch.equal(_bits(values), _bits(ref_values))
        dense = packing.unpack(values, meta, cols, n, m, codec)
        assert dense.dtype == dtype and dense.shape == w.shape and dense.is_contiguous()
        assert torch.equal(_bits(dense), _bits(_ref_unpack(values, meta, cols, n, m, codec)))
        assert torch.equal(dense.isnan(), w.isnan()) and torch.equal(dense.nan_to_num(), w.nan_to_num())
        assert torch.equal(packing.unpack_mask(meta, cols, n, m, codec), _ref_unpack(
            torch.ones_like(values), meta, cols, n, m, codec).bool())
        stored = packing.unpack(values, meta, cols, n, m, codec, transpose=True)  # Conv1D storage
        assert stored.is_contiguous() and torch.equal(_bits(stored), _bits(dense.t()))


@pytest.mark.parametrize("n,m,codec", CODEC_CASES)
def test_group_patterns_without_the_word_trick(n, m, codec, monkeypatch):
    w = _nasty_nm(6, 7 * m, n, m, torch.float32, 1)  # the per-column path (big-endian hosts) packs the same
    expected = packing.pack(w, n, m, codec)
    monkeypatch.setattr(packing, "_LITTLE_ENDIAN", False)
    assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(packing.pack(w, n, m, codec), expected))


def test_pack_reads_transposed_views():
    w = _nasty_nm(24, 40, 2, 4, torch.float32, 3)
    stored = w.t().contiguous()  # Conv1D storage: the (out, in) view is a transpose
    for codec in ("b6x3", "bitmask", "rank"):
        (values, meta), (expected_values, expected_meta) = packing.pack(stored.t(), 2, 4, codec), packing.pack(w, 2, 4,
                                                                                                             codec)
        assert torch.equal(meta, expected_meta) and torch.equal(_bits(values), _bits(expected_values))


@pytest.mark.parametrize("n,m,codec", CODEC_CASES)
def test_unpack_refuses_metadata_no_packer_writes(n, m, codec):
    cols = 5 * m  # a partial last byte for every codec but 1:2 / 4:8 bitmask
    values, meta = packing.pack(_nasty_nm(4, cols, n, m, torch.float32, 0), n, m, codec)
    corruptions = [(1, 0, 216), (1, 0, 250), (3, 0, 255)] if codec in ("b6x3", "rank") and m == 4 else []
    if codec == "bitmask":
        corruptions.append((1, 0, int(meta[1, 0]) ^ 1))
    elif codec == "rank" and m > 4:  # the top byte of a 7-byte word at 255 is >= C(8, 4)^9 and C(16, 8)^4
        corruptions.append((1, 6, 255))
    last = int(meta[2, -1])
    if codec == "b6x3" or (n, m) == (2, 4):  # padding groups of the last byte must be code 0
        corruptions.append((2, -1, last + 36 if cols // 4 % 3 == 2 else last + 6))
    elif codec == "rank":  # 5 groups in a word of k: the last group is padding
        k, nbytes = packing.RANK_WORDS[n, m]
        corruptions.append((2, -1, last + (1 << 7 if m == 2 else 1 << 5)))
    elif cols % 8:  # bits past the last column must be clear
        corruptions.append((2, -1, last | 0x80))
    for row, column, byte in corruptions:
        corrupt = meta.clone()
        corrupt[row, column] = byte
        with pytest.raises(ValueError, match="corrupt"):
            packing.unpack(values, corrupt, cols, n, m, codec)
    with pytest.raises(ValueError, match="do not match"):
        packing.unpack(values[:, 1:], meta, cols, n, m, codec)
    with pytest.raises(ValueError, match="do not match"):
        packing.unpack(values, meta[:, :-1], cols, n, m, codec)
    with pytest.raises(ValueError, match="uint8"):
        packing.unpack(values, meta.to(torch.int32), cols, n, m, codec)
