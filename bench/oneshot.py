"""One-shot pruning benchmark: magnitude / Wanda / SparseGPT at 2:4 and 50% unstructured on SmolLM2-135M.

Protocol (the issue's): calibration = 32 windows x 512 tokens drawn with seed 0 from the local C4 shard prefix
(Wanda's ``get_c4`` sampling); evaluation = perplexity on the first 64 non-overlapping 512-token windows of
WikiText-2 raw test. Every row runs in a fresh process (model loaded from the converted cache), so its peak RSS is
its own. Per row: perplexity, pruning seconds (the ``prune`` call only), peak RSS during that call, and the time as
a multiple of the *two-pass floor*, measured in the same run: capture the first block's inputs, then run every
decoder block twice over the calibration set (the minimum any sequential method needs), with the engine's own
``capture_inputs`` / ``forward_block``.

With ``--wanda-repo`` / ``--sparsegpt-repo`` the public reference implementations run on the very same windows
(asserted equal) through ``bench/reference_oneshot.py`` and are evaluated with our ``perplexity``, so only the
pruning code differs. See ``bench/README.md``.

    python bench/oneshot.py --wanda-repo /tmp/refs/wanda --sparsegpt-repo /tmp/refs/sparsegpt
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
DEFAULT_CALIBRATION = SHARED / "c4" / "c4-train.00000-of-01024.first1000.jsonl"
DEFAULT_EVAL = SHARED / "wikitext-2-raw" / "wiki.test.raw"
DEFAULT_OUT = ROOT / "bench" / "results" / "oneshot.json"
METHODS = ("magnitude", "wanda", "sparsegpt")
PATTERNS = ("2:4", "unstructured")
SPARSITY = 0.5
PPL_TOLERANCE = 0.02
# --recovery rows (2:4): name -> (our SparsityConfig keywords, the reference run's (method, CLI options) or None)
RECOVERY: dict[str, tuple[dict[str, Any], tuple[str, dict[str, Any]] | None]] = {
    "wanda": ({"method": "wanda"}, ("wanda", {})),
    "wanda+dsnot[attention]": (
        {"method": "wanda", "refine": "dsnot", "refine_options": {"layers": "attention"}},
        ("dsnot", {"initial_method": "wanda", "skip_layer": "mlp"}),
    ),
    "wanda+dsnot[all]": (
        {"method": "wanda", "refine": "dsnot", "refine_options": {"layers": "all"}},
        ("dsnot", {"initial_method": "wanda", "skip_layer": "no_skip"}),
    ),
    "wanda+dsnot[attention,code-sign]": (
        {"method": "wanda", "refine": "dsnot", "refine_options": {"layers": "attention", "same_sign": False}}, None,
    ),
    "sparsegpt+dsnot[attention]": (
        {"method": "sparsegpt", "refine": "dsnot", "refine_options": {"layers": "attention"}},
        ("dsnot", {"initial_method": "sparsegpt", "skip_layer": "mlp"}),
    ),
    "magnitude+dsnot[attention]": (
        {"method": "magnitude", "refine": "dsnot", "refine_options": {"layers": "attention"}},
        ("dsnot", {"initial_method": "magnitude", "skip_layer": "mlp"}),
    ),
    "wrp[alpha=0.1]": ({"method": "wrp", "method_options": {"alpha": 0.1}}, ("wrp", {"alpha": 0.1})),
    "wrp[alpha=0.25]": ({"method": "wrp", "method_options": {"alpha": 0.25}}, ("wrp", {"alpha": 0.25})),
    "wrp[alpha=0.4]": ({"method": "wrp", "method_options": {"alpha": 0.4}}, ("wrp", {"alpha": 0.4})),
    "wrp[block=32,k=1]": (
        {"method": "wrp", "method_options": {"block_size": 32, "blocks_per_row": 1}},
        ("wrp", {"recover_format": "block_ELL", "blocksize": 32, "topn": 1}),
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Job:
    """One row of the table, run in its own process: ``kind`` is floor, dense, ours or reference."""

    kind: str
    method: str = ""
    pattern: str = ""


@dataclass
class Settings:
    """Everything a worker process needs (picklable)."""

    model: str | None
    calibration: torch.Tensor
    eval_data: str
    seqlen: int
    eval_windows: int
    threads: int
    wanda_repo: str | None
    sparsegpt_repo: str | None
    dsnot_repo: str | None = None
    wrp_repo: str | None = None


@dataclass
class Row:
    kind: str
    method: str
    pattern: str
    ppl: float | None = None
    seconds: float | None = None
    x_floor: float | None = None
    peak_rss_mib: float | None = None
    rss_increase_mib: float | None = None
    sparsity: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ measurement
def _status_kib(key: str) -> int:
    """A ``/proc/self/status`` field in KiB (Linux): VmRSS now, VmHWM the resident high-water mark."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise KeyError(key)


