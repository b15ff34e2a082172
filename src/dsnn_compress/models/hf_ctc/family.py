"""Building ``hf-ctc`` adapters and the family factory registered under ``hf-ctc``.

:func:`build_adapter` turns an architecture name and a directory's text files into an :class:`HFCTCAdapter` with a
freshly built, randomly initialised model (no file or network access): the feature extractor and the
``Wav2Vec2CTCTokenizer`` are rebuilt from the kept texts, the model from ``config.json``, the weight-norm tensor
names are mapped to the source's spelling, and the feature encoder is frozen. :func:`adapter_from_source` adds the
weights of a loaded directory; :class:`HFCTCFamily` (``HF_CTC``) rebuilds adapters from bundle metadata, refuses
to create a model from scratch and declares its export formats (``checkpoint``, ``hf`` through
:func:`~.export.save_hf_directory`). Importing this module registers the family; ``transformers`` is imported only when
an adapter is built.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...core.groups import GroupSpec
from ...data.text import get_normalizer
from ...errors import DsnnError
from ..hf_files import cannot_create, described_files
from ..registry import adapter_from_metadata, register_family
from .adapter import HFCTCAdapter, rename_hooks
from .export import save_hf_directory
from .ffn import check_ffn_dims, layer_widths
from .metadata import (
    BAD_META_HINT,
    FAMILY,
    SUPPORTED_ARCHITECTURES,
    TOKENIZER_FILES,
    WEIGHT_NORM_NAMES,
    feature_extractor_config,
    hf_metadata_from_files,
    import_transformers,
    parse_json,
    supported_list,
    weight_norm_style,
    write_files,
)
from .structure import (
    apply_ffn_dims,
    compact_metadata,
    current_widths,
    ffn_groups,
    refusal,
    refuse_hf_export,
    set_names,
    set_widths,
)


def _build_tokenizer(transformers: Any, hf_files: Mapping[str, str]) -> Any:
    """The ``Wav2Vec2CTCTokenizer`` of the kept tokenizer files (written to a temporary directory and loaded)."""
    config = parse_json(hf_files, "tokenizer_config.json") if "tokenizer_config.json" in hf_files else {}
    kind = config.get("tokenizer_class") if isinstance(config, dict) else None
    if kind not in (None, "Wav2Vec2CTCTokenizer"):
        raise DsnnError(f"tokenizer {kind} is not supported by the hf-ctc family",
                        "models with a character-level Wav2Vec2CTCTokenizer are supported")
    with tempfile.TemporaryDirectory(prefix="dsnn-hf-tokenizer-") as tmp:
        write_files(Path(tmp), hf_files, TOKENIZER_FILES)
        try:
            return transformers.Wav2Vec2CTCTokenizer.from_pretrained(tmp, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - transformers raises many kinds of errors for bad files
            raise DsnnError(f"cannot rebuild the model's tokenizer from vocab.json ({' '.join(str(exc).split())})",
                            BAD_META_HINT) from exc


def _build_model(transformers: Any, architecture: str, config_data: Mapping[str, Any]) -> nn.Module:
    """A randomly initialised ``architecture`` model of ``config.json``'s settings."""
    _, config_name = SUPPORTED_ARCHITECTURES[architecture]
    config_cls = getattr(transformers, config_name)
    model_cls = getattr(transformers, architecture)
    try:
        config = config_cls.from_dict(dict(config_data))
        model = model_cls(config)
    except Exception as exc:  # noqa: BLE001 - a config transformers cannot build
        raise DsnnError(f"cannot build {architecture} from its config.json ({' '.join(str(exc).split())[:300]})",
                        BAD_META_HINT) from exc
    return model


def build_adapter(
    architecture: str, hf_files: Mapping[str, str], normalizer: str = "default", weight_norm: str | None = None
) -> HFCTCAdapter:
    """An adapter with a freshly built (randomly initialised) model; no file or network access."""
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise DsnnError(f"Hugging Face architecture {architecture!r} is not supported by the hf-ctc family",
                        f"supported architectures: {supported_list()}")
    if "config.json" not in hf_files or "vocab.json" not in hf_files:
        raise DsnnError("the Hugging Face model description lacks config.json or vocab.json", BAD_META_HINT)
    get_normalizer(normalizer)
    transformers = import_transformers()
    config_data = parse_json(hf_files, "config.json")
    if not isinstance(config_data, dict):
        raise DsnnError("config.json of the Hugging Face model is not a JSON object", BAD_META_HINT)
    feature_config = feature_extractor_config(hf_files)
    try:
        feature_extractor = transformers.Wav2Vec2FeatureExtractor.from_dict(dict(feature_config))
    except Exception as exc:  # noqa: BLE001
        raise DsnnError(f"cannot rebuild the model's feature extractor ({exc})", BAD_META_HINT) from exc
    tokenizer = _build_tokenizer(transformers, hf_files)
    model = _build_model(transformers, architecture, config_data)
    native = weight_norm_style(model.state_dict())
    if weight_norm not in (None, *WEIGHT_NORM_NAMES):
        raise DsnnError(f"unknown weight_norm naming {weight_norm!r} in the model metadata", BAD_META_HINT)
    if weight_norm is not None and native is not None and weight_norm != native:
        mapping = {}
        for key in model.state_dict():
            for native_suffix, source_suffix in zip(WEIGHT_NORM_NAMES[native], WEIGHT_NORM_NAMES[weight_norm]):
                if key.endswith(native_suffix):
                    mapping[key] = key[: -len(native_suffix)] + source_suffix
        rename_hooks(model, mapping)
    model.freeze_feature_encoder()
    model.eval()
    return HFCTCAdapter(model=model, architecture=architecture, hf_files=dict(hf_files),
                        feature_extractor=feature_extractor, tokenizer=tokenizer, normalizer=normalizer,
                        weight_norm=weight_norm)


