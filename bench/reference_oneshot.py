"""Run the public reference pruners (locuslab/wanda, IST-DASLab/sparsegpt, zyxxmu/DSnoT, TanZhendong/WRP) side by
side with ours, unmodified.

No reference code lives in this repository. The caller passes paths to checkouts of the two repositories; their
modules are imported from there and only the plumbing that no longer fits this machine is patched, at runtime and
undone afterwards:

* CUDA calls (`Tensor.cuda`, `torch.cuda.synchronize`) become no-ops: we run on CPU.
* transformers 5 decoder layers need `position_embeddings` (RoPE cos/sin), which the references' `Catcher` never
  captures (they only keep `attention_mask`/`position_ids`); each decoder layer gets it filled in when missing.
  With SDPA and no padding transformers 5 passes `attention_mask=None` (causal), which they forward unchanged.
* Wanda's `prepare_calibration_input` allocates 128 sample buffers whatever `nsamples` is; that allocation is
  clamped to `nsamples` so its memory matches the protocol (the algorithm only ever reads `nsamples` rows).
* Wanda's pruners load C4 from the Hub themselves; `get_loaders` is pointed at the windows we pass in. Those windows
  come from the reference `get_c4` run on the local jsonl shard (`reference_calibration`), so the caller can assert
  that they equal our loader's.
* `model.seqlen`, `model.hf_device_map` and SparseGPT's module-global `args` are set as their CLIs would set them.
* DSnoT's `prune_DSnoT` loads C4 itself (2048-token windows); its `get_loaders` returns our windows instead.
* WRP's `lib/prune.py` imports its compiled Blocked-ELL CUDA kernel (`spmm_block_ell`) at module level for the
  deployment modules, which `fake_prune` never uses: an empty stand-in module satisfies the import. Its
  `check_sparsity` only prints and moves every layer to `cuda:0`; it becomes a no-op.

The algorithms themselves (Wanda's per-group Python loops, SparseGPT's column-by-column OBS solve) run exactly as
published: measuring them is the point. N:M here follows the references: `prune_n` is the number of *zeros* per M.
"""

from __future__ import annotations

import contextlib
import io
import sys
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

METHODS = ("magnitude", "wanda", "sparsegpt", "dsnot", "wrp")
PATTERNS = ("2:4", "unstructured")
REPO_FLAGS = {"sparsegpt": "sparsegpt_repo", "dsnot": "dsnot_repo", "wrp": "wrp_repo"}  # else wanda_repo


@dataclass(frozen=True)
class ReferenceRun:
    """One reference pruning call: method, pattern ("2:4" or "unstructured" at `sparsity`), and the repo paths.

    ``options`` are the reference CLI's own, for SparseGPT (``wbits``), DSnoT (``initial_method``, ``skip_layer``,
    ...) and WRP (``alpha``, or ``recover_format="block_ELL"`` with ``blocksize`` and ``topn``).
    """

    method: str
    pattern: str
    wanda_repo: Path | None = None
    sparsegpt_repo: Path | None = None
    sparsity: float = 0.5
    dsnot_repo: Path | None = None
    wrp_repo: Path | None = None
    options: tuple[tuple[str, object], ...] = ()

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"Unknown reference method {self.method!r}; choose one of {METHODS}.")
        if self.pattern not in PATTERNS:
            raise ValueError(f"Unknown reference pattern {self.pattern!r}; choose one of {PATTERNS}.")
        attribute = REPO_FLAGS.get(self.method, "wanda_repo")
        repo, flag = getattr(self, attribute), "--" + attribute.replace("_", "-")
        if repo is None or not Path(repo).is_dir():
            raise FileNotFoundError(
                f"Reference {self.method} needs a checkout of its repository; pass {flag} PATH "
                f"(got {repo!r}; see bench/README.md for how to obtain it)."
            )

    @property
    def zeros_per_group(self) -> tuple[int, int]:
        """The references' (prune_n, prune_m): zeros per group of M, (0, 0) for unstructured."""
        return (2, 4) if self.pattern == "2:4" else (0, 0)


def _import_from(repo: Path, module: str) -> types.ModuleType:
    """Import `module` with `repo` first on sys.path (each reference is a flat script collection)."""
    root = str(Path(repo).resolve())
    if root not in sys.path:
        sys.path.insert(0, root)
    __import__(module)
    return sys.modules[module]


