"""Training arguments of the Adaptive Sparse Trainer (AST, Huang et al., AAAI'25)."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from ..errors import SparseConfigError
from ..modeling import compile_patterns
from ..sparsity import SparsityPattern
from ..tuners.slorb.config import SLORB_INITS

MASK_INITS = ("magnitude", "pruned")
PRUNED_VALUES = ("zero", "teacher")
SRSTE_PLACEMENTS = ("gradient", "step", "update")
TEACHER_DTYPES = ("float32", "bfloat16", "float16")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SparseConfigError(f"{name}={value!r} is not supported; choose one of {choices}.")


@dataclass
class SparseArgumentsMixin:
    """The knobs of sparse retraining (paper sections 3.2, 4.2-4.4), mixed into a ``TrainingArguments`` dataclass.

    :class:`SparseTrainingArguments` (for :class:`~peft_sparse.SparseTrainer`) and
    :class:`~peft_sparse.SparseSFTConfig` (for TRL) are this mixin over ``TrainingArguments`` / ``SFTConfig``.

    Args:
        pattern: ``"N:M"`` (N kept of every M inputs) or an unstructured ratio; default ``"2:4"``. Masks are
            recomputed by magnitude (the paper finds activation-aware metrics go stale as weights move).
        targets / ignore: regular expressions over module names, as in :class:`~peft_sparse.SparsityConfig`; by
            default every Linear / Conv1D inside the decoder blocks, the modules :func:`peft_sparse.prune` prunes.
        mask_update_interval: recompute masks from the live dense weights every this many optimizer steps.
        srste_decay: final SR-STE decay lambda on the pruned weights. Its strength depends on the placement: the
            paper's values (6e-5 .. 3e-4) were tuned with the authors' ``"update"`` optimizer.
        srste_ramp_steps: annealing SR-STE: lambda grows linearly from 0 to ``srste_decay`` over this many steps,
            then holds. ``0`` gives the static SR-STE ablation; ``None`` ramps over the first quarter of training.
        srste_placement: where the decay ``d = λ·(¬m ⊙ W)`` enters Adam (:mod:`peft_sparse.training.optim`).
            ``"gradient"``: added to the loss gradient in the backward (classic SR-STE, ref. [21]: both moments and
            gradient clipping see it; works with any optimizer and with FSDP). ``"step"``: one literal reading of the
            paper's section 3.2 formula, ``(1-β1)·d`` added to the current step only, kept out of the momentum.
            ``"update"``: the authors' optimizer, ``d`` added to the Adam update with weight 1 and the second moment
            taken of that update. At equal λ, ``"gradient"`` pulls about 10x harder than ``"step"``, and
            ``"update"`` harder still (``bench/srste_pull.py`` measures the conversion). ``"gradient"`` is the
            default: on SmolLM2 it had the lowest perplexity from a SparseGPT start and did not diverge from the
            magnitude start (README, AST results).
        distill_alpha / distill_temperature: loss = CE + alpha * T^2 * KL(teacher || student) at temperature T.
            Only used when a teacher is given to :class:`SparseTrainer`.
        teacher_dtype: run the teacher in this dtype (``None``: as given). ``"bfloat16"`` makes its forward about
            3x cheaper where bf16 matrix units exist (AMX CPUs, GPUs), at the cost of bf16-rounded teacher logits
            (the KL itself is computed in fp32).
        frozen_mask: Wanda-style baseline: the step-0 mask is fixed, pruned weights are zeroed and only kept weights
            train (no mask updates, no decay).
        mask_init: ``"magnitude"`` (paper) or ``"pruned"``: keep the mask of a model already pruned with
            :func:`peft_sparse.prune` (e.g. SparseGPT), which helps when the token budget is small.
        pruned_values: with ``mask_init="pruned"``, the dense values the pruned weights restart from: ``"zero"`` or
            ``"teacher"`` (copied from the dense teacher so pruned knowledge can come back when masks flip).
        slorb_k: AST-Boosted: add SLoRB (section 4.4) with ``k`` inputs per group (rank n/k) to every sparse layer,
            trained jointly with the dense weights; ``None`` (default) is AST-Naive.
        slorb_init: SLoRB initialisation: ``"mean"`` of the pruned weights per group (paper), ``"zero"``, or
            ``"xavier"`` (paper Table 7: Xavier on the projection X, S = 0, output unchanged at step 0).
        slorb_trainable_projection: also train SLoRB's projection X (n/k x n, block ones at init), as the authors'
            AST-Boosted recipe does; costs n²/k parameters per layer on top of S's m·n/k (doubles SLoRB's share
            for square layers: 12.5% instead of 6.25% of the dense weights at k=16).
    """

    pattern: str = field(default="2:4", metadata={"help": "'N:M' = keep N of every M input weights."})
    targets: list[str] | None = field(
        default=None, metadata={"help": "Module-name regexes to sparsify (default: the decoder blocks' linears)."}
    )
    ignore: list[str] = field(default_factory=list, metadata={"help": "Module-name regexes left dense."})
    mask_update_interval: int = field(default=10, metadata={"help": "Optimizer steps between mask updates."})
    srste_decay: float = field(default=1e-4, metadata={"help": "Final SR-STE decay on pruned weights."})
    srste_ramp_steps: int | None = field(
        default=None, metadata={"help": "Annealing ramp length; 0 = constant; None = a quarter of training."}
    )
    srste_placement: str = field(default="gradient", metadata={"help": f"One of {SRSTE_PLACEMENTS}."})
    distill_alpha: float = field(default=2.0, metadata={"help": "Weight of the KL distillation term."})
    distill_temperature: float = field(default=2.0, metadata={"help": "Softmax temperature of the KL term."})
    teacher_dtype: str | None = field(
        default=None, metadata={"help": f"Teacher dtype, one of {TEACHER_DTYPES} (default: as given)."}
    )
    frozen_mask: bool = field(default=False, metadata={"help": "Fix the step-0 mask and train kept weights only."})
    mask_init: str = field(default="magnitude", metadata={"help": f"Initial mask, one of {MASK_INITS}."})
    pruned_values: str = field(default="zero", metadata={"help": f"Restart values of pruned weights {PRUNED_VALUES}."})
    slorb_k: int | None = field(default=None, metadata={"help": "AST-Boosted: SLoRB group size k (e.g. 16)."})
    slorb_init: str = field(default="mean", metadata={"help": f"SLoRB init, one of {SLORB_INITS}."})
    slorb_trainable_projection: bool = field(
        default=False, metadata={"help": "AST-Boosted: also train the SLoRB projection X (n^2/k params per layer)."}
    )

    def __post_init__(self) -> None:
        self.validate_sparse_arguments()
        super().__post_init__()

    def validate_sparse_arguments(self) -> None:
        """Fail on bad sparse settings before the (slow) TrainingArguments setup."""
        SparsityPattern.parse(self.pattern)
        if self.targets is not None:
            compile_patterns(self.targets, "targets")
        compile_patterns(self.ignore, "ignore")
        _check_choice("mask_init", self.mask_init, MASK_INITS)
        _check_choice("pruned_values", self.pruned_values, PRUNED_VALUES)
        _check_choice("srste_placement", self.srste_placement, SRSTE_PLACEMENTS)
        if self.teacher_dtype is not None:
            _check_choice("teacher_dtype", self.teacher_dtype, TEACHER_DTYPES)
        if not isinstance(self.mask_update_interval, int) or self.mask_update_interval < 1:
            raise SparseConfigError(
                f"mask_update_interval must be a positive integer, got {self.mask_update_interval!r}."
            )
        if self.srste_decay < 0:
            raise SparseConfigError(f"srste_decay must be >= 0, got {self.srste_decay}.")
        if self.srste_ramp_steps is not None and self.srste_ramp_steps < 0:
            raise SparseConfigError(
                f"srste_ramp_steps must be >= 0 (0 = constant) or None, got {self.srste_ramp_steps}."
            )
        if self.distill_alpha < 0 or self.distill_temperature <= 0:
            raise SparseConfigError(
                f"Need distill_alpha >= 0 and distill_temperature > 0, got {self.distill_alpha} and "
                f"{self.distill_temperature}."
            )
        if self.pruned_values == "teacher" and self.mask_init != "pruned":
            raise SparseConfigError(
                "pruned_values='teacher' restores the pruned entries of an already pruned model; "
                "set mask_init='pruned' as well (with mask_init='magnitude' the dense weights are already there)."
            )
        _check_choice("slorb_init", self.slorb_init, SLORB_INITS)
        if self.slorb_k is not None and (
            isinstance(self.slorb_k, bool) or not isinstance(self.slorb_k, int) or self.slorb_k < 2
        ):
            raise SparseConfigError(
                f"slorb_k must be an integer >= 2 dividing the layer widths (paper: 16-64), got {self.slorb_k!r}."
            )

    @property
    def sparsity_pattern(self) -> SparsityPattern:
        """The parsed ``pattern`` (the same rule as :class:`~peft_sparse.SparsityConfig`)."""
        return SparsityPattern.parse(self.pattern)


@dataclass
class SparseTrainingArguments(SparseArgumentsMixin, TrainingArguments):
    """:class:`~transformers.TrainingArguments` plus the sparse fields of :class:`SparseArgumentsMixin`."""
