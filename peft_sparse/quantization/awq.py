"""AWQ (Lin et al., 2024, https://arxiv.org/abs/2306.00978) on a sparse weight: the AST paper's quantizer.

Faithful to mit-han-lab/llm-awq (``auto_scale.py``, ``auto_clip.py``), run as the block stage of the engine's walk
after every target of the block is pruned, on the pruned block:

* **scale search**: for each (previous op -> linears, inspected module) pair of the block, the per-input-channel
  activation magnitude ``x = mean |X|`` gives candidates ``s = x^a`` (``a = i / n_grid``, clamped >= 1e-4 and
  normalised by ``sqrt(max s * min s)``); each candidate quantizes ``W * s`` and divides by ``s`` again, and is
  scored by the mean squared error of the inspected module's output against the unquantized (sparse) block's. The
  best ``s`` is folded: the previous norm's weight (and bias) or the previous linear's rows (and bias) are divided
  by it, the linears' columns multiplied, so the block computes the same function;
* **clip search** (not for q / k, as llm-awq): per output row and group, the range ``absmax * (1 - i / n_grid)``
  for ``i < max_shrink * n_grid`` that minimises the squared error of the group's partial products over
  ``clip_tokens`` evenly strided input tokens; the kept values are clamped to it, then rounded to nearest.

On sparse weights: scaling columns / rows by positive factors keeps every pruned zero a zero, and the grid is fitted
on the kept values only (:func:`~.grid.fit_scales`), so pruned weights neither widen a range nor move a clip. The
search and clip inputs are those of the *pruned* block (one forward over the search tokens after pruning); the
reference captures them once from the dense fp16 block. llm-awq quantizes asymmetrically with a zero point by default
(its symmetric branch asserts on an unset variable); here the grid is the configured one, symmetric by default
(zeros stay exact in every kernel: design note, D1). Pairs are known for Llama-like blocks only (Llama, Mistral,
Qwen2/3, ...: an RMSNorm that scales by its weight before q/k/v and gate/up); other architectures are refused before
any work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..pruning.base import Pruner, PruneResult
from ..pruning.registry import PrunerOptions, register_quantizer
from .grid import QuantScheme, quantize_layer
from .methods import Quantizer


@dataclass(frozen=True)
class ScalePair:
    """Inputs of ``linears`` come out of ``previous`` (a norm or a linear); ``inspect``'s output scores a scale."""

    previous: str
    linears: tuple[str, ...]
    inspect: str


