"""The one formatter from a :class:`pydantic.ValidationError` to a one-line :class:`~dsnn_compress.errors.UsageError`.

:func:`explain` turns the first error of a validation into a :class:`Problem`: the message names the dotted key
(``optimizer.lr``, ``optimizer.betas[1]``, ``model.config.d_model``), what was given and what is allowed (the
text comes from :func:`~.fields.describe`, i.e. from the field's own type and constraints), and unknown keys get
a did-you-mean suggestion. :func:`usage_error` adds the label: a recipe file, ``override KEY`` when one of the
problem's keys was given with ``--set``, or ``invalid model config for family F``. It works on any pydantic model
or pydantic dataclass built from :mod:`.fields` types (recipes, the built-in model-family configs). The YAML error
helpers used while reading a YAML file live here too.
"""

from __future__ import annotations

import typing
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import ValidationError

from ..errors import DsnnError, UsageError
from .fields import describe, show, suggestion, unwrap


@dataclass(frozen=True)
class Problem:
    """One validation problem: the message (without a label), a remedy, and the dotted keys it concerns."""

    message: str
    hint: str | None
    keys: tuple[str, ...]


@dataclass
class _Where:
    key: str
    annotation: Any
    metadata: list[Any]
    known: list[str] | None = None  # set for an unknown key: the keys allowed beside it
    parent: str = ""


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _fields(kind: Any) -> dict[str, Any] | None:
    return getattr(kind, "__pydantic_fields__", None) if isinstance(kind, type) else None


def dotted_keys(root: type) -> list[str]:
    """Every key of a model as dotted names: sub-model fields one level down (``optimizer.lr``), others as is."""
    keys: list[str] = []
    for name, info in (_fields(root) or {}).items():
        sub = _fields(unwrap(info.annotation)[0])
        keys.extend([f"{name}.{k}" for k in sub] if sub is not None else [name])
    return keys


def _locate(root: type, loc: Sequence[Any], prefix: str) -> _Where:
    """The dotted key and field annotation that a pydantic error location points at."""
    annotation: Any = root
    metadata: list[Any] = []
    key = prefix
    for item in loc:
        kind = unwrap(annotation)[0]
        fields = _fields(kind)
        origin, args = typing.get_origin(kind), typing.get_args(kind)
        if fields is not None and isinstance(item, str):
            if item not in fields:
                return _Where(_join(key, item), None, [], list(fields), key)
            annotation, metadata, key = fields[item].annotation, list(fields[item].metadata), _join(key, item)
        elif isinstance(item, int) and origin in (list, tuple) and args:
            fixed = origin is tuple and args[-1] is not Ellipsis and item < len(args)
            annotation, metadata, key = args[item] if fixed else args[0], [], f"{key}[{item}]"
        elif origin is dict and args:
            annotation, metadata, key = args[1], [], _join(key, str(item))
        # anything else is a pydantic-internal step (a union member, a validator function): stays on this field
    return _Where(key, annotation, metadata)


def explain_error(
    error: Any, root: type, prefix: str = "", hidden: Collection[str] = (), hint: str | None = None
) -> Problem:
    """One pydantic error (an item of ``ValidationError.errors()``) of a ``root`` model as a :class:`Problem`.

    ``prefix`` is the dotted key of ``root`` inside a larger document (``model.config``); ``hidden`` are keys not
    to offer in suggestions; ``hint`` is the remedy of plain value errors.
    """
    kind, ctx, given = error["type"], error.get("ctx") or {}, error.get("input")
    where = _locate(root, error["loc"], prefix)
    if kind == "dsnn_rule":
        keys = tuple(_join(where.key, k) for k in ctx.get("keys", ())) or (where.key,)
        return Problem(str(ctx["message"]), ctx.get("hint"), keys)
    if kind == "value_error" and not where.key:  # a plain ValueError of a rule between keys: its text says it all
        return Problem(str(error["msg"]).removeprefix("Value error, "), hint, ())
    if where.known is not None:
        return _unknown_key(root, where, hidden)
    if kind in ("missing", "missing_argument"):
        parent, _, leaf = where.key.rpartition(".")
        where_to = f"`{parent}:` with `{leaf}:`" if parent else f"`{leaf}:`"
        return Problem(f"missing required key {where.key}", f"add {where_to}", (where.key,))
    if not where.key:
        names = ", ".join(f"{k}:" for k in list(_fields(root) or {})[:2])
        return Problem(f"the top level must be a mapping of keys ({names} ...), got {show(given)}", hint, ())
    allowed = ctx.get("wanted") or describe(where.annotation, where.metadata)
    suffix = ctx.get("suffix") or (" (not a whole number)" if kind == "int_from_float" else "")
    shown = ctx.get("shown") or show(given)
    return Problem(f"{where.key}{ctx.get('at') or ''} must be {allowed}, got {shown}{suffix}", hint, (where.key,))


def _unknown_key(root: type, where: _Where, hidden: Collection[str]) -> Problem:
    parent, leaf = where.parent, where.key.rpartition(".")[2]
    known = [k for k in where.known or () if k not in hidden]
    hint = f"keys allowed in {parent}: {', '.join(known)}" if parent else f"allowed keys: {', '.join(known)}"
    found = suggestion(leaf, known, f"{parent}." if parent else "")
    if not found and not parent:  # a section key written at the top level (`lr: ...`), or a misspelt dotted key
        everything = [k for k in dotted_keys(root) if k not in hidden]
        leaves = {k.rsplit(".", 1)[-1]: k for k in everything if "." in k}
        found = f" (did you mean {leaves[leaf]!r}?)" if leaf in leaves else suggestion(leaf, everything)
    return Problem(f"unknown key {where.key!r}{found}", hint, (where.key,))


def explain(
    exc: ValidationError, root: type, prefix: str = "", hidden: Collection[str] = (), hint: str | None = None
) -> Problem:
    """The first error of ``exc`` (see :func:`explain_error`)."""
    return explain_error(exc.errors(include_url=False)[0], root, prefix, hidden, hint)


def label_for(keys: Sequence[str], label: str, overridden: Collection[str] = ()) -> str:
    """``override KEY`` if one of ``keys`` was overridden (or lies under / above an overridden key), else ``label``."""
    for path in keys:
        for key in sorted(overridden):
            if path == key or path.startswith((key + ".", key + "[")) or key.startswith(path + "."):
                return f"override {key}"
    return label


def usage_error(problem: Problem, label: str, overridden: Collection[str] = (),
                error_cls: type[DsnnError] = UsageError) -> DsnnError:
    """The exception the CLI prints as ``error: LABEL: MESSAGE; HINT`` (exit code 2 for a UsageError)."""
    return error_cls(f"{label_for(problem.keys, label, overridden)}: {problem.message}", problem.hint)


def yaml_where(exc: yaml.YAMLError) -> str:
    """`` at line L, column C`` of a YAML error, when known."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    return "" if mark is None else f" at line {mark.line + 1}, column {mark.column + 1}"


def yaml_problem(exc: yaml.YAMLError) -> str:
    """What the YAML parser complained about, in one line."""
    problem, context = getattr(exc, "problem", None), getattr(exc, "context", None)
    if problem:
        return f"{context}: {problem}" if context else str(problem)
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
