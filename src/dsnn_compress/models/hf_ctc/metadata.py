"""The text files of a Hugging Face ``save_pretrained`` directory: what the ``hf-ctc`` family reads and keeps.

A supported model is recognised, and its adapter later rebuilt, from the directory's small JSON files alone
(``config.json``, the feature extractor's ``preprocessor_config.json`` or ``processor_config.json``, the tokenizer's
files). This module parses them, chooses the architecture and writes them back; it never imports ``transformers``
(:func:`import_transformers` does, on demand, for the modules that build or save a model), so pruning and
inspecting a directory work without it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ...data.text import get_normalizer
from ...errors import DsnnError
from ..hf_files import BAD_META_HINT, parse_config

FAMILY = "hf-ctc"
INSTALL_HINT = 'install the Hugging Face extra: pip install "dsnn-compress[hf]"'

SUPPORTED_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "Wav2Vec2ForCTC": ("wav2vec2", "Wav2Vec2Config"),
    "HubertForCTC": ("hubert", "HubertConfig"),
    "WavLMForCTC": ("wavlm", "WavLMConfig"),
    "Data2VecAudioForCTC": ("data2vec-audio", "Data2VecAudioConfig"),
}
"""Architecture class name -> (``model_type``, config class name)."""

MODEL_FILES = (
    "config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "vocab.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
"""The text files of a ``save_pretrained`` directory that the adapter keeps (when present)."""
TOKENIZER_FILES = ("vocab.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
FEATURE_EXTRACTOR_FILES = ("preprocessor_config.json", "processor_config.json")

WEIGHT_NORM_NAMES = {
    "weight_g": (".weight_g", ".weight_v"),
    "parametrizations": (".parametrizations.weight.original0", ".parametrizations.weight.original1"),
}
"""The two spellings of a weight-normed convolution's tensors: legacy ``weight_norm`` and ``parametrizations``."""



def supported_list() -> str:
    """The supported architectures, comma-separated (for error hints)."""
    return ", ".join(SUPPORTED_ARCHITECTURES)


def import_transformers() -> Any:
    """The ``transformers`` module, or a DsnnError telling how to install it."""
    try:
        import transformers
    except ImportError as exc:
        raise DsnnError("the hf-ctc model family (Hugging Face CTC models) needs the transformers package, "
                        "which is not installed", INSTALL_HINT) from exc
    return transformers


def parse_json(hf_files: Mapping[str, str], name: str) -> Any:
    """The parsed JSON of file ``name``; DsnnError (damaged metadata) when it is not valid JSON."""
    try:
        return json.loads(hf_files[name])
    except (json.JSONDecodeError, TypeError) as exc:
        raise DsnnError(f"{name} of the Hugging Face model is not valid JSON ({exc})", BAD_META_HINT) from exc


def select_architecture(config: Mapping[str, Any], tensor_names: Any = None) -> str | None:
    """The supported CTC architecture named by ``config`` (``architectures``, else ``model_type``), or None.

    Without ``architectures`` the ``model_type`` decides, but only when the weights (``tensor_names``, if given)
    hold a CTC head ``lm_head.weight``: a bare ``Wav2Vec2Model`` is no CTC model.
    """
    architectures = config.get("architectures")
    if isinstance(architectures, list) and architectures:
        return next((a for a in architectures if a in SUPPORTED_ARCHITECTURES), None)
    model_type = config.get("model_type")
    by_type = {mt: arch for arch, (mt, _) in SUPPORTED_ARCHITECTURES.items()}
    if model_type not in by_type:
        return None
    if tensor_names is not None and "lm_head.weight" not in set(tensor_names):
        return None
    return by_type[model_type]


def weight_norm_style(names: Any) -> str | None:
    """``weight_g``, ``parametrizations`` or None: how the weight-normed tensors are spelled in ``names``."""
    for style, (suffix_g, _) in WEIGHT_NORM_NAMES.items():
        if any(str(n).endswith(suffix_g) for n in names):
            return style
    return None


def hf_metadata_from_files(
    hf_files: Mapping[str, str], tensor_names: Any = None, normalizer: str = "default"
) -> dict[str, Any] | None:
    """The ``hf-ctc`` model metadata of a ``save_pretrained`` directory's text files, or None if unsupported.

    None when there is no parseable ``config.json`` or its architecture is not a supported CTC model (generic
    pruning still works on such directories). A supported model without its tokenizer (``vocab.json``) or feature
    extractor configuration raises :class:`DsnnError`. ``tensor_names`` (the weights' keys) records how the
    weight-normed positional convolution is spelled; this needs no ``transformers``.
    """
    config = parse_config(hf_files)
    if config is None:
        return None
    architecture = select_architecture(config, tensor_names)
    if architecture is None:
        return None
    if "vocab.json" not in hf_files:
        raise DsnnError(f"the {architecture} directory has no vocab.json, so its transcripts cannot be decoded",
                        "save the tokenizer (or processor) into the model directory with save_pretrained")
    if not any(name in hf_files for name in FEATURE_EXTRACTOR_FILES):
        raise DsnnError(f"the {architecture} directory has no preprocessor_config.json, so its input "
                        "normalisation and sampling rate are unknown",
                        "save the feature extractor (or processor) into the model directory with save_pretrained")
    get_normalizer(normalizer)
    kept = {name: hf_files[name] for name in MODEL_FILES if name in hf_files}
    feature_config = feature_extractor_config(kept)
    meta: dict[str, Any] = {
        "family": FAMILY,
        "architecture": architecture,
        "hf_files": kept,
        "normalizer": normalizer,
        "sample_rate": int(feature_config.get("sampling_rate", 16000)),
    }
    if tensor_names is not None:
        meta["weight_norm"] = weight_norm_style(tensor_names)
    return meta


def feature_extractor_config(hf_files: Mapping[str, str]) -> dict[str, Any]:
    """The ``Wav2Vec2FeatureExtractor`` settings of ``preprocessor_config.json`` (else ``processor_config.json``)."""
    if "preprocessor_config.json" in hf_files:
        data = parse_json(hf_files, "preprocessor_config.json")
    elif "processor_config.json" in hf_files:
        data = parse_json(hf_files, "processor_config.json")
        data = data.get("feature_extractor") if isinstance(data, dict) else None
    else:
        data = None
    if not isinstance(data, dict):
        raise DsnnError("the Hugging Face model has no feature extractor configuration",
                        "save the feature extractor (or processor) into the model directory with save_pretrained")
    kind = data.get("feature_extractor_type", "Wav2Vec2FeatureExtractor")
    if kind != "Wav2Vec2FeatureExtractor":
        raise DsnnError(f"feature extractor {kind} is not supported by the hf-ctc family",
                        "models with a Wav2Vec2FeatureExtractor (raw waveform input) are supported")
    return data


def write_files(directory: Path, hf_files: Mapping[str, str], names: tuple[str, ...]) -> None:
    """Write the texts of ``hf_files`` named in ``names`` (those present) into ``directory`` verbatim."""
    for name in names:
        if name in hf_files:
            (directory / name).write_text(hf_files[name], encoding="utf-8")

