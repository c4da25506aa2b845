"""The block-by-block engine on tiny random models of several architectures, and prune()'s checks."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import TINY_ARCHS
from transformers import AutoModelForCausalLM, GemmaConfig, PhiConfig

from peft_sparse import PruneReport, SparsityConfig, prune
from peft_sparse.modeling import find_decoder_blocks, is_sparse_layer, out_in
from peft_sparse.pruning import engine, get_pruner
from peft_sparse.pruning.engine import capture_inputs, forward_block
from peft_sparse.pruning.magnitude import magnitude_prune
from peft_sparse.sparsity import nm_violations

METHODS = ("magnitude", "wanda", "sparsegpt")
EXTRA_CONFIGS = {  # two more layouts beyond the shared fixtures: Gemma (MQA, scaled embeddings), Phi (fc1/fc2, dense)
    "gemma": lambda: GemmaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
    ),
    "phi": lambda: PhiConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=512,
    ),
}  # fmt: skip
ARCHS = TINY_ARCHS + tuple(EXTRA_CONFIGS)


def _model(factory, arch: str) -> torch.nn.Module:
    if arch not in EXTRA_CONFIGS:
        return factory(arch)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(EXTRA_CONFIGS[arch]()).eval()


def _ids(model, nsamples: int = 4, seqlen: int = 16, seed: int = 0) -> torch.Tensor:
    vocab = model.get_input_embeddings().weight.shape[0]
    return torch.randint(0, vocab, (nsamples, seqlen), generator=torch.Generator().manual_seed(seed))


def _config(method: str, spec: str, **kwargs) -> SparsityConfig:
    if ":" in spec:
        return SparsityConfig(method=method, pattern=spec, **kwargs)
    return SparsityConfig(method=method, sparsity=float(spec), **kwargs)


def _block_linears(model) -> dict[str, torch.nn.Module]:
    prefix = find_decoder_blocks(model)[0] + "."
    return {n: m for n, m in model.named_modules() if is_sparse_layer(m) and n.startswith(prefix)}


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_only_targets_changed(model, before: dict[str, torch.Tensor], targets: set[str]) -> None:
    weights = {f"{name}.weight" for name in targets}
    for key, value in model.state_dict().items():
        if key not in weights:
            assert torch.equal(value, before[key]), f"{key} changed but is not a pruning target"


def _assert_pattern(weight: torch.Tensor, spec: str, method: str, name: str) -> None:
    numel = weight.numel()
    if ":" in spec:
        n, m = map(int, spec.split(":"))
        assert nm_violations(weight, n, m) == 0, name
        assert int((weight != 0).sum()) == numel * n // m, name  # random weights: exactly N kept, not fewer
    elif method == "sparsegpt":  # one adaptive threshold per block of 128 columns (one block at width <= 128)
        assert int((weight == 0).sum()) == int(numel * float(spec)), name
    else:
        per_row = (weight == 0).sum(1)
        assert torch.all(per_row == int(weight.shape[1] * float(spec))), name


CASES = [(arch, method, "2:4") for arch in ARCHS for method in METHODS]
CASES += [(arch, method, spec) for arch in ("llama", "gpt2") for method in METHODS for spec in ("4:8", "1:4", "0.5")]


@pytest.mark.parametrize("arch, method, spec", CASES)
def test_prune_gives_exact_pattern_on_every_target_only(tiny_model_factory, arch, method, spec):
    model = _model(tiny_model_factory, arch)
    ids = _ids(model)
    before = _state(model)
    report = prune(model, _config(method, spec), calibration=None if method == "magnitude" else ids)
    targets = _block_linears(model)
    assert [layer.name for layer in report.layers] == list(targets)
    for name, module in targets.items():
        _assert_pattern(out_in(module).detach(), spec, method, name)
    _assert_only_targets_changed(model, before, set(targets))  # embeddings, lm_head, norms, biases untouched
    assert torch.isfinite(model(ids).logits).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_captured_kwargs_replay_the_model(tiny_model_factory, arch):
    """Capture + replay of every block reproduces the model's own hidden states (transformers 5 kwargs)."""
    model = _model(tiny_model_factory, arch)
    ids = _ids(model, nsamples=3)
    _, blocks = find_decoder_blocks(model)
    with torch.no_grad():
        expected = model(ids, output_hidden_states=True).hidden_states
        batches = capture_inputs(model, blocks, ids)
        torch.testing.assert_close(torch.cat([b.hidden for b in batches]), expected[0])
        for index in range(len(blocks) - 1):  # the last hidden state has the final norm applied
            batches = forward_block(blocks[index], batches)
            torch.testing.assert_close(torch.cat([b.hidden for b in batches]), expected[index + 1])
    if arch == "llama":
        assert "position_embeddings" in batches[0].kwargs


