"""Could a decode matmul that reads the 2:4 positions and int4 codes directly beat torch's dense int4 CPU kernel?

One SmolLM2-shaped layer (1536 x 576, 2:4, int4 symmetric, groups of 64), bf16 activations, M = 1, 4, 8 rows, one
thread. The candidate stores about 3 bits a weight (two 4-bit codes and two 2-bit in-group positions per group of
4, plus the scales) where torch's kernel reads 4; it is written as plain torch ops and compiled with
``torch.compile`` (inductor's C++ backend: a compiler at run time, none at install time), in two forms:

* ``gather``: each kept code times the input column it names (an indexed load per kept weight);
* ``select``: each group of 4 rebuilt from its two (position, code) pairs with compares, then a dense dot product.

Both must equal a float matmul on the dequantized weight (to bf16 rounding) before they are timed. Results go to
``bench/results/sparse_decode.json``; neither formulation is part of the package (see README).

    python bench/sparse_decode.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT, IN, GROUP = 1536, 576, 64


def layer(seed: int = 0):
    """Codes, kept columns and scales of a random 2:4 int4 layer, and its dequantized dense weight."""
    torch.manual_seed(seed)
    weight = torch.randn(OUT, IN)
    starts = torch.arange(0, IN, 4).view(1, -1, 1)
    kept = (weight.abs().view(OUT, IN // 4, 4).topk(2, -1).indices.sort(-1).values + starts).view(OUT, -1)
    scale = weight.gather(1, kept).abs().view(OUT, IN // GROUP, GROUP // 2).amax(-1).div(7).bfloat16()
    per_kept = scale.float().repeat_interleave(GROUP // 2, 1)
    codes = torch.clamp(torch.round(weight.gather(1, kept) / per_kept), -8, 7)
    dense = torch.zeros(OUT, IN).scatter_(1, kept, codes * per_kept)
    nibbles = (codes + 8).to(torch.uint8)
    packed_codes = nibbles[:, 0::2] | nibbles[:, 1::2] << 4
    position = (kept % 4).to(torch.uint8)
    packed_positions = position[:, 0::4] | position[:, 1::4] << 2 | position[:, 2::4] << 4 | position[:, 3::4] << 6
    return codes, kept, scale, dense, packed_codes, packed_positions


def unpack(packed_codes: torch.Tensor, packed_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    codes = torch.stack([packed_codes & 15, packed_codes >> 4], -1).view(OUT, IN // 2).float() - 8
    positions = torch.stack([(packed_positions >> shift) & 3 for shift in (0, 2, 4, 6)], -1).view(OUT, IN // 2)
    return codes, positions


def gather_mv(x, packed_codes, packed_positions, scale):
    codes, positions = unpack(packed_codes, packed_positions)
    columns = torch.arange(IN // 2) // 2 * 4 + positions.long()
    values = codes * scale.float().repeat_interleave(GROUP // 2, 1)
    return (x.float()[:, columns] * values).sum(-1).to(x.dtype)


def select_mv(x, packed_codes, packed_positions, scale):
    codes, positions = unpack(packed_codes, packed_positions)
    codes, positions = codes.view(OUT, IN // 4, 2), positions.view(OUT, IN // 4, 2)
    slots = torch.arange(4, dtype=torch.uint8).view(1, 1, 4)
    group = torch.where(positions[..., :1] == slots, codes[..., :1], 0.0) + torch.where(
        positions[..., 1:] == slots, codes[..., 1:], 0.0)
    dense = group * scale.float().repeat_interleave(GROUP // 4, 1).unsqueeze(-1)
    return (x.float().unsqueeze(1) * dense.view(1, OUT, IN)).sum(-1).to(x.dtype)


def median_us(fn, reps: int = 200) -> float:
    for _ in range(10):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[reps // 2] * 1e6


def main() -> None:
    torch.set_num_threads(1)
    codes, kept, scale, dense, packed_codes, packed_positions = layer()
    full = torch.full((OUT, IN), 8, dtype=torch.int32).scatter_(1, kept, (codes + 8).int())
    int4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(full, 1)
    scales_and_zeros = torch.stack([scale.t(), torch.zeros_like(scale.t())], -1).contiguous()
    rows = []
    for name, fn in (("gather", gather_mv), ("select", select_mv)):
        compiled = torch.compile(fn, dynamic=False)
        for m in (1, 4, 8):
            x = torch.randn(m, IN).bfloat16()
            reference = x.float() @ dense.t()
            out = compiled(x, packed_codes, packed_positions, scale)
            error = float((out.float() - reference).norm() / reference.norm())
            assert error < 1e-2, (name, m, error)
            ours = median_us(lambda x=x, compiled=compiled: compiled(x, packed_codes, packed_positions, scale))
            torch_int4 = median_us(lambda x=x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, int4, GROUP,
                                                                                         scales_and_zeros))
            rows.append({"form": name, "M": m, "compiled_us": ours, "torch_int4_us": torch_int4,
                         "speedup": torch_int4 / ours, "relative_error": error})
            print(f"{name:6s} M={m}: compiled {ours:9.1f} us, torch int4 {torch_int4:7.1f} us, "
                  f"speed-up {torch_int4 / ours:.3f}", flush=True)
    out = ROOT / "bench" / "results" / "sparse_decode.json"
    out.write_text(json.dumps({"layer": [OUT, IN], "group": GROUP, "threads": 1, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
