"""Model family registry, adapter construction and self-describing built-in checkpoints.

A *family* is a factory object with two methods (see :class:`FamilyFactory`):

* ``new(vocabulary, size=None, overrides=None, features=None, normalizer="default")`` - a freshly
  initialised adapter (raise :class:`UsageError` on bad arguments);
* ``from_metadata(meta)`` - an adapter rebuilt from its own ``metadata()`` output, weights not loaded
  (raise :class:`DsnnError` on bad metadata);

plus a ``sizes`` mapping (preset names; may be empty). Built-ins ``conformer-ctc`` and ``lstm-ctc`` are
registered here. Other modules add families with :func:`register_family` (for example a Hugging Face
family registered on import of its module); :func:`register_lazy_family` names a module that is imported
the first time an unknown family is looked up, so checkpoints of such a family load without the caller
importing it first.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch

from ..atomic import atomic_path
from ..errors import DsnnError, UsageError
from .base import ModelAdapter
from .builtin import CONFORMER_CTC, LSTM_CTC

MODEL_METADATA_KEY = "model"
"""Safetensors ``__metadata__`` field holding ``json.dumps(adapter.metadata())``."""
CHECKPOINT_FORMAT = "dsnn-checkpoint"
CHECKPOINT_FORMAT_VERSION = "1"
RESERVED_METADATA_KEYS = ("format", "format_version", MODEL_METADATA_KEY)

_FIX_HINT = (
    "the file and its model description disagree (damaged file or edited tensors); "
    "use the checkpoint exactly as dsnn-compress wrote it"
)


class FamilyFactory(Protocol):
    """What a model family registers: constructors for fresh and rebuilt adapters."""

    sizes: Mapping[str, Any]

    def new(
        self,
        vocabulary: list[str],
        size: str | None = None,
        overrides: Mapping[str, Any] | None = None,
        features: Mapping[str, Any] | None = None,
        normalizer: str = "default",
    ) -> ModelAdapter:
        """A freshly initialised adapter."""
        ...

    def from_metadata(self, meta: Mapping[str, Any]) -> ModelAdapter:
        """An adapter rebuilt from ``metadata()`` output (weights not loaded)."""
        ...


FAMILIES: dict[str, FamilyFactory] = {}
"""Registered families by name."""
_LAZY_FAMILIES: dict[str, str] = {}


def register_family(name: str, factory: FamilyFactory) -> None:
    """Register (or replace) the factory of family ``name``."""
    if not name or not isinstance(name, str):
        raise ValueError("family name must be a non-empty string")
    FAMILIES[name] = factory


def register_lazy_family(name: str, module: str) -> None:
    """Declare that importing ``module`` registers family ``name`` (imported on first lookup)."""
    _LAZY_FAMILIES[name] = module


def family_names() -> list[str]:
    """Names of all known families (registered and lazily importable), sorted."""
    return sorted(set(FAMILIES) | set(_LAZY_FAMILIES))


def get_family(name: str, error_cls: type[DsnnError] = UsageError) -> FamilyFactory:
    """The factory of family ``name``; ``error_cls`` (UsageError by default) lists the known ones."""
    if name not in FAMILIES and name in _LAZY_FAMILIES:
        try:
            importlib.import_module(_LAZY_FAMILIES[name])
        except ImportError as exc:
            raise DsnnError(
                f"model family {name!r} is unavailable: {exc}", "install the optional dependencies it needs"
            ) from exc
    if name not in FAMILIES:
        raise error_cls(f"unknown model family {name!r}", f"known families: {', '.join(family_names())}")
    return FAMILIES[name]


register_family(CONFORMER_CTC.name, CONFORMER_CTC)
register_family(LSTM_CTC.name, LSTM_CTC)
# hf-ctc (Hugging Face Wav2Vec2ForCTC & co.): imported on first lookup; it needs the optional transformers
register_lazy_family("hf-ctc", "dsnn_compress.models.hf_ctc")


def new_adapter(
    family: str,
    vocabulary: list[str],
    size: str | None = None,
    overrides: dict[str, Any] | None = None,
    features: dict[str, Any] | None = None,
    normalizer: str = "default",
) -> ModelAdapter:
    """A randomly initialised adapter of ``family`` (seed with ``torch.manual_seed`` beforehand).

    ``vocabulary`` is a tokenizer vocabulary (``<blank>`` first) or just its characters; ``overrides``
    set config fields over the ``size`` preset (strings are converted to the field's type); ``features``
    are :class:`~dsnn_compress.data.features.FeatureConfig` fields. Unknown family, size or config key
    raise :class:`UsageError` listing the valid choices.
    """
    factory = get_family(family, UsageError)
    return factory.new(vocabulary, size=size, overrides=overrides, features=features, normalizer=normalizer)


def load_tensors_strict(adapter: ModelAdapter, tensors: Mapping[str, torch.Tensor]) -> None:
    """Load ``tensors`` into ``adapter.model``; DsnnError on missing/unexpected keys or shape mismatches."""
    expected = adapter.model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = sorted(
        f"{k} {tuple(tensors[k].shape)} vs {tuple(expected[k].shape)}"
        for k in set(expected) & set(tensors)
        if tuple(tensors[k].shape) != tuple(expected[k].shape)
    )
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if items:
            shown = ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise DsnnError(
            f"the {adapter.family} model metadata does not match its tensors ({'; '.join(problems)})",
            _FIX_HINT,
        )
    try:
        adapter.model.load_state_dict(dict(tensors), strict=True)
    except RuntimeError as exc:
        raise DsnnError(f"the model metadata does not match its tensors: {exc}", _FIX_HINT) from exc


def adapter_from_metadata(meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor] | None = None) -> ModelAdapter:
    """Rebuild an adapter from ``metadata()`` output and, if given, load ``tensors`` strictly."""
    if not isinstance(meta, Mapping) or not isinstance(meta.get("family"), str):
        raise DsnnError("model metadata has no 'family' entry", _FIX_HINT)
    factory = get_family(meta["family"], DsnnError)
    adapter = factory.from_metadata(meta)
    if tensors is not None:
        load_tensors_strict(adapter, tensors)
    return adapter


def save_checkpoint(
    adapter: ModelAdapter, path: str | os.PathLike, extra_metadata: dict[str, str] | None = None
) -> None:
    """Write a self-describing dsnn checkpoint (safetensors; model description in ``__metadata__``)."""
    from safetensors.torch import save_file

    metadata = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        MODEL_METADATA_KEY: json.dumps(adapter.metadata(), sort_keys=True),
    }
    for key, value in (extra_metadata or {}).items():
        if key in RESERVED_METADATA_KEYS:
            raise ValueError(f"extra checkpoint metadata may not set the reserved key {key!r}")
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"checkpoint metadata must map str to str (got {key!r}: {type(value).__name__})")
        metadata[key] = value
    tensors = {
        name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in adapter.model.state_dict().items()
    }
    try:
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
    except OSError as exc:
        raise DsnnError(f"cannot write checkpoint {path}: {exc}", "check the output path and free space") from exc


def read_checkpoint_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (empty dict if none); DsnnError if unreadable."""
    from safetensors import safe_open

    file = Path(path)
    if not file.is_file():
        raise DsnnError(f"checkpoint {file} does not exist", "check the path")
    try:
        with safe_open(str(file), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for malformed files
        raise DsnnError(f"{file} is not a readable safetensors file: {exc}", "give a .safetensors checkpoint") from exc


def load_checkpoint_adapter(path: str | os.PathLike) -> ModelAdapter:
    """Rebuild an adapter, weights loaded, from a checkpoint written by :func:`save_checkpoint`."""
    from safetensors.torch import load_file

    file = Path(path)
    metadata = read_checkpoint_metadata(file)
    fmt = metadata.get("format")
    if fmt is not None and fmt != CHECKPOINT_FORMAT:
        raise DsnnError(
            f"{file} is a {fmt!r} file, not a {CHECKPOINT_FORMAT}",
            "give a checkpoint written by dsnn-compress (train/finetune/export-level)",
        )
    version = metadata.get("format_version", CHECKPOINT_FORMAT_VERSION)
    if fmt is not None and version != CHECKPOINT_FORMAT_VERSION:
        raise DsnnError(
            f"{file} is {CHECKPOINT_FORMAT} version {version}; this dsnn-compress reads version "
            f"{CHECKPOINT_FORMAT_VERSION}",
            "upgrade dsnn-compress",
        )
    raw = metadata.get(MODEL_METADATA_KEY)
    if raw is None:
        raise DsnnError(
            f"{file} carries no model description (no {MODEL_METADATA_KEY!r} metadata), so the model "
            "cannot be rebuilt from it",
            "use a checkpoint written by dsnn-compress, which records the family, config and vocabulary",
        )
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise DsnnError(f"{file} has malformed model metadata: {exc}", _FIX_HINT) from exc
    try:
        tensors = load_file(str(file))
    except Exception as exc:  # safetensors raises its own error types for malformed files
        raise DsnnError(f"cannot read the tensors of {file}: {exc}", _FIX_HINT) from exc
    return adapter_from_metadata(meta, tensors)
