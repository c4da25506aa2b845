"""FSDP2 (``fully_shard``) on 2 CPU processes (gloo): the twin of the FSDP1 test in ``test_ddp_training.py``.

Each rank holds a DTensor shard of every weight outside the forward (masks are whole buffers). Checked against one
process on the same global batch: masks, ``finalize_sparse_layers`` (pruned shard by shard, N:M checked on the gathered
weight), and a ``torch.distributed.checkpoint`` round trip of the sparse state (sharded weights + masks) into a
differently initialised model. Also: ``SparseTrainer`` says when FSDP was asked for but is not what runs.

Run directly (``torchrun --nproc_per_node 2 tests/test_fsdp2.py OUT``) this file is the worker.
"""

from __future__ import annotations

import logging
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_ddp_training import (  # noqa: E402
    PATTERN,
    TORCHRUN,
    assert_ranks_match_reference,
    fsdp_steps,
    launch_two_ranks,
    sparse_tiny_llama,
)
from test_training import TokenDataset, make_args, tiny_llama  # noqa: E402

from peft_sparse import SparseTrainer  # noqa: E402
from peft_sparse.training import attach_sparse_layers, finalize_sparse_layers, mask_state_dict  # noqa: E402


def _sharded(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    for block in model.model.layers:
        fully_shard(block)
    return fully_shard(model)


def _gathered(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in
            model.state_dict().items()}


def fsdp2_worker(out: str) -> None:
    import torch.distributed.checkpoint as dcp

    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    model = _sharded(sparse_tiny_llama())
    fsdp_steps(model, TokenDataset().ids[2 * rank:2 * rank + 2])
    layers = {n: m for n, m in model.named_modules() if hasattr(m, "sparse_mask")}
    assert type(next(iter(layers.values())).weight).__name__ == "DTensor"  # really sharded
    dcp.save({"model": model.state_dict(), "masks": mask_state_dict(layers)}, checkpoint_id=os.path.join(out, "dcp"))

    restored = tiny_llama(seed=1)  # other weights, hence other magnitude masks, until loaded
    restored_layers = attach_sparse_layers(restored, PATTERN)
    _sharded(restored)
    state = {"model": restored.state_dict(), "masks": mask_state_dict(restored_layers)}
    dcp.load(state, checkpoint_id=os.path.join(out, "dcp"))
    restored.load_state_dict(state["model"])

    masks = {f"{n}.sparse_mask": m.sparse_mask.clone() for n, m in layers.items()}
    finalize_sparse_layers(model, layers, PATTERN)
    finalize_sparse_layers(restored, restored_layers, PATTERN)
    torch.save({**_gathered(model), **masks}, os.path.join(out, f"fsdp2-rank{rank}.pt"))
    torch.save(_gathered(restored), os.path.join(out, f"restored-rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_fsdp2_fully_shard_matches_single_process_and_round_trips_through_dcp(tmp_path):
    launch_two_ranks(TORCHRUN, __file__, str(tmp_path))
    ranks = [torch.load(tmp_path / f"fsdp2-rank{r}.pt") for r in range(2)]
    assert_ranks_match_reference(ranks)
    for rank in range(2):  # the DCP round trip restores weights and masks exactly: same finalized model
        restored = torch.load(tmp_path / f"restored-rank{rank}.pt")
        assert restored.keys() == {k for k in ranks[rank] if not k.endswith("sparse_mask")}
        assert all(torch.equal(restored[key], ranks[rank][key]) for key in restored)


def test_trainer_says_when_fsdp_was_asked_for_but_does_not_run(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # accelerate launch --use_fsdp on a machine without GPUs
    with caplog.at_level(logging.WARNING, logger="peft_sparse.training.trainer"):
        trainer = SparseTrainer(model=tiny_llama(), args=make_args(tmp_path), train_dataset=TokenDataset())
    assert not trainer.is_fsdp_enabled
    warnings = [r.getMessage() for r in caplog.records if "FSDP was requested" in r.getMessage()]
    assert len(warnings) == 1 and "one process" in warnings[0] and "fully_shard" in warnings[0]
    caplog.clear()
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    with caplog.at_level(logging.WARNING, logger="peft_sparse.training.trainer"):
        SparseTrainer(model=tiny_llama(), args=make_args(tmp_path), train_dataset=TokenDataset())
    assert "FSDP was requested" not in caplog.text


if __name__ == "__main__":
    fsdp2_worker(sys.argv[1])
