"""Quantized table on SmolLM2-135M (mirrors AST Table 6): dense and SparseGPT 2:4 models with 4 / 8 bit kept values.

The one-shot protocol of ``bench/oneshot.py``: calibration = 32 windows x 512 tokens (seed 0, local C4 shard),
WikiText-2 perplexity over the first 64 windows of 512 tokens. Every row runs in a fresh process (the model loaded
from the converted cache); per row: perplexity, seconds of the prune / quantize call, decoder sparsity. Rows:

* dense fp32; dense int4 by RTN, GPTQ and AWQ (``peft_sparse.quantize`` with ``sparsity=0.0``);
* SparseGPT 2:4 (and with blocksize 64: the same arithmetic up to float rounding, the ppl's noise floor); 2:4 +
  int8 joint; 2:4 + int4 by RTN after pruning, GPTQ after pruning, joint, AWQ after;
* with ``--ast-checkpoint DIR`` (a run saved by ``bench/train.py --save-dir``): that retrained 2:4 model, alone and
  with int4 by RTN, GPTQ and AWQ of its kept values (``peft_sparse.quantize``, its mask kept);
* with ``--sparsegpt-repo``: the public IST-DASLab/sparsegpt joint mode (``--wbits 4``: one per-channel asymmetric
  grid fitted on the dense weight) through ``bench/reference_oneshot.py``, on the same windows.

Symmetric grids, ``--group-size`` dense columns per scale (default 64: SmolLM2-135M's hidden width 576 is 4.5 x 128,
so the issue's g128 cannot tile it; 64 is the largest power of two dividing 576 and 1536).
The joint rows' seconds are compared with SparseGPT alone measured in the same invocation (``joint_x_sparsegpt``).
``--rows`` runs a subset; rows already in ``--out`` from an earlier invocation are kept unless re-run.

    python bench/quantize.py --sparsegpt-repo /tmp/refs/sparsegpt
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.oneshot import DEFAULT_CALIBRATION, DEFAULT_EVAL, decoder_sparsity, measured  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "quantize.json"
SPARSEGPT_24 = {"method": "sparsegpt", "pattern": "2:4"}
DENSE = {"sparsity": 0.0}
# AWQ's scale search runs the inspected modules 20 times per pair over its tokens: here the first calibration batch
# (2 windows, 1024 tokens; llm-awq searches on 128 x 512 tokens, more than this 2-core CPU allows per block)
AWQ = {"quantizer": "awq", "quantizer_options": {"search_tokens": 512}}
# name -> (how: dense / quantize / prune / reference, SparsityConfig keywords or the reference's CLI options)
ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "dense fp32": ("dense", {}),
    "dense int4 RTN": ("quantize", {**DENSE, "bits": 4, "quantizer": "rtn"}),
    "dense int4 GPTQ": ("quantize", {**DENSE, "bits": 4, "quantizer": "gptq"}),
    "dense int4 AWQ": ("quantize", {**DENSE, "bits": 4, **AWQ}),
    "SparseGPT 2:4": ("prune", SPARSEGPT_24),
    # the same arithmetic up to float rounding (blocks of 64 columns, not 128): how far one seed's ppl moves by itself
    "SparseGPT 2:4 blocksize 64": ("prune", {**SPARSEGPT_24, "method_options": {"blocksize": 64}}),
    "SparseGPT 2:4 + int8 joint": ("prune", {**SPARSEGPT_24, "bits": 8}),
    "SparseGPT 2:4 + int4 joint": ("prune", {**SPARSEGPT_24, "bits": 4}),
    "SparseGPT 2:4 + int4 RTN after": ("prune", {**SPARSEGPT_24, "bits": 4, "quantizer": "rtn"}),
    "SparseGPT 2:4 + int4 GPTQ after": ("prune", {**SPARSEGPT_24, "bits": 4, "quantizer": "gptq"}),
    "SparseGPT 2:4 + int4 AWQ after": ("prune", {**SPARSEGPT_24, "bits": 4, **AWQ}),
    "reference SparseGPT 2:4 --wbits 4": ("reference", {"wbits": 4}),
}
# a retrained checkpoint (--ast-checkpoint): evaluated as saved, then its kept values quantized
AST = "AST 2:4 (bench/train.py)"
ROWS.update({AST: ("checkpoint", {}), **{f"{AST} + int4 {q.upper()}": (
    "checkpoint", {"pattern": "2:4", "bits": 4, "quantizer": q, **(AWQ if q == "awq" else {})})
    for q in ("rtn", "gptq", "awq")}})
# the pattern table (AST Table 1): SparseGPT with joint int4 for each N:M and unstructured 50%
PATTERNS = ("1:2", "2:4", "4:8", "8:16", "16:32", "32:64", "unstructured 50%")
ROWS.update({f"SparseGPT {p} + int4 joint (pattern table)": (
    "prune", {"method": "sparsegpt", "bits": 4, **({"sparsity": 0.5} if p.startswith("unstructured") else
                                                   {"pattern": p})}) for p in PATTERNS})


@dataclass
class Row:
    name: str
    ppl: float | None = None
    seconds: float | None = None
    sparsity: float | None = None
    run: str = ""  # the invocation that measured it: seconds compare only within one
    extra: dict[str, Any] = field(default_factory=dict)


def _call(name: str, model, tokenizer, calibration: torch.Tensor, sparsegpt_repo: str | None, group_size: int):
    """The timed call of row ``name`` (``None`` for a model evaluated as loaded)."""
    how, spec = ROWS[name]
    if how == "dense" or not spec:
        return None
    if how == "reference":
        from bench.reference_oneshot import ReferenceRun, run_reference, windows_as_loader

        run = ReferenceRun("sparsegpt", "2:4", sparsegpt_repo=Path(sparsegpt_repo), options=tuple(spec.items()))
        return lambda: run_reference(run, model, tokenizer, windows_as_loader(calibration), calibration.shape[1])
    import peft_sparse

    config = peft_sparse.SparsityConfig(**spec, **({"group_size": group_size} if "bits" in spec else {}))
    call = peft_sparse.prune if how == "prune" else peft_sparse.quantize
    return lambda: call(model, config, calibration=calibration)


def run_row(name: str, settings: dict[str, Any]) -> Row:
    """Load, run the row's call, evaluate; executed in a fresh process."""
    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(settings["threads"])
    from peft_sparse.evaluation import perplexity
    from peft_sparse.models import load_model_and_tokenizer, smollm2

    checkpoint = ROWS[name][0] == "checkpoint"
    model, tokenizer = load_model_and_tokenizer(settings["ast_checkpoint"]) if checkpoint else smollm2()
    model.eval()
    row = Row(name, run=settings["run"])
    call = _call(name, model, tokenizer, settings["calibration"], settings["sparsegpt_repo"], settings["group_size"])
    if call is not None:
        _, row.seconds, peak, _ = measured(call)
        row.extra["peak_rss_mib"] = peak
        row.sparsity = decoder_sparsity(model)
    result = perplexity(model, tokenizer, settings["eval_data"], settings["seqlen"], settings["eval_windows"],
                        progress=False)  # fmt: skip
    row.ppl = result.ppl
    return row


