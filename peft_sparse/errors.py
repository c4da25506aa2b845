"""User-error types: bad values, missing inputs, occupied outputs. The CLI reports these in one line (exit 2).

Each also subclasses the builtin a caller would expect (``ValueError``, ``FileNotFoundError``, ``FileExistsError``),
so ``except ValueError`` keeps working; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class PeftSparseUserError(Exception):
    """Base class: the input is wrong and the message says how to fix it."""


class SparseConfigError(PeftSparseUserError, ValueError):
    """An invalid option value or combination of options."""


class SparseStateError(PeftSparseUserError, ValueError):
    """A checkpoint or trainer whose sparse state does not fit what was asked of it."""


class InputNotFoundError(PeftSparseUserError, FileNotFoundError):
    """A model, data file or checkpoint that does not exist."""


class OutputExistsError(PeftSparseUserError, FileExistsError):
    """An output path that is occupied (pass ``--overwrite`` to replace it)."""


class MissingExtraError(PeftSparseUserError, ImportError):
    """An optional dependency that is not installed (the message names the ``pip install peft_sparse[...]``)."""
