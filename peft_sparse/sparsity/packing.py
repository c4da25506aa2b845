"""Pack an exactly N:M weight into its kept values plus compact position metadata, and back (pure torch).

The layout is the packed checkpoint format (``FORMAT.md``): for an ``(out, in)`` weight,

* ``values``: ``(out, in*N/M)``, the kept entries of every row in column order, in the weight's dtype;
* ``meta``: uint8 positions, by codec:

  - ``"b6x3"`` (2:4 only): each group's kept pair is one of 6 (``PAIRS_2_4``); three group codes share a byte as
    ``c0 + 6*c1 + 36*c2``, so a row takes ``ceil(in/12)`` bytes (log2(6)/(8/3) = 96.9% of the information limit);
  - ``"rank"`` (1:2, 4:8, 8:16; also 2:4, where its bytes equal b6x3's): a group's kept columns
    ``c_1 < ... < c_N`` have the colex rank ``r = sum_i C(c_i, i)`` in ``[0, C(M, N))``; ``k`` consecutive groups
    share one little-endian word of ``B`` bytes as ``r_0 + C*r_1 + C^2*r_2 + ...`` (``RANK_WORDS``), so a row takes
    ``ceil(in/M/k)*B`` bytes;
  - ``"bitmask"`` (any N:M): bit ``j`` of byte ``b`` is column ``8b + j`` (little-endian, like
    ``numpy.packbits(bitorder="little")``), ``ceil(in/8)`` bytes a row.

A group with fewer than N nonzeros still stores N values: the kept set is the nonzeros padded with the lowest-index
zeros, so packing is deterministic. Everything is vectorised over the whole tensor; nothing loops over rows or groups.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from functools import cache

import torch

from .masks import nm_mask

CODECS = ("b6x3", "rank", "bitmask")
PAIRS_2_4 = ((0, 1), (0, 2), (1, 2), (0, 3), (1, 3), (2, 3))  # code c -> kept columns of the group (colex order)
_B6_DIGITS = 3  # 6**3 = 216 <= 256 codes per byte
_B6_MAX_BYTE = 6**_B6_DIGITS - 1


# (groups per word k, bytes per word B) of the rank codec: the fewest bits per group with C(M, N)^k <= 2^(8B) and
# B <= 7 (a word fits an int64). 2:4's (3, 1) is b6x3 itself; M >= 32 gains < 2% over bitmask and is left to it.
RANK_WORDS = {(1, 2): (8, 1), (2, 4): (3, 1), (4, 8): (9, 7), (8, 16): (4, 7)}


def default_codec(n: int, m: int) -> str:
    """The smallest codec for ``n:m``: ``"b6x3"`` for 2:4, ``"rank"`` for 1:2, 4:8 and 8:16, else ``"bitmask"``."""
    if (n, m) == (2, 4):
        return "b6x3"  # the same bytes as rank, decoded by a byte lookup
    return "rank" if (n, m) in RANK_WORDS else "bitmask"


def check_codec(codec: str, n: int, m: int) -> None:
    if codec not in CODECS:
        raise ValueError(f"Unknown codec {codec!r}; choose one of {CODECS}.")
    if codec == "b6x3" and (n, m) != (2, 4):
        raise ValueError(f"codec 'b6x3' encodes 2:4 groups only, not {n}:{m}; use codec='bitmask'.")
    if codec == "rank" and (n, m) not in RANK_WORDS:
        patterns = ", ".join(f"{a}:{b}" for a, b in RANK_WORDS)
        raise ValueError(f"codec 'rank' has word sizes for {patterns} only, not {n}:{m}; use codec='bitmask'.")


def meta_shape(out_features: int, in_features: int, n: int, m: int, codec: str) -> tuple[int, int]:
    """Shape of the uint8 metadata of an ``(out, in)`` ``n:m`` weight."""
    if codec == "b6x3":
        return out_features, math.ceil(in_features // m / _B6_DIGITS)
    if codec == "rank":
        k, nbytes = RANK_WORDS[n, m]
        return out_features, math.ceil(in_features // m / k) * nbytes
    return out_features, math.ceil(in_features / 8)


def packed_nbytes(out_features: int, in_features: int, n: int, m: int, codec: str, element_size: int) -> int:
    """Bytes of values plus metadata for one packed weight."""
    rows, cols = meta_shape(out_features, in_features, n, m, codec)
    return out_features * (in_features // m * n) * element_size + rows * cols


def information_limit_nbytes(out_features: int, in_features: int, n: int, m: int, element_size: int) -> float:
    """Fewest bytes any lossless layout needs: the kept values plus log2(C(M, N)) bits per group."""
    groups = out_features * (in_features // m)
    return groups * n * element_size + groups * math.log2(math.comb(m, n)) / 8


# Both codecs are byte-aligned: a metadata byte covers a fixed run of columns (``_BYTE_COLUMNS``; the last byte of a row
# may cover fewer) and a valid byte keeps a fixed number of them. So decoding is one lookup per byte (byte -> its kept
# columns) plus one ``scatter_`` of the values into a zeroed dense tensor, and encoding is one lookup per group (nonzero
# pattern -> kept pattern) plus one ``gather``. Corrupt bytes are caught by a lookup over the metadata alone. Bitmask
# groups must not straddle bytes for this (``8 % m == 0``); any other M takes the general boolean-mask path.
_BYTE_COLUMNS = {"b6x3": 4 * _B6_DIGITS, "bitmask": 8}


def _byte_aligned(codec: str, m: int) -> bool:
    return codec == "b6x3" or (codec == "bitmask" and 8 % m == 0)


@cache
def _kept_bits(n: int, m: int, device: str) -> torch.Tensor:
    """Nonzero pattern of a group (bit j: column j is nonzero) -> the pattern it keeps (the nonzeros plus the
    lowest-index zeros, as ``nm_mask`` picks them), uint8; 0, which no kept pattern is, above ``n`` nonzeros."""
    bits = (torch.arange(1 << m).unsqueeze(-1) >> torch.arange(m)) & 1
    kept = (nm_mask(bits.to(torch.int8), n, m).to(torch.int64) << torch.arange(m)).sum(-1)
    return torch.where(bits.sum(-1) > n, 0, kept).to(torch.uint8).to(device)


@cache
def _b6x3_codes(device: str) -> torch.Tensor:
    """Nonzero pattern of a 2:4 group -> the code of the pair it keeps, uint8; 6 (no code) above 2 nonzeros."""
    code_of = torch.full((16,), len(PAIRS_2_4), dtype=torch.uint8)
    for code, (a, b) in enumerate(PAIRS_2_4):
        code_of[(1 << a) | (1 << b)] = code
    return code_of[_kept_bits(2, 4, "cpu").long()].to(device)


@cache
def _b6x3_bytes(device: str) -> torch.Tensor:
    """Nonzero patterns of three 2:4 groups (4 bits each, first group lowest) -> their b6x3 byte; 255 when a group
    has more than 2 nonzeros. Padding groups past the row end have pattern 0, so code 0, as the format asks."""
    codes = _b6x3_codes("cpu")[(torch.arange(1 << 12).unsqueeze(-1) >> torch.tensor([0, 4, 8])) & 15].to(torch.int64)
    byte = (codes * torch.tensor([1, 6, 36])).sum(-1)
    return torch.where((codes == len(PAIRS_2_4)).any(-1), 255, byte).to(torch.uint8).to(device)


@cache
def _byte_tables(codec: str, n: int, m: int, columns: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """For a byte covering ``columns`` weight columns: (byte -> its kept columns in increasing order, int64
    ``(256, columns/m*n)``; byte -> whether a packer writes it, bool ``(256,)``). Invalid bytes point at column 0."""
    groups = columns // m
    byte = torch.arange(256)
    if codec == "b6x3":
        digits = byte.unsqueeze(-1) // 6 ** torch.arange(groups) % 6
        kept = (torch.tensor(PAIRS_2_4)[digits] + 4 * torch.arange(groups).unsqueeze(-1)).reshape(256, -1)
        valid = byte < 6**groups  # above: a digit past 5, or a padding group with a code other than 0
    else:
        bits = (byte.unsqueeze(-1) >> torch.arange(8)) & 1
        valid = (bits[:, :columns].reshape(256, groups, m).sum(-1) == n).all(-1) & (bits[:, columns:] == 0).all(-1)
        kept = torch.sort(bits, dim=-1, descending=True, stable=True).indices[:, : groups * n]  # set bits, in order
    return torch.where(valid.unsqueeze(-1), kept, 0).to(device), valid.to(device)


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_LITTLE_ENDIAN = sys.byteorder == "little"


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor as same-size integers: ``gather`` / ``scatter_`` of those move raw bits (on bfloat16 they can
    rewrite NaN payloads)."""
    return tensor.view(_SAME_SIZE_INT[tensor.element_size()]) if tensor.is_floating_point() else tensor


