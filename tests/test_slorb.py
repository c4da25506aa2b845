"""SLoRB: mean init keeps each group's dense mean, group-sum forward == explicit projection, merge refused."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft_tiny_models import tiny_llama, token_batch

from peft_sparse import SLoRBConfig, get_slorb_model
from peft_sparse.sparsity import follows_nm, nm_mask
from peft_sparse.tuners.slorb import SLoRBLinear, slorb_group_sum, slorb_mean_init

K = 16


def _dense_linear(seed: int = 0, n: int = 64, m: int = 32) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(n, m, bias=False)


def _slow_mean_init(weight: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    m, n = weight.shape
    S = torch.zeros(m, n // k)
    for i in range(m):
        for j in range(n // k):
            S[i, j] = sum(float(weight[i, p]) for p in range(j * k, (j + 1) * k) if not mask[i, p]) / k
    return S


def test_mean_init_matches_slow_reference_and_keeps_group_means():
    linear = _dense_linear()
    dense = linear.weight.detach().clone()
    mask = nm_mask(dense.abs(), 2, 4)
    layer = SLoRBLinear(linear, "default", SLoRBConfig(k=K))
    S = layer.slorb_S["default"].detach()
    torch.testing.assert_close(S, _slow_mean_init(dense, mask, K))
    pruned = layer.get_base_weight()
    assert torch.equal(pruned, dense * mask) and follows_nm(pruned, 2, 4)
    group_means = (pruned + S.repeat_interleave(K, dim=1)).unflatten(1, (-1, K)).mean(-1)
    torch.testing.assert_close(group_means, dense.unflatten(1, (-1, K)).mean(-1))


def test_forward_equals_explicit_projection_and_dense_on_group_constant_inputs():
    linear = _dense_linear()
    dense = linear.weight.detach().clone()
    layer = SLoRBLinear(linear, "default", SLoRBConfig(k=K))
    S = layer.slorb_S["default"].detach()
    P = torch.kron(torch.eye(64 // K), torch.ones(1, K))  # (n/k, n) block-ones projection
    x = torch.randn(3, 64)
    torch.testing.assert_close(slorb_group_sum(x, K), x @ P.T)
    torch.testing.assert_close(layer(x), x @ layer.get_base_weight().T + x @ P.T @ S.T)
    mean_layer = SLoRBLinear(_dense_linear(), "default", SLoRBConfig(k=K))
    constant = torch.randn(3, 64 // K).repeat_interleave(K, dim=1)
    torch.testing.assert_close(mean_layer(constant), constant @ dense.T, rtol=1e-5, atol=1e-5)


def test_zero_init_is_the_pruned_model_and_prune_base_false_keeps_dense():
    ids = token_batch()
    pruned = tiny_llama(pruned=True)
    reference = pruned(ids).logits
    config = SLoRBConfig(k=K, init="zero", target_modules=["q_proj", "up_proj"])
    model = get_peft_model(tiny_llama(pruned=False), config)
    for name in ("q_proj", "up_proj"):
        layer = getattr(model.base_model.model.model.layers[0], "self_attn" if name == "q_proj" else "mlp")
        assert follows_nm(getattr(layer, name).get_base_weight(), 2, 4)
    kept = get_peft_model(tiny_llama(pruned=False), SLoRBConfig(k=K, prune_base=False, target_modules=["q_proj"]))
    q = kept.base_model.model.model.layers[0].self_attn.q_proj
    assert torch.equal(q.get_base_weight(), tiny_llama(pruned=False).model.layers[0].self_attn.q_proj.weight)
    full = get_peft_model(tiny_llama(pruned=False), SLoRBConfig(k=K, init="zero"))
    torch.testing.assert_close(full(ids).logits, reference)


def test_explicit_masks_take_precedence_over_pattern():
    base = tiny_llama(pruned=False)
    dense = base.model.layers[1].mlp.down_proj.weight.detach().clone()
    mask = torch.rand(dense.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    model = get_slorb_model(
        base, SLoRBConfig(k=K, target_modules=["down_proj"]), masks={"model.layers.1.mlp.down_proj.weight": mask}
    )
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    torch.testing.assert_close(layer.slorb_S["default"].detach(), slorb_mean_init(dense, mask, K))
    assert torch.equal(layer.get_base_weight(), dense * mask)
    with pytest.raises(ValueError, match="mask has shape"):
        get_slorb_model(tiny_llama(pruned=False), SLoRBConfig(k=K, target_modules=["down_proj"]),
                        masks={"model.layers.0.mlp.down_proj": mask.T})


def test_merge_refused_unless_dense_is_asked_for():
    model = get_peft_model(tiny_llama(pruned=False), SLoRBConfig(k=K))
    ids = token_batch()
    logits = model(ids).logits
    with pytest.raises(ValueError, match="cannot be merged into an N:M weight"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="allow_dense=True"):
        model.merge_adapter()
    dense = model.merge_and_unload(allow_dense=True)
    torch.testing.assert_close(dense(ids).logits, logits, rtol=1e-5, atol=1e-5)
    assert not follows_nm(dense.model.layers[0].self_attn.q_proj.weight, 2, 4)


def test_extra_parameter_fraction_and_side_weights():
    for k in (16, 32, 64):
        model = get_peft_model(tiny_llama(pruned=False), SLoRBConfig(k=k))
        assert model.extra_parameter_fraction() == pytest.approx(1 / k)
        side = model.side_weights()
        S, got_k = side["model.layers.0.mlp.down_proj"]
        assert got_k == k and S.shape == (64, 128 // k) and len(side) == 14


def test_trainable_base_keeps_the_pattern_while_training_weights_and_S():
    model = get_peft_model(tiny_llama(pruned=False), SLoRBConfig(k=K, trainable_base=True))
    layer = model.base_model.model.model.layers[0].mlp.gate_proj
    before = layer.get_base_weight().clone()
    S_before = layer.slorb_S["default"].detach().clone()
    params = [p for p in model.parameters() if p.requires_grad]
    assert any(p is layer.get_base_layer().weight for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    ids = token_batch(batch=4, length=16)
    for _ in range(2):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = layer.get_base_weight()
    assert not torch.equal(after, before) and torch.equal(after == 0, before == 0)
    assert not torch.equal(layer.slorb_S["default"].detach(), S_before)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"k": 0}, "k must be an integer >= 2"), ({"k": 1}, "k must be"), ({"init": "sum"}, "init must be one of"),
     ({"pattern": "5:4"}, "Invalid N:M pattern"), ({"pattern": "two-four"}, "Cannot parse")],
)
def test_bad_config_values_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SLoRBConfig(**kwargs)


def test_k_must_divide_input_size():
    with pytest.raises(ValueError, match="k=48 must divide the input size n=64"):
        get_peft_model(tiny_llama(pruned=False), SLoRBConfig(k=48))


def _gate(model) -> SLoRBLinear:
    return model.base_model.model.model.layers[0].mlp.gate_proj


def _hook_count(weight: torch.Tensor) -> int:
    return len(weight._backward_hooks or {})


def test_trainable_base_keeps_one_hook_and_delete_cleans_masks_grad_and_hook():
    config = SLoRBConfig(k=K, trainable_base=True, target_modules=["gate_proj"])
    model = get_peft_model(tiny_llama(pruned=False), config)
    model.add_adapter("plain", SLoRBConfig(k=K, target_modules=["gate_proj"]))
    for _ in range(2):
        model.base_model._mark_only_adapters_as_trainable(model.base_model.model)
    layer = _gate(model)
    weight = layer.get_base_layer().weight
    assert weight.requires_grad and _hook_count(weight) == 1 and set(layer.base_masks) == {"default"}
    model.set_adapter("plain")
    assert not weight.requires_grad and _hook_count(weight) == 0
    model.set_adapter("default")
    assert weight.requires_grad and _hook_count(weight) == 1
    model.delete_adapter("default")
    assert model.active_adapters == ["plain"] and "default" not in layer.base_masks
    assert not weight.requires_grad and _hook_count(weight) == 0


@pytest.mark.parametrize("is_trainable", [False, True])
def test_trainable_base_follows_is_trainable_on_load(tmp_path, is_trainable):
    get_peft_model(tiny_llama(pruned=False), SLoRBConfig(k=K, trainable_base=True)).save_pretrained(tmp_path)
    model = PeftModel.from_pretrained(tiny_llama(pruned=False), tmp_path, is_trainable=is_trainable)
    weight = _gate(model).get_base_layer().weight
    assert weight.requires_grad is is_trainable and _hook_count(weight) == int(is_trainable)
    assert _gate(model).slorb_S["default"].requires_grad is is_trainable
    if is_trainable:
        model(token_batch(), labels=token_batch()).loss.backward()
        assert weight.grad is not None and not weight.grad[weight == 0].any()


@pytest.mark.parametrize(
    "kwargs, message",
    [({"k": 32}, "k=32 must divide the input size n=80"), ({"pattern": "2:32"}, "needs M=32 to divide")],
    ids=["k", "pattern"],
)
def test_bad_later_target_fails_before_any_weight_changes(kwargs, message):
    base = tiny_llama(pruned=False, intermediate_size=80)  # down_proj has 80 inputs, every other target 64
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    with pytest.raises(ValueError, match=message) as error:
        get_peft_model(base, SLoRBConfig(**{"k": K, **kwargs}))
    assert "model.layers.0.mlp.down_proj" in str(error.value) and "exclude_modules" in str(error.value)
    after = dict(base.named_parameters())
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)
    excluded = get_peft_model(base, SLoRBConfig(**{"k": K, **kwargs}, exclude_modules=["down_proj"]))
    assert follows_nm(_gate(excluded).get_base_weight(), 2, 4)


def test_xavier_goes_on_a_stored_projection_and_leaves_the_output_unchanged():
    ids = token_batch()
    reference = tiny_llama(pruned=True)(ids).logits
    model = get_peft_model(tiny_llama(pruned=False), SLoRBConfig(k=K, init="xavier"))
    assert torch.equal(model(ids).logits, reference)
    layer = _gate(model)
    X, S = layer.slorb_X["default"], layer.slorb_S["default"]
    bound = (6 / (64 // K + 64)) ** 0.5  # xavier_uniform on (n/k, n)
    assert X.shape == (64 // K, 64) and X.abs().max() <= bound and X.std() > bound / 4
    assert torch.equal(S, torch.zeros_like(S)) and S.requires_grad and not X.requires_grad
    model.set_adapter("default")  # peft's re-activation must not unfreeze X
    assert not X.requires_grad
    model(ids, labels=ids).loss.backward()
    assert S.grad.abs().sum() > 0


def test_trainable_projection_starts_as_block_ones_and_trains():
    ids = token_batch(batch=4, length=16)
    fixed = get_peft_model(tiny_llama(pruned=False), SLoRBConfig(k=K))
    model = get_peft_model(tiny_llama(pruned=False), SLoRBConfig(k=K, trainable_projection=True))
    X = _gate(model).slorb_X["default"]
    assert X.requires_grad and torch.equal(X, torch.kron(torch.eye(64 // K), torch.ones(1, K)))
    assert "default" not in _gate(fixed).slorb_X
    torch.testing.assert_close(model(ids).logits, fixed(ids).logits)
    before = X.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    assert not torch.equal(X.detach(), before)


def test_trainable_projection_parameter_cost_on_a_576_layer():
    class OneLayer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(576, 576, bias=False)

    for trainable, fraction in ((False, 1 / 16), (True, 2 / 16)):
        model = get_peft_model(OneLayer(), SLoRBConfig(k=16, trainable_projection=trainable, target_modules=["proj"]))
        layer = model.base_model.model.proj
        assert layer.slorb_S["default"].numel() == 20_736
        assert sum(p.numel() for p in layer.slorb_X.values()) == (20_736 if trainable else 0)
        assert model.extra_parameter_fraction() == fraction


def _randomise_adapters(model, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".slorb_" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)


@pytest.mark.parametrize("init", ["mean", "xavier"])
def test_dense_merge_with_a_stored_projection_uses_S_times_X(init):
    ids = token_batch()
    model = get_peft_model(tiny_llama(pruned=False), SLoRBConfig(k=K, init=init, trainable_projection=True))
    _randomise_adapters(model)
    layer = _gate(model)
    expected = layer.get_base_weight() + layer.slorb_S["default"].detach() @ layer.slorb_X["default"].detach()
    logits = model(ids).logits
    with pytest.raises(ValueError, match="stores its projection X"):
        model.side_weights()
    dense = model.merge_and_unload(allow_dense=True)
    torch.testing.assert_close(dense.model.layers[0].mlp.gate_proj.weight, expected)
    torch.testing.assert_close(dense(ids).logits, logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("trainable_projection", [False, True])
def test_stored_projection_round_trips_through_save_and_load(tmp_path, trainable_projection):
    ids = token_batch()
    model = get_peft_model(tiny_llama(pruned=False), SLoRBConfig(k=K, init="xavier",
                                                                 trainable_projection=trainable_projection))
    _randomise_adapters(model)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_llama(pruned=False), tmp_path, is_trainable=True)
    assert torch.equal(_gate(reloaded).slorb_X["default"], _gate(model).slorb_X["default"])
    assert _gate(reloaded).slorb_X["default"].requires_grad is trainable_projection
    assert torch.equal(reloaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("init", ["mean", "zero"])
def test_saved_adapter_passes_check_adapter_on_a_meta_skeleton(tmp_path, init):
    """``peft-sparse eval --adapter`` attaches the adapter to a meta copy first: the mean init must not read data."""
    from peft_sparse.models import check_adapter

    model = get_peft_model(tiny_llama(pruned=False), SLoRBConfig(k=K, init=init))
    model.save_pretrained(tmp_path)
    check_adapter(tmp_path, model.get_base_model().config)  # raises on any mismatch
    with torch.device("meta"):
        S = _gate(get_peft_model(tiny_llama(pruned=False), SLoRBConfig(k=K, init=init))).slorb_S["default"]
    assert S.is_meta and S.shape == _gate(model).slorb_S["default"].shape
