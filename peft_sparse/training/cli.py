"""``peft-sparse train``: one command from a dense model to an exactly N:M retrained one (AST).

Options come from dataclasses through :class:`transformers.HfArgumentParser`: :class:`TrainModelArguments`,
:class:`TrainDataArguments` and every field of :class:`~peft_sparse.SparseTrainingArguments` (so every
``TrainingArguments`` option works, e.g. ``--max_steps`` or ``--learning_rate``). ``--config FILE`` (YAML or JSON, as
``trl sft --config``) sets defaults that command-line options override.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from transformers import HfArgumentParser

from ..errors import InputNotFoundError, SparseConfigError
from .config import SparseTrainingArguments
from .plot import plot_flip_rates

logger = logging.getLogger(__name__)

TRAIN_LOG_NAME = "train_log.json"
FLIP_PLOT_NAME = "flip_rates.png"


@dataclass
class TrainModelArguments:
    """The model to retrain and where it starts from."""

    model: str = field(metadata={"help": "Hub id, local model directory, .gguf file or 'smollm2' (demo model)."})
    dtype: Literal["float32", "bfloat16", "float16"] = field(default="float32", metadata={"help": "Parameter dtype."})
    teacher: bool = field(default=True, metadata={"help": "Distil from the dense input model (--no-teacher: CE only)."})
    prune: Literal["sparsegpt", "wanda", "magnitude"] | None = field(
        default=None,
        metadata={"help": "One-shot prune first (calibrated on the training windows) and keep its mask as the start; "
                          "default: the dense weights with their magnitude mask."},
    )
    save_format: Literal["dense", "packed"] = field(
        default="dense",
        metadata={"help": "dense: exact zeros, loads in any transformers; packed: N:M values + positions "
                          "(peft_sparse.export)."},
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace a non-empty output_dir."})
    eval_tasks: str | None = field(default=None, metadata={
        "help": "lm-evaluation-harness tasks run on the final model, comma-separated (see peft-sparse eval --help); "
                "results in OUTPUT_DIR/lm_eval_results.json. Needs peft_sparse[eval]."})
    eval_num_fewshot: int | None = field(default=None, metadata={"help": "Examples per prompt of --eval_tasks."})
    eval_limit: int | None = field(default=None, metadata={"help": "Documents per task of --eval_tasks."})
    lastword_data: str = field(default="wikitext2", metadata={"help": "Text of the wikitext_lastword task."})


@dataclass
class TrainDataArguments:
    """Training text, cut into fixed token windows (:func:`peft_sparse.data.load_calibration`)."""

    data: str = field(
        default="embedded",
        metadata={"help": "'embedded' (offline text), c4 or wikitext2 (Hub), or a local .txt/.raw/.jsonl file."},
    )
    seqlen: int = field(default=256, metadata={"help": "Tokens per training window."})
    windows: int | None = field(
        default=None,
        metadata={"help": "Number of windows; default: max_steps x per_device_train_batch_size x "
                          "gradient_accumulation_steps (one pass)."},
    )
    window_seed: int = field(default=0, metadata={"help": "Seed of the window sampling."})

    def window_count(self, args: SparseTrainingArguments) -> int:
        if self.windows is not None:
            count = self.windows
        elif args.max_steps > 0:
            count = args.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps
        else:
            raise SparseConfigError("Give --max_steps or --windows: the window count follows from one of them.")
        if count < 1 or self.seqlen < 1:
            raise SparseConfigError(f"Need a positive window count and seqlen, got {count} and {self.seqlen}.")
        return count


def build_train_parser() -> HfArgumentParser:
    parser = HfArgumentParser((TrainModelArguments, TrainDataArguments, SparseTrainingArguments),
                              prog="peft-sparse train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML or JSON file of option defaults (command-line options win)")
    return parser


def read_config_file(path: str) -> dict:
    """The mapping in a YAML (``.yaml``/``.yml``) or JSON file."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise InputNotFoundError(f"Config file {path!r} does not exist.")
    text = file.read_text(encoding="utf-8")
    if file.suffix in (".yaml", ".yml"):
        import yaml

        values = yaml.safe_load(text)
    else:
        values = json.loads(text)
    if not isinstance(values, dict):
        raise SparseConfigError(f"Config file {path!r} must hold a mapping of option names to values.")
    return values


def apply_config_defaults(parser: HfArgumentParser, values: dict) -> None:
    """Make the file's values the parser's defaults; unknown names are refused (a typo must not be ignored)."""
    actions = {action.dest: action for action in parser._actions}
    unknown = sorted(set(values) - set(actions) - {"config"})
    if unknown:
        raise SparseConfigError(f"Unknown option(s) in the config file: {unknown}; see peft-sparse train --help.")
    for name, value in values.items():
        actions[name].default = value
        actions[name].required = False


def parse_train_args(argv: list[str]) -> tuple[TrainModelArguments, TrainDataArguments, SparseTrainingArguments]:
    """The three dataclasses from ``argv``, with ``--config FILE`` values as defaults."""
    parser = build_train_parser()
    config_only = argparse.ArgumentParser(add_help=False)
    config_only.add_argument("--config")
    path = config_only.parse_known_args(argv)[0].config
    if path is not None:
        apply_config_defaults(parser, read_config_file(path))
    model_args, data_args, train_args, _ = parser.parse_args_into_dataclasses(argv)  # the last holds --config
    return model_args, data_args, train_args


def write_training_outputs(output: Path, log_history: list[dict]) -> None:
    """The log history as JSON and, when masks were updated and matplotlib is installed, the flip-rate plot."""
    (output / TRAIN_LOG_NAME).write_text(json.dumps(log_history, indent=2) + "\n")
    if not any("flip_rate" in row for row in log_history):
        return
    try:
        plot_flip_rates({"AST": log_history}, output / FLIP_PLOT_NAME)
    except ImportError as error:
        logger.warning("No flip-rate plot: %s", error)
