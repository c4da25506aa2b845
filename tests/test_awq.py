"""AWQ on a sparse Llama block vs a slow literal restatement of llm-awq's scale and clip grid searches."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from peft_sparse import SparsityConfig, prune, quantize
from peft_sparse.modeling import find_decoder_blocks, out_in
from peft_sparse.pruning.engine import capture_inputs
from peft_sparse.quantization import QuantScheme, codes_of, grid_of, quantize_layer
from peft_sparse.sparsity import nm_violations

PAIRS = [  # llm-awq's Llama pairs, written out
    ("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "self_attn"),
    ("self_attn.v_proj", ["self_attn.o_proj"], "self_attn.o_proj"),
    ("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"], "mlp"),
    ("mlp.up_proj", ["mlp.down_proj"], "mlp.down_proj"),
]
LINEARS = [name for _, linears, _ in PAIRS for name in linears]


def _llama(kv_heads: int = 4) -> torch.nn.Module:
    """Hidden 64, no GQA by default (so the v_proj -> o_proj pair is searched too)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=512)
    return AutoModelForCausalLM.from_config(config).eval()


def _ids(nsamples: int = 4, seqlen: int = 16) -> torch.Tensor:
    return torch.randint(0, 256, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))


def _inputs(block, batches, names):
    """Run the whole block over the batches; record the (args, kwargs) of each named submodule."""
    modules = dict(block.named_modules())
    calls = {name: [] for name in names}
    handles = [modules[name].register_forward_pre_hook(
        lambda module, args, kwargs, name=name: calls[name].append((args, kwargs)), with_kwargs=True)
        for name in names]
    for batch in batches:
        block(batch.hidden, *batch.args, **batch.kwargs)
    for handle in handles:
        handle.remove()
    return calls


def _first(call):
    args, kwargs = call
    return args[0] if args else kwargs["hidden_states"]


def _out(module, call):
    out = module(*call[0], **call[1])
    return out[0] if isinstance(out, tuple) else out


