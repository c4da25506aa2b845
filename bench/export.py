"""Export benchmark: SmolLM2-135M pruned 2:4 (magnitude), dense vs packed checkpoints in fp32 and bf16.

Per dtype: payload bytes of the decoder linears and of the whole checkpoint for the dense format, the packed format
and the information limit (kept values + log2(6) bits per 2:4 group), plus the real file sizes; save and load seconds;
and whether the logits of a fresh process loading the packed checkpoint equal those of the dense checkpoint loaded by
plain transformers (bit for bit).

Timing (one torch thread, warm page cache, medians of ``--repeats``): the two formats alternate within one process
(dense, packed, then packed, dense, ...) so that a load on a shared machine hits both alike. A load is timed twice:
``load`` is ``AutoModelForCausalLM.from_pretrained`` alone; ``load_forward`` adds the first forward pass (64 tokens).
The two differ in what they compare: transformers memory-maps a dense checkpoint and reads none of it during
``from_pretrained`` (the first forward then pages the weights in), while a packed load decodes every sparse layer into
new memory. ``load_forward`` is the like-for-like time until the model has computed with all its weights. The same two
are then timed the way a user's script meets them, in a new process per load (``fresh_process``, imports not
counted), with the files in the page cache (``warm``) and evicted from it first (``cold``: a first load from disk).
``first_touch`` is the floor any decoder into ordinary memory pays on top of the loader: a new process allocating the
decoded weights and writing them once (``torch.empty(shape).fill_(0)`` per sparse layer), so the kernel faults in that
memory. A table of the load ratios is printed at the end.

Fresh memory costs what the machine makes it cost, and that hits the packed loads (they allocate the decoded weights)
but not the memory-mapped dense ones. On the virtual machine this was measured on, memory the guest had not used
lately cost up to 4x more to touch (the hypervisor backs it on first use): first touch of the fp32 weights took
0.14-0.61 s in one run. So before the timings of each dtype a child process writes ``--warm-up-gib`` GiB once, and
every timed load starts after ``--settle`` idle seconds (both formats alike).

    python bench/export.py [--repeats 5] [--settle 5] [--warm-up-gib 6] [--output bench/results/export.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

FRESH = """
import json, sys, time
import torch
import peft_sparse
from transformers import AutoModelForCausalLM
from transformers.utils import logging
logging.disable_progress_bar()
torch.set_num_threads(1)
ids = torch.load(sys.argv[2])
start = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
loaded = time.perf_counter()
with torch.no_grad():
    model(ids)
