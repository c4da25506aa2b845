"""SparseTrainer under `accelerate launch --multi_gpu` DDP: 2 CPU processes (gloo, no GPU needed) against one process on the same global batch.

Run directly (``python tests/test_ddp_training.py OUT``) this file is the worker each process executes.
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
from peft_sparse.sparsity import follows_nm  # noqa: E402

# Global batch 4 per step either way: 2 processes x 1 sample x 2 accumulation steps, or 1 process x 4 samples.
DISTRIBUTED = dict(per_device_train_batch_size=1, gradient_accumulation_steps=2)
SINGLE = dict(per_device_train_batch_size=4, gradient_accumulation_steps=1)


def run(output_dir: str, placement: str, batching: dict) -> SparseTrainer:
    args = make_args(output_dir, max_steps=4, srste_placement=placement, srste_decay=0.05, srste_ramp_steps=0,
                     distill_alpha=1.0, finalize_at_end=False, **batching)
    trainer = SparseTrainer(model=tiny_llama(), args=args, train_dataset=TokenDataset(), teacher=tiny_llama(seed=1))
    trainer.train()
    return trainer


def state_of(trainer: SparseTrainer) -> dict[str, torch.Tensor]:
    layers = trainer.sparse_layers.items()
    return {**{f"{n}.weight": m.weight.detach().clone() for n, m in layers},
            **{f"{n}.mask": m.sparse_mask.clone() for n, m in layers}}


PLACEMENTS = ("gradient", "decoupled")


@pytest.fixture(scope="module")
def ddp_states(tmp_path_factory) -> Path:
    """One 2-process launch (startup dominates) that trains once per SR-STE placement."""
    out = tmp_path_factory.mktemp("ddp")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", __file__, str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
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
            torch.testing.assert_close(ranks[0][key], value, rtol=1e-4, atol=1e-5)


if __name__ == "__main__":
    for placement in PLACEMENTS:
        trainer = run(os.path.join(sys.argv[1], placement), placement, DISTRIBUTED)
        torch.save(state_of(trainer), os.path.join(sys.argv[1], f"rank{trainer.args.process_index}-{placement}.pt"))
