"""What the 2:4 kernel path can check without a GPU: refusals before any swap, and that the packed values are the
values torch's CUTLASS layout stores (through torch's pure-Python conversions)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model
from torch.sparse._semi_structured_conversions import (
    sparse_semi_structured_from_dense_cutlass,
    sparse_semi_structured_to_dense_cutlass,
)

from peft_sparse import SparsityConfig, prune, to_semi_structured
from peft_sparse.export.semi_structured import check_semi_structured
from peft_sparse.sparsity import nm_mask, packing


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_packed_values_are_the_cutlass_values(dtype):
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)).to(dtype)
    w = w * nm_mask(w.abs().float(), 2, 4)
    values, _ = packing.pack(w, 2, 4, "b6x3")
    cutlass_values, cutlass_meta = sparse_semi_structured_from_dense_cutlass(w)
    assert torch.equal(cutlass_values, values)
    assert torch.equal(sparse_semi_structured_to_dense_cutlass(values, cutlass_meta), w)


def test_to_semi_structured_refuses_before_swapping():
    model = make_tiny_model("llama")
    prune(model, SparsityConfig(method="magnitude"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="CUDA GPU"):
        to_semi_structured(model)
    with pytest.raises(ValueError, match="Unknown backend"):
        to_semi_structured(model, backend="triton")
    with pytest.raises(TypeError, match="Conv1D"):
        to_semi_structured(make_tiny_model("gpt2"))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_check_semi_structured_dtype_and_shape(monkeypatch):
    layer = torch.nn.Linear(64, 32)
    fake_cuda = torch.device("cuda")
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: fake_cuda))
    with pytest.raises(TypeError, match="bfloat16"):
        check_semi_structured("l", layer, "cutlass")
    layer.to(torch.float16)
    with pytest.raises(ValueError, match=r"multiple of \(32, 64\)"):
        check_semi_structured("l", torch.nn.Linear(48, 32).half(), "cutlass")
    with pytest.raises(ValueError, match="not 2:4"):
        check_semi_structured("l", layer, "cusparselt")
