"""Compression benchmark, sizes: decoder linears on disk per sparsity pattern, int4, fp32 and bf16 models.

For each pattern of AST's Table 1 (1:2, 2:4, 4:8, 8:16, 16:32, 32:64, unstructured 50%) the model is pruned by
magnitude and its kept values rounded to nearest (symmetric int4; the perplexities of better quantizers are the
quantized table's business, here only the bytes matter, and they depend on the shapes, not on the values). N:M models
are saved in the packed v2 format (codec: b6x3 for 2:4, rank for 1:2 / 4:8 / 8:16, bitmask for M >= 32); 2:4 and the
unstructured model are also saved through compressed-tensors' pack-quantized (dense int4: the pruned weights are zero
codes, so its bytes do not depend on the pattern); the unstructured model has no packed form.

Two models: SmolLM2-135M (``peft_sparse.smollm2()``) with one scale per 64 dense input columns (its hidden width 576
is 4.5 x 128, so g128 cannot tile it), every pattern in fp32 and bf16; and a randomly initialised 1-block Llama of
TinyLlama's widths (hidden 2048, MLP 5632) with g128, the issue's size target: 2:4 in fp32 and bf16, the other N:M
patterns in fp32. The 2:4 packed checkpoints are reloaded and compared bit for bit. Rows run in ``_plan``'s order
and the JSON is rewritten after each one (``--table`` prints the table of what is there).

Columns, all measured on the saved files (``peft_sparse.export.linear_sizes``): bytes of the decoder linears (codes,
positions, scales), their % of the fp32 dense linears, the same without the scales (the paper's Table 1 counts no
scales), the information limit (4 bits per kept value + log2 C(M, N) bits per group + the scales as stored) and the
ratio to it; the paper's Table 1 value beside it. Also checks that each packed checkpoint reloads bit-equal.

    python bench/compress.py [--output bench/results/compress.json] [--table]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

PATTERNS = ("1:2", "2:4", "4:8", "8:16", "16:32", "32:64", "unstructured 50%")
PAPER_TABLE_1 = {"1:2": 7.81, "2:4": 8.33, "4:8": 8.66, "8:16": 8.93, "16:32": 9.10, "32:64": 9.22}


def _sparsity_config(pattern: str, **quant):
    from peft_sparse import SparsityConfig

    if pattern.startswith("unstructured"):
        return SparsityConfig(method="magnitude", sparsity=0.5, **quant)
    return SparsityConfig(method="magnitude", pattern=pattern, **quant)


def quantize_rtn(model: torch.nn.Module, scheme) -> None:
    """Round the kept values of every sparse linear to nearest on ``scheme``'s grid (in place)."""
    from peft_sparse.modeling import out_in, select_sparse_modules
    from peft_sparse.quantization import quantize_layer, set_grid

    for module in select_sparse_modules(model).values():
        weight = out_in(module).detach().float()
        set_grid(module, *quantize_layer(weight, weight != 0, scheme), scheme)


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa)


def _measure(directory: Path, seconds: float) -> dict:
    from peft_sparse.export import linear_sizes

    sizes = linear_sizes(directory)
    return {"linear_bytes": sizes.nbytes, "scale_bytes": sizes.grid_nbytes, "limit_bytes": round(sizes.limit_nbytes),
            "pct_of_fp32": round(100 * sizes.fraction_of_fp32, 3),
            "pct_of_fp32_without_scales": round(100 * (sizes.nbytes - sizes.grid_nbytes) / (4 * sizes.weights), 3),
            "ratio_to_limit": round(sizes.ratio_to_limit, 4), "save_seconds": round(seconds, 2)}


