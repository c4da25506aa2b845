"""Streamed vs in-memory pruning of checkpoints of growing depth: peak memory, time, bitwise equality, a memory cap.

Models: random fp32 Llamas (hidden 1024, intermediate 2816, 16 heads / 8 KV heads, vocab 32000, untied), written one
block per shard without ever holding the model (``make_checkpoint``), at ``--layers`` depths; ``--big`` adds one of
hidden 2048 (>= 4 GiB). Per depth and method (Wanda and SparseGPT 2:4, the same 8 x 128 random calibration ids):

* ``stream``: ``peft_sparse.prune_checkpoint(src, out, config, save_format="packed")``;
* ``memory``: ``from_pretrained`` + ``peft_sparse.prune`` + ``peft_sparse.save_pretrained(format="packed")``;

each in a fresh process (one torch thread) reporting VmHWM (peak RSS), the RSS right after the imports (the
runtime), RssAnon after each block and the wall time of the whole job (load, prune, save). The two outputs are then
compared tensor by tensor. ``--cap-layers`` runs both paths of that depth again (Wanda) inside a cgroup v1 memory
cgroup whose ``memory.limit_in_bytes`` is below half the checkpoint (cgroup v2 has no memory controller on the machine
this was written on), after evicting the checkpoint from the page cache so its pages are charged to the capped run;
each exit status and the cgroup's OOM-kill count are reported. ``--smollm2`` checks SmolLM2-135M (the converted
cache of ``peft_sparse.smollm2()``) streamed == in memory.

    python bench/stream.py [--layers 4 8 24 48] [--cap-layers 24] [--big] [--smollm2] [--work /tmp/stream-bench]
    python bench/stream.py --time-pairs 3 --layers 24 --methods wanda --output bench/results/stream_time.json

Timings are noisy on a shared machine: the table's seconds are one run per path; ``--time-pairs`` alternates the two
paths several times (run it on a quiet machine).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

HIDDEN = dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=8)
BIG = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=16, num_key_value_heads=8)
NSAMPLES, SEQLEN = 8, 128
VOCAB = 32000
MIB = 1 << 20


def llama_config(layers: int, shape: dict):
    from transformers import LlamaConfig

    return LlamaConfig(num_hidden_layers=layers, vocab_size=VOCAB, max_position_embeddings=2048, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, **shape)


def make_checkpoint(directory: Path, layers: int, shape: dict) -> None:
    """A random fp32 Llama checkpoint, one shard per block plus one for the rest, written block by block."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    if (directory / "model.safetensors.index.json").is_file():
        return
    config = llama_config(layers, shape)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    groups: dict[str, list[str]] = {}
    for name in skeleton.state_dict():
        parts = name.split(".")
        groups.setdefault(f"{int(parts[2]):05d}" if parts[:2] == ["model", "layers"] else "rest", []).append(name)
    staging = directory.with_name(directory.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    generator = torch.Generator().manual_seed(1234)
    shapes = {name: tensor.shape for name, tensor in skeleton.state_dict().items()}
    weight_map, total = {}, 0
    for index, (_, names) in enumerate(sorted(groups.items())):
        shard = f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in names:
            noise = torch.randn(shapes[name], generator=generator)
            tensors[name] = 1 + 0.1 * noise if name.endswith("norm.weight") else 0.02 * noise
            weight_map[name] = shard
            total += tensors[name].numel() * 4
        save_file(tensors, staging / shard, metadata={"format": "pt"})
    config.save_pretrained(staging)
    (staging / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": weight_map}))
    os.replace(staging, directory)


def status() -> dict[str, int]:
    """VmHWM / VmRSS / RssAnon / RssFile of this process, MiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) // 1024
    return out


def reset_peak() -> None:
    """Start VmHWM afresh from the current RSS (Linux ``clear_refs`` 5), to read one block's own peak."""
    Path("/proc/self/clear_refs").write_text("5")


def calibration_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (NSAMPLES, SEQLEN), generator=torch.Generator().manual_seed(0))


def worker(path: str, source: str, output: str, method: str) -> None:
    """One job in this process; prints one JSON line."""
    import peft_sparse
    from peft_sparse import SparsityConfig
    from peft_sparse.pruning import engine
    from peft_sparse.stream import CheckpointBlocks

    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    per_block: list[int] = []
    peak_per_block: list[int] = []
    earlier_peak = [0]  # VmHWM is reset before each block: the whole run's peak is the max of the pieces
    for store in (engine.BlockStore, CheckpointBlocks):  # after each block, whichever store walks it
        visit = store.visit

        @contextlib.contextmanager
        def recording(self, index, block, visit=visit):
            earlier_peak[0] = max(earlier_peak[0], status()["VmHWM"])
            reset_peak()
            with visit(self, index, block) as device:
                yield device
            after = status()
            per_block.append(after["RssAnon"])
            peak_per_block.append(after["VmHWM"])

        store.visit = recording
    ids, runtime = calibration_ids(), status()
    config = SparsityConfig(method=method, pattern="2:4", nsamples=NSAMPLES, seqlen=SEQLEN)
    start = time.perf_counter()
    if path == "stream":
        peft_sparse.prune_checkpoint(source, output, config, calibration=ids, save_format="packed")
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        peft_sparse.prune(model, config, calibration=ids)
        peft_sparse.save_pretrained(model, output, format="packed")
    seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)  # the whole process: imports included, the same for both paths
    final = status()
    final["VmHWM"] = max(final["VmHWM"], earlier_peak[0])
    print(json.dumps({"seconds": round(seconds, 2), "user_s": round(usage.ru_utime, 2),
                      "sys_s": round(usage.ru_stime, 2), "minor_faults": usage.ru_minflt,
                      "runtime_rss_mib": runtime["VmRSS"], **final,
                      "rss_anon_per_block": per_block, "peak_rss_per_block": peak_per_block}), flush=True)


