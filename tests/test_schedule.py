"""Gradual-pruning and learning-rate schedules against hand-computed values."""

from __future__ import annotations

import math

import pytest

from dsnn_compress.core.schedule import cubic_fraction, lr_at, scheduled_levels, should_update_codes
from dsnn_compress.training.recipe import LRScheduleConfig, PruningScheduleConfig

# ------------------------------------------------------------------------------------------------------- cubic


@pytest.mark.parametrize(
    ("step", "expected"),
    [(0, 0.0), (25, 1 - 0.75**3), (50, 0.875), (75, 1 - 0.25**3), (100, 1.0), (150, 1.0)],
)
def test_cubic_fraction_from_zero(step: int, expected: float):
    assert cubic_fraction(step, 0, 100) == pytest.approx(expected)


def test_cubic_fraction_with_offset_and_initial_fraction():
    # start 10, end 30, initial 0.2: before start 0.2; step 20 -> 1 + (0.2 - 1) * 0.5**3 = 0.9
    assert cubic_fraction(0, 10, 30, 0.2) == pytest.approx(0.2)
    assert cubic_fraction(10, 10, 30, 0.2) == pytest.approx(0.2)
    assert cubic_fraction(20, 10, 30, 0.2) == pytest.approx(0.9)
    assert cubic_fraction(25, 10, 30, 0.2) == pytest.approx(1 - 0.8 * 0.25**3)
    assert cubic_fraction(30, 10, 30, 0.2) == 1.0
    assert cubic_fraction(1000, 10, 30, 0.2) == 1.0


def test_cubic_fraction_is_monotone():
    values = [cubic_fraction(s, 7, 93, 0.3) for s in range(120)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert values[0] == pytest.approx(0.3) and values[-1] == 1.0


def test_scheduled_levels():
    cfg = PruningScheduleConfig(enabled=True, start_step=0, end_step=100)
    assert scheduled_levels([0.5, 0.7, 0.9], 0, cfg) == [0.0, 0.0, 0.0]
    assert scheduled_levels([0.5, 0.7, 0.9], 50, cfg) == pytest.approx([0.4375, 0.6125, 0.7875])
    assert scheduled_levels([0.5, 0.7, 0.9], 100, cfg) == pytest.approx([0.5, 0.7, 0.9])
    assert scheduled_levels([0.5, 0.9], 50, PruningScheduleConfig(enabled=False)) == [0.5, 0.9]
    for step in range(0, 110, 3):
        levels = scheduled_levels([0.5, 0.7, 0.9], step, cfg)
        assert all(b >= a for a, b in zip(levels, levels[1:]))


def test_scheduled_levels_monotone_over_time():
    cfg = PruningScheduleConfig(enabled=True, initial_fraction=0.1, start_step=5, end_step=40)
    previous = [0.0, 0.0]
    for step in range(50):
        current = scheduled_levels([0.6, 0.8], step, cfg)
        assert all(c >= p for c, p in zip(current, previous))
        previous = current


def test_should_update_codes():
    cfg = PruningScheduleConfig(enabled=True, start_step=10, end_step=35, update_every=10)
    updates = [s for s in range(60) if should_update_codes(s, cfg)]
    assert updates == [10, 20, 30, 35]
    cfg = PruningScheduleConfig(enabled=True, start_step=0, end_step=20, update_every=10)
    assert [s for s in range(30) if should_update_codes(s, cfg)] == [0, 10, 20]
    assert not any(should_update_codes(s, PruningScheduleConfig(enabled=False)) for s in range(2000))


# ---------------------------------------------------------------------------------------------------------- lr


def test_warmup_is_linear_from_zero():
    cfg = LRScheduleConfig(warmup_steps=4, decay="constant")
    assert [lr_at(s, 1.0, cfg, 100) for s in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


def test_constant():
    cfg = LRScheduleConfig(warmup_steps=0, decay="constant")
    assert lr_at(0, 0.1, cfg, 10) == 0.1 and lr_at(9, 0.1, cfg, 10) == 0.1


def test_linear():
    cfg = LRScheduleConfig(warmup_steps=10, decay="linear", min_lr_ratio=0.0)
    # after warm-up: p = (step - 10) / 100
    assert lr_at(10, 1.0, cfg, 110) == pytest.approx(1.0)
    assert lr_at(60, 1.0, cfg, 110) == pytest.approx(0.5)
    assert lr_at(110, 1.0, cfg, 110) == pytest.approx(0.0)
    cfg = LRScheduleConfig(warmup_steps=0, decay="linear", min_lr_ratio=0.2)
    assert lr_at(50, 2.0, cfg, 100) == pytest.approx(2.0 * (1 - 0.8 * 0.5))
    assert lr_at(100, 2.0, cfg, 100) == pytest.approx(0.4)
    assert lr_at(500, 2.0, cfg, 100) == pytest.approx(0.4)  # clamped past the end


def test_cosine():
    cfg = LRScheduleConfig(warmup_steps=0, decay="cosine", min_lr_ratio=0.0)
    assert lr_at(0, 1.0, cfg, 100) == pytest.approx(1.0)
    assert lr_at(50, 1.0, cfg, 100) == pytest.approx(0.5)
    assert lr_at(25, 1.0, cfg, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(100, 1.0, cfg, 100) == pytest.approx(0.0, abs=1e-12)
    cfg = LRScheduleConfig(warmup_steps=20, decay="cosine", min_lr_ratio=0.1)
    assert lr_at(9, 1.0, cfg, 120) == pytest.approx(0.5)  # warm-up
    assert lr_at(70, 1.0, cfg, 120) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(120, 1.0, cfg, 120) == pytest.approx(0.1)


def test_inverse_sqrt():
    cfg = LRScheduleConfig(warmup_steps=4, decay="inverse_sqrt")
    assert lr_at(1, 1.0, cfg, 100) == pytest.approx(0.5)  # warm-up
    assert lr_at(3, 1.0, cfg, 100) == pytest.approx(1.0)  # sqrt(4 / 4)
    assert lr_at(15, 1.0, cfg, 100) == pytest.approx(0.5)  # sqrt(4 / 16)
    assert lr_at(99, 1.0, cfg, 100) == pytest.approx(0.2)  # sqrt(4 / 100)
    cfg = LRScheduleConfig(warmup_steps=0, decay="inverse_sqrt")
    assert lr_at(0, 1.0, cfg, 100) == pytest.approx(1.0)
    assert lr_at(3, 1.0, cfg, 100) == pytest.approx(0.5)


@pytest.mark.parametrize("decay", ["constant", "linear", "cosine", "inverse_sqrt"])
def test_lr_never_increases_after_warmup_and_stays_positive_until_the_end(decay: str):
    cfg = LRScheduleConfig(warmup_steps=10, decay=decay, min_lr_ratio=0.05)
    values = [lr_at(s, 1e-3, cfg, 200) for s in range(200)]
    assert all(b <= a + 1e-15 for a, b in zip(values[9:], values[10:]))
    assert all(b >= a for a, b in zip(values[:10], values[1:10]))
    assert min(values) > 0 and max(values) == pytest.approx(1e-3)


def test_warmup_longer_than_the_run():
    cfg = LRScheduleConfig(warmup_steps=100, decay="cosine")
    assert lr_at(9, 1.0, cfg, 10) == pytest.approx(0.1)


def test_bad_arguments():
    with pytest.raises(ValueError):
        lr_at(-1, 1.0, LRScheduleConfig(), 10)
    with pytest.raises(ValueError):
        lr_at(0, 1.0, LRScheduleConfig(decay="step"), 10)
