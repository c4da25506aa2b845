"""AST under TRL: :class:`SparseSFTTrainer` is TRL's ``SFTTrainer`` with the sparse mixin, configured by
:class:`SparseSFTConfig` (``SFTConfig`` plus the sparse fields). Importing this module imports trl."""

from __future__ import annotations

from dataclasses import dataclass

from trl import SFTConfig, SFTTrainer

from .config import SparseArgumentsMixin
from .trainer import SparseTrainingMixin


@dataclass
class SparseSFTConfig(SparseArgumentsMixin, SFTConfig):
    """TRL's :class:`~trl.SFTConfig` plus the sparse fields of :class:`~peft_sparse.training.SparseArgumentsMixin`."""


class SparseSFTTrainer(SparseTrainingMixin, SFTTrainer):
    """TRL's :class:`~trl.SFTTrainer` with AST: the same callback, KL term, checkpoints and ``finalize`` as
    :class:`~peft_sparse.SparseTrainer`, and the same ``teacher=`` argument.

    The KL term covers the tokens TRL scores (completion or assistant tokens only when so configured). TRL's fused LM
    head never builds the student's full logits, so the scored rows are projected once more for the KL term.
    """

    def _ce_sums_over_batch(self, num_items_in_batch) -> bool:
        return num_items_in_batch is not None  # SFTTrainer divides its summed token loss by num_items_in_batch
