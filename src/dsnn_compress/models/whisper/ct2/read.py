"""A faster-whisper / CTranslate2 Whisper directory -> a Hugging Face Whisper state dict and its text files.

The state dict keeps the file's dtypes; fused q/k/v are split and the all-zero key biases dropped (exact: a key bias
adds a per-query constant to the scores that softmax cancels); ``proj_out.weight`` is left out (it is tied). The
text files (``config.json``, generation config, feature extractor, tokenizer) are derived from the tensors' sizes,
CTranslate2's ``config.json`` and the vocabulary, so that the ``whisper`` family describes the model as it would a
Hugging Face directory. Each layer keeps its own FFN size: a side whose layers differ (a structured level with
``global`` allocation) gets layer 0's size in ``config.json`` and its per-layer sizes from :func:`ffn_dims_of`,
which the reader puts in the model description (``ffn_dims``, as dsnn checkpoints carry them).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ....errors import DsnnError
from .model_bin import CONVERT_HINT, FLOAT_DTYPES, read_model_bin
from .names import (
    EMBEDDING,
    HEAD_COUNTS,
    OPTIONAL_SCALARS,
    PROJECTION,
    SCALARS,
    SIDES,
    WhisperSizes,
    json_text,
    layer_count,
    name_map,
    rows,
    special_token_ids,
)

CT2_CONFIG_KEYS = ("alignment_heads", "lang_ids", "suppress_ids", "suppress_ids_begin")
"""What CTranslate2's ``config.json`` must hold."""
MULTILINGUAL_VOCABULARY = 51865
"""A vocabulary this large or larger is a multilingual model's (ctranslate2's own rule)."""


def read_vocabulary(directory: Path) -> list[str]:
    """The tokens of ``vocabulary.json`` (a JSON list) or ``vocabulary.txt`` (one per line)."""
    if (directory / "vocabulary.json").is_file():
        return list(json.loads((directory / "vocabulary.json").read_text(encoding="utf-8")))
    if (directory / "vocabulary.txt").is_file():
        return (directory / "vocabulary.txt").read_text(encoding="utf-8").removesuffix("\n").split("\n")
    raise DsnnError(f"{directory} has no vocabulary.txt or vocabulary.json", "copy the complete model directory")


def _check_scalars(variables: Mapping[str, torch.Tensor]) -> None:
    """Every spec scalar present (the optional ones may be absent), rank 0, of its dtype and value."""
    for name, (dtype, value) in {**SCALARS, **OPTIONAL_SCALARS, **HEAD_COUNTS}.items():
        scalar = variables.get(name)
        if scalar is None:
            if name in OPTIONAL_SCALARS:
                continue
            raise DsnnError(f"model.bin lacks the spec scalar {name}", CONVERT_HINT)
        if scalar.dim() or scalar.dtype != dtype or value not in (None, int(scalar)):
            raise DsnnError(f"model.bin: {name} = {scalar.tolist()} ({scalar.dtype}), expected {value} ({dtype})",
                            CONVERT_HINT)