def summary(rows: dict[str, Row]) -> dict[str, Any]:
    """The issue's done-when checks that these rows can decide."""

    def ppl(name: str) -> float | None:
        return rows[name].ppl if name in rows else None

    def ratio(a: str, b: str, key: str) -> float | None:
        if a not in rows or b not in rows or getattr(rows[a], key) is None or getattr(rows[b], key) is None:
            return None
        if key == "seconds" and rows[a].run != rows[b].run:
            return None  # timings compare only within one invocation
        return getattr(rows[a], key) / getattr(rows[b], key)

    base, joint4, joint8 = "SparseGPT 2:4", "SparseGPT 2:4 + int4 joint", "SparseGPT 2:4 + int8 joint"
    reference = ppl("reference SparseGPT 2:4 --wbits 4")
    out = dict(joint4_ppl_x_sparsegpt=ratio(joint4, base, "ppl"), joint8_ppl_x_sparsegpt=ratio(joint8, base, "ppl"),
               joint4_ppl_x_reference_joint=ratio(joint4, "reference SparseGPT 2:4 --wbits 4", "ppl"),
               joint4_seconds_x_sparsegpt=ratio(joint4, base, "seconds"),
               joint8_seconds_x_sparsegpt=ratio(joint8, base, "seconds"))  # fmt: skip
    out["done_when"] = dict(
        joint4_ppl_within_1_10=None if out["joint4_ppl_x_sparsegpt"] is None else out["joint4_ppl_x_sparsegpt"] <= 1.10,
        joint4_ppl_at_most_reference=None if reference is None or ppl(joint4) is None else ppl(joint4) <= reference,
        joint8_ppl_within_1_01=None if out["joint8_ppl_x_sparsegpt"] is None else out["joint8_ppl_x_sparsegpt"] <= 1.01,
        joint_seconds_within_1_5=None if out["joint4_seconds_x_sparsegpt"] is None
        else out["joint4_seconds_x_sparsegpt"] <= 1.5,
    )  # fmt: skip
    return out


