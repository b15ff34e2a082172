"""Shared by the benchmark scripts: how much of the (possibly shared) machine other processes are using."""

from __future__ import annotations

import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def _busy_cpu_seconds() -> float:
    """CPU seconds all processes on the machine have been busy (``/proc/stat``; 0 where unavailable)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class Interference:
    """Fraction of the machine's CPU capacity used by *other* processes between ``start()`` and ``stop()``
    (this process and its waited-for children are not counted)."""

    def start(self) -> Interference:
        """Begin measuring."""
        self._t, self._busy, self._own = time.perf_counter(), _busy_cpu_seconds(), _own_cpu_seconds()
        return self

    def stop(self) -> float:
        """Foreign CPU load since ``start()`` as a fraction of all CPUs."""
        wall = time.perf_counter() - self._t
        foreign = (_busy_cpu_seconds() - self._busy) - (_own_cpu_seconds() - self._own)
        return max(0.0, foreign / (wall * (os.cpu_count() or 1))) if wall > 0 else 0.0


def wait_for_idle(max_wait: float, err: Any = None, threshold: float = 0.1) -> float:
    """Wait (up to ``max_wait`` s) until other processes use under ``threshold`` of the CPUs for 2 s in a row.

    Returns the last measured foreign load fraction; prints one notice to ``err`` (a rich console) if it waits.
    """
    deadline = time.perf_counter() + max_wait
    warned = False
    while True:
        probe = Interference().start()
        time.sleep(2.0)
        load = probe.stop()
        if load < threshold or time.perf_counter() >= deadline:
            return load
        if err is not None and not warned:
            err.print(f"[yellow]other processes use {load:.0%} of the CPUs; waiting up to {max_wait:.0f} s[/]")
            warned = True


def machine_env() -> dict[str, Any]:
    """When and on what a benchmark ran: UTC date, Python, torch and its threads, CPU count and model."""
    import torch

    cpuinfo = Path("/proc/cpuinfo")
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if cpuinfo.exists() else ""
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu": cpu,
    }
