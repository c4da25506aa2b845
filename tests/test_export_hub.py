"""push_to_hub through a local stub Hub (127.0.0.1): huggingface_hub's real upload and download code runs, the card
survives (one commit per push), and from_pretrained("user/repo") is bit-identical, for a pruned model, a PeftModel
with SPP / SLoRB adapters, a SparseTrainer run, and ``peft-sparse prune`` / ``export --push-to-hub``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hub_stub import serve

CLIENT = r"""
import sys, torch
from pathlib import Path
import peft_sparse
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM
from huggingface_hub import ModelCard
sys.path.insert(0, sys.argv[1])
from conftest import make_tiny_model
from test_training import TokenDataset, make_args

ids = torch.arange(1, 17).reshape(2, 8)
def same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)

model = make_tiny_model("llama", vocab_size=128)
peft_sparse.prune(model, peft_sparse.SparsityConfig(method="magnitude", pattern="2:4"))
peft_sparse.push_to_hub(model, "user/pruned", perplexity=peft_sparse.Perplexity(12.5, "wikitext2", "seqlen 512"))
back = AutoModelForCausalLM.from_pretrained("user/pruned")
assert same(back, model) and type(back.hf_quantizer).__name__ == "SparsityHfQuantizer"
card = ModelCard.load("user/pruned")
assert card.data.library_name == "transformers" and "sparsity:2:4" in card.data.tags, card.data
assert card.data.eval_results[0].metric_value == 12.5 and card.data.sparsity["codec"] == "b6x3"
assert "pip install peft_sparse" in card.text and "import peft_sparse" in card.text
assert 'AutoModelForCausalLM.from_pretrained("user/pruned")' in card.text
import tempfile
from peft_sparse.export.formats import linear_sizes
def local_sizes(model):  # the same save, measured locally
    with tempfile.TemporaryDirectory() as directory:
        peft_sparse.save_pretrained(model, directory)
        return linear_sizes(directory)
sizes = local_sizes(model)
assert card.data.sparsity["linears_bytes"] == sizes.nbytes > 0
assert f"{sizes.ratio_to_limit:.4f} x the information limit" in card.text and "quantization:" not in card.text

quantized = make_tiny_model("llama", vocab_size=128)
peft_sparse.prune(quantized, peft_sparse.SparsityConfig(method="magnitude", pattern="2:4", bits=4, group_size=16,
                                                        quantizer="rtn"))
peft_sparse.push_to_hub(quantized, "user/int4")
card = ModelCard.load("user/int4")
sizes = local_sizes(quantized)
assert card.data.sparsity["bits"] == 4 and card.data.sparsity["group_size"] == 16, card.data.sparsity
assert card.data.sparsity["ratio_to_information_limit"] == round(sizes.ratio_to_limit, 6) < 1.1
assert "quantization: int4 kept values, group size 16, symmetric, by rtn" in card.text, card.text

for name, config in (("spp", peft_sparse.SPPConfig(r=4)), ("slorb", peft_sparse.SLoRBConfig(k=16))):
    base = AutoModelForCausalLM.from_pretrained("user/pruned")
    adapted = get_peft_model(base, config)
    with torch.no_grad():
        for p in adapted.parameters():
            if p.requires_grad:
                p.add_(0.01)
    expected = adapted(ids).logits
    peft_sparse.push_to_hub(adapted, f"user/{name}")  # base_model: the base's own name, "user/pruned"
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("user/pruned"), f"user/{name}")
    assert torch.equal(reloaded(ids).logits, expected), name
    card = ModelCard.load(f"user/{name}")
    assert card.data.library_name == "peft" and card.data.base_model == "user/pruned" and name in card.data.tags
    assert 'from_pretrained("user/pruned")' in card.text and f'from_pretrained(base, "user/{name}")' in card.text

trainer = peft_sparse.SparseTrainer(model=make_tiny_model("llama", vocab_size=128),
                                    args=make_args(sys.argv[2], max_steps=2), train_dataset=TokenDataset())
trainer.train()
trainer.finalize()
peft_sparse.push_to_hub(trainer, "user/trained", format="packed")
back = AutoModelForCausalLM.from_pretrained("user/trained")
assert same(back, trainer.model)
card = ModelCard.load("user/trained")
assert "sparse-retraining" in card.data.tags and card.data.sparsity["method"] == "sparse_trainer"
from peft_sparse.cli import main as cli
local_dir, cli_out = sys.argv[3], Path(sys.argv[2]).parent / "cli"
assert cli(["prune", local_dir, "--method", "magnitude", "--pattern", "2:4", "--output", str(cli_out / "pruned"),
            "--save-format", "packed", "--push-to-hub", "user/cli-pruned"]) == 0
local = AutoModelForCausalLM.from_pretrained(cli_out / "pruned")
assert same(AutoModelForCausalLM.from_pretrained("user/cli-pruned"), local)
assert 'import peft_sparse' in ModelCard.load("user/cli-pruned").text
assert 'from_pretrained("user/cli-pruned")' in ModelCard.load("user/cli-pruned").text
assert cli(["export", str(cli_out / "pruned"), "--format", "dense", "--output", str(cli_out / "dense"),
            "--push-to-hub", "user/cli-dense"]) == 0
dense = AutoModelForCausalLM.from_pretrained("user/cli-dense")
assert same(dense, local) and getattr(dense.config, "quantization_config", None) is None
assert ModelCard.load("user/cli-dense").data.sparsity["format"] == "dense"
print("HUB OK")
"""


def test_push_to_hub_round_trips_through_a_stub_hub(tmp_path, tiny_model_dir):
    server, commits = serve(tmp_path / "hub")
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}", "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": "stub-token", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{tests.parent}{os.pathsep}{tests}"}
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("TRANSFORMERS_OFFLINE", None)
    try:
        run = subprocess.run([sys.executable, "-c", CLIENT, str(tests), str(tmp_path / "train"), str(tiny_model_dir)],
                             env=env,
                             capture_output=True, text=True, timeout=900, check=False)
    finally:
        server.shutdown()
    assert "HUB OK" in run.stdout, run.stdout[-3000:] + run.stderr[-5000:]
    assert dict(commits) == {"user/pruned": 1, "user/int4": 1, "user/spp": 1, "user/slorb": 1, "user/trained": 1,
                             "user/cli-pruned": 1, "user/cli-dense": 1}