def run_worker(path: str, source: Path, output: Path, method: str, cap_mib: int | None = None) -> dict:
    shutil.rmtree(output, ignore_errors=True)
    command = [sys.executable, __file__, "--worker", path, str(source), str(output), method]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if cap_mib is None:
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        return {"rc": result.returncode, **_last_json(result), "stderr": result.stderr[-300:] if result.returncode
                else ""}
    with memory_cgroup(cap_mib) as cgroup:
        evict(source)
        result = subprocess.run(command, capture_output=True, text=True, env=env,
                                preexec_fn=lambda: (cgroup / "cgroup.procs").write_text(str(os.getpid())))
        oom = dict(line.split() for line in (cgroup / "memory.oom_control").read_text().splitlines()).get("oom_kill")
        usage = int((cgroup / "memory.max_usage_in_bytes").read_text()) // MIB
    return {"rc": result.returncode, "cap_mib": cap_mib, "oom_kill": int(oom or 0), "cgroup_max_usage_mib": usage,
            **_last_json(result)}


def _last_json(result: subprocess.CompletedProcess) -> dict:
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


@contextlib.contextmanager
def memory_cgroup(limit_mib: int):
    """A fresh cgroup v1 memory cgroup under this process's own, capped at ``limit_mib`` (no swap here)."""
    own = next(line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines()
               if line.split(":")[1] == "memory")
    cgroup = Path("/sys/fs/cgroup/memory") / own.lstrip("/") / f"stream_bench_{os.getpid()}"
    cgroup.mkdir()
    try:
        (cgroup / "memory.limit_in_bytes").write_text(str(limit_mib * MIB))
        yield cgroup
    finally:
        with contextlib.suppress(OSError):
            cgroup.rmdir()


def evict(directory: Path) -> None:
    """Drop the checkpoint's clean page cache, so a capped run reads (and is charged for) its pages itself."""
    for path in directory.iterdir():
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def compare(a: Path, b: Path) -> dict:
    """Tensor by tensor (one pair in memory at a time) plus config.json."""
    from peft_sparse.stream import ShardReader

    ra, rb = ShardReader(a), ShardReader(b)
    keys = sorted(set(ra.keys()) | set(rb.keys()))
    mismatched = [k for k in keys if k not in ra or k not in rb or ra.get(k).dtype != rb.get(k).dtype
                  or not torch.equal(ra.get(k), rb.get(k))]
    configs = [json.loads((d / "config.json").read_text()) for d in (a, b)]
    return {"tensors": len(keys), "mismatched": mismatched[:3], "config_equal": configs[0] == configs[1],
            "bitwise_equal": not mismatched and configs[0] == configs[1]}


def scalars(result: dict) -> dict:
    """A worker's result without its per-block lists."""
    return {k: v for k, v in result.items() if not isinstance(v, list)}


def mib(directory: Path) -> int:
    return round(sum(p.stat().st_size for p in directory.glob("*.safetensors")) / MIB)


