"""The value types of recipe fields: paths, devices, levels, loss weights, betas, model-config mappings.

They carry the single-field rules of recipes and are built from the generic field types of
:mod:`dsnn_compress.validation` (:data:`~dsnn_compress.validation.Int`, :data:`~dsnn_compress.validation.Float`,
:class:`~dsnn_compress.validation.Allowed`, ...), whose coercion rules and error kinds (``bad_value``,
``rule_error``) they share; the one formatter of :mod:`dsnn_compress.validation.errors` describes them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, ValidationInfo

from ..core.levels import validate_levels
from ..errors import UsageError
from ..validation import Allowed, Float, bad_value, non_blank, rule_error

_DEVICES = ("auto", "cpu", "cuda")


def _path_text(value: Any) -> Any:
    if isinstance(value, str) and not value.strip():
        raise bad_value()
    return value


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    """Relative paths are taken against the ``base_dir`` of the validation context (the recipe's directory)."""
    base = (info.context or {}).get("base_dir")
    if base is None:
        return value
    path = value.expanduser()
    return Path(os.path.normpath(path if path.is_absolute() else Path(base) / path))


def _as_list(value: Any) -> Any:
    return [] if value is None else [value] if isinstance(value, str) else value


def _device(value: str) -> str:
    name, _, index = value.partition(":")
    if name not in _DEVICES or (":" in value and (name != "cuda" or not index.isdigit())):
        raise bad_value()
    return value


def _levels(value: list[float] | None) -> list[float] | None:
    if value and value[0] == 0.0:
        value = value[1:]  # the dense level 0 is implicit; accept it written out, as --levels does
    if not value:
        return value
    try:
        return list(validate_levels(value))
    except UsageError as exc:
        raise rule_error(f"levels: {exc.message}", exc.hint) from None


def _weights(value: list[float] | None) -> list[float] | None:
    if value is not None and not value:
        raise bad_value(wanted="a non-empty list (one weight per level, dense first), or null for all 1.0")
    if value is not None and not any(w > 0 for w in value):
        raise bad_value(wanted="a list with at least one weight > 0")
    return value


def _two(value: Any) -> Any:
    if isinstance(value, (list, tuple)) and len(value) != 2:
        raise bad_value(f" ({len(value)} numbers)")
    return value


def _json_like(value: Mapping[Any, Any], at: str = "") -> Any:
    """JSON-like data only (strings, finite numbers, booleans, null, lists, mappings)."""
    for key, item in value.items():
        where = f"{at}[{key}]" if isinstance(key, int) else f"{at}.{key}"
        if isinstance(item, float) and not math.isfinite(item):
            raise bad_value(at=where, shown=str(item), wanted="a finite number")
        if isinstance(item, Mapping):
            _json_like(item, where)
        elif isinstance(item, list):
            _json_like(dict(enumerate(item)), where)
        elif not isinstance(item, (str, int, float, bool, type(None))):
            raise bad_value(at=where, shown=f"a {type(item).__name__}", wanted="a string, number, boolean or list")
    return value


FilePath = Annotated[Path, BeforeValidator(_path_text), AfterValidator(_resolve_path)]
"""A path; relative ones are resolved against the validation context's ``base_dir`` (when there is one)."""
NonBlank = Annotated[str, AfterValidator(non_blank), Allowed("a non-empty string")]
Pattern = Annotated[str, AfterValidator(non_blank), Allowed("a non-empty glob pattern")]
Patterns = Annotated[list[Pattern], BeforeValidator(_as_list), Allowed("a list of glob patterns")]
"""Glob patterns; a single string is a one-item list, null an empty one."""
Levels = Annotated[list[Float] | None, AfterValidator(_levels),
                   Allowed("a list of sparsity fractions such as [0.5, 0.7, 0.9], [] or null")]
"""Sparse levels checked by :func:`dsnn_compress.core.levels.validate_levels` (a leading 0 is dropped)."""
LossWeights = Annotated[list[Annotated[Float, Field(ge=0)]] | None, AfterValidator(_weights),
                        Allowed("a list of non-negative weights (dense level first) or null")]
Betas = Annotated[tuple[Annotated[Float, Field(ge=0, lt=1)], Annotated[Float, Field(ge=0, lt=1)]],
                  BeforeValidator(_two), Allowed("a list of two numbers in [0, 1)")]
JsonMapping = Annotated[dict[str, Any], BeforeValidator(lambda v: {} if v is None else v), AfterValidator(_json_like),
                        Allowed("a mapping of model config fields")]
Device = Annotated[str, AfterValidator(_device), Allowed("auto, cpu, cuda or cuda:N")]
