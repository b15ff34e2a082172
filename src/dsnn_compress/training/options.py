"""The recipe a ``dsnn finetune`` command line describes: a recipe file (or none) plus its flags as overrides."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..core.levels import parse_levels
from ..errors import UsageError
from .recipe import Recipe, apply_overrides, load_recipe, parse_set_option, recipe_from_dict

FLAG_KEYS = {
    "model": "model.init", "data": "data.train", "dev": "data.dev", "output": "output", "steps": "training.steps",
    "lr": "optimizer.lr", "sampling": "sampling.mode", "seed": "training.seed", "keep": "training.keep",
    "teacher": "distillation.teacher",
}
"""``dsnn finetune`` flags (and the positional model) that set one recipe key each."""


def recipe_from_options(recipe_path: Path | None, flags: Mapping[str, Any], sets: Sequence[str] = (),
                        levels: str | None = None) -> Recipe:
    """The validated recipe of a command line: ``recipe_path`` (or defaults) with ``--set`` items applied first,
    then the flags in ``flags`` (keys of :data:`FLAG_KEYS`, ``None`` = not given) and ``--levels``.

    Paths given on the command line are relative to the current directory. ``--steps`` replaces a recipe's
    ``training.epochs``. Without a recipe, the training manifest must come from ``--data`` or ``--set data.train``.
    """
    overrides: dict[str, Any] = {}
    for item in sets:
        key, value = parse_set_option(item)
        overrides[key] = value
    for flag, value in flags.items():
        if value is not None:
            overrides[FLAG_KEYS[flag]] = str(Path(value).absolute()) if isinstance(value, Path) else value
    if levels is not None:
        overrides["levels"] = list(parse_levels(levels))
    if flags.get("steps") is not None:
        overrides["training.epochs"] = None
    if recipe_path is not None:
        return apply_overrides(load_recipe(recipe_path), overrides)
    train = overrides.get("data.train")
    if train is None:
        raise UsageError("give --recipe R.yaml, or the training manifest (data.train) with --data TRAIN_MANIFEST",
                         "see `dsnn finetune --help`")
    return apply_overrides(recipe_from_dict({"data": {"train": train}}, base_dir=Path.cwd()), overrides)


def finetune_summary(result: Any) -> dict[str, Any] | None:
    """What ``dsnn finetune`` reports about a finished run, or None on a non-zero rank of a torchrun job (rank 0
    reports for all; torchrun sets ``RANK``)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    return {"output": str(result.output), "steps": result.steps, "levels": list(result.levels),
            "final_loss": result.final_losses, "dev_wer": result.dev_wer, "seconds": round(result.seconds, 2),
            "forward_passes": result.forward_passes, "log": str(result.log)}
