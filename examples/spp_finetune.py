"""SPP recovery of a 2:4 Wanda-pruned SmolLM2-135M on CPU, merged back into an exact 2:4 model.

Steps: load SmolLM2-135M (offline cache), optionally the dense WikiText-2 perplexity, Wanda 2:4 prune (C4
calibration; ``--method sparsegpt`` prunes with SparseGPT instead), perplexity of the pruned model, SPP (r=16 on
q,k,v,o,gate,up,down) trained with ``transformers.Trainer`` on C4 windows drawn with another seed,
``merge_and_unload``, check every pruned layer is exactly 2:4, perplexity again; ``--save-dir`` saves the merged
model. Perplexity follows the benchmark protocol: 512-token windows, the first 64 of WikiText-2 test.

    python examples/spp_finetune.py                  # full run for the README (sized for ~30 min on 2 idle cores)
    python examples/spp_finetune.py --steps 2 --batch 1 --eval-windows 2 --nsamples 4   # smoke test
    python examples/spp_finetune.py --method sparsegpt --save-dir /tmp/spp-sparsegpt \
        --out bench/results/spp_finetune_sparsegpt.json   # the zero-shot table's row (bench/zeroshot.py --checkpoint)
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

import peft_sparse
from peft_sparse.data import load_calibration
from peft_sparse.evaluation import perplexity
from peft_sparse.models import load_model_and_tokenizer, smollm2
from peft_sparse.sparsity import validate_nm

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
C4 = SHARED / "c4" / "c4-train.00000-of-01024.first1000.jsonl"
WIKITEXT = SHARED / "wikitext-2-raw" / "wiki.test.raw"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
logger = logging.getLogger("spp_finetune")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="local model dir or .gguf (default: the cached SmolLM2-135M-Instruct)")
    parser.add_argument("--c4", default=str(C4), help="C4 jsonl for calibration and training windows")
    parser.add_argument("--eval-data", default=str(WIKITEXT), help="evaluation text (WikiText-2 test)")
    parser.add_argument("--method", default="wanda", choices=("wanda", "sparsegpt", "magnitude"),
                        help="one-shot 2:4 pruning before SPP (default wanda)")
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30, help="SPP optimizer steps")
    parser.add_argument("--batch", type=int, default=2, help="512-token windows per step")
    parser.add_argument("--lr", type=float, default=4e-3, help="the paper's learning rate")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1234, help="seed of the training windows (calibration uses 0)")
    parser.add_argument("--dense", action="store_true", help="also evaluate the dense model (one more eval pass)")
    results = Path(__file__).resolve().parents[1] / "bench" / "results"
    parser.add_argument("--out", default=str(results / "spp_finetune.json"))
    parser.add_argument("--save-dir", help="save the merged 2:4 model and its tokenizer here (save_pretrained)")
    return parser.parse_args()


def evaluate(model, tokenizer, args) -> float:
    model.eval()
    return perplexity(model, tokenizer, args.eval_data, seqlen=args.seqlen, max_windows=args.eval_windows,
                      progress=False).ppl


def train_spp(model, tokenizer, args) -> tuple[torch.nn.Module, float]:
    """Wrap with SPP, train with Trainer, return (peft model, seconds)."""
    windows = load_calibration(args.c4, tokenizer, nsamples=args.steps * args.batch, seqlen=args.seqlen,
                               seed=args.seed)
    dataset = [{"input_ids": w, "labels": w} for w in windows]
    peft_model = get_peft_model(model, peft_sparse.SPPConfig(r=args.r, target_modules=TARGETS))
    peft_model.print_trainable_parameters()
    training = TrainingArguments(
        output_dir="/tmp/spp_finetune", max_steps=args.steps, per_device_train_batch_size=args.batch,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=max(1, args.steps // 20),
        weight_decay=1e-3, logging_steps=5, save_strategy="no", report_to=[], use_cpu=True, seed=0,
    )
    start = time.perf_counter()
    Trainer(model=peft_model, args=training, train_dataset=dataset).train()
    return peft_model, time.perf_counter() - start


def check_24(model) -> int:
    """Validate every adapted projection is exactly 2:4; returns how many were checked."""
    layers = [(n, m) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in TARGETS]
    for name, module in layers:
        validate_nm(module.weight, 2, 4, name)
    return len(layers)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer(args.model) if args.model else smollm2()
    results: dict = {"setup": vars(args)}
    if args.dense:
        results["ppl_dense"] = evaluate(model, tokenizer, args)
    sparsity = peft_sparse.SparsityConfig(method=args.method, pattern="2:4", nsamples=args.nsamples,
                                          seqlen=args.seqlen)
    peft_sparse.prune(model, sparsity, calibration=args.c4 if sparsity.needs_calibration else None,
                      tokenizer=tokenizer)
    results["ppl_pruned"] = evaluate(model, tokenizer, args)
    peft_model, results["train_seconds"] = train_spp(model, tokenizer, args)
    merged = peft_model.merge_and_unload()
    results["layers_exact_24"] = check_24(merged)
    results["ppl_spp_merged"] = evaluate(merged, tokenizer, args)
    if args.save_dir:
        merged.save_pretrained(args.save_dir)
        tokenizer.save_pretrained(args.save_dir)
    pruned = {"wanda": "Wanda", "sparsegpt": "SparseGPT", "magnitude": "magnitude"}[args.method] + " 2:4"
    rows = [("dense", results.get("ppl_dense")), (pruned, results["ppl_pruned"]),
            (f"{pruned} + SPP (merged)", results["ppl_spp_merged"])]
    print(f"\n{'model':<30} {'WikiText-2 ppl':>14}")
    for label, value in rows:
        print(f"{label:<30} {'-' if value is None else round(value, 3):>14}")
    print(f"{results['layers_exact_24']} projections exactly 2:4 after merge; "
          f"SPP training {results['train_seconds']:.0f} s")
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
