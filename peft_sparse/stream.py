"""``peft_sparse.prune_checkpoint``: prune a safetensors checkpoint into a new one without ever holding the model.

The model is a skeleton on ``meta`` (``init_empty_weights(include_buffers=False)``: parameters on meta, buffers such
as the rotary ``inv_freq``, which no checkpoint holds, computed as usual). The engine walks it as always
(:func:`~peft_sparse.pruning.engine.run`, the same capture, ``prune_block`` and ``forward_block``), with a
:class:`CheckpointBlocks` store that

* loads the modules before the first block (embeddings; never the output head) for the capture, then drops them;
* reads each block's tensors from the shards just before its turn (straight to the GPU when there is one, where the
  in-memory path moves each block to it), and after it writes the block, packed or dense, to its own shard and sends
  it back to ``meta``.

The tensors outside the blocks are then copied through one at a time, ``config.json`` is written, and the shard index
last, all inside the atomic staging directory (:func:`peft_sparse.io.atomic_directory`). The output equals
``prune`` + ``save_pretrained`` tensor for tensor. Peak memory is about the runtime, one or two blocks, the pruner's
statistics and the calibration activations, whatever the depth (``bench/stream.py``).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from .config import SparsityConfig
from .export.formats import SIDE_FILE, resolve_for_save
from .export.quantizer import format_metadata, packed_state_dict
from .io import atomic_directory, check_output_dir, write_json
from .modeling import find_decoder_blocks
from .nn import merge_recovered
from .pruning import engine
from .pruning.report import PruneReport

logger = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
_RUNTIME_BYTES = 1 << 30  # interpreter, torch and transformers, beside the model, for the in-memory path
_UNLIMITED = 1 << 60  # cgroup v1 reports "no limit" as a huge number
_PIECE_BYTES = 32 << 20  # tensors copied through are read and written in pieces of about this size
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


class ShardReader:
    """The tensors of a (sharded) safetensors checkpoint, read one at a time.

    safetensors returns a zero-copy tensor over a private memory map: reading costs page cache, not anonymous memory,
    and the mapping lives as long as the tensor. A handle kept open would keep every page it touched mapped, so each
    read opens the file anew."""

    def __init__(self, directory: Path) -> None:
        index = directory / INDEX
        if index.is_file():
            files = json.loads(index.read_text())["weight_map"]
        elif (directory / "model.safetensors").is_file():
            with safe_open(directory / "model.safetensors", "pt") as handle:
                files = dict.fromkeys(handle.keys(), "model.safetensors")
        else:
            raise ValueError(f"{str(directory)!r} has no model.safetensors or {INDEX}; streamed pruning reads "
                             "safetensors checkpoints (re-save it with save_pretrained, or prune it in memory).")
        self.files = {key: directory / name for key, name in files.items()}

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def keys(self) -> list[str]:
        return list(self.files)

    def get(self, key: str, device: torch.device | str = "cpu") -> torch.Tensor:
        with safe_open(self.files[key], "pt", device=str(device)) as handle:
            return handle.get_tensor(key)

    def pieces(self, key: str, dtype: torch.dtype, piece_bytes: int = _PIECE_BYTES) -> Pieces:
        """``key`` (floats cast to ``dtype``) as row ranges of about ``piece_bytes``, each read through its own
        short-lived mapping: copying a large embedding through then maps one piece at a time, not all of it."""
        path, shape = self.files[key], self.shape(key)
        with safe_open(path, "pt") as handle:
            stored = getattr(torch, _SAFETENSORS_DTYPES[handle.get_slice(key).get_dtype()])
        target = dtype if stored.is_floating_point else stored
        rows = shape[0] if shape else 1
        step = max(1, piece_bytes // max(1, math.prod(shape[1:]) * stored.itemsize))

        def read() -> Iterator[torch.Tensor]:
            for start in range(0, rows, step):
                with safe_open(path, "pt") as handle:
                    piece = handle.get_slice(key)
                    yield (piece[start : start + step] if shape else handle.get_tensor(key)).to(target)

        return target, shape, read()

    def shape(self, key: str) -> tuple[int, ...]:
        with safe_open(self.files[key], "pt") as handle:
            return tuple(handle.get_slice(key).get_shape())

    def nbytes(self, dtype: torch.dtype) -> int:
        """Bytes of the checkpoint with its float tensors in ``dtype`` (what the in-memory path would hold)."""
        total = 0
        for path in sorted(set(self.files.values())):
            with safe_open(path, "pt") as handle:
                for key in handle.keys():
                    piece = handle.get_slice(key)
                    numel = math.prod(piece.get_shape())
                    stored = getattr(torch, _SAFETENSORS_DTYPES.get(piece.get_dtype(), "uint8"))
                    size = dtype.itemsize if stored.is_floating_point else stored.itemsize
                    total += numel * size
        return total


Pieces = tuple[torch.dtype, tuple[int, ...], Iterable[torch.Tensor]]
"""A tensor to write as (dtype, shape, its contiguous row ranges in order), so a large one need not be whole."""


def whole(tensor: torch.Tensor) -> Pieces:
    return tensor.dtype, tuple(tensor.shape), (tensor.detach().cpu(),)


def write_safetensors(path: Path, tensors: dict[str, Pieces], metadata: dict[str, str]) -> None:
    """A safetensors file written piece by piece from the tensors' own memory: ``safetensors.torch.save_file``
    first copies every tensor into one bytes object, which doubles the peak when a large embedding is copied through."""
    names = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for key, (dtype, shape, _) in tensors.items():
        size = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": names[str(dtype).removeprefix("torch.")], "shape": list(shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as out:
        out.write(len(encoded).to_bytes(8, "little"))
        out.write(encoded)
        for _, _, pieces in tensors.values():
            for piece in pieces:
                out.write(memoryview(piece.contiguous().reshape(-1).view(torch.uint8).numpy()))


class ShardWriter:
    """Writes one shard per call into ``directory`` (names fixed by the known shard count) and the index at the end."""

    def __init__(self, directory: Path, shards: int, metadata: dict[str, str]) -> None:
        self.directory, self.shards, self.metadata = directory, shards, {"format": "pt", **metadata}
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        self.written = 0

    def write(self, tensors: dict[str, Pieces]) -> None:
        self.written += 1
        name = f"model-{self.written:05d}-of-{self.shards:05d}.safetensors"
        write_safetensors(self.directory / name, tensors, self.metadata)
        for key, (dtype, shape, _) in tensors.items():
            self.weight_map[key] = name
            self.total_size += math.prod(shape) * dtype.itemsize

    def finish(self) -> None:
        if self.written != self.shards:
            raise RuntimeError(f"wrote {self.written} shards of {self.shards}")  # a bug, not a user error
        write_json(self.directory / INDEX, {"metadata": {"total_size": self.total_size},
                                            "weight_map": dict(sorted(self.weight_map.items()))})


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
_CAPTURE_MMAP_BYTES = 1 << 20  # skeleton and capture: every allocation of 1 MiB or more gets its own mapping
_BLOCK_MMAP_BYTES = 16 << 20  # a block's turn: its working tensors below 16 MiB come from the reused heap


def _mmap_threshold(size: int) -> None:
    """Serve allocations of ``size`` bytes or more from their own mappings, returned to the system when freed.

    glibc otherwise slides the threshold up to the size of each large block it frees (up to 32 MiB). Set once,
    it stays fixed for the rest of the process (glibc has no way back to the sliding one). Two settings, measured
    on hidden-1024 Llamas (``bench/stream.py``):

    * 1 MiB for the whole job keeps the peak flat (554 -> 563 MiB from 4 to 48 blocks, Wanda) but every large
      temporary of every block is a fresh mapping faulted in page by page: 1.7 M page faults on 8 blocks against
      0.6 M in memory, 1.21 x the in-memory wall time;
    * 16 MiB during the blocks lets their working tensors (activations, the weight-sized temporaries of the
      pruners) reuse heap pages as the in-memory path does: 1.0 M faults on 8 blocks, 1.09 x the in-memory time,
      the peak within 10% from 4 to 48 blocks (566 -> 598 MiB) though less flat. The heap then holds nothing that
      outlives a block (:meth:`CheckpointBlocks.inputs`), and it is trimmed after each (:func:`_release_freed_memory`).
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, size)


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the system: glibc keeps them otherwise, and anonymous memory would grow by a
    block's worth per block (measured: 394 -> 1714 MiB over 48 blocks without, flat with)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _assign(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    module.load_state_dict(tensors, assign=True, strict=False)


