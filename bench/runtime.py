"""Runtime benchmark: SmolLM2-135M as dense fp32 / bf16, 2:4 packed, and 2:4 + int8 / int4 on torch's CPU kernels.

Checkpoints (built once into ``--workdir``): the dense fp32 model; magnitude 2:4 packed (v1, decoded to dense floats
at load); 2:4 + int8 per channel and 2:4 + int4 with ``--group-size`` (v2, RTN of the kept values; run on the int
kernels at load). Magnitude + RTN is enough here: speed and memory do not depend on which weights are kept. A dense
int4 row quantizes the dense model in memory with the same RTN and runs it on the same int4 kernel, so the
sparsity's share (none: the kernel is dense int4) and the quantization's share are both visible.

Every row runs in a fresh process with ``--threads`` torch threads (1 and 2 by default):

* **resident MiB**: process RSS after loading and one forward minus RSS before loading (imports done): transformers
  memory-maps a dense checkpoint, whose weights become resident when the forward reads them;
* **linears MiB**: bytes the decoder linears hold in memory (weights + scales; floats or int codes);
* **load s**: ``from_pretrained`` alone; **ttft s**: load plus one 512-token prefill (time to first token);
* **prefill tok/s**: 512 WikiText-2 tokens in one forward; **decode tok/s**: 128 greedy new tokens after a 32-token
  prompt, batch 1, KV cache (``generate``); then a second, hooked run of the same decode gives **lm_head share**
  (the fraction of the decode time spent in ``lm_head``, bf16, 49k x 576: a fifth of the weights) and the
  milliseconds per token inside ``lm_head`` and inside the decoder linears: for the int4 row, what no cut of the
  per-token overhead can remove, hence a ceiling on its speed-up over dense fp32;
* **greedy**: the 128 tokens against the same checkpoint dequantized (``model.dequantize()``) in the same dtype, and in
  fp32: ``equal`` or the index of the first differing token.

    python bench/runtime.py [--threads 1 2] [--group-size 64] [--workdir /tmp/peft_sparse_runtime]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
PREFILL, PROMPT, NEW_TOKENS = 512, 32, 128

CHILD = r"""
import json, sys, time
import torch
import peft_sparse
from peft_sparse.modeling import select_sparse_modules
from peft_sparse.quantization import QuantScheme, quantize_layer, set_grid
from peft_sparse.quantization.kernels import IntLinear, to_kernels
from transformers import AutoModelForCausalLM
from transformers.utils import logging
logging.disable_progress_bar()
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
ids = torch.load(args["ids"])

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

dtype = getattr(torch, args["dtype"])
before = rss()
start = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(args["path"], dtype=dtype).eval()
load = time.perf_counter() - start
if args.get("dense_int4"):  # the same int4 kernel on the unpruned weights
    scheme = QuantScheme(4, args["group_size"])
    for module in select_sparse_modules(model).values():
        weight = module.weight.detach().float()
        set_grid(module, *quantize_layer(weight, torch.ones_like(weight, dtype=torch.bool), scheme), scheme)
    to_kernels(model, scheme)
if args.get("dequantize"):
    model.dequantize()
linears = sum(t.numel() * t.element_size() for name, m in model.named_modules()
              if ".layers." in name and (isinstance(m, (torch.nn.Linear, IntLinear)))
              for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)) if t is not None)