def adapter_from_source(source: Any, normalizer: str = "default") -> HFCTCAdapter:
    """The adapter of a loaded Hugging Face directory (:class:`~dsnn_compress.checkpoint.SourceCheckpoint`),
    weights loaded strictly; DsnnError naming the supported architectures when it is not one of them."""
    meta = hf_metadata_from_files(source.hf_files, list(source.tensors), normalizer)
    if meta is None:
        found = "unknown"
        with contextlib.suppress(Exception):
            config = json.loads(source.hf_files["config.json"])
            found = ", ".join(config.get("architectures") or [str(config.get("model_type"))])
        raise DsnnError(f"{source.path} holds a {found} model, which the hf-ctc family does not support",
                        f"supported architectures: {supported_list()}")
    return adapter_from_metadata(meta, source.tensors)  # type: ignore[return-value]


class HFCTCFamily:
    """Family factory of ``hf-ctc``: adapters are rebuilt from metadata (fresh models need a directory)."""

    name = FAMILY
    sizes: Mapping[str, Any] = {}
    export_formats: tuple[str, ...] = ("checkpoint", "hf")
    """Model formats ``dsnn export`` can write for this family besides plain state dicts (no ONNX: export ``hf``
    and convert that directory with Hugging Face Optimum)."""

    def new(self, vocabulary: list[str], size: str | None = None, overrides: Mapping[str, Any] | None = None,
            features: Mapping[str, Any] | None = None, normalizer: str = "default") -> HFCTCAdapter:
        """Not supported: an hf-ctc model starts from a Hugging Face ``save_pretrained`` directory."""
        raise cannot_create(FAMILY, "a Hugging Face save_pretrained directory (or a bundle pruned from one)")

    def from_metadata(self, meta: Mapping[str, Any]) -> HFCTCAdapter:
        """Rebuild an adapter (random weights) from :meth:`HFCTCAdapter.metadata` output."""
        architecture = meta.get("architecture")
        if not isinstance(architecture, str):
            raise DsnnError("hf-ctc model metadata lacks 'architecture'", BAD_META_HINT)
        hf_files, normalizer = described_files(meta, FAMILY)
        adapter = build_adapter(architecture, hf_files, normalizer, meta.get("weight_norm"))
        if "sample_rate" in meta and meta["sample_rate"] != adapter.sample_rate:
            raise DsnnError(f"hf-ctc model metadata sample_rate {meta['sample_rate']} differs from its feature "
                            f"extractor's {adapter.sample_rate}", BAD_META_HINT)
        if meta.get("ffn_dims") is not None:
            dims = check_ffn_dims(meta["ffn_dims"], len(set_names(adapter.model)), "hf-ctc model metadata ffn_dims",
                                  BAD_META_HINT)
            apply_ffn_dims(adapter.model, dims)
            adapter.ffn_dims = dims
        return adapter

    # structured levels (docs/structured.md): FFN neurons of every encoder layer

    def structured_groups(self, adapter: HFCTCAdapter) -> list[GroupSpec]:
        """One ``ffn-neuron`` group set per encoder layer (no attention heads: see :mod:`.structure`)."""
        return ffn_groups(adapter.model)

    def compact(self, adapter: HFCTCAdapter, kept: Mapping[str, int]) -> HFCTCAdapter:
        """A fresh adapter whose encoder layers have ``kept[name]`` FFN neurons (weights to be loaded)."""
        widths = layer_widths(set_names(adapter.model), current_widths(adapter.model), kept)
        return self.from_metadata(compact_metadata(adapter.metadata(), widths))

    def set_widths(self, adapter: HFCTCAdapter, kept: Mapping[str, int] | None) -> bool:
        """Run each FFN's first ``kept[name]`` neurons on views of its weights (None: full width)."""
        set_widths(adapter.model, kept)
        return True

    def compact_refusal(self, kept: Mapping[str, int], fmt: str) -> str | None:
        """Why ``fmt`` cannot hold these FFN sizes (``hf``: different sizes per layer), or None."""
        return refusal(kept, fmt)

    def save_hf(self, adapter: HFCTCAdapter, output: str | os.PathLike, level: float | None = None,
                dtype: torch.dtype | None = None) -> Path:
        """``dsnn export --format hf``: ``adapter`` as a ``save_pretrained`` directory (:func:`save_hf_directory`);
        UsageError for a structured level with different FFN sizes per layer (no Hugging Face config holds it)."""
        refuse_hf_export(adapter.ffn_dims)
        return save_hf_directory(adapter, output, level, dtype)


HF_CTC = HFCTCFamily()
register_family(FAMILY, HF_CTC)