print(json.dumps({"load": loaded - start, "load_forward": time.perf_counter() - start}))
"""

RELOAD = """
import sys, torch
import peft_sparse
from transformers import AutoModelForCausalLM
torch.set_num_threads(1)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
torch.save(model(torch.load(sys.argv[2])).logits, sys.argv[3])
"""

FIRST_TOUCH = """
import json, sys, time
import torch
torch.set_num_threads(1)
shapes, dtype = json.loads(sys.argv[1]), getattr(torch, sys.argv[2])
start = time.perf_counter()
weights = [torch.empty(shape, dtype=dtype).fill_(0) for shape in shapes]
print(json.dumps({"first_touch": time.perf_counter() - start}))
"""

WARM_UP = "import sys, torch; torch.empty(int(float(sys.argv[1]) * 2**30), dtype=torch.uint8).fill_(1)"


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


def _median(samples: list[float]) -> float:
    return round(statistics.median(samples), 3)


def _alternating(formats: tuple[str, ...], repeats: int) -> list[tuple[int, str]]:
    """(repeat, format) in ABBA order: each format goes first in every other repeat."""
    return [(r, fmt) for r in range(repeats) for fmt in (formats if r % 2 == 0 else formats[::-1])]


def timed_saves(model: torch.nn.Module, config, scratch: Path, dtype_name: str, repeats: int) -> dict[str, list]:
    """Seconds of ``peft_sparse.save_pretrained`` per format into a fresh directory (removed outside the timing)."""
    import peft_sparse

    seconds = {"dense": [], "packed": []}
    for repeat, fmt in _alternating(("dense", "packed"), repeats):
        directory = scratch / f"{dtype_name}-{fmt}-save{repeat}"
        gc.collect()
        start = time.perf_counter()
        peft_sparse.save_pretrained(model, directory, fmt, config=config)
        seconds[fmt].append(time.perf_counter() - start)
        shutil.rmtree(directory)
    return seconds


def timed_loads(directories: dict[str, Path], ids: torch.Tensor, repeats: int,
                settle: float) -> dict[str, dict[str, list]]:
    """Per format: seconds of repeated ``from_pretrained`` loads in this process and of the first forward after each."""
    from transformers import AutoModelForCausalLM

    for directory in directories.values():  # one untimed load each: imports, lazy initialisations
        AutoModelForCausalLM.from_pretrained(directory)
    samples = {fmt: {"load": [], "load_forward": []} for fmt in directories}
    for _, fmt in _alternating(tuple(directories), repeats):
        gc.collect()
        time.sleep(settle)
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(directories[fmt])
        loaded = time.perf_counter()
        with torch.no_grad():
            model(ids)
        samples[fmt]["load"].append(loaded - start)
        samples[fmt]["load_forward"].append(time.perf_counter() - start)
        del model
    return samples


def drop_from_page_cache(directory: Path) -> None:
    """Evict the checkpoint's files from the page cache (``POSIX_FADV_DONTNEED``: no privileges needed), so the
    next load reads them from disk."""
    for path in directory.glob("*.safetensors"):
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def fresh_loads(directories: dict[str, Path], ids_path: Path, shapes: list[list[int]], dtype_name: str,
                repeats: int, settle: float) -> dict[str, dict[str, list]]:
    """Per format and page-cache state (``warm``, ``cold``): seconds of ``from_pretrained`` and of it plus the
    first forward in a new process each time (imports not counted), as a user's script meets them; and per repeat the
    ``first_touch`` floor (see the module docstring) under the same conditions."""
    samples = {f"{fmt}_{cache}": {"load": [], "load_forward": []} for fmt in directories for cache in ("warm", "cold")}
    samples["first_touch"] = {"first_touch": []}
    for _, fmt in _alternating(tuple(directories), repeats):
        runs = [(f"{fmt}_warm", [FRESH, str(directories[fmt]), str(ids_path)]),
                (f"{fmt}_cold", [FRESH, str(directories[fmt]), str(ids_path)])]
        if fmt == "packed":
            runs.append(("first_touch", [FIRST_TOUCH, json.dumps(shapes), dtype_name]))
        for name, arguments in runs:
            if name.endswith("_cold"):
                drop_from_page_cache(directories[fmt])
            time.sleep(settle)
            result = subprocess.run([sys.executable, "-c", *arguments], check=True, capture_output=True, text=True)
            for key, value in json.loads(result.stdout.strip().splitlines()[-1]).items():
                samples[name][key].append(value)
    return samples


def warm_up(gib: float) -> None:
    """Have a child process write ``gib`` GiB once, so the memory the timed loads get is backed already."""
    subprocess.run([sys.executable, "-c", WARM_UP, str(gib)], check=True)


def table(results: dict) -> str:
    """Load seconds, dense / packed (ratio), per dtype and setting, as a Markdown table."""
    lines = ["| setting | dtype | load | load + forward |", "|---|---|---|---|"]
    for dtype_name in ("float32", "bfloat16"):
        row = results[dtype_name]
        fresh = row["fresh_process"]
        settings = {"in process, warm": (row["dense"], row["packed"]),
                    "fresh process, warm": (fresh["dense_warm"], fresh["packed_warm"]),
                    "fresh process, cold": (fresh["dense_cold"], fresh["packed_cold"])}
        for name, (dense, packed) in settings.items():
            cells = [f"{dense[f'{key}_seconds']:.3f} / {packed[f'{key}_seconds']:.3f} "
                     f"({packed[f'{key}_seconds'] / dense[f'{key}_seconds']:.2f}x)" for key in ("load", "load_forward")]
            lines.append(f"| {name} | {dtype_name} | {cells[0]} | {cells[1]} |")
        touch = fresh["first_touch"]["first_touch_seconds"]
        lines.append(f"| first touch of the decoded weights | {dtype_name} | {touch:.3f} | |")
    return "\n".join(lines)


def run(repeats: int, settle: float, warm_up_gib: float) -> dict:
    from transformers.utils import logging

    import peft_sparse
    from peft_sparse.sparsity.packing import information_limit_nbytes

    logging.disable_progress_bar()
    torch.set_num_threads(1)
    base, _ = peft_sparse.smollm2()
    config = peft_sparse.SparsityConfig(method="magnitude", pattern="2:4")
    peft_sparse.prune(base, config)
    modules = list(peft_sparse.modeling.select_sparse_modules(base, config.targets, config.ignore))
    ids = torch.randint(0, base.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    results = {"model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised), 2:4 magnitude", "torch": torch.__version__,
               "machine": platform.processor() or platform.machine(), "threads": 1, "repeats": repeats,
               "settle_seconds": settle, "warm_up_gib": warm_up_gib,
               "timing": "medians; formats alternate in one process; load = from_pretrained only (a dense checkpoint "
                         "is memory-mapped, not read); load_forward = from_pretrained + first forward (64 tokens)"}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for dtype_name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            model = base.to(dtype)
            row, element = {}, torch.finfo(dtype).bits // 8
            limit_linears = sum(information_limit_nbytes(*peft_sparse.modeling.out_in(model.get_submodule(n)).shape,
                                                         2, 4, element) for n in modules)
            directories = {fmt: scratch / f"{dtype_name}-{fmt}" for fmt in ("dense", "packed")}
            for fmt, directory in directories.items():
                peft_sparse.save_pretrained(model, directory, fmt, config=config)
                sizes = payload_bytes(directory)
                linears = sum(v for k, v in sizes.items() if k.rpartition(".")[0] in modules
                              or k.removesuffix("_meta").rpartition(".")[0] in modules)
                files = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
                row[fmt] = {"linear_bytes": linears, "checkpoint_payload_bytes": sum(sizes.values()),
                            "safetensors_file_bytes": files}
            warm_up(warm_up_gib)
            saves = timed_saves(model, config, scratch, dtype_name, repeats)
            loads = timed_loads(directories, ids, repeats, settle)
            for fmt in directories:
                row[fmt].update({"save_seconds": _median(saves[fmt]), "load_seconds": _median(loads[fmt]["load"]),
                                 "load_forward_seconds": _median(loads[fmt]["load_forward"]),
                                 "samples": {"save": [round(x, 3) for x in saves[fmt]],
                                             **{k: [round(x, 3) for x in v] for k, v in loads[fmt].items()}}})
            other = row["dense"]["checkpoint_payload_bytes"] - row["dense"]["linear_bytes"]
            row["limit"] = {"linear_bytes": round(limit_linears),
                            "checkpoint_payload_bytes": round(limit_linears + other)}
            packed, dense = row["packed"], row["dense"]
            row["packed_linears_vs_dense"] = round(packed["linear_bytes"] / dense["linear_bytes"], 5)
            row["packed_linears_over_limit"] = round(packed["linear_bytes"] / limit_linears - 1, 5)
            row["packed_checkpoint_vs_dense"] = round(packed["checkpoint_payload_bytes"]
                                                      / dense["checkpoint_payload_bytes"], 5)
            for key in ("load", "load_forward", "save"):
                row[f"{key}_ratio_packed_over_dense"] = round(packed[f"{key}_seconds"] / dense[f"{key}_seconds"], 3)
            torch.save(ids, scratch / "ids.pt")
            shapes = [list(peft_sparse.modeling.out_in(model.get_submodule(n)).shape) for n in modules]
            warm_up(warm_up_gib)
            fresh = fresh_loads(directories, scratch / "ids.pt", shapes, dtype_name, repeats, settle)
            row["fresh_process"] = {name: {f"{key}_seconds": _median(values) for key, values in measures.items()}
                                    | {"samples": {k: [round(x, 3) for x in v] for k, v in measures.items()}}
                                    for name, measures in fresh.items()}
            for cache in ("warm", "cold"):
                for key in ("load", "load_forward"):
                    ratio = (row["fresh_process"][f"packed_{cache}"][f"{key}_seconds"]
                             / row["fresh_process"][f"dense_{cache}"][f"{key}_seconds"])
                    row["fresh_process"][f"{key}_ratio_packed_over_dense_{cache}"] = round(ratio, 3)
            subprocess.run([sys.executable, "-c", RELOAD, str(directories["packed"]), str(scratch / "ids.pt"),
                            str(scratch / "logits.pt")], check=True)
            reloaded = torch.load(scratch / "logits.pt")
            with torch.no_grad():  # reference: the dense checkpoint loaded in plain transformers (no peft_sparse)
                expected = type(model).from_pretrained(directories["dense"])(ids).logits
            row["fresh_process_logits_identical"] = bool(torch.equal(reloaded, expected))
            results[dtype_name] = row
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--settle", type=float, default=5.0, help="idle seconds before each timed load")
    parser.add_argument("--warm-up-gib", type=float, default=6.0, help="memory a child writes before the timings")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "export.json"))
    args = parser.parse_args()
    results = run(args.repeats, args.settle, args.warm_up_gib)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
