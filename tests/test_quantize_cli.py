"""``peft-sparse prune --bits`` and ``peft-sparse quantize`` on a tiny saved model: the saved dense checkpoint holds
the library's quantized values bit for bit; bad input exits 2 before any output."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import PRUNE_ARGS, projection_weights, run
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_sparse import SparsityConfig, prune, quantize
from peft_sparse.data import load_calibration
from peft_sparse.modeling import out_in
from peft_sparse.quantization import codes_of, grid_of
from peft_sparse.sparsity import follows_nm


def _calibration(tiny_model_dir):
    return load_calibration(None, AutoTokenizer.from_pretrained(tiny_model_dir), nsamples=4, seqlen=64, seed=0)


def test_prune_with_bits_saves_the_quantized_model(tmp_path, capsys, tiny_model_dir):
    output = tmp_path / "q"
    code, out, _ = run(capsys, "prune", tiny_model_dir, "--method", "sparsegpt", *PRUNE_ARGS, "--bits", "4",
                       "--group-size", "32", "--output", output)
    assert code == 0, out
    expected = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = SparsityConfig(method="sparsegpt", nsamples=4, seqlen=64, bits=4, group_size=32)
    prune(expected, config, _calibration(tiny_model_dir))
    saved = projection_weights(AutoModelForCausalLM.from_pretrained(output))
    for name, module in expected.named_modules():
        if name in saved:
            assert torch.equal(saved[name], out_in(module)), name
            assert follows_nm(saved[name], 2, 4)
            codes_of(saved[name], *grid_of(module), config.scheme, name)
    report = json.loads((output / "prune_report.json").read_text())
    assert report["config"]["bits"] == 4 and report["config"]["group_size"] == 32
    assert report["method"] == "sparsegpt+joint"


def test_quantize_command_keeps_the_mask(tmp_path, capsys, tiny_model_dir):
    pruned, output = tmp_path / "p", tmp_path / "q"
    assert run(capsys, "prune", tiny_model_dir, "--method", "wanda", *PRUNE_ARGS, "--output", pruned)[0] == 0
    code, out, _ = run(capsys, "quantize", pruned, "--method", "gptq", "--bits", "8", "--group-size", "-1",
                       "--pattern", "2:4", *PRUNE_ARGS, "--output", output)
    assert code == 0, out
    expected = AutoModelForCausalLM.from_pretrained(pruned)
    config = SparsityConfig(pattern="2:4", nsamples=4, seqlen=64, bits=8, group_size=-1, quantizer="gptq")
    quantize(expected, config, _calibration(tiny_model_dir))
    saved = projection_weights(AutoModelForCausalLM.from_pretrained(output))
    for name, module in expected.named_modules():
        if name in saved:
            assert torch.equal(saved[name], out_in(module)), name
    assert json.loads((output / "quantize_report.json").read_text())["config"]["quantizer"] == "gptq"


@pytest.mark.parametrize("args, message", [
    (["--method", "gptq", "--bits", "4", "--pattern", "2:4", "--group-size", "48"], "not divisible by group_size=48"),
    (["--method", "gptq", "--bits", "4", "--pattern", "2:4", "--group-size", "32"], "is not 2:4 sparse"),
    (["--method", "gptq", "--bits", "4"], "carries no sparsity config"),
])
def test_bad_quantize_input_exits_2_without_output(tmp_path, capsys, tiny_model_dir, args, message):
    code, _, err = run(capsys, "quantize", tiny_model_dir, *args, "--output", tmp_path / "out")
    assert code == 2 and message in err
    assert not (tmp_path / "out").exists()


def test_bits_3_is_an_argparse_error(tmp_path, capsys, tiny_model_dir):
    with pytest.raises(SystemExit):
        run(capsys, "prune", tiny_model_dir, "--bits", "3", "--output", tmp_path / "out")
