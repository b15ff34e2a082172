"""Fine-tuning recipes: a YAML file turned into typed, validated dataclasses.

A recipe is read with ``yaml.safe_load`` only and checked completely before any training starts. Every problem
raises :class:`~dsnn_compress.errors.UsageError` (exit code 2) whose message names the file and the dotted key,
for example ``recipe r.yaml: optimizer.lr must be a positive number, got -1``.

Rules common to all keys (``docs/recipes.md`` lists every key):

* unknown keys are errors, with a close-match suggestion (``difflib``);
* integer keys accept integral floats (``1e3``, ``1000.0``), number keys accept integers, and numbers written in
  exponent notation without a dot (``1e-3``, which YAML 1.1 reads as a string) are accepted as numbers;
* boolean keys need a real YAML boolean (``true``/``false``), not a string or a number;
* an empty section (``sampling:`` with everything commented out) means "all defaults";
* relative paths in a recipe file (``data.train``, ``data.dev``, ``model.init``, ``output``) are relative to the
  directory of the recipe file; paths given as overrides (:func:`apply_overrides`) are relative to the current
  directory. After validation every path in a :class:`Recipe` is absolute.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn

import yaml

from ..core.masks import ALLOCATIONS, validate_levels
from ..data.text import NORMALIZERS
from ..errors import UsageError
from ..models.registry import FAMILIES, family_names

SAMPLING_MODES = ("all", "sandwich")
"""``sampling.mode`` choices: train every level each step, or dense + sparsest + k random middle levels."""
LR_DECAYS = ("constant", "linear", "cosine", "inverse_sqrt")
"""``lr_schedule.decay`` choices."""
KEEP_CHOICES = ("last", "best")
"""``training.keep`` choices."""
DEFAULT_STEPS = 1000
"""``training.steps`` when neither ``steps`` nor ``epochs`` is given."""
DEFAULT_OUTPUT = "dsnn-finetuned.safetensors"
"""``output`` when not given (relative: resolved like any recipe path)."""
PATH_KEYS = ("data.train", "data.dev", "model.init", "output")
"""Dotted keys holding file paths (resolved against the recipe directory, or the CWD for overrides)."""

_DOCS_HINT = "see docs/recipes.md for every recipe key, its type and its allowed range"
_DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?")
_NUMBER_RE = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?")


# --------------------------------------------------------------------------------------------------- dataclasses


@dataclass
class DataConfig:
    """``data``: where the training/dev utterances come from and how they are batched."""

    train: Path
    dev: Path | None = None
    batch_frames: int = 20000
    max_batch_size: int | None = None
    num_workers: int = 0
    skip_bad: bool = False
    spec_augment: bool = True
    max_dev_utterances: int | None = None


@dataclass
class ModelConfig:
    """``model``: the starting point (a bundle/checkpoint, or a fresh model of a family and size)."""

    init: Path | None = None
    family: str = "conformer-ctc"
    size: str = "s"
    config: dict[str, Any] = field(default_factory=dict)
    normalizer: str = "default"


@dataclass
class SamplingConfig:
    """``sampling``: which levels are trained at each step."""

    mode: str = "all"
    random_levels: int = 1
    loss_weights: list[float] | None = None


@dataclass
class DistillationConfig:
    """``distillation``: sparse levels learn from the dense level's output distribution."""

    enabled: bool = False
    weight: float = 1.0
    temperature: float = 1.0


@dataclass
class PruningScheduleConfig:
    """``schedule``: gradual (cubic) pruning from ``initial_fraction * target`` to each level's target."""

    enabled: bool = False
    initial_fraction: float = 0.0
    start_step: int = 0
    end_step: int = 600
    update_every: int = 100


@dataclass
class OptimizerConfig:
    """``optimizer``: AdamW hyper-parameters."""

    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8


@dataclass
class LRScheduleConfig:
    """``lr_schedule``: linear warm-up, then a decay rule."""

    warmup_steps: int = 0
    decay: str = "cosine"
    min_lr_ratio: float = 0.0


