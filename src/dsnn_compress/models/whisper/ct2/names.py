"""The CTranslate2 <-> Hugging Face name map of Whisper, and the conventions the reader and the writer share.

:func:`name_map` lists every weight of CTranslate2's ``WhisperSpec`` with its shape and the Hugging Face tensors it
is made of (fused attention projections stack several). It is built from :class:`WhisperSizes`, which the reader
and the writer each read from the tensors they are given: the number of layers of a side is the number of its
``FFN`` sizes, one per layer. Besides the weights, a Whisper ``model.bin`` holds spec scalars (:data:`SCALARS`,
:data:`HEAD_COUNTS`) and aliases the output projection to the token embedding (:data:`PROJECTION`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from ....errors import DsnnError
from .model_bin import CONVERT_HINT

SIDES = ("encoder", "decoder")
SCALARS: dict[str, tuple[torch.dtype, int]] = {
    "decoder/activation": (torch.int8, 3),  # 3 = GELU
    "decoder/alibi": (torch.int8, 0),
    "decoder/alignment_heads": (torch.int16, 1),
    "decoder/alignment_layer": (torch.int16, -1),
    "decoder/pre_norm": (torch.int8, 1),
    "decoder/scale_embeddings": (torch.int8, 0),
    "decoder/start_from_zero_embedding": (torch.int8, 0),
}
"""Spec scalars every Whisper model.bin holds: name -> (dtype, the only value a Whisper model can have)."""
OPTIONAL_SCALARS: dict[str, tuple[torch.dtype, int]] = {
    "decoder/alibi_use_positive_positions": (torch.int8, 0),
    "decoder/scale_alibi": (torch.int8, 0),
}
"""Written by newer converters (ctranslate2 >= 4.x); accepted when zero, never written."""
HEAD_COUNTS: dict[str, tuple[torch.dtype, None]] = {
    "encoder/num_heads": (torch.int16, None),
    "decoder/num_heads": (torch.int16, None),
}
"""Spec scalars with the attention heads per side: name -> (dtype, None = any value)."""
PROJECTION = "decoder/projection/weight"
EMBEDDING = "decoder/embeddings/weight"
"""The output projection is always an alias of the token embedding (Hugging Face ties ``proj_out`` to it)."""
SPECIAL_TOKENS = ("<|endoftext|>", "<|startoftranscript|>", "<|translate|>", "<|transcribe|>", "<|startoflm|>",
                  "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>")
"""Special tokens every Whisper vocabulary holds (their ids go into the configs)."""


class Entry(NamedTuple):
    """One CTranslate2 weight: its shape and the Hugging Face tensors stacked along dimension 0 to make it."""

    shape: tuple[int, ...]
    hf_names: tuple[str, ...]
    """One name for a 1:1 tensor; q/k/v (or k/v) for a fused attention projection, ``""`` standing for the key
    bias Hugging Face does not have (CTranslate2 stores zeros)."""


@dataclass(frozen=True)
class WhisperSizes:
    """The sizes the name map needs, read from a model's tensors."""

    d_model: int
    vocab_size: int
    num_mel_bins: int
    positions: Mapping[str, int]
    """Side -> its position embeddings (``max_source_positions``, ``max_target_positions``)."""
    ffn: Mapping[str, tuple[int, ...]]
    """Side -> the FFN size of each of its layers (so the side has ``len(ffn[side])`` layers)."""