# ----------------------------------------------------------------------------------------------- runtime patches
@contextlib.contextmanager
def _patched(obj: object, name: str, value: object) -> Iterator[None]:
    """Set `obj.name = value` for the duration of the block."""
    missing = object()
    old = vars(obj).get(name, missing)  # own attribute only: restoring must not pin an inherited one
    setattr(obj, name, value)
    try:
        yield
    finally:
        if old is missing:
            delattr(obj, name)
        else:
            setattr(obj, name, old)


def _with_position_embeddings(model: nn.Module, layer: nn.Module):
    """`layer.forward` that supplies RoPE cos/sin for positions 0..L-1 when the caller (a reference) omits them."""
    forward, rotary, cache = layer.forward, model.model.rotary_emb, {}

    def patched(hidden_states, *args, **kwargs):
        if kwargs.get("position_embeddings") is None:
            length = hidden_states.shape[1]
            if length not in cache:
                positions = torch.arange(length, device=hidden_states.device).unsqueeze(0)
                cache[length] = rotary(hidden_states, position_ids=positions)
            kwargs["position_embeddings"] = cache[length]
        return forward(hidden_states, *args, **kwargs)

    return patched


class _TorchWithSampleCount(types.ModuleType):
    """`torch` as seen by Wanda's prune module, with the hard-coded 128-sample buffer clamped to `nsamples`."""

    def __init__(self, nsamples: int) -> None:
        super().__init__("torch")
        self._nsamples = nsamples

    def __getattr__(self, name: str):
        return getattr(torch, name)

    def zeros(self, *size, **kwargs):
        shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
        if len(shape) == 3 and shape[0] == 128:
            shape = (self._nsamples, *shape[1:])
        return torch.zeros(shape, **kwargs)


@contextlib.contextmanager
def cpu_transformers5_shims(model: nn.Module, seqlen: int) -> Iterator[None]:
    """Everything the 2023 reference scripts need to run on a CPU build of torch with transformers 5."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(torch.Tensor, "cuda", lambda self, *a, **k: self))
        stack.enter_context(_patched(torch.cuda, "synchronize", lambda *a, **k: None))
        stack.enter_context(_patched(model, "seqlen", seqlen))
        stack.enter_context(_patched(model, "hf_device_map", {}))
        for layer in model.model.layers:
            stack.enter_context(_patched(layer, "forward", _with_position_embeddings(model, layer)))
        yield


# ------------------------------------------------------------------------------------------------- calibration
def _local_c4_loader(jsonl: Path):
    """A stand-in for `datasets.load_dataset("allenai/c4", ...)` that reads the local shard prefix instead."""
    import datasets

    def load_dataset(*args, data_files=None, split="train", **kwargs):
        rows = datasets.load_dataset("json", data_files=str(jsonl), split="train")
        return rows if split == "train" else rows.select(range(8))  # validation text is never used here

    return load_dataset


def reference_calibration(wanda_repo: Path, jsonl: Path, tokenizer, nsamples: int, seqlen: int, seed: int):
    """The windows Wanda's (= SparseGPT's) `get_c4` draws from `jsonl`: a list of (input_ids, targets) pairs."""
    data = _import_from(wanda_repo, "lib.data")
    with _patched(data, "load_dataset", _local_c4_loader(jsonl)):
        loader, _ = data.get_c4(nsamples, seed, seqlen, tokenizer)
    return loader


def windows_as_loader(windows: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Our (nsamples, seqlen) calibration tensor in the references' loader format."""
    loader = []
    for row in windows:
        inp = row.unsqueeze(0).clone()
        tar = inp.clone()
        tar[:, :-1] = -100
        loader.append((inp, tar))
    return loader


# ----------------------------------------------------------------------------------------------- the pruners
def _wanda_args(run: ReferenceRun, nsamples: int) -> types.SimpleNamespace:
    """The `args` namespace Wanda's `main.py` would build for this run."""
    return types.SimpleNamespace(nsamples=nsamples, seed=0, sparsity_ratio=run.sparsity, use_variant=False)