def _lookup(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[index]`` for a small table and a large integer ``index`` (``index_select``: far faster than indexing)."""
    return table.index_select(0, index.reshape(-1).to(torch.int32)).view(*index.shape, *table.shape[1:])


def _blocks(dense: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, n: int, m: int,
            codec: str) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]:
    """Per run of equal bytes (a row's full bytes, then its partial last byte): ``(dense, values, meta, columns)``
    blocks of shapes ``(out, bytes, columns)``, ``(out, bytes, columns/m*n)`` and ``(out, bytes)``, all views."""
    rows, in_features = dense.shape
    width = _BYTE_COLUMNS[codec]
    full, rest = divmod(in_features, width)
    for first, count, columns in ((0, full, width), (full, 1, rest)):
        if count and columns:
            start, kept = first * width, columns // m * n
            yield (dense[:, start:start + count * columns].view(rows, count, columns),
                   values[:, start // m * n:start // m * n + count * kept].view(rows, count, kept),
                   meta[:, first:first + count], columns)


def _group_patterns(weight: torch.Tensor, m: int) -> torch.Tensor:
    """``(out, in/m)`` integers (at most 8 bits): bit j is set where column j of the group is nonzero. ``bool()`` is
    ``!= 0`` (NaN counts, -0.0 does not), several times faster.

    A group's m bools are read as one m-byte little-endian word (byte j = column j, at bit 8j) and folded into the low
    m bits with log2(m) shift-or steps: ``w | w >> 7`` moves bit 8j+8 next to bit 8j, then pairs, then quads."""
    nonzero = weight.bool().view(torch.uint8)
    if m == 1 or not _LITTLE_ENDIAN:  # one pass per column of a group
        columns = nonzero.view(weight.shape[0], -1, m)
        pattern = columns[..., 0].clone()
        for j in range(1, m):
            pattern.bitwise_or_(columns[..., j] << j)
        return pattern.to(torch.int32)
    word = nonzero.view(_SAME_SIZE_INT[m]).view(weight.shape[0], -1)
    shift = 7
    while shift < 7 * m:
        folded = word >> shift
        word = folded.bitwise_or_(word)
        shift *= 2
    return word.bitwise_and_((1 << m) - 1)


def _refuse_dense(over: int, n: int, m: int, name: str) -> None:
    raise ValueError(f"{name} is not {n}:{m} sparse ({over} groups keep more than {n} nonzeros); prune it "
                     "(peft_sparse.prune) or save with format='dense'.")


def _check_width(weight: torch.Tensor, n: int, m: int, name: str) -> None:
    if weight.dim() != 2 or weight.shape[1] % m:
        raise ValueError(f"{name}: cannot pack shape {tuple(weight.shape)} as {n}:{m}; the input width must be a "
                         f"multiple of {m}.")


def kept_positions(weight: torch.Tensor, n: int, m: int, name: str = "weight") -> torch.Tensor:
    """The bool keep set of an N:M ``(out, in)`` weight; raises if any group has more than N nonzeros."""
    _check_width(weight, n, m, name)
    nonzero = weight != 0
    over = int((nonzero.reshape(weight.shape[0], -1, m).sum(-1) > n).sum())
    if over:
        _refuse_dense(over, n, m, name)
    return nm_mask(nonzero.to(torch.int8), n, m)  # every nonzero, padded with the lowest-index zeros


# The rank codec: colex ranks (combinatorial number system) of each group's kept columns, k to a B-byte word.

@cache
def _binomials(n: int, m: int, device: str) -> torch.Tensor:
    """``T[c, i] = C(c, i)`` for ``c < m``, ``i <= n``, int64 (C(15, 8) is far below 2^63)."""
    return torch.tensor([[math.comb(c, i) for i in range(n + 1)] for c in range(m)], dtype=torch.int64, device=device)


@cache
def _unrank_table(n: int, m: int, device: str) -> torch.Tensor:
    """rank -> its kept columns in increasing order, int64 ``(C(m, n), n)``: the greedy colex decode (the largest
    ``c`` with ``C(c, i) <= r``, for ``i = n .. 1``), run once over every rank."""
    table = _binomials(n, m, "cpu")
    rank = torch.arange(math.comb(m, n))
    columns = torch.empty(rank.numel(), n, dtype=torch.int64)
    for i in range(n, 0, -1):
        c = (table[:, i].unsqueeze(0) <= rank.unsqueeze(-1)).sum(-1) - 1
        columns[:, i - 1] = c
        rank = rank - table[c, i]
    return columns.to(device)


def _rank_encode(keep: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """uint8 rank metadata ``(out, words*B)`` of a bool ``(out, in)`` keep set with exactly ``n`` per group."""
    rows = keep.shape[0]
    k, nbytes = RANK_WORDS[n, m]
    groups = keep.reshape(rows, -1, m)
    index = groups.cumsum(-1, dtype=torch.int32).clamp_(max=n)  # 1-based index of a kept column among the kept ones
    flat = index.add_(torch.arange(m, device=keep.device, dtype=torch.int32) * (n + 1))  # -> T[c, i], flattened
    table = _binomials(n, m, str(keep.device)).view(-1)
    ranks = (_lookup(table, flat) * groups).sum(-1)  # sum_i C(c_i, i)
    ranks = torch.nn.functional.pad(ranks, (0, -ranks.shape[1] % k)).view(rows, -1, k)  # padding groups: rank 0
    radix = math.comb(m, n) ** torch.arange(k, device=keep.device)
    words = (ranks * radix).sum(-1, keepdim=True)
    shifts = 8 * torch.arange(nbytes, device=keep.device)
    return ((words >> shifts) & 255).to(torch.uint8).view(rows, ranks.shape[1] * nbytes)


def _rank_columns(meta: torch.Tensor, in_features: int, n: int, m: int) -> torch.Tensor:
    """The kept dense columns ``(out, in/m*n)`` (int64, increasing in each row) of rank metadata; raises on a word
    no packer writes (at or above C^k, or a nonzero padding rank)."""
    rows, groups = meta.shape[0], in_features // m
    k, nbytes = RANK_WORDS[n, m]
    count = math.comb(m, n)
    shifts = 8 * torch.arange(nbytes, device=meta.device)
    words = (meta.reshape(rows, meta.shape[1] // nbytes, nbytes).to(torch.int64) << shifts).sum(-1, keepdim=True)
    digits = words // count ** torch.arange(k, device=meta.device) % count
    ranks = digits.view(rows, digits.shape[1] * k)
    if meta.numel() and (bool((words >= count**k).any()) or bool(ranks[:, groups:].any())):
        raise _corrupt("rank", n, m)
    in_group = _lookup(_unrank_table(n, m, str(meta.device)), ranks[:, :groups].contiguous())  # (out, groups, n)
    start = m * torch.arange(groups, device=meta.device).unsqueeze(-1)
    return (in_group + start).view(rows, -1)


def _encode(weight: torch.Tensor, n: int, m: int, codec: str, name: str) -> torch.Tensor:
    """The uint8 metadata of a contiguous, byte-aligned ``weight``."""
    rows, groups = weight.shape[0], weight.shape[1] // m
    patterns = _group_patterns(weight, m)
    per_byte = _B6_DIGITS if codec == "b6x3" else 8 // m
    if codec == "b6x3":  # three patterns -> a 12-bit key -> the byte, one lookup per byte
        padded = torch.nn.functional.pad(patterns, (0, -groups % per_byte)) if groups % per_byte else patterns
        padded = padded.view(rows, -1, per_byte)
        key = padded[..., 0] | padded[..., 1] << 4 | padded[..., 2] << 8
        meta = _lookup(_b6x3_bytes(str(weight.device)), key)
        if meta.numel() and int(meta.max()) == 255:
            _refuse_dense(int((_lookup(_b6x3_codes(str(weight.device)), patterns) == len(PAIRS_2_4)).sum()), n, m,
                          name)
        return meta
    kept = _lookup(_kept_bits(n, m, str(weight.device)), patterns)  # 0: more than n nonzeros
    if kept.numel() and int(kept.min()) == 0:
        _refuse_dense(int((kept == 0).sum()), n, m, name)
    if per_byte == 1:
        return kept
    if groups % per_byte:
        kept = torch.nn.functional.pad(kept, (0, -groups % per_byte))  # padding groups: no bits
    kept = kept.view(rows, -1, per_byte)
    meta = kept[..., 0].clone()
    for j in range(1, per_byte):
        meta.bitwise_or_(kept[..., j] << m * j)
    return meta


@torch.no_grad()
def pack(weight: torch.Tensor, n: int, m: int, codec: str, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, meta)`` of an exactly N:M ``(out, in)`` weight."""
    check_codec(codec, n, m)
    _check_width(weight, n, m, name)
    out_features, in_features = weight.shape
    if not _byte_aligned(codec, m):
        keep = kept_positions(weight, n, m, name)
        if codec == "rank":
            meta = _rank_encode(keep, n, m)
        else:
            bits = torch.nn.functional.pad(keep, (0, (-in_features) % 8)).reshape(out_features, -1, 8)
            meta = (bits.to(torch.int32) << torch.arange(8, device=weight.device, dtype=torch.int32)).sum(-1)
        return _bits(weight)[keep].view(weight.dtype).reshape(out_features, -1), meta.to(torch.uint8)
    weight = weight.contiguous()  # a Conv1D weight arrives as its transposed view
    meta = _encode(weight, n, m, codec, name)
    values = torch.empty(out_features, in_features // m * n, dtype=weight.dtype, device=weight.device)
    for dense_block, value_block, meta_block, columns in _blocks(_bits(weight), _bits(values), meta, n, m, codec):
        kept = _byte_tables(codec, n, m, columns, str(weight.device))[0]
        torch.gather(dense_block, 2, _lookup(kept, meta_block), out=value_block)
    return values, meta


def _check_packed(values: torch.Tensor, meta: torch.Tensor, in_features: int, n: int, m: int, codec: str) -> None:
    if meta.dtype != torch.uint8:
        raise ValueError(f"packed metadata must be uint8, not {meta.dtype}.")
    rows = meta.shape[0] if meta.dim() == 2 else -1
    expected = (rows, in_features // m * n), meta_shape(rows, in_features, n, m, codec)
    if in_features % m or (tuple(values.shape), tuple(meta.shape)) != expected:
        raise ValueError(f"packed values of shape {tuple(values.shape)} and metadata of shape {tuple(meta.shape)} do "
                         f"not match (expected {expected[0]} and {expected[1]} for {n}:{m} over {in_features} "
                         "inputs).")


def _corrupt(codec: str, n: int, m: int) -> ValueError:
    what = {"b6x3": f"a byte above {_B6_MAX_BYTE} or a padding group with a code other than 0",
            "rank": f"a word at or above C({m}, {n})^k or a padding group with a rank other than 0"}.get(
        codec, f"a group of {m} without exactly {n} kept columns, or a bit past the last column")
    return ValueError(f"corrupt {codec} metadata: {what}.")


def _check_bytes(meta: torch.Tensor, valid: torch.Tensor, columns: int, codec: str, n: int, m: int) -> None:
    """Refuse bytes no packer writes: a max over the bytes for b6x3 (valid bytes are 0 .. 6**groups - 1), a lookup
    of each byte for bitmask."""
    if not meta.numel():
        return
    if codec == "b6x3":
        ok = int(meta.max()) < 6 ** (columns // 4)
    else:
        ok = bool(_lookup(valid, meta).all())
    if not ok:
        raise _corrupt(codec, n, m)


@torch.no_grad()
def unpack(values: torch.Tensor, meta: torch.Tensor, in_features: int, n: int, m: int, codec: str, *,
           transpose: bool = False) -> torch.Tensor:
    """The dense ``(out, in)`` weight (values' dtype and device) from ``pack``'s output; raises on a shape mismatch
    and on metadata no packer writes (corruption). ``transpose=True`` returns the contiguous ``(in, out)`` transpose
    instead (GPT-2 ``Conv1D`` storage), decoded straight into it rather than copied."""
    check_codec(codec, n, m)
    _check_packed(values, meta, in_features, n, m, codec)
    meta = meta.to(values.device)
    rows = meta.shape[0]
    storage = torch.zeros((in_features, rows) if transpose else (rows, in_features), dtype=values.dtype,
                          device=values.device)
    dense = _bits(storage).t() if transpose else _bits(storage)  # the (out, in) view of the result
    if codec == "rank":
        dense.scatter_(1, _rank_columns(meta, in_features, n, m), _bits(values))
        return storage
    if not _byte_aligned(codec, m):
        bits = (meta.unsqueeze(-1) >> torch.arange(8, device=meta.device, dtype=torch.uint8)) & 1
        bits = bits.reshape(rows, -1)
        keep = bits[:, :in_features].bool()
        if bits[:, in_features:].any() or (keep.reshape(rows, -1, m).sum(-1) != n).any():
            raise _corrupt(codec, n, m)
        dense.masked_scatter_(keep, _bits(values))
        return storage
    for dense_block, value_block, meta_block, columns in _blocks(dense, _bits(values.contiguous()), meta, n, m,
                                                                 codec):
        kept, valid = _byte_tables(codec, n, m, columns, str(values.device))
        _check_bytes(meta_block, valid, columns, codec, n, m)
        dense_block.scatter_(2, _lookup(kept, meta_block), value_block)
    return storage


def unpack_mask(meta: torch.Tensor, in_features: int, n: int, m: int, codec: str) -> torch.Tensor:
    """The bool ``(out, in)`` keep set encoded by ``meta``; raises on bytes no packer writes (corruption)."""
    ones = torch.ones(meta.shape[0] if meta.dim() == 2 else 0, in_features // m * n, dtype=torch.bool,
                      device=meta.device)
    return unpack(ones, meta, in_features, n, m, codec)
