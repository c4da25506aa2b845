"""2:4 kernel benchmark (needs a CUDA GPU): per-layer matmul and end-to-end prefill / decode, sparse vs dense.

For each SmolLM2-135M linear shape and M in (1, 4, 16, 512, 2048) tokens: median CUDA-event time of ``F.linear`` with
the dense bf16 weight vs the ``to_sparse_semi_structured`` weight, for both backends; then tokens per second of a
512-token prefill and 64 decode steps (batch 1) for the dense model and ``peft_sparse.to_semi_structured`` models.
Records the GPU name. Not run for the README yet: no GPU was available.

    python bench/kernels.py [--output bench/results/kernels.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.nn import functional as F

SHAPES = {"q/o": (576, 576), "k/v": (192, 576), "gate/up": (1536, 576), "down": (576, 1536)}
TOKENS = (1, 4, 16, 512, 2048)


def cuda_ms(fn, repeats: int = 50) -> float:
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def layer_rows(dtype: torch.dtype) -> list[dict]:
    from peft_sparse.export.semi_structured import _backend
    from peft_sparse.sparsity import nm_mask

    rows = []
    for name, (out_f, in_f) in SHAPES.items():
        w = torch.randn(out_f, in_f, device="cuda", dtype=dtype)
        w = w * nm_mask(w.abs().float(), 2, 4)
        for backend in ("cutlass", "cusparselt"):
            with _backend(backend):
                sparse = torch.sparse.to_sparse_semi_structured(w)
            for m in TOKENS:
                x = torch.randn(m, in_f, device="cuda", dtype=dtype)
                dense_ms = cuda_ms(lambda x=x, w=w: F.linear(x, w))
                sparse_ms = cuda_ms(lambda x=x, s=sparse: F.linear(x, s))
                rows.append({"layer": name, "shape": [out_f, in_f], "tokens": m, "backend": backend,
                             "dense_ms": dense_ms, "sparse_ms": sparse_ms, "speedup": dense_ms / sparse_ms})
    return rows


def end_to_end(backend: str | None) -> dict:
    import peft_sparse

    model, _ = peft_sparse.smollm2()
    peft_sparse.prune(model, peft_sparse.SparsityConfig(method="magnitude", pattern="2:4"))
    model = model.to("cuda", torch.bfloat16).eval()
    if backend is not None:
        peft_sparse.to_semi_structured(model, backend=backend)
    ids = torch.randint(0, model.config.vocab_size, (1, 512), device="cuda")
    with torch.no_grad():
        prefill_ms = cuda_ms(lambda: model(ids), repeats=10)
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=64, min_new_tokens=64, do_sample=False)
        torch.cuda.synchronize()
        decode_s = time.perf_counter() - start
    return {"backend": backend or "dense", "prefill_tokens_per_s": 512 / (prefill_ms / 1000),
            "decode_tokens_per_s": 64 / decode_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "kernels.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/kernels.py needs a CUDA GPU (2:4 sparse kernels do not exist for CPU in torch).")
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": layer_rows(torch.bfloat16),
               "end_to_end": []}
    for backend in (None, "cutlass", "cusparselt"):
        try:
            results["end_to_end"].append(end_to_end(backend))
        except (RuntimeError, ValueError, TypeError) as error:  # e.g. cuSPARSELt unsupported on this GPU
            results["end_to_end"].append({"backend": backend, "error": str(error)})
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