def _sparsegpt_args(run: ReferenceRun, nsamples: int) -> types.SimpleNamespace:
    """The module-global `args` of SparseGPT's `llama.py` with its CLI defaults, overridden by `run.options`."""
    prunen, prunem = run.zeros_per_group
    args = dict(
        nsamples=nsamples, sparsity=run.sparsity, prunen=prunen, prunem=prunem, blocksize=128, percdamp=0.01,
        wbits=16, minlayer=-1, maxlayer=1000, prune_only="", invert=False, true_sequential=False,
    )  # fmt: skip
    args.update(run.options)  # e.g. wbits=4: the joint sparsify+quantize mode
    return types.SimpleNamespace(**args)


def _call_wanda(run: ReferenceRun, model, tokenizer, loader) -> None:
    prune = _import_from(run.wanda_repo, "lib.prune")
    prune_n, prune_m = run.zeros_per_group
    args = _wanda_args(run, len(loader))
    cpu = torch.device("cpu")
    with _patched(prune, "get_loaders", lambda *a, **k: (loader, None)):
        with _patched(prune, "torch", _TorchWithSampleCount(len(loader))):
            fn = prune.prune_magnitude if run.method == "magnitude" else prune.prune_wanda
            fn(args, model, tokenizer, cpu, prune_n=prune_n, prune_m=prune_m)


def _call_sparsegpt(run: ReferenceRun, model, tokenizer, loader) -> None:
    llama = _import_from(run.sparsegpt_repo, "llama")
    with _patched(llama, "args", _sparsegpt_args(run, len(loader))):
        llama.llama_sequential(model, loader, torch.device("cpu"))


def _dsnot_args(run: ReferenceRun, nsamples: int) -> types.SimpleNamespace:
    """The `args` of DSnoT's `main.py` with its CLI defaults, overridden by `run.options`."""
    args = {
        "nsamples": nsamples, "seed": 0, "sparsity_ratio": run.sparsity, "initial_method": "wanda",
        "max_cycle_time": 50, "update_threshold": 0.1, "pow_of_var_regrowing": 1.0, "pow_of_var_pruning": 1.0,
        "skip_layer": "mlp", "skip_sub_layer": "no_skip", "without_DSnoT": False, "without_same_sign": True,
        "get_time_overhead": False,
    }  # fmt: skip
    args.update(run.options)
    return types.SimpleNamespace(**args)


def _call_dsnot(run: ReferenceRun, model, tokenizer, loader) -> None:
    prune = _import_from(run.dsnot_repo, "lib.prune")
    prune_n, prune_m = run.zeros_per_group
    with _patched(prune, "get_loaders", lambda *a, **k: (loader, None)):
        prune.prune_DSnoT(_dsnot_args(run, len(loader)), model, tokenizer, torch.device("cpu"), prune_n, prune_m)


def _wrp_args(run: ReferenceRun, nsamples: int) -> types.SimpleNamespace:
    """The `args` of WRP's `main.py` for `--recover` (CSR by default), overridden by `run.options`."""
    args = {"nsamples": nsamples, "sparsity_ratio": run.sparsity, "recover": True, "recover_format": "CSR",
            "alpha": 0.25, "blocksize": 64, "topn": 8}  # fmt: skip
    args.update(run.options)
    return types.SimpleNamespace(**args)


def _call_wrp(run: ReferenceRun, model, tokenizer, loader) -> None:
    sys.modules.setdefault("spmm_block_ell", types.ModuleType("spmm_block_ell"))  # CUDA kernel, unused here
    kernel = sys.modules["spmm_block_ell"]
    for name in ("blockELLSpmm_cuSparse", "create_cuSparse_Buffer", "delete_cuSparse_Buffer"):
        setattr(kernel, name, None)
    prune = _import_from(run.wrp_repo, "lib.prune")
    prune_n, prune_m = run.zeros_per_group
    with _patched(prune, "check_sparsity", lambda *a, **k: None):
        prune.fake_prune(_wrp_args(run, len(loader)), model, loader, torch.device("cpu"), prune_n, prune_m)


_CALLS = {"sparsegpt": _call_sparsegpt, "dsnot": _call_dsnot, "wrp": _call_wrp}


@torch.no_grad()
def run_reference(run: ReferenceRun, model: nn.Module, tokenizer, loader, seqlen: int) -> float:
    """Prune `model` in place with the reference code; returns the seconds spent in the reference call only."""
    call = _CALLS.get(run.method, _call_wanda)
    model.eval()
    with cpu_transformers5_shims(model, seqlen), contextlib.redirect_stdout(io.StringIO()):
        start = time.perf_counter()
        call(run, model, tokenizer, loader)
        return time.perf_counter() - start