def table(rows: dict[str, Row]) -> str:
    lines = ["| model | WikiText-2 ppl | seconds | decoder sparsity |", "|---|---:|---:|---:|"]
    for row in rows.values():
        seconds = "-" if row.seconds is None else f"{row.seconds:.1f}"
        sparsity = "-" if row.sparsity is None else f"{row.sparsity:.4f}"
        lines.append(f"| {row.name} | {row.ppl:.3f} | {seconds} | {sparsity} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calibration", type=Path, default=DEFAULT_CALIBRATION)
    parser.add_argument("--eval-data", type=Path, default=DEFAULT_EVAL)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), metavar="ROW",
                        help=f"rows to run: {'; '.join(ROWS)}")
    parser.add_argument("--sparsegpt-repo", type=Path, default=None, help="checkout of IST-DASLab/sparsegpt")
    parser.add_argument("--ast-checkpoint", type=Path, default=None, help="a run saved by bench/train.py --save-dir")
    parser.add_argument("--note", default="", help="machine conditions, stored beside the timings")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                        help="run nothing: combine the rows of these result files (parallel invocations) into --out")
    args = parser.parse_args(argv)
    if args.sparsegpt_repo is None:
        args.rows = [name for name in args.rows if ROWS[name][0] != "reference"]
    elif not args.sparsegpt_repo.is_dir():
        parser.error(f"--sparsegpt-repo {args.sparsegpt_repo} is not a directory; see bench/README.md.")
    if args.ast_checkpoint is None:
        args.rows = [name for name in args.rows if ROWS[name][0] != "checkpoint"]
    elif not (args.ast_checkpoint / "config.json").is_file():
        parser.error(f"--ast-checkpoint {args.ast_checkpoint} has no config.json; save one with bench/train.py "
                     "--save-dir.")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from bench.oneshot import run_isolated_call
    from peft_sparse.data import load_calibration
    from peft_sparse.models import smollm2

    args = parse_args(argv)
    if args.merge:
        return merge(args)
    _, tokenizer = smollm2()
    calibration = load_calibration(str(args.calibration), tokenizer, args.nsamples, args.seqlen, args.seed)
    run = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    settings = dict(calibration=calibration, eval_data=str(args.eval_data), seqlen=args.seqlen,
                    eval_windows=args.eval_windows, threads=args.threads, run=run, group_size=args.group_size,
                    sparsegpt_repo=args.sparsegpt_repo and str(args.sparsegpt_repo),
                    ast_checkpoint=args.ast_checkpoint and str(args.ast_checkpoint))  # fmt: skip
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if previous and previous["protocol"]["group_size"] != args.group_size:
        raise SystemExit(f"{args.out} holds group size {previous['protocol']['group_size']}; use another --out.")
    rows = {r["name"]: Row(**r) for r in previous.get("rows", [])}
    notes = previous.get("machine", {}).get("notes", {})
    notes[run] = args.note or f"load average at start {os.getloadavg()[0]:.1f} (2 shared CPU cores)"
    protocol = dict(calibration=args.calibration.name, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                    eval_data=args.eval_data.name, eval_windows=args.eval_windows, group_size=args.group_size,
                    symmetric=True)  # fmt: skip
    for name in args.rows:
        rows[name] = run_isolated_call(run_row, name, settings)
        print(f"{name}: ppl={rows[name].ppl:.3f} s={rows[name].seconds}", flush=True)
        result = write(args.out, protocol, args.threads, notes, rows)
    print(table({n: rows[n] for n in ROWS if n in rows}))
    print(json.dumps(result["summary"], indent=2))
    return result


def write(out: Path, protocol: dict[str, Any], threads: int, notes: dict[str, str], rows: dict[str, Row]
          ) -> dict[str, Any]:
    """Write the rows (in table order) with their protocol, machine notes and done-when summary to ``out``."""
    ordered = {n: rows[n] for n in ROWS if n in rows}
    result = dict(protocol=protocol, machine=dict(threads=threads, torch=torch.__version__,
                                                  python=platform.python_version(), notes=notes),
                  rows=[asdict(r) for r in ordered.values()], summary=summary(ordered))  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def merge(args: argparse.Namespace) -> dict[str, Any]:
    """``--merge``: one result file from several invocations run side by side on the same protocol."""
    parts = [json.loads(path.read_text()) for path in args.merge]
    protocols = {json.dumps(part["protocol"], sort_keys=True) for part in parts}
    if len(protocols) != 1:
        raise SystemExit(f"--merge: the files were measured on different protocols: {sorted(protocols)}")
    rows = {r["name"]: Row(**r) for part in parts for r in part["rows"]}
    notes = {run: note for part in parts for run, note in part["machine"]["notes"].items()}
    result = write(args.out, parts[0]["protocol"], parts[0]["machine"]["threads"], notes, rows)
    print(table({n: rows[n] for n in ROWS if n in rows}))
    print(json.dumps(result["summary"], indent=2))
    return result


if __name__ == "__main__":
    main()