LLAMA_PAIRS = (  # llm-awq auto_scale.py, the LlamaDecoderLayer branch
    ScalePair("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    ScalePair("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),  # only without GQA (shapes match)
    ScalePair("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    ScalePair("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
)
NO_CLIP = ("q_proj", "k_proj")  # llm-awq: their errors are hard to measure from a linear's output alone


@dataclass(frozen=True)
class AWQOptions(PrunerOptions):
    """Args:
    n_grid: candidates per search (llm-awq: 20).
    max_shrink: the clip search tries ranges down to ``(1 - max_shrink)`` of the absmax (llm-awq: 0.5).
    search_tokens: calibration tokens used by the scale search, in whole batches of the walk (at least one, up
        to 1024 tokens); ``None``: all of them.
    clip_tokens: input tokens per linear scoring the clip search (llm-awq: 512).
    """

    n_grid: int = 20
    max_shrink: float = 0.5
    search_tokens: int | None = None
    clip_tokens: int = 512

    def __post_init__(self) -> None:
        for name in ("n_grid", "clip_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"awq {name} must be a positive integer, got {value!r}.")
        if self.search_tokens is not None and (isinstance(self.search_tokens, bool)
                                               or not isinstance(self.search_tokens, int) or self.search_tokens < 1):
            raise ValueError(f"awq search_tokens must be a positive integer or None, got {self.search_tokens!r}.")
        if isinstance(self.max_shrink, bool) or not isinstance(self.max_shrink, (int, float)) or not (
            0 <= self.max_shrink < 1
        ):
            raise ValueError(f"awq max_shrink must be in [0, 1), got {self.max_shrink!r}.")

    def check_blocks(self, blocks: nn.ModuleList) -> None:
        for block in blocks:
            block_pairs(block)


def _scales_by_weight(norm: nn.Module) -> bool:
    """Whether ``norm``'s output is its ``weight`` times a function of the input alone (so a scale can be folded into
    the weight): probed on a fixed input. False for a bias (LayerNorm) or Gemma's ``1 + weight``."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or getattr(norm, "bias", None) is not None:
        return False
    probe = torch.linspace(-1.0, 2.0, 2 * weight.shape[0], device=weight.device).reshape(2, -1).to(weight.dtype)
    with torch.no_grad():
        base = norm(probe).float()
        original = weight.detach().clone()
        weight.mul_(2)
        doubled = norm(probe).float()
        weight.copy_(original)
    return torch.allclose(doubled, 2 * base, rtol=1e-2, atol=1e-3)


def block_pairs(block: nn.Module) -> list[ScalePair]:
    """The scale pairs of a Llama-like block; raises, naming the fix, for an architecture whose pairs are unknown."""
    modules = dict(block.named_modules())
    names = {name for pair in LLAMA_PAIRS for name in (pair.previous, *pair.linears, pair.inspect)}
    missing = sorted(names - set(modules))
    bad_norms = [pair.previous for pair in LLAMA_PAIRS if pair.previous.endswith("layernorm")
                 and pair.previous in modules and not _scales_by_weight(modules[pair.previous])]
    if missing or bad_norms:
        problem = f"it has no {missing[:3]}" if missing else f"its {bad_norms} do not scale by their weight"
        raise ValueError(
            f"quantizer='awq' folds its scales into the norm / linear before each group of linears, known for "
            f"Llama-like blocks (input_layernorm -> q/k/v_proj, v_proj -> o_proj, post_attention_layernorm -> "
            f"gate/up_proj, up_proj -> down_proj); {type(block).__name__} does not match ({problem}). Use "
            "quantizer='gptq' or 'rtn' for this architecture."
        )
    v, o = modules["self_attn.v_proj"], modules["self_attn.o_proj"]
    return [pair for pair in LLAMA_PAIRS if pair.previous != "self_attn.v_proj" or v.out_features == o.in_features]


def search_scale(
    x_mean: torch.Tensor, weights: list[torch.Tensor], keeps: list[torch.Tensor], scheme: QuantScheme, n_grid: int,
    loss: Any,
) -> torch.Tensor:
    """The best per-input-channel scale on the grid ``x_mean^(i / n_grid)``: ``loss(weights)`` scores the candidate
    weights ``Q(W * s) / s`` of the linears (fp32 ``(out, in)``, their keep masks ``keeps``)."""
    best, best_scale = float("inf"), torch.ones_like(x_mean)
    for i in range(n_grid):
        scale = x_mean.pow(i / n_grid).clamp(min=1e-4)
        scale = scale / (scale.max() * scale.min()).sqrt()
        candidate = [quantize_layer(w * scale, keep, scheme)[0] / scale for w, keep in zip(weights, keeps)]
        value = loss(candidate)
        if value < best:
            best, best_scale = value, scale
    return best_scale


def search_clip(weight: torch.Tensor, keep: torch.Tensor, x: torch.Tensor, scheme: QuantScheme, n_grid: int,
                max_shrink: float, rows_per_batch: int = 64) -> torch.Tensor:
    """Per row and group, the clip ``absmax * (1 - i / n_grid)`` minimising the squared error of the group's partial
    products ``x_g . w_g`` over the tokens ``x`` ``(tokens, in)``; returns ``(out, groups)``."""
    rows, columns = weight.shape
    width = scheme.group_width(columns)
    groups = columns // width
    xg = x.float().reshape(-1, groups, width)
    best_max = torch.empty(rows, groups, dtype=torch.float32, device=weight.device)
    for r1 in range(0, rows, rows_per_batch):
        w = weight[r1 : r1 + rows_per_batch]
        k = keep[r1 : r1 + rows_per_batch]
        absmax = w.abs().reshape(w.shape[0], groups, width).amax(-1)
        reference = torch.einsum("tgc,ogc->otg", xg, w.reshape(-1, groups, width))
        errors = torch.full_like(absmax, float("inf"))
        chosen = absmax.clone()
        for i in range(int(max_shrink * n_grid)):
            limit = absmax * (1 - i / n_grid)
            bound = limit.repeat_interleave(width, dim=1)
            clipped = quantize_layer(torch.maximum(torch.minimum(w, bound), -bound), k, scheme)[0]
            out = torch.einsum("tgc,ogc->otg", xg, clipped.reshape(-1, groups, width))
            error = (out - reference).square().mean(1)
            better = error < errors
            errors = torch.where(better, error, errors)
            chosen = torch.where(better, limit, chosen)
        best_max[r1 : r1 + rows_per_batch] = chosen
    return best_max


def clip_and_quantize(weight: torch.Tensor, keep: torch.Tensor, limit: torch.Tensor | None, scheme: QuantScheme
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Clamp the kept values to ``+-limit`` per group (``None``: no clip), then round to nearest on their grid."""
    if limit is not None:
        bound = limit.repeat_interleave(scheme.group_width(weight.shape[1]), dim=1)
        weight = torch.maximum(torch.minimum(weight, bound), -bound)
    return quantize_layer(weight, keep, scheme)


class _Inputs:
    """Forward pre-hooks recording the call arguments of named submodules over the search batches."""

    def __init__(self, block: nn.Module, names: set[str]) -> None:
        self.calls: dict[str, list[tuple[tuple, dict]]] = {name: [] for name in names}
        modules = dict(block.named_modules())
        self.handles = [modules[name].register_forward_pre_hook(self._hook(name), with_kwargs=True) for name in names]

    def _hook(self, name: str) -> Any:
        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self.calls[name].append((args, kwargs))

        return record

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _first_arg(call: tuple[tuple, dict]) -> torch.Tensor:
    args, kwargs = call
    return args[0] if args else kwargs["hidden_states"]


def _with_first_arg(call: tuple[tuple, dict], value: torch.Tensor) -> tuple[tuple, dict]:
    args, kwargs = call
    if args:
        return (value, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": value}


def _output(module: nn.Module, call: tuple[tuple, dict]) -> torch.Tensor:
    out = module(*call[0], **call[1])
    return out[0] if isinstance(out, tuple) else out


@register_quantizer("awq")
class AWQQuantizer(Quantizer):
    """Activation-aware scale and clip search per block (see the module docstring); needs calibration data."""

    Options = AWQOptions
    block_stage = True

    def prune_and_quantize(self, pruner: Pruner, name: str, weight: torch.Tensor, pruner_stats: Any, stats: Any
                           ) -> PruneResult:
        """Only prune: the block stage quantizes once every target of the block is pruned."""
        return pruner.prune_layer(name, weight, pruner_stats)

    def quantize_block(self, block: nn.Module, targets: dict[str, nn.Module], batches: list[Any]
                       ) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]]:
        """Search, fold and clip on the pruned ``block``, quantize its ``targets`` (local name -> module) in place.

        Returns, per target, ``(weight on the grid as stored, scale, zero, the weight in the block's original
        coordinates)``: the last undoes the folded scales, for the reconstruction error against the dense weight.
        """
        from ..pruning.engine import forward_block  # the engine imports the quantizers: lazy

        pairs = [pair for pair in block_pairs(block) if any(name in targets for name in pair.linears)]
        search = self._search_batches(batches)
        watched = {pair.inspect for pair in pairs} | {name for pair in pairs for name in pair.linears} | set(targets)
        inputs = _Inputs(block, watched)
        try:
            forward_block(block, search)
        finally:
            inputs.remove()
        modules = dict(block.named_modules())
        column_scale = {name: None for name in targets}  # s folded into the columns (inputs divided by it)
        row_scale = {name: None for name in targets}  # s folded out of the rows (outputs divided by it)
        for pair in pairs:
            scale = self._scale_pair(pair, modules, targets, inputs.calls)
            self._fold(pair, modules, scale)
            for name in pair.linears:
                inputs.calls[name] = [_with_first_arg(c, _first_arg(c) / scale.to(_first_arg(c).dtype))
                                      for c in inputs.calls[name]]
                if name in targets:
                    column_scale[name] = scale
            if pair.previous in targets:
                row_scale[pair.previous] = scale
        results = {}
        for name, module in targets.items():
            weight = module.weight.detach().float()
            keep = weight != 0
            limit = None
            if not name.endswith(NO_CLIP):
                x = torch.cat([_first_arg(c).reshape(-1, weight.shape[1]) for c in inputs.calls[name]])
                x = x[:: max(1, x.shape[0] // self.options.clip_tokens)][: self.options.clip_tokens]
                limit = search_clip(weight, keep, x, self.scheme, self.options.n_grid, self.options.max_shrink)
            quantized, scale, zero = clip_and_quantize(weight, keep, limit, self.scheme)
            original = quantized
            if column_scale[name] is not None:
                original = original / column_scale[name]
            if row_scale[name] is not None:
                original = original * row_scale[name][:, None]
            results[name] = (quantized, scale, zero, original)
        return results

    def _search_batches(self, batches: list[Any]) -> list[Any]:
        if self.options.search_tokens is None:
            return batches
        chosen, tokens = [], 0
        for batch in batches:
            if tokens >= self.options.search_tokens:
                break
            chosen.append(batch)
            tokens += batch.hidden.shape[0] * batch.hidden.shape[1]
        return chosen

    def _scale_pair(self, pair: ScalePair, modules: dict[str, nn.Module], targets: dict[str, nn.Module],
                    calls: dict[str, list[tuple[tuple, dict]]]) -> torch.Tensor:
        """llm-awq's search for one pair; only the pair's targets are quantized in the candidates."""
        inspect = modules[pair.inspect]
        first = pair.linears[0]
        x = [_first_arg(c) for c in calls[first]]
        width = x[0].shape[-1]
        x_mean = sum(xi.abs().reshape(-1, width).float().sum(0) for xi in x) / sum(xi.numel() // width for xi in x)
        quantized = [name for name in pair.linears if name in targets]
        originals = {name: modules[name].weight.detach().clone() for name in quantized}
        inspect_calls = calls[pair.inspect]
        reference = [_output(inspect, c).float() for c in inspect_calls]
        count = sum(r.numel() for r in reference)

        def loss(candidates: list[torch.Tensor]) -> float:
            for name, weight in zip(quantized, candidates):
                modules[name].weight.data.copy_(weight.to(originals[name].dtype))
            total = sum(float((_output(inspect, c).float() - r).square().sum()) for c, r in zip(inspect_calls,
                                                                                              reference))
            return total / count

        try:
            weights = [originals[name].float() for name in quantized]
            scale = search_scale(x_mean, weights, [w != 0 for w in weights], self.scheme, self.options.n_grid, loss)
        finally:
            for name in quantized:
                modules[name].weight.data.copy_(originals[name])
        return scale

    @staticmethod
    def _fold(pair: ScalePair, modules: dict[str, nn.Module], scale: torch.Tensor) -> None:
        """``previous``'s output divided by ``scale`` (norm weight and bias, or a linear's last rows and bias), the
        linears' columns multiplied: the block's function is unchanged, pruned zeros stay zeros."""
        previous = modules[pair.previous]
        with torch.no_grad():
            if isinstance(previous, nn.Linear):
                rows = previous.weight[-scale.shape[0] :]
                rows.div_(scale.to(rows.dtype)[:, None])
                if previous.bias is not None:
                    previous.bias[-scale.shape[0] :].div_(scale.to(previous.bias.dtype))
            else:
                previous.weight.div_(scale.to(previous.weight.dtype))
            for name in pair.linears:
                weight = modules[name].weight
                weight.mul_(scale.to(weight.dtype))