@dataclass
class TrainingConfig:
    """``training``: run length, evaluation, checkpoints, seed and device."""

    steps: int | None = None
    epochs: float | None = None
    grad_clip: float | None = 5.0
    eval_every: int = 0
    checkpoint_every: int = 0
    keep: str = "last"
    seed: int = 0
    device: str = "auto"
    log_every: int = 10


@dataclass
class Recipe:
    """A complete, validated fine-tuning recipe. ``source`` (the recipe file) is not part of equality."""

    data: DataConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    levels: list[float] | None = None
    allocation: str = "per-layer"
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    distillation: DistillationConfig = field(default_factory=DistillationConfig)
    schedule: PruningScheduleConfig = field(default_factory=PruningScheduleConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    output: Path = Path(DEFAULT_OUTPUT)
    source: Path | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as JSON-serialisable data (paths as absolute strings, ``source`` left out).

        ``recipe_from_dict(recipe.to_dict())`` gives an equal recipe.
        """
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "source":
                continue
            value = getattr(self, f.name)
            if f.name in _SECTIONS:
                out[f.name] = {g.name: _jsonable(getattr(value, g.name)) for g in fields(value)}
            else:
                out[f.name] = _jsonable(value)
        return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


# ------------------------------------------------------------------------------------------------ error context


class _Context:
    """Where values come from: the label used in messages, the base directory of relative paths, overrides."""

    def __init__(self, label: str, base_dir: Path, overridden: frozenset[str] = frozenset()) -> None:
        self.label = label
        self.base_dir = base_dir
        self.overridden = overridden

    def label_for(self, *paths: str) -> str:
        for path in paths:
            for key in self.overridden:
                if path == key or path.startswith(key + ".") or key.startswith(path + "."):
                    return f"override {key}"
        return self.label

    def fail(self, paths: str | Sequence[str], message: str, hint: str | None = _DOCS_HINT) -> NoReturn:
        names = (paths,) if isinstance(paths, str) else tuple(paths)
        raise UsageError(f"{self.label_for(*names)}: {message}", hint)


def _show(value: Any) -> str:
    """A short YAML-ish rendering of a bad value for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value) if len(value) <= 60 else repr(value[:57] + "...")
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, float):
        return f"{value:g}" if math.isfinite(value) else str(value)
    if isinstance(value, int):
        return str(value)
    return f"a {type(value).__name__}"


def _suggestion(word: str, candidates: Sequence[str]) -> str:
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


# ------------------------------------------------------------------------------------------------- value checks

Spec = Callable[[Any, _Context, str], Any]