def floor_mib(layers_shape: dict, method: str) -> dict:
    """What a streamed run must hold beside the runtime (measured), at two moments that do not overlap:

    * a block's turn: two blocks (the block and what is written of it) + the calibration activations (inputs and
      outputs of a block) + the pruner's statistics (SparseGPT: one fp32 Hessian per input width, kept together);
    * the capture and the copy-through: the input embedding, which the capture needs whole and which is copied to
      the output at the end (read from its memory map, so it shows as file-backed RSS).
    """
    h, i = layers_shape["hidden_size"], layers_shape["intermediate_size"]
    kv = h * layers_shape["num_key_value_heads"] // layers_shape["num_attention_heads"]
    block = 4 * (2 * h * h + 2 * kv * h + 3 * h * i + 2 * h)
    activations = 2 * NSAMPLES * SEQLEN * h * 4
    stats = 4 * (3 * h * h + i * i) if method == "sparsegpt" else 4 * (3 * h + i)
    turn = (2 * block + activations + stats) / MIB
    embedding = VOCAB * h * 4 / MIB
    return {"two_blocks": 2 * block / MIB, "activations": activations / MIB, "statistics": stats / MIB,
            "embedding": embedding, "above_runtime": max(turn, embedding)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", nargs=4, metavar=("PATH", "SRC", "OUT", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, nargs="*", default=[4, 8, 24, 48])
    parser.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"])
    parser.add_argument("--cap-layers", type=int, default=48, help="depth of the capped run (0: none)")
    parser.add_argument("--cap-fraction", type=float, default=0.4, help="the cap as a fraction of the checkpoint")
    parser.add_argument("--sparsegpt-max-layers", type=int, default=48, help="skip deeper SparseGPT rows (time)")
    parser.add_argument("--big", type=int, default=0, metavar="LAYERS", help="also a hidden-2048 model (20: 4.2 GiB)")
    parser.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M streamed == in memory")
    parser.add_argument("--time-pairs", type=int, default=0, metavar="ROUNDS",
                        help="only time streamed vs in-memory, alternated ROUNDS times per depth and method (quiet "
                             "machine), into --output")
    parser.add_argument("--work", default="/tmp/stream-bench")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "stream.json"))
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.time_pairs:
        pairs = [time_pairs(work, layers, method, args.time_pairs) for method in args.methods for layers in args.layers]
        Path(args.output).write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                                                             "load_average": os.getloadavg()}, "pairs": pairs},
                                                indent=1) + "\n")
        return
    payload = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                           "note": "shared machine: other jobs ran at the same time, timings are noisy"},
               "calibration": {"nsamples": NSAMPLES, "seqlen": SEQLEN, "ids": "uniform random, seed 0"},
               "rows": [], "capped": {}, "smollm2": None, "skipped": []}

    def save() -> None:  # after every step: a run cut short keeps what it measured
        payload["load_average"] = os.getloadavg()
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(payload, indent=2) + "\n")

    models = [(f"llama-{n}", n, HIDDEN) for n in args.layers] + ([(f"llama2048-{args.big}", args.big, BIG)]
                                                                   if args.big else [])
    for method in args.methods:
        for name, layers, shape in models:
            if method == "sparsegpt" and layers > args.sparsegpt_max_layers:
                payload["skipped"].append(f"{name} {method}: over --sparsegpt-max-layers (time on a shared machine)")
                continue
            payload["rows"].append(measure_row(work, name, layers, shape, method))
            save()
        if method == args.methods[0]:
            if args.cap_layers:
                payload["capped"] = capped_run(work, args.cap_layers, args.cap_fraction)
                save()
            if args.smollm2:
                payload["smollm2"] = smollm2_check(work)
                save()
    save()
    print_table(payload["rows"], payload["capped"])


def measure_row(work: Path, name: str, layers: int, shape: dict, method: str) -> dict:
    """Both paths on one checkpoint and method, then their outputs compared (the streamed one kept for the cap)."""
    source = work / name
    make_checkpoint(source, layers, shape)
    row = {"model": name, "layers": layers, "hidden": shape["hidden_size"], "method": method,
           "checkpoint_mib": mib(source)}
    for path in ("stream", "memory"):
        row[path] = run_worker(path, source, work / f"{name}-{method}-{path}", method)
        print(name, method, path, json.dumps(scalars(row[path])),
              flush=True)
    row["output_mib"] = mib(work / f"{name}-{method}-stream")
    row.update(compare(work / f"{name}-{method}-stream", work / f"{name}-{method}-memory"))
    row["floor_mib"] = floor_mib(shape, method)
    shutil.rmtree(work / f"{name}-{method}-memory", ignore_errors=True)
    return row