class CheckpointBlocks(engine.BlockStore):
    """Blocks read from a checkpoint just before their turn and written out right after it (see the module doc)."""

    def __init__(self, model: nn.Module, reader: ShardReader, writer: ShardWriter, config: SparsityConfig,
                 save_format: str, dtype: torch.dtype) -> None:
        self.model, self.reader, self.writer, self.config = model, reader, writer, config
        self.save_format, self.dtype = save_format, dtype
        self.blocks_name, _ = find_decoder_blocks(model)
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        self.merged = 0  # WRP recover matrices added into dense weights

    def inputs(self, batches: list[engine.Batch] | None, device: torch.device) -> list[engine.Batch] | None:
        """On CPU, the hidden states copied into their own mappings: the previous block's pass 2 left them on the
        heap between its temporaries, where they would pin the heap's pages through this block's turn."""
        batches = super().inputs(batches, device)
        if batches is None or device.type != "cpu":
            return batches
        _mmap_threshold(_CAPTURE_MMAP_BYTES)
        moved = [engine.Batch(batch.hidden.clone(), batch.calls) for batch in batches]
        _mmap_threshold(_BLOCK_MMAP_BYTES)
        return moved

    def _read(self, key: str, device: torch.device | str = "cpu") -> torch.Tensor:
        tensor = self.reader.get(key, device)
        return tensor.to(self.dtype) if tensor.is_floating_point() else tensor

    def _outside_modules(self) -> Iterator[tuple[str, nn.Module]]:
        """Modules outside the blocks that own tensors of the checkpoint (embeddings, norms), not the output head."""
        output = self.model.get_output_embeddings()
        for name, module in self.model.named_modules():
            if name == self.blocks_name or name.startswith(self.blocks_name + ".") or module is output:
                continue
            if any(f"{name}.{leaf}" in self.reader for leaf in module.state_dict(keep_vars=True) if "." not in leaf):
                yield name, module

    @contextlib.contextmanager
    def capturing(self, model: nn.Module) -> Iterator[None]:
        """On CPU, as the in-memory path captures a CPU model (its rotary buffers are there too)."""
        loaded = []
        for name, module in self._outside_modules():
            _assign(module, {leaf: self._read(f"{name}.{leaf}") for leaf in module.state_dict()
                             if "." not in leaf and f"{name}.{leaf}" in self.reader})
            loaded.append(module)
        try:
            yield
        finally:
            for module in loaded:
                module.to("meta")  # not needed again: copied through at the end

    @contextlib.contextmanager
    def visit(self, index: int, block: nn.Module) -> Iterator[torch.device]:
        prefix = f"{self.blocks_name}.{index}."
        _assign(block, {key: self._read(prefix + key, self.device) for key in block.state_dict()})
        block.to(self.device)  # buffers outside the state dict, if any (the parameters are there already)
        yield self.device
        if self.save_format == "packed":
            tensors = packed_state_dict(block, set(self.config.modules), self.config, prefix=prefix)
        else:
            self.merged += merge_recovered(block)  # WRP: W_N:M + W_rec as one weight, as the CLI's dense save
            tensors = {prefix + key: value for key, value in block.state_dict().items()}
        self.writer.write({key: whole(value) for key, value in tensors.items()})
        del tensors
        block.to("meta")
        _release_freed_memory()

    def copy_rest(self, keys: list[str]) -> None:
        """The tensors outside the blocks, one per shard, read and written one piece at a time."""
        for key in keys:
            self.writer.write({key: self.reader.pieces(key, self.dtype)})


