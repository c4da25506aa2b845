"""Pruning checkpoint to checkpoint one block at a time, and the refusal of accelerate-offloaded models."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model
from safetensors.torch import load_file, save_file
from test_cli import error_line, run
from transformers import AutoModelForCausalLM, Gemma3TextConfig

import peft_sparse
from peft_sparse import SparsityConfig, prune
from peft_sparse.modeling import find_decoder_blocks
from peft_sparse.stream import CheckpointBlocks, ShardReader, ShardWriter, fits_in_memory, prune_checkpoint


def test_plan_refuses_a_disk_offloaded_model_before_touching_it(tmp_path, tiny_model_dir):
    from peft_sparse.pruning import engine

    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, device_map=device_map,
                                                 offload_folder=str(tmp_path / "offload"))
    before = {k: v.clone() for k, v in model.model.layers[0].state_dict().items()}
    with pytest.raises(ValueError, match=r"model.layers.1 .*offloaded.*prune_checkpoint.*--stream"):
        prune(model, SparsityConfig(method="magnitude"))
    with pytest.raises(ValueError, match="offloaded"):
        engine.plan(model, SparsityConfig().sparsity_pattern)
    assert all(torch.equal(v, before[k]) for k, v in model.model.layers[0].state_dict().items())


SEQLEN = 16


def _tensors(directory) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def _assert_same_checkpoint(a, b) -> None:
    """Every tensor bit for bit (and dtype), and the same config files."""
    ta, tb = _tensors(a), _tensors(b)
    assert sorted(ta) == sorted(tb)
    for key in ta:
        assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key], tb[key]), key
    for name in ("config.json", "generation_config.json", "sparsity_config.json"):
        assert (a / name).is_file() == (b / name).is_file(), name
        if (a / name).is_file():
            assert json.loads((a / name).read_text()) == json.loads((b / name).read_text()), name


def _source(tmp_path, arch: str):
    if arch == "gemma3":  # mixed layer types and tied embeddings
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(Gemma3TextConfig(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, sliding_window=4, max_position_embeddings=128,
            layer_types=["sliding_attention", "full_attention"] * 2))
    else:
        model = make_tiny_model(arch)
    model.save_pretrained(tmp_path / "src")
    return tmp_path / "src"


def _ids(nsamples: int = 4) -> torch.Tensor:
    return torch.randint(0, 256, (nsamples, SEQLEN), generator=torch.Generator().manual_seed(0))


STREAM_CASES = [("llama", "wanda", "packed"), ("llama", "sparsegpt", "dense"), ("gemma3", "sparsegpt", "packed"),
                ("gemma3", "wanda", "dense"), ("llama", "wrp", "packed"), ("gpt2", "magnitude", "packed")]


@pytest.mark.parametrize("arch, method, save_format", STREAM_CASES)
def test_streamed_checkpoint_equals_in_memory_prune_and_save(tmp_path, arch, method, save_format):
    source = _source(tmp_path, arch)
    config = SparsityConfig(method=method, nsamples=4, seqlen=SEQLEN)
    calibration = None if method == "magnitude" else _ids()
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    expected = prune(model, config, calibration=calibration)
    peft_sparse.save_pretrained(model, tmp_path / "memory", format=save_format)
    report = prune_checkpoint(source, tmp_path / "stream", SparsityConfig(method=method, nsamples=4, seqlen=SEQLEN),
                              calibration=calibration, save_format=save_format)
    _assert_same_checkpoint(tmp_path / "memory", tmp_path / "stream")
    assert [layer.name for layer in report.layers] == [layer.name for layer in expected.layers]
    index = json.loads((tmp_path / "stream" / "model.safetensors.index.json").read_text())
    blocks = find_decoder_blocks(model)[1]
    assert len(set(index["weight_map"].values())) == len(blocks) + len(
        [k for k in index["weight_map"] if ".layers." not in k and ".h." not in k and not k.endswith("_meta")])
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "stream")  # loads like any sparse checkpoint
    with torch.no_grad():
        torch.testing.assert_close(reloaded(_ids()).logits, model(_ids()).logits, rtol=0, atol=0)


def test_only_one_block_is_ever_materialised(tmp_path, monkeypatch):
    source = _source(tmp_path, "llama")
    resident = []
    visit = CheckpointBlocks.visit

    def counting(self, index, block):
        blocks = find_decoder_blocks(self.model)[1]
        resident.append(sum(not next(b.parameters()).is_meta for b in blocks))
        return visit(self, index, block)

    monkeypatch.setattr(CheckpointBlocks, "visit", counting)
    prune_checkpoint(source, tmp_path / "out", SparsityConfig(method="wanda", nsamples=2, seqlen=SEQLEN),
                     calibration=_ids(2))
    assert resident == [0, 0]  # before each block is read, every other one is back on meta


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tensors_copied_in_pieces_equal_the_source_bit_for_bit(tmp_path, dtype):
    """Copy-through reads a large tensor as row ranges (here of 100 bytes: several rows, a remainder, one row per
    piece when a row is larger); the file written from the pieces holds exactly the source, floats cast."""
    source = {"embed": torch.randn(37, 9), "wide": torch.randn(3, 40), "ids": torch.arange(11, dtype=torch.int64),
              "scalar": torch.tensor(2.5)}
    (tmp_path / "src").mkdir()
    save_file(source, tmp_path / "src" / "model.safetensors")
    reader = ShardReader(tmp_path / "src")
    pieces = {key: reader.pieces(key, dtype, piece_bytes=100) for key in source}
    assert len(list(reader.pieces("embed", dtype, piece_bytes=100)[2])) == 19  # 37 rows of 36 bytes, 2 a piece
    assert len(list(reader.pieces("wide", dtype, piece_bytes=100)[2])) == 3
    writer = ShardWriter(tmp_path / "out", 1, {})
    (tmp_path / "out").mkdir()
    writer.write(pieces)
    writer.finish()
    copied = load_file(tmp_path / "out" / "model-00001-of-00001.safetensors")
    for key, value in source.items():
        expected = value.to(dtype) if value.is_floating_point() else value
        assert copied[key].dtype == expected.dtype and torch.equal(copied[key], expected)
    assert writer.total_size == sum(v.numel() * v.element_size() for v in copied.values())


def test_a_failure_midway_leaves_no_output(tmp_path, monkeypatch):
    from peft_sparse.pruning import engine

    source = _source(tmp_path, "llama")
    calls = []
    prune_block = engine.prune_block

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return prune_block(*args, **kwargs)

    monkeypatch.setattr(engine, "prune_block", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        prune_checkpoint(source, tmp_path / "out", SparsityConfig(method="magnitude"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_a_checkpoint_missing_a_tensor_is_refused_before_any_output(tmp_path):
    source = _source(tmp_path, "llama")
    tensors = load_file(source / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing: model.layers.1.mlp.up_proj.weight"):
        prune_checkpoint(source, tmp_path / "out", SparsityConfig(method="magnitude"))
    assert not (tmp_path / "out").exists()


def test_cli_stream_equals_no_stream(tmp_path, capsys, tiny_model_dir):
    args = ["--method", "wanda", "--nsamples", "2", "--seqlen", "32", "--save-format", "packed"]
    code, out, err = run(capsys, "prune", tiny_model_dir, *args, "--stream", "--output", tmp_path / "stream")
    assert code == 0, err
    assert "streamed" in out
    code, _, err = run(capsys, "prune", tiny_model_dir, *args, "--no-stream", "--output", tmp_path / "memory")
    assert code == 0, err
    _assert_same_checkpoint(tmp_path / "memory", tmp_path / "stream")
    assert json.loads((tmp_path / "stream" / "prune_report.json").read_text())["streamed"] is True
    assert (tmp_path / "stream" / "tokenizer.json").is_file()


def test_cli_streams_by_default_when_the_model_does_not_fit(tmp_path, capsys, caplog, monkeypatch, tiny_model_dir):
    from peft_sparse import stream

    assert fits_in_memory(tiny_model_dir, torch.float32)  # this machine holds a tiny model
    monkeypatch.setattr(stream, "memory_budget", lambda: 1 << 20)  # a 1 MiB container
    assert not fits_in_memory(tiny_model_dir, torch.float32)
    code, out, err = run(capsys, "prune", tiny_model_dir, "--method", "magnitude", "--output", tmp_path / "out")
    assert code == 0 and "streamed" in out and "would not fit in memory" in caplog.text, err


@pytest.mark.parametrize("extra, message", [(["--push-to-hub", "me/model"], "--push-to-hub"),
                                            (["--method", "wanda", "--tokenizer", "/no/such/tok"],
                                             "no such directory")])
def test_cli_stream_refusals_exit_2_without_output(tmp_path, capsys, tiny_model_dir, extra, message):
    code, _, err = run(capsys, "prune", tiny_model_dir, "--stream", *extra, "--output", tmp_path / "out")
    assert code == 2 and message in error_line(err) and not (tmp_path / "out").exists()


def test_cli_stream_of_a_hub_id_says_to_download_it(tmp_path, capsys):
    code, _, err = run(capsys, "prune", "org/model", "--stream", "--method", "magnitude", "--output", tmp_path / "o")
    assert code == 2 and "hf download org/model" in error_line(err)


@pytest.mark.parametrize("version", ["v1", "v2", "none"])
def test_memory_budget_reads_the_cgroup_limit_else_available_ram(tmp_path, version):
    from peft_sparse.stream import memory_budget

    proc, cgroups = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text("MemTotal:       24000000 kB\nMemAvailable:   12000000 kB\n")
    if version == "v1":
        (proc / "self" / "cgroup").write_text("12:cpu,cpuacct:/job\n7:memory:/docker/abc\n0::/\n")
        (cgroups / "memory" / "docker" / "abc").mkdir(parents=True)
        (cgroups / "memory" / "docker" / "abc" / "memory.limit_in_bytes").write_text("536870912\n")
        (cgroups / "memory.max").write_text("max\n")  # the v2 root of a hybrid setup: no limit
    elif version == "v2":
        (proc / "self" / "cgroup").write_text("0::/kubepods/pod1\n")
        (cgroups / "kubepods" / "pod1").mkdir(parents=True)
        (cgroups / "kubepods" / "pod1" / "memory.max").write_text("1073741824\n")
    else:
        (proc / "self" / "cgroup").write_text("7:memory:/\n")
        (cgroups / "memory").mkdir(parents=True)
        (cgroups / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1 "unlimited"
    expected = {"v1": 512 << 20, "v2": 1 << 30, "none": 12000000 * 1024}[version]
    assert memory_budget(proc, cgroups) == expected
