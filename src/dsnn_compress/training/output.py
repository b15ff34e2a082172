"""What a training run writes: the result file (bundle or dense checkpoint) and the JSONL metrics log.

:class:`RunOutput` knows the run's output paths, refuses to clobber an existing output or an interrupted run's
state unless told to, and writes the result atomically: a DSNN bundle when the run has sparse levels, a
self-describing dense dsnn checkpoint when it has none, both carrying the resolved recipe, a ``training`` record
and :func:`dsnn_compress.tool_metadata`. :class:`JsonlLog` appends one JSON object per line (``event``, ``step``,
``time``, ...); on resume it first drops what the crashed run logged after the step it resumes from.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from .. import tool_metadata
from ..atomic import atomic_path
from ..core.bundle import Bundle, save_bundle
from ..core.group_format import structured_bundle_parts
from ..core.groups import group_codes_from_weights
from ..errors import DsnnError, UsageError
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
        """Fail early when the output cannot be written, or would overwrite something without ``force``."""
        output, state_file = self.path, self.state_file
        parent = output.parent if str(output.parent) else Path(".")
        if not parent.is_dir():
            raise UsageError(f"output directory {parent} does not exist", "create it first")
        if not os.access(parent, os.W_OK):
            raise DsnnError(f"output directory {parent} is not writable", "choose a writable location")
        if resume:
            if not state_file.is_file():
                raise UsageError(f"no training state {state_file} to resume from",
                                 "start without --resume (checkpoints need training.checkpoint_every > 0)")
            return
        if state_file.exists() and not force:
            raise UsageError(f"a training state {state_file} exists from an interrupted run",
                             "pass --resume to continue it or --force to start over")
        if output.exists() and not force:
            raise UsageError(f"output {output} already exists", "pass --force to overwrite it or choose another path")

    def write(self, setup: ModelSetup, codes: dict[str, torch.Tensor], training: dict[str, Any]) -> None:
        """Write the model of ``setup`` with ``codes`` as a bundle (with no sparse levels: a dense checkpoint).

        ``training`` is the run's record (steps, final loss, dev WER, ...) stored in the file's metadata.
        """
        from ..sources.checkpoint import in_dtypes, save_checkpoint

        recipe = self.recipe

        if not setup.levels:
            extra = {"recipe": json.dumps(recipe.to_dict(), sort_keys=True),
                     "training": json.dumps(training, sort_keys=True),
                     "tool": json.dumps(tool_metadata())}
            save_checkpoint(setup.adapter, self.path, extra, setup.dtypes)
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
            group_codes = group_codes_from_weights(setup.groups, codes)
            tensors, codes, structured = structured_bundle_parts(setup.groups, tensors, group_codes, len(setup.levels))
            metadata["allocation"] = setup.allocation
        save_bundle(Bundle(tensors=tensors, codes=codes, levels=setup.levels, metadata=metadata,
                           structured=structured), self.path)


class JsonlLog:
    """The metrics log; a log opened with no file (ranks other than 0) ignores writes."""

    def __init__(self, handle: TextIO | None = None) -> None:
        self.handle = handle

    @classmethod
    def open(cls, path: Path, resume: bool, step: int = 0) -> JsonlLog:
        """Open for writing; on resume, first drop what the crashed run logged after the resumed ``step``.

        A crash after the last checkpoint leaves records of steps that the resumed run repeats (and possibly a torn
        last line from a kill in mid-write); keeping them would give duplicate or unparseable records.
        """
        if not resume:
            return cls(open(path, "w", encoding="utf-8"))
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
        return cls(open(path, "a", encoding="utf-8"))

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` with the wall-clock ``time``, flushed (a kill loses at most the line being written)."""
        if self.handle is None:
            return
        self.handle.write(json.dumps({"time": round(time.time(), 3), **record}, sort_keys=True) + "\n")
        self.handle.flush()

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self.handle is not None:
            self.handle.close()
            self.handle = None