def slow_awq(block, batches, scheme: QuantScheme, n_grid: int = 20, max_shrink: float = 0.5, clip_tokens: int = 512):
    """llm-awq auto_scale + auto_clip, literally: inputs re-captured from the whole block before every search, the
    clip searched row by row and group by group."""
    modules = dict(block.named_modules())
    with torch.no_grad():
        for previous, linears, inspect in PAIRS:
            calls = _inputs(block, batches, [linears[0], inspect])
            x = torch.cat([_first(c).reshape(-1, _first(c).shape[-1]) for c in calls[linears[0]]])
            x_mean = x.abs().mean(0)
            reference = [_out(modules[inspect], c) for c in calls[inspect]]
            originals = {name: modules[name].weight.clone() for name in linears}
            best, best_scale = math.inf, None
            for i in range(n_grid):
                scale = x_mean.pow(i / n_grid).clamp(min=1e-4)
                scale = scale / (scale.max() * scale.min()).sqrt()
                for name in linears:
                    w = originals[name]
                    modules[name].weight.copy_(quantize_layer(w * scale, w != 0, scheme)[0] / scale)
                outputs = [_out(modules[inspect], c) for c in calls[inspect]]
                loss = sum(float((o - r).square().sum()) for o, r in zip(outputs, reference))
                loss /= sum(r.numel() for r in reference)
                if loss < best:
                    best, best_scale = loss, scale
            for name in linears:
                modules[name].weight.copy_(originals[name] * best_scale)
            if isinstance(modules[previous], torch.nn.Linear):
                modules[previous].weight.div_(best_scale[:, None])
            else:
                modules[previous].weight.div_(best_scale)
        calls = _inputs(block, batches, LINEARS)
        qmax = 2 ** (scheme.bits - 1) - 1
        for name in LINEARS:
            weight = modules[name].weight.clone()
            rows, cols = weight.shape
            width = scheme.group_size
            if not name.endswith(("q_proj", "k_proj")):
                x = torch.cat([_first(c).reshape(-1, cols) for c in calls[name]])
                x = x[:: max(1, x.shape[0] // clip_tokens)][:clip_tokens]
                for r in range(rows):
                    for g in range(cols // width):
                        w = weight[r, g * width : (g + 1) * width].clone()
                        keep = w != 0
                        xg = x[:, g * width : (g + 1) * width]
                        target = xg @ w
                        absmax = w.abs().max()
                        best, best_limit = math.inf, absmax
                        for i in range(int(max_shrink * n_grid)):
                            limit = absmax * (1 - i / n_grid)
                            clipped = w.clamp(-limit, limit)
                            s = clipped[keep].abs().max() / qmax if keep.any() else torch.tensor(1.0)
                            s = s if s > 0 else torch.tensor(1.0)
                            q = torch.where(keep, torch.clamp(torch.round(clipped / s), -qmax - 1, qmax) * s, 0.0)
                            error = float((xg @ q - target).square().mean())
                            if error < best:
                                best, best_limit = error, limit
                        weight[r, g * width : (g + 1) * width] = w.clamp(-best_limit, best_limit)
            modules[name].weight.copy_(quantize_layer(weight, weight != 0, scheme)[0])


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_awq_matches_the_literal_grid_search(kv_heads):
    ours, slow = _llama(kv_heads), _llama(kv_heads)
    config = SparsityConfig(method="magnitude", pattern="2:4", bits=4, group_size=32, quantizer="awq",
                            targets=[r"layers\.0\."])
    prune(ours, config, calibration=_ids())

    prune(slow, SparsityConfig(method="magnitude", pattern="2:4", targets=[r"layers\.0\."]))
    _, blocks = find_decoder_blocks(slow)
    batches = capture_inputs(slow, blocks, _ids())
    pairs = PAIRS if kv_heads == 4 else [p for p in PAIRS if p[0] != "self_attn.v_proj"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(__import__(__name__), "PAIRS", pairs)
        slow_awq(blocks[0], batches, config.scheme)

    got, want = dict(find_decoder_blocks(ours)[1][0].named_modules()), dict(blocks[0].named_modules())
    for name in ("input_layernorm", "post_attention_layernorm"):
        torch.testing.assert_close(got[name].weight, want[name].weight, rtol=1e-4, atol=1e-6)
    for name in LINEARS:
        weight = got[name].weight
        assert nm_violations(weight, 2, 4) == 0, name
        torch.testing.assert_close(weight, want[name].weight, rtol=1e-4, atol=1e-6)
        codes_of(weight, *grid_of(got[name]), config.scheme, name)
        assert not torch.signbit(weight[weight == 0]).any()


def test_awq_keeps_the_function_before_rounding_and_the_zeros():
    """Folding alone (8 bit, where rounding barely matters) leaves the block's output close to the sparse one."""
    model = _llama()
    prune(model, SparsityConfig(method="magnitude", pattern="2:4"))
    pruned = copy.deepcopy(model)
    zeros = {name: out_in(m) == 0 for name, m in model.named_modules() if name.endswith("proj")}
    quantize(model, SparsityConfig(pattern="2:4", bits=8, group_size=32, quantizer="awq"), calibration=_ids())
    for name, module in model.named_modules():
        if name.endswith("proj"):
            assert torch.equal(out_in(module)[zeros[name]], torch.zeros_like(out_in(module)[zeros[name]])), name
    ids = _ids(2, 16)
    torch.testing.assert_close(model(ids).logits, pruned(ids).logits, rtol=0.05, atol=0.02)


@pytest.mark.parametrize("arch", ["opt", "gpt2"])
def test_awq_refuses_unknown_architectures_before_any_work(tiny_model_factory, arch):
    model = tiny_model_factory(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="quantizer='gptq' or 'rtn'"):
        prune(model, SparsityConfig(method="wanda", pattern="2:4", bits=4, group_size=32, quantizer="awq"),
              calibration=_ids())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_awq_options_are_validated():
    with pytest.raises(ValueError, match="n_grid"):
        SparsityConfig(method="wanda", bits=4, quantizer="awq", quantizer_options={"n_grid": 0})
    with pytest.raises(ValueError, match="recover matrices"):
        SparsityConfig(method="wrp", bits=4, quantizer="awq")
