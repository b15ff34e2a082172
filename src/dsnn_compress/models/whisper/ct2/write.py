"""A Hugging Face Whisper state dict and its text files -> a faster-whisper / CTranslate2 model directory.

Writes what ctranslate2's ``TransformersConverter`` writes, byte for byte: ``model.bin`` (q/k/v fused with a zero
key bias, the spec scalars, identical tensors stored once and aliased), ``config.json`` (derived as ctranslate2's
``WhisperLoader`` derives it), ``vocabulary.txt`` and ``tokenizer.json``. The sizes come from the tensors: the
layers of a side are the numbered ones its state dict holds, and each layer's FFN size is its ``fc1``'s rows, so the
layers of a side may have different FFN sizes (a structured level with ``global`` allocation): CTranslate2 reads each
layer's ``ffn/linear_0`` / ``linear_1`` shapes from ``model.bin`` and runs them (``docs/whisper.md``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ....errors import DsnnError
from . import names
from .model_bin import FLOAT_DTYPES, write_model_bin

CONSISTENT_HINT = "export a consistent Whisper model"


def _json_file(files: Mapping[str, str], name: str) -> dict[str, Any]:
    """``files[name]`` parsed, or ``{}`` when it is absent or not a JSON object."""
    try:
        data = json.loads(files[name]) if name in files else {}
    except json.JSONDecodeError as exc:
        raise DsnnError(f"{name} of the Whisper model is not valid JSON ({exc})", "re-create the model") from exc
    return data if isinstance(data, dict) else {}


def _sizes(state: Mapping[str, torch.Tensor], embedding: torch.Tensor, conv1: torch.Tensor) -> names.WhisperSizes:
    """The name map's sizes, read from a Hugging Face state dict (an FFN size per layer: its ``fc1``'s rows)."""
    ffn = {}
    for side in names.SIDES:
        layers = names.layer_count(state, f"model.{side}.")
        ffn[side] = tuple(names.rows(state.get(f"model.{side}.layers.{index}.fc1.weight")) for index in range(layers))
    return names.WhisperSizes(
        d_model=int(embedding.shape[1]),
        vocab_size=int(embedding.shape[0]),
        num_mel_bins=int(conv1.shape[1]),
        positions={side: names.rows(state.get(f"model.{side}.embed_positions.weight")) for side in names.SIDES},
        ffn=ffn,
    )


def hf_to_ct2(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]
              ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """CTranslate2 variables and aliases of an HF Whisper state dict (q/k/v fused with a zero key bias)."""
    embedding = state.get("model.decoder.embed_tokens.weight")
    conv1 = state.get("model.encoder.conv1.weight")
    if embedding is None or conv1 is None:
        raise DsnnError("the state dict lacks the Whisper token embedding or first convolution", "export Whisper")
    if "proj_out.weight" in state and not torch.equal(state["proj_out.weight"], embedding):
        raise DsnnError("proj_out.weight differs from the token embedding: untied Whisper models are not supported",
                        "tie the output projection to the embedding")
    sizes = _sizes(state, embedding, conv1)
    variables: dict[str, torch.Tensor] = {}
    for side in names.SIDES:
        heads = int(config.get(f"{side}_attention_heads", 0))
        if heads <= 0 or sizes.d_model % heads or len(sizes.ffn[side]) != config.get(f"{side}_layers"):
            raise DsnnError(f"config.json does not match the state dict ({side} layers or attention heads)",
                            CONSISTENT_HINT)
        variables[f"{side}/num_heads"] = torch.tensor(heads, dtype=torch.int16)
    used = {"proj_out.weight"}
    for name, entry in names.name_map(sizes).items():
        missing = [hf_name for hf_name in entry.hf_names if hf_name and hf_name not in state]
        if missing:
            raise DsnnError(f"the Whisper state dict lacks {missing[0]}", "export a complete Whisper model")
        last = state[entry.hf_names[-1]]
        blocks = [state[hf_name] if hf_name else torch.zeros(sizes.d_model, dtype=last.dtype)
                  for hf_name in entry.hf_names]
        used.update(entry.hf_names)
        variables[name] = torch.cat(blocks) if len(blocks) > 1 else blocks[0]
        if tuple(variables[name].shape) != entry.shape:
            raise DsnnError(f"{entry.hf_names[-1]} has shape {list(last.shape)}, which does not fit {name} "
                            f"{list(entry.shape)}", CONSISTENT_HINT)
    unused = sorted(set(state) - used)
    if unused:
        raise DsnnError(f"the Whisper state dict has tensors CTranslate2 cannot hold: {unused[:4]}", "export Whisper")
    for name, (dtype, value) in names.SCALARS.items():
        variables[name] = torch.tensor(value, dtype=dtype)
    return variables, {names.PROJECTION: names.EMBEDDING}


def _store_duplicates_once(variables: dict[str, torch.Tensor], aliases: dict[str, str], dtype: str | None) -> None:
    """Convert every weight to ``dtype`` (None: keep it), then alias each weight equal to one earlier by name to
    that one and drop it from ``variables``, as ctranslate2's ``ModelSpec._alias_variables`` does."""
    first_by_content: dict[tuple[Any, ...], str] = {}
    for name in sorted(variables):
        tensor = variables[name].contiguous()
        if not tensor.dim():  # spec scalars
            continue
        if tensor.dtype not in FLOAT_DTYPES.values():
            raise DsnnError(f"{name} has dtype {tensor.dtype}", "export floating-point weights")
        if dtype:
            tensor = tensor.to(FLOAT_DTYPES[dtype])
        variables[name] = tensor
        raw = (tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor).numpy().tobytes()
        key = (tensor.dtype, tuple(tensor.shape), hashlib.sha1(raw).hexdigest())
        if key in first_by_content and torch.equal(variables[first_by_content[key]], tensor):
            aliases[name] = first_by_content[key]
        else:
            first_by_content.setdefault(key, name)
    for alias in aliases:
        variables.pop(alias, None)


