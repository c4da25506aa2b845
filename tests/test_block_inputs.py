"""Every block is calibrated on the inputs the model really gives it, also where layers differ by type.

transformers 5 picks each block's attention mask and rotary embedding by ``config.layer_types[i]``: Gemma 2/3
alternate sliding-window and full attention (Gemma 3 also with two RoPE bases), a sliding-window Qwen2 switches after
``max_window_layers``, Mistral's mask is sliding everywhere. The reference is the model's own forward: pre-hooks record
what each block receives.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, MistralConfig, Qwen2Config

from peft_sparse import SparsityConfig, prune
from peft_sparse.modeling import find_decoder_blocks
from peft_sparse.pruning.engine import capture_inputs, forward_block

WINDOW, SEQLEN = 4, 16  # a window well inside the sequence, so sliding and full attention differ
COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, sliding_window=WINDOW)
CONFIGS = {
    "gemma3": lambda: Gemma3TextConfig(**COMMON, head_dim=16, rope_local_base_freq=100.0,
                                       layer_types=["sliding_attention", "full_attention"] * 2),
    "gemma2": lambda: Gemma2Config(**COMMON, head_dim=16, layer_types=["sliding_attention", "full_attention"] * 2),
    "qwen2_sliding": lambda: Qwen2Config(**COMMON, use_sliding_window=True, max_window_layers=2),
    "mistral_sliding": lambda: MistralConfig(**COMMON),
}
METHODS = [("wanda", None), ("sparsegpt", None), ("wrp", None), ("magnitude", "dsnot"), ("wanda", "dsnot"),
           ("sparsegpt", "dsnot")]  # every pruner and refiner that replays blocks (magnitude alone uses no data)


def _model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIGS[arch]()).eval()


def _ids(nsamples: int = 4) -> torch.Tensor:
    return torch.randint(0, 256, (nsamples, SEQLEN), generator=torch.Generator().manual_seed(0))


def _recording(blocks) -> tuple[list[list[torch.Tensor]], list]:
    """Pre-hooks appending every block's input hidden states to ``seen[i]``; returns (seen, handles). Calls of the
    engine's capture, where a block is an identity stub (an instance ``forward``), are not block inputs."""
    seen: list[list[torch.Tensor]] = [[] for _ in blocks]

    def hook(index: int):
        def record(module, args, kwargs):
            if "forward" not in module.__dict__:
                seen[index].append((args[0] if args else kwargs["hidden_states"]).detach().clone())

        return record

    return seen, [block.register_forward_pre_hook(hook(i), with_kwargs=True) for i, block in enumerate(blocks)]


def _model_block_inputs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """What each block receives in the model's own forward."""
    _, blocks = find_decoder_blocks(model)
    seen, handles = _recording(blocks)
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for handle in handles:
        handle.remove()
    return [inputs[0] for inputs in seen]


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_layer_types_really_differ(arch):
    """The premise: the captured arguments of later blocks are not block 0's (else the tests below prove nothing)."""
    model = _model(arch)
    _, blocks = find_decoder_blocks(model)
    with torch.no_grad():
        (batch,) = capture_inputs(model, blocks, _ids())
    masks = [kwargs["attention_mask"] for _, kwargs in batch.calls]
    assert len(batch.calls) == len(blocks)
    if arch == "mistral_sliding":  # one layer type: every block gets the same sliding-window mask
        assert all(mask is masks[0] for mask in masks)
        return
    differs = [i for i, (_, kwargs) in enumerate(batch.calls) if not _same(kwargs, batch.calls[0][1])]
    expected = [i for i, kind in enumerate(model.config.layer_types) if kind != model.config.layer_types[0]]
    assert differs == expected


def _same(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, tuple):
            if not all(torch.equal(u, v) for u, v in zip(x, y)):
                return False
        elif isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and torch.equal(x, y)):
                return False
    return True


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_dense_replay_reproduces_every_block_input(arch):
    model = _model(arch)
    ids = _ids()
    expected = _model_block_inputs(model, ids)
    _, blocks = find_decoder_blocks(model)
    with torch.no_grad():
        batches = capture_inputs(model, blocks, ids)
        for index, block in enumerate(blocks):
            torch.testing.assert_close(torch.cat([b.hidden for b in batches]), expected[index], rtol=1e-5, atol=1e-5)
            batches = forward_block(block, batches)


@pytest.mark.parametrize("method, refine", METHODS)
@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_every_method_calibrates_each_block_on_the_models_own_inputs(arch, method, refine):
    """Each block is calibrated (pass 1) and replayed (pass 2) on exactly what the pruned model gives it."""
    model = _model(arch)
    ids = _ids()
    _, blocks = find_decoder_blocks(model)
    seen, handles = _recording(blocks)
    prune(model, SparsityConfig(method=method, refine=refine, nsamples=4, seqlen=SEQLEN), calibration=ids)
    for handle in handles:
        handle.remove()
    expected = _model_block_inputs(model, ids)  # blocks before i are pruned in both
    for index, inputs in enumerate(seen):
        assert inputs, f"block {index} was never run"
        for hidden in inputs:  # pass 1 and pass 2 of the engine (the last block has no pass 2)
            torch.testing.assert_close(hidden, expected[index], rtol=1e-5, atol=1e-5)

