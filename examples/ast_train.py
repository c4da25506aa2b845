"""Retrain SmolLM2-135M into a 2:4 sparse model with AST (Adaptive Sparse Training), the dense model as teacher.

    python examples/ast_train.py --mode naive   --start sparsegpt --steps 40 --output-dir out/ast-naive
    python examples/ast_train.py --mode boosted --start sparsegpt --steps 40 --output-dir out/ast-boosted  # SLoRB k=16
    python examples/ast_train.py --mode frozen  --start sparsegpt ...   # Wanda-style baseline: fixed mask
    python examples/ast_train.py --mode static  --start magnitude ...   # SR-STE with a constant decay (ablation)

``--start magnitude`` is the paper's start (dense weights, magnitude mask); ``--start sparsegpt`` starts from the
SparseGPT 2:4 model (pruned weights restart at zero), which is far better when the token budget is small (see the
AST results in README). ``--data`` takes a local .jsonl/.txt file or ``c4`` (Hub). The output directory holds a
plain transformers model whose linears are exactly 2:4 (plus a ``slorb/`` adapter for ``--mode boosted``) and
``flips.png``.
"""

from __future__ import annotations

import argparse
import copy
import logging

from peft_sparse import SparseTrainer, SparseTrainingArguments, SparsityConfig, plot_flip_rates, prune
from peft_sparse.data import load_calibration
from peft_sparse.evaluation import perplexity
from peft_sparse.models import smollm2
from peft_sparse.training import TokenWindowDataset

C4 = "/work/shared/data/c4/c4-train.00000-of-01024.first1000.jsonl"
WIKITEXT = "/work/shared/data/wikitext-2-raw/wiki.test.raw"
MODES = {
    "naive": {},
    "boosted": {"slorb_k": 16},
    "frozen": {"frozen_mask": True},
    "static": {"srste_ramp_steps": 0},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=MODES, default="naive")
    parser.add_argument("--start", choices=("magnitude", "sparsegpt"), default="sparsegpt")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--srste-decay", type=float, default=2e-4)
    parser.add_argument("--data", default=C4, help="training and calibration text: local .jsonl/.txt, 'c4' (Hub)")
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--output-dir", default="out/ast")
    cli = parser.parse_args()
    logging.basicConfig(level=logging.INFO)

    teacher, tokenizer = smollm2()
    student = copy.deepcopy(teacher)
    teacher.requires_grad_(False)
    student.get_input_embeddings().requires_grad_(False)  # tied with lm_head: train decoder linears and norms
    sparse = {"mask_init": "magnitude"}
    if cli.start == "sparsegpt":
        config = SparsityConfig(method="sparsegpt", pattern="2:4", nsamples=32, seqlen=512)
        prune(student, config, calibration=cli.data, tokenizer=tokenizer)
        sparse = {"mask_init": "pruned"}

    windows = load_calibration(cli.data, tokenizer, nsamples=cli.steps * cli.batch, seqlen=cli.seqlen, seed=1)
    args = SparseTrainingArguments(
        output_dir=cli.output_dir, max_steps=cli.steps, per_device_train_batch_size=cli.batch,
        learning_rate=cli.lr, lr_scheduler_type="constant", weight_decay=0.0, logging_steps=5, save_strategy="no",
        report_to="none", use_cpu=True, pattern="2:4", mask_update_interval=10,
        srste_decay=cli.srste_decay, distill_alpha=2.0, distill_temperature=2.0, **sparse, **MODES[cli.mode],
    )
    trainer = SparseTrainer(model=student, args=args, teacher=teacher, train_dataset=TokenWindowDataset(windows))
    trainer.train()  # leaves the trainer trainable; finalize() hard-prunes to the final 2:4 masks and saves
    trainer.finalize(cli.output_dir)
    ppl = perplexity(trainer.model, tokenizer, WIKITEXT, seqlen=512, max_windows=cli.eval_windows).ppl
    logging.info("WikiText-2 perplexity after AST-%s from %s: %.2f", cli.mode, cli.start, ppl)
    if any("flip_rate" in row for row in trainer.state.log_history):
        plot_flip_rates({cli.mode: trainer.state.log_history}, f"{cli.output_dir}/flips.png")


if __name__ == "__main__":
    main()
