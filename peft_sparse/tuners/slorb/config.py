"""Configuration of SLoRB (Sparse Low-Rank Boosting, AST paper Sec. 4.4)."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft.config import PeftConfig
from peft.utils import PeftType

from ...sparsity import SparsityPattern
from .._peft_types import add_peft_type

add_peft_type("SLORB")

SLORB_INITS = ("mean", "zero", "xavier")


@dataclass
class SLoRBConfig(PeftConfig):
    """
    Configuration for [`SLoRBModel`].

    SLoRB adds ``x P^T S^T`` to a sparse layer, where P sums each group of k consecutive inputs (never materialised)
    and S (m x n/k) is trained. Initialised with ``"mean"``, S_ij is the mean of the weights pruned from group
    G_ij, so the layer's output on group-constant inputs is unchanged by pruning.

    Args:
        k (`int`, defaults to `16`): inputs per group; must divide each target's input size. Adds 1/k parameters.
        init (`str`, defaults to `"mean"`): ``"mean"`` (paper), ``"zero"`` or ``"xavier"``.
        pattern (`str`, *optional*, defaults to `"2:4"`): sparsity pattern whose magnitude mask defines the pruned
            weights for the mean init. ``None`` treats the zeros already in the base weight as the pruned ones.
            Explicit per-module masks can be given to [`get_slorb_model`] instead.
        prune_base (`bool`, defaults to `True`): apply the mask to the base weight after computing S. ``False``
            keeps the dense weights (for trainers, such as AST, that manage masks themselves).
        trainable_base (`bool`, defaults to `False`): also train the targeted base weights (AST trains both). With
            ``prune_base`` their gradient is masked so the pattern holds. They are saved with the base model, not in
            the adapter.
        target_modules, exclude_modules, modules_to_save: as in LoRA.
    """

    k: int = field(default=16, metadata={"help": "Inputs per group; adds 1/k parameters per layer."})
    init: str = field(default="mean", metadata={"help": "S initialisation: 'mean', 'zero' or 'xavier'."})
    pattern: str | None = field(default="2:4", metadata={"help": "Pattern whose magnitude mask is pruned."})
    prune_base: bool = field(default=True, metadata={"help": "Apply the mask to the base weight."})
    trainable_base: bool = field(default=False, metadata={"help": "Also train the targeted base weights."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or regex to adapt, or 'all-linear'."}
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or regex to exclude."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules to train and save in full."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.SLORB
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 2:
            raise ValueError(f"SLoRBConfig.k must be an integer >= 2 (got {self.k!r}); the paper uses k=16 to 64.")
        if self.init not in SLORB_INITS:
            raise ValueError(f"SLoRBConfig.init must be one of {SLORB_INITS} (got {self.init!r}).")
        if self.pattern is not None:
            SparsityPattern.parse(self.pattern)
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, set(value))
