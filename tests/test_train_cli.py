"""``peft-sparse train`` end to end on a tiny saved model, its config file, its refusals; the CLI's error policy."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_sparse.cli import main
from peft_sparse.sparsity import follows_nm

QUICK = ["--seqlen", "32", "--per_device_train_batch_size", "2", "--learning_rate", "1e-2", "--srste_decay", "1e-2",
         "--mask_update_interval", "2", "--logging_steps", "1", "--save_strategy", "no", "--use_cpu",
         "--disable_tqdm", "true"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def block_linears(model) -> dict[str, torch.Tensor]:
    return {n: m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}


def test_train_writes_an_exactly_nm_model_with_tokenizer_log_and_plot(tmp_path, capsys, tiny_model_dir):
    output = tmp_path / "ast"
    code, out, _ = run(capsys, "train", "--model", tiny_model_dir, "--max_steps", "5", *QUICK, "--output_dir", output)
    assert code == 0 and str(output) in out and "2:4" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ast"]  # no staging directory left behind
    model = AutoModelForCausalLM.from_pretrained(output)
    weights = block_linears(model)
    assert len(weights) == 14 and all(follows_nm(w, 2, 4) for w in weights.values())
    dense = block_linears(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    assert any(not torch.equal(w, dense[n] * (w != 0)) for n, w in weights.items())  # weights were trained
    assert AutoTokenizer.from_pretrained(output)("for x in y").input_ids
    log = json.loads((output / "train_log.json").read_text())
    assert [row["step"] for row in log if "flip_rate" in row] == [3, 5]
    assert (output / "flip_rates.png").read_bytes()[:4] == b"\x89PNG"
    assert not (output / "sparse_state.safetensors").exists()  # finalized: nothing left to resume


def test_train_reads_a_yaml_config_that_options_override_and_can_prune_first(tmp_path, capsys, tiny_model_dir):
    config = tmp_path / "ast.yaml"
    config.write_text(f"model: {tiny_model_dir}\nmax_steps: 4\nseqlen: 32\nper_device_train_batch_size: 2\n"
                      "mask_update_interval: 2\nlogging_steps: 1\nsave_strategy: 'no'\nuse_cpu: true\n"
                      "disable_tqdm: true\nprune: wanda\nteacher: false\n")
    output = tmp_path / "out"
    code, _, err = run(capsys, "train", "--config", config, "--max_steps", "2", "--output_dir", output)
    assert code == 0, err
    log = json.loads((output / "train_log.json").read_text())
    assert max(row["step"] for row in log) == 2  # the command line wins over the file
    assert not (output / "flip_rates.png").exists()  # no mask update in two steps: nothing to plot
    assert all(follows_nm(w, 2, 4) for w in block_linears(AutoModelForCausalLM.from_pretrained(output)).values())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--pattern", "2:x"], "Cannot parse sparsity pattern"),
        (["--data", "missing/text.txt"], "does not exist"),
        (["--max_steps", "-1"], "Give --max_steps or --windows"),
        (["--srste_placement", "adam"], "srste_placement='adam' is not supported"),
    ],
)
def test_bad_train_input_exits_2_before_loading(tmp_path, capsys, monkeypatch, args, message):
    from peft_sparse import cli

    monkeypatch.setattr(cli, "load_model", None)  # the model must not be loaded
    code, _, err = run(capsys, "train", "--model", "x", *args, "--output_dir", tmp_path / "out")
    assert code == 2 and err.strip().splitlines()[-1].startswith("peft-sparse train: error: ") and message in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_train_refuses_a_non_empty_output_and_unknown_config_keys(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("x")
    code, _, err = run(capsys, "train", "--model", "x", "--output_dir", taken)
    assert code == 2 and "not empty" in err and "--overwrite" in err and (taken / "keep.txt").exists()
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"model": "x", "max_stpes": 3}))
    code, _, err = run(capsys, "train", "--config", config, "--output_dir", tmp_path / "o")
    assert code == 2 and "Unknown option(s) in the config file: ['max_stpes']" in err


def test_verbose_prints_the_traceback_of_a_user_error(tmp_path, capsys):
    code, _, err = run(capsys, "-v", "eval", tmp_path / "no-such-model")
    assert code == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("peft-sparse eval: error:")


def test_a_library_bug_is_not_reported_as_a_user_error(tmp_path, capsys, tiny_model_dir, monkeypatch):
    import peft_sparse

    def broken(*args, **kwargs):
        raise ValueError("internal shape mismatch")

    monkeypatch.setattr(peft_sparse, "prune", broken)
    with pytest.raises(ValueError, match="internal shape mismatch"):
        main(["prune", str(tiny_model_dir), "--method", "magnitude", "--output", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_import_and_help_do_not_load_trainer_datasets_or_trl():
    probe = (
        "import sys, contextlib, io\n"
        "import peft_sparse\n"
        "heavy = ('transformers.trainer', 'datasets', 'trl')\n"
        "after_import = [m for m in heavy if m in sys.modules]\n"
        "from peft_sparse.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"
        "print([m for m in heavy if m in sys.modules], after_import)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=600, check=True)
    assert result.stdout.strip() == "[] []"
