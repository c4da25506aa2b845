"""Peak memory of one SPP training step (block form vs naive) against LoRA at the same batch.

Two measures per variant, each in a fresh subprocess so that peaks do not leak between variants:
- ``saved_MiB``: bytes autograd keeps for backward (unique storages, parameters excluded), counted exactly with
  ``torch.autograd.graph.saved_tensors_hooks``;
- ``peak_rss_MiB``: the rise of the process's peak RSS (``ru_maxrss``) during forward + backward, which also sees
  temporaries such as the naive form's m x n multipliers.

Model: a SmolLM2-shaped Llama (30 layers, hidden 576, MLP 1536, 9/3 heads) with a small vocabulary so that the
logits do not dominate; every projection is adapted with rank/r = 16.

    python bench/spp_memory.py [--layers 30 --batch 2 --seqlen 512]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

VARIANTS = ("frozen", "lora", "spp", "spp_naive")
RESULTS = Path(__file__).parent / "results" / "spp_memory.json"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(variant: str, layers: int) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import peft_sparse

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=1024, max_position_embeddings=2048,
    )
    model = LlamaForCausalLM(config)
    if variant == "frozen":
        return model.requires_grad_(False).train()
    if variant == "lora":
        adapter = LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS)
    else:
        adapter = peft_sparse.SPPConfig(r=16, target_modules=TARGETS, memory_efficient=variant == "spp")
    return get_peft_model(model, adapter).train()


def saved_bytes_hooks(params: set[int]):
    """Context manager counting unique non-parameter storages saved for backward."""
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), seen


def measure(variant: str, layers: int, batch: int, seqlen: int) -> dict:
    torch.set_num_threads(2)
    model = build(variant, layers)
    ids = torch.randint(0, 1024, (batch, seqlen), generator=torch.Generator().manual_seed(0))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    hooks, seen = saved_bytes_hooks(params)
    embeddings = model.get_input_embeddings()
    embeddings.register_forward_hook(lambda m, i, o: o.requires_grad_(True))  # frozen: still build the graph
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with hooks:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    seconds = time.perf_counter() - start
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "variant": variant,
        "trainable_params": trainable,
        "saved_MiB": round(sum(seen.values()) / 2**20, 1),
        "peak_rss_MiB": round((rss_peak - rss_before) / 1024, 1),
        "step_s": round(seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: one subprocess each
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args.layers, args.batch, args.seqlen)))
        return
    shape = ["--layers", str(args.layers), "--batch", str(args.batch), "--seqlen", str(args.seqlen)]
    rows = []
    for variant in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--variant", variant, *shape], check=True, capture_output=True,
                             text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'variant':<10} {'trainable':>10} {'saved MiB':>10} {'peak RSS MiB':>13} {'step s':>7}")
    for row in rows:
        print(f"{row['variant']:<10} {row['trainable_params']:>10} {row['saved_MiB']:>10} {row['peak_rss_MiB']:>13} "
              f"{row['step_s']:>7}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"setup": vars(args) | {"variant": None, "torch": torch.__version__},
                                   "rows": rows}, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
