"""What a Whisper model directory holds, read from its small text files (no ``transformers`` needed).

A ``save_pretrained`` directory of ``WhisperForConditionalGeneration`` is recognised by its ``config.json``
(``architectures`` naming it, or ``model_type: whisper``). The adapter is rebuilt later from the kept text files
alone (config, generation config, feature-extractor config, tokenizer files), which the model description carries
verbatim, so a bundle runs without the directory and without the network.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ...data.text import get_normalizer
from ...errors import DsnnError
from ..hf_files import BAD_META_HINT, parse_config

FAMILY = "whisper"
ARCHITECTURE = "WhisperForConditionalGeneration"
INSTALL_HINT = 'install the Hugging Face extra: pip install "dsnn-compress[hf]"'

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "normalizer.json")
"""Tokenizer files kept when present (``tokenizer.json``, or ``vocab.json`` + ``merges.txt``, is required)."""
MODEL_FILES = ("config.json", "generation_config.json", "preprocessor_config.json", *TOKENIZER_FILES)
"""Every text file of a Whisper directory the model description keeps."""


def parse_json(files: Mapping[str, str], name: str) -> Any:
    """``files[name]`` parsed as JSON (DsnnError naming the file when it is not)."""
    try:
        return json.loads(files[name])
    except (json.JSONDecodeError, TypeError) as exc:
        raise DsnnError(f"{name} of the Whisper model is not valid JSON ({exc})", BAD_META_HINT) from exc


def is_whisper_config(config: Mapping[str, Any]) -> bool:
    """True for the config of a Whisper encoder-decoder with a language-model head."""
    architectures = config.get("architectures")
    if isinstance(architectures, list) and architectures:
        return ARCHITECTURE in architectures
    return config.get("model_type") == "whisper"


def whisper_metadata_from_files(files: Mapping[str, str], tensor_names: Any = None,
                                normalizer: str = "default") -> dict[str, Any] | None:
    """The ``whisper`` model description of a directory's text files, or None when it is not a Whisper model.

    A Whisper directory without its tokenizer or feature-extractor configuration is an error: it could be pruned
    but never run, so it is refused here with what to add.
    """
    config = parse_config(files)
    if config is None or not is_whisper_config(config):
        return None
    has_tokenizer = "tokenizer.json" in files or ("vocab.json" in files and "merges.txt" in files)
    if not has_tokenizer:
        raise DsnnError("the Whisper directory has no tokenizer (tokenizer.json, or vocab.json and merges.txt), so "
                        "its transcripts cannot be decoded",
                        "save the processor (WhisperProcessor.save_pretrained) into the model directory")
    if "preprocessor_config.json" not in files:
        raise DsnnError("the Whisper directory has no preprocessor_config.json, so its log-mel features are unknown",
                        "save the processor (WhisperProcessor.save_pretrained) into the model directory")
    get_normalizer(normalizer)
    kept = {name: files[name] for name in MODEL_FILES if name in files}
    features = parse_json(kept, "preprocessor_config.json")
    return {"family": FAMILY, "hf_files": kept, "normalizer": normalizer,
            "sample_rate": int(features.get("sampling_rate", 16000)) if isinstance(features, dict) else 16000,
            "audio_ctx": None}


def renumber_alignment_heads(meta: Mapping[str, Any], dropped: Any, layers: int) -> dict[str, Any]:
    """``meta`` whose generation config's ``alignment_heads`` (the ``[decoder layer, head]`` pairs word timestamps
    read) fit a decoder without its ``dropped`` layers (of ``layers``): the kept layers' heads renumbered, the
    dropped layers' heads left out and, when none is left, every head of the second half of the kept layers
    (CTranslate2's converter rule). An alignment head past the last layer makes CTranslate2 crash."""
    files = meta["hf_files"]
    gone = set(dropped or ())
    generation = parse_json(files, "generation_config.json") if "generation_config.json" in files else None
    if not gone or not isinstance(generation, dict) or not generation.get("alignment_heads"):
        return dict(meta)
    index = {old: new for new, old in enumerate(i for i in range(layers) if i not in gone)}
    heads = [[index[int(layer)], int(head)] for layer, head in generation["alignment_heads"] if int(layer) in index]
    if not heads:
        count = int(parse_json(files, "config.json")["decoder_attention_heads"])
        heads = [[layer, head] for layer in range(len(index) // 2, len(index)) for head in range(count)]
    generation["alignment_heads"] = heads
    text = json.dumps(generation, indent=2, sort_keys=True) + "\n"
    return {**meta, "hf_files": {**files, "generation_config.json": text}}
