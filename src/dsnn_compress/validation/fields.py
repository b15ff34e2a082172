"""Field types shared by every pydantic model that reads user input, and the text describing what each allows.

Recipes (``training.recipe``) and the built-in model-family configs (``models.conformer``, ``models.lstm``) are
built from the types below, so one set of coercion rules applies to every key:

* :data:`Int` accepts integers, integral floats (``1e3``) and numeric strings (``"2e4"``, ``"48"``);
* :data:`Float` accepts numbers and numeric strings (``"1e-3"``, which YAML 1.1 reads as a string), finite only;
* booleans are :class:`pydantic.StrictBool`: real YAML ``true``/``false`` only (a bool is never a number);
* :class:`OneOf` restricts a string to a (possibly dynamic) list of choices, with a did-you-mean hint;
* :class:`Allowed` is a marker holding the user-facing description of a compound field.

Validators raise two custom error kinds that :mod:`.errors` turns into messages: :func:`bad_value` (the field's
allowed values are described from its type and constraints) and :func:`rule_error` (a complete message, for
rules that involve several keys). :func:`describe` renders "what is allowed" from a field's annotation and
constraints, so an error message never repeats a range by hand.
"""

from __future__ import annotations

import difflib
import math
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import annotated_types
from pydantic import BeforeValidator, Field
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError, core_schema

_NUMBER_RE = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?")


def bad_value(
    suffix: str = "", *, at: str = "", shown: str | None = None, wanted: str | None = None
) -> PydanticCustomError:
    """An error for one value: the message is "KEY must be <allowed>, got <value><suffix>".

    ``at`` extends the key (``"[2]"``, ``".d_model"``), ``shown`` replaces the rendering of the bad value and
    ``wanted`` the description of the allowed values (by default derived from the field's type).
    """
    ctx = {"suffix": suffix, "at": at, "shown": shown, "wanted": wanted}
    return PydanticCustomError("dsnn_value", "invalid value{suffix}", ctx)


def rule_error(message: str, hint: str | None = None, keys: Sequence[str] = ()) -> PydanticCustomError:
    """An error with a complete ``message`` (and ``hint``) about ``keys`` (dotted, relative to where it is raised)."""
    return PydanticCustomError("dsnn_rule", "{message}", {"message": message, "hint": hint, "keys": tuple(keys)})


def suggestion(word: str, candidates: Sequence[str], prefix: str = "") -> str:
    """`` (did you mean 'X'?)`` for the closest candidate (``difflib``), or an empty string."""
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {prefix + match[0]!r}?)" if match else ""


def _numberish(value: Any) -> Any:
    """Numeric strings become numbers; booleans are refused (YAML ``true`` is not 1)."""
    if isinstance(value, bool):
        raise bad_value()
    if isinstance(value, str) and _NUMBER_RE.fullmatch(value.strip()):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            return float(text)
    return value


Int = Annotated[int, BeforeValidator(_numberish)]
"""An integer; integral floats and numeric strings are accepted, booleans are not."""
Float = Annotated[float, BeforeValidator(_numberish), Field(allow_inf_nan=False)]
"""A finite number; integers and numeric strings are accepted, booleans are not."""


def non_blank(value: str) -> str:
    """After-validator: refuse empty or all-whitespace strings."""
    if not value.strip():
        raise bad_value()
    return value


@dataclass(frozen=True)
class Allowed:
    """Annotation marker: the description of the values a field allows (used instead of the derived one)."""

    text: str


@dataclass(frozen=True)
class OneOf:
    """Annotation marker and validator: the string must be one of ``choices()`` (evaluated at validation time)."""

    choices: Callable[[], Sequence[str]]

    def describe(self) -> str:
        """``one of a, b, c``."""
        return f"one of {', '.join(self.choices())}"

    def check(self, value: str) -> str:
        """Return ``value`` if it is a choice, else raise a did-you-mean error."""
        known = list(self.choices())
        if value not in known:
            raise bad_value(suggestion(value, known))
        return value

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(self.check, handler(source))


# ------------------------------------------------------------------------------------------------- descriptions


def unwrap(annotation: Any) -> tuple[Any, list[Any], bool]:
    """``annotation`` without ``Annotated``/``Optional``: (type, metadata, nullable)."""
    metadata: list[Any] = []
    nullable = False
    while True:
        if typing.get_origin(annotation) is Annotated:
            inner, *extra = typing.get_args(annotation)
            annotation, metadata = inner, [*extra, *metadata]
        elif typing.get_origin(annotation) in (typing.Union, types.UnionType):
            rest = [a for a in typing.get_args(annotation) if a is not type(None)]
            nullable = nullable or len(rest) < len(typing.get_args(annotation))
            annotation = rest[0] if len(rest) == 1 else Any
        else:
            return annotation, metadata, nullable


def _flatten(metadata: Sequence[Any]) -> list[Any]:
    out: list[Any] = []
    for item in metadata:
        out.extend(_flatten(item.metadata) if isinstance(item, FieldInfo) else [item])
    return out


def _range_text(metadata: Sequence[Any], integer: bool) -> str:
    low = high = None
    low_open = high_open = False
    for item in metadata:
        if isinstance(item, annotated_types.Gt):
            low, low_open = item.gt, True
        elif isinstance(item, annotated_types.Ge):
            low, low_open = item.ge, False
        elif isinstance(item, annotated_types.Lt):
            high, high_open = item.lt, True
        elif isinstance(item, annotated_types.Le):
            high, high_open = item.le, False
    noun = "integer" if integer else "number"
    kind = f"an {noun}" if integer else f"a {noun}"
    if high is None:
        if low is None:
            return kind
        if low == 0:
            return f"a positive {noun}" if low_open else f"a non-negative {noun}"
        if integer and low == 1 and not low_open:
            return "a positive integer"
        return f"{kind} {'>' if low_open else '>='} {_num(low)}"
    if low is None:
        return f"{kind} {'<' if high_open else '<='} {_num(high)}"
    return f"{kind} in {'(' if low_open else '['}{_num(low)}, {_num(high)}{')' if high_open else ']'}"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def describe(annotation: Any, metadata: Sequence[Any] = ()) -> str:
    """What a field of this type allows, in words: ``a positive integer or null``, ``one of all, sandwich``."""
    for item in _flatten(metadata):
        if isinstance(item, Allowed):
            return item.text
    kind, inner, nullable = unwrap(annotation)
    meta = _flatten([*inner, *metadata])
    text = next((m.text for m in meta if isinstance(m, Allowed)), None)
    text = text or next((m.describe() for m in meta if isinstance(m, OneOf)), None)
    if text is None:
        origin = typing.get_origin(kind)
        if kind is bool:
            text = "true or false"
        elif kind in (int, float):
            text = _range_text(meta, integer=kind is int)
        elif kind is Path:
            text = "a file path"
        elif kind is str:
            text = "a string"
        elif hasattr(kind, "__pydantic_fields__") or origin in (dict, Mapping):
            text = "a mapping of keys"
        elif origin in (list, tuple):
            text = "a list"
        else:
            text = "a valid value"
    return f"{text} or null" if nullable else text


def show(value: Any) -> str:
    """A short YAML-like rendering of a given value for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value) if len(value) <= 60 else repr(value[:57] + "...")
    if isinstance(value, float):
        return f"{value:g}" if math.isfinite(value) else str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, Path):
        return repr(str(value))
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        if all(v is None or isinstance(v, (bool, int, float, str)) for v in value):
            text = f"[{', '.join(show(v) for v in value)}]"
            if len(text) <= 60:
                return text
        return "a list"
    return f"a {type(value).__name__}"