def ct2_config(files: Mapping[str, str], vocabulary: list[str], decoder_layers: int, heads: int) -> dict[str, Any]:
    """CTranslate2's ``config.json`` from the HF generation config (as ctranslate2's WhisperLoader derives it)."""
    generation = _json_file(files, "generation_config.json")
    model = _json_file(files, "config.json")
    ids = names.special_token_ids(vocabulary)
    languages = generation.get("lang_to_id")
    if languages:
        lang_ids = sorted(languages.values())
    else:
        lang_ids = list(range(ids["<|startoftranscript|>"] + 1, ids["<|translate|>"]))
    alignment = generation.get("alignment_heads")
    if not alignment:  # every head of the second half of the decoder layers
        alignment = [[layer, head] for layer in range(decoder_layers // 2, decoder_layers) for head in range(heads)]
    outside = [list(pair) for pair in alignment
               if not (0 <= int(pair[0]) < decoder_layers and 0 <= int(pair[1]) < heads)]
    if outside:  # CTranslate2 would crash on word timestamps
        raise DsnnError(f"the generation config's alignment_heads {outside[:3]} lie outside the decoder's "
                        f"{decoder_layers} layers x {heads} heads", CONSISTENT_HINT)
    suppress = {}
    for key in ("suppress_tokens", "begin_suppress_tokens"):
        value = generation.get(key) or model.get(key)
        if not value:  # an empty list would silently change decoding
            raise DsnnError(f"the Whisper model's generation config has no {key}", "export a complete Whisper model")
        suppress[key] = [int(token) for token in value]
    return {"alignment_heads": [list(head) for head in alignment], "lang_ids": lang_ids,
            "suppress_ids": suppress["suppress_tokens"], "suppress_ids_begin": suppress["begin_suppress_tokens"]}


def ct2_vocabulary(tokenizer_json: str, vocab_size: int) -> list[str]:
    """BPE tokens and added tokens by id, then ``<|0.00|>``... timestamp tokens up to ``vocab_size``."""
    data = json.loads(tokenizer_json)
    by_id = {int(token_id): token for token, token_id in data.get("model", {}).get("vocab", {}).items()}
    for token in data.get("added_tokens", []):
        by_id.setdefault(int(token["id"]), token["content"])
    if sorted(by_id) != list(range(len(by_id))) or len(by_id) > vocab_size:
        raise DsnnError(f"tokenizer.json ids are not 0..N-1 with N <= {vocab_size}", "export a Whisper tokenizer")
    timestamps = [f"<|{index * 0.02:.2f}|>" for index in range(vocab_size - len(by_id))]
    return [by_id[token_id] for token_id in range(len(by_id))] + timestamps


def write_ct2_directory(directory: str | Path, hf_state_dict: Mapping[str, torch.Tensor],
                        text_files: Mapping[str, str], dtype: str | None = None) -> Path:
    """Write ``model.bin``, ``config.json``, ``vocabulary.txt`` and ``tokenizer.json`` (faster-whisper loads them).

    ``dtype`` (``float16``, ``float32``, ``bfloat16``) converts every weight; None keeps each tensor's dtype. Like
    ctranslate2's converter, identical weight tensors are stored once and aliased (the tied output projection).
    """
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise DsnnError(f"unsupported CTranslate2 dtype {dtype!r}", f"choose one of {', '.join(FLOAT_DTYPES)}")
    if "tokenizer.json" not in text_files:
        raise DsnnError("the Whisper model has no tokenizer.json, which faster-whisper needs", "re-create the model")
    config = _json_file(text_files, "config.json")
    state = {name: tensor.detach().cpu() for name, tensor in hf_state_dict.items()}
    variables, aliases = hf_to_ct2(state, config)
    _store_duplicates_once(variables, aliases, dtype)
    vocab_size = int(state["model.decoder.embed_tokens.weight"].shape[0])
    vocabulary = ct2_vocabulary(text_files["tokenizer.json"], vocab_size)
    decoder_layers = names.layer_count(state, "model.decoder.")
    heads = int(variables["decoder/num_heads"])
    config_text = names.json_text(ct2_config(text_files, vocabulary, decoder_layers, heads))
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    write_model_bin(out / "model.bin", variables, aliases)
    (out / "config.json").write_text(config_text, encoding="utf-8")
    (out / "vocabulary.txt").write_text("".join(token + "\n" for token in vocabulary), encoding="utf-8")
    (out / "tokenizer.json").write_text(text_files["tokenizer.json"], encoding="utf-8")
    return out
