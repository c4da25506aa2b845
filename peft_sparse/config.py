"""User-facing configuration of one-shot pruning, which is also the ``quantization_config`` of a packed checkpoint."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .pruning.registry import PrunerOptions, get_pruner, get_quantizer, get_refiner
from .quantization.grid import QuantScheme
from .sparsity import SparsityPattern
from .sparsity.packing import check_codec, default_codec
from .sparsity.patterns import SCOPES

DEFAULT_PATTERN = "2:4"
QUANT_METHOD = "peft_sparse"  # the name in config.json, and the pip package a reader needs
FORMAT_VERSION = 2  # newest packed layout read (FORMAT.md); a newer one is refused with "upgrade peft_sparse"
FORMATS = ("packed", "dense", "compressed-tensors")
# How the sparsity was obtained: kept for provenance, never needed to load, so from_dict takes unknown values.
RECIPE_FIELDS = ("method", "method_options", "refine", "refine_options", "quantizer", "quantizer_options", "nsamples",
                 "seqlen", "seed")
JOINT = "joint"  # SparseGPT's sparsify+quantize in one OBS sweep; the default quantizer of method="sparsegpt"


@dataclass
class SparsityConfig(QuantizationConfigMixin):
    """What to prune and how; validated at construction so bad input fails before any work is done.

    It is also the ``quantization_config`` that transformers stores in a packed checkpoint's ``config.json`` and
    hands to peft_sparse's quantizer on load (``quant_method="peft_sparse"``). Its fields come in two groups:

    * *structure* (what a loader needs): ``pattern`` / ``sparsity``, ``targets`` / ``ignore`` and ``modules`` (the
      resolved sparse modules), ``format``, ``codec``, ``format_version``;
    * *recipe / provenance* (``RECIPE_FIELDS``, plus ``provenance``): how the sparsity was made. ``from_dict``
      accepts recipe values this version does not know (a newer method), and keys it does not know go to
      ``provenance``; a config built in code still rejects typos.

    Args:
        method: registered pruner name (``"magnitude"``, ``"wanda"``, ``"sparsegpt"``, ``"wrp"``).
        pattern: ``"N:M"`` = keep N of every M consecutive input weights (default ``"2:4"``).
        sparsity: unstructured ratio of zeros instead of ``pattern`` (e.g. ``0.5``).
        sparsity_scope: for unstructured, compare weights per output ``"row"`` or per ``"layer"``.
        targets: regular expressions over module names (``re.search``); default: every Linear/Conv1D inside the
            decoder blocks. Embeddings and ``lm_head`` are never targets unless named here.
        ignore: regular expressions of module names to leave dense.
        nsamples / seqlen / seed: calibration windows (count, tokens each, sampling seed).
        method_options: options of the chosen method, e.g. ``{"blocksize": 128, "percdamp": 0.01}`` for SparseGPT,
            ``{"alpha": 0.25}`` or ``{"block_size": 32, "blocks_per_row": 2}`` for WRP.
        refine: registered refiner run after the method on every layer it applies to (``"dsnot"``), or ``None``.
        refine_options: options of the refiner, e.g. ``{"max_cycles": 50, "eps": 0.1, "layers": "all"}``.
        bits: quantize the kept values to 4 or 8 bit integers (``None``: keep them in the model's float dtype).
        group_size: dense input columns sharing one scale (default 128; ``-1`` = one scale per output channel).
        symmetric: symmetric grid (default; zeros exact in every kernel) or an integer zero point per group.
        quantizer: how the kept values are quantized when ``bits`` is set: ``"joint"`` (inside SparseGPT's sweep;
            the default with ``method="sparsegpt"``), ``"gptq"``, ``"awq"`` or ``"rtn"`` (after pruning; ``"rtn"``
            is the default of the other methods).
        quantizer_options: options of the quantizer, e.g. ``{"percdamp": 0.01}`` for GPTQ.
        run_compressed: when a quantized checkpoint loads, run its layers on torch's CPU int4 / int8 kernels (the
            default; layers the kernels cannot take stay dequantized floats) or, ``False``, load dequantized floats
            everywhere: ``from_pretrained(path, quantization_config=SparsityConfig(run_compressed=False))``.
        format: how ``peft_sparse.save_pretrained`` writes it: ``"packed"`` (values + positions, N:M only),
            ``"dense"`` (exact zeros) or ``"compressed-tensors"`` (symmetric quantized models, dense int codes);
            ``None`` = packed for N:M, dense for unstructured.
        codec: packed position code, ``"b6x3"`` (2:4), ``"rank"`` (1:2, 4:8, 8:16) or ``"bitmask"`` (any N:M);
            ``None`` = the smallest.
        modules: the sparse module names, filled in when a model is saved or pruned on load.
        format_version: version of the packed layout (a save writes ``layout_version``).
        provenance: free-form record (calibration source, base model, keys a newer version wrote).
    """

    method: str = "wanda"
    pattern: str | None = None
    sparsity: float | None = None
    sparsity_scope: str = "row"
    targets: list[str] | None = None
    ignore: list[str] = field(default_factory=list)
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    method_options: dict[str, Any] = field(default_factory=dict)
    refine: str | None = None
    refine_options: dict[str, Any] = field(default_factory=dict)
    bits: int | None = None
    group_size: int = 128
    symmetric: bool = True
    quantizer: str | None = None
    quantizer_options: dict[str, Any] = field(default_factory=dict)
    run_compressed: bool = True
    format: str | None = None
    codec: str | None = None
    modules: list[str] | None = None
    format_version: int = FORMAT_VERSION
    provenance: dict[str, Any] = field(default_factory=dict)
    quant_method: str = QUANT_METHOD

    def __post_init__(self) -> None:
        self._check_structure()
        self._check_recipe()

    def _check_structure(self) -> None:
        if self.quant_method != QUANT_METHOD:
            raise ValueError(f"quant_method must be {QUANT_METHOD!r}, got {self.quant_method!r}.")
        if self.pattern is not None and self.sparsity is not None:
            raise ValueError(
                f"Give either pattern={self.pattern!r} (N:M) or sparsity={self.sparsity} (unstructured), not both."
            )
        if self.pattern is None and self.sparsity is None:
            self.pattern = DEFAULT_PATTERN
        if self.pattern is not None and not SparsityPattern.parse(self.pattern).is_nm:
            raise ValueError(
                f"pattern must look like 'N:M' (e.g. '2:4'); for a ratio use sparsity=, got {self.pattern!r}."
            )
        if self.sparsity_scope not in SCOPES:
            raise ValueError(f"sparsity_scope must be one of {SCOPES}, got {self.sparsity_scope!r}.")
        pattern = self.sparsity_pattern  # validates numbers
        if isinstance(self.targets, str) or isinstance(self.ignore, str):
            raise TypeError("targets and ignore are lists of regular expressions, not single strings.")
        if self.format is not None and self.format not in FORMATS:
            raise ValueError(f"Unknown format {self.format!r}; choose one of {FORMATS}.")
        if self.format == "packed" and not pattern.is_nm:
            raise ValueError(f"The packed format stores N:M patterns only, not {pattern}; use format='dense'.")
        if self.codec is not None:
            if not pattern.is_nm:
                raise ValueError("codec applies to the packed N:M format; leave it None for unstructured sparsity.")
            check_codec(self.codec, pattern.n, pattern.m)
        self.scheme  # noqa: B018  (validates bits, group_size, symmetric)
        if not isinstance(self.run_compressed, bool):
            raise ValueError(f"run_compressed must be True or False, got {self.run_compressed!r}.")
        if isinstance(self.format_version, bool) or not isinstance(self.format_version, int) or self.format_version < 1:
            raise ValueError(f"format_version must be a positive integer, got {self.format_version!r}.")
        if self.format_version > FORMAT_VERSION:
            raise ValueError(f"This checkpoint uses peft_sparse format v{self.format_version}, newer than this "
                             f"version's v{FORMAT_VERSION}: pip install -U peft_sparse.")

    def _check_recipe(self) -> None:
        for name in ("nsamples", "seqlen", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "seed" else 1):
                raise ValueError(f"{name} must be a {'non-negative' if name == 'seed' else 'positive'} integer, "
                                 f"got {value!r}.")
        self.options  # noqa: B018  (validates method name and method_options)
        if self.refine is None and self.refine_options:
            raise ValueError(
                f"refine_options {sorted(self.refine_options)} given without a refiner; set refine='dsnot'."
            )
        self.refiner_options  # noqa: B018  (validates refiner name and refine_options)
        if self.bits is None and (self.quantizer is not None or self.quantizer_options):
            raise ValueError(f"quantizer={self.quantizer!r} / quantizer_options given without bits; set bits=4 or 8.")
        if self.bits is not None and self.resolved_quantizer == JOINT and self.method != "sparsegpt":
            raise ValueError(f"quantizer='joint' (quantize inside the pruning sweep) needs method='sparsegpt', not "
                             f"{self.method!r}; use quantizer='gptq', 'awq' or 'rtn' to quantize after pruning.")
        if self.bits is not None and self.resolved_quantizer == JOINT and self.refine is not None:
            raise ValueError(f"quantizer='joint' quantizes inside SparseGPT's sweep, so refine={self.refine!r} would "
                             "move weights off their grid; use quantizer='gptq' (quantize after the refiner).")
        if self.bits is not None and self.resolved_quantizer == "awq" and self.method == "wrp":
            raise ValueError("quantizer='awq' folds scales into the layers' rows and columns, which WRP's recover "
                             "matrices would not follow; use quantizer='gptq' or 'rtn' with method='wrp'.")
        self.quantizer_config  # noqa: B018  (validates quantizer name and quantizer_options)

    @property
    def sparsity_pattern(self) -> SparsityPattern:
        if self.pattern is not None:
            return SparsityPattern.parse(self.pattern)
        return SparsityPattern(sparsity=float(self.sparsity), scope=self.sparsity_scope)

    @property
    def options(self) -> PrunerOptions:
        """The method's own options dataclass, built from ``method_options``."""
        return _build_options(get_pruner(self.method).Options, self.method_options, f"method {self.method!r}", self)

    @property
    def refiner_options(self) -> PrunerOptions | None:
        """The refiner's options dataclass, built from ``refine_options`` (``None`` without a refiner)."""
        if self.refine is None:
            return None
        return _build_options(get_refiner(self.refine).Options, self.refine_options, f"refiner {self.refine!r}", self)

    @property
    def scheme(self) -> QuantScheme | None:
        """The integer grid of the kept values, ``None`` when they stay floats."""
        return None if self.bits is None else QuantScheme(self.bits, self.group_size, self.symmetric)

    @property
    def resolved_quantizer(self) -> str | None:
        """The quantization method that runs (``None`` without ``bits``): the given one, else joint for SparseGPT."""
        if self.bits is None:
            return None
        return self.quantizer or (JOINT if self.method == "sparsegpt" else "rtn")

    @property
    def quantizer_config(self) -> PrunerOptions | None:
        """The quantizer's options dataclass, built from ``quantizer_options`` (``None`` without ``bits``)."""
        name = self.resolved_quantizer
        if name is None:
            return None
        return _build_options(get_quantizer(name).Options, self.quantizer_options, f"quantizer {name!r}", self)

    @property
    def all_options(self) -> list[PrunerOptions]:
        """Options of the method, refiner and quantizer, for the per-layer checks run before any work."""
        return [options for options in (self.options, self.refiner_options, self.quantizer_config)
                if options is not None]

    @property
    def needs_calibration(self) -> bool:
        """Whether pruning needs calibration data: a data-driven method, any refiner (DSnoT needs E[x], Var(x)), or a
        data-driven quantizer (GPTQ's Hessian, AWQ's activation scales)."""
        quantizer = self.resolved_quantizer
        return (get_pruner(self.method).needs_data or self.refine is not None
                or (quantizer is not None and get_quantizer(quantizer).needs_data))

    @property
    def resolved_format(self) -> str:
        return self.format or ("packed" if self.sparsity_pattern.is_nm else "dense")

    @property
    def resolved_codec(self) -> str | None:
        pattern = self.sparsity_pattern
        return (self.codec or default_codec(pattern.n, pattern.m)) if pattern.is_nm else None

    @property
    def layout_version(self) -> int:
        """The oldest packed layout that holds this config: v2 for quantized values or the rank codec, else v1 (so
        a peft_sparse that reads v1 only still loads it)."""
        return 2 if self.bits is not None or self.resolved_codec == "rank" else 1

    def get_loading_attributes(self) -> dict[str, Any]:
        """What ``from_pretrained(quantization_config=SparsityConfig(...))`` may change in a checkpoint's config."""
        return {"run_compressed": self.run_compressed}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    @classmethod
    def from_dict(cls, data: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        """Read a saved config (``config.json``, a prune report): the structure is checked strictly, the recipe
        is kept as written (a newer peft_sparse may know methods or options this one does not), and unknown keys go
        to ``provenance``. ``return_unused_kwargs`` / ``kwargs`` follow transformers' ``QuantizationConfigMixin``."""
        known = {f.name for f in dataclasses.fields(cls)}
        data = dict(data)
        recipe = {key: data.pop(key) for key in RECIPE_FIELDS if key in data}
        extra = {key: data.pop(key) for key in sorted(set(data) - known)}
        if extra:
            data["provenance"] = {**data.get("provenance", {}), **extra}
        config = cls(**data, method="magnitude")  # structure validated; magnitude has no options to check
        for key, value in recipe.items():
            object.__setattr__(config, key, value)
        unused = config.update(**kwargs)
        return (config, unused) if return_unused_kwargs else config


def _build_options(options_cls: type, values: dict[str, Any], owner: str, config: SparsityConfig) -> PrunerOptions:
    """Build and check an options dataclass, naming the valid keys when one is unknown."""
    known = {f.name for f in dataclasses.fields(options_cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"Unknown option(s) {unknown} for {owner}; valid options: {sorted(known) or 'none'}.")
    options = options_cls(**values)
    options.check_pattern(config.sparsity_pattern)
    return options
