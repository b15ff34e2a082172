"""Fine-tuning recipes: a YAML file validated into typed pydantic models.

Design (what is validated where):

* The section classes below (:class:`DataConfig`, ..., :class:`TrainingConfig`) and :class:`Recipe` ARE the
  schema: pydantic models with ``extra="forbid"``, field constraints (``Field(gt=0)``) and the shared field types
  of :mod:`dsnn_compress.validation` and :mod:`.recipe_fields` (integers accept ``1e3``, numbers accept
  ``"1e-3"``, booleans are strict YAML ``true``/``false``, choices suggest the closest one). :func:`recipe_keys`,
  :data:`TOP_LEVEL_KEYS`, ``to_dict()`` and the key tables in docs/recipes.md (checked by tests/test_recipe.py)
  all derive from them.
* Rules between keys run in :meth:`Recipe._cross_checks`. A rule that the trainer must also apply with run-time
  facts is a public function here, written once and called from both places: :func:`check_schedule_end` (the
  step count of an ``epochs`` run is known only once the data is read) and :func:`check_loss_weights` (the
  number of levels may come from the init bundle).
* ``model.config`` is only checked to be JSON-like data here; the family's own config model validates it when
  the model is built (for the built-in families the pydantic dataclasses ``ConformerConfig``/``LSTMConfig``,
  built from the same field types, so numbers, booleans and error messages behave as here).
* Every :class:`pydantic.ValidationError` becomes one :class:`~dsnn_compress.errors.UsageError` (exit code 2)
  through the one formatter of :mod:`dsnn_compress.validation.errors`, naming the file (or ``override KEY``)
  and the dotted key, for example
  ``recipe r.yaml: optimizer.lr must be a positive number, got -1``.
* :func:`apply_overrides` only places ``--set`` values into the recipe's data (paths made absolute against the
  current directory) and validates the result with the same models. Paths written in a file are relative to the
  file's directory: they are resolved by the path fields from the validation context (``base_dir``); a section
  class constructed directly in Python keeps its paths as given and gets no ``training.steps`` default.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from ..core.groups import GRANULARITIES
from ..core.masks import ALLOCATIONS
from ..data.text import NORMALIZERS
from ..errors import UsageError
from ..models.registry import FAMILIES, family_names
from ..validation import (
    Float,
    Int,
    OneOf,
    dotted_keys,
    explain,
    rule_error,
    suggestion,
    usage_error,
    yaml_problem,
    yaml_where,
)
from .recipe_fields import Betas, Device, FilePath, JsonMapping, Levels, LossWeights, NonBlank, Patterns

DOCS_HINT = "see docs/recipes.md for every recipe key, its type and its allowed range"
"""The hint of a recipe value error."""

SAMPLING_MODES = ("all", "sandwich", "uniform")
"""``sampling.mode`` choices: train every level each step; dense + sparsest + k random middle levels; or dense +
sparsest + k continuous levels drawn uniformly from (0, largest)."""
LR_DECAYS = ("constant", "linear", "cosine", "inverse_sqrt")
"""``lr_schedule.decay`` choices."""
LABEL_SOURCES = ("auto", "transcripts", "teacher")
"""``distillation.labels``: the targets of the label loss: the manifest's transcripts when every utterance has one,
else the teacher's greedy transcripts (``auto``); always the transcripts; always the teacher's."""
KEEP_CHOICES = ("last", "best")
"""``training.keep`` choices."""
DEFAULT_STEPS = 1000
"""``training.steps`` when neither ``steps`` nor ``epochs`` is given."""
DEFAULT_OUTPUT = "dsnn-finetuned.safetensors"
"""``output`` when not given (relative: resolved like any recipe path)."""
PATH_KEYS = ("data.train", "data.dev", "model.init", "distillation.teacher", "output")
"""Dotted keys holding file paths (resolved against the recipe directory, or the CWD for overrides)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# --------------------------------------------------------------------------------------------------- sections


class DataConfig(_Section):
    """``data``: where the training/dev utterances come from and how they are batched."""

    train: FilePath
    dev: FilePath | None = None
    batch_frames: Int = Field(20000, gt=0)
    max_batch_size: Int | None = Field(None, gt=0)
    num_workers: Int = Field(0, ge=0)
    skip_bad: StrictBool = False
    spec_augment: StrictBool = True
    max_dev_utterances: Int | None = Field(None, gt=0)


