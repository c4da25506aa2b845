"""Why GPTQ scores a higher perplexity than RTN on SmolLM2-135M: the calibration text, not the sweep.

Dense SmolLM2-135M quantized to int4 **per-channel asymmetric** (the grid the public IST-DASLab/sparsegpt ``--wbits``
mode fits, so that its GPTQ can run beside ours), WikiText-2 perplexity over the first ``--eval-windows`` windows of
512 tokens, every row in a fresh process, one thread:

* RTN (data-free);
* our GPTQ calibrated on the one-shot protocol's C4 windows (32 x 512, seed 0);
* with ``--sparsegpt-repo``: the public reference's GPTQ on the same windows (``--sparsity 0 --wbits 4``: its
  pruning step then removes one weight per 128-column block and layer, about 0.001% of the weights);
* our GPTQ calibrated on 32 x 512 WikiText-2 *test* tokens drawn (seeds 0 and 1) from after the evaluated windows,
  so the evaluated text is never seen: the same sweep, calibrated on the evaluation's domain.

    python bench/gptq_calibration.py --sparsegpt-repo /tmp/refs/sparsegpt
    python bench/gptq_calibration.py --rows "GPTQ, held-out WikiText-2 calibration, seed 1"  # adds to the JSON
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.oneshot import DEFAULT_CALIBRATION, DEFAULT_EVAL, measured, run_isolated_call  # noqa: E402

SEQLEN, NSAMPLES = 512, 32
HELDOUT = "GPTQ, held-out WikiText-2 calibration"
ROWS = ("RTN", "GPTQ, C4 calibration", "reference GPTQ, C4 calibration", HELDOUT, f"{HELDOUT}, seed 1")


def heldout_windows(tokenizer, eval_windows: int, seed: int) -> torch.Tensor:
    """``NSAMPLES`` windows of the WikiText-2 test text starting after the ``eval_windows`` evaluated ones."""
    ids = tokenizer(DEFAULT_EVAL.read_text(), return_tensors="pt").input_ids[0][eval_windows * SEQLEN :]
    rng = random.Random(seed)
    return torch.stack([ids[s : s + SEQLEN] for s in (rng.randrange(ids.numel() - SEQLEN) for _ in range(NSAMPLES))])


def run_row(name: str, eval_windows: int, sparsegpt_repo: str | None) -> dict:
    torch.set_num_threads(1)
    import peft_sparse
    from peft_sparse.data import load_calibration
    from peft_sparse.evaluation import perplexity
    from peft_sparse.models import smollm2

    model, tokenizer = smollm2()
    model.eval()
    c4 = load_calibration(str(DEFAULT_CALIBRATION), tokenizer, NSAMPLES, SEQLEN, 0)
    grid = dict(sparsity=0.0, bits=4, group_size=-1, symmetric=False)
    if name == "reference GPTQ, C4 calibration":
        from bench.reference_oneshot import ReferenceRun, run_reference, windows_as_loader

        run = ReferenceRun("sparsegpt", "unstructured", sparsegpt_repo=Path(sparsegpt_repo), sparsity=0.0,
                           options=(("wbits", 4),))
        call, args = run_reference, (run, model, tokenizer, windows_as_loader(c4), SEQLEN)
    else:
        seed = 1 if name.endswith("seed 1") else 0
        calibration = heldout_windows(tokenizer, eval_windows, seed) if name.startswith(HELDOUT) else c4
        config = peft_sparse.SparsityConfig(**grid, quantizer="rtn" if name == "RTN" else "gptq")
        call, args = functools.partial(peft_sparse.quantize, calibration=calibration), (model, config)
    _, seconds, _, _ = measured(call, *args)
    ppl = perplexity(model, tokenizer, str(DEFAULT_EVAL), SEQLEN, eval_windows, progress=False).ppl
    return {"name": name, "ppl": ppl, "seconds": seconds}


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--sparsegpt-repo", type=Path, default=None, help="checkout of IST-DASLab/sparsegpt")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), metavar="ROW", help="; ".join(ROWS))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gptq_calibration.json")
    args = parser.parse_args()
    names = [n for n in args.rows if args.sparsegpt_repo is not None or not n.startswith("reference")]
    repo = args.sparsegpt_repo and str(args.sparsegpt_repo)
    earlier = json.loads(args.out.read_text())["rows"] if args.out.is_file() else []  # rows not re-run are kept
    done = {row["name"]: row for row in earlier if row["name"] not in names}
    for name in names:
        done[name] = run_isolated_call(run_row, name, args.eval_windows, repo)
        print(f"{name}: ppl {done[name]['ppl']:.3f} ({done[name]['seconds']:.0f} s)", flush=True)
    rows = [done[name] for name in ROWS if name in done]
    result = {"protocol": {"grid": "int4 per-channel asymmetric", "nsamples": NSAMPLES, "seqlen": SEQLEN,
                           "eval_windows": args.eval_windows, "threads": 1}, "rows": rows}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| quantizer (dense SmolLM2-135M, int4 per-channel asymmetric) | WikiText-2 ppl |\n|---|---:|")
    for row in rows:
        print(f"| {row['name']} | {row['ppl']:.3f} |")
    return result


if __name__ == "__main__":
    main()
