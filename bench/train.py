"""AST retraining benchmark on SmolLM2-135M (CPU): perplexity at an equal token budget, and step-time overhead.

Protocol (WikiText-2 test, 512-token windows, first ``--eval-windows`` windows, as in the Foundation benchmark):

* starting points: ``sparsegpt`` (SparseGPT 2:4 one-shot, 32 C4 windows of 512 tokens, seed 0; mask_init="pruned",
  pruned weights restart at 0) and ``magnitude`` (the paper's: dense weights with their 2:4 magnitude mask);
* every run trains with the dense model as KL teacher (loss CE + 2.0·KL at T = 2, the paper's α), on the same C4
  training windows (seed 1, disjoint sampling seed from calibration), with the same optimizer settings and the same
  number of steps (= tokens);
* a run is named ``START:MODE[:PLACEMENT[:LAMBDA]]``: MODE ``frozen`` (the start's mask fixed, kept weights train),
  ``naive`` (AST-Naive: dynamic masks, annealed SR-STE at PLACEMENT, λ = LAMBDA or ``--srste-decay``) or ``boosted``
  (the same + SLoRB k=16, mean init);
* step time of SparseTrainer vs a plain Trainer on the same model and batch, without the teacher, with the fp32
  teacher and with a bf16 teacher (``teacher_dtype``), back to back in one process (``--timing-steps`` per trainer,
  ``--timing-rounds`` rounds in alternating order), and with
  ``--peak-memory`` each trainer's peak resident memory, each in a fresh process;
* with ``--flip-steps N``: flip-rate telemetry, AST-Naive from both starts for N steps of one sequence each (C4
  sampling seed 2, no evaluation), so the plot has a point every ``--mask-update-interval`` steps.

Embeddings (tied with ``lm_head``) are frozen; decoder linears and norms train. Results go to ``--out`` (JSON) and a
flip-rate plot next to it. The README's AST table (one process per start, one thread each)::

    python bench/train.py --threads 1 --timing-steps 0 --skip-dense-eval --cache-dir /tmp/ast/cache \
        --runs sparsegpt:frozen,sparsegpt:naive:gradient,sparsegpt:naive:step,sparsegpt:naive:update,sparsegpt:boosted \
        --out bench/results/train_sparsegpt.json
    python bench/train.py --threads 1 --timing-steps 0 --skip-dense-eval --cache-dir /tmp/ast/cache \
        --runs magnitude:frozen,magnitude:naive:gradient,magnitude:naive:step,magnitude:naive:update,magnitude:boosted \
        --out bench/results/train_magnitude.json

``--save-dir DIR`` keeps each scored run's finalized model in ``DIR/START-MODE[-PLACEMENT[-LAMBDA]]`` (the AST-Boosted
SLoRB adapter in its ``slorb/``), which ``bench/zeroshot.py --checkpoint`` evaluates.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

from peft_sparse import SparseTrainer, SparseTrainingArguments, SparsityConfig, plot_flip_rates, prune
from peft_sparse.data import load_calibration
from peft_sparse.evaluation import perplexity
from peft_sparse.models import smollm2
from peft_sparse.training import TokenWindowDataset, kl_distill_sum
from peft_sparse.training.config import SRSTE_PLACEMENTS

C4 = "/work/shared/data/c4/c4-train.00000-of-01024.first1000.jsonl"
WIKITEXT = "/work/shared/data/wikitext-2-raw/wiki.test.raw"
STARTS = ("sparsegpt", "magnitude")
MODES = ("frozen", "naive", "boosted")


@dataclass(frozen=True)
class Run:
    """One retraining run: ``START:MODE[:PLACEMENT[:LAMBDA]]``."""

    start: str
    mode: str
    placement: str | None = None
    decay: float | None = None

    @classmethod
    def parse(cls, spec: str) -> Run:
        parts = spec.split(":")
        if not 2 <= len(parts) <= 4 or parts[0] not in STARTS or parts[1] not in MODES:
            raise ValueError(f"run {spec!r}: use START:MODE[:PLACEMENT[:LAMBDA]], START in {STARTS}, MODE in {MODES}")
        placement = parts[2] if len(parts) > 2 else None
        if placement is not None and placement not in SRSTE_PLACEMENTS:
            raise ValueError(f"run {spec!r}: placement must be one of {SRSTE_PLACEMENTS}")
        return cls(parts[0], parts[1], placement, float(parts[3]) if len(parts) > 3 else None)

    def settings(self, args) -> dict:
        """SparseTrainingArguments overrides of this run."""
        settings = dict(mask_init="pruned" if self.start == "sparsegpt" else "magnitude")
        if self.mode == "frozen":
            return {**settings, "frozen_mask": True}
        settings["srste_placement"] = self.placement or args.srste_placement
        settings["srste_decay"] = args.srste_decay if self.decay is None else self.decay
        if self.mode == "boosted":
            settings["slorb_k"] = 16
        return settings


logger = logging.getLogger("bench.train")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run (equal token budget)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--seqlen", type=int, default=256, help="tokens per training sequence")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--srste-decay", type=float, default=2e-4)
    parser.add_argument("--srste-placement", default="gradient", choices=SRSTE_PLACEMENTS)
    parser.add_argument("--mask-update-interval", type=int, default=10)
    parser.add_argument("--distill-alpha", type=float, default=2.0, help="CE + alpha * KL (paper: 2.0)")
    parser.add_argument("--eval-windows", type=int, default=64, help="WikiText-2 windows of 512 tokens")
    parser.add_argument("--runs", default="", help="comma-separated START:MODE[:PLACEMENT[:LAMBDA]] (may be empty)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--flip-steps", type=int, default=0, help="steps of the flip-rate telemetry runs (0: skip)")
    parser.add_argument("--timing-steps", type=int, default=3, help="timed steps per trainer after 1 warm-up (0: skip)")
    parser.add_argument("--timing-rounds", type=int, default=2, help="rounds of the timed trainers, order alternating")
    parser.add_argument("--peak-memory", action="store_true",
                        help="also the peak memory of each timed trainer, each in a fresh process")
    parser.add_argument("--measure-trainer", choices=sorted(TRAINERS), help=argparse.SUPPRESS)  # one, then exit
    parser.add_argument("--skip-dense-eval", action="store_true")
    parser.add_argument("--cache-dir", type=Path, help="keep/reuse the one-shot starting points here")
    parser.add_argument("--save-dir", type=Path,
                        help="save each run's finalized model (and tokenizer) to SAVE_DIR/START-MODE[...]; a boosted "
                             "run's SLoRB adapter goes to its slorb/ (for bench/zeroshot.py --checkpoint)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/train.json"))
    args = parser.parse_args()
    try:
        args.runs = {name: Run.parse(name) for name in args.runs.split(",") if name}
    except ValueError as exc:
        parser.error(str(exc))
    return args


def evaluate(model, tokenizer, args) -> float:
    model.eval()
    return perplexity(model, tokenizer, WIKITEXT, seqlen=512, max_windows=args.eval_windows, progress=False).ppl


def trainable_copy(source: torch.nn.Module) -> torch.nn.Module:
    """A copy that trains decoder linears and norms only; the (tied) embedding stays as it is."""
    model = copy.deepcopy(source).requires_grad_(True)
    model.get_input_embeddings().requires_grad_(False)
    model.get_output_embeddings().requires_grad_(False)
    return model


def oneshot(dense, method: str, tokenizer, cache_dir: Path | None) -> torch.nn.Module:
    """``dense`` pruned 2:4 by ``method`` (32 C4 windows of 512 tokens); reused from ``cache_dir`` when there."""
    cached = cache_dir / f"{method}-2of4" if cache_dir else None
    if cached is not None and (cached / "config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(cached, dtype=dense.dtype)
    model = copy.deepcopy(dense)
    config = SparsityConfig(method=method, pattern="2:4", nsamples=32, seqlen=512, seed=0)
    prune(model, config, calibration=C4 if method != "magnitude" else None, tokenizer=tokenizer)
    if cached is not None:  # write then rename, so a reader never sees half a checkpoint
        cache_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=cache_dir))
        model.save_pretrained(staging)
        staging.rename(cached)
    return model


def plain_settings(output_dir: str, args) -> dict:
    """TrainingArguments shared by every run (and by the plain Trainer of the timing comparison)."""
    return dict(
        output_dir=output_dir, per_device_train_batch_size=args.batch, max_steps=args.steps,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        logging_steps=5, report_to="none", save_strategy="no", use_cpu=True, seed=0, data_seed=0,
        dataloader_num_workers=0, disable_tqdm=True,
    )


def sparse_arguments(output_dir: str, args, **overrides) -> SparseTrainingArguments:
    settings = dict(
        srste_decay=args.srste_decay, srste_placement=args.srste_placement,
        mask_update_interval=args.mask_update_interval, distill_alpha=args.distill_alpha, distill_temperature=2.0,
    )
    return SparseTrainingArguments(**{**plain_settings(output_dir, args), **settings, **overrides})


def train_run(name: str, run: Run, start, dense, tokenizer, dataset, args, score: bool = True,
              **settings) -> dict:
    """Train a copy of ``start`` as ``run`` (``settings`` override the shared arguments); evaluate if ``score``."""
    overrides = run.settings(args)
    student = trainable_copy(start)
    saved = args.save_dir / name.replace(":", "-") if args.save_dir and score else None
    with tempfile.TemporaryDirectory() as tmp:
        trainer = SparseTrainer(model=student, args=sparse_arguments(tmp, args, **overrides, **settings), teacher=dense,
                                train_dataset=dataset)
        began = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - began
        trainer.finalize(saved)  # evaluate the hard-pruned, exactly 2:4 model (the base in saved/, SLoRB in slorb/)
    if saved is not None:
        tokenizer.save_pretrained(saved)
    flips = [row for row in trainer.state.log_history if "flip_rate" in row]
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    result = dict(train_seconds=round(seconds, 1), losses=losses, flips=flips, settings={**overrides, **settings})
    if saved is not None:
        result["saved"] = str(saved)
    if score:
        result["ppl"] = evaluate(trainer.model, tokenizer, args)
        logger.info("%s: ppl %.2f (%.0f s)", name, result["ppl"], seconds)
    return result


def flip_telemetry(starts: dict, dense, tokenizer, args) -> dict:
    """AST-Naive from both starts, ``--flip-steps`` steps of one sequence each: flip-rate curves, no evaluation."""
    windows = load_calibration(C4, tokenizer, nsamples=args.flip_steps, seqlen=args.seqlen, seed=2)
    dataset = TokenWindowDataset(windows)
    return {
        name: train_run(name, Run.parse(name), starts[Run.parse(name).start], dense, tokenizer, dataset, args,
                        score=False, max_steps=args.flip_steps, per_device_train_batch_size=1)
        for name in ("magnitude:naive", "sparsegpt:naive")
    }


class StepTimer(TrainerCallback):
    def __init__(self):
        self.durations: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.began = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.durations.append(time.perf_counter() - self.began)


# The timed trainers: (SparseTrainer?, with the dense teacher?, SparseTrainingArguments overrides).
TRAINERS = {
    "plain": (False, False, {}),
    "sparse": (True, False, {}),
    "sparse_teacher": (True, True, {}),
    "sparse_bf16_teacher": (True, True, {"teacher_dtype": "bfloat16"}),
}


def time_trainer(name: str, dense, dataset, args) -> list[float]:
    """Seconds of each optimizer step of trainer ``name`` but the first (a warm-up)."""
    sparse, with_teacher, settings = TRAINERS[name]
    teacher = dense if with_teacher else None
    timer = StepTimer()
    model = trainable_copy(dense)
    steps = args.timing_steps + 1
    with tempfile.TemporaryDirectory() as tmp:
        if sparse:
            trainer = SparseTrainer(model=model, args=sparse_arguments(tmp, args, max_steps=steps, **settings),
                                    teacher=teacher, train_dataset=dataset,
                                    callbacks=[timer])
        else:
            plain = TrainingArguments(**{**plain_settings(tmp, args), "max_steps": steps})
            trainer = Trainer(model=model, args=plain, train_dataset=dataset, callbacks=[timer])
        trainer.train()
    return timer.durations[1:]


def teacher_precision_gap(dense, dataset, args) -> float:
    """Mean per-token ``T²·KL(fp32 teacher ‖ bf16 teacher)`` at T = 2 on one batch: what a bf16 teacher changes."""
    ids = torch.stack([dataset[i]["input_ids"] for i in range(args.batch)])
    with torch.inference_mode():
        exact = dense(input_ids=ids).logits
        rounded = copy.deepcopy(dense).to(torch.bfloat16)(input_ids=ids).logits
    return float(kl_distill_sum(rounded.flatten(0, 1), exact.flatten(0, 1), 2.0)) / ids.numel()


def step_times(dense, dataset, args) -> dict:
    """Median step seconds of the trainers back to back in this process, over ``--timing-rounds`` rounds in
    alternating order (the first trainer of a round also pays for growing the process's memory)."""
    durations: dict[str, list[float]] = {name: [] for name in TRAINERS}
    for round_index in range(args.timing_rounds):
        for name in list(TRAINERS)[:: 1 if round_index % 2 == 0 else -1]:
            durations[name] += time_trainer(name, dense, dataset, args)
    seconds = {name: statistics.median(values) for name, values in durations.items()}
    ratios = {f"ratio_{name}": value / seconds["plain"] for name, value in seconds.items() if name != "plain"}
    return dict(seconds=seconds, samples=durations, **ratios,
                bf16_teacher_kl_per_token=teacher_precision_gap(dense, dataset, args))


def own_peak_rss_mib() -> float:
    """This process's resident high-water mark (``VmHWM``). Not ``ru_maxrss``: Linux carries that over ``execve``
    from the forked copy of the parent, so a child spawned by a large parent would report the parent's size."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def peak_memory(args) -> dict[str, float]:
    """Peak resident memory (MiB) of each timed trainer, each in a fresh process (model + data + 2 steps)."""
    peaks = {}
    for name in TRAINERS:
        command = [sys.executable, __file__, "--measure-trainer", name, "--timing-steps", "1", "--steps", "2",
                   "--batch", str(args.batch), "--seqlen", str(args.seqlen), "--skip-dense-eval"]
        command += ["--threads", str(args.threads)] if args.threads else []
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        peaks[name] = json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_mib"]
    return peaks


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense, tokenizer = smollm2()
    dense.eval().requires_grad_(False)
    windows = load_calibration(C4, tokenizer, nsamples=args.steps * args.batch, seqlen=args.seqlen, seed=1)
    dataset = TokenWindowDataset(windows)
    if args.measure_trainer:  # a child of --peak-memory: this process's peak is the answer
        time_trainer(args.measure_trainer, dense, dataset, args)
        print(json.dumps({"peak_rss_mib": own_peak_rss_mib()}))
        return
    results: dict = dict(config={k: str(v) for k, v in vars(args).items()}, tokens=windows.numel())
    if not args.skip_dense_eval:
        results["dense_ppl"] = evaluate(dense, tokenizer, args)
    if args.timing_steps:
        results["step_time"] = step_times(dense, dataset, args)
        logger.info("step time: %s", results["step_time"])
    if args.peak_memory:
        results["peak_rss_mib"] = peak_memory(args)
        logger.info("peak memory: %s", results["peak_rss_mib"])
    needed = {run.start for run in args.runs.values()} | ({"sparsegpt"} if args.flip_steps else set())
    starts = {"magnitude": dense}  # the paper's start: dense weights, magnitude mask taken by the trainer
    for method in sorted(needed):
        pruned = oneshot(dense, method, tokenizer, args.cache_dir)
        results[f"oneshot_{method}_ppl"] = evaluate(pruned, tokenizer, args)
        logger.info("one-shot %s: %.2f", method, results[f"oneshot_{method}_ppl"])
        if method == "sparsegpt":
            starts[method] = pruned
    results["runs"] = {}
    for name, run in args.runs.items():
        results["runs"][name] = train_run(name, run, starts[run.start], dense, tokenizer, dataset, args)
        write(results, args.out)
    if args.flip_steps:
        results["flip_telemetry"] = flip_telemetry(starts, dense, tokenizer, args)
    write(results, args.out)
    runs = results.get("flip_telemetry", results["runs"])
    histories = {name: run["flips"] for name, run in runs.items() if run["flips"]}
    if histories:
        plot_flip_rates(histories, args.out.with_name(args.out.stem + "_flips.png"))


def write(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
