"""SPP: block-form forward == naive formula, merge keeps N:M exactly, unmerge restores W, training flows."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import get_peft_model
from peft_tiny_models import VOCAB, tiny_gpt2, tiny_llama, token_batch

from peft_sparse import SPPConfig
from peft_sparse.sparsity import follows_nm
from peft_sparse.tuners.spp import SPPLinear, spp_delta_blocked, spp_delta_naive, spp_multiplier


def _slow_spp_weight(weight: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Eq. 4 entry by entry: W'_ij = W_ij * alpha[i // (m/r), j] * beta_i."""
    m, n = weight.shape
    block = m // alpha.shape[0]
    out = torch.empty_like(weight)
    for i in range(m):
        for j in range(n):
            out[i, j] = weight[i, j] * alpha[i // block, j] * beta[i, 0]
    return out


def _proj_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2}


def test_blocked_forward_matches_slow_reference_values_and_grads():
    torch.manual_seed(0)
    weight = torch.randn(12, 8, dtype=torch.float64)
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    alpha = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(12, 1, dtype=torch.float64, requires_grad=True)
    reference = x.detach() @ _slow_spp_weight(weight, alpha.detach(), beta.detach()).T
    blocked = spp_delta_blocked(x, weight, alpha, beta)
    torch.testing.assert_close(blocked, reference)
    grads_blocked = torch.autograd.grad(blocked.square().sum(), (x, alpha, beta))
    grads_naive = torch.autograd.grad(spp_delta_naive(x, weight, alpha, beta).square().sum(), (x, alpha, beta))
    for got, want in zip(grads_blocked, grads_naive):
        torch.testing.assert_close(got, want)
    assert torch.autograd.gradcheck(lambda *t: spp_delta_blocked(t[0], weight, *t[1:]), (x, alpha, beta))
    trainable_weight = weight.clone().requires_grad_(True)  # a trainable base (AST + SPP) goes through it too
    assert torch.autograd.gradcheck(spp_delta_blocked, (x, trainable_weight, alpha, beta))


def test_blocked_backward_saves_no_per_block_activations():
    weight = torch.randn(64, 32)
    x = torch.randn(100, 32)
    alpha, beta = torch.randn(16, 32, requires_grad=True), torch.randn(64, 1, requires_grad=True)
    saved: list[int] = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        spp_delta_blocked(x, weight, alpha, beta)
    assert sum(saved) == x.numel() + weight.numel() + alpha.numel() + beta.numel()


def test_identity_at_init_and_disable_adapter():
    base = tiny_llama()
    ids = token_batch()
    reference = base(ids).logits
    model = get_peft_model(base, SPPConfig(r=8))
    torch.testing.assert_close(model(ids).logits, reference)
    model = get_peft_model(tiny_llama(), SPPConfig(r=8, init_weights=False))
    assert not torch.allclose(model(ids).logits, reference)
    with model.disable_adapter():
        torch.testing.assert_close(model(ids).logits, reference)


def test_default_targets_are_all_projections_and_only_adapters_train():
    model = get_peft_model(tiny_llama(), SPPConfig(r=8))
    adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, SPPLinear)}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".spp_alpha." in n or ".spp_beta." in n for n in trainable)


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2], ids=["linear", "conv1d"])
def test_merge_keeps_24_and_matches_forward_and_unmerge_restores(make_model):
    base = make_model()
    original = _proj_weights(base)
    model = get_peft_model(base, SPPConfig(r=4, init_weights=False, target_modules="all-linear"))
    ids = token_batch()
    unmerged_logits = model(ids).logits
    model.merge_adapter()
    torch.testing.assert_close(model(ids).logits, unmerged_logits, rtol=1e-5, atol=1e-5)
    for name, weight in _proj_weights(model.get_base_model()).items():
        key = name.replace("base_layer.", "")
        assert torch.equal(weight == 0, original[key] == 0), f"{name}: merge changed the zero pattern"
    model.unmerge_adapter()
    for name, weight in _proj_weights(model.get_base_model()).items():
        torch.testing.assert_close(weight, original[name.replace("base_layer.", "")], rtol=1e-6, atol=1e-7)
    merged = model.merge_and_unload()
    for name, module in merged.named_modules():
        if isinstance(module, torch.nn.Linear) and "proj" in name:
            assert follows_nm(module.weight, 2, 4), name


def test_two_adapters_merged_in_sequence_compound_and_unmerge_in_reverse():
    base = tiny_llama()
    original = base.model.layers[0].mlp.down_proj.weight.detach().clone()
    model = get_peft_model(base, SPPConfig(r=4, scaling=0.5, init_weights=False), adapter_name="a")
    model.add_adapter("b", SPPConfig(r=8, scaling=2.0, init_weights=False))
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    factors = [1 + s * _slow_spp_weight(torch.ones_like(original), layer.spp_alpha[n], layer.spp_beta[n]).detach()
               for n, s in (("a", 0.5), ("b", 2.0))]
    model.merge_adapter(adapter_names=["a", "b"])
    assert layer.merged_adapters == ["a", "b"]
    torch.testing.assert_close(layer.get_base_weight(), original * factors[0] * factors[1])
    model.unmerge_adapter()
    torch.testing.assert_close(layer.get_base_weight(), original, rtol=1e-6, atol=1e-7)
    assert layer.merged_adapters == []


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2], ids=["linear", "conv1d"])
def test_two_active_adapters_forward_compounds_like_merge_and_unload(make_model):
    model = get_peft_model(make_model(), SPPConfig(r=4, scaling=0.5, init_weights=False, target_modules="all-linear"),
                           adapter_name="a")
    torch.manual_seed(7)
    model.add_adapter("b", SPPConfig(r=8, scaling=2.0, init_weights=False, target_modules="all-linear"))
    with torch.no_grad():  # trained-sized multipliers, so that adding instead of compounding shows clearly
        for name, param in model.named_parameters():
            if ".spp_beta." in name:
                param.mul_(5.0)
    ids = token_batch()
    with torch.no_grad():
        only_a = model(ids).logits
        model.base_model.set_adapter(["a", "b"])
        both = model(ids).logits
    assert not torch.allclose(both, only_a, atol=1e-3), "the second adapter has no effect: the test cannot fail"
    merged = model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, both, rtol=1e-5, atol=1e-5)
    for name, module in merged.named_modules():
        if name.endswith(("proj", "c_attn", "c_fc")):
            weight = module.weight.T if make_model is tiny_gpt2 else module.weight
            assert follows_nm(weight, 2, 4), name