def skeleton(directory: Path, dtype: torch.dtype) -> nn.Module:
    """The model of ``directory``'s config with parameters on ``meta`` and real buffers (eval mode)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory), dtype=dtype)
    model.tie_weights()  # not done on meta: a tied output head must be one tensor, stored once
    if (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model.eval()


def _outside_keys(model: nn.Module, reader: ShardReader, blocks_name: str) -> list[str]:
    """Checkpoint tensors outside the blocks that the model has (a tied output head is absent from both)."""
    names = set(model.state_dict())
    return [key for key in reader.keys() if not key.startswith(blocks_name + ".") and key in names]


def _check_covers(model: nn.Module, reader: ShardReader, name: str) -> None:
    """Refuse a checkpoint that lacks a tensor of the model or has one of another shape, before any work."""
    seen, missing, mismatched = set(), [], []
    for key, value in model.state_dict(keep_vars=True).items():
        if id(value) in seen:  # a tied weight (the output head): stored once, under its first name
            continue
        seen.add(id(value))
        if key not in reader:
            missing.append(key)
        elif reader.shape(key) != tuple(value.shape):
            mismatched.append(f"{key} {reader.shape(key)} vs {tuple(value.shape)}")
    if missing or mismatched:
        problems = "; ".join(f"{what}: {', '.join(keys[:3])}" for what, keys in
                             (("missing", missing), ("of another shape", mismatched)) if keys)
        raise ValueError(f"{name!r} does not hold the model's tensors under their names ({problems}). Streamed "
                         "pruning reads checkpoints as save_pretrained writes them; prune this one in memory.")


def memory_budget(proc: Path = Path("/proc"), cgroups: Path = Path("/sys/fs/cgroup")) -> int:
    """Bytes this process may use: the container's cgroup limit (v2 ``memory.max`` or v1
    ``memory.limit_in_bytes``, as Docker and Kubernetes set them) when there is one, else the available RAM."""
    limits = []
    with contextlib.suppress(OSError):
        for line in (proc / "self" / "cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "":  # v2
                limits.append(cgroups / path.lstrip("/") / "memory.max")
            elif "memory" in controllers.split(","):  # v1
                limits.append(cgroups / "memory" / path.lstrip("/") / "memory.limit_in_bytes")
    for candidate in limits:
        with contextlib.suppress(OSError, ValueError):
            value = int(candidate.read_text().strip())  # "max" (v2, no limit) fails here
            if value < _UNLIMITED:
                return value
    with contextlib.suppress(OSError):
        for line in (proc / "meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return _UNLIMITED


def fits_in_memory(directory: Path, dtype: torch.dtype, budget: int | None = None) -> bool:
    """Whether the in-memory path (the model in ``dtype`` plus about 1 GiB of runtime) fits ``budget``."""
    budget = memory_budget() if budget is None else budget
    return ShardReader(directory).nbytes(dtype) + _RUNTIME_BYTES <= budget


@dataclass
class CheckpointJob:
    """A streamed prune whose inputs are all checked (:meth:`prepare`); :meth:`run` does the work."""

    source: str
    directory: Path
    target: Path
    model: nn.Module
    plan: engine.Plan
    config: SparsityConfig
    resolved: SparsityConfig
    save_format: str
    dtype: torch.dtype
    calibration: torch.Tensor | None
    calibration_name: str | None
    tokenizer: Any

    @classmethod
    def prepare(cls, source: str | os.PathLike, output: str | os.PathLike, config: SparsityConfig,
                calibration: torch.Tensor | str | None = None, tokenizer: Any = None, save_format: str | None = None,
                dtype: torch.dtype = torch.float32, overwrite: bool = False) -> CheckpointJob:
        """Check everything (the path, the config, every tensor's name and shape, the pattern, the calibration,
        the output directory) before the first block is read; see :func:`prune_checkpoint` for the arguments."""
        from .models import TOKENIZER_FILES, checkpoint_directory, load_tokenizer, missing_tokenizer
        from .prune import resolve_calibration

        _mmap_threshold(_CAPTURE_MMAP_BYTES)  # before the skeleton and the capture, whose leftovers would pin the heap
        directory = checkpoint_directory(str(source))
        reader = ShardReader(directory)
        model = skeleton(directory, dtype)
        pattern = config.sparsity_pattern
        plan = engine.plan(model, pattern, config.targets, config.ignore, config.all_options)
        save_format = save_format or config.resolved_format
        if save_format == "packed" and not pattern.is_nm:
            raise ValueError(f"The packed format stores N:M patterns only, not {pattern}; use save_format='dense'.")
        resolved = resolve_for_save(model, config, save_format)
        _check_covers(model, reader, str(source))
        if tokenizer is None and any((directory / name).is_file() for name in TOKENIZER_FILES):
            tokenizer = load_tokenizer(str(directory))
        if config.needs_calibration and not isinstance(calibration, torch.Tensor) and tokenizer is None:
            raise missing_tokenizer(str(source), f"{config.method} calibration")
        ids = resolve_calibration(model, config, calibration, tokenizer)
        target = check_output_dir(str(output), overwrite)
        name = calibration if isinstance(calibration, str) or calibration is None else "token ids"
        return cls(str(source), directory, target, model, plan, config, resolved, save_format, dtype, ids,
                   name if config.needs_calibration else None, tokenizer)

    def run(self) -> PruneReport:
        """Prune block by block into a staging directory that becomes the output only when complete."""
        reader = ShardReader(self.directory)
        blocks_name, blocks = find_decoder_blocks(self.model)
        rest = _outside_keys(self.model, reader, blocks_name)
        with atomic_directory(self.target) as staging:
            metadata = format_metadata(self.resolved) if self.save_format == "packed" else {}
            writer = ShardWriter(staging, len(blocks) + len(rest), metadata)
            store = CheckpointBlocks(self.model, reader, writer, self.resolved, self.save_format, self.dtype)
            report = engine.run(self.model, self.config, self.plan, self.calibration, store=store)
            store.copy_rest(rest)
            _write_configs(self.model, staging, self.resolved, self.save_format)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(staging)
            write_json(staging / "prune_report.json", {
                "model": self.source, "calibration": self.calibration_name, "save_format": self.save_format,
                "exactly_nm": self.config.sparsity_pattern.is_nm and not store.merged, "streamed": True,
                "config": self.config.to_dict(), **report.to_dict()})
            writer.finish()  # the index last: a reader never sees a checkpoint without all its shards
        if store.merged:
            logger.warning("dense save: the recover matrices of %d layers were added into their weights, which are "
                           "no longer exactly %s.", store.merged, self.config.sparsity_pattern)
        return report


def prune_checkpoint(
    source: str | os.PathLike,
    output: str | os.PathLike,
    config: SparsityConfig,
    calibration: torch.Tensor | str | None = None,
    tokenizer: Any = None,
    save_format: str | None = None,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> PruneReport:
    """Prune the checkpoint directory ``source`` into ``output`` one decoder block at a time (see the module doc).

    Args:
        source: a local safetensors checkpoint directory of a decoder-only causal LM.
        output: the output directory, written atomically (refused if non-empty unless ``overwrite``).
        config, calibration, tokenizer: as for :func:`peft_sparse.prune`; the tokenizer defaults to ``source``'s own
            and is saved with the output.
        save_format: ``"packed"`` or ``"dense"`` (default: the config's, packed for N:M), as
            :func:`peft_sparse.save_pretrained` writes them; dense WRP weights carry their recover matrices added in.
        dtype: the dtype pruned in and saved.

    Bad input raises before the first block is read; the output equals ``prune`` + ``save_pretrained`` tensor for
    tensor.
    """
    return CheckpointJob.prepare(source, output, config, calibration, tokenizer, save_format, dtype, overwrite).run()


def _write_configs(model: nn.Module, directory: Path, resolved: SparsityConfig, save_format: str) -> None:
    """``config.json`` (and ``generation_config.json``) as ``save_pretrained`` writes them for ``save_format``."""
    model.config.architectures = [type(model).__name__]
    if save_format == "packed":
        model.config.quantization_config = resolved
    model.config.save_pretrained(directory)
    if model.can_generate():
        model.generation_config.save_pretrained(directory)
    if save_format == "dense":
        write_json(directory / SIDE_FILE, resolved.to_dict())