def _reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the peak seen afterwards belongs to the timed call."""
    Path("/proc/self/clear_refs").write_text("5")


def measured(fn, *args) -> tuple[Any, float, float, float]:
    """``fn(*args)``'s result, its wall seconds, peak RSS during the call (MiB) and that peak minus RSS before."""
    _reset_peak_rss()
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    result = fn(*args)
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    return result, seconds, peak / 1024, (peak - before) / 1024


def decoder_sparsity(model) -> float:
    """Fraction of zeros over the weights of every Linear inside the decoder blocks."""
    from peft_sparse.modeling import find_decoder_blocks, is_sparse_layer

    _, blocks = find_decoder_blocks(model)
    weights = [m.weight for m in blocks.modules() if is_sparse_layer(m)]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def extra_density(model) -> float:
    """Non-zeros beyond N:M over the decoder's sparse layers: a recover matrix, or recovered values in the weight."""
    from peft_sparse.modeling import find_decoder_blocks, is_sparse_layer, out_in
    from peft_sparse.nn import RecoverLinear

    _, blocks = find_decoder_blocks(model)
    recovers = [m for m in blocks.modules() if isinstance(m, RecoverLinear)]
    bases = {id(m.base) for m in recovers}
    weights = [out_in(m.base) + m.recover_dense() for m in recovers]
    weights += [out_in(m) for m in blocks.modules() if is_sparse_layer(m) and id(m) not in bases]
    numel = sum(w.numel() for w in weights)
    return sum(int(w.count_nonzero()) for w in weights) / numel - 0.5  # 2:4 keeps half


def config_for(method: str, pattern: str):
    from peft_sparse.config import SparsityConfig

    if method in RECOVERY:
        return SparsityConfig(pattern="2:4", **RECOVERY[method][0])
    if pattern == "2:4":
        return SparsityConfig(method=method, pattern="2:4")
    # the papers' unstructured scopes: magnitude per layer, Wanda per output row; SparseGPT ignores the scope and
    # thresholds each block of columns as a whole (its adaptive mask selection), as the reference does
    scope = "layer" if method == "magnitude" else "row"
    return SparsityConfig(method=method, sparsity=SPARSITY, sparsity_scope=scope)


@torch.no_grad()
def two_pass_floor(model, calibration: torch.Tensor) -> None:
    """The least a sequential method must do: capture the block inputs, run each block twice over the data."""
    from peft_sparse.modeling import find_decoder_blocks
    from peft_sparse.pruning.engine import capture_inputs, forward_block

    _, blocks = find_decoder_blocks(model)
    batches = capture_inputs(model, blocks, calibration)
    for block in blocks:
        forward_block(block, batches)  # pass 1 (where statistics would be collected)
        batches = forward_block(block, batches)  # pass 2 feeds the next block


# ---------------------------------------------------------------------------------------------------- workers
def _load(settings: Settings):
    from peft_sparse.models import load_model_and_tokenizer, smollm2

    model, tokenizer = smollm2() if settings.model is None else load_model_and_tokenizer(settings.model)
    return model.eval(), tokenizer


def _prune_ours(job: Job, model, tokenizer, settings: Settings):
    from peft_sparse import prune

    # data-free methods are called without data, as a user would (given data, the engine still runs the forwards)
    config = config_for(job.method, job.pattern)
    calibration = settings.calibration if config.needs_calibration else None
    return lambda: prune(model, config, calibration=calibration)


def _prune_reference(job: Job, model, tokenizer, settings: Settings):
    from bench.reference_oneshot import ReferenceRun, run_reference, windows_as_loader

    method, options = RECOVERY[job.method][1] if job.method in RECOVERY else (job.method, {})
    run = ReferenceRun(method, job.pattern, _path(settings.wanda_repo), _path(settings.sparsegpt_repo), SPARSITY,
                       _path(settings.dsnot_repo), _path(settings.wrp_repo), tuple(options.items()))  # fmt: skip
    loader = windows_as_loader(settings.calibration)
    return lambda: run_reference(run, model, tokenizer, loader, settings.seqlen)


def _path(value: str | None) -> Path | None:
    return None if value is None else Path(value)


