"""Every tuner case x every peft contract check: save/load, trainability on load, merging, several adapters,
disabling, delete and re-add, bf16 (in the spirit of peft's own list-of-cases test matrix)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft_tiny_models import tiny_gpt2, tiny_llama, token_batch
from torch import nn

from peft_sparse import SLoRBConfig, SPPConfig
from peft_sparse.modeling import out_in
from peft_sparse.sparsity import follows_nm


@dataclass(frozen=True)
class Case:
    name: str
    base: Callable[[], nn.Module]  # the model handed to peft
    config: Callable[[], PeftConfig]
    plain: Callable[[], nn.Module]  # the same model as the adapted layers see it (SLoRB prunes in place)

    @property
    def sparse_merge(self) -> bool:
        """SPP merges into the N:M weight; SLoRB only densifies, on request."""
        return isinstance(self.config(), SPPConfig)


def _dense_llama() -> nn.Module:
    return tiny_llama(pruned=False)


CASES = [
    Case("spp", tiny_llama, lambda: SPPConfig(r=8, init_weights=False), tiny_llama),
    Case("spp-naive", tiny_llama, lambda: SPPConfig(r=4, init_weights=False, memory_efficient=False), tiny_llama),
    Case("spp-conv1d", tiny_gpt2, lambda: SPPConfig(r=4, init_weights=False), tiny_gpt2),
    Case("slorb-mean", _dense_llama, lambda: SLoRBConfig(k=16), tiny_llama),
    Case("slorb-conv1d", tiny_gpt2, lambda: SLoRBConfig(k=16, target_modules=["c_attn", "c_fc"]), tiny_gpt2),
    Case("slorb-trainable-base", _dense_llama, lambda: SLoRBConfig(k=16, trainable_base=True), tiny_llama),
    Case("slorb-xavier-trainable-projection", _dense_llama,
         lambda: SLoRBConfig(k=16, init="xavier", trainable_projection=True), tiny_llama),
]
cases = pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])


def _perturb(model: nn.Module, adapter: str, seed: int) -> None:
    """Move the adapter's weights away from their (often output-preserving) init, like training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(f".{adapter}"):
                param.add_(torch.randn(param.shape, generator=generator).to(param.dtype) * 0.05)


def _make(case: Case) -> PeftModel:
    model = get_peft_model(case.base(), case.config()).eval()
    _perturb(model, "default", seed=0)
    return model


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(token_batch()).logits


def _trainable(model: nn.Module) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


def _adapted_names(model: PeftModel) -> list[str]:
    return [name for name, module in model.get_base_model().named_modules() if isinstance(module, BaseTunerLayer)]


def _assert_24(model: nn.Module, names: list[str]) -> None:
    for name in names:
        module = model.get_submodule(name)
        layer = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        assert follows_nm(out_in(layer), 2, 4), name


@cases
def test_save_load_round_trip(case, tmp_path):
    model = _make(case)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(case.base(), tmp_path)
    assert torch.equal(_logits(reloaded), _logits(model))


@cases
@pytest.mark.parametrize("is_trainable", [False, True])
def test_from_pretrained_sets_requires_grad(case, tmp_path, is_trainable):
    model = _make(case)
    expected = _trainable(model)
    assert expected
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(case.base(), tmp_path, is_trainable=is_trainable)
    assert _trainable(reloaded) == (expected if is_trainable else set())


@cases
def test_merge_unmerge_and_merge_and_unload(case):
    model = _make(case)
    names = _adapted_names(model)
    logits = _logits(model)
    if not case.sparse_merge:
        with pytest.raises(ValueError, match="allow_dense=True"):
            model.merge_adapter(safe_merge=True)
        with pytest.raises(ValueError, match="cannot be merged into an N:M weight"):
            model.merge_and_unload()
        dense = model.merge_and_unload(allow_dense=True, safe_merge=True)
        torch.testing.assert_close(_logits(dense), logits, rtol=1e-5, atol=1e-5)
        return
    weights = {name: out_in(model.get_base_model().get_submodule(name).get_base_layer()).clone()
               for name in names}
    model.merge_adapter(safe_merge=True)
    torch.testing.assert_close(_logits(model), logits, rtol=1e-5, atol=1e-5)
    _assert_24(model.get_base_model(), names)
    model.unmerge_adapter()
    for name, weight in weights.items():
        layer = model.get_base_model().get_submodule(name).get_base_layer()
        torch.testing.assert_close(out_in(layer), weight, rtol=1e-6, atol=1e-7)
    merged = model.merge_and_unload()
    torch.testing.assert_close(_logits(merged), logits, rtol=1e-5, atol=1e-5)
    _assert_24(merged, names)


@cases
def test_several_active_adapters_merge_to_the_same_outputs(case):
    model = _make(case)
    names = _adapted_names(model)
    single = _logits(model)
    model.add_adapter("other", case.config())
    _perturb(model, "other", seed=1)
    model.base_model.set_adapter(["default", "other"])
    both = _logits(model)
    assert not torch.allclose(both, single, atol=1e-4)
    merged = model.merge_and_unload() if case.sparse_merge else model.merge_and_unload(allow_dense=True)
    torch.testing.assert_close(_logits(merged), both, rtol=1e-5, atol=1e-5)
    if case.sparse_merge:
        _assert_24(merged, names)


@cases
def test_disable_adapter_gives_the_base_outputs(case):
    model = _make(case)
    assert not torch.allclose(_logits(model), _logits(case.plain()), atol=1e-4)
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model), _logits(case.plain()))
    assert not torch.allclose(_logits(model), _logits(case.plain()), atol=1e-4)


@cases
def test_delete_and_re_add_leaves_no_trace(case):
    model = _make(case)
    trainable = _trainable(model)
    model.add_adapter("other", case.config())
    model.set_adapter("other")
    model.delete_adapter("default")
    assert not any(name.endswith(".default") for name, _ in model.named_parameters())
    assert all("default" not in getattr(module, "base_masks", {}) for module in model.modules())
    model.add_adapter("default", case.config())
    model.set_adapter("default")
    model.delete_adapter("other")
    assert _trainable(model) == trainable
    hooks = [len(p._backward_hooks or {}) for name, p in model.named_parameters() if "base_layer" in name]
    assert max(hooks) <= 1


@cases
def test_bf16_forward_keeps_dtype(case):
    model = get_peft_model(case.base().to(torch.bfloat16), case.config())
    model(token_batch(), labels=token_batch()).loss.backward()
    assert _logits(model).dtype == torch.bfloat16
    for name in _adapted_names(model):
        assert model.get_base_model().get_submodule(name).get_base_layer().weight.dtype == torch.bfloat16, name
