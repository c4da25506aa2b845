"""``peft-sparse`` end to end on a tiny saved model: outputs load in plain transformers, bad input exits 2 cleanly."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_sparse import SparsityConfig, prune
from peft_sparse.cli import main
from peft_sparse.data import load_calibration
from peft_sparse.evaluation import perplexity
from peft_sparse.sparsity import follows_nm

PRUNE_ARGS = ["--nsamples", "4", "--seqlen", "64"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def projection_weights(model):
    return {
        name: module.weight
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and ".layers." in name
    }


def test_prune_writes_a_plain_checkpoint_equal_to_the_library_result(tmp_path, capsys, tiny_model_dir):
    output = tmp_path / "pruned"
    code, out, _ = run(capsys, "prune", tiny_model_dir, "--method", "wanda", "--pattern", "2:4", *PRUNE_ARGS,
                       "--seed", "1", "--output", output)
    assert code == 0 and str(output) in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]  # no staging directory left behind

    saved = AutoModelForCausalLM.from_pretrained(output)
    weights = projection_weights(saved)
    assert len(weights) == 14 and all(follows_nm(w, 2, 4) for w in weights.values())
    assert all((w == 0).sum().item() == w.numel() // 2 for w in weights.values())

    expected = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    calibration = load_calibration(None, tokenizer, nsamples=4, seqlen=64, seed=1)
    prune(expected, SparsityConfig(method="wanda", pattern="2:4", nsamples=4, seqlen=64, seed=1), calibration)
    reference = expected.state_dict()
    assert all(torch.equal(tensor, reference[name]) for name, tensor in saved.state_dict().items())

    report = json.loads((output / "prune_report.json").read_text())
    assert report["config"]["method"] == "wanda" and report["calibration"] == "embedded"
    assert AutoTokenizer.from_pretrained(output)("for loop").input_ids == tokenizer("for loop").input_ids


def test_overwrite_replaces_only_when_asked(tmp_path, capsys, tiny_model_dir):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("precious")
    args = ["prune", tiny_model_dir, "--method", "magnitude", "--output", output]
    code, _, err = run(capsys, *args)
    assert code == 2 and "not empty" in err and "--overwrite" in err
    assert [p.name for p in output.iterdir()] == ["keep.txt"]
    assert run(capsys, *args, "--overwrite")[0] == 0
    assert not (output / "keep.txt").exists() and (output / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failure_while_saving_leaves_no_output(tmp_path, capsys, tiny_model_dir, monkeypatch):
    from peft_sparse import cli

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(cli, "write_json", broken)
    with pytest.raises(OSError, match="disk full"):
        main(["prune", str(tiny_model_dir), "--method", "magnitude", "--output", str(tmp_path / "out")])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--pattern", "3:5"], "not divisible by M=5"),
        (["--pattern", "2:4", "--sparsity", "0.5"], "not both"),
        (["--pattern", "4:2"], "0 < N < M"),
        (["--calibration", "missing/calib.txt"], "does not exist"),
        (["--calibration", "pile"], "Unknown calibration source"),
        (["--option", "blocksize=7"], "Unknown option"),
        (["--targets", "lm_head"], "decoder blocks"),
    ],
)
def test_bad_prune_input_exits_2_without_output(tmp_path, capsys, tiny_model_dir, args, message):
    code, _, err = run(capsys, "prune", tiny_model_dir, *PRUNE_ARGS, *args, "--output", tmp_path / "out")
    last = err.strip().splitlines()[-1]  # earlier stderr lines are transformers' progress bars
    assert code == 2 and last.startswith("peft-sparse prune: error: ") and message in last
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []


def test_missing_and_unsupported_models_exit_2(tmp_path, capsys):
    from transformers import ViTConfig

    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "weights.bin").write_bytes(b"\0")
    ViTConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path / "vit")
    for model, message in [
        (tmp_path / "nope", "no such directory"),
        (empty, "no config.json"),
        (tmp_path / "weights.bin", "is a file"),
        (tmp_path / "vit", "'vit' model, which has no causal language-model head"),
    ]:
        code, _, err = run(capsys, "prune", model, "--method", "magnitude", "--output", tmp_path / "out")
        assert code == 2 and message in err
    assert not (tmp_path / "out").exists()



def error_line(err: str) -> str:
    """The CLI's one error line: the last stderr line (earlier ones are transformers' logs and progress bars)."""
    lines = err.strip().splitlines()
    assert [line for line in lines if line.startswith("peft-sparse ")] == lines[-1:]
    return lines[-1]


def test_encoder_model_is_refused_without_output(tmp_path, capsys):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=320, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(tmp_path / "bert")
    code, _, err = run(capsys, "prune", tmp_path / "bert", "--method", "magnitude", "--output", tmp_path / "out")
    line = error_line(err)
    assert code == 2 and line.startswith("peft-sparse prune: error: ")
    assert "'bert' encoder" in line and "peft_sparse prunes decoder-only causal LMs" in line
    assert not (tmp_path / "out").exists()


def test_checkpoint_missing_a_weight_is_refused_without_output(tmp_path, capsys, tiny_model_dir):
    import shutil

    from safetensors.torch import load_file, save_file

    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_model_dir, damaged)
    tensors = load_file(damaged / "model.safetensors")
    del tensors["model.layers.0.self_attn.q_proj.weight"]
    save_file(tensors, damaged / "model.safetensors", metadata={"format": "pt"})
    code, _, err = run(capsys, "prune", damaged, "--method", "magnitude", "--output", tmp_path / "out")
    line = error_line(err)
    assert code == 2 and "missing from the checkpoint: model.layers.0.self_attn.q_proj.weight" in line
    assert "Use a complete checkpoint of a decoder-only causal LM" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["./my-model", "../ckpt", "~/no-such-peft-sparse-model", "runs/1/hf", "my model"])
def test_missing_local_path_says_no_such_directory(tmp_path, capsys, monkeypatch, name):
    from peft_sparse import models

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(models, "AutoConfig", None)  # the Hub must not be asked
    code, _, err = run(capsys, "eval", name)
    assert code == 2 and error_line(err).startswith(f"peft-sparse eval: error: no such directory: {name!r}")
    assert list(tmp_path.iterdir()) == []

def test_unknown_method_is_an_argparse_error(tmp_path, capsys, tiny_model_dir):
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", str(tiny_model_dir), "--method", "obs", "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "invalid choice: 'obs'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_eval_prints_and_writes_json(tmp_path, capsys, tiny_model_dir):
    text = tmp_path / "eval.txt"
    text.write_text(" ".join(["the quick brown fox jumps over the lazy dog"] * 60))
    output = tmp_path / "result.json"
    code, out, _ = run(capsys, "eval", tiny_model_dir, "--data", text, "--seqlen", "64", "--max-windows", "3",
                       "--output", output)
    result = json.loads(output.read_text())
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    expected = perplexity(model, AutoTokenizer.from_pretrained(tiny_model_dir), str(text), 64, 3, progress=False)
    assert code == 0 and result["windows"] == 3 and result["ppl"] == pytest.approx(expected.ppl, rel=1e-6)
    assert f"ppl {expected.ppl:.4f}" in out


def test_eval_bad_data_exits_2(tmp_path, capsys, tiny_model_dir):
    code, _, err = run(capsys, "eval", tiny_model_dir, "--data", tmp_path / "missing.raw")
    assert code == 2 and "does not exist" in err


@pytest.mark.smollm2
def test_demo_runs_offline_and_reports_dense_then_sparse(tmp_path, capsys, smollm2):
    output = tmp_path / "demo.json"
    code, out, _ = run(capsys, "demo", "--nsamples", "2", "--seqlen", "128", "--max-windows", "2",
                       "--output", output)
    result = json.loads(output.read_text())
    model, tokenizer = smollm2
    dense = perplexity(model, tokenizer, "embedded", seqlen=128, max_windows=2, progress=False)
    assert code == 0 and "2:4 wanda" in out
    assert result["dense"]["ppl"] == pytest.approx(dense.ppl, rel=1e-5)
    assert math.isfinite(result["sparse"]["ppl"]) and result["sparse"]["ppl"] > result["dense"]["ppl"]
    assert 0.5 <= result["report"]["sparsity"] < 0.501  # Q4 GGUF weights already hold a few exact zeros