def _slow_sequential(model, config: SparsityConfig, ids: torch.Tensor, dense_stats: bool = False):
    """Obviously-correct sequential pruning: for block k, run the *whole* model one sample at a time (blocks < k
    already pruned), hook each linear of block k separately, then prune them. Returns {name: weight}."""
    model = copy.deepcopy(model)
    source = copy.deepcopy(model) if dense_stats else model
    pruner = get_pruner(config.method)(config.options, config.sparsity_pattern)
    _, blocks = find_decoder_blocks(model)
    _, source_blocks = find_decoder_blocks(source)
    prefix = find_decoder_blocks(model)[0]
    for index in range(len(blocks)):
        names = {n: m for n, m in blocks[index].named_modules() if is_sparse_layer(m)}
        observed = dict(source_blocks[index].named_modules())
        stats = {n: pruner.new_stats(out_in(m).shape[1], torch.device("cpu")) for n, m in names.items()}
        hooks = [
            observed[n].register_forward_hook(lambda mod, a, o, s=stats[n]: pruner.accumulate(s, a[0])) for n in names
        ]
        with torch.no_grad():
            for sample in ids:
                source(sample.unsqueeze(0), use_cache=False)
        for hook in hooks:
            hook.remove()
        with torch.no_grad():
            for n, m in names.items():
                pruned = pruner.prune(out_in(m).detach().float(), stats[n]).weight
                out_in(m).copy_(pruned)
    return {
        f"{prefix}.{i}.{n}": out_in(m).detach()
        for i, b in enumerate(blocks)
        for n, m in b.named_modules()
        if is_sparse_layer(m)
    }


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_statistics_come_from_already_pruned_blocks(tiny_model_factory, method):
    model = tiny_model_factory("llama")
    ids = _ids(model, nsamples=6)
    config = _config(method, "2:4")
    expected = _slow_sequential(model, config, ids)
    from_dense = _slow_sequential(model, config, ids, dense_stats=True)
    prune(model, config, calibration=ids)
    got = {n: out_in(m).detach() for n, m in _block_linears(model).items()}
    assert got.keys() == expected.keys()
    for name in got:
        assert torch.equal(got[name] != 0, expected[name] != 0), name
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5)
    # the check can fail: statistics taken from the dense model give other masks in block 1
    assert any(not torch.equal(got[n] != 0, from_dense[n] != 0) for n in got if ".layers.1." in n)


def test_batching_does_not_change_the_result(tiny_model_factory, monkeypatch):
    model = tiny_model_factory("llama")
    one_by_one = copy.deepcopy(model)
    ids = _ids(model, nsamples=6)
    prune(model, _config("sparsegpt", "2:4"), calibration=ids)
    monkeypatch.setattr(engine, "_TOKENS_PER_BATCH", ids.shape[1])  # batches of one sample
    prune(one_by_one, _config("sparsegpt", "2:4"), calibration=ids)
    for (name, a), b in zip(_block_linears(model).items(), _block_linears(one_by_one).values(), strict=True):
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-4, atol=1e-5, msg=name)


def test_targets_and_ignore_select_modules(tiny_model_factory):
    model = tiny_model_factory("llama")
    before = _state(model)
    config = _config("wanda", "2:4", targets=[r"mlp\."], ignore=[r"layers\.1\.", "down_proj"])
    report = prune(model, config, calibration=_ids(model))
    assert [layer.name for layer in report.layers] == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    _assert_only_targets_changed(model, before, {layer.name for layer in report.layers})
    assert nm_violations(model.model.layers[0].mlp.up_proj.weight, 2, 4) == 0


