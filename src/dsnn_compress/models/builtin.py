"""The built-in model families (``conformer-ctc``, ``lstm-ctc``): adapter and family factory."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import TypeAdapter, ValidationError
from torch import nn

from ..core.groups import GroupSpec
from ..data.batch import Batch
from ..data.features import FeatureConfig, log_mel
from ..data.text import CharTokenizer, get_normalizer
from ..errors import DsnnError, UsageError
from ..validation import Int, explain, usage_error
from .base import model_device
from .builtin_structure import (
    conformer_compact_config,
    conformer_groups,
    conformer_set_widths,
    lstm_compact_config,
    lstm_compact_refusal,
    lstm_groups,
)
from .conformer import CONFORMER_SIZES, ConformerConfig, ConformerCTC
from .ctc import greedy_ctc_decode
from .lstm import LSTM_SIZES, LSTMCTC, LSTMConfig

BLANK_ID = 0
DERIVED_CONFIG_KEYS = ("vocab_size", "input_dim")
"""Config fields set from the vocabulary (``vocab_size``) and the features (``input_dim`` = ``n_mels``)."""


@dataclass
class BuiltinAdapter:
    """:class:`~dsnn_compress.models.base.ModelAdapter` for the built-in log-mel + character CTC models."""

    family: str
    model: nn.Module
    tokenizer: CharTokenizer
    features: FeatureConfig
    config: ConformerConfig | LSTMConfig
    normalizer: str = "default"
    decoding: str = "greedy-ctc"
    capped_decodes: int = 0
    """Always 0: greedy CTC decoding has no length bound to hit."""

    @property
    def sample_rate(self) -> int:
        """Sample rate the features expect (from :attr:`features`)."""
        return int(self.features.sample_rate)

    def prepare(self, waveform: np.ndarray) -> torch.Tensor:
        """Log-mel features ``[frames, n_mels]`` of one mono waveform at :attr:`sample_rate`."""
        wave = np.asarray(waveform, dtype=np.float32)
        if wave.ndim != 1:
            raise DsnnError(
                f"expected a mono waveform (1-D array), got shape {wave.shape}", "downmix the audio to mono"
            )
        return log_mel(torch.from_numpy(np.ascontiguousarray(wave)), self.features)

    def encode_text(self, text: str) -> list[int]:
        """Character ids of a normalised transcript (DsnnError on out-of-vocabulary characters)."""
        return self.tokenizer.encode(text)

    def log_probs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the model on the batch (moved to the model's device): ``[B, T', V]`` and lengths ``[B]``."""
        device = model_device(self.model)
        return self.model(batch.inputs.to(device), batch.input_lengths.to(device))

    def loss(self, batch: Batch) -> torch.Tensor:
        """Mean CTC loss (blank 0, ``zero_infinity``) of the batch."""
        return self.loss_and_log_probs(batch)[0]

    def loss_and_log_probs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean CTC loss with the log-probabilities ``[B, T', V]`` and output lengths it came from."""
        log_probs, out_lengths = self.log_probs(batch)
        device = log_probs.device
        targets = batch.targets.to(device)
        targets = targets.masked_fill(targets < 0, BLANK_ID)
        loss = F.ctc_loss(
            log_probs.transpose(0, 1).float(),
            targets,
            out_lengths,
            batch.target_lengths.to(device),
            blank=BLANK_ID,
            reduction="mean",
            zero_infinity=True,
        )
        return loss, log_probs, out_lengths

    def decode(self, batch: Batch) -> list[str]:
        """Greedy CTC transcripts, one per utterance."""
        with torch.no_grad():
            log_probs, out_lengths = self.log_probs(batch)
        return [self.tokenizer.decode(ids) for ids in greedy_ctc_decode(log_probs, out_lengths, BLANK_ID)]

    def default_prunable(self) -> list[str]:
        """Weights of Linear/Conv1d/Conv2d layers and LSTM ``weight_ih/hh`` matrices, except the CTC head."""
        return default_prunable_parameters(self.model)

    def metadata(self) -> dict[str, Any]:
        """JSON-serialisable description that rebuilds this adapter (unset optional per-layer sizes left out)."""
        return {
            "family": self.family,
            "config": {k: v for k, v in asdict(self.config).items() if v is not None},
            "vocabulary": list(self.tokenizer.vocabulary),
            "features": self.features.to_dict(),
            "normalizer": self.normalizer,
            "sample_rate": self.sample_rate,
        }


def _as_int(value: Any) -> int | None:
    """``value`` as an integer (``"8"``, ``8.0``), or None if it is not one (a boolean is not a number)."""
    try:
        return TypeAdapter(Int).validate_python(value)
    except ValidationError:
        return None


def default_prunable_parameters(model: nn.Module, exclude_modules: tuple[str, ...] = ("ctc",)) -> list[str]:
    """Names of prunable weight matrices/kernels in ``model``.

    Included: ``weight`` of ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` (at least 2-D) and the
    ``weight_ih_l*`` / ``weight_hh_l*`` matrices of ``nn.LSTM`` (``_reverse`` included). Excluded: any
    module named in ``exclude_modules`` (and its children), norms, biases and embeddings.
    """

    def excluded(name: str) -> bool:
        return any(name == ex or name.startswith(ex + ".") for ex in exclude_modules)

    names: list[str] = []
    for mod_name, module in model.named_modules():
        if excluded(mod_name):
            continue
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            if module.weight is not None and module.weight.dim() >= 2:
                names.append(prefix + "weight")
        elif isinstance(module, nn.LSTM):
            for param_name, param in module.named_parameters(recurse=False):
                if param_name.startswith(("weight_ih_l", "weight_hh_l")) and param.dim() >= 2:
                    names.append(prefix + param_name)
    return names


@dataclass(frozen=True)
class BuiltinFamily:
    """Family factory for a built-in model: builds fresh adapters and rebuilds them from metadata."""

    name: str
    config_cls: type
    model_cls: type[nn.Module]
    sizes: Mapping[str, Mapping[str, Any]]
    default_size: str = "s"
    export_formats: tuple[str, ...] = ("checkpoint", "onnx")
    """Model formats ``dsnn export`` can write for this family (besides plain state dicts)."""
    groups_fn: Callable[[nn.Module], list[GroupSpec]] | None = None
    compact_config_fn: Callable[[Any, Mapping[str, int]], Any] | None = None
    widths_fn: Callable[[nn.Module, Mapping[str, int] | None], None] | None = None
    refusal_fn: Callable[[Mapping[str, int]], str | None] | None = None

    def structured_groups(self, adapter: BuiltinAdapter) -> list[GroupSpec]:
        """The model's structured group sets (``docs/structured.md``)."""
        assert self.groups_fn is not None
        return self.groups_fn(adapter.model)

    def compact(self, adapter: BuiltinAdapter, kept: Mapping[str, int]) -> BuiltinAdapter:
        """A fresh adapter whose model has ``kept[name]`` groups in each set (weights to be loaded)."""
        refusal = self.compact_refusal(kept, "checkpoint")
        if refusal:
            raise UsageError(refusal)
        assert self.compact_config_fn is not None
        cfg = self._make_config(asdict(self.compact_config_fn(adapter.config, kept)), DsnnError,
                                "the structured sizes do not fit the model", "compact model config")
        return self._adapter(cfg, adapter.tokenizer, adapter.features, adapter.normalizer)

    def set_widths(self, adapter: BuiltinAdapter, kept: Mapping[str, int] | None) -> bool:
        """Run the first ``kept[name]`` groups of each set on views of the weights (None: all). False when the
        family cannot (its levels then switch by masks)."""
        if self.widths_fn is None:
            return False
        self.widths_fn(adapter.model, kept)
        return True

    def compact_refusal(self, kept: Mapping[str, int], fmt: str) -> str | None:
        """Why the sizes ``kept`` cannot be written as ``fmt`` (None: they can)."""
        return self.refusal_fn(kept) if self.refusal_fn else None

    def config_keys(self) -> list[str]:
        """Config fields a user may set (the derived ``vocab_size``/``input_dim`` are excluded)."""
        return [f.name for f in dataclasses.fields(self.config_cls) if f.name not in DERIVED_CONFIG_KEYS]

    def _make_config(self, values: Mapping[str, Any], error_cls: type[DsnnError], hint: str, context: str) -> Any:
        """``config_cls`` from ``values``, validated by its pydantic constraints; ``error_cls`` when invalid.

        The config classes use the field types of :mod:`dsnn_compress.validation`, so numbers given as strings
        (``"48"``, ``"2e4"``) are accepted, a boolean is not a number and a boolean field needs a real boolean, as
        in recipes. The error is the one formatter's: ``invalid model config for family F: d_model must be a
        positive integer, got 'wide'``; an unknown key names the keys a user may set, with a did-you-mean. For
        user input (a UsageError) the hint is the problem's own remedy (the allowed keys) or ``hint``; for
        stored metadata it is always ``hint``.
        """
        try:
            return TypeAdapter(self.config_cls).validate_python(dict(values))
        except ValidationError as exc:
            user = error_cls is UsageError
            problem = explain(exc, self.config_cls, hidden=DERIVED_CONFIG_KEYS if user else (), hint=hint)
            if not user or problem.hint is None:
                problem = dataclasses.replace(problem, hint=hint)
            raise usage_error(problem, f"invalid {context} for family {self.name}", error_cls=error_cls) from None

    def new(
        self,
        vocabulary: list[str],
        size: str | None = None,
        overrides: Mapping[str, Any] | None = None,
        features: Mapping[str, Any] | None = None,
        normalizer: str = "default",
    ) -> BuiltinAdapter:
        """A randomly initialised adapter (seed with ``torch.manual_seed`` first); UsageError on bad input.

        ``vocabulary`` is a tokenizer vocabulary (``<blank>`` first) or just its characters.
        """
        size = self.default_size if size is None else size
        if size not in self.sizes:
            raise UsageError(f"unknown size {size!r} for family {self.name}", f"choose one of: {', '.join(self.sizes)}")
        try:
            feat = FeatureConfig.from_dict(dict(features)) if features else FeatureConfig()
            vocab = list(vocabulary)
            if vocab and vocab[0] == CharTokenizer.BLANK:
                tokenizer = CharTokenizer.from_vocabulary(vocab)
            else:
                tokenizer = CharTokenizer(vocab)
            get_normalizer(normalizer)
        except UsageError:
            raise
        except DsnnError as exc:
            raise UsageError(exc.message, exc.hint) from exc
        except (TypeError, ValueError, KeyError) as exc:
            raise UsageError(f"invalid feature settings: {exc}", "check the feature options") from exc
        values: dict[str, Any] = dict(self.sizes[size])
        overrides = dict(overrides or {})
        derived = {"vocab_size": len(tokenizer), "input_dim": int(feat.n_mels)}
        sources = {"vocab_size": "the vocabulary size", "input_dim": "features.n_mels"}
        for key, value in derived.items():
            if key in overrides and _as_int(overrides.pop(key)) != value:
                raise UsageError(
                    f"model config key {key!r} is derived from {sources[key]} ({value})",
                    f"do not set {key}; change {sources[key]} instead",
                )
        values.update(overrides)
        values.update(derived)
        cfg = self._make_config(values, UsageError, "fix the model config", "model config")
        return self._adapter(cfg, tokenizer, feat, normalizer)

    def from_metadata(self, meta: Mapping[str, Any]) -> BuiltinAdapter:
        """Rebuild an adapter (random weights) from ``BuiltinAdapter.metadata()`` output; DsnnError if bad."""
        hint = "the model metadata is damaged or was written by an incompatible dsnn-compress version"
        for key, kind in (("config", dict), ("vocabulary", list), ("features", dict)):
            if not isinstance(meta.get(key), kind):
                raise DsnnError(f"model metadata lacks a valid {key!r} entry ({kind.__name__})", hint)
        normalizer = meta.get("normalizer", "default")
        if not isinstance(normalizer, str):
            raise DsnnError("model metadata has a non-string 'normalizer'", hint)
        try:
            feat = FeatureConfig.from_dict(dict(meta["features"]))
            tokenizer = CharTokenizer.from_vocabulary(list(meta["vocabulary"]))
            get_normalizer(normalizer)
        except DsnnError as exc:
            raise DsnnError(f"model metadata is invalid: {exc.message}", hint) from exc
        except (TypeError, ValueError, KeyError) as exc:
            raise DsnnError(f"model metadata is invalid: {exc}", hint) from exc
        if "sample_rate" in meta and meta["sample_rate"] != feat.sample_rate:
            raise DsnnError(
                f"model metadata sample_rate {meta['sample_rate']} differs from its features' {feat.sample_rate}",
                hint,
            )
        cfg = self._make_config(meta["config"], DsnnError, hint, "model config in metadata")
        if cfg.vocab_size != len(tokenizer):
            raise DsnnError(
                f"model metadata vocab_size {cfg.vocab_size} differs from its vocabulary ({len(tokenizer)})",
                hint,
            )
        if cfg.input_dim != feat.n_mels:
            raise DsnnError(
                f"model metadata input_dim {cfg.input_dim} differs from its features' n_mels {feat.n_mels}",
                hint,
            )
        return self._adapter(cfg, tokenizer, feat, normalizer)

    def _adapter(self, cfg: Any, tokenizer: CharTokenizer, feat: FeatureConfig, normalizer: str) -> BuiltinAdapter:
        model = self.model_cls(cfg)
        model.eval()
        return BuiltinAdapter(
            family=self.name,
            model=model,
            tokenizer=tokenizer,
            features=feat,
            config=cfg,
            normalizer=normalizer,
        )


CONFORMER_CTC = BuiltinFamily("conformer-ctc", ConformerConfig, ConformerCTC, CONFORMER_SIZES, "s",
                              groups_fn=conformer_groups, compact_config_fn=conformer_compact_config,
                              widths_fn=conformer_set_widths)
LSTM_CTC = BuiltinFamily("lstm-ctc", LSTMConfig, LSTMCTC, LSTM_SIZES, "s", groups_fn=lstm_groups,
                         compact_config_fn=lstm_compact_config, refusal_fn=lstm_compact_refusal)
