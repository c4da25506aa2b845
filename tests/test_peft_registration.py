"""`import peft_sparse` makes SPP and SLORB first-class PEFT types: every save/load flow round-trips."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType
from peft_tiny_models import tiny_llama, token_batch

from peft_sparse import SLoRBConfig, SLoRBModel, SPPConfig, SPPModel
from peft_sparse.tuners._peft_types import add_peft_type, register_external_peft_method

CONFIGS = {
    "SPP": lambda: SPPConfig(r=8, init_weights=False, dropout=0.1, target_modules=["q_proj", "down_proj"]),
    "SLORB": lambda: SLoRBConfig(k=16, init="xavier", pattern="2:4"),
}


def test_types_are_real_enum_members_and_registered():
    for name, config_cls, model_cls in (("SPP", SPPConfig, SPPModel), ("SLORB", SLoRBConfig, SLoRBModel)):
        member = PeftType(name)
        assert member is PeftType[name] and member.value == name and member in list(PeftType)
        assert PEFT_TYPE_TO_CONFIG_MAPPING[name] is config_cls and PEFT_TYPE_TO_TUNER_MAPPING[member] is model_cls


def test_registration_is_idempotent_and_refuses_conflicts():
    register_external_peft_method("spp", config_cls=SPPConfig, model_cls=SPPModel, prefix="spp_")
    with pytest.raises(KeyError, match="already registered"):
        register_external_peft_method("spp", config_cls=SLoRBConfig, model_cls=SLoRBModel, prefix="slorb_")
    with pytest.raises(ValueError, match="upper-case"):
        add_peft_type("spp")


@pytest.mark.parametrize("peft_type", sorted(CONFIGS))
def test_save_load_round_trip(peft_type, tmp_path):
    ids = token_batch()
    model = get_peft_model(tiny_llama(pruned=False), CONFIGS[peft_type]()).eval()
    logits = model(ids).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == peft_type
    config = PeftConfig.from_pretrained(tmp_path)
    assert type(config) is type(model.peft_config["default"])
    runtime_keys = {"inference_mode", "auto_mapping"}  # set by save_pretrained itself
    assert {k: v for k, v in config.to_dict().items() if k not in runtime_keys} == {
        k: v for k, v in model.peft_config["default"].to_dict().items() if k not in runtime_keys
    }
    reloaded = PeftModel.from_pretrained(tiny_llama(pruned=False), tmp_path, is_trainable=True)
    assert reloaded.peft_config["default"].peft_type == peft_type
    assert any(p.requires_grad for p in reloaded.parameters())
    torch.testing.assert_close(reloaded.eval()(ids).logits, logits)
    lazy = PeftModel.from_pretrained(tiny_llama(pruned=False), tmp_path, low_cpu_mem_usage=True)
    torch.testing.assert_close(lazy(ids).logits, logits)


def test_named_adapters_load_adapter_and_switching(tmp_path):
    ids = token_batch()
    first = get_peft_model(tiny_llama(), CONFIGS["SPP"]()).eval()
    first.save_pretrained(tmp_path / "first")
    torch.manual_seed(5)
    second = get_peft_model(tiny_llama(), SPPConfig(r=4, init_weights=False)).eval()
    second.save_pretrained(tmp_path / "second")
    expected = {"first": first(ids).logits, "second": second(ids).logits}

    model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "first", adapter_name="first")
    model.load_adapter(tmp_path / "second", adapter_name="second")
    model.eval()
    for name in ("second", "first"):
        model.set_adapter(name)
        torch.testing.assert_close(model(ids).logits, expected[name])
    with model.disable_adapter():
        torch.testing.assert_close(model(ids).logits, tiny_llama()(ids).logits)

    hf_model = tiny_llama()  # transformers' own PeftAdapterMixin path
    hf_model.load_adapter(str(tmp_path / "second"), adapter_name="second")
    torch.testing.assert_close(hf_model(ids).logits, expected["second"])


def test_loading_without_import_fails_loudly(tmp_path):
    get_peft_model(tiny_llama(), CONFIGS["SPP"]()).save_pretrained(tmp_path)
    code = (
        "from peft import PeftConfig\n"
        f"PeftConfig.from_pretrained({str(tmp_path)!r})\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode != 0 and "KeyError: 'SPP'" in result.stderr
