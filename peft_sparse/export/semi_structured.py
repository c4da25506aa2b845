"""``to_semi_structured``: swap 2:4 ``nn.Linear`` weights to torch's semi-structured sparse tensors (CUDA only).

torch 2.13 runs 2:4 sparse tensor cores through two backends: ``"cutlass"`` (fp16/bf16 weights whose shape is a
multiple of (32, 64)) and ``"cusparselt"`` (multiples of (16, 16)). fp32 is refused: CUTLASS treats fp32 as 1:2 and
drops values of 2:4 groups, cuSPARSELt has no fp32. Nothing in torch speeds 2:4 up on CPU, so CPU is refused too.
Every layer is checked before any is swapped. The CUTLASS kept values are exactly the packed format's ``weight``
rows (see ``tests/test_export_kernels.py``), so a packed checkpoint holds what the kernel needs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ..modeling import select_sparse_modules
from ..sparsity import follows_nm

BACKENDS = {"cutlass": (32, 64), "cusparselt": (16, 16)}  # backend -> (rows, cols) multiples for fp16 / bf16
DTYPES = (torch.float16, torch.bfloat16)


def check_semi_structured(name: str, module: nn.Module, backend: str) -> None:
    """Raise, naming the layer and the fix, unless ``module`` can take a ``backend`` semi-structured weight."""
    if backend not in BACKENDS:
        raise ValueError(f"Unknown backend {backend!r}; choose one of {sorted(BACKENDS)}.")
    if type(module) is not nn.Linear:
        raise TypeError(f"{name} is {type(module).__name__}; semi-structured kernels replace nn.Linear weights only "
                        "(GPT-2 Conv1D stores the transpose).")
    weight = module.weight
    if weight.device.type != "cuda":
        raise RuntimeError(f"{name} is on {weight.device}: 2:4 sparse kernels need a CUDA GPU (torch has none for "
                           "CPU); move the model with model.cuda() first.")
    if weight.dtype not in DTYPES:
        raise TypeError(f"{name} is {weight.dtype}: 2:4 kernels take float16 / bfloat16 (fp32 sparse tensor cores are "
                        "1:2); cast with model.to(torch.bfloat16).")
    rows, cols = BACKENDS[backend]
    if weight.shape[0] % rows or weight.shape[1] % cols:
        raise ValueError(f"{name}: shape {tuple(weight.shape)} is not a multiple of ({rows}, {cols}) as the "
                         f"{backend} backend needs; leave it dense (ignore=) or try the other backend.")
    if not follows_nm(weight, 2, 4):
        raise ValueError(f"{name} is not 2:4 sparse; prune it first (peft_sparse.prune).")


@contextlib.contextmanager
def _backend(backend: str) -> Iterator[None]:
    from torch.sparse import SparseSemiStructuredTensor

    saved = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
    try:
        yield
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = saved


def to_semi_structured(model: nn.Module, backend: str = "cutlass", targets: list[str] | None = None,
                       ignore: list[str] = ()) -> list[str]:
    """Replace the 2:4 sparse linears' weights by ``to_sparse_semi_structured`` tensors in place (inference only).

    Returns the swapped module names. The model can no longer be saved or cast afterwards (the torch subclass
    supports neither); keep a packed checkpoint for that.
    """
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    modules = getattr(config, "modules", None)
    selected = ({name: model.get_submodule(name) for name in modules} if modules and targets is None
                else select_sparse_modules(model, targets, ignore))
    for name, module in selected.items():
        check_semi_structured(name, module, backend)
    from torch.sparse import to_sparse_semi_structured

    with _backend(backend):
        for module in selected.values():
            module.weight = nn.Parameter(to_sparse_semi_structured(module.weight.detach().contiguous()),
                                         requires_grad=False)
    return list(selected)