def _as_number(value: Any) -> int | float | None:
    """``value`` as an int/float, or None if it is not a number (bools are not numbers)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str) and _NUMBER_RE.fullmatch(value.strip()):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            return float(text)
    return None


def _range_text(low: float | None, low_open: bool, high: float | None, high_open: bool, integer: bool) -> str:
    kind = "integer" if integer else "number"
    if high is None:
        if low is None:
            return f"an {kind}" if integer else f"a {kind}"
        if low == 0:
            return f"a positive {kind}" if low_open else f"a non-negative {kind}"
        return f"{'an' if integer else 'a'} {kind} {'>' if low_open else '>='} {low:g}"
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    return f"a {kind} in {left}{low:g}, {high:g}{right}"


def _check_range(number: float, low: float | None, low_open: bool, high: float | None, high_open: bool) -> bool:
    if low is not None and (number <= low if low_open else number < low):
        return False
    return not (high is not None and (number >= high if high_open else number > high))


def _number_spec(
    *,
    integer: bool,
    low: float | None = None,
    low_open: bool = False,
    high: float | None = None,
    high_open: bool = False,
    optional: bool = False,
) -> Spec:
    wanted = _range_text(low, low_open, high, high_open, integer)
    if optional:
        wanted += " or null"

    def check(value: Any, ctx: _Context, path: str) -> Any:
        if value is None and optional:
            return None
        number = _as_number(value)
        if number is None:
            ctx.fail(path, f"{path} must be {wanted}, got {_show(value)}")
        if isinstance(number, float) and not math.isfinite(number):
            ctx.fail(path, f"{path} must be a finite number, got {_show(number)}")
        if integer:
            if isinstance(number, float):
                if not number.is_integer():
                    ctx.fail(path, f"{path} must be {wanted}, got {_show(number)} (not a whole number)")
                number = int(number)
        else:
            number = float(number)
        if not _check_range(number, low, low_open, high, high_open):
            ctx.fail(path, f"{path} must be {wanted}, got {_show(number)}")
        return number

    return check


def _int(low: int | None = None, *, low_open: bool = False, high: int | None = None, optional: bool = False) -> Spec:
    return _number_spec(integer=True, low=low, low_open=low_open, high=high, optional=optional)


def _float(
    low: float | None = None,
    *,
    low_open: bool = False,
    high: float | None = None,
    high_open: bool = False,
    optional: bool = False,
) -> Spec:
    return _number_spec(integer=False, low=low, low_open=low_open, high=high, high_open=high_open, optional=optional)


def _bool() -> Spec:
    def check(value: Any, ctx: _Context, path: str) -> bool:
        if not isinstance(value, bool):
            ctx.fail(path, f"{path} must be true or false, got {_show(value)}")
        return value

    return check


def _choice(choices: Callable[[], Sequence[str]]) -> Spec:
    def check(value: Any, ctx: _Context, path: str) -> str:
        known = list(choices())
        if not isinstance(value, str) or value not in known:
            hint = _suggestion(value, known) if isinstance(value, str) else ""
            ctx.fail(path, f"{path} must be one of {', '.join(known)}, got {_show(value)}{hint}")
        return value

    return check


def _string(pattern: re.Pattern[str] | None = None, what: str = "a non-empty string") -> Spec:
    def check(value: Any, ctx: _Context, path: str) -> str:
        if not isinstance(value, str) or not value.strip() or (pattern is not None and not pattern.fullmatch(value)):
            ctx.fail(path, f"{path} must be {what}, got {_show(value)}")
        return value

    return check


def _path(optional: bool = False) -> Spec:
    wanted = "a file path" + (" or null" if optional else "")

    def check(value: Any, ctx: _Context, path: str) -> Path | None:
        if value is None and optional:
            return None
        if isinstance(value, Path):
            value = str(value)
        if not isinstance(value, str) or not value.strip():
            ctx.fail(path, f"{path} must be {wanted}, got {_show(value)}")
        resolved = Path(value).expanduser()
        if not resolved.is_absolute():
            resolved = ctx.base_dir / resolved
        return Path(os.path.normpath(resolved))

    return check


def _string_list() -> Spec:
    def check(value: Any, ctx: _Context, path: str) -> list[str]:
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            ctx.fail(path, f"{path} must be a list of glob patterns, got {_show(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item.strip():
                ctx.fail(path, f"{path}[{i}] must be a non-empty glob pattern, got {_show(item)}")
        return list(value)

    return check


def _number_list(path: str, value: Any, ctx: _Context, wanted: str) -> list[float]:
    if not isinstance(value, (list, tuple)):
        ctx.fail(path, f"{path} must be {wanted}, got {_show(value)}")
    numbers: list[float] = []
    for i, item in enumerate(value):
        number = _as_number(item)
        if number is None or not math.isfinite(number):
            ctx.fail(path, f"{path}[{i}] must be a finite number, got {_show(item)}")
        numbers.append(float(number))
    return numbers


def _levels() -> Spec:
    def check(value: Any, ctx: _Context, path: str) -> list[float] | None:
        if value is None:
            return None
        numbers = _number_list(path, value, ctx, "a list of sparsity fractions such as [0.5, 0.7, 0.9], [] or null")
        if numbers and numbers[0] == 0.0:
            numbers = numbers[1:]  # the dense level 0 is implicit; accept it written out, as --levels does
        if not numbers:
            return []
        try:
            return list(validate_levels(numbers))
        except UsageError as exc:
            ctx.fail(path, f"{path}: {exc.message}", exc.hint)

    return check


def _loss_weights() -> Spec:
    def check(value: Any, ctx: _Context, path: str) -> list[float] | None:
        if value is None:
            return None
        numbers = _number_list(path, value, ctx, "a list of non-negative weights (dense level first) or null")
        if not numbers:
            ctx.fail(path, f"{path} must not be empty (one weight per level, dense first), or null for all 1.0")
        for i, number in enumerate(numbers):
            if number < 0:
                ctx.fail(path, f"{path}[{i}] must be a non-negative number, got {_show(number)}")
        if not any(n > 0 for n in numbers):
            ctx.fail(path, f"{path} must have at least one weight > 0, got all zeros")
        return numbers

    return check


def _betas() -> Spec:
    def check(value: Any, ctx: _Context, path: str) -> tuple[float, float]:
        numbers = _number_list(path, value, ctx, "a list of two numbers in [0, 1)")
        if len(numbers) != 2:
            ctx.fail(path, f"{path} must be a list of two numbers in [0, 1), got {len(numbers)} numbers")
        for i, number in enumerate(numbers):
            if not 0.0 <= number < 1.0:
                ctx.fail(path, f"{path}[{i}] must be a number in [0, 1), got {_show(number)}")
        return (numbers[0], numbers[1])

    return check


_JSON_SCALARS = (str, int, float, bool, type(None))


def _config_mapping() -> Spec:
    def check_value(value: Any, ctx: _Context, path: str) -> Any:
        if isinstance(value, _JSON_SCALARS):
            if isinstance(value, float) and not math.isfinite(value):
                ctx.fail(path, f"{path} must be a finite number, got {_show(value)}")
            return value
        if isinstance(value, (list, tuple)):
            return [check_value(v, ctx, f"{path}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, Mapping):
            return check_map(value, ctx, path)
        ctx.fail(path, f"{path} must be a string, number, boolean, list or mapping, got {_show(value)}")

    def check_map(value: Any, ctx: _Context, path: str) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            ctx.fail(path, f"{path} must be a mapping of model config fields, got {_show(value)}")
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str) or not key:
                ctx.fail(path, f"{path} keys must be non-empty strings, got {_show(key)}")
            out[key] = check_value(item, ctx, f"{path}.{key}")
        return out

    return check_map


# ------------------------------------------------------------------------------------------------------- schema

_SECTIONS: dict[str, tuple[type, dict[str, Spec]]] = {
    "data": (
        DataConfig,
        {
            "train": _path(),
            "dev": _path(optional=True),
            "batch_frames": _int(0, low_open=True),
            "max_batch_size": _int(0, low_open=True, optional=True),
            "num_workers": _int(0),
            "skip_bad": _bool(),
            "spec_augment": _bool(),
            "max_dev_utterances": _int(0, low_open=True, optional=True),
        },
    ),
    "model": (
        ModelConfig,
        {
            "init": _path(optional=True),
            "family": _choice(family_names),
            "size": _string(),
            "config": _config_mapping(),
            "normalizer": _choice(lambda: list(NORMALIZERS)),
        },
    ),
    "sampling": (
        SamplingConfig,
        {
            "mode": _choice(lambda: SAMPLING_MODES),
            "random_levels": _int(0),
            "loss_weights": _loss_weights(),
        },
    ),
    "distillation": (
        DistillationConfig,
        {
            "enabled": _bool(),
            "weight": _float(0),
            "temperature": _float(0, low_open=True),
        },
    ),
    "schedule": (
        PruningScheduleConfig,
        {
            "enabled": _bool(),
            "initial_fraction": _float(0, high=1, high_open=True),
            "start_step": _int(0),
            "end_step": _int(0, low_open=True),
            "update_every": _int(0, low_open=True),
        },
    ),
    "optimizer": (
        OptimizerConfig,
        {
            "lr": _float(0, low_open=True),
            "weight_decay": _float(0),
            "betas": _betas(),
            "eps": _float(0, low_open=True),
        },
    ),
    "lr_schedule": (
        LRScheduleConfig,
        {
            "warmup_steps": _int(0),
            "decay": _choice(lambda: LR_DECAYS),
            "min_lr_ratio": _float(0, high=1),
        },
    ),
    "training": (
        TrainingConfig,
        {
            "steps": _int(0, low_open=True, optional=True),
            "epochs": _float(0, low_open=True, optional=True),
            "grad_clip": _float(0, low_open=True, optional=True),
            "eval_every": _int(0),
            "checkpoint_every": _int(0),
            "keep": _choice(lambda: KEEP_CHOICES),
            "seed": _int(0, high=2**32 - 1),
            "device": _string(_DEVICE_RE, "auto, cpu, cuda or cuda:N"),
            "log_every": _int(0, low_open=True),
        },
    ),
}
_REQUIRED = {"data": ("train",)}
_TOP_VALUES: dict[str, Spec] = {
    "levels": _levels(),
    "allocation": _choice(lambda: ALLOCATIONS),
    "include": _string_list(),
    "exclude": _string_list(),
    "output": _path(),
}
TOP_LEVEL_KEYS = tuple(f.name for f in fields(Recipe) if f.name != "source")
"""Keys allowed at the top of a recipe file, in documentation order."""


def recipe_keys() -> list[str]:
    """Every dotted key a recipe (or an override) may set, e.g. ``optimizer.lr``."""
    keys: list[str] = []
    for name in TOP_LEVEL_KEYS:
        if name in _SECTIONS:
            keys.extend(f"{name}.{key}" for key in _SECTIONS[name][1])
        else:
            keys.append(name)
    return keys


def _unknown_key(ctx: _Context, key: Any, prefix: str, known: Sequence[str]) -> NoReturn:
    path = f"{prefix}.{key}" if prefix else str(key)
    hint = f"keys allowed in {prefix}: {', '.join(known)}" if prefix else f"top-level keys: {', '.join(known)}"
    suggestion = ""
    if isinstance(key, str):
        match = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
        if match:
            suggestion = f" (did you mean {(f'{prefix}.{match[0]}' if prefix else match[0])!r}?)"
        elif not prefix:
            # a section key written at the top level (`lr: ...`) or a misspelt dotted key
            leaves = {k.rsplit(".", 1)[-1]: k for k in recipe_keys() if "." in k}
            suggestion = f" (did you mean {leaves[key]!r}?)" if key in leaves else _suggestion(key, recipe_keys())
    ctx.fail(path, f"unknown key {path!r}{suggestion}", hint)


def _build_section(name: str, raw: Any, ctx: _Context) -> Any:
    cls, specs = _SECTIONS[name]
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        ctx.fail(name, f"{name} must be a mapping of keys, got {_show(raw)}")
    for key in raw:
        if key not in specs:
            _unknown_key(ctx, key, name, list(specs))
    kwargs: dict[str, Any] = {}
    for key, spec in specs.items():
        path = f"{name}.{key}"
        if key in raw:
            kwargs[key] = spec(raw[key], ctx, path)
        elif key in _REQUIRED.get(name, ()):
            ctx.fail(path, f"missing required key {path}", f"add `{name}:` with `{key}:` to the recipe")
    return cls(**kwargs)


def _build(data: Any, ctx: _Context, source: Path | None) -> Recipe:
    if not isinstance(data, Mapping):
        ctx.fail("", f"the top level must be a mapping of keys (data:, model:, ...), got {_show(data)}")
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            _unknown_key(ctx, key, "", TOP_LEVEL_KEYS)
    if "data" not in data or data["data"] is None:
        ctx.fail("data.train", "missing required key data.train", "add `data:` with `train: <manifest>` to the recipe")
    kwargs: dict[str, Any] = {}
    for name in TOP_LEVEL_KEYS:
        if name not in data:
            continue
        if name in _SECTIONS:
            kwargs[name] = _build_section(name, data[name], ctx)
        else:
            kwargs[name] = _TOP_VALUES[name](data[name], ctx, name)
    if "output" not in kwargs:  # the default output is relative too: next to the recipe (or in the CWD)
        kwargs["output"] = _TOP_VALUES["output"](DEFAULT_OUTPUT, ctx, "output")
    recipe = Recipe(source=source, **kwargs)
    _cross_checks(recipe, ctx)
    return recipe


def schedule_end_too_late(end_step: int, last_step: str) -> str:
    """The message for a gradual schedule whose end_step is not before the run's last step (``last_step``)."""
    return (f"schedule.end_step ({end_step}) must be before the last training step ({last_step}): "
            "the levels reach their target sparsity only after end_step")


