"""The adapter protocol: what dsnn needs from a model family."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from ..data.batch import Batch


@runtime_checkable
class ModelAdapter(Protocol):
    """A live model plus everything needed to feed it, train it and read its output.

    Built-in families (``conformer-ctc``, ``lstm-ctc``) and the Hugging Face adapter implement this.
    """

    family: str
    model: torch.nn.Module
    sample_rate: int
    normalizer: str
    """Name of the text normaliser references and hypotheses go through (``data.text.NORMALIZERS``)."""
    decoding: str
    """How :meth:`decode` turns outputs into text, as reports name it (``greedy-ctc``, ``greedy-seq2seq``)."""
    capped_decodes: int
    """Decodes cut at a length bound since the counter was last set to 0 (autoregressive models; CTC: always 0)."""

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


class AdapterRunner(nn.Module):
    """An adapter as a module: ``forward(batch, "loss")`` -> (loss, log_probs, lengths), ``"decode"`` -> texts.

    The adapter's model is registered as ``model``, so ``torch.func.functional_call`` can swap its parameters
    (``model.<name>``) for masked ones while the adapter's own methods run: the runner the DSNN masked forward
    (:mod:`~dsnn_compress.core.masked`) expects.
    """

    def __init__(self, adapter: ModelAdapter) -> None:
        super().__init__()
        self.model = adapter.model
        self.adapter = adapter

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "adapter":  # a plain attribute, not a submodule: the adapter is not an nn.Module
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def forward(self, batch: Batch, mode: str) -> Any:
        """``loss``: the adapter's loss with log-probs and lengths; ``decode``: greedy transcripts."""
        if mode == "loss":
            return self.adapter.loss_and_log_probs(batch)
        return self.adapter.decode(batch)


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s parameters (its first one's; the CPU for a model without parameters)."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def weights_in(state: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A state dict on the CPU, contiguous, its floating-point tensors in ``dtype`` (None: as they are).

    Exports write the source's dtype: an fp16 checkpoint's levels stay fp16 although the live model computes in fp32.
    """
    out = {}
    for name, tensor in state.items():
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        out[name] = tensor.contiguous()
    return out
