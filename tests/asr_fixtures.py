"""Shared ASR fixtures for the evaluation tests: a tiny built-in conformer, its checkpoint and a pruned bundle.

The model is trained for a few dozen steps on the eight test utterances so that its hypotheses are words (not a
random character soup): the dense level then gets most words right and the sparse levels progressively fewer,
which gives the WER / S/D/I assertions something to discriminate. Training takes a few seconds on two cores.

conftest.py registers this module as a plugin: every test module can request ``tiny_model`` (built once per session)
and imports only the helper functions and paths; run its tests on one thread with
``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import single_torch_thread

from dsnn_compress.core.bundle import load_bundle
from dsnn_compress.data.audio import load_audio
from dsnn_compress.data.batch import pad_batch
from dsnn_compress.data.manifest import read_manifest
from dsnn_compress.data.text import normalize_text
from dsnn_compress.models.base import ModelAdapter
from dsnn_compress.models.registry import adapter_from_metadata, new_adapter
from dsnn_compress.prune import PruneOptions, prune_checkpoint
from dsnn_compress.sources.checkpoint import save_checkpoint

DATA = Path(__file__).parent / "data"
MANIFEST = DATA / "manifest.jsonl"
KALDI = DATA / "kaldi"
AUDIOFOLDER = DATA / "audiofolder"
AUDIO = DATA / "audio"
VOCABULARY = list("abcdefghijklmnopqrstuvwxyz' ")
LEVELS = (0.5, 0.9)
TRAIN_STEPS = 130
TRAIN_LR = 5e-3


@dataclass(frozen=True)
class TinyModel:
    """Paths of the tiny dense checkpoint and of its bundle (levels 0.5 and 0.9)."""

    checkpoint: Path
    bundle: Path
    root: Path


def _train(adapter: ModelAdapter, steps: int) -> None:
    """Overfit the eight test utterances a little (full batch, Adam)."""
    utterances = read_manifest(MANIFEST)
    waves = [load_audio(u.audio_path, adapter.sample_rate) for u in utterances]
    texts = [normalize_text(u.text) for u in utterances]
    batch = pad_batch([adapter.prepare(w) for w in waves], [adapter.encode_text(t) for t in texts], texts,
                      [u.id for u in utterances])
    optimizer = torch.optim.Adam(adapter.model.parameters(), lr=TRAIN_LR)
    adapter.model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        adapter.loss(batch).backward()
        optimizer.step()
    adapter.model.eval()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """A trained tiny conformer-ctc saved as a dsnn checkpoint, and its bundle pruned at 0.5 and 0.9."""
    root = tmp_path_factory.mktemp("tiny_model")
    state = torch.random.get_rng_state()
    torch.manual_seed(1234)
    try:
        with single_torch_thread():  # deterministic, and fast even when other processes share the cores
            adapter = new_adapter(
                "conformer-ctc",
                vocabulary=VOCABULARY,
                size="xs",
                overrides={"d_model": 32, "num_layers": 1, "num_heads": 2, "ff_mult": 2, "conv_kernel": 3,
                           "dropout": 0.0},
                features={"n_mels": 40},
            )
            _train(adapter, TRAIN_STEPS)
    finally:
        torch.random.set_rng_state(state)
    checkpoint = root / "dense.safetensors"
    save_checkpoint(adapter, checkpoint)
    bundle = root / "bundle.safetensors"
    prune_checkpoint(checkpoint, bundle, PruneOptions(LEVELS))
    return TinyModel(checkpoint, bundle, root)


def adapter_at(bundle_path: Path, level: float) -> ModelAdapter:
    """An independent model for ``level``: rebuilt from the bundle's metadata with ``state_dict_at(level)``."""
    bundle = load_bundle(bundle_path)
    adapter = adapter_from_metadata(bundle.metadata["model"], bundle.state_dict_at(level))
    adapter.model.eval()
    return adapter


def decode_file(adapter: ModelAdapter, path: Path) -> str:
    """Greedy transcript of one audio file, decoded alone (a batch of one) with the adapter API."""
    wave = load_audio(path, adapter.sample_rate)
    batch = pad_batch([adapter.prepare(wave)], [[]], [""], [str(path)])
    with torch.inference_mode():
        return adapter.decode(batch)[0]


def audio_files() -> list[Path]:
    """The eight test audio files in manifest order."""
    return [u.audio_path for u in read_manifest(MANIFEST)]


def file_seconds(paths: list[Path]) -> float:
    """Total duration of ``paths`` from their headers (soundfile.info)."""
    return sum(sf.info(str(p)).frames / sf.info(str(p)).samplerate for p in paths)


def copy_manifest(directory: Path, extra: list[dict] | None = None, keep: int = 8) -> Path:
    """A NeMo manifest in ``directory`` with the first ``keep`` test utterances (absolute paths) plus ``extra``."""
    lines = []
    for utt in read_manifest(MANIFEST)[:keep]:
        lines.append({"audio_filepath": str(utt.audio_path), "text": utt.text, "id": utt.id})
    lines += extra or []
    path = directory / "manifest.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def write_zero_length_wav(path: Path) -> Path:
    """A valid WAV file with zero frames."""
    sf.write(str(path), np.zeros(0, dtype=np.float32), 16000, format="WAV", subtype="PCM_16")
    return path


def write_random_bytes(path: Path, size: int = 4096, seed: int = 0) -> Path:
    """A file of random bytes (not a decodable audio file whatever its extension)."""
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())
    return path


def copy_audio(name: str, directory: Path) -> Path:
    """Copy one test audio file into ``directory``."""
    return Path(shutil.copy(AUDIO / name, directory / name))

