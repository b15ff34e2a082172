"""The training display's speed figure (it used to read 0.00 steps/s until the first logged step)."""

from __future__ import annotations

import pytest

from dsnn_compress import display as display_module
from dsnn_compress.display import TrainingDisplay


def test_speed_is_measured_from_every_tick(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([100.0, 110.0, 120.0, 130.0])  # one step every 10 s: 0.1 steps/s, before any logged "step" event
    monkeypatch.setattr(display_module.time, "perf_counter", lambda: next(clock))
    shown = TrainingDisplay()
    shown.report("start", {"steps": 30, "start_step": 0, "levels": [0.5], "params": 1, "device": "cpu",
                           "world": 1, "per_epoch": 30, "log": "x"})
    for step in (1, 2, 3, 4):
        shown.report("tick", {"step": step, "loss": {"dense": 1.0}, "lr": 1e-3})
    assert shown.rate == pytest.approx(0.1)
    info = shown.progress.tasks[0].fields["info"]
    assert "10.0 s/step" in info and "0.00" not in info
