"""Configuration of SPP (Sparsity-Preserved Parameter-efficient fine-tuning, Lu et al., ICML 2024)."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft.config import PeftConfig
from peft.utils import PeftType

from .._peft_types import add_peft_type

add_peft_type("SPP")


@dataclass
class SPPConfig(PeftConfig):
    """
    Configuration for [`SPPModel`].

    SPP multiplies the frozen sparse weight W (m x n) by ``Repeat_0(W_alpha (r x n), m/r) * W_beta (m x 1)`` and adds
    the result residually, so merged weights keep every zero of W (any N:M pattern survives the merge).

    Args:
        r (`int`, defaults to `16`): rows of W_alpha; must divide every targeted layer's output size.
        scaling (`float`, defaults to `1.0`): the paper's s in ``Y = X W^T + s * Dropout(X) W'^T``.
        dropout (`float`, defaults to `0.0`): dropout probability on the adapter branch's input.
        target_modules (`list[str]` or `str`, *optional*): modules to adapt; ``"all-linear"`` or names/regex as in
            LoRA. Defaults to all attention and MLP projections for known architectures.
        exclude_modules (`list[str]` or `str`, *optional*): modules never adapted.
        init_weights (`bool`, defaults to `True`): zero W_beta so the adapted model starts identical to the pruned
            one (the paper's choice). ``False`` draws W_beta at random, only useful for tests.
        memory_efficient (`bool`, defaults to `True`): use the block form of the paper's Eq. 7, which never builds
            the m x n multiplier. ``False`` uses the naive formula (for benchmarks and checks).
        modules_to_save (`list[str]`, *optional*): extra modules trained and saved in full (e.g. a score head).
    """

    r: int = field(default=16, metadata={"help": "Rows of W_alpha; must divide each target's output size."})
    scaling: float = field(default=1.0, metadata={"help": "Scale s of the residual SPP branch."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the SPP branch input."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or regex to adapt, or 'all-linear'."}
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or regex to exclude."}
    )
    init_weights: bool = field(default=True, metadata={"help": "Zero-initialise W_beta (identity at start)."})
    memory_efficient: bool = field(default=True, metadata={"help": "Block-form forward (paper Eq. 7)."})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules to train and save in full."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.SPP
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"SPPConfig.r must be a positive integer (got {self.r!r}); the paper uses r=16.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"SPPConfig.dropout must be in [0, 1) (got {self.dropout!r}).")
        if not isinstance(self.scaling, (int, float)) or isinstance(self.scaling, bool):
            raise TypeError(f"SPPConfig.scaling must be a number (got {self.scaling!r}).")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, set(value))
