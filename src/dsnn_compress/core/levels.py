"""Sparsity levels: parsing, validation, lookup with one tolerance, labels and file tags.

A DSNN model holds the dense level ``0`` plus sparse levels ``s_1 < ... < s_L`` in (0, 1). Level *index* ``k``
(0 = dense) is what keep codes compare against: the mask of level ``k`` is ``code >= k``. Everywhere a level is
read from the user, looked up in a model, printed or put in a file name, it goes through this module, so the
rules (accepted spellings, the matching tolerance, the ``dense`` label) live once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from ..errors import UsageError

LEVEL_TOLERANCE = 1e-6
"""Two level values closer than this are the same level (levels pass through JSON and float formatting)."""


def level_number(level: float | str) -> float:
    """The number a level names (``0.7``, ``70%``, ``dense`` = 0), not yet range-checked."""
    if not isinstance(level, str):
        return float(level)
    text = level.strip().lower()
    if text in ("dense", "0", "0.0"):
        return 0.0
    try:
        return float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        raise UsageError(f"level {level!r} is not a number", "use a fraction such as 0.7") from None


def parse_level(level: float | str) -> float:
    """One level given as ``0.7``, ``70%`` or ``dense`` (= 0), checked to be in [0, 1)."""
    value = level_number(level)
    if not math.isfinite(value) or not 0.0 <= value < 1.0:
        raise UsageError(f"level {value:g} is outside [0, 1)", "use a fraction such as 0.7")
    return value


def same_level(a: float, b: float) -> bool:
    """True when two level values name the same level (within :data:`LEVEL_TOLERANCE`)."""
    return abs(a - b) <= LEVEL_TOLERANCE


def level_label(level: float) -> str:
    """How a level is shown in tables, logs and JSON keys: ``dense`` or ``0.7``."""
    return "dense" if abs(level) <= LEVEL_TOLERANCE else f"{level:g}"


def level_tag(level: float) -> str:
    """The tag of a level in a file name (``model-dense.onnx``, ``model-0.7.onnx``)."""
    return level_label(level)


def validate_levels(levels: Sequence[float]) -> tuple[float, ...]:
    """Check that sparse levels are in (0, 1), strictly increasing and non-empty; return them as a tuple."""
    if not levels:
        raise UsageError("no sparse level given (the dense level 0 is implicit)", "pass e.g. --levels 0.5,0.7,0.9")
    for value in levels:
        if not math.isfinite(value) or not 0.0 < value < 1.0:
            raise UsageError(f"sparsity level {value:g} is outside (0, 1)", "use fractions such as 0.5 for 50 %")
    for a, b in zip(levels, levels[1:]):
        if a == b:
            raise UsageError(f"sparsity level {a:g} is given twice", "list each level once")
        if b < a:
            raise UsageError(
                f"sparsity levels must increase, got {a:g} before {b:g}", "sort them, e.g. --levels 0.5,0.7,0.9"
            )
    return tuple(float(v) for v in levels)


def parse_levels(text: str | Sequence[float]) -> tuple[float, ...]:
    """Sparse levels from ``"0.5,0.7,0.9"`` or a sequence; a leading ``0`` (the implicit dense level) is dropped."""
    if isinstance(text, str):
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts:
            raise UsageError("no sparsity levels given", "pass levels like --levels 0.5,0.7,0.9")
        values: list[float] = []
        for part in parts:
            try:
                values.append(float(part))
            except ValueError:
                raise UsageError(f"sparsity level {part!r} is not a number", "use fractions like 0.5,0.7,0.9") from None
    else:
        values = [float(v) for v in text]
    if values and values[0] == 0.0:
        values = values[1:]
    return validate_levels(values)


@dataclass(frozen=True)
class Levels:
    """The sparse levels of a model (the dense level 0 is implicit) and lookups by value, index or label.

    ``Levels(())`` is a dense-only model. Iterating and ``len`` cover the sparse levels; :attr:`all` adds the
    dense 0 in front, so ``all[k]`` is the value of level index ``k``.
    """

    sparse: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.sparse:
            object.__setattr__(self, "sparse", validate_levels(list(self.sparse)))

    @classmethod
    def parse(cls, text: str | Sequence[float] | Levels) -> Levels:
        """From ``"0.5,0.7,0.9"``, a list or another :class:`Levels` (a leading dense 0 is accepted)."""
        if isinstance(text, Levels):
            return text
        return cls(parse_levels(text))

    def __len__(self) -> int:
        return len(self.sparse)

    def __iter__(self) -> Iterator[float]:
        return iter(self.sparse)

    def __bool__(self) -> bool:
        return bool(self.sparse)

    @property
    def all(self) -> tuple[float, ...]:
        """Every level, dense 0 first."""
        return (0.0, *self.sparse)

    def index(self, level: float | str, where: str = "this model") -> int:
        """Index (0 = dense) of ``level`` (a value or text such as ``70%``); UsageError listing the choices."""
        value = parse_level(level)
        for index, candidate in enumerate(self.all):
            if same_level(candidate, value):
                return index
        raise UsageError(f"level {value:g} is not in {where}", f"choose one of {self.choices()}")

    def value(self, level: float | str, where: str = "this model") -> float:
        """The stored value of ``level`` (``0.70000001`` -> ``0.7``)."""
        return self.all[self.index(level, where)]

    def select(self, spec: str | Sequence[float | str], where: str = "this model") -> list[float]:
        """Levels named by ``all`` or a comma list / sequence, each present, in the given order, duplicates dropped."""
        return self._chosen(spec, self.value, where)

    def resolve(self, level: float | str, where: str = "this model") -> float:
        """Any level in [0, largest trained level] (continuous levels): a trained level's stored value when
        ``level`` names one (within :data:`LEVEL_TOLERANCE`), else the value itself; UsageError naming the range
        otherwise."""
        value = level_number(level)
        top = self.all[-1]
        if not math.isfinite(value) or value < -LEVEL_TOLERANCE or value > top + LEVEL_TOLERANCE:
            shown = f"{value:g}" if math.isfinite(value) else str(level)
            raise UsageError(f"level {shown} is outside [0, {top:g}], the range {where} serves",
                             f"choose a level between 0 and {top:g} (trained: {self.choices()})")
        for candidate in self.all:
            if same_level(candidate, value):
                return candidate
        return value

    def is_trained(self, level: float) -> bool:
        """True when ``level`` is the dense level or one of the trained sparse levels."""
        return any(same_level(candidate, level) for candidate in self.all)

    def select_range(self, spec: str | Sequence[float | str], where: str = "this model") -> list[float]:
        """Like :meth:`select`, but any level in [0, largest] is accepted (see :meth:`resolve`)."""
        return self._chosen(spec, self.resolve, where)

    def _chosen(self, spec: str | Sequence[float | str], pick: Callable[[float | str, str], float],
                where: str) -> list[float]:
        """``all``, or the levels ``pick`` makes of each item of a comma list / sequence, in order, without
        duplicates (UsageError when none is given)."""
        if isinstance(spec, str) and spec.strip().lower() == "all":
            return list(self.all)
        wanted = [part for part in spec.split(",") if part.strip()] if isinstance(spec, str) else list(spec)
        chosen: list[float] = []
        for item in wanted:
            value = pick(item, where)
            if value not in chosen:
                chosen.append(value)
        if not chosen:
            raise UsageError("no level given", "use --levels all or e.g. --levels 0,0.5,0.9")
        return chosen

    def label(self, index: int) -> str:
        """Label of level index ``index`` (``dense`` for 0)."""
        return level_label(self.all[index])

    def labels(self) -> list[str]:
        """Labels of every level, dense first."""
        return [level_label(v) for v in self.all]

    def choices(self) -> str:
        """The available levels as text for error messages: ``0, 0.5, 0.9``."""
        return ", ".join(f"{v:g}" for v in self.all)


class LevelLookups:
    """The level lookups of everything that holds a model's trained ``levels`` (a bundle, a level switch), written
    once. The class using it sets ``levels`` (the sparse levels; the dense 0 is implicit); errors name "this
    bundle"."""

    levels: tuple[float, ...]

    @property
    def all_levels(self) -> tuple[float, ...]:
        """Every trained level, dense 0 first."""
        return (0.0, *self.levels)

    def level_index(self, level: float | str) -> int:
        """Index (0 = dense) of the trained level ``level``, given as a fraction (``0.7``), a percentage (``70%``)
        or ``dense``; UsageError for any other value."""
        return Levels(self.levels).index(level, "this bundle")

    def resolve_level(self, level: float | str) -> float:
        """Any level in [0, largest] (a trained level's stored value when it names one); UsageError otherwise."""
        return Levels(self.levels).resolve(level, "this bundle")

    def is_trained(self, level: float | str) -> bool:
        """True when ``level`` is the dense level or a trained level (not one between them)."""
        return Levels(self.levels).is_trained(self.resolve_level(level))