kernels = sum(isinstance(m, IntLinear) for m in model.modules())
with torch.no_grad():
    start = time.perf_counter()
    model(ids[:, :512], logits_to_keep=1)  # what generate() computes for the first token
    prefill = time.perf_counter() - start
    resident = rss() - before  # after a forward: a memory-mapped checkpoint is resident only once its weights are read
    prompt = ids[:, :32]
    model.generate(prompt, max_new_tokens=4, do_sample=False)  # warm-up
    start = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=128, min_new_tokens=128, do_sample=False)
    decode = time.perf_counter() - start
    # a second, hooked run: seconds inside lm_head and inside the decoder linears (the kernels where converted)
    spent = {"lm_head": 0.0, "linears": 0.0}
    def timer(key):
        def pre(module, inputs):
            module._started = time.perf_counter()
        def post(module, inputs, output):
            spent[key] += time.perf_counter() - module._started
        return pre, post
    hooks = []
    for name, module in model.named_modules():
        key = "lm_head" if module is model.lm_head else "linears" if ".layers." in name and isinstance(
            module, (torch.nn.Linear, IntLinear)) else None
        if key:
            pre, post = timer(key)
            hooks += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    start = time.perf_counter()
    model.generate(prompt, max_new_tokens=128, min_new_tokens=128, do_sample=False)
    hooked = time.perf_counter() - start
    for hook in hooks:
        hook.remove()
print(json.dumps({"load_s": load, "ttft_s": load + prefill, "prefill_tok_s": 512 / prefill,
                  "decode_tok_s": 128 / decode, "lm_head_share": spent["lm_head"] / hooked,
                  "lm_head_ms_per_token": 1000 * spent["lm_head"] / 128,
                  "linears_ms_per_token": 1000 * spent["linears"] / 128, "resident_mib": resident / 2**20,
                  "linears_mib": linears / 2**20, "kernel_layers": kernels, "tokens": out[0, 32:].tolist()}))
