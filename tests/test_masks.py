"""Nested magnitude codes against torch.nn.utils.prune, tie-breaking, counts, bit packing and level parsing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import oracle_codes
from torch import nn
from torch.nn.utils import prune

from dsnn_compress.core.levels import parse_levels, validate_levels
from dsnn_compress.core.masks import (
    code_bits,
    compute_codes,
    level_mask,
    pack_codes,
    packed_size,
    pruned_per_level,
    unpack_codes,
)
from dsnn_compress.errors import DsnnError, UsageError

SHAPES = {
    "linear": (16, 24),
    "conv1d": (8, 4, 5),
    "conv2d": (6, 3, 3, 3),
    "lstm": (4 * 12, 10),
    "ten": (2, 5),  # 10 weights: 0.25 -> round(2.5) = 2 and 0.35 -> round(3.5) = 4 (banker's rounding)
}
LEVEL_SETS = [
    (0.5,),
    (0.3, 0.6, 0.9),
    (0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.95),  # 7 levels -> 3-bit codes
]


def tie_free(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A random fp32 tensor whose magnitudes are all distinct (so every correct pruner agrees)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        t = torch.randn(*shape, generator=gen)
        if torch.unique(t.abs()).numel() == t.numel():
            return t


class Holder(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.clone())


# ---------------------------------------------------------------- per-layer vs torch.nn.utils.prune


@pytest.mark.parametrize("levels", LEVEL_SETS, ids=lambda lv: f"{len(lv)}levels")
@pytest.mark.parametrize("kind", sorted(SHAPES))
def test_per_layer_matches_torch_l1_unstructured(kind: str, levels: tuple[float, ...]) -> None:
    weight = tie_free(SHAPES[kind], seed=len(levels) * 31 + len(kind))
    codes = compute_codes({"w": weight}, levels, "per-layer")["w"]
    assert codes.dtype == torch.uint8 and codes.shape == weight.shape
    assert int(codes.max()) <= len(levels)
    previous = torch.ones_like(weight, dtype=torch.bool)
    for k, s in enumerate(levels, 1):
        reference = prune.L1Unstructured(amount=s).compute_mask(weight, default_mask=torch.ones_like(weight))
        holder = Holder(weight)
        prune.l1_unstructured(holder, "weight", amount=s)
        assert torch.equal(holder.weight_mask, reference)
        mask = level_mask(codes, k)
        assert torch.equal(mask, reference.bool()), f"level {s}"
        assert int((~mask).sum()) == round(s * weight.numel())
        assert not bool((mask & ~previous).any()), "masks must be nested"
        previous = mask
    assert bool(level_mask(codes, 0).all())


def test_banker_rounding_of_pruned_count() -> None:
    weight = tie_free((2, 5), seed=3)
    codes = compute_codes({"w": weight}, (0.25, 0.35), "per-layer")["w"]
    # round(2.5) == 2 and round(3.5) == 4, as Python and torch.nn.utils.prune round.
    assert pruned_per_level(codes, 2) == [0, 2, 4]


# ---------------------------------------------------------------- global vs prune.global_unstructured


@pytest.mark.parametrize("levels", LEVEL_SETS, ids=lambda lv: f"{len(lv)}levels")
def test_global_matches_torch_global_unstructured(levels: tuple[float, ...]) -> None:
    # Different scales per tensor so global allocation differs clearly from per-layer.
    tensors = {name: tie_free(shape, seed=i) * (0.2 + i) for i, (name, shape) in enumerate(sorted(SHAPES.items()))}
    codes = compute_codes(tensors, levels, "global")
    total = sum(t.numel() for t in tensors.values())
    for k, s in enumerate(levels, 1):
        holders = {name: Holder(t) for name, t in tensors.items()}
        prune.global_unstructured(
            [(holders[n], "weight") for n in sorted(holders)], pruning_method=prune.L1Unstructured, amount=s
        )
        pruned = 0
        for name, holder in holders.items():
            mask = level_mask(codes[name], k)
            assert torch.equal(mask, holder.weight_mask.bool()), f"{name} at level {s}"
            assert not bool((mask & ~level_mask(codes[name], k - 1)).any())
            pruned += int((~mask).sum())
        assert pruned == round(s * total)
    per_layer = compute_codes(tensors, levels, "per-layer")
    assert any(not torch.equal(per_layer[n], codes[n]) for n in tensors)


# ---------------------------------------------------------------- ties, low precision, tiny tensors


def test_ties_at_zero_prune_earliest_index_first() -> None:
    weight = torch.tensor([0.0, 3.0, -0.0, 1.0, 0.0, -2.0, 0.0])
    codes = compute_codes({"w": weight}, (0.3, 0.5, 0.9), "per-layer")["w"]
    # counts: round(2.1)=2, round(3.5)=4, round(6.3)=6; zeros at 0,2,4,6 go first in index order, then 1.0, 2.0.
    assert codes.tolist() == [0, 3, 0, 2, 1, 2, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_all_equal_magnitudes_prune_in_index_order(dtype: torch.dtype) -> None:
    weight = torch.tensor([[0.5, -0.5, 0.5, -0.5, 0.5], [-0.5, 0.5, 0.5, -0.5, -0.5]], dtype=dtype)
    codes = compute_codes({"w": weight}, (0.2, 0.5), "per-layer")["w"]
    assert codes.tolist() == [[0, 0, 1, 1, 1], [2, 2, 2, 2, 2]]


def test_global_ties_break_by_sorted_tensor_name_not_insertion_order() -> None:
    tensors = {"z.weight": torch.zeros(2, 2), "a.weight": torch.zeros(2, 2), "m.weight": torch.ones(1, 2)}
    codes = compute_codes(tensors, (0.4, 0.6), "global")
    # total 10: round(4.0)=4 then round(6.0)=6; a.* (sorted first) goes entirely, then the first two of z.*.
    assert codes["a.weight"].tolist() == [[0, 0], [0, 0]]
    assert codes["z.weight"].tolist() == [[1, 1], [2, 2]]
    assert codes["m.weight"].tolist() == [[2, 2]]


@pytest.mark.parametrize("allocation", ["per-layer", "global"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_with_many_ties_matches_oracle(dtype: torch.dtype, allocation: str) -> None:
    gen = torch.Generator().manual_seed(11)
    tensors = {
        "b.weight": torch.randn(40, 50, generator=gen).to(dtype),
        "a.weight": (torch.randn(30, 20, generator=gen) * 4).to(dtype),
        "c.weight": torch.randint(-3, 4, (7, 9), generator=gen).to(dtype),  # few distinct values
    }
    assert torch.unique(tensors["b.weight"].abs()).numel() < tensors["b.weight"].numel()  # really has ties
    levels = (0.1, 0.5, 0.7, 0.93)
    codes = compute_codes(tensors, levels, allocation)
    expected = oracle_codes(tensors, levels, allocation)
    for name in tensors:
        assert codes[name].shape == tensors[name].shape
        np.testing.assert_array_equal(codes[name].numpy(), expected[name], err_msg=name)
    total = sum(t.numel() for t in tensors.values())
    for k, s in enumerate(levels, 1):
        counts = {n: int((codes[n] < k).sum()) for n in tensors}
        if allocation == "per-layer":
            assert counts == {n: round(s * t.numel()) for n, t in tensors.items()}
        else:
            assert sum(counts.values()) == round(s * total)


@pytest.mark.parametrize("allocation", ["per-layer", "global"])
def test_radix_select_second_pass_and_wide_range(allocation: str) -> None:
    # Values sharing their high 16 bits (only the low-bit pass separates them), subnormals, huge values, zeros.
    base = torch.tensor(1.0).view(torch.int32)
    gen = torch.Generator().manual_seed(5)
    close = (base + torch.randperm(3000, generator=gen).to(torch.int32)).view(torch.float32)
    close = close * torch.where(torch.rand(3000, generator=gen) < 0.5, -1.0, 1.0)
    wide = torch.tensor([1e-45, -1e-40, 3e38, -1e30, 0.0, 1e-20, 7.0, -7.0, 65504.0, 1e-38] * 3)
    tensors = {"close": close.reshape(60, 50), "wide": wide.reshape(5, 6)}
    levels = (0.05, 0.33, 0.5, 0.77, 0.999)
    codes = compute_codes(tensors, levels, allocation)
    expected = oracle_codes(tensors, levels, allocation)
    for name in tensors:
        np.testing.assert_array_equal(codes[name].numpy(), expected[name], err_msg=name)


def test_size_one_tensor_per_layer() -> None:
    codes = compute_codes({"w": torch.tensor([[-3.0]])}, (0.4, 0.5, 0.6), "per-layer")["w"]
    # round(0.4)=0, round(0.5)=0, round(0.6)=1: alive at the first two sparse levels.
    assert codes.tolist() == [[2]]


def test_size_one_tensors_global() -> None:
    codes = compute_codes({"a": torch.tensor([[2.0]]), "b": torch.tensor([[-1.0]])}, (0.5,), "global")
    assert codes["a"].tolist() == [[1]] and codes["b"].tolist() == [[0]]


def test_progress_reaches_total() -> None:
    calls: list[tuple[int, int]] = []
    tensors = {"a": torch.randn(3, 4), "b": torch.randn(5, 2)}
    compute_codes(tensors, (0.5,), "per-layer", lambda done, total: calls.append((done, total)))
    assert calls[-1] == (22, 22)


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("allocation", ["per-layer", "global"])
def test_non_finite_weights_are_refused_naming_the_tensor(bad: float, allocation: str) -> None:
    corrupt = torch.randn(4, 4)
    corrupt[2, 1] = bad
    with pytest.raises(DsnnError) as info:
        compute_codes({"ok.weight": torch.randn(3, 3), "enc.bad.weight": corrupt}, (0.5,), allocation)
    assert not isinstance(info.value, UsageError) and info.value.exit_code == 1
    assert "enc.bad.weight" in info.value.message


def test_integer_tensor_allocation_and_empty_selection_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="not floating point"):
        compute_codes({"w": torch.ones(2, 2, dtype=torch.int64)}, (0.5,))
    with pytest.raises(UsageError, match="allocation"):
        compute_codes({"w": torch.ones(2, 2)}, (0.5,), "per-channel")
    with pytest.raises(UsageError):
        compute_codes({}, (0.5,))


# ---------------------------------------------------------------- packing


def reference_pack(codes: list[int], bits: int) -> bytes:
    """Bit-by-bit writer of the documented layout: code i at stream bits [i*bits, (i+1)*bits), LSB first."""
    out = bytearray((len(codes) * bits + 7) // 8)
    for i, value in enumerate(codes):
        for j in range(bits):
            if (value >> j) & 1:
                pos = i * bits + j
                out[pos // 8] |= 1 << (pos % 8)
    return bytes(out)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("length", [1, 3, 7, 8, 9, 13, 64, 1001])
def test_pack_unpack_round_trip(bits: int, length: int) -> None:
    gen = torch.Generator().manual_seed(bits * 1000 + length)
    codes = torch.randint(0, 2**bits, (length,), generator=gen).to(torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == packed_size(length, bits) == math.ceil(length * bits / 8)
    assert bytes(packed.numpy()) == reference_pack(codes.tolist(), bits)
    shape = (length,) if length % 3 else (3, length // 3)
    restored = unpack_codes(packed, bits, shape)
    assert restored.dtype == torch.uint8 and restored.shape == shape
    assert torch.equal(restored.reshape(-1), codes)


def test_pack_hand_written_bytes() -> None:
    assert pack_codes(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [0x39]  # 0b00_11_10_01
    assert pack_codes(torch.tensor([5, 3, 7], dtype=torch.uint8), 3).tolist() == [0xDD, 0x01]  # 5 | 3<<3 | 7<<6
    ones = torch.tensor([1, 0, 1, 1, 0, 0, 0, 1, 1], dtype=torch.uint8)
    assert pack_codes(ones, 1).tolist() == [0x8D, 0x01]
    assert pack_codes(torch.tensor([[1, 2], [3, 0]], dtype=torch.uint8), 2).tolist() == [0x39]  # row-major
    assert unpack_codes(torch.tensor([0x39], dtype=torch.uint8), 2, (2, 2)).tolist() == [[1, 2], [3, 0]]


def test_unpack_rejects_wrong_size_or_dtype() -> None:
    with pytest.raises(DsnnError, match="expected 2"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 3, (5,))
    with pytest.raises(DsnnError):
        unpack_codes(torch.zeros(2, dtype=torch.int32), 3, (5,))


@pytest.mark.parametrize(("levels", "bits"), [(1, 1), (2, 2), (3, 2), (4, 3), (7, 3), (8, 4), (15, 4), (16, 5)])
def test_code_bits(levels: int, bits: int) -> None:
    assert code_bits(levels) == bits


# ---------------------------------------------------------------- level parsing


def test_parse_levels_accepts_and_drops_leading_zero() -> None:
    assert parse_levels("0.5,0.7,0.9") == (0.5, 0.7, 0.9)
    assert parse_levels(" 0.5 , 0.7,0.9, ") == (0.5, 0.7, 0.9)
    assert parse_levels("0,0.5,0.9") == (0.5, 0.9)
    assert parse_levels("0.0,0.25") == (0.25,)
    assert parse_levels([0, 0.5]) == (0.5,)
    assert parse_levels([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]) == (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("0.7,0.5", "increase"),
        ("0.5,0.9,0.7", "increase"),
        ("0.5,0.5", "twice"),
        ("0", "no sparse level"),
        ("0,0,0.5", "outside"),
        ("1.0", "outside"),
        ("0.5,1", "outside"),
        ("-0.1,0.5", "outside"),
        ("nan", "outside"),
        ("0.5,inf", "outside"),
        ("abc", "not a number"),
        ("0.5,70%", "not a number"),
        ("", "no sparsity levels"),
        (" , ", "no sparsity levels"),
    ],
)
def test_parse_levels_errors(text: str, fragment: str) -> None:
    with pytest.raises(UsageError, match=fragment) as info:
        parse_levels(text)
    assert info.value.exit_code == 2


def test_validate_levels_list_errors() -> None:
    with pytest.raises(UsageError):
        validate_levels([])
    with pytest.raises(UsageError):
        validate_levels([0.9, 0.5])
    with pytest.raises(UsageError):
        compute_codes({"w": torch.randn(2, 2)}, (0.5, 0.5))
