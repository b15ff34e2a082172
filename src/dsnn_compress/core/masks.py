"""Nested magnitude masks encoded as keep codes.

With sparse levels ``s_1 < ... < s_L`` every weight gets a *keep code* ``c`` in ``0..L``: the number of sparse
levels at which it is still alive. The mask of level ``k`` (``k = 0`` is dense) is ``code >= k``, so masks are
nested by construction.

Ranking is by magnitude ``|w|``; ties are broken by position (the weight that comes first - earlier tensor in
sorted-name order, then lower flat index - is pruned first), so results are deterministic. Level ``k`` prunes
exactly ``round(s_k * n)`` weights (Python's ``round``, as ``torch.nn.utils.prune`` does), where ``n`` is the
tensor's size (``per-layer``) or the total size of all selected tensors (``global``).

Selection of the ``p``-th smallest magnitude uses a two-pass radix select over the float32 bit patterns
(non-negative floats order like their bit patterns as integers): a 32768-bin histogram of the high 16 bits, then a
65536-bin histogram of the low 16 bits inside the one bucket that holds the answer (one pass for all levels), then
one pass that writes every level's codes. Each pass streams over the tensors in chunks of ``_CHUNK`` weights and
recomputes the magnitudes chunk by chunk, so neither allocation holds more than the codes (1 byte per weight) plus
one chunk of temporaries, and global allocation never concatenates the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from ..errors import DsnnError, UsageError
from .finite import all_finite, nonfinite_count
from .levels import validate_levels

ALLOCATIONS = ("per-layer", "global", "per-row")
"""How levels compare weights: each tensor alone, all tensors together, or each output row of a tensor alone."""


def code_bits(num_levels: int) -> int:
    """Bits per weight needed for codes ``0..num_levels``: ``ceil(log2(L + 1))``."""
    return max(1, math.ceil(math.log2(num_levels + 1)))


def pruned_count(sparsity: float, size: int) -> int:
    """How many of ``size`` weights a level prunes: ``round(sparsity * size)`` (matches torch.nn.utils.prune)."""
    return int(round(sparsity * size))


_CHUNK = 1 << 22
"""Weights per chunk of the streaming passes: bounds the temporaries (about 40 MiB at most, whatever the tensor or
model size) while keeping the number of torch calls - each one a parallel region - close to one per tensor and op."""


def _checked_flat(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """``tensor`` flattened, after checking that it is floating point and finite (errors name the tensor)."""
    flat = tensor.detach().reshape(-1)
    if not flat.is_floating_point():
        raise UsageError(f"tensor {name} has dtype {flat.dtype}, not floating point", "exclude it from pruning")
    if not all_finite(flat):
        bad = nonfinite_count(flat)
        raise DsnnError(f"tensor {name} holds {bad} NaN/inf value(s); the checkpoint is corrupt",
                        "fix the checkpoint (a diverged training run? restore an earlier one) and prune again")
    return flat


def _magnitude_bits(flat: torch.Tensor) -> torch.Tensor:
    """Int32 bit patterns of ``|flat|`` as float32 (order-preserving for non-negative floats)."""
    if flat.dtype != torch.float32:
        flat = flat.float()
    return flat.abs().view(torch.int32)


class _Stream:
    """The weights being ranked, in stream order (tensors in the given order, then flat index), with their codes.

    Iterating yields ``(code_chunk, bits_chunk)`` pairs, ``_CHUNK`` weights at a time: ``code_chunk`` is a view into
    the code tensor, and the magnitude bits are recomputed on every pass. A pass therefore holds one chunk of
    temporaries, never the bits of whole tensors (for global allocation those would cost as much memory as the fp32
    weights themselves).
    """

    def __init__(self, flats: Sequence[torch.Tensor], codes: Sequence[torch.Tensor]) -> None:
        self.flats = flats
        self.codes = codes

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for flat, code in zip(self.flats, self.codes):
            for start in range(0, flat.numel(), _CHUNK):
                yield code[start : start + _CHUNK], _magnitude_bits(flat[start : start + _CHUNK])


class _Selection:
    """The p-th smallest magnitude (as int32 bits) and how many ties at that value are pruned."""

    __slots__ = ("threshold", "ties_pruned")

    def __init__(self, threshold: int, ties_pruned: int) -> None:
        self.threshold = threshold
        self.ties_pruned = ties_pruned


def _select(stream: _Stream, counts: Sequence[int]) -> list[_Selection | None]:
    """Radix-select, for each count ``p``, the value of the p-th smallest element of ``stream``.

    Returns ``None`` for ``p == 0`` (nothing pruned). Otherwise the threshold ``t`` is such that every element
    ``< t`` is pruned, plus the first ``ties_pruned`` elements equal to ``t`` in stream order. Two passes over the
    stream whatever the number of counts: the high-16-bit histogram, then the low-16-bit histograms of every bucket
    that holds an answer.
    """
    hi_hist = torch.zeros(32768, dtype=torch.int64)
    for _, bits in stream:
        hi_hist += torch.bincount(bits >> 16, minlength=32768)
    hi_cum = torch.cumsum(hi_hist, 0)
    buckets: list[tuple[int, int] | None] = []
    for p in counts:
        if p <= 0:
            buckets.append(None)
            continue
        bucket = int(torch.searchsorted(hi_cum, torch.tensor(p, dtype=torch.int64)))
        buckets.append((bucket, int(hi_cum[bucket - 1]) if bucket > 0 else 0))
    lo_hists = {entry[0]: torch.zeros(65536, dtype=torch.int64) for entry in buckets if entry is not None}
    if lo_hists:
        for _, bits in stream:
            hi = bits >> 16
            for bucket, lo_hist in lo_hists.items():
                inside = bits[hi == bucket]
                if inside.numel():
                    lo_hist += torch.bincount(inside & 0xFFFF, minlength=65536)
    out: list[_Selection | None] = []
    for p, entry in zip(counts, buckets):
        if entry is None:
            out.append(None)
            continue
        bucket, below_bucket = entry
        lo_cum = torch.cumsum(lo_hists[bucket], 0) + below_bucket
        lo = int(torch.searchsorted(lo_cum, torch.tensor(p, dtype=torch.int64)))
        below_value = int(lo_cum[lo - 1]) if lo > 0 else below_bucket
        out.append(_Selection((bucket << 16) | lo, p - below_value))
    return out


def _apply_selections(stream: _Stream, selections: Sequence[_Selection | None], ties_left: list[int]) -> None:
    """Add 1 to the code of every element that survives each selection (in place, in one pass over ``stream``).

    ``ties_left[i]`` counts the ties at selection ``i``'s threshold still to prune; it carries over between calls
    that continue the same stream.
    """
    for code, bits in stream:
        for i, selection in enumerate(selections):
            if selection is None:
                code += 1
                continue
            code += bits > selection.threshold
            equal = (bits == selection.threshold).nonzero().reshape(-1)
            if equal.numel() == 0:
                continue
            survivors = equal[min(ties_left[i], equal.numel()) :]
            ties_left[i] = max(0, ties_left[i] - equal.numel())
            if survivors.numel():
                code[survivors] += 1


def _ties(selections: Sequence[_Selection | None]) -> list[int]:
    return [0 if s is None else s.ties_pruned for s in selections]


def row_codes(scores: torch.Tensor, sparsities: Sequence[float]) -> torch.Tensor:
    """Nested keep codes (uint8, ``scores``' shape) when each output row prunes ``round(s * row size)`` of its
    lowest scores at each sparsity ``s`` (non-decreasing, in [0, 1)); ties: the lower index first."""
    rows = scores.detach().reshape(scores.shape[0], -1).float()
    width = rows.shape[1]
    order = torch.sort(rows, dim=1, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(width).expand_as(order).contiguous())
    codes = torch.zeros(rows.shape, dtype=torch.uint8)
    for sparsity in sparsities:
        codes += (rank >= pruned_count(sparsity, width)).to(torch.uint8)
    return codes.reshape(scores.shape)


def compute_codes(
    tensors: Mapping[str, torch.Tensor],
    levels: Sequence[float],
    allocation: str = "per-layer",
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Keep codes (uint8, same shape as each tensor) for nested magnitude pruning at ``levels``.

    ``per-layer``: each tensor prunes ``round(s * numel)`` weights at level ``s``. ``global``: one threshold per
    level across all tensors, pruning ``round(s * total)`` weights overall. ``per-row``: each output row (dimension
    0; the rest flattened) prunes ``round(s * row size)`` weights. Tensors are processed in sorted-name
    order, which fixes tie-breaking across tensors. ``on_progress(done, total)`` reports progress in weights.
    """
    return codes_at_sparsities(tensors, validate_levels(list(levels)), allocation, on_progress)


def codes_at_sparsities(
    tensors: Mapping[str, torch.Tensor],
    sparsities: Sequence[float],
    allocation: str = "per-layer",
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Like :func:`compute_codes` but for intermediate sparsities of a gradual schedule.

    ``sparsities`` may start at 0 and repeat values (non-decreasing, each in [0, 1)); code ``k`` still means "alive
    at level k", so nesting holds after every recompute.
    """
    if any(not 0.0 <= s < 1.0 for s in sparsities) or any(b < a for a, b in zip(sparsities, sparsities[1:])):
        raise UsageError(f"scheduled sparsities {list(sparsities)} must be non-decreasing values in [0, 1)")
    if allocation not in ALLOCATIONS:
        raise UsageError(f"unknown allocation {allocation!r}", f"choose one of {', '.join(ALLOCATIONS)}")
    names = sorted(tensors)
    if not names:
        raise UsageError("no tensor selected for pruning", "check --include/--exclude patterns")
    codes: dict[str, torch.Tensor] = {}
    total = sum(tensors[n].numel() for n in names)
    done = 0
    if allocation == "per-row":
        for name in names:
            flat = _checked_flat(tensors[name], name)
            codes[name] = row_codes(flat.reshape(tensors[name].shape).abs() if tensors[name].dim() >= 2
                                    else flat.abs().reshape(1, -1), sparsities).reshape(tensors[name].shape)
            done += flat.numel()
            if on_progress:
                on_progress(done, total)
        return codes
    if allocation == "per-layer":
        for name in names:
            flat = _checked_flat(tensors[name], name)
            code = torch.zeros(flat.numel(), dtype=torch.uint8)
            stream = _Stream([flat], [code])
            selections = _select(stream, [pruned_count(s, flat.numel()) for s in sparsities])
            _apply_selections(stream, selections, _ties(selections))
            codes[name] = code.reshape(tensors[name].shape)
            done += code.numel()
            if on_progress:
                on_progress(done, total)
        return codes
    flats = [_checked_flat(tensors[name], name) for name in names]
    flat_codes = [torch.zeros(f.numel(), dtype=torch.uint8) for f in flats]
    selections = _select(_Stream(flats, flat_codes), [pruned_count(s, total) for s in sparsities])
    ties_left = _ties(selections)
    for name, flat, code in zip(names, flats, flat_codes):
        _apply_selections(_Stream([flat], [code]), selections, ties_left)
        codes[name] = code.reshape(tensors[name].shape)
        done += code.numel()
        if on_progress:
            on_progress(done, total)
    return codes


def level_mask(code: torch.Tensor, level_index: int) -> torch.Tensor:
    """Boolean keep-mask of level ``level_index`` (0 = dense) from a code tensor."""
    return code >= level_index


def code_histogram(code: torch.Tensor, num_levels: int) -> list[int]:
    """Count of weights per code value ``0..num_levels``."""
    flat = code.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.to(torch.int64)
    return torch.bincount(flat, minlength=num_levels + 1).tolist()


def pruned_per_level(code: torch.Tensor, num_levels: int) -> list[int]:
    """Number of pruned weights at each level ``0..num_levels`` (level 0 prunes none)."""
    hist = code_histogram(code, num_levels)
    return [sum(hist[:k]) for k in range(num_levels + 1)]


def pack_codes(code: torch.Tensor, bits: int) -> torch.Tensor:
    """Bit-pack codes into a flat uint8 tensor.

    Layout: a little-endian bit stream; code ``i`` occupies stream bits ``[i*bits, (i+1)*bits)``, least significant
    bit first, and stream bit ``j`` is bit ``j % 8`` of byte ``j // 8``. Unused high bits of the last byte are 0.
    """
    flat = code.reshape(-1).to(torch.uint8)
    n = flat.numel()
    if bits in (1, 2, 4, 8):
        per_byte = 8 // bits
        padded = torch.zeros(((n + per_byte - 1) // per_byte) * per_byte, dtype=torch.uint8)
        padded[:n] = flat
        groups = padded.reshape(-1, per_byte)
        packed = torch.zeros(groups.shape[0], dtype=torch.uint8)
        for j in range(per_byte):
            packed |= groups[:, j] << (j * bits)
        return packed
    array = flat.numpy()
    bit_matrix = ((array[:, None] >> np.arange(bits, dtype=np.uint8)) & 1).astype(np.uint8)
    return torch.from_numpy(np.packbits(bit_matrix.reshape(-1), bitorder="little"))


def unpack_codes(packed: torch.Tensor, bits: int, shape: Iterable[int]) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 codes of ``shape``."""
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    expected = packed_size(n, bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != expected:
        raise DsnnError(
            f"packed code tensor has {packed.numel()} bytes of {packed.dtype}, expected {expected} uint8",
            "the bundle is corrupt; re-create it with dsnn prune",
        )
    if bits in (1, 2, 4, 8):
        per_byte = 8 // bits
        mask = (1 << bits) - 1
        shifts = torch.arange(per_byte, dtype=torch.uint8) * bits
        codes = ((packed[:, None] >> shifts) & mask).reshape(-1)
        return codes[:n].reshape(shape).contiguous()
    stream = np.unpackbits(packed.numpy(), count=n * bits, bitorder="little").reshape(n, bits)
    values = (stream.astype(np.uint8) << np.arange(bits, dtype=np.uint8)).sum(axis=1, dtype=np.uint8)
    return torch.from_numpy(values).reshape(shape)


def packed_size(num_weights: int, bits: int) -> int:
    """Bytes of a packed code tensor for ``num_weights`` weights at ``bits`` bits each."""
    return (num_weights * bits + 7) // 8
