"""bench/zeroshot.py's checkpoint rows and result merging: the parts of the benchmark with logic of their own."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model

import peft_sparse

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def zeroshot():
    spec = importlib.util.spec_from_file_location("bench_zeroshot", REPO_ROOT / "bench" / "zeroshot.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the string annotations through it
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_checkpoint_spec_parses_name_dir_and_adapter(zeroshot):
    parse = zeroshot.Checkpoint.parse
    assert parse("AST frozen=/tmp/a") == zeroshot.Checkpoint("AST frozen", Path("/tmp/a"), None)
    assert parse("boost=/tmp/b,adapter=/tmp/b/slorb") == zeroshot.Checkpoint("boost", Path("/tmp/b"),
                                                                            Path("/tmp/b/slorb"))


@pytest.mark.parametrize("spec", ["/tmp/a", "=/tmp/a", "x=", "x=/tmp/a,lora=/tmp/l", "x=/tmp/a,adapter=",
                                  "x=/tmp/a,adapter=/p,adapter=/q"])
def test_checkpoint_spec_refuses_malformed(zeroshot, spec):
    with pytest.raises(ValueError, match="NAME=DIR"):
        zeroshot.Checkpoint.parse(spec)


def test_checkpoint_check_refuses_missing_model_and_foreign_adapter(zeroshot, tmp_path, tiny_model_dir):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        zeroshot.Checkpoint("x", tmp_path).check()
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter"):
        zeroshot.Checkpoint("x", tiny_model_dir, tmp_path).check()


def test_checkpoint_loads_model_and_adapter_as_saved(zeroshot, tmp_path, tiny_model_dir, tiny_tokenizer):
    """A saved base + SPP adapter row computes the logits of the in-memory PeftModel that was saved."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    peft_sparse.prune(base, peft_sparse.SparsityConfig(method="magnitude", pattern="2:4"))
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, peft_sparse.SPPConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for name, parameter in model.named_parameters():  # away from the identity init, so the adapter matters
        if parameter.requires_grad:
            parameter.data.normal_(generator=torch.Generator().manual_seed(len(name)))
    model.save_pretrained(tmp_path / "spp")
    checkpoint = zeroshot.Checkpoint.parse(f"row={tmp_path / 'base'},adapter={tmp_path / 'spp'}")
    checkpoint.check()
    loaded, tokenizer = checkpoint.load(tiny_tokenizer)
    assert tokenizer is tiny_tokenizer  # base/ has no tokenizer files: the benchmark's is used
    ids = torch.randint(0, len(tiny_tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected, got = model.eval()(input_ids=ids).logits, loaded(input_ids=ids).logits
        without = zeroshot.Checkpoint("row", tmp_path / "base").load(tiny_tokenizer)[0](input_ids=ids).logits
    assert torch.equal(got, expected)
    assert not torch.allclose(got, without)  # the adapter was applied


def _report(limit: int, rows: list[dict]) -> dict:
    return {"protocol": {"tasks": ("boolq", "rte"), "limit": limit}, "machine": {"threads": 2}, "rows": rows}


def _as_read_back(report: dict) -> dict:
    return json.loads(json.dumps(report))


def test_append_keeps_rows_with_their_machine_and_replaces_by_name(zeroshot):
    previous = _report(50, [{"row": "dense", "mean_acc": 0.1}, {"row": "wanda", "mean_acc": 0.2,
                                                                 "machine": {"threads": 1}}])
    rows = zeroshot.merge_rows(_as_read_back(previous), _report(50, []))
    assert rows == [{"row": "dense", "mean_acc": 0.1, "machine": {"threads": 2}},
                    {"row": "wanda", "mean_acc": 0.2, "machine": {"threads": 1}}]
    zeroshot.put_row(rows, {"row": "dense", "mean_acc": 0.3})
    zeroshot.put_row(rows, {"row": "sparsegpt", "mean_acc": 0.4})
    assert [(r["row"], r["mean_acc"]) for r in rows] == [("dense", 0.3), ("wanda", 0.2), ("sparsegpt", 0.4)]


def test_append_refuses_another_protocol(zeroshot):
    with pytest.raises(ValueError, match="limit differ"):
        zeroshot.merge_rows(_as_read_back(_report(50, [])), _report(20, []))
