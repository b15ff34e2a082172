"""The resumable training state: everything a crashed run needs to continue bit-exactly.

A :class:`TrainState` holds the weights (the model state dict), keep codes, optimizer state, the torch / NumPy /
CUDA generator states, the position in the data (step, epoch, batch position in the epoch), the keep=best record
and the skipped-utterance count. It is written atomically next to the output (``OUTPUT.train-state.pt``) at each
checkpoint and read back with ``torch.load(weights_only=True)``, so it holds only tensors, numbers, strings and
containers of them. The on-disk dict keys are a stable format: a state file written by an earlier version of the
trainer (same ``STATE_VERSION``) resumes.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_stream
from ..errors import DsnnError

STATE_VERSION = 1


def state_path(output: Path) -> Path:
    """Where the resumable training state of ``output`` lives."""
    return output.with_name(output.name + ".train-state.pt")


@dataclass
class TrainState:
    """A snapshot of a training run at the end of a step (see the module docstring)."""

    recipe: str
    """The resolved recipe as sorted JSON: a resume must use the same one."""
    model: dict[str, torch.Tensor]
    codes: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: torch.Tensor
    numpy_rng: dict[str, Any] | None
    cuda_rng: torch.Tensor | None
    step: int
    epoch: int
    position: int
    best: dict[str, Any] | None = None
    """keep=best: ``{"metric", "step", "dev_wer", "model", "codes"}`` of the best evaluation so far."""
    skipped: int = 0

    @staticmethod
    def rng_states(device: torch.device) -> dict[str, Any]:
        """The current ``rng``, ``numpy_rng`` and ``cuda_rng`` (None off CUDA) for the constructor."""
        return {"rng": torch.get_rng_state(), "numpy_rng": _numpy_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}

    def restore_rng(self, device: torch.device) -> None:
        """Put the saved generator states back (the CUDA one only when training on CUDA)."""
        torch.set_rng_state(self.rng)
        if self.numpy_rng is not None:
            _set_numpy_rng_state(self.numpy_rng)
        if device.type == "cuda" and self.cuda_rng is not None:
            torch.cuda.set_rng_state(self.cuda_rng)

    def save(self, path: Path) -> None:
        """Write atomically (a kill mid-write leaves the previous state intact)."""
        record = {"version": STATE_VERSION, **{f.name: getattr(self, f.name) for f in fields(self)}}
        with atomic_stream(path) as fh:  # a full disk is one ENOSPC error, not torch's "[enforce fail at ...]"
            torch.save(record, fh)

    @classmethod
    def load(cls, path: Path) -> TrainState:
        """Read a state written by :meth:`save`; an unreadable or foreign file raises :class:`DsnnError`."""
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable state is reported the same way
            raise DsnnError(f"training state {path} is unreadable ({type(exc).__name__})",
                            "delete it and start over, or restore it from a backup") from exc
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise DsnnError(f"training state {path} has an unknown layout", "delete it and start over")
        return cls(recipe=state["recipe"], model=state["model"], codes=state["codes"], optimizer=state["optimizer"],
                   rng=state["rng"], numpy_rng=state.get("numpy_rng"), cuda_rng=state.get("cuda_rng"),
                   step=int(state["step"]), epoch=int(state["epoch"]), position=int(state["position"]),
                   best=state.get("best"), skipped=int(state.get("skipped", 0)))


def _numpy_rng_state() -> dict[str, Any]:
    """NumPy's global generator state (Hugging Face SpecAugment draws from it), as tensors and numbers."""
    import numpy as np

    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
            "cached": float(cached)}


def _set_numpy_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    np.random.set_state(("MT19937", state["keys"].numpy().astype(np.uint32), state["pos"], state["has_gauss"],
                         state["cached"]))
