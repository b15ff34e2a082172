"""What a training run writes: the result file (bundle or dense checkpoint) and the JSONL metrics log.

:class:`RunOutput` knows the run's output paths, refuses to clobber an existing output or an interrupted run's
state unless told to, and writes the result atomically: a DSNN bundle when the run has sparse levels, a
self-describing dense dsnn checkpoint when it has none, both carrying the resolved recipe, a ``training`` record
and :func:`dsnn_compress.tool_metadata`. :class:`JsonlLog` appends one JSON object per line (``event``, ``step``,
``time``, ...); on resume it first drops what the crashed run logged after the step it resumes from.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from .. import tool_metadata
from ..atomic import atomic_path, check_output_parent, clean_stale_temps, temp_path, write_error
from ..core.bundle import Bundle, save_bundle
from ..core.depth import apply_depth
from ..core.group_format import structured_bundle_parts
from ..core.groups import group_codes_from_weights
from ..errors import UsageError
from .model_setup import ModelSetup
from .recipe import Recipe
from .state import state_path


def log_path(output: Path) -> Path:
    """The JSONL metrics log next to ``output``."""
    return output.with_name(output.stem + ".log.jsonl")


@dataclass
class RunOutput:
    """The files of one run: ``path`` (the result), its resumable state file and its JSONL log."""

    path: Path
    recipe: Recipe

    @property
    def state_file(self) -> Path:
        """The resumable training state (see :mod:`.state`)."""
        return state_path(self.path)

    @property
    def log_file(self) -> Path:
        """The JSONL metrics log."""
        return log_path(self.path)

    def check(self, resume: bool, force: bool) -> None:
        """Fail early when an output cannot be written, or would overwrite something without ``force``.

        The result, the training state and the log are all checked (none may be a directory; without ``force`` none
        of the result and the log may exist, and no state of an interrupted run), and the stale temporary files of
        earlier killed runs are removed (:func:`~dsnn_compress.atomic.clean_stale_temps`), also on ``resume``.
        """
        output, state_file, log_file = self.path, self.state_file, self.log_file
        check_output_parent(output)
        for path in (output, state_file, log_file):
            if path.is_dir():
                raise UsageError(f"output {path} is a directory", "give the output a file name")
            clean_stale_temps(path)
        if resume:
            if not state_file.is_file():
                raise UsageError(f"no training state {state_file} to resume from",
                                 "start without --resume (checkpoints need training.checkpoint_every > 0)")
            return
        if state_file.exists() and not force:
            raise UsageError(f"a training state {state_file} exists from an interrupted run",
                             "pass --resume to continue it or --force to start over")
        for path in (output, log_file):
            if path.exists() and not force:
                raise UsageError(f"output {path} already exists", "pass --force to overwrite it or choose another path")

    def write(self, setup: ModelSetup, codes: dict[str, torch.Tensor], training: dict[str, Any],
              path: Path | None = None) -> None:
        """Write the model of ``setup`` with ``codes`` as a bundle (with no sparse levels: a dense checkpoint).

        ``training`` is the run's record (steps, final loss, dev WER, ...) stored in the file's metadata; ``path``
        (default: the result's own) lets a checkpoint stage the file beside its state.
        """
        from ..sources.checkpoint import in_dtypes, save_checkpoint

        recipe = self.recipe
        path = self.path if path is None else path

        if not setup.levels:
            extra = {"recipe": json.dumps(recipe.to_dict(), sort_keys=True),
                     "training": json.dumps(training, sort_keys=True),
                     "tool": json.dumps(tool_metadata())}
            save_checkpoint(setup.adapter, path, extra, setup.dtypes)
            return
        tensors = in_dtypes(setup.adapter.model.state_dict(), setup.dtypes)
        metadata = {
            **setup.base_metadata,
            "allocation": setup.base_metadata.get("allocation", recipe.allocation),
            "selection": setup.base_metadata.get("selection", {"include": list(recipe.include),
                                                               "exclude": list(recipe.exclude)}),
            "source": setup.source,
            "tool": tool_metadata(),
            "command": ["dsnn", "finetune"],
            "model": setup.adapter.metadata(),
            "recipe": recipe.to_dict(),
            "training": training,
        }
        codes = {n: c.cpu() for n, c in codes.items()}
        structured = None
        if setup.groups is not None:  # group codes back from the weight codes; stored in prefix order
            # a depth bundle's weight codes are capped in dropped layers: its group codes are the bundle's own
            group_codes = setup.group_codes if setup.depth else group_codes_from_weights(setup.groups, codes)
            tensors, codes, structured = structured_bundle_parts(setup.groups, tensors, group_codes, len(setup.levels))
            if setup.depth:
                codes = apply_depth(setup.depth, tensors, codes)
            metadata["allocation"] = setup.allocation
        save_bundle(Bundle(tensors=tensors, codes=codes, levels=setup.levels, metadata=metadata,
                           structured=structured, depth=setup.depth), path)


class JsonlLog:
    """The metrics log; a log opened with no file (ranks other than 0) ignores writes.

    A new run's log is written under a temporary name (``.dsnn-tmp-<pid>-<random>.NAME.log.jsonl``) and appears
    under its own name only when :meth:`publish` is called (at the run's first checkpoint or at its end), so a run
    that fails before either leaves no log; :meth:`discard` removes the unpublished file.
    """

    def __init__(self, handle: TextIO | None = None, path: Path | None = None, pending: Path | None = None) -> None:
        self.handle = handle
        self.path = path
        self.pending = pending
        """The temporary file being written until :meth:`publish`; None once published (or on resume)."""

    @classmethod
    def open(cls, path: Path, resume: bool, step: int = 0) -> JsonlLog:
        """Open for writing; on resume, first drop what the crashed run logged after the resumed ``step``.

        A crash after the last checkpoint leaves records of steps that the resumed run repeats (and possibly a torn
        last line from a kill in mid-write); keeping them would give duplicate or unparseable records.
        """
        if not resume:
            pending = temp_path(path)
            try:
                return cls(open(pending, "w", encoding="utf-8"), path, pending)
            except OSError as exc:
                raise write_error(path, exc) from exc
        kept: list[str] = []
        if path.is_file():
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                logged = record.get("step") if isinstance(record, dict) else None
                if isinstance(logged, int) and logged <= step:
                    kept.append(line)
        with atomic_path(path) as tmp:
            Path(tmp).write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
        try:
            return cls(open(path, "a", encoding="utf-8"), path)
        except OSError as exc:
            raise write_error(path, exc) from exc

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` with the wall-clock ``time``, flushed (a kill loses at most the line being written)."""
        if self.handle is None:
            return
        try:
            self.handle.write(json.dumps({"time": round(time.time(), 3), **record}, sort_keys=True) + "\n")
            self.handle.flush()
        except OSError as exc:
            raise write_error(self.path or Path(self.handle.name), exc) from exc

    def publish(self) -> None:
        """Give the log its own name (idempotent); the open handle keeps appending to the same file."""
        if self.pending is None or self.path is None:
            return
        try:
            os.replace(self.pending, self.path)
        except OSError as exc:
            raise write_error(self.path, exc) from exc
        self.pending = None

    def discard(self) -> None:
        """Close and remove the log if it was never published (a run that failed before its first checkpoint)."""
        self.close()
        if self.pending is not None:
            with contextlib.suppress(OSError):
                self.pending.unlink()
            self.pending = None

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self.handle is not None:
            with contextlib.suppress(OSError):  # a flush error was reported by the write that met it
                self.handle.close()
            self.handle = None
