"""Terminal display of a training run (``finetune``, ``demo``): a rich progress bar, dev WER tables, plain lines when
not a terminal. A presenter of the command line: it receives the trainer's events (``report``) and writes to the
:mod:`.console`; the trainer itself prints nothing."""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .console import err
from .core.levels import Levels


def _rate(steps_per_s: float) -> str:
    """A training speed as people read it: steps/s when fast, s/step when slower than one step a second."""
    if steps_per_s <= 0:
        return "- steps/s"
    return f"{steps_per_s:.2f} steps/s" if steps_per_s >= 1 else f"{1 / steps_per_s:.1f} s/step"


def _losses(losses: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in losses.items())


class TrainingDisplay:
    """Receives ``finetune`` events; shows step, loss per level, LR, steps/s and ETA."""

    def __init__(self, json_mode: bool = False) -> None:
        self.interactive = err.is_terminal
        self.json_mode = json_mode
        self.progress = Progress(
            TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=False, disable=not self.interactive,
        )
        self.task: Any = None
        self.rate = 0.0
        self._since: tuple[int, float] | None = None

    def __enter__(self) -> TrainingDisplay:
        self.progress.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.progress.__exit__(exc_type, exc, tb)

    def _measure(self, step: int) -> float:
        """Steps per second since the first step this display saw (every tick counts, not only logged steps)."""
        now = time.perf_counter()
        if self._since is None:
            self._since = (step, now)
            return self.rate
        first, start = self._since
        return (step - first) / max(now - start, 1e-9) if step > first else self.rate

    def report(self, event: str, data: dict[str, Any]) -> None:
        """Handle one event from the training loop."""
        if event == "start":
            self.task = self.progress.add_task("training", total=data["steps"], completed=data["start_step"],
                                               info="")
            levels = ", ".join(Levels(tuple(data["levels"])).labels())
            err.print(f"training {data['params']:,} parameters on {data['device']} (world {data['world']}), "
                      f"levels {levels}, {data['steps']} steps ({data['per_epoch']} per epoch); log: {data['log']}")
        elif event in ("tick", "step"):
            self.rate = self._measure(data["step"])
            info = f"{_losses(data['loss'])} lr={data['lr']:.2e} {_rate(self.rate)}"
            self.progress.update(self.task, completed=data["step"], info=info)
            if event == "step" and not self.interactive:
                err.print(f"step {data['step']}: loss {_losses(data['loss'])} lr {data['lr']:.2e} "
                          f"{_rate(data['steps_per_s'])}", highlight=False)
        elif event == "eval":
            table = Table(title=f"dev WER at step {data['step']}", title_justify="left")
            for key in data["dev_wer"]:
                table.add_column(key, justify="right")
            table.add_row(*[f"{100 * v:.2f} %" for v in data["dev_wer"].values()])
            err.print(table)
        elif event == "checkpoint":
            err.print(f"checkpoint at step {data['step']}: {data['path']}", highlight=False)
