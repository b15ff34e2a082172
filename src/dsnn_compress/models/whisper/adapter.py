"""The Whisper adapter: log-mel features, teacher-forced cross-entropy, bounded greedy decoding.

Conventions (``docs/whisper.md``):

* input: the raw waveform (1-D) per utterance, so batches keep each utterance's true length; the log-mel features
  (the model's ``WhisperFeatureExtractor``, zero-padded to the encoder context as Whisper expects) are computed per
  batch. SpecAugment, which acts on features, is therefore not applied to Whisper (as for raw-waveform models).
* encoder context: 30 s (1500 positions) unless the description sets ``audio_ctx`` (whisper.cpp's name): the encoder
  then keeps only its first ``audio_ctx`` positional embeddings and takes ``2 * audio_ctx`` mel frames, which
  shortens every forward pass for short utterances. The full positional table stays in the state dict, so bundles
  and exports keep the source's tensors.
* prompt: ``<|startoftranscript|>`` (+ ``<|en|><|transcribe|>`` for multilingual models) + ``<|notimestamps|>``,
  from the generation config; targets are ``" " + text`` + ``<|endoftext|>``; the loss is the mean token
  cross-entropy of the text and end tokens (prompt positions are not scored);
* decoding: ``model.generate`` (greedy, KV cache, batched, the model's suppress-token rules), with the new tokens
  bounded by the audio length (:data:`TOKENS_PER_SECOND`, :data:`TOKENS_BASE`): past the bound a damaged model
  loops ("I I I ..."), and such decodes are cut at the bound and counted in :attr:`WhisperAdapter.capped_decodes`.
* the token embedding is tied to ``proj_out``; the state dict leaves ``proj_out.weight`` out, as ``save_pretrained``
  does, and loading fills it from the embedding.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...data.batch import Batch, pad_batch
from ...errors import DsnnError
from ..base import model_device
from .metadata import FAMILY

TOKENS_PER_SECOND = 10.0
"""New-token allowance per second of audio (fast English speech is about 5 BPE tokens per second)."""
TOKENS_BASE = 10
"""New-token allowance every utterance gets on top of :data:`TOKENS_PER_SECOND`."""
PRUNABLE_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2")
"""Linear layers of every encoder and decoder layer pruned by default (decoder layers add ``encoder_attn.*``)."""
CROSS_ATTENTION = ("encoder_attn.q_proj", "encoder_attn.k_proj", "encoder_attn.v_proj", "encoder_attn.out_proj")
POSITIONS = "model.encoder.embed_positions.weight"
TIED = ("proj_out.weight", "model.decoder.embed_tokens.weight")


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' per-call notices (``max_new_tokens`` vs the config's ``max_length``) while generating."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def token_bound(seconds: float) -> int:
    """The most new tokens a decode of ``seconds`` of audio may produce."""
    return TOKENS_BASE + math.ceil(TOKENS_PER_SECOND * max(0.0, seconds))


CHUNK_SEARCH_SECONDS = 5.0
"""Long-form decoding cuts a chunk at the quietest 20 ms of the last this many seconds of the encoder context."""


def long_form_chunks(wave: np.ndarray, max_samples: int, sample_rate: int,
                     search_seconds: float = CHUNK_SEARCH_SECONDS) -> list[tuple[int, int]]:
    """``(start, stop)`` sample spans that cover ``wave`` with at most ``max_samples`` each, every cut placed at the
    lowest-energy 20 ms frame of the last ``search_seconds`` before the limit (a pause, so no word is split when the
    speaker pauses at all). A wave that fits is one span."""
    frame = max(1, sample_rate // 50)
    spans, start, total = [], 0, int(wave.shape[0])
    while total - start > max_samples:
        limit = start + max_samples
        low = max(start + frame, limit - int(search_seconds * sample_rate))
        region = np.asarray(wave[low:limit], dtype=np.float64)
        count = region.shape[0] // frame
        if count == 0:
            cut = limit
        else:
            energy = (region[: count * frame].reshape(count, frame) ** 2).mean(axis=1)
            quietest = int(np.argmin(energy[::-1]))  # the latest of equally quiet frames: longer chunks
            cut = low + (count - 1 - quietest) * frame + frame // 2
        spans.append((start, cut))
        start = cut
    spans.append((start, total))
    return spans


def install_state_hooks(model: nn.Module, audio_ctx: int | None) -> None:
    """Keep the state dict in the source's layout while the model runs with a shortened encoder context.

    * ``proj_out.weight`` is tied to the token embedding: the state dict leaves it out (as ``save_pretrained``
      does) and loading fills it from the embedding;
    * with ``audio_ctx``, the first load shrinks the encoder's positional table to its first ``audio_ctx`` rows
      (and ``config.max_source_positions`` to match); the full table is kept aside and is what the state dict
      shows, and later loads take their first rows.
    """
    full: list[torch.Tensor | None] = [None]

    def on_state_dict(module: nn.Module, state: dict, prefix: str, local_metadata: Any) -> None:
        state.pop(prefix + TIED[0], None)
        if full[0] is not None and prefix + POSITIONS in state:
            state[prefix + POSITIONS] = full[0]

    def before_load(module: nn.Module, state: dict, prefix: str, *args: Any) -> None:
        if prefix + TIED[0] not in state and prefix + TIED[1] in state:
            state[prefix + TIED[0]] = state[prefix + TIED[1]]
        key = prefix + POSITIONS
        rows = model.model.encoder.embed_positions.num_embeddings
        if full[0] is not None and key in state and state[key].shape[0] > rows:
            full[0] = state[key].detach().clone()
            state[key] = state[key][:rows]

    def after_load(module: nn.Module, incompatible: Any) -> None:
        encoder = model.model.encoder
        if audio_ctx is None or full[0] is not None or encoder.embed_positions.num_embeddings <= audio_ctx:
            return
        table = encoder.embed_positions.weight.detach()
        full[0] = table.clone()
        encoder.embed_positions = nn.Embedding.from_pretrained(table[:audio_ctx].clone(), freeze=True)
        model.config.max_source_positions = audio_ctx

    model.register_state_dict_post_hook(on_state_dict)
    model.register_load_state_dict_pre_hook(before_load)
    model.register_load_state_dict_post_hook(after_load)


@dataclass
class WhisperAdapter:
    """:class:`~dsnn_compress.models.base.ModelAdapter` around ``transformers.WhisperForConditionalGeneration``."""

    model: nn.Module
    hf_files: dict[str, str]
    feature_extractor: Any
    tokenizer: Any
    generation_config: Any
    prompt: list[int]
    eot: int
    normalizer: str = "default"
    audio_ctx: int | None = None
    multilingual: bool = False
    ffn_dims: dict[str, list[int]] | None = None
    """Per-layer FFN sizes of a structured level's smaller model, for a side whose layers differ (``.structure``)."""
    family: str = FAMILY
    decoding: str = "greedy-seq2seq"
    capped_decodes: int = 0
    """Decodes cut at the token bound since the counter was last reset (evaluation reports it per level)."""
    long_form: bool = False
    """Inference: accept audio longer than the encoder context and decode it in chunks (training refuses it)."""
    depth_views: Any = field(default=None, repr=False)
    """Depth levels on views (:class:`~.depth.DepthViews`, made on first use)."""
    chunks_decoded: int = 0
    """Chunks decoded for utterances longer than the context since the counter was last reset (long-form)."""
    _features: tuple[tuple[torch.Tensor, int], torch.Tensor] | None = field(default=None, init=False, repr=False)

    @property
    def sample_rate(self) -> int:
        """The feature extractor's sampling rate (16 kHz)."""
        return int(self.feature_extractor.sampling_rate)

    @property
    def context_samples(self) -> int:
        """Audio samples the encoder context covers (30 s, or ``audio_ctx`` positions * 20 ms)."""
        positions = self.audio_ctx or int(self.model.config.max_source_positions)
        return 2 * positions * int(self.feature_extractor.hop_length)

    @property
    def context_seconds(self) -> float:
        """The encoder context in seconds."""
        return self.context_samples / self.sample_rate

    def _device(self) -> torch.device:
        return model_device(self.model)

    def prepare(self, waveform: np.ndarray) -> torch.Tensor:
        """The mono waveform itself (features are computed per batch); DsnnError when it exceeds the context."""
        wave = np.asarray(waveform, dtype=np.float32)
        if wave.ndim != 1:
            raise DsnnError(f"expected a mono waveform (1-D array), got shape {wave.shape}",
                            "downmix the audio to mono")
        if wave.shape[0] > self.context_samples and not self.long_form:
            raise DsnnError(f"audio of {wave.shape[0] / self.sample_rate:.1f} s is longer than the encoder context "
                            f"({self.context_seconds:g} s)",
                            "split long recordings into utterances, or use a longer model.audio_ctx (1500 = 30 s)")
        return torch.from_numpy(np.ascontiguousarray(wave))

    def encode_text(self, text: str) -> list[int]:
        """Token ids of ``" " + text`` (no prompt, no end token); DsnnError when the decoder cannot hold it."""
        ids = list(self.tokenizer.encode(" " + text, add_special_tokens=False))
        room = int(self.model.config.max_target_positions) - len(self.prompt) - 1
        if len(ids) > room:
            raise DsnnError(f"the transcript is {len(ids)} tokens, more than the decoder's {room}",
                            "split the utterance")
        return ids

    def features(self, batch: Batch) -> torch.Tensor:
        """Log-mel features ``[B, n_mels, 2 * positions]`` of the batch's waveforms (each at its true length).

        A training step runs the same batch at every level: the features of the last batch are kept and reused.
        """
        key = (batch.inputs, self.context_samples)
        if self._features is not None and self._features[0][0] is key[0] and self._features[0][1] == key[1]:
            return self._features[1]
        waves = [batch.inputs[i, : int(batch.input_lengths[i])].cpu().numpy() for i in range(len(batch))]
        feats = self.feature_extractor(waves, sampling_rate=self.sample_rate, return_tensors="np",
                                       padding="max_length", max_length=self.context_samples)["input_features"]
        out = torch.from_numpy(np.asarray(feats, dtype=np.float32)).to(self._device())
        self._features = (key, out)
        return out

    def _teacher_forcing(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decoder inputs (prompt + text, padded with the end token), labels (-100 on prompt and padding), lengths."""
        rows, labels = [], []
        for i in range(len(batch)):
            text = batch.targets[i, : int(batch.target_lengths[i])].tolist()
            sequence = [*self.prompt, *text, self.eot]
            rows.append(sequence[:-1])
            labels.append([-100] * (len(self.prompt) - 1) + sequence[len(self.prompt):])
        width = max(len(r) for r in rows)
        device = self._device()
        inputs = torch.full((len(rows), width), self.eot, dtype=torch.long)
        targets = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, (row, label) in enumerate(zip(rows, labels, strict=True)):
            inputs[i, : len(row)] = torch.tensor(row)
            targets[i, : len(label)] = torch.tensor(label)
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        return inputs.to(device), targets.to(device), lengths.to(device)

    def loss_and_log_probs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean token cross-entropy (teacher forcing) with the decoder's log-probabilities ``[B, L, V]``, lengths."""
        inputs, labels, lengths = self._teacher_forcing(batch)
        logits = self.model(input_features=self.features(batch), decoder_input_ids=inputs).logits.float()
        loss = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100)
        return loss, F.log_softmax(logits, dim=-1), lengths

    def loss(self, batch: Batch) -> torch.Tensor:
        """Mean token cross-entropy of the batch."""
        return self.loss_and_log_probs(batch)[0]

    def log_probs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced decoder log-probabilities ``[B, L, V]`` and lengths."""
        return self.loss_and_log_probs(batch)[1:]

    def generate_kwargs(self) -> dict[str, Any]:
        """What ``model.generate`` needs for English transcription without timestamps."""
        kwargs: dict[str, Any] = {"generation_config": self.generation_config, "return_timestamps": False,
                                  "num_beams": 1, "do_sample": False}
        if self.multilingual:
            kwargs.update(language="en", task="transcribe")
        return kwargs

    def greedy_tokens(self, batch: Batch) -> list[list[int]]:
        """Greedy token ids of each utterance (no prompt, no end token), new tokens bounded by its length; decodes
        cut at the bound are counted in :attr:`capped_decodes` (the teacher's pseudo-labels and calibration
        targets: what :meth:`decode` turns into text)."""
        seconds = [int(n) / self.sample_rate for n in batch.input_lengths]
        bounds = [token_bound(s) for s in seconds]
        room = int(self.model.config.max_target_positions) - len(self.prompt)
        with torch.no_grad(), quiet_transformers():
            out = self.model.generate(input_features=self.features(batch), max_new_tokens=min(room, max(bounds)),
                                      **self.generate_kwargs())
        # transformers' Whisper generate drops each row's end token and pads the rows (pad_token_id, usually the end
        # token), so a row ends at its first end or pad token; a row that filled its own bound is capped (as if it
        # had been decoded alone with max_new_tokens=bound), whatever longer rows in the batch let generate go on
        stops = {self.eot, self.generation_config.pad_token_id} - {None}
        rows = []
        for row, bound in zip(out.tolist(), bounds, strict=True):
            new = row[len(self.prompt):] if row[: len(self.prompt)] == self.prompt else row
            tokens = next((new[:i] for i, token in enumerate(new) if token in stops), new)
            if len(tokens) >= bound:
                self.capped_decodes += 1
                tokens = tokens[:bound]
            rows.append([int(t) for t in tokens])
        return rows

    def text_of(self, tokens: list[int]) -> str:
        """The transcript of decoded token ids (special tokens dropped)."""
        return str(self.tokenizer.decode(tokens, skip_special_tokens=True)).strip()

    def decode(self, batch: Batch) -> list[str]:
        """Greedy transcripts, new tokens bounded by each utterance's length (cut decodes are counted).

        With :attr:`long_form`, an utterance longer than the encoder context is decoded in chunks cut at quiet
        points (:func:`long_form_chunks`) and its transcript is the chunks' joined; :attr:`chunks_decoded`
        counts the chunks of such utterances.
        """
        lengths = [int(n) for n in batch.input_lengths]
        if not any(n > self.context_samples for n in lengths):
            return [self.text_of(tokens) for tokens in self.greedy_tokens(batch)]
        pieces: list[torch.Tensor] = []
        owner: list[int] = []
        for i, length in enumerate(lengths):
            wave = batch.inputs[i, :length]
            spans = long_form_chunks(wave.cpu().numpy(), self.context_samples, self.sample_rate)
            if len(spans) > 1:
                self.chunks_decoded += len(spans)
            for start, stop in spans:
                pieces.append(wave[start:stop])
                owner.append(i)
        texts: list[list[str]] = [[] for _ in lengths]
        for first in range(0, len(pieces), max(1, len(batch))):
            part = pieces[first:first + max(1, len(batch))]
            ids = [f"chunk{j}" for j in range(len(part))]
            sub = pad_batch(list(part), [[] for _ in part], ["" for _ in part], ids)
            for j, tokens in enumerate(self.greedy_tokens(sub)):
                texts[owner[first + j]].append(self.text_of(tokens))
        return [" ".join(t for t in parts if t) for parts in texts]

    def default_prunable(self) -> list[str]:
        """Encoder and decoder Linear weights: self-attention q/k/v/out, cross-attention q/k/v/out, fc1, fc2.

        The token embedding (tied to ``proj_out``), positional tables, the two input convolutions and the layer norms
        stay dense.
        """
        names = []
        for side in ("encoder", "decoder"):
            layers = getattr(self.model.model, side).layers
            locals_ = PRUNABLE_LINEARS + (CROSS_ATTENTION if side == "decoder" else ())
            names += [f"model.{side}.layers.{i}.{local}.weight" for i in range(len(layers)) for local in locals_]
        return names

    def metadata(self) -> dict[str, Any]:
        """Self-contained description: the directory's text files, normaliser, sample rate, encoder context."""
        meta = {"family": self.family, "hf_files": dict(self.hf_files), "normalizer": self.normalizer,
                "sample_rate": self.sample_rate, "audio_ctx": self.audio_ctx}
        if self.ffn_dims is not None:
            meta["ffn_dims"] = {side: list(dims) for side, dims in self.ffn_dims.items()}
        return meta
