"""Tiny random models shared by the SPP / SLoRB / registration tests (hidden 64, 2 layers: milliseconds on CPU)."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from peft_sparse.sparsity import apply_mask, nm_mask

VOCAB = 128


def tiny_llama(seed: int = 0, pruned: bool = True, intermediate_size: int = 128) -> LlamaForCausalLM:
    """A 2-layer Llama whose projection weights are magnitude-pruned 2:4 (unless ``pruned=False``)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=intermediate_size, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).eval()
    if pruned:
        prune_24(model, ("proj",))
    return model


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """A 2-layer GPT-2 (Conv1D weights stored (in, out)) pruned 2:4 along the input dimension."""
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64)).eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(("c_attn", "c_proj", "c_fc")):
                weight = module.weight.T
                apply_mask(weight, nm_mask(weight.abs(), 2, 4))
    return model


def prune_24(model: torch.nn.Module, name_parts: tuple[str, ...]) -> None:
    """Magnitude 2:4 on every Linear whose name contains one of ``name_parts``."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and any(part in name for part in name_parts):
                apply_mask(module.weight, nm_mask(module.weight.abs(), 2, 4))


def token_batch(seed: int = 1, batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
