"""Model family registry: families, how adapters are built, and how families recognise model directories.

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

Optional family capabilities, read with ``getattr``: ``export_formats`` (the model formats beyond plain state dicts
that ``dsnn export`` can write for the family: ``checkpoint``, ``onnx``, ``hf``, ``ct2``) and, for each directory
format ``F`` among them, ``save_F(adapter, output, level)`` that writes it. A family whose models live in
directories registers a *describer* (:func:`register_directory_describer`) so that
:func:`~dsnn_compress.sources.opener.open_source` recognises them.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, Protocol

import torch

from ..errors import DsnnError, UsageError
from .base import ModelAdapter
from .builtin import CONFORMER_CTC, LSTM_CTC

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
# whisper (Hugging Face WhisperForConditionalGeneration, faster-whisper directories): the same, lazily
register_lazy_family("whisper", "dsnn_compress.models.whisper")


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


_DESCRIBERS: dict[str, tuple[str, str]] = {}


def register_directory_describer(family: str, module: str, function: str) -> None:
    """Declare that ``module.function(text_files, tensor_names)`` recognises a model directory of ``family``.

    The function gets a directory's small text files (``{"config.json": text, ...}``) and its tensor names and
    returns the family's model description, or None when the directory is not one of its models. The module is
    imported on first use, so a describer costs nothing until a directory is opened (and must not import heavy
    optional dependencies at module level).
    """
    _DESCRIBERS[family] = (module, function)


def describe_directory(text_files: Mapping[str, str], tensor_names: list[str]) -> dict[str, Any] | None:
    """The model description of a model directory from the first family that recognises it, else None."""
    for module, function in _DESCRIBERS.values():
        describer = getattr(importlib.import_module(module), function)
        meta = describer(text_files, tensor_names)
        if meta is not None:
            return meta
    return None


# hf-ctc (Hugging Face Wav2Vec2ForCTC & co.): its directory describer needs no transformers
register_directory_describer("hf-ctc", "dsnn_compress.models.hf_ctc", "hf_metadata_from_files")
register_directory_describer("whisper", "dsnn_compress.models.whisper.metadata", "whisper_metadata_from_files")