"""


def build_checkpoints(workdir: Path, group_size: int) -> dict[str, Path]:
    """The dense, 2:4 packed, 2:4 + int8 and 2:4 + int4 checkpoints (built once, reused)."""
    import peft_sparse
    from peft_sparse import SparsityConfig

    paths = {"dense": workdir / "dense", "2:4": workdir / "packed", "2:4+int8": workdir / "int8",
             f"2:4+int4 g{group_size}": workdir / f"int4_g{group_size}"}
    if all((path / "config.json").is_file() for path in paths.values()):
        return paths
    model, tokenizer = peft_sparse.smollm2()
    model.save_pretrained(paths["dense"])
    tokenizer.save_pretrained(paths["dense"])
    configs = {"2:4": SparsityConfig(method="magnitude"),
               "2:4+int8": SparsityConfig(method="magnitude", bits=8, group_size=-1),
               f"2:4+int4 g{group_size}": SparsityConfig(method="magnitude", bits=4, group_size=group_size)}
    for name, config in configs.items():
        model, _ = peft_sparse.smollm2()
        peft_sparse.prune(model, config)
        peft_sparse.save_pretrained(model, paths[name], tokenizer=tokenizer)
    return paths


def run_child(spec: dict) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True,
                            check=False)
    if result.returncode:
        raise RuntimeError(f"{spec}: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def first_difference(tokens: list[int], reference: list[int]) -> str:
    diff = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), None)
    return "equal" if diff is None else f"differs at {diff}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/peft_sparse_runtime"))
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "runtime.json")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    paths = build_checkpoints(args.workdir, args.group_size)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(paths["dense"])
    ids_path = args.workdir / "ids.pt"
    text = WIKITEXT.read_text()[:20000]
    torch.save(tokenizer(text, return_tensors="pt").input_ids[:, :PREFILL], ids_path)
    int4 = f"2:4+int4 g{args.group_size}"
    # (checkpoint, dtype, variant): "load" as saved (int kernels for quantized checkpoints), "dequantized" after
    # model.dequantize(), "dense int4" = the dense model quantized in memory onto the same int4 kernel
    rows = [("dense", "float32", "load"), ("dense", "bfloat16", "load"), ("2:4", "bfloat16", "load"),
            ("2:4+int8", "bfloat16", "load"), ("2:4+int8", "bfloat16", "dequantized"),
            ("2:4+int8", "float32", "dequantized"), (int4, "bfloat16", "load"), (int4, "bfloat16", "dequantized"),
            (int4, "float32", "dequantized"), ("dense", "bfloat16", "dense int4")]
    results = []
    for threads in args.threads:
        measured = {}
        for checkpoint, dtype, variant in rows:
            spec = {"path": str(paths[checkpoint]), "dtype": dtype, "threads": threads, "ids": str(ids_path),
                    "dequantize": variant == "dequantized", "dense_int4": variant == "dense int4",
                    "group_size": args.group_size}
            row = measured[checkpoint, dtype, variant] = run_child(spec)
            label = f"{checkpoint if variant != 'dense int4' else f'dense int4 g{args.group_size}'} {dtype}"
            row["row"] = label + (" dequantized" if variant == "dequantized" else "")
            print(f"[{threads} thread(s)] {row['row']}: "
                  f"{json.dumps({k: v for k, v in row.items() if k not in ('tokens', 'row')})}", flush=True)
        for (checkpoint, dtype, variant), row in measured.items():
            if checkpoint.startswith("2:4+") and variant == "load":
                same = measured[checkpoint, dtype, "dequantized"]["tokens"]
                row["greedy_vs_dequantized_same_dtype"] = first_difference(row["tokens"], same)
                row["greedy_vs_dequantized_fp32"] = first_difference(
                    row["tokens"], measured[checkpoint, "float32", "dequantized"]["tokens"])
            results.append({"threads": threads, **{k: v for k, v in row.items() if k != "tokens"}})
    dense32 = {r["threads"]: r for r in results if r["row"] == "dense float32"}
    densebf = {r["threads"]: r for r in results if r["row"] == "dense bfloat16"}
    print(f"\n{'threads':>7} {'row':<40} {'res MiB':>8} {'lin MiB':>8} {'load s':>7} {'ttft s':>7} {'prefill':>8} "
          f"{'decode':>7} {'x fp32':>6} {'x bf16':>6} {'lm_head':>7}  greedy")
    for r in results:
        speed32 = r["decode_tok_s"] / dense32[r["threads"]]["decode_tok_s"]
        speedbf = r["decode_tok_s"] / densebf[r["threads"]]["decode_tok_s"]
        greedy = r.get("greedy_vs_dequantized_same_dtype", "")
        print(f"{r['threads']:>7} {r['row']:<40} {r['resident_mib']:8.0f} {r['linears_mib']:8.1f} {r['load_s']:7.2f} "
              f"{r['ttft_s']:7.2f} {r['prefill_tok_s']:8.0f} {r['decode_tok_s']:7.1f} {speed32:6.2f} {speedbf:6.2f} "
              f"{r['lm_head_share']:7.0%}  {greedy}")
    ceilings = {}  # the decode speed-up over fp32 if everything but lm_head and the decoder linears took no time
    for r in results:
        if r["row"] == f"{int4} bfloat16":
            fp32_ms = 1000 / dense32[r["threads"]]["decode_tok_s"]
            ceilings[r["threads"]] = fp32_ms / (r["lm_head_ms_per_token"] + r["linears_ms_per_token"])
            print(f"[{r['threads']} thread(s)] {r['row']}: lm_head {r['lm_head_ms_per_token']:.1f} ms + int4 kernels "
                  f"{r['linears_ms_per_token']:.1f} ms per token against {fp32_ms:.1f} ms for a whole dense fp32 "
                  f"token: at most {ceilings[r['threads']]:.2f} x fp32 with no other cost")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "cpu_capability": torch.backends.cpu.get_cpu_capability()},
        "protocol": {"prefill_tokens": PREFILL, "prompt_tokens": PROMPT, "new_tokens": NEW_TOKENS,
                     "group_size": args.group_size, "pruning": "magnitude 2:4, RTN", "when": time.ctime()},
        "rows": results, "int4_decode_ceiling_x_fp32": ceilings}, indent=2))


if __name__ == "__main__":
    main()
