"""Pruning checkpoint to checkpoint one block at a time, and the refusal of accelerate-offloaded models."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from peft_sparse import SparsityConfig, prune


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
