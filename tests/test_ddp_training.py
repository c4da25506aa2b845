"""Distributed sparse training on 2 CPU processes (gloo, no GPU needed) against one process on the same global batch.

* DDP: SparseTrainer under ``accelerate launch --multi_gpu``.
* FSDP (``use_orig_params``): the masked layers inside ``FullyShardedDataParallel`` (torch level: accelerate and
  Trainer only enable FSDP on GPUs). Outside the forward each rank holds a 1-D shard of every weight, so this checks
  that masks are recomputed on the full weight inside the forward, that the SR-STE decay added in backward is
  reduce-scattered like a gradient, and that ``finalize_sparse_layers`` hard-prunes the whole (gathered) weights.

Run directly (``python tests/test_ddp_training.py OUT`` or ``torchrun ... tests/test_ddp_training.py OUT fsdp``) this
file is the worker each process executes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_training import TokenDataset, make_args, tiny_llama  # noqa: E402

from peft_sparse import SparseTrainer  # noqa: E402
from peft_sparse.sparsity import SparsityPattern, follows_nm  # noqa: E402
from peft_sparse.training import attach_sparse_layers, finalize_sparse_layers  # noqa: E402
from peft_sparse.training.layers import full_weights  # noqa: E402

# Global batch 4 per step either way: 2 processes x 1 sample x 2 accumulation steps, or 1 process x 4 samples.
DISTRIBUTED = dict(per_device_train_batch_size=1, gradient_accumulation_steps=2)
SINGLE = dict(per_device_train_batch_size=4, gradient_accumulation_steps=1)
PATTERN = SparsityPattern.parse("2:4")


def run(output_dir: str, placement: str, batching: dict) -> SparseTrainer:
    args = make_args(output_dir, max_steps=4, srste_placement=placement, srste_decay=0.05, srste_ramp_steps=0,
                     distill_alpha=1.0, **batching)
    trainer = SparseTrainer(model=tiny_llama(), args=args, train_dataset=TokenDataset(), teacher=tiny_llama(seed=1))
    trainer.train()
    return trainer


def state_of(trainer: SparseTrainer) -> dict[str, torch.Tensor]:
    layers = trainer.sparse_layers.items()
    return {**{f"{n}.weight": m.weight.detach().clone() for n, m in layers},
            **{f"{n}.mask": m.sparse_mask.clone() for n, m in layers}}


PLACEMENTS = ("gradient", "step", "update")
# "update" (the authors' optimizer) divides the smoothed update by its own RMS, a scale-free step that turns the
# float-level difference of DDP's gradient all-reduce into up to ~1e-2 lr on a few weights; masks stay identical.
# "step" takes the second moment of g + d, which nearly vanishes where the loss gradient cancels the decay on a pruned
# weight; there a rounding-level gradient difference moves 1-2 of 8192 weights by up to 3e-3 (with the KL term on;
# without it the runs agree to 5e-5). "gradient" moves a few by ~1e-5. Masks stay identical.
WEIGHT_ATOL = {"gradient": 5e-5, "step": 5e-3, "update": 5e-4}


def launch_two_ranks(launcher: list[str], script: str, *args: str) -> None:
    """Run ``script`` in 2 CPU processes (``launcher``: torch.distributed.run or accelerate launch) and check it."""
    command = [sys.executable, "-m", *launcher, script, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))}
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-4000:]


TORCHRUN = ["torch.distributed.run", "--nproc_per_node", "2"]


def fsdp_reference() -> dict[str, torch.Tensor]:
    """The finalized state of the FSDP tests' run in one process (its masks must have moved)."""
    model = sparse_tiny_llama()
    fsdp_steps(model, TokenDataset().ids[:4])
    assert any(not torch.equal(m.sparse_mask, m.initial_mask) for m in model.modules() if hasattr(m, "sparse_mask"))
    return finalized_state(model, model)