def _dimensions(variables: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """The Hugging Face config's dimensions (``d_model``, ``encoder_layers``...), read from the variables."""
    embedding = variables.get(EMBEDDING)
    conv1 = variables.get("encoder/conv1/weight")
    if embedding is None or conv1 is None or embedding.dim() != 2 or conv1.dim() != 3:
        raise DsnnError(f"model.bin lacks {EMBEDDING} or encoder/conv1/weight (or they are not 2-D / 3-D)",
                        CONVERT_HINT)
    dims = {
        "vocab_size": int(embedding.shape[0]),
        "d_model": int(embedding.shape[1]),
        "num_mel_bins": int(conv1.shape[1]),
        "encoder_layers": layer_count(variables, "encoder/"),
        "decoder_layers": layer_count(variables, "decoder/"),
        "encoder_ffn_dim": rows(variables.get("encoder/layer_0/ffn/linear_0/weight")),
        "decoder_ffn_dim": rows(variables.get("decoder/layer_0/ffn/linear_0/weight")),
        "max_source_positions": rows(variables.get("encoder/position_encodings/encodings")),
        "max_target_positions": rows(variables.get("decoder/position_encodings/encodings")),
        "encoder_attention_heads": int(variables["encoder/num_heads"]),
        "decoder_attention_heads": int(variables["decoder/num_heads"]),
    }
    for side in SIDES:
        heads = dims[f"{side}_attention_heads"]
        if heads <= 0 or dims["d_model"] % heads:
            raise DsnnError(f"model.bin: {side}/num_heads does not divide d_model {dims['d_model']}", CONVERT_HINT)
    return dims


def _sizes(dims: Mapping[str, int], variables: Mapping[str, torch.Tensor]) -> WhisperSizes:
    """The name map's sizes: ``dims``, and each layer's FFN size read from its ``ffn/linear_0`` rows (a missing
    variable reads as the side's ``config.json`` size and is then reported by name)."""
    ffn = {side: tuple(rows(variables.get(f"{side}/layer_{index}/ffn/linear_0/weight")) or dims[f"{side}_ffn_dim"]
                       for index in range(dims[f"{side}_layers"])) for side in SIDES}
    return WhisperSizes(
        d_model=dims["d_model"],
        vocab_size=dims["vocab_size"],
        num_mel_bins=dims["num_mel_bins"],
        positions={"encoder": dims["max_source_positions"], "decoder": dims["max_target_positions"]},
        ffn=ffn,
    )


def ffn_dims_of(state: Mapping[str, torch.Tensor]) -> dict[str, list[int]]:
    """Per side whose layers have different FFN sizes, each layer's size (its ``fc1`` rows) in a Hugging Face
    Whisper state dict: the model description's ``ffn_dims``, which a Hugging Face config cannot hold (empty when
    every side has one size)."""
    dims = {}
    for side in SIDES:
        sizes = [rows(state.get(f"model.{side}.layers.{index}.fc1.weight"))
                 for index in range(layer_count(state, f"model.{side}."))]
        if len(set(sizes)) > 1:
            dims[side] = sizes
    return dims


def ct2_to_hf(variables: Mapping[str, torch.Tensor], aliases: Mapping[str, str]
              ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """HF state dict (``proj_out.weight`` left out: it is tied) and the model's dimensions."""
    variables = {**variables, **{alias: variables[target].clone() for alias, target in aliases.items()}}
    if PROJECTION in variables and not torch.equal(variables[PROJECTION], variables.get(EMBEDDING, torch.empty(0))):
        raise DsnnError("the output projection is not tied to the token embedding, which HF Whisper requires",
                        CONVERT_HINT)
    _check_scalars(variables)
    dims = _dimensions(variables)
    entries = name_map(_sizes(dims, variables))
    state: dict[str, torch.Tensor] = {}
    for name, entry in entries.items():
        if name not in variables:
            raise DsnnError(f"model.bin lacks the variable {name}", CONVERT_HINT)
        tensor = variables[name]
        if tuple(tensor.shape) != entry.shape:
            raise DsnnError(f"model.bin: {name} has shape {list(tensor.shape)}, expected {list(entry.shape)}",
                            CONVERT_HINT)
        if tensor.dtype not in FLOAT_DTYPES.values():
            raise DsnnError(f"model.bin: {name} is {tensor.dtype} (quantized models are not supported)", CONVERT_HINT)
        if len(entry.hf_names) == 1:
            state[entry.hf_names[0]] = tensor
            continue
        for hf_name, block in zip(entry.hf_names, tensor.chunk(len(entry.hf_names))):
            if hf_name:  # not the key bias
                state[hf_name] = block.clone()
    known = {*entries, *SCALARS, *OPTIONAL_SCALARS, *HEAD_COUNTS, PROJECTION}
    unused = sorted(set(variables) - known)
    if unused:
        raise DsnnError(f"model.bin has variables a Whisper model does not use: {unused[:4]}", CONVERT_HINT)
    return state, dims


def _generation_config(dims: Mapping[str, int], config: Mapping[str, Any], vocabulary: list[str],
                       ids: Mapping[str, int], tokens: Mapping[str, int]) -> dict[str, Any]:
    """``generation_config.json``: the special token ids (``ids``: by token), the suppress lists and the alignment
    heads; for a multilingual model the language and task ids too."""
    multilingual = dims["vocab_size"] >= MULTILINGUAL_VOCABULARY
    generation = {
        **tokens,
        "max_length": dims["max_target_positions"],
        "is_multilingual": multilingual,
        "no_timestamps_token_id": ids["<|notimestamps|>"],
        "prev_sot_token_id": ids["<|startofprev|>"],
        "max_initial_timestamp_index": 50,
        "return_timestamps": False,
        "suppress_tokens": list(config["suppress_ids"]),
        "begin_suppress_tokens": list(config["suppress_ids_begin"]),
        "alignment_heads": [list(head) for head in config["alignment_heads"]],
    }
    if multilingual:
        languages = range(ids["<|startoftranscript|>"] + 1, ids["<|translate|>"])
        generation["lang_to_id"] = {vocabulary[token_id]: token_id for token_id in languages}
        generation["task_to_id"] = {"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]}
    return generation


def hf_text_files(dims: Mapping[str, int], config: Mapping[str, Any], vocabulary: list[str], tokenizer: str
                  ) -> dict[str, str]:
    """The Hugging Face text files (config, generation config, feature extractor, tokenizer) of a CT2 model."""
    missing = [key for key in CT2_CONFIG_KEYS if key not in config]
    if missing:
        raise DsnnError(f"config.json lacks {missing}", "copy the complete model directory")
    if len(vocabulary) != dims["vocab_size"]:
        raise DsnnError(f"the vocabulary has {len(vocabulary)} tokens, the embedding {dims['vocab_size']}",
                        "copy the complete model directory")
    ids = special_token_ids(vocabulary)
    end, start = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    tokens = {"pad_token_id": end, "bos_token_id": start, "eos_token_id": end, "decoder_start_token_id": start}
    model = {"architectures": ["WhisperForConditionalGeneration"], "model_type": "whisper", **dims, **tokens,
             "activation_function": "gelu", "scale_embedding": False, "tie_word_embeddings": True}
    features = {"feature_extractor_type": "WhisperFeatureExtractor", "feature_size": dims["num_mel_bins"],
                "sampling_rate": 16000, "hop_length": 160, "chunk_length": 30, "n_fft": 400, "padding_value": 0.0,
                "padding_side": "right", "return_attention_mask": False, "processor_class": "WhisperProcessor"}
    special = {key: "<|endoftext|>" for key in ("bos_token", "eos_token", "unk_token", "pad_token")}
    tokenizer_config = {"tokenizer_class": "WhisperTokenizer", **special, "model_max_length": 1024,
                        "errors": "replace", "add_prefix_space": False}
    return {
        "config.json": json_text(model),
        "generation_config.json": json_text(_generation_config(dims, config, vocabulary, ids, tokens)),
        "preprocessor_config.json": json_text(features),
        "tokenizer.json": tokenizer,
        "tokenizer_config.json": json_text(tokenizer_config),
    }


def _read_config(directory: Path) -> dict[str, Any]:
    """CTranslate2's ``config.json`` of ``directory``, a JSON object."""
    path = directory / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DsnnError(f"{path} is not valid JSON ({exc})", "copy the file again") from exc
    if not isinstance(config, dict):
        raise DsnnError(f"{path} is not a JSON object", "copy the file again")
    return config


def read_ct2_directory(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(hf_state_dict, text_files)`` of a faster-whisper / CTranslate2 Whisper model directory."""
    directory = Path(path)
    for name in ("model.bin", "config.json", "tokenizer.json"):
        if not (directory / name).is_file():
            raise DsnnError(f"the CTranslate2 directory {directory} has no {name}",
                            "copy the complete faster-whisper model directory (tokenizer.json included)")
    variables, aliases = read_model_bin(directory / "model.bin")
    state, dims = ct2_to_hf(variables, aliases)
    config = _read_config(directory)
    tokenizer = (directory / "tokenizer.json").read_text(encoding="utf-8")
    return state, hf_text_files(dims, config, read_vocabulary(directory), tokenizer)