class ModelConfig(_Section):
    """``model``: the starting point (a bundle/checkpoint, or a fresh model of a family and size)."""

    init: FilePath | None = None
    family: Annotated[str, OneOf(family_names)] = "conformer-ctc"
    size: NonBlank = "s"
    config: JsonMapping = Field(default_factory=dict)
    normalizer: Annotated[str, OneOf(lambda: list(NORMALIZERS))] = "default"
    audio_ctx: Int | None = Field(None, ge=1, le=1500)


class SamplingConfig(_Section):
    """``sampling``: which levels are trained at each step."""

    mode: Annotated[str, OneOf(lambda: SAMPLING_MODES)] = "all"
    random_levels: Int = Field(1, ge=0)
    loss_weights: LossWeights = None


class DistillationConfig(_Section):
    """``distillation``: sparse levels learn from the dense level's output distribution (in place), and every level
    from a frozen ``teacher`` (the original model), which also labels audio without transcripts."""

    enabled: StrictBool = False
    weight: Float = Field(1.0, ge=0)
    temperature: Float = Field(1.0, gt=0)
    teacher: FilePath | None = None
    teacher_weight: Float = Field(1.0, ge=0)
    labels: Annotated[str, OneOf(lambda: LABEL_SOURCES)] = "auto"
    label_weight: Float = Field(1.0, ge=0)


class PruningScheduleConfig(_Section):
    """``schedule``: gradual (cubic) pruning from ``initial_fraction * target`` to each level's target."""

    enabled: StrictBool = False
    initial_fraction: Float = Field(0.0, ge=0, lt=1)
    start_step: Int = Field(0, ge=0)
    end_step: Int = Field(600, gt=0)
    update_every: Int = Field(100, gt=0)


class OptimizerConfig(_Section):
    """``optimizer``: AdamW hyper-parameters."""

    lr: Float = Field(1e-3, gt=0)
    weight_decay: Float = Field(0.01, ge=0)
    betas: Betas = (0.9, 0.98)
    eps: Float = Field(1e-8, gt=0)


class LRScheduleConfig(_Section):
    """``lr_schedule``: linear warm-up, then a decay rule."""

    warmup_steps: Int = Field(0, ge=0)
    decay: Annotated[str, OneOf(lambda: LR_DECAYS)] = "cosine"
    min_lr_ratio: Float = Field(0.0, ge=0, le=1)


class TrainingConfig(_Section):
    """``training``: run length, evaluation, checkpoints, seed and device."""

    steps: Int | None = Field(None, gt=0)
    epochs: Float | None = Field(None, gt=0)
    grad_clip: Float | None = Field(5.0, gt=0)
    eval_every: Int = Field(0, ge=0)
    checkpoint_every: Int = Field(0, ge=0)
    keep: Annotated[str, OneOf(lambda: KEEP_CHOICES)] = "last"
    seed: Int = Field(0, ge=0, le=2**32 - 1)
    device: Device = "auto"
    log_every: Int = Field(10, gt=0)


_SECTION_NAMES = ("data", "model", "sampling", "distillation", "schedule", "optimizer", "lr_schedule", "training")


# ----------------------------------------------------------------------------------------- rules used at run time


def schedule_end_too_late(end_step: int, last_step: str) -> str:
    """The message for a gradual schedule whose end_step is not before the run's last step (``last_step``)."""
    return (f"schedule.end_step ({end_step}) must be before the last training step ({last_step}): "
            "the levels reach their target sparsity only after end_step")


