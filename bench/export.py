"""Export benchmark: SmolLM2-135M pruned 2:4 (magnitude), dense vs packed checkpoints in fp32 and bf16.

Per dtype: payload bytes of the decoder linears and of the whole checkpoint for the dense format, the packed format
and the information limit (kept values + log2(6) bits per 2:4 group), plus the real file sizes; save and load seconds
(median of ``--repeats`` fresh loads with ``AutoModelForCausalLM.from_pretrained``, one torch thread); and whether the
logits of a fresh process loading the packed checkpoint equal those of the in-memory model (bit for bit).

    python bench/export.py [--repeats 3] [--output bench/results/export.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RELOAD = """
import sys, torch
import peft_sparse
from transformers import AutoModelForCausalLM
torch.set_num_threads(1)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
torch.save(model(torch.load(sys.argv[2])).logits, sys.argv[3])
"""


def payload_bytes(directory: Path) -> dict[str, int]:
    """Tensor payload bytes per tensor name, read from the safetensors headers."""
    from safetensors import safe_open

    sizes = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():  # noqa: SIM118  (safe_open is not a dict)
                view = handle.get_slice(key)
                element = {"F32": 4, "BF16": 2, "F16": 2, "U8": 1}[view.get_dtype()]
                sizes[key] = element * int(torch.Size(view.get_shape()).numel())
    return sizes


def timed_loads(directory: Path, repeats: int) -> float:
    from transformers import AutoModelForCausalLM

    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        AutoModelForCausalLM.from_pretrained(directory)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def run(repeats: int) -> dict:
    import peft_sparse
    from peft_sparse.sparsity.packing import information_limit_nbytes

    torch.set_num_threads(1)
    base, _ = peft_sparse.smollm2()
    config = peft_sparse.SparsityConfig(method="magnitude", pattern="2:4")
    peft_sparse.prune(base, config)
    modules = list(peft_sparse.modeling.select_sparse_modules(base, config.targets, config.ignore))
    ids = torch.randint(0, base.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    results = {"model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised), 2:4 magnitude", "torch": torch.__version__,
               "machine": platform.processor() or platform.machine(), "threads": 1, "repeats": repeats}
    with tempfile.TemporaryDirectory() as scratch:
        for dtype_name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            model = base.to(dtype)
            row, element = {}, torch.finfo(dtype).bits // 8
            limit_linears = sum(information_limit_nbytes(*peft_sparse.modeling.out_in(model.get_submodule(n)).shape,
                                                         2, 4, element) for n in modules)
            for fmt in ("dense", "packed"):
                directory = Path(scratch) / f"{dtype_name}-{fmt}"
                start = time.perf_counter()
                peft_sparse.save_pretrained(model, directory, fmt, config=config)
                save_s = time.perf_counter() - start
                sizes = payload_bytes(directory)
                linears = sum(v for k, v in sizes.items() if k.rpartition(".")[0] in modules
                              or k.removesuffix("_meta").rpartition(".")[0] in modules)
                files = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
                row[fmt] = {"linear_bytes": linears, "checkpoint_payload_bytes": sum(sizes.values()),
                            "safetensors_file_bytes": files, "save_seconds": round(save_s, 3),
                            "load_seconds": round(timed_loads(directory, repeats), 3)}
            other = row["dense"]["checkpoint_payload_bytes"] - row["dense"]["linear_bytes"]
            row["limit"] = {"linear_bytes": round(limit_linears),
                            "checkpoint_payload_bytes": round(limit_linears + other)}
            packed, dense = row["packed"], row["dense"]
            row["packed_linears_vs_dense"] = round(packed["linear_bytes"] / dense["linear_bytes"], 5)
            row["packed_linears_over_limit"] = round(packed["linear_bytes"] / limit_linears - 1, 5)
            row["packed_checkpoint_vs_dense"] = round(packed["checkpoint_payload_bytes"]
                                                      / dense["checkpoint_payload_bytes"], 5)
            row["load_ratio_packed_over_dense"] = round(packed["load_seconds"] / dense["load_seconds"], 3)
            torch.save(ids, Path(scratch) / "ids.pt")
            subprocess.run([sys.executable, "-c", RELOAD, str(Path(scratch) / f"{dtype_name}-packed"),
                            str(Path(scratch) / "ids.pt"), str(Path(scratch) / "logits.pt")], check=True)
            fresh = torch.load(Path(scratch) / "logits.pt")
            with torch.no_grad():  # reference: the dense checkpoint loaded in plain transformers (no peft_sparse)
                expected = type(model).from_pretrained(Path(scratch) / f"{dtype_name}-dense")(ids).logits
            row["fresh_process_logits_identical"] = bool(torch.equal(fresh, expected))
            results[dtype_name] = row
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "export.json"))
    args = parser.parse_args()
    results = run(args.repeats)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
