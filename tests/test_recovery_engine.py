"""DSnoT and WRP through prune() and the CLI on tiny random models: the engine contract end to end."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_ARCHS, make_tiny_model
from transformers import AutoModelForCausalLM

from peft_sparse import SparsityConfig, prune
from peft_sparse.cli import main
from peft_sparse.modeling import find_decoder_blocks, is_sparse_layer, out_in
from peft_sparse.nn import RecoverLinear, merge_recovered
from peft_sparse.pruning import engine
from peft_sparse.pruning.dsnot import MomentStats
from peft_sparse.sparsity import nm_violations


def _ids(model, nsamples: int = 4, seqlen: int = 16) -> torch.Tensor:
    vocab = model.get_input_embeddings().weight.shape[0]
    return torch.randint(0, vocab, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))


def _block_layers(model) -> dict[str, torch.nn.Module]:
    _, blocks = find_decoder_blocks(model)
    return {n: m for n, m in blocks.named_modules() if is_sparse_layer(m)}


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_dsnot_after_any_method_is_exactly_nm_and_changes_the_mask(arch, method):
    model = make_tiny_model(arch)
    ids = _ids(model)
    start = make_tiny_model(arch)
    prune(start, SparsityConfig(method=method), calibration=ids)
    config = SparsityConfig(method=method, refine="dsnot", refine_options={"layers": "all", "eps": 0.0})
    assert config.needs_calibration
    report = prune(model, config, calibration=ids)
    assert report.method == f"{method}+dsnot" and report.extra_nonzeros == 0
    changed = 0
    for (name, layer), start_layer in zip(_block_layers(model).items(), _block_layers(start).values()):
        assert nm_violations(out_in(layer), 2, 4) == 0, name
        changed += int(((out_in(layer) != 0) != (out_in(start_layer) != 0)).sum())
    assert changed > 0


def test_layer_choice_refines_only_attention():
    ids = _ids(make_tiny_model())
    wanda, refined = make_tiny_model(), make_tiny_model()
    prune(wanda, SparsityConfig(method="wanda"), calibration=ids)
    options = {"eps": 0.0, "layers": "attention"}
    prune(refined, SparsityConfig(method="wanda", refine="dsnot", refine_options=options), calibration=ids)
    for name, layer in _block_layers(refined).items():
        if name.startswith("0."):  # block 0: same inputs in both runs (later blocks see the refined attention)
            same = torch.equal(layer.weight, _block_layers(wanda)[name].weight)
            assert same == ("mlp" in name), name


def test_dsnot_statistics_are_shared_between_qkv():
    model = make_tiny_model()
    config = SparsityConfig(method="wanda", refine="dsnot")
    pruner = engine.build_pruner(config)
    blocks = find_decoder_blocks(model)[1]
    block = blocks[0]
    targets = [engine._Target(n, m) for n, m in block.named_modules() if is_sparse_layer(m)]
    batches = engine.capture_inputs(model, blocks, _ids(model))
    engine._collect_statistics(block, targets, pruner, batches)
    by_name = {t.name: t for t in targets}
    assert by_name["self_attn.k_proj"].owner is by_name["self_attn.q_proj"]
    wanda_stats, moments = by_name["self_attn.q_proj"].shared_stats
    assert isinstance(moments, MomentStats) and moments.tokens == 4 * 16
    assert wanda_stats.count == 4  # the start pruner's statistics fed in the same pass


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("options", [{"alpha": 0.25}, {"block_size": 16, "blocks_per_row": 1}])
def test_wrp_swaps_in_recover_modules_and_merges_exactly(arch, options):
    model = make_tiny_model(arch)
    dense = _state(model)
    ids = _ids(model)
    report = prune(model, SparsityConfig(method="wrp", method_options=options), calibration=ids)
    recovers = [m for m in model.modules() if isinstance(m, RecoverLinear)]
    assert len(recovers) == len(report.layers) > 0
    assert report.extra_nonzeros == sum(m.extra_nonzeros for m in recovers) > 0
    assert 0 < report.extra_density < 0.5
    assert all(layer.extra_nonzeros > 0 for layer in report.layers)
    for module in recovers:  # the N:M part is exactly N:M, the recover matrix lies off its support
        assert nm_violations(out_in(module.base), 2, 4) == 0
        assert not torch.any((out_in(module.base) != 0) & (module.recover_dense() != 0))
    with torch.no_grad():
        logits = model(ids).logits
    assert merge_recovered(model) == len(recovers)
    assert not any(isinstance(m, RecoverLinear) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, logits, rtol=1e-4, atol=1e-4)
    for key, value in model.state_dict().items():  # merged weights: original values where kept or recovered
        kept = value != 0
        assert torch.equal(value[kept], dense[key][kept]), key


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "wrp", "method_options": {"alpha": 1.2}}, r"alpha must be a number in \[0, 1\]"),
        ({"method": "wrp", "method_options": {"block_size": 24, "blocks_per_row": 1}}, "does not divide"),
        ({"method": "wrp", "method_options": {"block_size": 16, "blocks_per_row": 9}}, "blocks_per_row=9 exceeds"),
        ({"method": "wanda", "refine": "dsnotx"}, "Unknown refiner 'dsnotx'"),
        ({"method": "wanda", "refine": "dsnot", "refine_options": {"cycles": 3}}, r"Unknown option\(s\) \['cycles'\]"),
        ({"method": "wanda", "refine_options": {"eps": 0.1}}, "without a refiner"),
        ({"method": "wanda", "refine": "dsnot", "refine_options": {"layers": "ffn"}}, "layers one of"),
    ],
)
def test_bad_options_fail_before_the_model_changes(kwargs, match):
    model = make_tiny_model()
    before = _state(model)
    with pytest.raises(ValueError, match=match):
        prune(model, SparsityConfig(**kwargs), calibration=_ids(model))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_magnitude_with_dsnot_asks_for_data():
    model = make_tiny_model()
    with pytest.raises(ValueError, match="needs calibration data"):
        prune(model, SparsityConfig(method="magnitude", refine="dsnot"))


def test_config_round_trips_refine_fields():
    config = SparsityConfig(method="wanda", refine="dsnot", refine_options={"max_cycles": 10, "layers": "all"})
    assert SparsityConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_cli_wrp_dense_save_and_dsnot(tmp_path, capsys, tiny_model_dir):
    out = tmp_path / "wrp"
    code = main(["prune", str(tiny_model_dir), "--method", "wrp", "--option", "alpha=0.25", "--calibration",
                 "embedded", "--nsamples", "2", "--seqlen", "16", "--output", str(out)])  # fmt: skip
    assert code == 0
    report = json.loads((out / "prune_report.json").read_text())
    assert report["exactly_nm"] is False and report["extra_density"] > 0
    assert report["config"]["method_options"] == {"alpha": 0.25}
    loaded = AutoModelForCausalLM.from_pretrained(out)  # plain transformers: the sum is one dense weight
    violations = sum(nm_violations(out_in(m), 2, 4) for m in _block_layers(loaded).values())
    assert violations > 0

    out = tmp_path / "dsnot"
    code = main(["prune", str(tiny_model_dir), "--method", "magnitude", "--refine", "dsnot", "--refine-option",
                 "max_cycles=5", "--refine-option", "layers=all", "--calibration", "embedded", "--nsamples", "2",
                 "--seqlen", "16", "--output", str(out)])  # fmt: skip
    assert code == 0
    report = json.loads((out / "prune_report.json").read_text())
    assert report["method"] == "magnitude+dsnot" and report["exactly_nm"] is True
    assert report["config"]["refine_options"] == {"max_cycles": 5, "layers": "all"}
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert all(nm_violations(out_in(m), 2, 4) == 0 for m in _block_layers(loaded).values())


def test_cli_bad_refine_option_exits_2_without_output(tmp_path, capsys, tiny_model_dir):
    out = tmp_path / "bad"
    code = main(["prune", str(tiny_model_dir), "--refine", "dsnot", "--refine-option", "eps=-1", "--output", str(out)])
    assert code == 2 and not out.exists()
    assert "dsnot eps must be a non-negative number" in capsys.readouterr().err


def test_cli_packed_wrp_saves_the_recover_matrices_and_reloads(tmp_path, tiny_model_dir):
    out = tmp_path / "packed"
    code = main(["prune", str(tiny_model_dir), "--method", "wrp", "--option", "block_size=16", "--option",
                 "blocks_per_row=2", "--calibration", "embedded", "--nsamples", "2", "--seqlen", "16",
                 "--save-format", "packed", "--output", str(out)])  # fmt: skip
    assert code == 0
    report = json.loads((out / "prune_report.json").read_text())
    assert report["exactly_nm"] is True and report["extra_density"] > 0
    loaded = AutoModelForCausalLM.from_pretrained(out)
    recovers = [m for m in loaded.modules() if isinstance(m, RecoverLinear)]
    assert len(recovers) == len(report["layers"]) > 0 and all(m.block_size == 16 for m in recovers)
    assert all(nm_violations(out_in(m.base), 2, 4) == 0 for m in recovers)