def test_compounded_forward_gradients_match_the_explicit_product():
    torch.manual_seed(0)
    layer = SPPLinear(torch.nn.Linear(16, 8, bias=False), "a", SPPConfig(r=2, scaling=0.5, init_weights=False))
    layer.update_layer("b", SPPConfig(r=4, scaling=2.0, init_weights=False))
    layer.set_adapter(["a", "b"])
    x = torch.randn(3, 16)
    params = [layer.spp_alpha["a"], layer.spp_beta["a"], layer.spp_alpha["b"], layer.spp_beta["b"]]
    got = torch.autograd.grad(layer(x).square().sum(), params)
    factor_a = 1 + 0.5 * spp_multiplier(params[0], params[1], 8)
    product = layer.get_base_weight() * factor_a * (1 + 2.0 * spp_multiplier(params[2], params[3], 8))
    want = torch.autograd.grad((x @ product.T).square().sum(), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_zero_merge_factor_is_reported_and_unmerge_stays_finite():
    layer = SPPLinear(torch.nn.Linear(8, 4, bias=False), "default", SPPConfig(r=1, init_weights=False))
    with torch.no_grad():
        layer.spp_alpha["default"].fill_(1.0)
        layer.spp_beta["default"][0] = -1.0  # row 0: 1 + s*alpha*beta == 0
    original = layer.get_base_weight().clone()
    with pytest.raises(ValueError, match="zeroes 8 non-zero weights"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.get_base_weight(), original) and not layer.merged
    with pytest.warns(UserWarning, match="unmerge cannot restore"):
        layer.merge()
    layer.unmerge()
    restored = layer.get_base_weight()
    assert torch.isfinite(restored).all() and torch.equal(restored[0], torch.zeros(8))
    torch.testing.assert_close(restored[1:], original[1:])


def test_bf16_merge_keeps_exact_pattern():
    base = tiny_llama().to(torch.bfloat16)
    zeros_before = {n: w == 0 for n, w in _proj_weights(base).items()}
    model = get_peft_model(base, SPPConfig(r=8, init_weights=False))
    logits = model(token_batch()).logits
    assert logits.dtype == torch.bfloat16 and model.base_model.model.model.layers[0].self_attn.q_proj.spp_alpha[
        "default"].dtype == torch.float32
    merged = model.merge_and_unload()
    for name, weight in _proj_weights(merged).items():
        assert weight.dtype == torch.bfloat16 and torch.equal(weight == 0, zeros_before[name]), name


def test_bad_values_are_rejected():
    with pytest.raises(ValueError, match="positive integer"):
        SPPConfig(r=0)
    with pytest.raises(ValueError, match="dropout"):
        SPPConfig(dropout=1.5)
    with pytest.raises(ValueError, match="must divide the output size m=64"):
        get_peft_model(tiny_llama(), SPPConfig(r=48))
    with pytest.raises(TypeError, match="supports torch.nn.Linear"):
        get_peft_model(tiny_llama(), SPPConfig(r=4, target_modules=["embed_tokens"]))


def _lm_dataset(n: int = 8, length: int = 16) -> list[dict[str, list[int]]]:
    ids = token_batch(seed=3, batch=n, length=length)
    return [{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids]


def test_trainer_with_gradient_checkpointing_trains_only_spp_and_stays_24(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(tiny_llama(), SPPConfig(r=8))
    frozen = _proj_weights(model.get_base_model())
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
        gradient_checkpointing=True, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(model=model, args=args, train_dataset=_lm_dataset()).train()
    layer = model.base_model.model.model.layers[1].mlp.up_proj
    assert layer.spp_beta["default"].abs().sum() > 0, "W_beta did not move"
    for name, weight in _proj_weights(model.get_base_model()).items():
        if "base_layer" in name:
            assert torch.equal(weight, frozen[name]), f"{name} should be frozen"
    merged = model.merge_and_unload()
    assert all(follows_nm(m.weight, 2, 4) for n, m in merged.named_modules() if n.endswith("proj"))


def test_sft_trainer_trains_spp(tmp_path):
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    words = [f"w{i}" for i in range(VOCAB - 2)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", "<eos>", *words])}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>"
    )
    texts = [" ".join(words[(7 * i + j) % len(words)] for j in range(12)) for i in range(8)]
    model = get_peft_model(tiny_llama(), SPPConfig(r=8))
    args = SFTConfig(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
        save_strategy="no", use_cpu=True, max_length=16, gradient_checkpointing=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts}),
                   processing_class=tokenizer).train()
    assert model.base_model.model.model.layers[0].self_attn.q_proj.spp_beta["default"].abs().sum() > 0
