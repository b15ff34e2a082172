"""Validation vocabulary shared by recipes and model-family configs (a utility: it imports only ``errors``).

:mod:`.fields` holds the pydantic field types (:data:`Int`, :data:`Float`, :class:`OneOf`, :class:`Allowed`) and
the custom errors validators raise (:func:`bad_value`, :func:`rule_error`); :mod:`.errors` is the ONE formatter
that turns a :class:`pydantic.ValidationError` into a one-line ``error:`` message naming the file (or label), the
dotted key, the given value and what is allowed, with a did-you-mean suggestion for unknown keys and choices.
"""

from __future__ import annotations

from .errors import Problem, dotted_keys, explain, explain_error, label_for, usage_error, yaml_problem, yaml_where
from .fields import Allowed, Float, Int, OneOf, bad_value, describe, non_blank, rule_error, show, suggestion, unwrap

__all__ = [
    "Allowed",
    "Float",
    "Int",
    "OneOf",
    "Problem",
    "bad_value",
    "describe",
    "dotted_keys",
    "explain",
    "explain_error",
    "label_for",
    "non_blank",
    "rule_error",
    "show",
    "suggestion",
    "unwrap",
    "usage_error",
    "yaml_problem",
    "yaml_where",
]
