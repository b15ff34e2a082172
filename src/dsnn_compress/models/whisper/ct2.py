"""faster-whisper / CTranslate2 Whisper directories <-> the Hugging Face layout (``docs/whisper.md``).

A CTranslate2 Whisper directory holds ``model.bin`` (binary version 6, spec ``WhisperSpec`` revision 3), ``config.json``
(alignment heads, language ids, suppress lists), ``vocabulary.txt`` or ``vocabulary.json`` and ``tokenizer.json``.
:func:`read_ct2_directory` maps it to a ``WhisperForConditionalGeneration`` state dict (tensors keep the file's
dtype; fused q/k/v are split; the all-zero key biases CTranslate2 stores are dropped, which is exact: a key bias adds
a per-query constant to the scores that softmax cancels) plus the Hugging Face text files the ``whisper`` describer
needs. :func:`write_ct2_directory` is the reverse and reproduces the converter's files byte for byte.
``model.bin`` layout (little-endian): u32 version, str spec, u32 revision, u32 count, then per variable (sorted by
name) str name, u8 rank, u32 dims[rank], u8 dtype id, u32 byte count, raw data; then u32 alias count and (str alias,
str target) pairs; nothing after. A str is a u16 length counting a trailing NUL, the UTF-8 bytes and the NUL.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...errors import DsnnError

BINARY_VERSION = 6
SPEC_NAME = "WhisperSpec"
SPEC_REVISION = 3
HINT = "convert the model with ctranslate2's TransformersConverter (float16 or float32, not quantized)"
DTYPES: dict[int, tuple[str, torch.dtype, str | None]] = {
    0: ("float32", torch.float32, "<f4"), 1: ("int8", torch.int8, "i1"), 2: ("int16", torch.int16, "<i2"),
    3: ("int32", torch.int32, "<i4"), 4: ("float16", torch.float16, "<f2"), 5: ("bfloat16", torch.bfloat16, None),
}
"""dtype id (CTranslate2's ``DataType`` order) -> (name, torch dtype, numpy dtype; bfloat16 travels as int16 bits)."""
DTYPE_IDS = {torch_dtype: i for i, (_, torch_dtype, _) in DTYPES.items()}
FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SCALARS: dict[str, tuple[torch.dtype, int]] = {
    "decoder/activation": (torch.int8, 3), "decoder/alibi": (torch.int8, 0),  # 3 = GELU
    "decoder/alignment_heads": (torch.int16, 1), "decoder/alignment_layer": (torch.int16, -1),
    "decoder/pre_norm": (torch.int8, 1), "decoder/scale_embeddings": (torch.int8, 0),
    "decoder/start_from_zero_embedding": (torch.int8, 0),
}
"""Spec scalars every Whisper model.bin holds, with the only values a Whisper model can have."""
OPTIONAL_SCALARS = {"decoder/alibi_use_positive_positions": (torch.int8, 0), "decoder/scale_alibi": (torch.int8, 0)}
"""Written by newer converters (ctranslate2 >= 4.x); accepted when zero, never written."""
HEADS = {"encoder/num_heads": (torch.int16, None), "decoder/num_heads": (torch.int16, None)}
CT2_CONFIG_KEYS = ("alignment_heads", "lang_ids", "suppress_ids", "suppress_ids_begin")
SPECIALS = ("<|endoftext|>", "<|startoftranscript|>", "<|translate|>", "<|transcribe|>", "<|startoflm|>",
            "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>")
TIE = ("decoder/projection/weight", "decoder/embeddings/weight")


class _Cursor:
    """Bounds-checked little-endian reader over the bytes of ``model.bin``."""

    def __init__(self, data: bytes, path: Path) -> None:
        self.data, self.pos, self.path = memoryview(data), 0, path

    def take(self, n: int, what: str) -> memoryview:
        if self.pos + n > len(self.data):
            raise DsnnError(f"{self.path} is truncated: {what} needs {n} bytes at offset {self.pos}, the file has "
                            f"{len(self.data)}", "copy the file again")
        self.pos += n
        return self.data[self.pos - n: self.pos]

    def u(self, fmt: str, what: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        raw = bytes(self.take(self.u("H", f"the length of {what}"), what))
        if not raw or raw[-1] != 0:
            raise DsnnError(f"{self.path}: {what} at offset {self.pos - len(raw)} is not a NUL-terminated string",
                            "this is not a CTranslate2 model.bin")
        return raw[:-1].decode("utf-8", errors="replace")


def peek_ct2_header(path: Path) -> tuple[int, str] | None:
    """(binary version, spec name) when ``path`` starts like a CTranslate2 ``model.bin`` (any version or spec, so
    that an unsupported one gets a clear error rather than being taken for something else), else None. Cheap."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(260)
        version, length = struct.unpack_from("<IH", head)
        name = head[6: 6 + length]
        if 2 <= version <= 64 and 2 <= length == len(name) and name[-1] == 0 and name[:-1].isascii():
            return (version, name[:-1].decode("ascii")) if name[:-1].decode("ascii").isprintable() else None
    except (OSError, struct.error):
        pass
    return None


def read_model_bin(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The variables (rank-0 tensors for spec scalars, each in the file's dtype) and aliases of a Whisper model.bin."""
    cur = _Cursor(Path(path).read_bytes(), Path(path))
    version = cur.u("I", "the binary version")
    if version != BINARY_VERSION:
        raise DsnnError(f"{path}: CTranslate2 binary version {version} is not supported (only {BINARY_VERSION})", HINT)
    spec = cur.string("the spec name")
    if spec != SPEC_NAME:
        raise DsnnError(f"{path} holds a CTranslate2 {spec!r} model; only {SPEC_NAME} (Whisper) is supported",
                        "pass a faster-whisper model directory")
    revision = cur.u("I", "the spec revision")
    if revision != SPEC_REVISION:
        raise DsnnError(f"{path}: {SPEC_NAME} revision {revision} is not supported (only {SPEC_REVISION})", HINT)
    variables: dict[str, torch.Tensor] = {}
    for i in range(cur.u("I", "the variable count")):
        name = cur.string(f"the name of variable {i}")
        shape = tuple(cur.u("I", f"a dimension of {name}") for _ in range(cur.u("B", f"the rank of {name}")))
        dtype_id = cur.u("B", f"the dtype of {name}")
        if dtype_id not in DTYPES:
            raise DsnnError(f"{path}: {name} has an unsupported dtype id {dtype_id}", HINT)
        dtype_name, torch_dtype, np_dtype = DTYPES[dtype_id]
        nbytes, expected = cur.u("I", f"the byte count of {name}"), int(np.prod(shape)) * torch_dtype.itemsize
        if nbytes != expected:
            raise DsnnError(f"{path}: {name} {list(shape)} {dtype_name} declares {nbytes} bytes, expected {expected}",
                            "the file is damaged")
        if name in variables:
            raise DsnnError(f"{path}: variable {name} is stored twice", "the file is damaged")
        array = np.frombuffer(cur.take(nbytes, f"the data of {name}"), dtype=np_dtype or "<i2").reshape(shape)
        tensor = torch.from_numpy(array.copy())
        variables[name] = tensor.view(torch.bfloat16) if np_dtype is None else tensor
    aliases: dict[str, str] = {}
    for _ in range(cur.u("I", "the alias count")):
        alias = cur.string("an alias name")
        aliases[alias] = cur.string(f"the target of alias {alias}")
        if aliases[alias] not in variables:
            raise DsnnError(f"{path}: alias {alias} points at a missing variable", "the file is damaged")
    if cur.pos != len(cur.data):
        raise DsnnError(f"{path} has {len(cur.data) - cur.pos} trailing bytes after the model (offset {cur.pos})",
                        "the file is damaged or not a CTranslate2 model.bin")
    return variables, aliases


def write_model_bin(path: Path, variables: Mapping[str, torch.Tensor], aliases: Mapping[str, str]) -> None:
    """Write ``model.bin`` exactly as ctranslate2's ``ModelSpec`` serialises it (variables and aliases sorted)."""
    def string(text: str) -> bytes:
        raw = text.encode("utf-8") + b"\0"
        return struct.pack("<H", len(raw)) + raw

    chunks = [struct.pack("<I", BINARY_VERSION), string(SPEC_NAME), struct.pack("<II", SPEC_REVISION, len(variables))]
    for name in sorted(variables):
        tensor = variables[name].detach().cpu().contiguous()
        if tensor.dtype not in DTYPE_IDS:
            raise DsnnError(f"{name} has dtype {tensor.dtype}, which CTranslate2 cannot store", "use float32")
        array = tensor.view(torch.int16).numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
        raw = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        chunks += [string(name), struct.pack(f"<B{tensor.dim()}I", tensor.dim(), *tensor.shape),
                   struct.pack("<BI", DTYPE_IDS[tensor.dtype], len(raw)), raw]
    chunks.append(struct.pack("<I", len(aliases)))
    for alias in sorted(aliases):
        chunks += [string(alias), string(aliases[alias])]
    Path(path).write_bytes(b"".join(chunks))


def read_vocabulary(directory: Path) -> list[str]:
    """The tokens of ``vocabulary.json`` (a JSON list) or ``vocabulary.txt`` (one per line)."""
    if (directory / "vocabulary.json").is_file():
        return list(json.loads((directory / "vocabulary.json").read_text(encoding="utf-8")))
    if (directory / "vocabulary.txt").is_file():
        return (directory / "vocabulary.txt").read_text(encoding="utf-8").removesuffix("\n").split("\n")
    raise DsnnError(f"{directory} has no vocabulary.txt or vocabulary.json", "copy the complete model directory")


def _dump(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def _layers(names: Any, prefix: str) -> int:
    found = {int(m.group(1)) for n in names if (m := re.match(re.escape(prefix) + r"layer(?:s\.|_)(\d+)[./]", n))}
    if not found or found != set(range(len(found))):
        raise DsnnError(f"the {prefix} layers are not numbered 0..N-1 ({sorted(found)[:8]})", HINT)
    return len(found)


def _special_ids(vocabulary: list[str]) -> dict[str, int]:
    index = {token: i for i, token in enumerate(vocabulary)}
    missing = [t for t in SPECIALS if t not in index]
    if missing:
        raise DsnnError(f"the Whisper vocabulary lacks the special tokens {missing}", "copy the model's vocabulary")
    return {t: index[t] for t in SPECIALS}


def layout(dims: Mapping[str, int]) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """CTranslate2 name -> (shape, HF names of its row blocks): one name for a 1:1 tensor, q/k/v (or k/v) for fused
    attention projections, ``""`` for the key bias HF does not have (CTranslate2 stores zeros)."""
    d, out = dims["d_model"], {}

    def lin(ct2: str, hf: str, n_out: int, n_in: int) -> None:
        out[f"{ct2}/weight"], out[f"{ct2}/bias"] = ((n_out, n_in), (f"{hf}.weight",)), ((n_out,), (f"{hf}.bias",))

    def norm(ct2: str, hf: str) -> None:
        out[f"{ct2}/gamma"], out[f"{ct2}/beta"] = ((d,), (f"{hf}.weight",)), ((d,), (f"{hf}.bias",))

    def fused(ct2: str, hf: str, parts: str) -> None:
        out[f"{ct2}/weight"] = ((len(parts) * d, d), tuple(f"{hf}.{p}_proj.weight" for p in parts))
        out[f"{ct2}/bias"] = ((len(parts) * d,), tuple("" if p == "k" else f"{hf}.{p}_proj.bias" for p in parts))

    for i, n_in in ((1, dims["num_mel_bins"]), (2, d)):
        out[f"encoder/conv{i}/weight"] = ((d, n_in, 3), (f"model.encoder.conv{i}.weight",))
        out[f"encoder/conv{i}/bias"] = ((d,), (f"model.encoder.conv{i}.bias",))
    out[TIE[1]] = ((dims["vocab_size"], d), ("model.decoder.embed_tokens.weight",))
    for side, positions in (("encoder", "max_source_positions"), ("decoder", "max_target_positions")):
        out[f"{side}/position_encodings/encodings"] = ((dims[positions], d), (f"model.{side}.embed_positions.weight",))
        norm(f"{side}/layer_norm", f"model.{side}.layer_norm")
        ffn = dims[f"{side}_ffn_dim"]
        for i in range(dims[f"{side}_layers"]):
            c, h = f"{side}/layer_{i}", f"model.{side}.layers.{i}"
            fused(f"{c}/self_attention/linear_0", f"{h}.self_attn", "qkv")
            lin(f"{c}/self_attention/linear_1", f"{h}.self_attn.out_proj", d, d)
            norm(f"{c}/self_attention/layer_norm", f"{h}.self_attn_layer_norm")
            if side == "decoder":
                lin(f"{c}/attention/linear_0", f"{h}.encoder_attn.q_proj", d, d)
                fused(f"{c}/attention/linear_1", f"{h}.encoder_attn", "kv")
                lin(f"{c}/attention/linear_2", f"{h}.encoder_attn.out_proj", d, d)
                norm(f"{c}/attention/layer_norm", f"{h}.encoder_attn_layer_norm")
            lin(f"{c}/ffn/linear_0", f"{h}.fc1", ffn, d)
            lin(f"{c}/ffn/linear_1", f"{h}.fc2", d, ffn)
            norm(f"{c}/ffn/layer_norm", f"{h}.final_layer_norm")
    return out


def _rows(tensor: torch.Tensor | None) -> int:
    return int(tensor.shape[0]) if tensor is not None and tensor.dim() else 0


def ct2_to_hf(variables: Mapping[str, torch.Tensor], aliases: Mapping[str, str]
              ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """HF state dict (``proj_out.weight`` left out: it is tied) and the model's dimensions."""
    variables = {**variables, **{alias: variables[target].clone() for alias, target in aliases.items()}}
    if TIE[0] in variables and not torch.equal(variables[TIE[0]], variables.get(TIE[1], torch.empty(0))):
        raise DsnnError("the output projection is not tied to the token embedding, which HF Whisper requires", HINT)
    for name, (dtype, value) in {**SCALARS, **OPTIONAL_SCALARS, **HEADS}.items():
        got = variables.get(name)
        if got is None and name not in OPTIONAL_SCALARS:
            raise DsnnError(f"model.bin lacks the spec scalar {name}", HINT)
        if got is not None and (got.dim() or got.dtype != dtype or value not in (None, int(got))):
            raise DsnnError(f"model.bin: {name} = {got.tolist()} ({got.dtype}), expected {value} ({dtype})", HINT)
    emb, conv1 = variables.get(TIE[1]), variables.get("encoder/conv1/weight")
    if emb is None or conv1 is None or emb.dim() != 2 or conv1.dim() != 3:
        raise DsnnError(f"model.bin lacks {TIE[1]} or encoder/conv1/weight (or they are not 2-D / 3-D)", HINT)
    get = variables.get
    dims = {"vocab_size": int(emb.shape[0]), "d_model": int(emb.shape[1]), "num_mel_bins": int(conv1.shape[1]),
            "encoder_layers": _layers(variables, "encoder/"), "decoder_layers": _layers(variables, "decoder/"),
            "encoder_ffn_dim": _rows(get("encoder/layer_0/ffn/linear_0/weight")),
            "decoder_ffn_dim": _rows(get("decoder/layer_0/ffn/linear_0/weight")),
            "max_source_positions": _rows(get("encoder/position_encodings/encodings")),
            "max_target_positions": _rows(get("decoder/position_encodings/encodings")),
            "encoder_attention_heads": int(variables["encoder/num_heads"]),
            "decoder_attention_heads": int(variables["decoder/num_heads"])}
    for side in ("encoder", "decoder"):
        if dims[f"{side}_attention_heads"] <= 0 or dims["d_model"] % dims[f"{side}_attention_heads"]:
            raise DsnnError(f"model.bin: {side}/num_heads does not divide d_model {dims['d_model']}", HINT)
    out: dict[str, torch.Tensor] = {}
    table = layout(dims)
    for name, (shape, hf_names) in table.items():
        if name not in variables:
            raise DsnnError(f"model.bin lacks the variable {name}", HINT)
        tensor = variables[name]
        if tuple(tensor.shape) != shape:
            raise DsnnError(f"model.bin: {name} has shape {list(tensor.shape)}, expected {list(shape)}", HINT)
        if tensor.dtype not in FLOAT_DTYPES.values():
            raise DsnnError(f"model.bin: {name} is {tensor.dtype} (quantized models are not supported)", HINT)
        blocks = tensor.chunk(len(hf_names)) if len(hf_names) > 1 else (tensor,)
        out.update({hf: block.clone() if len(hf_names) > 1 else block for hf, block in zip(hf_names, blocks) if hf})
    unused = sorted(set(variables) - set(table) - {*SCALARS, *OPTIONAL_SCALARS, *HEADS, TIE[0]})
    if unused:
        raise DsnnError(f"model.bin has variables a Whisper model does not use: {unused[:4]}", HINT)
    return out, dims


def hf_text_files(dims: Mapping[str, int], config: Mapping[str, Any], vocabulary: list[str], tokenizer: str
                  ) -> dict[str, str]:
    """The Hugging Face text files (config, generation config, feature extractor, tokenizer) of a CT2 model."""
    missing = [k for k in CT2_CONFIG_KEYS if k not in config]
    if missing or len(vocabulary) != dims["vocab_size"]:
        raise DsnnError(f"config.json lacks {missing}" if missing else f"the vocabulary has {len(vocabulary)} tokens, "
                        f"the embedding {dims['vocab_size']}", "copy the complete model directory")
    ids = _special_ids(vocabulary)
    eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    tokens = {"pad_token_id": eot, "bos_token_id": sot, "eos_token_id": eot, "decoder_start_token_id": sot}
    model = {"architectures": ["WhisperForConditionalGeneration"], "model_type": "whisper", **dims, **tokens,
             "activation_function": "gelu", "scale_embedding": False, "tie_word_embeddings": True}
    multilingual = dims["vocab_size"] >= 51865  # ctranslate2's own rule
    generation = {**tokens, "max_length": dims["max_target_positions"], "is_multilingual": multilingual,
                  "no_timestamps_token_id": ids["<|notimestamps|>"], "prev_sot_token_id": ids["<|startofprev|>"],
                  "max_initial_timestamp_index": 50, "return_timestamps": False,
                  "suppress_tokens": list(config["suppress_ids"]),
                  "begin_suppress_tokens": list(config["suppress_ids_begin"]),
                  "alignment_heads": [list(h) for h in config["alignment_heads"]]}
    if multilingual:
        generation["lang_to_id"] = {vocabulary[i]: i for i in range(sot + 1, ids["<|translate|>"])}
        generation["task_to_id"] = {"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]}
    features = {"feature_extractor_type": "WhisperFeatureExtractor", "feature_size": dims["num_mel_bins"],
                "sampling_rate": 16000, "hop_length": 160, "chunk_length": 30, "n_fft": 400, "padding_value": 0.0,
                "padding_side": "right", "return_attention_mask": False, "processor_class": "WhisperProcessor"}
    special = {k: "<|endoftext|>" for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    tokenizer_config = {"tokenizer_class": "WhisperTokenizer", **special, "model_max_length": 1024,
                        "errors": "replace", "add_prefix_space": False}
    return {"config.json": _dump(model), "generation_config.json": _dump(generation),
            "preprocessor_config.json": _dump(features), "tokenizer.json": tokenizer,
            "tokenizer_config.json": _dump(tokenizer_config)}


def read_ct2_directory(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(hf_state_dict, text_files)`` of a faster-whisper / CTranslate2 Whisper model directory."""
    directory = Path(path)
    for name in ("model.bin", "config.json", "tokenizer.json"):
        if not (directory / name).is_file():
            raise DsnnError(f"the CTranslate2 directory {directory} has no {name}",
                            "copy the complete faster-whisper model directory (tokenizer.json included)")
    variables, aliases = read_model_bin(directory / "model.bin")
    state, dims = ct2_to_hf(variables, aliases)
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DsnnError(f"{directory / 'config.json'} is not valid JSON ({exc})", "copy the file again") from exc
    if not isinstance(config, dict):
        raise DsnnError(f"{directory / 'config.json'} is not a JSON object", "copy the file again")
    tokenizer = (directory / "tokenizer.json").read_text(encoding="utf-8")
    return state, hf_text_files(dims, config, read_vocabulary(directory), tokenizer)


# ----------------------------------------------------------------------------------------------------- HF -> CT2


def _json_file(files: Mapping[str, str], name: str) -> dict[str, Any]:
    try:
        data = json.loads(files[name]) if name in files else {}
    except json.JSONDecodeError as exc:
        raise DsnnError(f"{name} of the Whisper model is not valid JSON ({exc})", "re-create the model") from exc
    return data if isinstance(data, dict) else {}


def hf_to_ct2(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]
              ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """CTranslate2 variables and aliases of an HF Whisper state dict (q/k/v fused with a zero key bias)."""
    emb, conv1 = state.get("model.decoder.embed_tokens.weight"), state.get("model.encoder.conv1.weight")
    if emb is None or conv1 is None:
        raise DsnnError("the state dict lacks the Whisper token embedding or first convolution", "export Whisper")
    if "proj_out.weight" in state and not torch.equal(state["proj_out.weight"], emb):
        raise DsnnError("proj_out.weight differs from the token embedding: untied Whisper models are not supported",
                        "tie the output projection to the embedding")
    get = state.get
    dims = {"vocab_size": int(emb.shape[0]), "d_model": int(emb.shape[1]), "num_mel_bins": int(conv1.shape[1]),
            "encoder_layers": _layers(state, "model.encoder."), "decoder_layers": _layers(state, "model.decoder."),
            "encoder_ffn_dim": _rows(get("model.encoder.layers.0.fc1.weight")),
            "decoder_ffn_dim": _rows(get("model.decoder.layers.0.fc1.weight")),
            "max_source_positions": _rows(get("model.encoder.embed_positions.weight")),
            "max_target_positions": _rows(get("model.decoder.embed_positions.weight"))}
    variables: dict[str, torch.Tensor] = {}
    for side in ("encoder", "decoder"):
        heads = int(config.get(f"{side}_attention_heads", 0))
        if heads <= 0 or dims["d_model"] % heads or dims[f"{side}_layers"] != config.get(f"{side}_layers"):
            raise DsnnError(f"config.json does not match the state dict ({side} layers or attention heads)",
                            "export a consistent Whisper model")
        variables[f"{side}/num_heads"] = torch.tensor(heads, dtype=torch.int16)
    table = layout(dims)
    used = {"proj_out.weight"}
    for name, (shape, hf_names) in table.items():
        missing = [hf for hf in hf_names if hf and hf not in state]
        if missing:
            raise DsnnError(f"the Whisper state dict lacks {missing[0]}", "export a complete Whisper model")
        blocks = [state[hf] if hf else torch.zeros(dims["d_model"], dtype=state[hf_names[-1]].dtype)
                  for hf in hf_names]
        used.update(hf_names)
        variables[name] = torch.cat(blocks) if len(blocks) > 1 else blocks[0]
        if tuple(variables[name].shape) != shape:
            raise DsnnError(f"{hf_names[-1]} has shape {list(blocks[-1].shape)}, which does not fit {name} "
                            f"{list(shape)}", "export a consistent Whisper model")
    unused = sorted(set(state) - used)
    if unused:
        raise DsnnError(f"the Whisper state dict has tensors CTranslate2 cannot hold: {unused[:4]}", "export Whisper")
    variables.update({name: torch.tensor(value, dtype=dtype) for name, (dtype, value) in SCALARS.items()})
    return variables, {TIE[0]: TIE[1]}


def ct2_config(files: Mapping[str, str], vocabulary: list[str], decoder_layers: int, heads: int) -> dict[str, Any]:
    """CTranslate2's ``config.json`` from the HF generation config (as ctranslate2's WhisperLoader derives it)."""
    generation, model = _json_file(files, "generation_config.json"), _json_file(files, "config.json")
    lang = generation.get("lang_to_id")
    ids = _special_ids(vocabulary)
    lang_ids = sorted(lang.values()) if lang else list(range(ids["<|startoftranscript|>"] + 1, ids["<|translate|>"]))
    alignment = generation.get("alignment_heads") or [[layer, head] for layer in range(decoder_layers // 2,
                                                                                       decoder_layers)
                                                      for head in range(heads)]
    suppress = {}
    for key in ("suppress_tokens", "begin_suppress_tokens"):
        value = generation.get(key) or model.get(key)
        if not value:  # an empty list would silently change decoding
            raise DsnnError(f"the Whisper model's generation config has no {key}", "export a complete Whisper model")
        suppress[key] = [int(x) for x in value]
    return {"alignment_heads": [list(h) for h in alignment], "lang_ids": lang_ids,
            "suppress_ids": suppress["suppress_tokens"], "suppress_ids_begin": suppress["begin_suppress_tokens"]}


def ct2_vocabulary(tokenizer_json: str, vocab_size: int) -> list[str]:
    """BPE tokens and added tokens by id, then ``<|0.00|>``... timestamp tokens up to ``vocab_size``."""
    data = json.loads(tokenizer_json)
    by_id = {int(i): t for t, i in data.get("model", {}).get("vocab", {}).items()}
    for token in data.get("added_tokens", []):
        by_id.setdefault(int(token["id"]), token["content"])
    if sorted(by_id) != list(range(len(by_id))) or len(by_id) > vocab_size:
        raise DsnnError(f"tokenizer.json ids are not 0..N-1 with N <= {vocab_size}", "export a Whisper tokenizer")
    return [by_id[i] for i in range(len(by_id))] + [f"<|{i * 0.02:.2f}|>" for i in range(vocab_size - len(by_id))]


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
    state = {k: v.detach().cpu() for k, v in hf_state_dict.items()}
    variables, aliases = hf_to_ct2(state, config)
    seen: dict[tuple[Any, ...], str] = {}
    for name in sorted(variables):  # alias duplicates to the first copy by name (ModelSpec._alias_variables)
        tensor = variables[name].contiguous()
        if not tensor.dim():
            continue
        if tensor.dtype not in FLOAT_DTYPES.values():
            raise DsnnError(f"{name} has dtype {tensor.dtype}", "export floating-point weights")
        tensor = variables[name] = tensor.to(FLOAT_DTYPES[dtype]) if dtype else tensor
        raw = (tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor).numpy().tobytes()
        key = (tensor.dtype, tuple(tensor.shape), hashlib.sha1(raw).hexdigest())
        if key in seen and torch.equal(variables[seen[key]], tensor):
            aliases[name] = seen[key]
        else:
            seen.setdefault(key, name)
    for alias in aliases:
        variables.pop(alias, None)
    vocab_size = int(state["model.decoder.embed_tokens.weight"].shape[0])
    vocabulary = ct2_vocabulary(text_files["tokenizer.json"], vocab_size)
    layers, heads = _layers(state, "model.decoder."), int(variables["decoder/num_heads"])
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    write_model_bin(out / "model.bin", variables, aliases)
    (out / "config.json").write_text(_dump(ct2_config(text_files, vocabulary, layers, heads)), encoding="utf-8")
    (out / "vocabulary.txt").write_text("".join(t + "\n" for t in vocabulary), encoding="utf-8")
    (out / "tokenizer.json").write_text(text_files["tokenizer.json"], encoding="utf-8")
    return out