def _cross_checks(recipe: Recipe, ctx: _Context) -> None:
    training = recipe.training
    if training.steps is not None and training.epochs is not None:
        ctx.fail(
            ("training.steps", "training.epochs"),
            f"training.steps ({training.steps}) and training.epochs ({training.epochs:g}) are both set",
            "set only one of them",
        )
    if training.steps is None and training.epochs is None:
        training.steps = DEFAULT_STEPS
    if training.keep == "best" and recipe.data.dev is None:
        ctx.fail(
            ("training.keep", "data.dev"),
            "training.keep: best needs a dev set to pick the best checkpoint, but data.dev is not set",
            "set data.dev or use training.keep: last",
        )
    schedule = recipe.schedule
    if schedule.end_step <= schedule.start_step:
        ctx.fail(
            ("schedule.end_step", "schedule.start_step"),
            f"schedule.end_step must be > schedule.start_step ({schedule.start_step}), got {schedule.end_step}",
        )
    no_levels = recipe.levels == [] or (recipe.levels is None and recipe.model.init is None)
    why = "levels is [] (dense only)" if recipe.levels == [] else "levels is not set and there is no model.init"
    if schedule.enabled and no_levels:
        ctx.fail(
            ("schedule.enabled", "levels"),
            f"schedule.enabled needs sparse levels, but {why}",
            "set levels, e.g. [0.5, 0.7, 0.9], or schedule.enabled: false",
        )
    if schedule.enabled and training.steps is not None and schedule.end_step >= training.steps:
        ctx.fail(
            ("schedule.end_step", "training.steps"),
            schedule_end_too_late(schedule.end_step, f"training.steps: {training.steps}"),
            f"set schedule.end_step below training.steps, e.g. {max(schedule.start_step + 1, training.steps * 2 // 3)}",
        )
    if recipe.distillation.enabled and no_levels:
        ctx.fail(
            ("distillation.enabled", "levels"),
            f"distillation.enabled needs sparse levels, but {why}",
            "set levels, e.g. [0.5, 0.7, 0.9], or distillation.enabled: false",
        )
    model = recipe.model
    factory = FAMILIES.get(model.family)
    if model.init is None and factory is not None and factory.sizes and model.size not in factory.sizes:
        sizes = list(factory.sizes)
        ctx.fail(
            "model.size",
            f"model.size must be a preset of {model.family} ({', '.join(sizes)}), got {_show(model.size)}"
            f"{_suggestion(model.size, sizes)}",
        )