def _wide_llama() -> torch.nn.Module:
    """A 1-block Llama with TinyLlama's widths and a small vocabulary, random weights (fp32)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=2048, intermediate_size=5632, num_hidden_layers=1,
                         num_attention_heads=32, num_key_value_heads=4)
    return AutoModelForCausalLM.from_config(config).eval()


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SMOLLM2, WIDE = "SmolLM2-135M", "Llama 2048/5632 x1 (random)"
GROUP_SIZE = {SMOLLM2: 64, WIDE: 128}
CT = "compressed-tensors"


def _plan() -> list[tuple[str, str, str, tuple[str, ...]]]:
    """Rows ``(model, pattern, dtype, formats)``, the issue's targets first (the JSON is rewritten after each row):
    2:4 of both models in both dtypes, then every pattern of SmolLM2 and the wide model in float32, then SmolLM2's
    other patterns in bfloat16. compressed-tensors (dense int4: its bytes do not depend on the pattern) for 2:4 and
    unstructured."""
    nm = [pattern for pattern in PATTERNS if ":" in pattern and pattern != "2:4"]
    unstructured = PATTERNS[-1]
    rows = [(WIDE, "2:4", dtype, ("packed",)) for dtype in DTYPES]
    rows += [(SMOLLM2, "2:4", dtype, ("packed", CT)) for dtype in DTYPES]
    rows += [(SMOLLM2, pattern, "float32", ("packed",)) for pattern in nm]
    rows += [(SMOLLM2, unstructured, "float32", (CT,))]
    rows += [(WIDE, pattern, "float32", ("packed",)) for pattern in nm]
    rows += [(SMOLLM2, pattern, "bfloat16", ("packed",)) for pattern in nm]
    rows += [(SMOLLM2, unstructured, "bfloat16", (CT,))]
    return rows


def run(output: Path, only: str | None = None) -> dict:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    import peft_sparse

    logging.disable_progress_bar()
    results = {"quantization": "magnitude pruning + RTN int4 symmetric", "torch": torch.__version__,
               "machine": platform.processor() or platform.machine(),
               "paper": "AST Table 1, % of fp32, Huffman-coded positions, no scales", "rows": []}
    builders = {SMOLLM2: lambda: peft_sparse.smollm2()[0], WIDE: _wide_llama}
    bases = {name: build() for name, build in builders.items() if only is None or name.startswith(only)}
    pruned_key, pruned = None, None
    with tempfile.TemporaryDirectory() as scratch:
        for model_name, pattern, dtype_name, formats in _plan():
            if only is not None and not model_name.startswith(only):
                continue
            if pruned_key != (model_name, pattern):
                pruned_key, pruned = (model_name, pattern), copy.deepcopy(bases[model_name])
                peft_sparse.prune(pruned, _sparsity_config(pattern))
            model = copy.deepcopy(pruned).to(DTYPES[dtype_name])
            config = _sparsity_config(pattern, bits=4, group_size=GROUP_SIZE[model_name])
            quantize_rtn(model, config.scheme)
            row = {"model": model_name, "group_size": GROUP_SIZE[model_name], "pattern": pattern,
                   "dtype": dtype_name, "paper_pct": PAPER_TABLE_1.get(pattern)}
            for fmt in formats:
                directory = Path(scratch) / "checkpoint"
                start = time.perf_counter()
                peft_sparse.save_pretrained(model, directory, fmt, config=config)
                row[fmt] = _measure(directory, time.perf_counter() - start)
                if fmt == "packed" and pattern == "2:4":
                    reloaded = AutoModelForCausalLM.from_pretrained(directory)
                    row[fmt]["reload_bit_equal"] = _same_state(reloaded, model)
                    del reloaded
            del model
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
            output.write_text(json.dumps(results, indent=2) + "\n")
    return results


def table(results: dict) -> str:
    lines = ["| model | G | pattern | dtype | format | linear bytes | % of fp32 | % without scales | paper Table 1 | "
             "limit bytes | ratio to limit |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        for fmt in ("packed", "compressed-tensors"):
            if fmt in row:
                cell = row[fmt]
                paper = "-" if row["paper_pct"] is None else f"{row['paper_pct']:.2f}%"
                lines.append(f"| {row['model']} | {row['group_size']} | {row['pattern']} | {row['dtype']} | {fmt} | "
                             f"{cell['linear_bytes']:,} | "
                             f"{cell['pct_of_fp32']:.2f}% | {cell['pct_of_fp32_without_scales']:.2f}% | {paper} | "
                             f"{cell['limit_bytes']:,} | {cell['ratio_to_limit']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "compress.json"))
    parser.add_argument("--table", action="store_true", help="only print the table of an existing --output")
    parser.add_argument("--only", help="run the rows of the models whose name starts with this (e.g. Llama)")
    args = parser.parse_args()
    output = Path(args.output)
    if not args.table:
        output.parent.mkdir(parents=True, exist_ok=True)
        run(output, args.only)
    print(table(json.loads(output.read_text())))


if __name__ == "__main__":
    main()