def run_job(job: Job, settings: Settings) -> Row:
    """Load the model, run the job's timed call (if any), evaluate; executed in a fresh process."""
    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(settings.threads)
    from peft_sparse.evaluation import perplexity

    model, tokenizer = _load(settings)
    row = Row(job.kind, job.method, job.pattern)
    if job.kind == "floor":
        _, row.seconds, row.peak_rss_mib, row.rss_increase_mib = measured(two_pass_floor, model, settings.calibration)
        return row
    if job.kind in ("ours", "reference"):
        factory = _prune_ours if job.kind == "ours" else _prune_reference
        _, row.seconds, row.peak_rss_mib, row.rss_increase_mib = measured(factory(job, model, tokenizer, settings))
        row.sparsity = decoder_sparsity(model)
        if job.method in RECOVERY:
            row.extra["extra_density"] = extra_density(model)
    if settings.eval_windows:  # 0: timing-only run
        result = perplexity(model, tokenizer, settings.eval_data, settings.seqlen, settings.eval_windows,
                            progress=False)  # fmt: skip
        row.ppl = result.ppl
        row.extra["eval_seconds"] = result.seconds
    return row


def run_isolated_call(fn, *args: Any) -> Any:
    """``fn(*args)`` in a fresh spawned process (clean RSS high-water mark, no state shared between rows)."""
    os.environ["TQDM_DISABLE"] = "1"  # inherited by the worker: no progress bars (tqdm reads it at import)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(fn, *args).result()


def run_isolated(job: Job, settings: Settings) -> Row:
    """``run_job`` in a fresh spawned process."""
    return run_isolated_call(run_job, job, settings)


# ------------------------------------------------------------------------------------------------- the driver
def calibration_windows(args: argparse.Namespace) -> torch.Tensor:
    """Our calibration windows; with ``--wanda-repo``, asserted equal to the reference ``get_c4``'s."""
    from peft_sparse.data import load_calibration
    from peft_sparse.models import load_model_and_tokenizer, smollm2

    _, tokenizer = smollm2() if args.model is None else load_model_and_tokenizer(args.model)
    ids = load_calibration(str(args.calibration), tokenizer, args.nsamples, args.seqlen, args.seed)
    if args.wanda_repo is not None:
        from bench.reference_oneshot import reference_calibration

        reference = reference_calibration(args.wanda_repo, args.calibration, tokenizer, args.nsamples, args.seqlen,
                                          args.seed)  # fmt: skip
        if not torch.equal(torch.cat([inp for inp, _ in reference]), ids):
            raise AssertionError("Our calibration windows differ from the reference get_c4's on the same file.")
    return ids


def jobs_for(args: argparse.Namespace) -> list[Job]:
    if args.recovery:  # ours then the reference, variant by variant, so a partial run already compares
        repos = {"wanda": args.wanda_repo, "dsnot": args.dsnot_repo, "wrp": args.wrp_repo}
        jobs = []
        for name in args.recovery:
            jobs.append(Job("ours", name, "2:4"))
            reference = RECOVERY[name][1]
            if reference is not None and repos[reference[0]] is not None:
                jobs.append(Job("reference", name, "2:4"))
        return jobs
    jobs = [Job("floor"), Job("dense")]
    jobs += [Job("ours", m, p) for p in args.patterns for m in args.methods]
    references = [Job("reference", m, p) for p in args.patterns for m in args.methods]
    return jobs + [j for j in references if (args.sparsegpt_repo if j.method == "sparsegpt" else args.wanda_repo)]


def compare(rows: list[Row]) -> list[dict[str, Any]]:
    """Ours vs reference per (method, pattern): relative perplexity difference and speed ratio."""
    ours = {(r.method, r.pattern): r for r in rows if r.kind == "ours"}
    out = []
    for ref in (r for r in rows if r.kind == "reference"):
        mine = ours.get((ref.method, ref.pattern))
        if mine is None:
            continue
        diff = None if mine.ppl is None else mine.ppl / ref.ppl - 1
        out.append(dict(method=ref.method, pattern=ref.pattern, ppl_ours=mine.ppl, ppl_reference=ref.ppl,
                        extra_density_ours=mine.extra.get("extra_density"),
                        extra_density_reference=ref.extra.get("extra_density"),
                        ppl_rel_diff=diff, ppl_within_2pct=None if diff is None else abs(diff) <= PPL_TOLERANCE,
                        seconds_ours=mine.seconds, seconds_reference=ref.seconds,
                        speedup=ref.seconds / mine.seconds))  # fmt: skip
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[Row]) -> str:
    """A markdown table of the rows."""
    lines = ["| impl | method | pattern | ppl | prune s | x floor | peak RSS MiB | +RSS MiB | sparsity | extra |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r.kind} | {r.method or '-'} | {r.pattern or '-'} | {_fmt(r.ppl, '.3f')} | "
                     f"{_fmt(r.seconds, '.2f')} | {_fmt(r.x_floor, '.2f')} | {_fmt(r.peak_rss_mib, '.0f')} | "
                     f"{_fmt(r.rss_increase_mib, '.0f')} | {_fmt(r.sparsity, '.4f')} | "
                     f"{_fmt(r.extra.get('extra_density'), '.4f')} |")  # fmt: skip
    return "\n".join(lines)


