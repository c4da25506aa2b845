"""The one answer to "which modules are sparse, in which orientation", and every user of it agreeing."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model
from torch import nn
from transformers import AutoModelForCausalLM, OPTConfig
from transformers.pytorch_utils import Conv1D

from peft_sparse import SparseTrainer, SparseTrainingArguments, SparsityConfig, prune
from peft_sparse.modeling import find_decoder_blocks, out_in, select_sparse_modules, to_storage
from peft_sparse.pruning import engine
from peft_sparse.sparsity import SparsityPattern, follows_nm
from peft_sparse.training.layers import attach_sparse_layers


def opt_with_projections(seed: int = 0) -> nn.Module:
    """OPT whose word_embed_proj_dim != hidden_size: Linears project_in / project_out sit outside the blocks."""
    torch.manual_seed(seed)
    config = OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                       word_embed_proj_dim=32, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(config).eval()


def test_default_selection_is_the_decoder_blocks_linears():
    model = opt_with_projections()
    blocks_name, blocks = find_decoder_blocks(model)
    selected = select_sparse_modules(model)
    assert "model.decoder.project_in" not in selected and "model.decoder.project_out" not in selected
    assert "lm_head" not in selected
    expected = {f"{blocks_name}.{i}.{n}" for i, block in enumerate(blocks) for n, m in block.named_modules()
                if isinstance(m, nn.Linear)}
    assert set(selected) == expected and len(expected) == 12


def test_targets_and_ignore_are_regular_expressions():
    model = opt_with_projections()
    assert set(select_sparse_modules(model, targets=[r"project_(in|out)$"])) == {
        "model.decoder.project_in", "model.decoder.project_out"}
    kept = select_sparse_modules(model, ignore=[r"fc\d"])
    assert kept and not any(name.endswith(("fc1", "fc2")) for name in kept)
    with pytest.raises(ValueError, match="No Linear/Conv1D layer selected"):
        select_sparse_modules(model, targets=["nothing_matches"])
    with pytest.raises(TypeError, match="not a single string"):
        select_sparse_modules(model, ignore="fc1")


def test_conv1d_orientation_round_trips():
    conv = Conv1D(6, 8)  # stores (in=8, out=6)
    assert out_in(conv).shape == (6, 8)
    assert out_in(conv).data_ptr() == conv.weight.data_ptr()  # a view: writes reach the parameter
    delta = torch.randn(6, 8)
    assert torch.equal(to_storage(conv, delta), delta.t())
    linear = nn.Linear(8, 6)
    assert out_in(linear) is linear.weight and to_storage(linear, delta) is delta


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_pruning_and_training_select_the_same_modules(arch):
    model = make_tiny_model(arch)
    pruned = {name for block in engine.plan(model, SparsityPattern.parse("2:4")).targets for name in block}
    trained = set(attach_sparse_layers(make_tiny_model(arch), SparsityPattern.parse("2:4")))
    assert pruned == trained == set(select_sparse_modules(model))


def test_prune_then_retrain_from_the_pruned_mask_with_linears_outside_the_blocks(tmp_path):
    model = opt_with_projections()
    prune(model, SparsityConfig(method="magnitude", pattern="2:4"))
    assert not follows_nm(model.model.decoder.project_in.weight, 2, 4)  # left dense on purpose
    args = SparseTrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                                   report_to="none", use_cpu=True, save_strategy="no", mask_init="pruned")
    ids = torch.randint(0, 128, (4, 16))
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    trainer = SparseTrainer(model=model, args=args, train_dataset=dataset)
    assert set(trainer.sparse_layers) == set(select_sparse_modules(model))
    trainer.train()
    trainer.finalize()
    for name, module in select_sparse_modules(trainer.model).items():
        assert follows_nm(out_in(module), 2, 4), name
