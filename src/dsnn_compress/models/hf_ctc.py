"""The ``hf-ctc`` family: Hugging Face ``Wav2Vec2ForCTC`` and siblings sharing its CTC head API.

Supported architectures (chosen from ``config.json``: ``architectures``, else ``model_type`` when the weights hold
an ``lm_head``): ``Wav2Vec2ForCTC``, ``HubertForCTC``, ``WavLMForCTC``, ``Data2VecAudioForCTC``.

Everything the adapter needs is rebuilt from the small text files of the ``save_pretrained`` directory
(``config.json``, the feature extractor's ``preprocessor_config.json`` or ``processor_config.json``, the tokenizer's
``vocab.json`` / ``tokenizer_config.json`` / ``special_tokens_map.json`` / ``added_tokens.json``), which
:meth:`HFCTCAdapter.metadata` carries verbatim, so a bundle rebuilds the model with no other file and without the
network. ``transformers`` is optional: it is imported only when a model is built, and its absence is reported as a
:class:`DsnnError` telling how to install it. Importing this module does not import ``transformers``.

Conventions (see ``docs/huggingface.md``):

* input: the feature extractor's normalisation (``do_normalize``) of the raw waveform, zero-padded along time;
* attention mask: models whose feature encoder uses layer norm (``feat_extract_norm == "layer"``; Data2VecAudio
  always) get an ``attention_mask`` built from the input lengths; group-norm models get none, as in their training;
* loss: the model's own CTC loss on ``labels`` padded with -100, with ``ctc_zero_infinity=True`` and
  ``ctc_loss_reduction="mean"`` while the loss is computed (the stored config is left untouched);
* text: the normalised transcript is mapped to the vocabulary's case, spaces to the word delimiter (``|``);
  decoding is greedy CTC (blank = ``pad_token_id``) through the tokenizer, returned lower-cased when the
  normaliser lower-cases;
* weights: tensors keep the names ``save_pretrained`` wrote, including the legacy weight-norm names
  (``weight_g`` / ``weight_v``) of the positional convolution, mapped to and from whatever the installed
  torch/transformers use, so strict loading works and exports write the source's names;
* the convolutional feature encoder is frozen (``freeze_feature_encoder``), as Hugging Face CTC fine-tuning does.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.batch import Batch
from ..data.text import get_normalizer
from ..errors import DsnnError, UsageError
from .ctc import greedy_ctc_decode
from .registry import register_family

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

PRUNABLE_LINEARS = (
    "attention.q_proj",
    "attention.k_proj",
    "attention.v_proj",
    "attention.out_proj",
    "feed_forward.intermediate_dense",
    "feed_forward.output_dense",
)
"""Linear layers of each transformer encoder layer pruned by default (relative to the layer)."""

_WEIGHT_NORM_NAMES = {
    "weight_g": (".weight_g", ".weight_v"),
    "parametrizations": (".parametrizations.weight.original0", ".parametrizations.weight.original1"),
}
"""The two spellings of a weight-normed convolution's tensors: legacy ``weight_norm`` and ``parametrizations``."""

_BAD_META_HINT = "the model metadata is damaged or was written by an incompatible dsnn-compress version"


def _supported_list() -> str:
    return ", ".join(SUPPORTED_ARCHITECTURES)


def import_transformers() -> Any:
    """The ``transformers`` module, or a DsnnError telling how to install it."""
    try:
        import transformers
    except ImportError as exc:
        raise DsnnError("the hf-ctc model family (Hugging Face CTC models) needs the transformers package, "
                        "which is not installed", INSTALL_HINT) from exc
    return transformers


# ----------------------------------------------------------------------------------------------- metadata


def _parse_json(hf_files: Mapping[str, str], name: str) -> Any:
    try:
        return json.loads(hf_files[name])
    except (json.JSONDecodeError, TypeError) as exc:
        raise DsnnError(f"{name} of the Hugging Face model is not valid JSON ({exc})", _BAD_META_HINT) from exc


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


