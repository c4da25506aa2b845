"""Sequential one-shot pruning of any Hugging Face decoder-only causal LM, one decoder block at a time.

Design (as in the Wanda and SparseGPT papers, without their hard-coded ``model.model.layers``):

* the decoder blocks are the ``nn.ModuleList`` whose length is ``config.num_hidden_layers``;
* the first block's inputs and *every* block's own call arguments (``position_embeddings``, ``attention_mask``, ...)
  are captured in one forward per batch of samples in which each block is an identity stub with a recording
  pre-hook: transformers picks a block's mask and rotary embedding by ``config.layer_types[i]`` (Gemma 2/3
  alternate sliding and full attention with different RoPE; sliding-window Qwen2), so block 0's arguments are wrong
  for later blocks. The stubs need no block weights (the capture also runs on a ``meta`` skeleton);
* per block: pass 1 forwards every sample through the dense block while hooks feed each target's inputs to the
  pruner's statistics (stopping as soon as every target has seen its input); every target is pruned; pass 2
  forwards again through the pruned block to produce the next block's inputs. Only one block's activations and
  statistics are alive at a time;
* targets fed the very same input tensor (q/k/v, gate/up) share one set of statistics (exact, and it halves the
  SparseGPT Hessian work);
* a refiner (DSnoT) is composed with the pruner into one :class:`~.base.Refined` pruner whose statistics are the
  pair, so both are collected in the same pass and shared the same way;
* a result whose ``extras`` hold a recover matrix (WRP) replaces its layer by a :class:`~peft_sparse.nn.RecoverLinear`
  before pass 2, so the next block sees the recovered outputs;
* with ``bits`` set, a quantizer is composed with the pruner into one :class:`~peft_sparse.quantization.Quantized`
  pruner the same way: after a target is pruned its kept values go onto the grid (``joint``: inside SparseGPT's
  sweep), the weight holds the codes dequantized in the model's dtype (pruned entries exactly +0.0) and the layer
  records ``weight_scale`` / ``weight_zero_point``; pass 2 forwards the quantized block, so the quantization error
  of block i reaches block i+1 as the pruning error does;
* a :class:`BlockStore` says where the blocks are: in the model (with CUDA available and the model on CPU, each
  block visits the GPU in turn), or read from a checkpoint and written out one at a time (:mod:`peft_sparse.stream`).

All checks (blocks found, targets found, widths divisible by M and by the group size, per-layer option checks such
as WRP's block size) run in :func:`plan` before the model is touched.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..modeling import find_decoder_blocks, out_in, select_sparse_modules
from ..nn import RecoverLinear
from ..quantization.grid import QuantScheme, quantize_layer
from ..quantization.methods import Quantized
from ..quantization.state import record_grid, set_grid, stored_weight
from ..sparsity import SparsityPattern
from .base import Pruner, PruneResult, Refined
from .magnitude import magnitude_prune
from .registry import PrunerOptions, get_pruner, get_quantizer, get_refiner
from .report import LayerReport, PruneReport

if TYPE_CHECKING:
    from ..config import SparsityConfig

logger = logging.getLogger(__name__)

_TOKENS_PER_BATCH = 1024  # samples batched through a block up to this many tokens (bigger thrashes CPU caches)


class _StopForward(Exception):
    """Raised by a hook to end a forward early (the capture once the last block's arguments are recorded)."""


Call = tuple[tuple[Any, ...], dict[str, Any]]  # one block's positional (after the hidden states) and keyword args


@dataclass
class Batch:
    """Inputs of the current block for a few calibration samples: hidden states plus the call arguments of this
    block and of every later one (``calls[0]`` is this block's; blocks of one layer type share the same objects)."""

    hidden: torch.Tensor
    calls: tuple[Call, ...]

    @property
    def args(self) -> tuple[Any, ...]:
        return self.calls[0][0]

    @property
    def kwargs(self) -> dict[str, Any]:
        return self.calls[0][1]


@dataclass
class Plan:
    """Everything resolved and checked before any work: the decoder blocks and the target linears of each."""

    blocks: nn.ModuleList
    targets: list[dict[str, nn.Module]]


@dataclass
class _Target:
    name: str
    module: nn.Module
    stats: Any = None
    owner: _Target | None = None  # an earlier target fed the same input tensor, whose statistics we share
    sample: torch.Tensor | None = None  # first calibration sample's input, for the reconstruction error
    dense: torch.Tensor | None = None  # the fp32 weight before pruning, kept for a block stage's error

    @property
    def shared_stats(self) -> Any:
        return self.owner.stats if self.owner is not None else self.stats


def _check_not_offloaded(model: nn.Module) -> None:
    """Refuse weights that accelerate offloads (``device_map`` with ``"disk"``, or CPU offload beside a GPU): its
    hooks reload them from the offload store at every forward, so in-place pruning would be lost or fail halfway."""
    device_map = getattr(model, "hf_device_map", None) or {}
    offloaded = [name for name, device in device_map.items() if device == "disk"]
    for name, module in model.named_modules():
        hooked = getattr(getattr(module, "_hf_hook", None), "offload", False)
        if hooked and not any(name == done or name.startswith(done + ".") for done in offloaded):
            offloaded.append(name)  # outermost offloaded modules only
    if offloaded:
        raise ValueError(
            f"{', '.join(offloaded[:3])}{' ...' if len(offloaded) > 3 else ''} of this model are offloaded by "
            "accelerate (device_map with 'disk' or CPU offload), whose weights cannot be pruned in place. Prune the "
            "checkpoint block by block instead: peft_sparse.prune_checkpoint(source, output, config) or "
            "peft-sparse prune --stream (it never holds more than one block)."
        )


def plan(
    model: nn.Module,
    pattern: SparsityPattern,
    targets: list[str] | None = None,
    ignore: list[str] | tuple = (),
    options: Sequence[PrunerOptions] = (),
    scheme: QuantScheme | None = None,
) -> Plan:
    """Resolve and check blocks and targets (:func:`~peft_sparse.modeling.select_sparse_modules`); raises before
    anything is modified. Sequential pruning needs every target inside a decoder block, and with a quantization
    ``scheme`` every target's width divisible by its group size."""
    _check_not_offloaded(model)
    blocks_name, blocks = find_decoder_blocks(model)
    selected = select_sparse_modules(model, targets, ignore)
    per_block = []
    for block in blocks:
        members = {id(module) for module in block.modules()}
        per_block.append({name: module for name, module in selected.items() if id(module) in members})
    placed = {name for block_targets in per_block for name in block_targets}
    outside = [name for name in selected if name not in placed]
    if outside:
        raise ValueError(
            f"Only layers inside the decoder blocks ({blocks_name}.*) can be pruned sequentially, but targets also "
            f"match {outside[:3]}; narrow `targets` or add them to `ignore`."
        )
    for method_options in options:
        method_options.check_blocks(blocks)
    for name, module in selected.items():
        shape = tuple(out_in(module).shape)
        pattern.check_width(shape[1], name)
        if scheme is not None:
            scheme.check_width(shape[1], name)
        for method_options in options:
            method_options.check_layer(shape, name)
    return Plan(blocks=blocks, targets=per_block)


def _to_device(obj: Any, device: torch.device) -> Any:
    """Move the tensors of nested tuples/lists/dicts (block kwargs) to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_device(item, device) for item in obj)
    if isinstance(obj, dict):
        return {key: _to_device(value, device) for key, value in obj.items()}
    return obj


@contextlib.contextmanager
def _identity_blocks(blocks: Sequence[nn.Module], record: Any) -> Iterator[None]:
    """Every block returns its hidden states unchanged and reports ``(index, args, kwargs)`` to ``record`` first."""
    with contextlib.ExitStack() as stack:
        for index, block in enumerate(blocks):
            block.forward = lambda hidden_states, *args, **kwargs: hidden_states  # instance attribute: a stub
            stack.callback(block.__dict__.pop, "forward", None)
            handle = block.register_forward_pre_hook(
                lambda module, args, kwargs, index=index: record(index, args, kwargs), with_kwargs=True)
            stack.callback(handle.remove)
        yield


def capture_inputs(model: nn.Module, blocks: Sequence[nn.Module], calibration: torch.Tensor) -> list[Batch]:
    """Run the model with identity blocks and record, batch by batch, the first block's inputs and each block's own
    call arguments (the forward stops at the last block)."""
    captured: list[Batch] = []
    hidden: list[torch.Tensor] = []
    calls: list[Call] = []

    def record(index: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        kwargs = dict(kwargs)
        hidden_states = args[0] if args else kwargs.pop("hidden_states")
        if index == 0:
            hidden.append(hidden_states)
        calls.append((tuple(args[1:]), kwargs))
        if index == len(blocks) - 1:
            captured.append(Batch(hidden.pop(), tuple(calls)))
            calls.clear()
            raise _StopForward

    device = model.get_input_embeddings().weight.device
    batch_size = max(1, _TOKENS_PER_BATCH // calibration.shape[1])
    with _identity_blocks(blocks, record):
        for start in range(0, calibration.shape[0], batch_size):
            with contextlib.suppress(_StopForward):
                model(input_ids=calibration[start : start + batch_size].to(device), use_cache=False)
    return captured


def forward_block(block: nn.Module, batches: list[Batch]) -> list[Batch]:
    """The next block's inputs: each batch's hidden states replaced by this block's output."""
    outputs = []
    for batch in batches:
        out = block(batch.hidden, *batch.args, **batch.kwargs)
        outputs.append(Batch(out[0] if isinstance(out, tuple) else out, batch.calls[1:]))
    return outputs


@dataclass
class _Observer:
    """Pass-1 forward pre-hooks: feed each target's inputs to the pruner and keep what the report needs.

    Once every target of the block has seen its input the forward stops: the rest of pass 1 (at least the last
    projection's matmul) would be thrown away, since pass 2 recomputes the block's output with the pruned weights.
    """

    pruner: Pruner
    targets: list[_Target]
    first_batch: bool = True
    pending: set[str] = field(default_factory=set)
    seen: list[tuple[torch.Tensor, _Target]] = field(default_factory=list)  # holds inputs alive: no id reuse

    def hook(self, target: _Target) -> Any:
        def observe(module: nn.Module, args: tuple[Any, ...]) -> None:
            inp = args[0]
            if self.first_batch:
                target.owner = next((t for x, t in self.seen if x is inp), None)
                self.seen.append((inp, target))
                first = inp[0] if inp.dim() > 2 else inp
                target.sample = target.owner.sample if target.owner else first.detach().clone()
                if target.owner is None and self.pruner.needs_data:
                    target.stats = self.pruner.new_stats(inp.shape[-1], inp.device)
            if target.owner is None and self.pruner.needs_data:
                self.pruner.accumulate(target.stats, inp)
            self.pending.discard(target.name)
            if not self.pending:
                raise _StopForward

        return observe

    def forward(self, block: nn.Module, batch: Batch) -> None:
        self.pending = {target.name for target in self.targets}
        with contextlib.suppress(_StopForward):
            block(batch.hidden, *batch.args, **batch.kwargs)
        self.first_batch = False
        self.seen.clear()


def _collect_statistics(block: nn.Module, targets: list[_Target], pruner: Pruner, batches: list[Batch]) -> None:
    """Pass 1: forward every batch through the (still dense) block with the observers attached."""
    observer = _Observer(pruner, targets)
    handles = [target.module.register_forward_pre_hook(observer.hook(target)) for target in targets]
    try:
        for batch in batches:
            observer.forward(block, batch)
    finally:
        for handle in handles:
            handle.remove()


def reconstruction_error(x: torch.Tensor, dense: torch.Tensor, pruned: torch.Tensor) -> float:
    """``||X (W - W')^T||^2 / ||X W^T||^2`` for one sample's inputs ``x`` (tokens, in)."""
    x = x.to(device=dense.device, dtype=torch.float32)
    reference = (x @ dense.t()).square().sum()
    return float((x @ (dense - pruned).t()).square().sum() / reference.clamp_min(torch.finfo(torch.float32).tiny))


def _without_data(dense: torch.Tensor, pattern: SparsityPattern, scheme: QuantScheme | None) -> PruneResult:
    """The data-free fallback for a target no calibration token reached: magnitude pruning, round to nearest."""
    weight, keep = magnitude_prune(dense, pattern)
    if scheme is None:
        return PruneResult(weight, keep)
    quantized, scale, zero = quantize_layer(weight, keep, scheme)
    return PruneResult(quantized, keep, grid=(scale, zero))


def _stored(weight: torch.Tensor, grid: tuple[torch.Tensor, torch.Tensor | None] | None, scheme: QuantScheme | None,
            dtype: torch.dtype) -> torch.Tensor:
    """The fp32 ``weight`` as the layer will hold it: on a grid, its codes dequantized in ``dtype`` with the scale in
    ``dtype`` (so the in-memory weight is exactly what a checkpoint reloads); pruned entries are +0.0."""
    if grid is None:
        return weight.to(dtype)
    return stored_weight(weight, *grid, scheme, dtype)


def _prune_target(
    target: _Target, pruner: Pruner, device: torch.device, scheme: QuantScheme | None = None
) -> tuple[LayerReport, nn.Module | None]:
    """Prune (and with ``scheme`` quantize) one target in place; returns its report and, when the result carries a
    recover matrix, its new module."""
    start = time.perf_counter()
    matrix = out_in(target.module)
    dense = matrix.detach().to(device=device, dtype=torch.float32)
    if pruner.block_stage:
        target.dense = dense = dense.clone()  # ``dense`` may share storage with the weight
    if pruner.needs_data and target.shared_stats is None:  # e.g. an MoE expert no calibration token reached
        logger.warning("%s received no calibration input; pruning it by magnitude instead.", target.name)
        result = _without_data(dense, pruner.pattern, scheme)
    else:
        result = pruner.prune_layer(target.name, dense, target.shared_stats)
    stored = _stored(result.weight, result.grid, scheme, matrix.dtype)
    recover = result.extras.get("recover")
    effective = result.weight if result.grid is None else stored.float()  # the error covers the quantization
    effective = effective if recover is None else effective + recover
    error = None if target.sample is None else reconstruction_error(target.sample, dense, effective)
    matrix.copy_(stored)  # after the error: ``dense`` may share storage with the weight
    if result.grid is not None:
        record_grid(target.module, *result.grid)
    sparsity = float((matrix == 0).sum()) / matrix.numel()
    module = None if recover is None else RecoverLinear(target.module, recover, result.extras.get("recover_blocks"))
    extra = 0 if module is None else module.extra_nonzeros
    report = LayerReport(target.name, tuple(matrix.shape), sparsity, error, time.perf_counter() - start, extra)
    return report, module


def prune_block(
    block: nn.Module, modules: dict[str, nn.Module], pruner: Pruner, batches: list[Batch] | None, device: torch.device,
    scheme: QuantScheme | None = None,
) -> list[LayerReport]:
    """Collect statistics for the block's targets (if there is data), then prune (and quantize) them all (swapping
    in modules)."""
    targets = [_Target(name, module) for name, module in modules.items()]
    if targets and batches is not None:
        _collect_statistics(block, targets, pruner, batches)
    local_names = {id(module): name for name, module in block.named_modules()}
    reports = []
    for target in targets:
        report, replacement = _prune_target(target, pruner, device, scheme)
        if replacement is not None:
            block.set_submodule(local_names[id(target.module)], replacement)
        reports.append(report)
    if pruner.block_stage and targets:
        _quantize_block(block, targets, reports, pruner, batches, scheme, local_names)
    return reports


def _quantize_block(block: nn.Module, targets: list[_Target], reports: list[LayerReport], pruner: Pruner,
                    batches: list[Batch], scheme: QuantScheme, local_names: dict[int, str]) -> None:
    """The block stage (AWQ): quantize every pruned target at once, store it, redo its reconstruction error."""
    start = time.perf_counter()
    results = pruner.quantize_block(block, {local_names[id(t.module)]: t.module for t in targets}, batches)
    share = (time.perf_counter() - start) / len(targets)
    for target, report in zip(targets, reports):
        quantized, scale, zero, original = results[local_names[id(target.module)]]
        set_grid(target.module, quantized, scale, zero, scheme)
        if target.sample is not None:
            report.error = reconstruction_error(target.sample, target.dense, original)
        report.seconds += share
        target.dense = None


class BlockStore:
    """Where the blocks live during the walk. This one: in the model, as loaded; with CUDA available and the model on
    CPU, each block visits the GPU in turn (how a 70B is pruned on one GPU). The streamed store
    (:mod:`peft_sparse.stream`) reads each block from a checkpoint and writes it out instead."""

    def __init__(self, model: nn.Module) -> None:
        self.offload = torch.cuda.is_available() and all(p.device.type == "cpu" for p in model.parameters())

    @contextlib.contextmanager
    def capturing(self, model: nn.Module) -> Iterator[None]:
        """The modules before the first block are usable for the duration (here: always)."""
        yield

    def inputs(self, batches: list[Batch] | None, device: torch.device) -> list[Batch] | None:
        """Block inputs for the block about to run on ``device`` (the store decides where their memory lives)."""
        return _batches_to(batches, device)

    @contextlib.contextmanager
    def visit(self, index: int, block: nn.Module) -> Iterator[torch.device]:
        """Yield the device block ``index`` runs on; with ``offload`` it visits the GPU for the duration."""
        if not self.offload:
            yield next(block.parameters()).device
            return
        device = torch.device("cuda")
        block.to(device)
        try:
            yield device
        finally:
            block.to("cpu")


@contextlib.contextmanager
def _exact_fp32_matmul() -> Iterator[None]:
    """No TF32 while pruning (reference parity), restoring the user's setting afterwards."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _batches_to(batches: list[Batch] | None, device: torch.device) -> list[Batch] | None:
    """The batches with their hidden states and the current block's arguments on ``device`` (later blocks' stay)."""
    if batches is None:
        return None
    return [Batch(_to_device(b.hidden, device), (_to_device(b.calls[0], device), *b.calls[1:])) for b in batches]


def with_quantizer(pruner: Pruner, config: SparsityConfig) -> Pruner:
    """``pruner`` composed with the configured quantizer (unchanged without ``bits``)."""
    name = config.resolved_quantizer
    if name is None:
        return pruner
    return Quantized(pruner, get_quantizer(name)(config.quantizer_config, config.scheme))


def build_pruner(config: SparsityConfig) -> Pruner:
    """The configured pruner, composed with the configured refiner and quantizer if any."""
    pattern = config.sparsity_pattern
    pruner = get_pruner(config.method)(config.options, pattern)
    if config.refine is not None:
        pruner = Refined(pruner, get_refiner(config.refine)(config.refiner_options, pattern))
    return with_quantizer(pruner, config)


def run(
    model: nn.Module, config: SparsityConfig, plan: Plan, calibration: torch.Tensor | None,
    pruner: Pruner | None = None,
    store: BlockStore | None = None,
) -> PruneReport:
    """Prune ``model`` in place following ``plan``; ``calibration`` is ``(nsamples, seqlen)`` token ids or None.
    ``pruner`` replaces the configured one (``peft_sparse.quantize`` keeps an existing mask); ``store`` says where the
    blocks are (default: in ``model``)."""
    pattern = config.sparsity_pattern
    pruner = build_pruner(config) if pruner is None else pruner
    report = PruneReport(method=pruner.name, pattern=str(pattern))
    start = time.perf_counter()
    store = BlockStore(model) if store is None else store
    was_training = model.training
    model.eval()  # no dropout in the calibration forwards
    try:
        with torch.no_grad(), _exact_fp32_matmul():
            with store.capturing(model):
                batches = None if calibration is None else capture_inputs(model, plan.blocks, calibration)
            for index, block in enumerate(tqdm(plan.blocks, desc=f"{pruner.name} {pattern}", unit="block")):
                with store.visit(index, block) as device:
                    batches = store.inputs(batches, device)
                    report.layers += prune_block(block, plan.targets[index], pruner, batches, device, config.scheme)
                    if batches is not None and index + 1 < len(plan.blocks):
                        batches = forward_block(block, batches)  # pass 2: the pruned block feeds the next
    finally:
        model.train(was_training)
    report.seconds = time.perf_counter() - start
    return report
