"""Atomic outputs: a directory or a JSON file appears whole or not at all (CLI, export, training)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputExistsError


def check_output_dir(output: str, overwrite: bool) -> Path:
    """The output directory as a path; refuses a file, or a non-empty directory unless ``overwrite``."""
    path = Path(output).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"Output {output!r} exists and is not a directory; choose another output.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise OutputExistsError(f"Output directory {output!r} is not empty; pass --overwrite or choose another.")
    return path


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``target``; on success it replaces ``target``, on error it is removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        yield staging
        staging.chmod(0o755)
        if target.exists():
            retired = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
            os.replace(target, retired / target.name)
            os.replace(staging, target)
            shutil.rmtree(retired)
        else:
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # no-op after a successful rename


def write_json(path: Path, payload: dict) -> None:
    """Write ``payload`` as JSON via a temporary file so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(handle, "w") as out:
        json.dump(payload, out, indent=2, sort_keys=True)
        out.write("\n")
    os.chmod(partial, 0o644)
    os.replace(partial, path)