def check_schedule_end(schedule: PruningScheduleConfig, total_steps: int, steps_label: str | None = None) -> None:
    """UsageError if the enabled gradual ``schedule`` does not end before the run's last step.

    ``total_steps`` is the run's step count (``training.steps``, or computed from ``training.epochs`` at run
    time); ``steps_label`` says where it comes from in the message (default: the number itself).
    """
    if schedule.enabled and schedule.end_step >= total_steps:
        example = max(schedule.start_step + 1, total_steps * 2 // 3)
        raise UsageError(schedule_end_too_late(schedule.end_step, steps_label or str(total_steps)),
                         f"set schedule.end_step below {total_steps}, e.g. {example}, or train for more "
                         + ("steps" if steps_label else "epochs"))


def check_loss_weights(weights: Sequence[float] | None, num_levels: int) -> list[float]:
    """The per-level loss weights (dense first; all 1.0 for ``None``) for ``num_levels`` sparse levels.

    UsageError unless there is exactly one weight per level, dense included.
    """
    if weights is None:
        return [1.0] * (num_levels + 1)
    if len(weights) != num_levels + 1:
        raise UsageError(f"sampling.loss_weights has {len(weights)} values but there are {num_levels + 1} levels "
                         "(dense included)", "give one weight per level, dense first")
    return [float(w) for w in weights]


# ------------------------------------------------------------------------------------------------------ recipe


class Recipe(_Section):
    """A complete, validated fine-tuning recipe. ``source`` (the recipe file) is not part of equality."""

    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    levels: Levels = None
    allocation: Annotated[str, OneOf(lambda: ALLOCATIONS)] = "per-layer"
    granularity: Annotated[str, OneOf(lambda: GRANULARITIES)] = "weight"
    include: Patterns = Field(default_factory=list)
    exclude: Patterns = Field(default_factory=list)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    distillation: DistillationConfig = Field(default_factory=DistillationConfig)
    schedule: PruningScheduleConfig = Field(default_factory=PruningScheduleConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    lr_schedule: LRScheduleConfig = Field(default_factory=LRScheduleConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    output: FilePath = Field(Path(DEFAULT_OUTPUT), validate_default=True)
    _source: Path | None = PrivateAttr(None)

    @property
    def source(self) -> Path | None:
        """The recipe file this recipe was loaded from (None for a recipe built from data)."""
        return self._source

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Recipe):
            return NotImplemented
        return all(getattr(self, key) == getattr(other, key) for key in TOP_LEVEL_KEYS)

    __hash__ = None  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as JSON-serialisable data (paths as absolute strings, ``source`` left out).

        ``recipe_from_dict(recipe.to_dict())`` gives an equal recipe.
        """
        return self.model_dump(mode="json")

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, data: Any) -> Any:
        """An empty section (``sampling:`` with every key commented out) means all defaults; ``data`` is needed."""
        if not isinstance(data, Mapping):
            return data
        out = {k: ({} if k in _SECTION_NAMES and v is None else v) for k, v in data.items()}
        out.setdefault("data", {})
        return out

    @model_validator(mode="after")
    def _cross_checks(self, info: ValidationInfo) -> Recipe:
        training, schedule = self.training, self.schedule
        if training.steps is not None and training.epochs is not None:
            raise rule_error(f"training.steps ({training.steps}) and training.epochs ({training.epochs:g}) are both "
                             "set", "set only one of them", ("training.steps", "training.epochs"))
        if training.steps is None and training.epochs is None and info.context is not None:
            training.steps = DEFAULT_STEPS
        if training.keep == "best" and self.data.dev is None:
            raise rule_error("training.keep: best needs a dev set to pick the best checkpoint, but data.dev is not "
                             "set", "set data.dev or use training.keep: last", ("training.keep", "data.dev"))
        if schedule.end_step <= schedule.start_step:
            raise rule_error(f"schedule.end_step must be > schedule.start_step ({schedule.start_step}), got "
                             f"{schedule.end_step}", DOCS_HINT, ("schedule.end_step", "schedule.start_step"))
        no_levels = self.levels == [] or (self.levels is None and self.model.init is None)
        why = "levels is [] (dense only)" if self.levels == [] else "levels is not set and there is no model.init"
        if self.sampling.mode == "uniform" and no_levels:
            raise rule_error(f"sampling.mode: uniform draws levels between dense and the sparsest level, but {why}",
                             "set levels, e.g. [0.5, 0.7, 0.9], or use sampling.mode: all",
                             ("sampling.mode", "levels"))
        for name, enabled in (("schedule", schedule.enabled), ("distillation", self.distillation.enabled)):
            if enabled and no_levels:
                raise rule_error(f"{name}.enabled needs sparse levels, but {why}",
                                 f"set levels, e.g. [0.5, 0.7, 0.9], or {name}.enabled: false",
                                 (f"{name}.enabled", "levels"))
        distill = self.distillation
        if distill.labels == "teacher" and distill.teacher is None:
            raise rule_error("distillation.labels: teacher takes the targets from the teacher's transcripts, but "
                             "distillation.teacher is not set", "set distillation.teacher to the original model "
                             "(or pass --teacher)", ("distillation.labels", "distillation.teacher"))
        if distill.teacher is not None and distill.teacher_weight == 0 and distill.label_weight == 0:
            raise rule_error("distillation.teacher_weight and distillation.label_weight are both 0, so no level "
                             "would learn anything", "give one of them a positive weight",
                             ("distillation.teacher_weight", "distillation.label_weight"))
        if training.steps is not None:
            try:
                check_schedule_end(schedule, training.steps, f"training.steps: {training.steps}")
            except UsageError as exc:
                raise rule_error(exc.message, exc.hint, ("schedule.end_step", "training.steps")) from None
        self._check_model()
        return self

    def _check_model(self) -> None:
        """A fresh model (no ``model.init``) needs a size preset of its family (``model.config`` field names and
        values are checked by the family's config model when the model is built)."""
        model = self.model
        factory = FAMILIES.get(model.family)
        sizes = list(getattr(factory, "sizes", None) or ())
        if model.init is None and sizes and model.size not in sizes:
            raise rule_error(f"model.size must be a preset of {model.family} ({', '.join(sizes)}), got "
                             f"{model.size!r}{suggestion(model.size, sizes)}", DOCS_HINT, ("model.size",))


TOP_LEVEL_KEYS = tuple(Recipe.model_fields)
"""Keys allowed at the top of a recipe file, in documentation order."""


def recipe_keys() -> list[str]:
    """Every dotted key a recipe (or an override) may set, e.g. ``optimizer.lr``."""
    return dotted_keys(Recipe)


# ---------------------------------------------------------------------------------------------------- public API


def _validate(data: Any, source: Path | None, base_dir: Path, overridden: frozenset[str] = frozenset()) -> Recipe:
    label = f"recipe {source}" if source is not None else "recipe"
    try:
        recipe = Recipe.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise usage_error(explain(exc, Recipe, hint=DOCS_HINT), label, overridden) from None
    recipe._source = source
    return recipe


def recipe_from_dict(data: Any, source: Path | None = None, base_dir: Path | None = None) -> Recipe:
    """Validate recipe ``data`` (as parsed from YAML) into a :class:`Recipe`.

    Relative paths are resolved against ``base_dir``, else the directory of ``source``, else the current
    directory. ``source`` names the file in error messages.
    """
    source_path = Path(source) if source is not None else None
    if base_dir is None:
        base_dir = source_path.parent if source_path is not None else Path.cwd()
    return _validate(data, source_path, Path(base_dir).expanduser().absolute().resolve())


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
        raise UsageError(f"cannot read recipe {source}: {exc.strerror or exc}",
                         "check the path and permissions") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UsageError(f"{label}: invalid YAML{yaml_where(exc)}: {yaml_problem(exc)}",
                         "fix the YAML syntax") from None
    if data is None:
        raise UsageError(f"{label}: the file is empty; the top level must be a mapping of keys", DOCS_HINT)
    return recipe_from_dict(data, source=source)


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
        raise UsageError(f"--set {key}: value {raw!r} is not valid YAML: {yaml_problem(exc)}",
                         "quote strings with special characters, e.g. --set 'include=[\"enc.*\"]'") from None
    return key, value


def apply_overrides(recipe: Recipe, overrides: Mapping[str, Any]) -> Recipe:
    """A new recipe with dotted-key ``overrides`` applied (``{"training.steps": 50, "levels": [0.5, 0.9]}``).

    The values are placed into ``recipe.to_dict()`` and the whole recipe is validated again by the same models.
    Relative paths in overrides are relative to the current directory. Setting one of ``training.steps`` /
    ``training.epochs`` clears the other unless both are overridden. A whole section may be given as a mapping
    (merged into the section); keys under ``model.config`` may be set individually (``model.config.d_model``).
    ``recipe`` is not modified. Errors are labelled ``override KEY``.
    """
    raw = recipe.to_dict()
    cwd = Path.cwd()
    given: set[str] = set()
    for key, value in overrides.items():
        if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
            raise UsageError(f"override key {key!r} is not a dotted recipe key", "for example training.steps")
        if key in _SECTION_NAMES and isinstance(value, Mapping) and isinstance(raw.get(key), dict):
            for sub, item in value.items():
                raw[key][sub] = _cwd_path(f"{key}.{sub}", item, cwd)
                given.add(f"{key}.{sub}")
            continue
        *parents, leaf = key.split(".")
        node = raw
        for depth, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                where = ".".join(parents[: depth + 1])
                raise UsageError(f"unknown override key {key!r}{suggestion(key, recipe_keys())}",
                                 f"{where} has no sub-keys")
        node[leaf] = _cwd_path(key, value, cwd)
        given.add(key)
    if "training.steps" in given and "training.epochs" not in given:
        raw["training"]["epochs"] = None
    if "training.epochs" in given and "training.steps" not in given:
        raw["training"]["steps"] = None
    base = recipe.source.parent if recipe.source is not None else cwd
    return _validate(raw, recipe.source, Path(base).expanduser().absolute().resolve(), frozenset(given))


def _cwd_path(key: str, value: Any, cwd: Path) -> Any:
    """Paths given as overrides are relative to the current directory: make them absolute here."""
    if key in PATH_KEYS and isinstance(value, (str, Path)) and str(value).strip():
        path = Path(value).expanduser()
        return str(Path(os.path.normpath(path if path.is_absolute() else cwd / path)))
    return value