def _weight_norm_style(names: Any) -> str | None:
    """``weight_g``, ``parametrizations`` or None: how the weight-normed tensors are spelled in ``names``."""
    for style, (suffix_g, _) in _WEIGHT_NORM_NAMES.items():
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
    if "config.json" not in hf_files:
        return None
    try:
        config = json.loads(hf_files["config.json"])
    except (json.JSONDecodeError, TypeError):
        return None
    if not isinstance(config, dict):
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
    feature_config = _feature_extractor_config(kept)
    meta: dict[str, Any] = {
        "family": FAMILY,
        "architecture": architecture,
        "hf_files": kept,
        "normalizer": normalizer,
        "sample_rate": int(feature_config.get("sampling_rate", 16000)),
    }
    if tensor_names is not None:
        meta["weight_norm"] = _weight_norm_style(tensor_names)
    return meta


def _feature_extractor_config(hf_files: Mapping[str, str]) -> dict[str, Any]:
    if "preprocessor_config.json" in hf_files:
        data = _parse_json(hf_files, "preprocessor_config.json")
    elif "processor_config.json" in hf_files:
        data = _parse_json(hf_files, "processor_config.json")
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


# ----------------------------------------------------------------------------------------------- adapter


def _rename_hooks(model: nn.Module, native_to_source: Mapping[str, str]) -> None:
    """Make ``model.state_dict()`` / ``load_state_dict`` use the source's tensor names for ``native_to_source``."""
    to_source = dict(native_to_source)
    to_native = {v: k for k, v in to_source.items()}

    def on_state_dict(module: nn.Module, state: dict, prefix: str, local_metadata: Any) -> None:
        items = list(state.items())
        state.clear()
        for key, value in items:
            local = key[len(prefix):] if key.startswith(prefix) else None
            state[prefix + to_source[local] if local in to_source else key] = value

    def on_load(module: nn.Module, state: dict, prefix: str, *args: Any) -> None:
        for source_name, native_name in to_native.items():
            if prefix + source_name in state:
                state[prefix + native_name] = state.pop(prefix + source_name)

    if hasattr(model, "register_state_dict_post_hook"):
        model.register_state_dict_post_hook(on_state_dict)
    else:  # pragma: no cover - torch < 2.5
        model._register_state_dict_hook(on_state_dict)
    if hasattr(model, "register_load_state_dict_pre_hook"):
        model.register_load_state_dict_pre_hook(on_load)
    else:  # pragma: no cover - torch < 2.5
        model._register_load_state_dict_pre_hook(on_load, with_module=True)


def _min_input_samples(config: Any) -> int:
    """Samples the convolutional feature encoder needs for one output frame (its receptive field)."""
    needed = 1
    for kernel, stride in reversed(list(zip(config.conv_kernel, config.conv_stride))):
        needed = (needed - 1) * int(stride) + int(kernel)
    return needed