def test_report(tiny_model_factory):
    model = tiny_model_factory("gpt2")
    report = prune(model, _config("wanda", "2:4"), calibration=_ids(model))
    data = json.loads(json.dumps(report.to_dict()))
    assert data["method"] == "wanda" and data["pattern"] == "2:4" and data["sparsity"] == pytest.approx(0.5)
    assert len(data["layers"]) == 8 and data["seconds"] > 0
    attn = data["layers"][0]
    assert attn["name"] == "transformer.h.0.attn.c_attn" and attn["shape"] == [192, 64]  # Conv1D seen as (out, in)
    assert all(0 < layer["error"] < 1 for layer in data["layers"])
    # data-free: calibration given or not, no forward pass runs (so no error is measured either)
    magnitude = prune(copy.deepcopy(model), _config("magnitude", "2:4"), calibration=_ids(model))
    assert isinstance(magnitude, PruneReport) and all(layer.error is None for layer in magnitude.layers)


def test_bf16_weights_are_pruned_and_kept_bf16(tiny_model_factory):
    model = tiny_model_factory("qwen2").to(torch.bfloat16)
    prune(model, _config("sparsegpt", "2:4"), calibration=_ids(model))
    for name, module in _block_linears(model).items():
        assert module.weight.dtype == torch.bfloat16
        assert nm_violations(module.weight, 2, 4) == 0, name


BAD_INPUTS = [
    (
        dict(method="wanda", pattern="1:3"),
        "ids",
        "model.layers.0.self_attn.q_proj: input width 64 is not divisible by M=3",
    ),
    (dict(method="wanda"), None, "needs calibration data"),
    (dict(method="sparsegpt"), torch.zeros(2, 8), "integer token ids"),
    (dict(method="wanda"), torch.full((2, 8), 10_000), r"must lie in \[0, 256\)"),
    (dict(method="magnitude", targets=["no_such_layer"]), None, "No Linear/Conv1D layer selected"),
    (dict(method="magnitude", ignore=["proj"]), None, "No Linear/Conv1D layer selected"),
    (dict(method="magnitude", targets=["lm_head"]), None, "Only layers inside the decoder blocks"),
    (dict(method="magnitude", targets=["(unclosed"]), None, "Invalid regular expression in targets"),
]


@pytest.mark.parametrize("kwargs, calibration, message", BAD_INPUTS)
def test_bad_input_fails_before_touching_the_model(tiny_model_factory, kwargs, calibration, message):
    model = tiny_model_factory("llama")
    before = _state(model)
    with pytest.raises(ValueError, match=message):
        prune(model, SparsityConfig(**kwargs), calibration=_ids(model) if calibration == "ids" else calibration)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="obs"), "Unknown pruning method 'obs'"),
        (dict(method="wanda", method_options={"variant": True}), "Unknown option"),
        (dict(method="sparsegpt", pattern="2:4", method_options={"blocksize": 6}), "not a multiple of M=4"),
        (dict(pattern="2:4", sparsity_scope="bogus"), "sparsity_scope must be one of"),
        (dict(nsamples=True), "nsamples must be a positive integer"),
        (dict(seed="x"), "seed must be a non-negative integer"),
    ],
)
def test_bad_config_fails_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SparsityConfig(**kwargs)


def test_unknown_architecture_is_named(tiny_model_factory):
    model = tiny_model_factory("llama")
    model.config.num_hidden_layers = 5
    with pytest.raises(ValueError, match="decoder blocks of model type 'llama'"):
        prune(model, SparsityConfig(method="magnitude"))


def test_target_without_calibration_input_falls_back_to_magnitude(tiny_model_factory, caplog):
    model = tiny_model_factory("llama")
    unused = model.model.layers[0].mlp.up_proj
    model.model.layers[0].mlp.forward = lambda x: model.model.layers[0].mlp.down_proj(x.repeat(1, 1, 2))  # skips up
    expected = magnitude_prune(unused.weight.detach().clone(), SparsityConfig().sparsity_pattern)[0]
    prune(model, _config("wanda", "2:4"), calibration=_ids(model))
    assert "model.layers.0.mlp.up_proj received no calibration input" in caplog.text
    assert torch.equal(unused.weight, expected)