def time_pairs(work: Path, layers: int, method: str, rounds: int) -> dict:
    """The worker's own seconds (load, prune, save) of both paths, alternated so that drift hits both alike."""
    source = work / f"llama-{layers}"
    make_checkpoint(source, layers, HIDDEN)
    seconds: dict[str, list[float]] = {"stream": [], "memory": []}
    usage: dict[str, list[dict]] = {"stream": [], "memory": []}
    for round_ in range(rounds):
        for path in ("stream", "memory") if round_ % 2 == 0 else ("memory", "stream"):
            result = run_worker(path, source, work / f"pair-{path}", method)
            seconds[path].append(result["seconds"])
            usage[path].append({key: result[key] for key in ("user_s", "sys_s", "minor_faults", "VmHWM")})
            shutil.rmtree(work / f"pair-{path}", ignore_errors=True)
    ratios = [a / b for a, b in zip(seconds["stream"], seconds["memory"])]
    print(layers, method, seconds, flush=True)
    return {"layers": layers, "method": method, "rounds": rounds, **seconds, "ratios": ratios,
            "median_ratio": sorted(ratios)[len(ratios) // 2], "usage": usage}


def capped_run(work: Path, layers: int, fraction: float) -> dict:
    """Both paths (Wanda) under a cgroup v1 cap of ``fraction`` of the checkpoint; the streamed output is compared
    with the uncapped streamed one of the same depth (itself equal to the in-memory output), else with a fresh
    in-memory run."""
    source = work / f"llama-{layers}"
    make_checkpoint(source, layers, HIDDEN)
    capped = {"checkpoint_mib": mib(source), "cap_fraction": fraction}
    cap = int(mib(source) * fraction)
    for path in ("stream", "memory"):
        capped[path] = run_worker(path, source, work / f"capped-{path}", "wanda", cap_mib=cap)
        print("capped", path, json.dumps(scalars(capped[path])),
              flush=True)
    reference = work / f"llama-{layers}-wanda-stream"
    if not reference.is_dir():
        run_worker("memory", source, reference, "wanda")
    if capped["stream"]["rc"] == 0:
        capped["stream_equals_uncapped"] = compare(work / "capped-stream", reference)["bitwise_equal"]
    for path in ("capped-stream", "capped-memory"):
        shutil.rmtree(work / path, ignore_errors=True)
    return capped


def smollm2_check(work: Path) -> dict:
    from peft_sparse.models import SMOLLM2_CONVERTED, smollm2, smollm2_cache_dir

    smollm2()  # makes sure the converted copy exists
    source = smollm2_cache_dir() / SMOLLM2_CONVERTED
    result = {}
    for path in ("stream", "memory"):
        result[path] = scalars(run_worker(path, source, work / f"smollm2-{path}", "wanda"))
    result.update(compare(work / "smollm2-stream", work / "smollm2-memory"))
    print("smollm2", json.dumps(result))
    return result


def print_table(rows: list[dict], capped: dict) -> None:
    print("\n| layers | method | checkpoint MiB | output MiB | streamed VmHWM | in-memory VmHWM | streamed peak of a "
          "block's turn | streamed RssAnon after a block | floor | streamed s | in-memory s | ratio | bitwise equal |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        s, m = row["stream"], row["memory"]
        anon = s.get("rss_anon_per_block") or [0]
        turn = s.get("peak_rss_per_block") or [0]
        floor = s.get("runtime_rss_mib", 0) + row["floor_mib"]["above_runtime"]
        print(f"| {row['layers']} (h{row['hidden']}) | {row['method']} | {row['checkpoint_mib']} | "
              f"{row['output_mib']} | {s.get('VmHWM')} | {m.get('VmHWM')} | {min(turn)}-{max(turn)} | "
              f"{min(anon)}-{max(anon)} | {floor:.0f} | "
              f"{s.get('seconds')} | {m.get('seconds')} | {s.get('seconds', 0) / max(m.get('seconds', 1), 1e-9):.2f} "
              f"| {row['bitwise_equal']} |")
    if capped:
        for path in ("stream", "memory"):
            c = capped[path]
            print(f"capped {path}: cap {c['cap_mib']} MiB of a {capped['checkpoint_mib']} MiB checkpoint: rc "
                  f"{c['rc']}, oom_kill {c['oom_kill']}, cgroup max usage {c['cgroup_max_usage_mib']} MiB, "
                  f"VmHWM {c.get('VmHWM')}")


if __name__ == "__main__":
    main()