@dataclass
class HFCTCAdapter:
    """:class:`~dsnn_compress.models.base.ModelAdapter` around a Hugging Face ``*ForCTC`` model."""

    model: nn.Module
    architecture: str
    hf_files: dict[str, str]
    feature_extractor: Any
    tokenizer: Any
    normalizer: str = "default"
    weight_norm: str | None = None
    family: str = FAMILY
    use_attention_mask: bool = field(init=False)
    blank_id: int = field(init=False)

    def __post_init__(self) -> None:
        config = self.model.config
        norm = getattr(config, "feat_extract_norm", None)
        if norm is None:  # Data2VecAudio: layer-norm feature encoder, trained with attention masks
            norm = "layer" if self.architecture == "Data2VecAudioForCTC" else (
                "layer" if getattr(self.feature_extractor, "return_attention_mask", False) else "group")
        self.use_attention_mask = norm == "layer"
        pad = config.pad_token_id if config.pad_token_id is not None else self.tokenizer.pad_token_id
        if pad is None:
            raise DsnnError(f"the {self.architecture} config has no pad_token_id (the CTC blank)", _BAD_META_HINT)
        self.blank_id = int(pad)
        self._min_samples = _min_input_samples(config)
        vocab_size = int(config.vocab_size)
        vocab = self.tokenizer.get_vocab()
        singles = {tok: int(i) for tok, i in vocab.items() if len(tok) == 1 and 0 <= int(i) < vocab_size}
        delimiter = getattr(self.tokenizer, "word_delimiter_token", None)
        self._space_id = vocab.get(delimiter) if delimiter is not None else None
        if self._space_id is None or int(self._space_id) >= vocab_size:
            self._space_id = singles.get(" ")
        letters = [tok for tok in singles if tok.isalpha()]
        upper, lower = any(t.isupper() for t in letters), any(t.islower() for t in letters)
        if getattr(self.tokenizer, "do_lower_case", False) or (upper and not lower):
            self._case = "upper"
        elif lower and not upper:
            self._case = "lower"
        else:
            self._case = None
        singles.pop(" ", None)
        self._char_ids = {tok: i for tok, i in singles.items() if i != self.blank_id}
        self._lower_output = get_normalizer(self.normalizer)("AB") == "ab"

    @property
    def sample_rate(self) -> int:
        """The feature extractor's sampling rate (audio is resampled to it on load)."""
        return int(self.feature_extractor.sampling_rate)

    def _device(self) -> torch.device:
        param = next(self.model.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    def prepare(self, waveform: np.ndarray) -> torch.Tensor:
        """The feature extractor's input values (normalised when ``do_normalize``) of one mono waveform, 1-D.

        A waveform shorter than the feature encoder's receptive field is zero-padded to it (one output frame).
        """
        wave = np.asarray(waveform, dtype=np.float32)
        if wave.ndim != 1:
            raise DsnnError(f"expected a mono waveform (1-D array), got shape {wave.shape}",
                            "downmix the audio to mono")
        values = self.feature_extractor(wave, sampling_rate=self.sample_rate, return_tensors="np")["input_values"][0]
        values = np.asarray(values, dtype=np.float32).reshape(-1)
        if values.shape[0] < self._min_samples:
            values = np.pad(values, (0, self._min_samples - values.shape[0]))
        return torch.from_numpy(np.ascontiguousarray(values))

    def encode_text(self, text: str) -> list[int]:
        """Token ids of a normalised transcript: case mapped to the vocabulary's, spaces to the word delimiter."""
        if self._case == "upper":
            text = text.upper()
        elif self._case == "lower":
            text = text.lower()
        ids: list[int] = []
        missing: set[str] = set()
        for ch in text:
            if ch == " " and self._space_id is not None:
                ids.append(int(self._space_id))
            elif ch in self._char_ids:
                ids.append(self._char_ids[ch])
            else:
                missing.add(ch)
        if missing:
            raise DsnnError(
                f"transcript has characters outside the model's vocabulary: {' '.join(map(repr, sorted(missing)))}",
                hint="normalise the transcripts the way the model was trained, or drop those utterances",
            )
        return ids

    def output_lengths(self, input_lengths: torch.Tensor) -> torch.Tensor:
        """Frames the model outputs for inputs of ``input_lengths`` samples (its feature encoder's arithmetic)."""
        return self.model._get_feat_extract_output_lengths(input_lengths).to(torch.long).clamp(min=0)

    def _inputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        device = self._device()
        inputs = batch.inputs.to(device=device, dtype=torch.float32)
        if inputs.dim() != 2:
            raise DsnnError(f"hf-ctc models take raw waveforms [batch, samples], got shape {tuple(inputs.shape)}")
        lengths = batch.input_lengths.to(device)
        mask = None
        if self.use_attention_mask:
            mask = (torch.arange(inputs.shape[1], device=device)[None, :] < lengths[:, None]).to(torch.long)
        return inputs, mask, lengths

    def _finish(self, logits: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out_lengths = self.output_lengths(lengths).clamp(max=logits.shape[1])
        return F.log_softmax(logits.float(), dim=-1), out_lengths

    def log_probs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """CTC log-probabilities ``[B, T', V]`` and output lengths ``[B]`` (model's device)."""
        inputs, mask, lengths = self._inputs(batch)
        logits = self.model(inputs, attention_mask=mask).logits
        return self._finish(logits, lengths)

    @contextlib.contextmanager
    def _ctc_settings(self) -> Iterator[None]:
        config = self.model.config
        saved = (config.ctc_zero_infinity, config.ctc_loss_reduction)
        config.ctc_zero_infinity, config.ctc_loss_reduction = True, "mean"
        try:
            yield
        finally:
            config.ctc_zero_infinity, config.ctc_loss_reduction = saved

    def loss_and_log_probs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The model's CTC loss (labels padded with -100, zero_infinity, mean) and its log-probs/lengths."""
        inputs, mask, lengths = self._inputs(batch)
        labels = batch.targets.to(inputs.device)
        with self._ctc_settings():
            output = self.model(inputs, attention_mask=mask, labels=labels)
        log_probs, out_lengths = self._finish(output.logits, lengths)
        return output.loss, log_probs, out_lengths

    def loss(self, batch: Batch) -> torch.Tensor:
        """Mean CTC loss of the batch."""
        return self.loss_and_log_probs(batch)[0]

    def decode_ids(self, ids: list[int]) -> str:
        """Text of collapsed, blank-free token ids through the tokenizer, in the normaliser's case."""
        text = self.tokenizer.decode(ids, group_tokens=False, skip_special_tokens=True,
                                     clean_up_tokenization_spaces=False)
        text = " ".join(str(text).split())
        return text.lower() if self._lower_output else text

    def decode(self, batch: Batch) -> list[str]:
        """Greedy CTC transcripts (blank = ``pad_token_id``), one per utterance."""
        with torch.no_grad():
            log_probs, out_lengths = self.log_probs(batch)
        return [self.decode_ids(ids) for ids in greedy_ctc_decode(log_probs, out_lengths, self.blank_id)]

    def output_head(self) -> nn.Module | None:
        """The CTC output layer: ``get_output_embeddings()``, else the model's Linear outside its base model.

        (transformers 5 returns None from ``get_output_embeddings`` for speech models, so the head is then the
        projection to ``vocab_size`` that sits outside ``model.base_model``.)
        """
        head = self.model.get_output_embeddings()
        if isinstance(head, nn.Module):
            return head
        base = self.model.base_model
        inside = {id(m) for m in base.modules()} if base is not self.model else set()
        vocab_size = int(self.model.config.vocab_size)
        candidates = [m for m in self.model.modules() if isinstance(m, nn.Linear) and id(m) not in inside
                      and m.out_features == vocab_size]
        return candidates[0] if len(candidates) == 1 else None

    def default_prunable(self) -> list[str]:
        """Weights of the attention (q/k/v/out) and feed-forward (intermediate/output) Linears of every encoder layer.

        The convolutional feature encoder, the positional convolution, norms, ``masked_spec_embed`` and the output
        head (:meth:`output_head`, excluded by identity) stay dense.
        """
        head = self.output_head()
        head_params = {id(p) for p in head.parameters()} if head is not None else set()
        base = self.model.base_model
        prefix = "" if base is self.model else f"{self.model.base_model_prefix}."
        layers = getattr(getattr(base, "encoder", None), "layers", None)
        if layers is None:
            raise DsnnError(f"{self.architecture} has no encoder.layers", "this architecture is not supported")
        names = []
        for index, layer in enumerate(layers):
            for local in PRUNABLE_LINEARS:
                module = layer.get_submodule(local)
                if not isinstance(module, nn.Linear) or id(module.weight) in head_params:
                    continue
                names.append(f"{prefix}encoder.layers.{index}.{local}.weight")
        return names

    def metadata(self) -> dict[str, Any]:
        """Self-contained description: the architecture, the directory's text files, normaliser, sample rate."""
        return {
            "family": self.family,
            "architecture": self.architecture,
            "hf_files": dict(self.hf_files),
            "normalizer": self.normalizer,
            "sample_rate": self.sample_rate,
            "weight_norm": self.weight_norm,
        }


# ----------------------------------------------------------------------------------------------- construction


def _write_files(directory: Path, hf_files: Mapping[str, str], names: tuple[str, ...]) -> None:
    for name in names:
        if name in hf_files:
            (directory / name).write_text(hf_files[name], encoding="utf-8")


def _build_tokenizer(transformers: Any, hf_files: Mapping[str, str]) -> Any:
    config = _parse_json(hf_files, "tokenizer_config.json") if "tokenizer_config.json" in hf_files else {}
    kind = config.get("tokenizer_class") if isinstance(config, dict) else None
    if kind not in (None, "Wav2Vec2CTCTokenizer"):
        raise DsnnError(f"tokenizer {kind} is not supported by the hf-ctc family",
                        "models with a character-level Wav2Vec2CTCTokenizer are supported")
    with tempfile.TemporaryDirectory(prefix="dsnn-hf-tokenizer-") as tmp:
        _write_files(Path(tmp), hf_files, TOKENIZER_FILES)
        try:
            return transformers.Wav2Vec2CTCTokenizer.from_pretrained(tmp, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - transformers raises many kinds of errors for bad files
            raise DsnnError(f"cannot rebuild the model's tokenizer from vocab.json ({' '.join(str(exc).split())})",
                            _BAD_META_HINT) from exc


def _build_model(transformers: Any, architecture: str, config_data: Mapping[str, Any]) -> nn.Module:
    _, config_name = SUPPORTED_ARCHITECTURES[architecture]
    config_cls = getattr(transformers, config_name)
    model_cls = getattr(transformers, architecture)
    try:
        config = config_cls.from_dict(dict(config_data))
        model = model_cls(config)
    except Exception as exc:  # noqa: BLE001 - a config transformers cannot build
        raise DsnnError(f"cannot build {architecture} from its config.json ({' '.join(str(exc).split())[:300]})",
                        _BAD_META_HINT) from exc
    return model


def build_adapter(
    architecture: str, hf_files: Mapping[str, str], normalizer: str = "default", weight_norm: str | None = None
) -> HFCTCAdapter:
    """An adapter with a freshly built (randomly initialised) model; no file or network access."""
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise DsnnError(f"Hugging Face architecture {architecture!r} is not supported by the hf-ctc family",
                        f"supported architectures: {_supported_list()}")
    if "config.json" not in hf_files or "vocab.json" not in hf_files:
        raise DsnnError("the Hugging Face model description lacks config.json or vocab.json", _BAD_META_HINT)
    get_normalizer(normalizer)
    transformers = import_transformers()
    config_data = _parse_json(hf_files, "config.json")
    if not isinstance(config_data, dict):
        raise DsnnError("config.json of the Hugging Face model is not a JSON object", _BAD_META_HINT)
    feature_config = _feature_extractor_config(hf_files)
    try:
        feature_extractor = transformers.Wav2Vec2FeatureExtractor.from_dict(dict(feature_config))
    except Exception as exc:  # noqa: BLE001
        raise DsnnError(f"cannot rebuild the model's feature extractor ({exc})", _BAD_META_HINT) from exc
    tokenizer = _build_tokenizer(transformers, hf_files)
    model = _build_model(transformers, architecture, config_data)
    native = _weight_norm_style(model.state_dict())
    if weight_norm not in (None, *_WEIGHT_NORM_NAMES):
        raise DsnnError(f"unknown weight_norm naming {weight_norm!r} in the model metadata", _BAD_META_HINT)
    if weight_norm is not None and native is not None and weight_norm != native:
        mapping = {}
        for key in model.state_dict():
            for native_suffix, source_suffix in zip(_WEIGHT_NORM_NAMES[native], _WEIGHT_NORM_NAMES[weight_norm]):
                if key.endswith(native_suffix):
                    mapping[key] = key[: -len(native_suffix)] + source_suffix
        _rename_hooks(model, mapping)
    model.freeze_feature_encoder()
    model.eval()
    return HFCTCAdapter(model=model, architecture=architecture, hf_files=dict(hf_files),
                        feature_extractor=feature_extractor, tokenizer=tokenizer, normalizer=normalizer,
                        weight_norm=weight_norm)


def adapter_from_source(source: Any, normalizer: str = "default") -> HFCTCAdapter:
    """The adapter of a loaded Hugging Face directory (:class:`~dsnn_compress.checkpoint.SourceCheckpoint`),
    weights loaded strictly; DsnnError naming the supported architectures when it is not one of them."""
    from .registry import adapter_from_metadata

    meta = hf_metadata_from_files(source.hf_files, list(source.tensors), normalizer)
    if meta is None:
        found = "unknown"
        with contextlib.suppress(Exception):
            config = json.loads(source.hf_files["config.json"])
            found = ", ".join(config.get("architectures") or [str(config.get("model_type"))])
        raise DsnnError(f"{source.path} holds a {found} model, which the hf-ctc family does not support",
                        f"supported architectures: {_supported_list()}")
    return adapter_from_metadata(meta, source.tensors)  # type: ignore[return-value]


class HFCTCFamily:
    """Family factory of ``hf-ctc``: adapters are rebuilt from metadata (fresh models need a directory)."""

    name = FAMILY
    sizes: Mapping[str, Any] = {}

    def new(self, vocabulary: list[str], size: str | None = None, overrides: Mapping[str, Any] | None = None,
            features: Mapping[str, Any] | None = None, normalizer: str = "default") -> HFCTCAdapter:
        """Not supported: an hf-ctc model starts from a Hugging Face ``save_pretrained`` directory."""
        raise UsageError("the hf-ctc family cannot create a model from scratch",
                         "set model.init to a Hugging Face save_pretrained directory (or a bundle pruned from one)")

    def from_metadata(self, meta: Mapping[str, Any]) -> HFCTCAdapter:
        """Rebuild an adapter (random weights) from :meth:`HFCTCAdapter.metadata` output."""
        architecture = meta.get("architecture")
        hf_files = meta.get("hf_files")
        if not isinstance(architecture, str):
            raise DsnnError("hf-ctc model metadata lacks 'architecture'", _BAD_META_HINT)
        if not isinstance(hf_files, dict) or not all(isinstance(v, str) for v in hf_files.values()):
            raise DsnnError("hf-ctc model metadata lacks the 'hf_files' texts", _BAD_META_HINT)
        normalizer = meta.get("normalizer", "default")
        if not isinstance(normalizer, str):
            raise DsnnError("hf-ctc model metadata has a non-string 'normalizer'", _BAD_META_HINT)
        try:
            get_normalizer(normalizer)
        except UsageError as exc:
            raise DsnnError(f"hf-ctc model metadata is invalid: {exc.message}", _BAD_META_HINT) from exc
        adapter = build_adapter(architecture, hf_files, normalizer, meta.get("weight_norm"))
        if "sample_rate" in meta and meta["sample_rate"] != adapter.sample_rate:
            raise DsnnError(f"hf-ctc model metadata sample_rate {meta['sample_rate']} differs from its feature "
                            f"extractor's {adapter.sample_rate}", _BAD_META_HINT)
        return adapter


HF_CTC = HFCTCFamily()
register_family(FAMILY, HF_CTC)


# ----------------------------------------------------------------------------------------------- export


def save_hf_directory(adapter: HFCTCAdapter, output: str | os.PathLike, level: float | None = None) -> Path:
    """Write ``adapter`` as a complete ``save_pretrained`` directory, atomically.

    The directory is built beside ``output`` and renamed into place; an existing ``output`` (file or directory) is
    replaced only after the new one is complete. Holds ``config.json`` and the weights from ``save_pretrained``
    (tensor names as in the source), the source's tokenizer and feature-extractor files verbatim, and a
    ``preprocessor_config.json`` written from the feature extractor when the source had only a processor file.
    """
    import shutil

    out = Path(output)
    parent = out.parent if str(out.parent) else Path(".")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
    hf_logging = import_transformers().utils.logging
    bars = hf_logging.is_progress_bar_enabled()
    try:
        state = {k: v.detach().to("cpu").contiguous() for k, v in adapter.model.state_dict().items()}
        hf_logging.disable_progress_bar()  # our CLI shows its own progress
        try:
            adapter.model.save_pretrained(str(tmp), state_dict=state)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        _write_files(tmp, adapter.hf_files, TOKENIZER_FILES + FEATURE_EXTRACTOR_FILES)
        if not (tmp / "preprocessor_config.json").exists():
            adapter.feature_extractor.save_pretrained(str(tmp))
        if level is not None:
            (tmp / "dsnn_export.json").write_text(
                json.dumps({"level": level, "family": FAMILY, "architecture": adapter.architecture}, indent=2) + "\n",
                encoding="utf-8")
        old = None
        if out.exists() or out.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=parent))
            os.replace(out, old / "previous")
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DsnnError(f"cannot write {out}: {exc}", "check the output path and free space") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
