"""Per-level export as a self-describing checkpoint and as ONNX (checked against PyTorch with onnxruntime)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import assert_one_error_line, assert_usage_error, run_cli
from safetensors import safe_open

from dsnn_compress.cli import main
from dsnn_compress.core.bundle import load_bundle
from dsnn_compress.evaluation.evaluate import EvaluateOptions, evaluate
from dsnn_compress.export.formats import export_level, export_levels, level_output_path
from dsnn_compress.models.registry import adapter_from_metadata, new_adapter
from dsnn_compress.prune import PruneOptions, prune_checkpoint
from dsnn_compress.sources.checkpoint import save_checkpoint
from dsnn_compress.sources.opener import load_checkpoint_adapter

DATA = Path(__file__).parent / "data"
VOCABULARY = list("abcdefghijklmnopqrstuvwxyz' ")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=["conformer-ctc", "lstm-ctc"])
def bundle_path(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    overrides = ({"d_model": 32, "num_layers": 1, "num_heads": 2, "conv_kernel": 3} if request.param == "conformer-ctc"
                 else {"hidden": 16, "num_layers": 1})
    adapter = new_adapter(request.param, VOCABULARY, size="xs", overrides=overrides)
    save_checkpoint(adapter, root / "dense.safetensors")
    prune_checkpoint(root / "dense.safetensors", root / "bundle.safetensors", PruneOptions([0.5, 0.9]))
    return root / "bundle.safetensors"


def _reference_model(bundle_path: Path, level: float) -> torch.nn.Module:
    bundle = load_bundle(bundle_path)
    model = adapter_from_metadata(bundle.metadata["model"], bundle.state_dict_at(level)).model
    return model.eval()


def test_checkpoint_export_loads_with_pruned_weights_zero(bundle_path: Path, tmp_path: Path) -> None:
    out = export_level(load_bundle(bundle_path), 0.9, tmp_path / "c.safetensors", "checkpoint")
    adapter = load_checkpoint_adapter(out)
    bundle = load_bundle(bundle_path)
    state = adapter.model.state_dict()
    for name, code in bundle.codes.items():
        assert torch.all(state[name][code < 2] == 0)
        assert torch.equal(state[name][code >= 2], bundle.tensors[name][code >= 2])
    with safe_open(str(out), framework="pt") as handle:
        assert handle.metadata()["dsnn_level"] == "0.9"
    # the exported dense checkpoint of level 0.9 scores exactly like the bundle at 0.9
    from_bundle = evaluate(bundle_path, DATA / "manifest.jsonl", EvaluateOptions(levels="0.9", details=True,
                                                                                  repeats=1))
    from_export = evaluate(out, DATA / "manifest.jsonl", EvaluateOptions(details=True, repeats=1))
    assert [u.hypotheses["0.9"] for u in from_bundle.utterances] == [
        u.hypotheses["0"] for u in from_export.utterances]


def test_level_all_writes_one_file_per_level(bundle_path: Path, tmp_path: Path) -> None:
    written = export_levels(load_bundle(bundle_path), "all", tmp_path / "m.safetensors", "checkpoint")
    assert [p.name for p in written] == ["m-dense.safetensors", "m-0.5.safetensors", "m-0.9.safetensors"]
    assert level_output_path(Path("x/model.onnx"), 0.7) == Path("x/model-0.7.onnx")


def test_cli_level_all_refuses_existing_files_without_force(bundle_path: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "m.safetensors"
    assert main(["export", str(bundle_path), "--level", "all", "--format", "checkpoint", "-o", str(target)]) == 0
    before = level_output_path(target, 0.5).read_bytes()
    line = assert_usage_error(run_cli(capsys, "export", bundle_path, "--level", "all", "--format", "checkpoint",
                                      "-o", target), "--force")
    assert line.startswith("error: output")
    assert level_output_path(target, 0.5).read_bytes() == before


@pytest.mark.parametrize("level", [0.0, 0.9])
def test_onnx_matches_pytorch_with_dynamic_time(bundle_path: Path, tmp_path: Path, level: float) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = export_level(load_bundle(bundle_path), level, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(out))
    reference = _reference_model(bundle_path, level)
    torch.manual_seed(1)
    for batch, frames in ((1, 37), (3, 150)):
        features = torch.randn(batch, frames, 80)
        lengths = torch.full((batch,), frames, dtype=torch.long)
        lengths[0] = max(1, frames - 9)
        log_probs, out_lengths = session.run(None, {"features": features.numpy(), "lengths": lengths.numpy()})
        with torch.no_grad():
            ref_log_probs, ref_lengths = reference(features, lengths)
        assert out_lengths.tolist() == ref_lengths.tolist()
        for i, n in enumerate(ref_lengths.tolist()):
            assert abs(log_probs[i, :n] - ref_log_probs[i, :n].numpy()).max() < 1e-4


def test_onnx_without_model_description_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import save_file

    save_file({"layer.weight": torch.randn(8, 8)}, str(tmp_path / "plain.safetensors"))
    prune_checkpoint(tmp_path / "plain.safetensors", tmp_path / "b.safetensors", PruneOptions([0.5]))
    code, _, err = run_cli(capsys, "export", tmp_path / "b.safetensors", "--level", "0.5", "-o", tmp_path / "m.onnx")
    assert code == 1
    assert_one_error_line(err, "no model description")
    assert not (tmp_path / "m.onnx").exists()
