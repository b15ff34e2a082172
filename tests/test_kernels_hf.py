"""Sparse kernels on the transformers families: a tiny Wav2Vec2ForCTC and a tiny random Whisper, built offline.

Oracle: the same family rebuilt from ``state_dict_at(level)`` (``asr_fixtures.adapter_at``), running transformers'
own dense ``nn.Linear`` layers.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")

from asr_fixtures import adapter_at, audio_files  # noqa: E402
from test_hf_ctc import build_hf_dir  # noqa: E402
from whisper_fixtures import build_whisper_dir  # noqa: E402

from dsnn_compress.data.audio import load_audio  # noqa: E402
from dsnn_compress.data.batch import pad_batch  # noqa: E402
from dsnn_compress.prune import PruneOptions, prune_checkpoint  # noqa: E402
from dsnn_compress.runtime import kernels as kernels_module  # noqa: E402
from dsnn_compress.runtime.kernels import SparseLinear  # noqa: E402
from dsnn_compress.runtime.runnable import load_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FILES = [audio_files()[i] for i in (0, 3)]  # both shorter than 2.2 s
ATOL = 1e-4


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, one_torch_thread) -> SimpleNamespace:
    """Bundles (levels 0.5, 0.9) of a tiny layer-norm Wav2Vec2ForCTC and of a tiny English-only Whisper."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("kernels_hf")
    out = {}
    directories = {"hf": build_hf_dir(root / "w2v", "w2v-layer"), "whisper": build_whisper_dir(root / "wh")}
    for name, directory in directories.items():
        bundle = root / f"{name}.safetensors"
        prune_checkpoint(directory, bundle, PruneOptions([0.5, 0.9]))
        out[name] = bundle
    return SimpleNamespace(**out)


def batch_of(adapter, paths=FILES):
    waves = [load_audio(p, adapter.sample_rate) for p in paths]
    return pad_batch([adapter.prepare(w) for w in waves], [[1, 2] for _ in waves], ["" for _ in waves],
                     [str(p) for p in paths])


@pytest.mark.parametrize("family", ["hf", "whisper"])
def test_outputs_equal_the_dense_rebuild(bundles, family):
    bundle = getattr(bundles, family)
    loaded = load_model(bundle, kernels="sparse")
    batch = batch_of(loaded.adapter)
    for level in (0.9, 0.5, 0.9):
        loaded.set_level(level)
        reference = adapter_at(bundle, level)
        with torch.inference_mode():
            got = loaded.adapter.log_probs(batch)
            expected = reference.log_probs(batch)
            assert loaded.adapter.decode(batch) == reference.decode(batch)
        torch.testing.assert_close(got[0], expected[0], atol=ATOL, rtol=1e-5)
        assert torch.equal(got[1], expected[1])
        swapped = sorted(n for n, m in loaded.adapter.model.named_modules() if isinstance(m, SparseLinear))
        assert swapped == loaded.kernel_report()["layers"]
        assert len(swapped) == len(loaded.bundle.codes)  # every pruned tensor of both families is a Linear weight
    assert loaded.kernels.summary()["without_sparse_path"] == {}


def test_whisper_auto_times_the_decoder_at_one_row_per_step(bundles):
    """The probe records what generate really feeds each layer: one token per step in the decoder's self-attention
    and feed-forward, the whole (1500-position) encoder output in the encoder and cross-attention keys/values."""
    probe_wave = load_audio(FILES[0], 16000)
    loaded = load_model(bundles.whisper, kernels="auto")

    def probe() -> None:
        with torch.inference_mode():
            loaded.adapter.decode(pad_batch([loaded.adapter.prepare(probe_wave)], [[]], [""], ["p"]))

    loaded.use_kernels("auto", probe)
    loaded.set_level(0.9)
    shapes = loaded.kernels.shapes
    step_shape, steps = shapes["model.decoder.layers.0.fc1"].most_common(1)[0]
    assert step_shape[:2] == (1, 1) and steps > 1
    assert set(shapes["model.encoder.layers.0.fc1"]) == {(1, 1500, 16)}
    assert set(shapes["model.decoder.layers.0.encoder_attn.k_proj"]) == {(1, 1500, 16)}
    assert set(loaded.kernels.choices[0.9]) == set(loaded.kernels.layers)
    with torch.inference_mode():  # whatever auto chose, the transcripts are the dense rebuild's
        batch = batch_of(loaded.adapter)
        assert loaded.adapter.decode(batch) == adapter_at(bundles.whisper, 0.9).decode(batch)


def test_default_probe_without_data(bundles, monkeypatch):
    """The runtime API with no probe decodes 5 s of quiet noise to learn the shapes (the HF CTC encoder's frames):
    every layer with a sparse path is timed on them, and with CSR timed faster each of them then runs sparse."""
    timed: dict[str, set] = {}

    def fake_timing(dense: torch.nn.Module, sparse: SparseLinear, shapes) -> tuple[float, float]:
        timed[name_of[id(dense)]] = set(shapes)
        return 1.0, 0.5

    monkeypatch.setattr(kernels_module, "time_kernels", fake_timing)
    loaded = load_model(bundles.hf, kernels="auto")
    layers = sorted(loaded.kernels.layers)
    name_of = {id(module): name for name, module in loaded.kernels.layers.items()}
    loaded.set_level(0.9)
    length = 5 * 16000
    config = loaded.adapter.model.config
    for kernel, stride in zip(config.conv_kernel, config.conv_stride, strict=True):  # the feature encoder's frames
        length = (length - kernel) // stride + 1
    assert layers and sorted(timed) == layers
    assert {shape[:2] for shapes in timed.values() for shape in shapes} == {(1, length)}
    assert loaded.kernel_report() == {"mode": "auto", "sparse_layers": len(layers), "layers": layers}
    assert all(isinstance(loaded.adapter.model.get_submodule(name), SparseLinear) for name in layers)

