"""Sparse kernels (``--kernels dense|sparse|auto``): CSR layers equal the dense computation, per family.

The oracle is always independent of the kernels module: plain ``F.linear`` / ``F.conv1d`` on a masked weight, or
a model rebuilt from ``state_dict_at(level)`` (``asr_fixtures.adapter_at``) running its ordinary dense modules.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from asr_fixtures import VOCABULARY, adapter_at, audio_files, copy_manifest, decode_file
from helpers import assert_usage_error, run_cli
from torch import nn

from dsnn_compress.core.bundle import load_bundle
from dsnn_compress.data.audio import load_audio
from dsnn_compress.data.batch import pad_batch
from dsnn_compress.errors import UsageError
from dsnn_compress.evaluation.evaluate import EvaluateOptions, evaluate
from dsnn_compress.evaluation.transcribe import transcribe
from dsnn_compress.models.registry import new_adapter
from dsnn_compress.prune import PruneOptions, prune_checkpoint
from dsnn_compress.runtime import kernels as kernels_module
from dsnn_compress.runtime.kernels import SparseKernels, SparseLinear, no_sparse_path, parse_kernels
from dsnn_compress.runtime.runnable import load_model
from dsnn_compress.sources.checkpoint import save_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FILES = [audio_files()[i] for i in (0, 6, 7)]
ATOL = 1e-4


def pruned(shape: tuple[int, ...], sparsity: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=gen)
    return weight * (torch.rand(shape, generator=gen) >= sparsity)


def batch_of(adapter, paths=FILES):
    waves = [load_audio(p, adapter.sample_rate) for p in paths]
    return pad_batch([adapter.prepare(w) for w in waves], [[] for _ in waves], ["" for _ in waves],
                     [str(p) for p in paths])


# --------------------------------------------------------------------------------------------------- the module


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7, 24), (2, 5, 24), (1, 1, 24), (0, 24)])
def test_sparse_linear_equals_f_linear_on_the_masked_weight(bias, shape):
    layer = nn.Linear(24, 40, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(pruned((40, 24), 0.8))
    sparse = SparseLinear(layer)
    assert sparse.weight is layer.weight and sparse.bias is layer.bias  # shared: level switches write into them
    x = torch.randn(shape)
    with torch.no_grad():
        expected = F.linear(x, layer.weight, layer.bias)
        got = sparse(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-5)
    assert sparse.density == pytest.approx(float((layer.weight != 0).float().mean()))


def test_pointwise_conv1d_equals_f_conv1d():
    conv = nn.Conv1d(12, 20, kernel_size=1)
    with torch.no_grad():
        conv.weight.copy_(pruned((20, 12, 1), 0.7, seed=3))
    x = torch.randn(3, 12, 9)
    with torch.no_grad():
        torch.testing.assert_close(SparseLinear(conv)(x), F.conv1d(x, conv.weight, conv.bias), atol=ATOL, rtol=1e-5)


def test_refresh_follows_the_weight():
    layer = nn.Linear(16, 8)
    sparse = SparseLinear(layer)
    with torch.no_grad():
        layer.weight.copy_(pruned((8, 16), 0.9, seed=5))
    x = torch.randn(4, 16)
    with torch.no_grad():
        stale = sparse(x)
        sparse.refresh()
        fresh = sparse(x)
        expected = F.linear(x, layer.weight, layer.bias)
    assert not torch.allclose(stale, expected, atol=ATOL)  # the CSR copy is a snapshot ...
    torch.testing.assert_close(fresh, expected, atol=ATOL, rtol=1e-5)  # ... that refresh() rebuilds


@pytest.mark.parametrize(("module", "reason"), [
    (nn.Linear(4, 4), None),
    (nn.Conv1d(4, 4, 1), None),
    (nn.Conv1d(4, 4, 15, padding=7, groups=4), "Conv1d (kernel 15, grouped)"),
    (nn.Conv1d(4, 4, 1, stride=2), "Conv1d (kernel 1)"),
    (nn.Conv2d(1, 4, 3), "Conv2d"),
    (nn.LSTM(4, 4), "LSTM"),
    (nn.Linear(4, 4).half(), "Linear (float16)"),
])
def test_which_layers_have_a_sparse_path(module, reason):
    assert no_sparse_path(module) == reason


def test_unknown_kernels_value_lists_the_choices():
    assert parse_kernels(" Auto ") == "auto"
    with pytest.raises(UsageError, match="'fast' is not one of dense, sparse, auto"):
        parse_kernels("fast")


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.rnn = nn.LSTM(8, 8)

    def forward(self, x):
        return self.b(self.a(x))


def test_auto_keeps_csr_only_where_it_is_faster_by_the_margin(monkeypatch):
    model = Tiny()
    timings = {id(model.a): (1.0, 0.5), id(model.b): (1.0, 0.95)}  # a: 2x faster; b: within the noise margin
    calls = []

    def fake(dense, sparse, shapes):
        calls.append((id(dense), dict(shapes)))
        return timings[id(dense)]

    monkeypatch.setattr(kernels_module, "time_kernels", fake)
    switch = SparseKernels(model, ["a.weight", "b.weight", "rnn.weight_ih_l0"], "auto",
                           probe=lambda: model(torch.randn(3, 5, 8)))
    assert switch.without_path == {"rnn": "LSTM"}
    switch.apply(0.0)
    assert not calls and type(model.a) is nn.Linear  # the dense level: nothing timed, nothing swapped
    switch.apply(0.9)
    assert isinstance(model.a, SparseLinear) and type(model.b) is nn.Linear
    assert switch.sparse_layers() == ["a"]
    assert {shape for _, shapes in calls for shape in shapes} == {(3, 5, 8)}  # the probe's shape, recorded
    switch.apply(0.9)
    assert len(calls) == 2  # timed once per level ...
    switch.apply(0.5)
    assert len(calls) == 4  # ... and again for another level (other weights)
    switch.apply(0.0)
    assert type(model.a) is nn.Linear and switch.sparse_layers() == []


def test_sparse_on_a_model_without_a_sparse_path_is_a_usage_error():
    with pytest.raises(UsageError, match=r"no pruned layer of this model has a sparse path \(it prunes LSTM"):
        SparseKernels(Tiny(), ["rnn.weight_ih_l0", "rnn.weight_hh_l0"], "sparse")


def test_time_kernels_estimates_calls_times_the_fastest_repeat(monkeypatch):
    """On a fake clock each call costs a known time per input row (dense 2, CSR 0.5) and the first timed call of each
    shape is slowed by noise: the estimate is, over the most frequent shapes only, calls x the fastest repeat, a
    long input timed on its first rows and scaled up; the warm-up call, the noise and the rarest shape do not count."""
    now = [0.0]
    monkeypatch.setattr(kernels_module, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    monkeypatch.setattr(kernels_module, "SHAPES_TIMED", 3)
    monkeypatch.setattr(kernels_module, "TIMING_ROWS", 512)
    layer = nn.Linear(32, 32)
    sparse = SparseLinear(layer)
    repeats = 4
    calls = Counter()

    def clock(cost_per_row: float):
        def advance(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            calls[id(module)] += 1
            noise = 1000.0 if calls[id(module)] % (repeats + 1) == 2 else 0.0  # the first timed call of a shape
            now[0] += cost_per_row * args[0].reshape(-1, 32).shape[0] + noise
        return advance

    layer.register_forward_hook(clock(2.0))
    sparse.register_forward_hook(clock(0.5))
    shapes = Counter({(1, 32): 10, (4, 32): 3, (1000, 32): 2, (7, 32): 1})  # (7, 32): the fourth, not timed
    dense_s, sparse_s = kernels_module.time_kernels(layer, sparse, shapes, repeats=repeats)
    assert calls[id(layer)] == calls[id(sparse)] == 3 * (1 + repeats)  # a warm-up and the repeats per timed shape
    # calls x time per call: 1 row, 4 rows, and 1000 rows timed as 512 and scaled by 1000 / 512
    assert dense_s == pytest.approx(10 * 2.0 + 3 * 8.0 + 2 * 1024.0 * 1000 / 512)
    assert sparse_s == pytest.approx(10 * 0.5 + 3 * 2.0 + 2 * 256.0 * 1000 / 512)


# ------------------------------------------------------------------------------------- built-in conformer (tiny)


@pytest.mark.parametrize("mode", ["sparse", "auto"])
def test_conformer_outputs_equal_the_dense_rebuild_at_every_level(tiny_model, mode):
    loaded = load_model(tiny_model.bundle, kernels=mode)
    batch = batch_of(loaded.adapter)
    sparse_counts = {}
    for level in (0.9, 0.5, 0.0, 0.9):  # switching back and forth: the CSR weights must follow the mask
        loaded.set_level(level)
        with torch.inference_mode():
            got, lengths = loaded.adapter.log_probs(batch)
            reference, ref_lengths = adapter_at(tiny_model.bundle, level).log_probs(batch)
        torch.testing.assert_close(got, reference, atol=ATOL, rtol=1e-5)
        assert torch.equal(lengths, ref_lengths)
        sparse_counts[level] = loaded.kernel_report()["sparse_layers"]
        swapped = [n for n, m in loaded.adapter.model.named_modules() if isinstance(m, SparseLinear)]
        assert sorted(swapped) == loaded.kernel_report()["layers"]
    assert sparse_counts[0.0] == 0
    if mode == "sparse":  # every Linear and pointwise Conv1d the bundle prunes
        total = loaded.kernels.summary()["layers_with_sparse_path"]
        assert sparse_counts[0.5] == sparse_counts[0.9] == total > 0
        assert loaded.kernels.summary()["without_sparse_path"] == {"Conv1d (kernel 3, grouped)": 1, "Conv2d": 2}


def test_switching_without_rebuilding_would_be_caught(tiny_model, monkeypatch):
    """The equality test above fails when the CSR weights are not rebuilt on a level switch."""
    loaded = load_model(tiny_model.bundle, kernels="sparse")
    batch = batch_of(loaded.adapter)
    loaded.set_level(0.9)
    monkeypatch.setattr(loaded.kernels, "apply", lambda level: None)  # a switch that forgets the kernels
    loaded.set_level(0.5)
    with torch.inference_mode():
        got = loaded.adapter.log_probs(batch)[0]
        reference = adapter_at(tiny_model.bundle, 0.5).log_probs(batch)[0]
    assert not torch.allclose(got, reference, atol=ATOL)


def test_model_state_is_unchanged_by_sparse_kernels(tiny_model):
    dense = load_model(tiny_model.bundle)
    sparse = load_model(tiny_model.bundle, kernels="sparse")
    for loaded in (dense, sparse):
        loaded.set_level(0.9)
    a, b = dense.adapter.model.state_dict(), sparse.adapter.model.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert sparse.nonzero_params() == dense.nonzero_params()


def test_evaluate_reports_sparse_layers_and_the_same_scores(tiny_model, tmp_path, monkeypatch):
    """``auto`` on a fake timer that calls CSR faster by more than the margin for the layers with more outputs than
    inputs (0.85 of dense) and within it for the others (0.95): exactly those layers run sparse at each sparse level."""
    def more_outputs(weight: torch.Tensor) -> bool:
        return weight.shape[0] > weight.shape[1]

    def fake_timing(dense: nn.Module, sparse: SparseLinear, shapes: Counter) -> tuple[float, float]:
        return 1.0, (0.85 if more_outputs(dense.weight) else 0.95)

    monkeypatch.setattr(kernels_module, "time_kernels", fake_timing)
    manifest = copy_manifest(tmp_path, keep=4)
    dense = evaluate(tiny_model.bundle, manifest, EvaluateOptions(repeats=1))
    tensors = load_bundle(tiny_model.bundle).tensors
    with_path: dict[float, list[str]] = {}
    for mode in ("sparse", "auto"):
        report = evaluate(tiny_model.bundle, manifest, EvaluateOptions(kernels=mode, repeats=1))
        assert report.kernels.mode == mode
        total = report.kernels.layers_with_sparse_path
        for got, ref in zip(report.levels, dense.levels, strict=True):
            assert (got.level, got.wer, got.cer) == (ref.level, ref.wer, ref.cer)
            layers = list(got.kernels.layers)
            assert got.kernels.sparse_layers == len(layers)
            if got.level == 0.0:
                assert layers == []
            elif mode == "sparse":
                assert len(layers) == total
                with_path[got.level] = layers
            else:
                wide = [n for n in with_path[got.level] if more_outputs(tensors[f"{n}.weight"])]
                assert 0 < len(wide) < total  # the fake timing splits the layers
                assert layers == wide
    assert dense.to_dict()["kernels"] == {"mode": "dense"}
    assert all(e.kernels.sparse_layers == 0 for e in dense.levels)


def test_evaluate_cli_shows_the_sparse_layer_column(tiny_model, tmp_path, capsys):
    manifest = copy_manifest(tmp_path, keep=2)
    code, out, err = run_cli(capsys, "evaluate", tiny_model.bundle, "--data", manifest, "--kernels", "sparse",
                             "--json", tmp_path / "r.json", "--markdown", tmp_path / "r.md")
    assert code == 0, err
    total = json.loads((tmp_path / "r.json").read_text())["kernels"]["layers_with_sparse_path"]
    assert "sparse layers" in out and f"{total}/{total}" in out and f"0/{total}" in out
    assert "Conv2d x2" in " ".join(out.split())  # the caption names the layer types left dense
    assert f"0.9: {total}/{total}" in (tmp_path / "r.md").read_text()


def test_transcribe_with_sparse_kernels_equals_the_dense_rebuild(tiny_model, capsys):
    reference = [decode_file(adapter_at(tiny_model.bundle, 0.9), p) for p in FILES]
    for mode in ("sparse", "auto"):
        results = transcribe(tiny_model.bundle, FILES, "0.9", kernels=mode)
        assert [r["text"] for r in results] == reference
        assert results[0]["kernels"]["mode"] == mode
    code, out, err = run_cli(capsys, "transcribe", tiny_model.bundle, *FILES, "--level", "0.9", "--kernels", "sparse")
    assert code == 0, err
    assert [line.split("\t", 1)[1] for line in out.splitlines()] == reference
    assert "layer(s) compute with sparse weights" in err


# ---------------------------------------------------------------------------------------------------- bad input


def test_unknown_kernels_value_on_the_cli(tiny_model, tmp_path, capsys):
    result = run_cli(capsys, "evaluate", tiny_model.bundle, "--data", copy_manifest(tmp_path), "--kernels", "fast")
    assert_usage_error(result, "--kernels 'fast' is not one of dense, sparse, auto")
    result = run_cli(capsys, "transcribe", tiny_model.bundle, FILES[0], "--kernels", "csr")
    assert_usage_error(result, "--kernels 'csr' is not one of dense, sparse, auto")


@pytest.fixture(scope="module")
def lstm_bundle(tmp_path_factory, one_torch_thread) -> Path:
    """A tiny lstm-ctc bundle: it prunes only LSTM matrices (the CTC head stays dense), so it has no sparse path."""
    root = tmp_path_factory.mktemp("lstm")
    torch.manual_seed(0)
    adapter = new_adapter("lstm-ctc", vocabulary=VOCABULARY, size="xs",
                          overrides={"hidden": 16, "num_layers": 1, "dropout": 0.0}, features={"n_mels": 40})
    save_checkpoint(adapter, root / "dense.safetensors")
    prune_checkpoint(root / "dense.safetensors", root / "bundle.safetensors", PruneOptions([0.5, 0.9]))
    return root / "bundle.safetensors"


def test_sparse_on_the_lstm_family_says_it_has_no_sparse_path(lstm_bundle, tmp_path, capsys):
    result = run_cli(capsys, "transcribe", lstm_bundle, FILES[0], "--kernels", "sparse")
    assert_usage_error(result, "no pruned layer of this lstm-ctc model has a sparse path", "LSTM", "--kernels dense")
    result = run_cli(capsys, "evaluate", lstm_bundle, "--data", copy_manifest(tmp_path), "--kernels", "sparse")
    assert_usage_error(result, "no pruned layer of this lstm-ctc model has a sparse path")
    # auto: all dense, no error
    report = evaluate(lstm_bundle, copy_manifest(tmp_path, keep=2), EvaluateOptions(kernels="auto", repeats=1))
    assert report.to_dict()["kernels"] == {"mode": "auto", "layers_with_sparse_path": 0,
                                           "without_sparse_path": {"LSTM": 1}}
    assert all(e.kernels.sparse_layers == 0 for e in report.levels)


def test_sparse_on_a_dense_checkpoint_is_a_usage_error(tiny_model, capsys):
    result = run_cli(capsys, "transcribe", tiny_model.checkpoint, FILES[0], "--kernels", "sparse")
    assert_usage_error(result, "is a dense checkpoint with no pruned layers")