# ---------------------------------------------------------------------------------------------------- public API


def recipe_from_dict(data: dict, source: Path | None = None, base_dir: Path | None = None) -> Recipe:
    """Validate recipe ``data`` (as parsed from YAML) into a :class:`Recipe`.

    Relative paths are resolved against ``base_dir``, else the directory of ``source``, else the current
    directory. ``source`` names the file in error messages.
    """
    source_path = Path(source) if source is not None else None
    if base_dir is None:
        base_dir = source_path.parent if source_path is not None else Path.cwd()
    base = Path(base_dir).expanduser().absolute().resolve()
    label = f"recipe {source_path}" if source_path is not None else "recipe"
    return _build(data, _Context(label, base), source_path)


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and validate the recipe file ``path`` (YAML, read with ``yaml.safe_load``)."""
    source = Path(path)
    label = f"recipe {source}"
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"recipe file {source} does not exist", "check the path (see recipes/ for examples)") from None
    except IsADirectoryError:
        raise UsageError(f"recipe {source} is a directory, not a YAML file", "pass the recipe file itself") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{label}: not UTF-8 text ({exc.reason} at byte {exc.start})", "save it as UTF-8") from None
    except OSError as exc:
        raise UsageError(
            f"cannot read recipe {source}: {exc.strerror or exc}", "check the path and permissions"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UsageError(
            f"{label}: invalid YAML{_yaml_where(exc)}: {_yaml_problem(exc)}", "fix the YAML syntax"
        ) from None
    if data is None:
        raise UsageError(f"{label}: the file is empty; the top level must be a mapping of keys", _DOCS_HINT)
    return recipe_from_dict(data, source=source)


def _yaml_where(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    if mark is None:
        return ""
    return f" at line {mark.line + 1}, column {mark.column + 1}"


def _yaml_problem(exc: yaml.YAMLError) -> str:
    problem = getattr(exc, "problem", None)
    context = getattr(exc, "context", None)
    if problem:
        return f"{context}: {problem}" if context else str(problem)
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def parse_set_option(text: str) -> tuple[str, Any]:
    """Split a CLI ``--set key=value``; the value is parsed as YAML (``50`` -> int, ``[0.5,0.9]`` -> list)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UsageError(f"--set expects key=value, got {text!r}", "for example --set training.steps=50")
    if any(not part for part in key.split(".")) or any(c.isspace() for c in key):
        raise UsageError(f"--set key {key!r} is not a dotted recipe key", "for example --set optimizer.lr=3e-4")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise UsageError(
            f"--set {key}: value {raw!r} is not valid YAML: {_yaml_problem(exc)}",
            "quote strings with special characters, e.g. --set 'include=[\"enc.*\"]'",
        ) from None
    return key, value


