"""One loader for every subcommand: a tokenizer only where data needs one, the same one-line errors everywhere."""

from __future__ import annotations

import shutil

import huggingface_hub.constants
import pytest
from test_cli import error_line, run

from peft_sparse.models import TOKENIZER_FILES
from peft_sparse.sparsity import follows_nm


@pytest.fixture
def no_tokenizer_dir(tmp_path, tiny_model_dir):
    """The tiny Llama checkpoint without its tokenizer files."""
    directory = tmp_path / "weights-only"
    shutil.copytree(tiny_model_dir, directory)
    removed = [path for path in directory.iterdir() if path.name in TOKENIZER_FILES or "token" in path.name]
    for path in removed:
        path.unlink()
    assert removed and (directory / "config.json").is_file()
    return directory


def test_data_free_prune_needs_no_tokenizer(tmp_path, capsys, no_tokenizer_dir):
    from transformers import AutoModelForCausalLM

    code, _, err = run(capsys, "prune", no_tokenizer_dir, "--method", "magnitude", "--output", tmp_path / "out")
    assert code == 0, err
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert follows_nm(model.model.layers[0].mlp.up_proj.weight, 2, 4)
    assert not any(path.name in TOKENIZER_FILES for path in (tmp_path / "out").iterdir())


def test_data_driven_prune_names_the_directory_and_the_flag(tmp_path, capsys, no_tokenizer_dir, tiny_model_dir):
    out = tmp_path / "out"
    code, _, err = run(capsys, "prune", no_tokenizer_dir, "--method", "wanda", "--nsamples", "2", "--seqlen", "32",
                       "--output", out)
    line = error_line(err)
    assert code == 2 and line.startswith("peft-sparse prune: error: ")
    assert f"{str(no_tokenizer_dir)!r} has no tokenizer files" in line and "--tokenizer" in line
    assert "wanda calibration" in line and not out.exists()
    code, _, err = run(capsys, "prune", no_tokenizer_dir, "--method", "wanda", "--nsamples", "2", "--seqlen", "32",
                       "--tokenizer", tiny_model_dir, "--output", out)
    assert code == 0, err
    assert (out / "tokenizer.json").is_file()  # the tokenizer it was calibrated with goes with the model


def test_eval_without_tokenizer_names_the_flag(capsys, no_tokenizer_dir):
    code, _, err = run(capsys, "eval", no_tokenizer_dir)
    assert code == 2 and "has no tokenizer files" in error_line(err) and "evaluation" in error_line(err)


@pytest.mark.parametrize("command", [["export", "--format", "dense"], ["prune", "--method", "magnitude"],
                                     ["eval"]])
def test_missing_hub_shaped_model_exits_2_with_one_line_in_every_subcommand(tmp_path, capsys, monkeypatch, command):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the Hub must not be asked
    name, extra = command[0], command[1:]
    output = ["--output", str(tmp_path / "out")] if name != "eval" else []
    code, _, err = run(capsys, name, "no-such-org/no-such-model", *extra, *output)
    line = error_line(err)
    assert code == 2 and line.startswith(f"peft-sparse {name}: error: Could not load model 'no-such-org/no-such-model'")
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_export_of_a_missing_local_path_says_so(tmp_path, capsys):
    code, _, err = run(capsys, "export", tmp_path / "nope", "--format", "dense", "--output", tmp_path / "out")
    assert code == 2 and "no such directory" in error_line(err)