class _NameMap:
    """Collects :class:`Entry` values in the order :func:`name_map` adds them."""

    def __init__(self, d_model: int) -> None:
        self.d_model = d_model
        self.entries: dict[str, Entry] = {}

    def add(self, ct2_name: str, shape: tuple[int, ...], *hf_names: str) -> None:
        self.entries[ct2_name] = Entry(shape, hf_names)

    def linear(self, ct2_name: str, hf_name: str, rows: int, columns: int) -> None:
        """A linear layer: ``weight`` ``[rows, columns]`` and ``bias`` ``[rows]``."""
        self.add(f"{ct2_name}/weight", (rows, columns), f"{hf_name}.weight")
        self.add(f"{ct2_name}/bias", (rows,), f"{hf_name}.bias")

    def layer_norm(self, ct2_name: str, hf_name: str) -> None:
        """A layer norm: CTranslate2's ``gamma`` / ``beta`` are Hugging Face's ``weight`` / ``bias``."""
        self.add(f"{ct2_name}/gamma", (self.d_model,), f"{hf_name}.weight")
        self.add(f"{ct2_name}/beta", (self.d_model,), f"{hf_name}.bias")

    def fused(self, ct2_name: str, hf_attention: str, parts: str) -> None:
        """The projections ``parts`` (``"qkv"`` or ``"kv"``) of an attention block stacked into one linear layer."""
        rows = len(parts) * self.d_model
        weights = tuple(f"{hf_attention}.{part}_proj.weight" for part in parts)
        biases = tuple("" if part == "k" else f"{hf_attention}.{part}_proj.bias" for part in parts)
        self.add(f"{ct2_name}/weight", (rows, self.d_model), *weights)
        self.add(f"{ct2_name}/bias", (rows,), *biases)

    def layer(self, side: str, index: int, ffn: int) -> None:
        """The weights of layer ``index`` of ``side`` (decoder layers also attend to the encoder)."""
        d_model = self.d_model
        ct2 = f"{side}/layer_{index}"
        hf = f"model.{side}.layers.{index}"
        self.fused(f"{ct2}/self_attention/linear_0", f"{hf}.self_attn", "qkv")
        self.linear(f"{ct2}/self_attention/linear_1", f"{hf}.self_attn.out_proj", d_model, d_model)
        self.layer_norm(f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")
        if side == "decoder":
            self.linear(f"{ct2}/attention/linear_0", f"{hf}.encoder_attn.q_proj", d_model, d_model)
            self.fused(f"{ct2}/attention/linear_1", f"{hf}.encoder_attn", "kv")
            self.linear(f"{ct2}/attention/linear_2", f"{hf}.encoder_attn.out_proj", d_model, d_model)
            self.layer_norm(f"{ct2}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm")
        self.linear(f"{ct2}/ffn/linear_0", f"{hf}.fc1", ffn, d_model)
        self.linear(f"{ct2}/ffn/linear_1", f"{hf}.fc2", d_model, ffn)
        self.layer_norm(f"{ct2}/ffn/layer_norm", f"{hf}.final_layer_norm")


def name_map(sizes: WhisperSizes) -> dict[str, Entry]:
    """Every CTranslate2 weight of a Whisper model of these sizes -> its :class:`Entry` (spec scalars and the aliased
    output projection left out), in a fixed order: convolutions, token embedding, then per side its position
    embedding, final layer norm and layers."""
    names = _NameMap(sizes.d_model)
    for index, channels in ((1, sizes.num_mel_bins), (2, sizes.d_model)):
        names.add(f"encoder/conv{index}/weight", (sizes.d_model, channels, 3), f"model.encoder.conv{index}.weight")
        names.add(f"encoder/conv{index}/bias", (sizes.d_model,), f"model.encoder.conv{index}.bias")
    names.add(EMBEDDING, (sizes.vocab_size, sizes.d_model), "model.decoder.embed_tokens.weight")
    for side in SIDES:
        names.add(f"{side}/position_encodings/encodings", (sizes.positions[side], sizes.d_model),
                  f"model.{side}.embed_positions.weight")
        names.layer_norm(f"{side}/layer_norm", f"model.{side}.layer_norm")
        for index, ffn in enumerate(sizes.ffn[side]):
            names.layer(side, index, ffn)
    return names.entries


def layer_count(names: Iterable[str], prefix: str) -> int:
    """How many layers the tensor ``names`` under ``prefix`` hold (``layers.N.`` or ``layer_N/``), checked to be
    numbered 0..N-1."""
    pattern = re.compile(re.escape(prefix) + r"layer(?:s\.|_)(\d+)[./]")
    found = set()
    for name in names:
        match = pattern.match(name)
        if match:
            found.add(int(match.group(1)))
    if not found or found != set(range(len(found))):
        raise DsnnError(f"the {prefix} layers are not numbered 0..N-1 ({sorted(found)[:8]})", CONVERT_HINT)
    return len(found)


def rows(tensor: torch.Tensor | None) -> int:
    """Size of the first dimension (0 for a missing or rank-0 tensor)."""
    if tensor is None or not tensor.dim():
        return 0
    return int(tensor.shape[0])


def special_token_ids(vocabulary: list[str]) -> dict[str, int]:
    """The id of each of :data:`SPECIAL_TOKENS` in ``vocabulary``."""
    index = {token: token_id for token_id, token in enumerate(vocabulary)}
    missing = [token for token in SPECIAL_TOKENS if token not in index]
    if missing:
        raise DsnnError(f"the Whisper vocabulary lacks the special tokens {missing}", "copy the model's vocabulary")
    return {token: index[token] for token in SPECIAL_TOKENS}


def json_text(data: Any) -> str:
    """JSON as the configuration files are written: indented, keys sorted, a final newline."""
    return json.dumps(data, indent=2, sort_keys=True) + "\n"
