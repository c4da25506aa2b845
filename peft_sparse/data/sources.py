"""Where calibration and evaluation text comes from: the embedded offline corpus, local files, or the Hub.

The embedded corpus is the Python documentation that every CPython ships in ``pydoc_data.topics`` (79 documents,
~465k characters), so pruning works on an air-gapped machine with no download. It is split deterministically into a
calibration part and a held-out part so that a demo never evaluates on the text it calibrated on.
"""

from __future__ import annotations

import json
from pathlib import Path

EMBEDDED = "embedded"
HELDOUT_EVERY = 5  # every 5th document (sorted by key) is held out for evaluation
TEXT_SUFFIXES = (".txt", ".raw", ".tokens")
JSONL_SUFFIXES = (".jsonl",)
HUB_DATASETS = ("c4", "wikitext2")
C4_SHARD = "en/c4-train.00000-of-01024.json.gz"
EMBEDDED_SPLITS = ("calibration", "heldout", "all")


def embedded_documents(split: str = "calibration") -> list[str]:
    """Documents of the embedded corpus: ``"calibration"``, ``"heldout"`` (every 5th) or ``"all"``."""
    from pydoc_data.topics import topics

    if split not in EMBEDDED_SPLITS:
        raise ValueError(f"Unknown embedded split {split!r}; choose one of {EMBEDDED_SPLITS}.")
    docs = [topics[key] for key in sorted(topics)]
    if split == "all":
        return docs
    heldout = split == "heldout"
    return [doc for index, doc in enumerate(docs) if (index % HELDOUT_EVERY == HELDOUT_EVERY - 1) == heldout]


def embedded_text(split: str = "heldout") -> str:
    """The embedded documents of ``split`` joined by blank lines (evaluation text, works offline)."""
    return "\n\n".join(embedded_documents(split))


def is_local_source(source: str) -> bool:
    """Whether ``source`` names a file rather than a dataset: it exists or looks like a path."""
    path = Path(source).expanduser()
    return path.exists() or path.suffix in TEXT_SUFFIXES + JSONL_SUFFIXES or "/" in source or "\\" in source


def check_local_file(source: str) -> Path:
    """The file behind ``source``, or a clear error naming what is wrong and which formats work."""
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"Text file {source!r} does not exist (or is not a file). Pass a .txt/.raw text file, a .jsonl file "
            f"with a 'text' field, a dataset name ({', '.join(HUB_DATASETS)}) or {EMBEDDED!r} for the built-in text."
        )
    if path.suffix not in TEXT_SUFFIXES + JSONL_SUFFIXES:
        raise ValueError(
            f"Unsupported file type {path.suffix!r} for {source!r}: use plain text ({', '.join(TEXT_SUFFIXES)}) "
            f"or JSON lines with a 'text' field ({', '.join(JSONL_SUFFIXES)})."
        )
    return path


def read_jsonl_texts(path: Path) -> list[str]:
    """The ``text`` field of every non-empty line of a JSON-lines file."""
    texts = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}:{number}: every JSON line needs a string 'text' field.")
            texts.append(record["text"])
    if not texts:
        raise ValueError(f"{path} contains no documents.")
    return texts


def read_local(source: str) -> str | list[str]:
    """A local file as one text (plain text, read as-is) or a list of documents (``.jsonl``)."""
    path = check_local_file(source)
    if path.suffix in JSONL_SUFFIXES:
        return read_jsonl_texts(path)
    return path.read_text(encoding="utf-8")


def hub_texts(name: str, split: str) -> list[str]:
    """Rows of a Hub dataset the reference scripts use; needs network, so failures suggest a local file."""
    if name not in HUB_DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; choose one of {HUB_DATASETS}, {EMBEDDED!r} or a local file.")
    try:
        from datasets import load_dataset

        if name == "c4":
            rows = load_dataset("allenai/c4", data_files={split: C4_SHARD}, split=split)
        else:
            rows = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
        return list(rows["text"])
    except Exception as error:  # datasets raises many network/cache error types
        raise ValueError(
            f"Could not load dataset {name!r} ({split}) from the Hugging Face Hub: {type(error).__name__}: {error}. "
            "Offline? Pass a local file instead (a .txt/.raw text file or a .jsonl with a 'text' field), "
            f"or {EMBEDDED!r} for the built-in text."
        ) from error
