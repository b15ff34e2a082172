"""What the families built on Hugging Face model directories (``hf-ctc``, ``whisper``) share: a directory's
``config.json``, and the text files and normaliser their model descriptions carry."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ..data.text import get_normalizer
from ..errors import DsnnError, UsageError

BAD_META_HINT = "the model metadata is damaged or was written by an incompatible dsnn-compress version"


def parse_config(files: Mapping[str, str]) -> dict[str, Any] | None:
    """A directory's ``config.json`` (from its text ``files``) as a JSON object; None when it is absent, not JSON or
    not an object (the directory is then not a model of these families)."""
    if "config.json" not in files:
        return None
    try:
        config = json.loads(files["config.json"])
    except (json.JSONDecodeError, TypeError):
        return None
    return config if isinstance(config, dict) else None


def described_files(meta: Mapping[str, Any], family: str) -> tuple[dict[str, str], str]:
    """The ``hf_files`` texts and the ``normalizer`` of a ``family`` model description, checked (DsnnError with
    :data:`BAD_META_HINT` when either is missing or malformed)."""
    files = meta.get("hf_files")
    if not isinstance(files, dict) or not all(isinstance(text, str) for text in files.values()):
        raise DsnnError(f"{family} model metadata lacks the 'hf_files' texts", BAD_META_HINT)
    normalizer = meta.get("normalizer", "default")
    if not isinstance(normalizer, str):
        raise DsnnError(f"{family} model metadata has a non-string 'normalizer'", BAD_META_HINT)
    try:
        get_normalizer(normalizer)
    except UsageError as exc:
        raise DsnnError(f"{family} model metadata is invalid: {exc.message}", BAD_META_HINT) from exc
    return files, normalizer


def cannot_create(family: str, start_from: str) -> UsageError:
    """The error of ``new()`` for a family whose models start from a directory (``start_from`` says which)."""
    return UsageError(f"the {family} family cannot create a model from scratch", f"set model.init to {start_from}")
