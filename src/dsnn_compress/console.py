"""Shared rich consoles and the progress bar style used by long loops."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

out = Console(soft_wrap=False)
if not out.is_terminal:
    out.width = max(out.width, 140)
"""Results (tables) go to stdout."""
err = Console(stderr=True)
"""Progress and notes go to stderr, so stdout stays clean for ``--json``."""


def progress(transient: bool = True) -> Progress:
    """A progress bar on stderr with count, elapsed time and ETA."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=transient,
        disable=not err.is_terminal,
    )
