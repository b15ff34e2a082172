"""The adapter protocol: what dsnn needs from a model family."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from ..data.batch import Batch


@runtime_checkable
class ModelAdapter(Protocol):
    """A live model plus everything needed to feed it, train it and read its output.

    Built-in families (``conformer-ctc``, ``lstm-ctc``) and the Hugging Face adapter implement this.
    """

    family: str
    model: torch.nn.Module
    sample_rate: int

    def prepare(self, waveform: np.ndarray) -> torch.Tensor:
        """Turn one mono float32 waveform at ``sample_rate`` into the model's per-utterance input (time first)."""
        ...

    def encode_text(self, text: str) -> list[int]:
        """Token ids of an already normalised transcript (raises DsnnError on out-of-vocabulary characters)."""
        ...

    def log_probs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """CTC log-probabilities ``[B, T', V]`` and output lengths ``[B]``."""
        ...

    def loss(self, batch: Batch) -> torch.Tensor:
        """Mean CTC loss of the batch (scalar)."""
        ...

    def loss_and_log_probs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean CTC loss plus the log-probabilities and output lengths it was computed from (one forward pass)."""
        ...

    def decode(self, batch: Batch) -> list[str]:
        """Greedy CTC transcripts, one per utterance."""
        ...

    def default_prunable(self) -> list[str]:
        """Names of the parameters pruned when the user gives no include/exclude patterns."""
        ...

    def metadata(self) -> dict[str, Any]:
        """JSON-serialisable description that rebuilds this adapter: family, config, vocabulary, features."""
        ...