def apply_overrides(recipe: Recipe, overrides: Mapping[str, Any]) -> Recipe:
    """A new recipe with dotted-key ``overrides`` applied (``{"training.steps": 50, "levels": [0.5, 0.9]}``).

    Everything is validated again. Relative paths in overrides are relative to the current directory. Setting one
    of ``training.steps`` / ``training.epochs`` clears the other unless both are overridden. Keys under
    ``model.config`` may be set individually (``model.config.d_model``). ``recipe`` is not modified.
    """
    raw = recipe.to_dict()
    known = recipe_keys()
    cwd = Path.cwd()
    for key, value in overrides.items():
        if not isinstance(key, str) or not key:
            raise UsageError(f"override key {key!r} is not a dotted recipe key", "for example training.steps")
        parts = key.split(".")
        top = parts[0]
        if top not in TOP_LEVEL_KEYS:
            raise UsageError(
                f"unknown override key {key!r}{_suggestion(key, known)}", f"known keys: {', '.join(known)}"
            )
        if top in _SECTIONS:
            specs = _SECTIONS[top][1]
            if len(parts) == 1:
                if not isinstance(value, Mapping):
                    raise UsageError(
                        f"override {key}: {top} must be a mapping of keys, got {_show(value)}",
                        f"set single keys instead, e.g. {top}.{next(iter(specs))}=...",
                    )
                for sub, item in value.items():
                    if sub not in specs:
                        _unknown_key(_Context(f"override {key}", cwd), sub, top, list(specs))
                    raw[top][sub] = _override_path(f"{top}.{sub}", item, cwd)
                continue
            sub = parts[1]
            if sub not in specs or (len(parts) > 2 and not key.startswith("model.config.")):
                raise UsageError(
                    f"unknown override key {key!r}{_suggestion(key, known)}",
                    f"keys allowed in {top}: {', '.join(specs)}",
                )
            if len(parts) == 2:
                raw[top][sub] = _override_path(key, value, cwd)
            else:  # model.config.<field>[.<sub-field>...]
                node = raw["model"]["config"]
                for part in parts[2:-1]:
                    if not isinstance(node.get(part), dict):
                        node[part] = {}
                    node = node[part]
                node[parts[-1]] = value
        else:
            if len(parts) > 1:
                raise UsageError(f"unknown override key {key!r}{_suggestion(key, known)}", f"{top} has no sub-keys")
            raw[top] = _override_path(key, value, cwd)
    given = set(overrides)
    if "training.steps" in given and "training.epochs" not in given:
        raw["training"]["epochs"] = None
    if "training.epochs" in given and "training.steps" not in given:
        raw["training"]["steps"] = None
    base = recipe.source.parent if recipe.source is not None else cwd
    label = f"recipe {recipe.source}" if recipe.source is not None else "recipe"
    ctx = _Context(
        label, Path(base).expanduser().absolute().resolve(), frozenset(k for k in given if isinstance(k, str))
    )
    return _build(raw, ctx, recipe.source)


def _override_path(key: str, value: Any, cwd: Path) -> Any:
    """Paths given as overrides are relative to the current directory: make them absolute here."""
    if key in PATH_KEYS and isinstance(value, (str, Path)) and str(value).strip():
        path = Path(value).expanduser()
        return str(Path(os.path.normpath(path if path.is_absolute() else cwd / path)))
    return value