@pytest.fixture(scope="module")
def ddp_states(tmp_path_factory) -> Path:
    """One 2-process launch (startup dominates) that trains once per SR-STE placement."""
    out = tmp_path_factory.mktemp("ddp")
    launch_two_ranks(["accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                      "--mixed_precision", "no", "--dynamo_backend", "no"], __file__, str(out))
    return out


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_ddp_two_cpu_processes_match_single_process(ddp_states, tmp_path, placement):
    ranks = [torch.load(ddp_states / f"rank{r}-{placement}.pt") for r in range(2)]
    reference = state_of(run(str(tmp_path), placement, SINGLE))
    for key, value in reference.items():
        assert torch.equal(ranks[0][key], ranks[1][key]), key  # replicas stay identical, masks included
        if key.endswith(".mask"):
            assert torch.equal(ranks[0][key], value), key
            assert follows_nm(ranks[0][key.replace(".mask", ".weight")] * value, 2, 4)
        else:
            torch.testing.assert_close(ranks[0][key], value, rtol=1e-4, atol=WEIGHT_ATOL[placement])


def fsdp_steps(model: torch.nn.Module, ids: torch.Tensor, steps: int = 4) -> None:
    """Plain training loop: gradient-placement decay, mask update at step 2 (what SparseTrainer sets per step)."""
    layers = [m for m in model.modules() if hasattr(m, "sparse_mask")]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(steps):
        for layer in layers:
            layer.sparse_decay, layer.sparse_update_pending = 0.05, step == 2
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def finalized_state(root: torch.nn.Module, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Final masks, then the weights after ``finalize_sparse_layers`` on ``root`` (gathered whole under FSDP)."""
    layers = {n: m for n, m in model.named_modules() if hasattr(m, "sparse_mask")}
    masks = {f"{n}.sparse_mask": m.sparse_mask.clone() for n, m in layers.items()}  # buffers are never sharded
    finalize_sparse_layers(root, layers, PATTERN)
    with full_weights(root):
        return {**{n: t.detach().clone() for n, t in model.state_dict().items()}, **masks}


def sparse_tiny_llama() -> torch.nn.Module:
    model = tiny_llama()
    attach_sparse_layers(model, PATTERN)
    return model


def fsdp_worker(out: str) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    model = sparse_tiny_llama()
    wrapped = FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))
    fsdp_steps(wrapped, TokenDataset().ids[2 * rank:2 * rank + 2])
    state = finalized_state(wrapped, model)
    torch.save(state, os.path.join(out, f"fsdp-rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def assert_ranks_match_reference(ranks: list[dict[str, torch.Tensor]]) -> None:
    """Both ranks hold the same finalized state, exactly 2:4 (finalize hard-pruned the whole, gathered weights), with
    the single-process run's masks and, up to float rounding, its weights."""
    expected = fsdp_reference()
    mask_keys = [key for key in expected if key.endswith("sparse_mask")]
    assert mask_keys and all(follows_nm(ranks[0][key.replace("sparse_mask", "weight")], 2, 4) for key in mask_keys)
    for key, value in expected.items():
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        if key.endswith("sparse_mask"):
            assert torch.equal(ranks[0][key], value), key
        else:
            torch.testing.assert_close(ranks[0][key], value, rtol=1e-4, atol=1e-5)


def test_fsdp_use_orig_params_matches_single_process(tmp_path):
    launch_two_ranks(TORCHRUN, __file__, str(tmp_path), "fsdp")
    assert_ranks_match_reference([torch.load(tmp_path / f"fsdp-rank{r}.pt") for r in range(2)])


if __name__ == "__main__" and sys.argv[2:] == ["fsdp"]:
    fsdp_worker(sys.argv[1])
elif __name__ == "__main__":
    for placement in PLACEMENTS:
        trainer = run(os.path.join(sys.argv[1], placement), placement, DISTRIBUTED)
        torch.save(state_of(trainer), os.path.join(sys.argv[1], f"rank{trainer.args.process_index}-{placement}.pt"))