def comparison_table(comparisons: list[dict[str, Any]]) -> str:
    lines = ["| method | pattern | ppl ours | ppl reference | diff | ours s | reference s | speedup |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for c in comparisons:
        diff = "-" if c["ppl_rel_diff"] is None else f"{100 * c['ppl_rel_diff']:+.2f}%"
        lines.append(f"| {c['method']} | {c['pattern']} | {_fmt(c['ppl_ours'], '.3f')} | "
                     f"{_fmt(c['ppl_reference'], '.3f')} | {diff} | {c['seconds_ours']:.2f} | "
                     f"{c['seconds_reference']:.2f} | {c['speedup']:.2f}x |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model dir or .gguf (default: the cached SmolLM2-135M)")
    parser.add_argument("--calibration", type=Path, default=DEFAULT_CALIBRATION)
    parser.add_argument("--eval-data", type=Path, default=DEFAULT_EVAL)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-windows", type=int, default=64, help="0: time the pruning calls only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--patterns", nargs="+", choices=PATTERNS, default=list(PATTERNS))
    parser.add_argument("--wanda-repo", type=Path, default=None, help="checkout of locuslab/wanda (reference rows)")
    parser.add_argument("--sparsegpt-repo", type=Path, default=None, help="checkout of IST-DASLab/sparsegpt")
    parser.add_argument("--dsnot-repo", type=Path, default=None, help="checkout of zyxxmu/DSnoT")
    parser.add_argument("--wrp-repo", type=Path, default=None, help="checkout of TanZhendong/WRP")
    parser.add_argument("--recovery", nargs="+", choices=list(RECOVERY), metavar="ROW",
                        help=f"DSnoT/WRP rows at 2:4 instead of the method x pattern grid: {', '.join(RECOVERY)}")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    for flag in ("wanda_repo", "sparsegpt_repo", "dsnot_repo", "wrp_repo"):
        repo = getattr(args, flag)
        if repo is not None and not repo.is_dir():
            parser.error(f"--{flag.replace('_', '-')} {repo} is not a directory; see bench/README.md to fetch it.")
    for flag in ("calibration", "eval_data"):
        if not getattr(args, flag).is_file():
            parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)} does not exist.")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    settings = Settings(args.model, calibration_windows(args), str(args.eval_data), args.seqlen, args.eval_windows,
                        args.threads, args.wanda_repo and str(args.wanda_repo),
                        args.sparsegpt_repo and str(args.sparsegpt_repo), args.dsnot_repo and str(args.dsnot_repo),
                        args.wrp_repo and str(args.wrp_repo))  # fmt: skip
    rows: list[Row] = []
    for job in jobs_for(args):
        rows.append(run_isolated(job, settings))
        print(f"{job.kind} {job.method} {job.pattern}: ppl={rows[-1].ppl} s={rows[-1].seconds} "
              f"extra={rows[-1].extra}", flush=True)  # fmt: skip
        write_results(args, rows)  # after every row: a long run that is stopped keeps what it measured
    return write_results(args, rows, final=True)


def write_results(args: argparse.Namespace, rows: list[Row], final: bool = False) -> dict[str, Any]:
    """Compute the floor ratios and comparisons, write ``args.out``; print the tables when ``final``."""
    floor = rows[0].seconds if rows[0].kind == "floor" else None  # --recovery runs no floor row
    for row in rows:
        row.x_floor = None if row.seconds is None or floor is None else row.seconds / floor
    comparisons = compare(rows)
    result = dict(protocol=dict(calibration=args.calibration.name, nsamples=args.nsamples, seqlen=args.seqlen,
                                seed=args.seed, eval_data=args.eval_data.name, eval_windows=args.eval_windows,
                                sparsity_unstructured=SPARSITY),
                  machine=dict(threads=args.threads, torch=torch.__version__, python=platform.python_version(),
                               processor=platform.processor() or platform.machine()),
                  floor_seconds=floor, rows=[asdict(r) for r in rows], comparisons=comparisons)  # fmt: skip
    if final:
        print(table(rows))
        if comparisons:
            print(comparison_table(comparisons))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
