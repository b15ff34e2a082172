"""The ``hf-ctc`` adapter: a live Hugging Face ``*ForCTC`` model behind the :class:`ModelAdapter` protocol.

:class:`HFCTCAdapter` wraps an already built model with its feature extractor and tokenizer (built by
:mod:`.family`) and implements what dsnn needs: input preparation (the feature extractor's normalisation, padded to
the feature encoder's receptive field), the attention-mask convention (only for layer-norm feature encoders),
the model's own CTC loss with ``zero_infinity`` and ``mean`` reduction applied only while computing it, transcript
encoding into the vocabulary's case and greedy CTC decoding through the tokenizer, the default prunable weights
(the encoder layers' attention and feed-forward Linears, found structurally) and the self-contained metadata.
:func:`rename_hooks` keeps the source's weight-norm tensor names in ``state_dict`` / ``load_state_dict``. Nothing
here imports ``transformers`` (the model and its helpers are handed in) or prints anything.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...data.batch import Batch
from ...data.text import get_normalizer
from ...errors import DsnnError
from ..base import model_device
from ..ctc import greedy_ctc_decode
from .metadata import BAD_META_HINT, FAMILY

PRUNABLE_LINEARS = (
    "attention.q_proj",
    "attention.k_proj",
    "attention.v_proj",
    "attention.out_proj",
    "feed_forward.intermediate_dense",
    "feed_forward.output_dense",
)
"""Linear layers of each transformer encoder layer pruned by default (relative to the layer)."""


def rename_hooks(model: nn.Module, native_to_source: Mapping[str, str]) -> None:
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
    """:class:`~dsnn_compress.models.base.ModelAdapter` around a Hugging Face ``*ForCTC`` model.

    Public attributes: ``model``, ``architecture``, ``hf_files`` (the directory's text files, verbatim),
    ``feature_extractor``, ``tokenizer``, ``normalizer`` (name of the text normaliser references and hypotheses go
    through, as the protocol requires), ``weight_norm`` (the source's weight-norm tensor spelling), ``ffn_dims``
    (per-layer FFN sizes of a structured level, ``docs/structured.md``), ``family``,
    ``use_attention_mask`` and ``blank_id`` (the CTC blank, ``pad_token_id``).
    """

    model: nn.Module
    architecture: str
    hf_files: dict[str, str]
    feature_extractor: Any
    tokenizer: Any
    normalizer: str = "default"
    decoding: str = "greedy-ctc"
    capped_decodes: int = 0
    """Always 0: greedy CTC decoding has no length bound to hit."""
    weight_norm: str | None = None
    ffn_dims: list[int] | None = None
    """Per-layer FFN sizes of a structured level's smaller model when they differ (else None: the config's)."""
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
            raise DsnnError(f"the {self.architecture} config has no pad_token_id (the CTC blank)", BAD_META_HINT)
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
        device = model_device(self.model)
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
        meta = {
            "family": self.family,
            "architecture": self.architecture,
            "hf_files": dict(self.hf_files),
            "normalizer": self.normalizer,
            "sample_rate": self.sample_rate,
            "weight_norm": self.weight_norm,
        }
        if self.ffn_dims is not None:
            meta["ffn_dims"] = list(self.ffn_dims)
        return meta
