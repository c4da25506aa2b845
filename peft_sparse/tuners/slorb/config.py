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

    SLoRB adds ``x X^T S^T`` to a sparse layer: the projection X (n/k x n) maps the inputs to n/k features and S
    (m x n/k) is trained. The paper's X is fixed block ones (it sums each group of k consecutive inputs), so it is
    computed as a group sum and never stored. Initialised with ``"mean"``, S_ij is the mean of the weights pruned from
    group G_ij, so the layer's output on group-constant inputs is unchanged by pruning.

    Args:
        k (`int`, defaults to `16`): inputs per group; must divide each target's input size. S adds m*n/k parameters
            per layer (1/k of the dense weight).
        init (`str`, defaults to `"mean"`): ``"mean"`` (paper, S from the pruned weights), ``"zero"`` (S = 0) or
            ``"xavier"`` (AST Table 7: Xavier-uniform X and S = 0, so the output is unchanged at step 0; X is then
            random and stored, even when frozen).
        trainable_projection (`bool`, defaults to `False`): also train X (the authors' ``--trainable_projection``,
            used in their AST-Boosted k=16 recipe). X becomes a parameter initialised to block ones (Xavier for
            ``init="xavier"``) and the forward is two matmuls instead of a group sum. Cost: n^2/k more parameters
            per layer on top of S's m*n/k, i.e. twice SLoRB's size on a square layer; for a 576 x 576 layer at
            k=16, S has 20,736 parameters and X another 20,736 (12.5% of the dense weight instead of 6.25%).
        pattern (`str`, *optional*, defaults to `"2:4"`): sparsity pattern whose magnitude mask defines the pruned
            weights for the mean init; its M must divide each target's input size. ``None`` treats the zeros already
            in the base weight as the pruned ones. Explicit per-module masks can be given to [`get_slorb_model`]
            instead. Every target is checked before any weight is pruned.
        prune_base (`bool`, defaults to `True`): apply the mask to the base weight after computing S. ``False``
            keeps the dense weights (for trainers, such as AST, that manage masks themselves).
        trainable_base (`bool`, defaults to `False`): also train the targeted base weights (AST trains both) while
            the adapter is active and loaded as trainable. With ``prune_base`` their gradient is masked so the
            pattern holds. They are saved with the base model, not in the adapter.
        target_modules, exclude_modules, modules_to_save: as in LoRA.
    """

    k: int = field(default=16, metadata={"help": "Inputs per group; adds 1/k parameters per layer."})
    init: str = field(default="mean", metadata={"help": "'mean' or 'zero' (S), or 'xavier' (X, with S = 0)."})
    pattern: str | None = field(default="2:4", metadata={"help": "Pattern whose magnitude mask is pruned."})
    prune_base: bool = field(default=True, metadata={"help": "Apply the mask to the base weight."})
    trainable_base: bool = field(default=False, metadata={"help": "Also train the targeted base weights."})
    trainable_projection: bool = field(
        default=False, metadata={"help": "Train the projection X (n/k x n): n^2/k more parameters per layer."}
    )
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
