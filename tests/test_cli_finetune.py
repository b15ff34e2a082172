"""`dsnn finetune` through the CLI: recipe validation errors, --set overrides, --json, and fine-tuning a bundle made
by `dsnn prune` (levels and codes kept, resolved recipe recorded)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import assert_usage_error, run_cli

from dsnn_compress.cli import main
from dsnn_compress.core.bundle import load_bundle
from dsnn_compress.data.manifest import read_manifest
from dsnn_compress.data.text import CharTokenizer, normalize_text
from dsnn_compress.models.registry import new_adapter
from dsnn_compress.sources.checkpoint import save_checkpoint
from dsnn_compress.training.recipe import recipe_from_dict

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
MANIFEST = DATA / "manifest.jsonl"
TINY = ROOT / "recipes" / "tiny-test.yaml"
CPU = ["--set", "training.device=cpu", "--set", "data.spec_augment=false"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pruned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`dsnn prune` of a saved tiny conformer-ctc checkpoint at levels 0.5, 0.8 (read-only for the tests)."""
    folder = tmp_path_factory.mktemp("pruned")
    texts = [normalize_text(u.text, "default") for u in read_manifest(MANIFEST)]
    torch.manual_seed(0)
    adapter = new_adapter("conformer-ctc", CharTokenizer.build(texts).vocabulary, "xs",
                          {"d_model": 32, "num_layers": 1, "num_heads": 2, "conv_kernel": 3, "dropout": 0.0})
    checkpoint = folder / "tiny.safetensors"
    save_checkpoint(adapter, checkpoint)
    bundle = folder / "tiny-bundle.safetensors"
    assert main(["prune", str(checkpoint), "--levels", "0.5,0.8", "-o", str(bundle)]) == 0
    return bundle


# ------------------------------------------------------------------------------------------- validation errors


def test_unknown_override_key(capsys: pytest.CaptureFixture[str], tmp_path: Path):
    result = run_cli(capsys, "finetune", "--recipe", TINY, "-o", tmp_path / "o.safetensors", "--set",
                     "training.stepz=3")
    assert_usage_error(result, "'training.stepz'", "training.steps")  # names the key and suggests the right one
    assert not (tmp_path / "o.safetensors").exists()


def test_unknown_key_in_recipe_file(capsys: pytest.CaptureFixture[str], tmp_path: Path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"data:\n  train: {MANIFEST}\noptimizer:\n  lrr: 0.1\n")
    assert_usage_error(run_cli(capsys, "finetune", "--recipe", recipe), "optimizer.lrr", str(recipe))


def test_wrong_type(capsys: pytest.CaptureFixture[str], tmp_path: Path):
    result = run_cli(capsys, "finetune", "--recipe", TINY, "-o", tmp_path / "o.safetensors", "--set",
                     "training.steps=many")
    assert_usage_error(result, "training.steps", "'many'")
    recipe = tmp_path / "bool.yaml"
    recipe.write_text(f"data:\n  train: {MANIFEST}\n  spec_augment: 'yes'\n")
    assert_usage_error(run_cli(capsys, "finetune", "--recipe", recipe), "data.spec_augment", "true or false")


def test_out_of_range_learning_rate(capsys: pytest.CaptureFixture[str], tmp_path: Path):
    result = run_cli(capsys, "finetune", "--recipe", TINY, "-o", tmp_path / "o.safetensors", "--set", "optimizer.lr=-1")
    assert_usage_error(result, "optimizer.lr", "positive", "-1")
    assert_usage_error(run_cli(capsys, "finetune", "--recipe", TINY, "--lr", "0"), "optimizer.lr")


def test_missing_training_data(capsys: pytest.CaptureFixture[str]):
    assert_usage_error(run_cli(capsys, "finetune"), "--data", "data.train")
    assert_usage_error(run_cli(capsys, "finetune", "--set", "training.steps=1"), "data.train")


def test_levels_that_differ_from_the_bundle(capsys: pytest.CaptureFixture[str], tmp_path: Path, pruned: Path):
    result = run_cli(capsys, "finetune", pruned, "--data", MANIFEST, "--levels", "0.5,0.9", "-o",
                     tmp_path / "o.safetensors", *CPU)
    assert_usage_error(result, "levels", "0.5, 0.9", "0.5, 0.8")


def test_existing_output_needs_force(capsys: pytest.CaptureFixture[str], tmp_path: Path):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep me")
    assert_usage_error(run_cli(capsys, "finetune", "--recipe", TINY, "-o", out), "already exists", "--force")
    assert out.read_bytes() == b"keep me"


# ----------------------------------------------------------------------------------------- working runs


def _log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_set_overrides_and_json_summary(capsys: pytest.CaptureFixture[str], tmp_path: Path, pruned: Path):
    """--set training.steps=1 runs one step; --set data.train works without --recipe/--data; stdout is JSON."""
    out = tmp_path / "one-step.safetensors"
    code, stdout, err = run_cli(capsys, "finetune", pruned, "--set", f"data.train={MANIFEST}", "--set",
                                "training.steps=1", "--set", "sampling.mode=sandwich", "--set",
                                "sampling.random_levels=0", "-o", out, "--json", *CPU)
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["steps"] == 1 and summary["output"] == str(out)
    assert summary["levels"] == [0.5, 0.8]
    assert set(summary["final_loss"]) == {"dense", "0.8"}  # sandwich with no middle level: dense + sparsest
    assert summary["forward_passes"] == 2 and summary["dev_wer"] is None
    assert summary["log"] == str(tmp_path / "one-step.log.jsonl")
    assert [r["step"] for r in _log(Path(summary["log"])) if r["event"] == "step"] == [1]
    bundle = load_bundle(out)
    assert bundle.metadata["training"]["steps"] == 1
    assert bundle.metadata["recipe"]["sampling"] == {"mode": "sandwich", "random_levels": 0, "loss_weights": None}


def test_finetune_a_pruned_bundle_keeps_levels_and_codes(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                          pruned: Path):
    out = tmp_path / "tuned.safetensors"
    code, stdout, err = run_cli(capsys, "finetune", pruned, "--data", MANIFEST, "--steps", "2", "--lr", "1e-2",
                                "--seed", "3", "-o", out, "--json", *CPU)
    assert code == 0, err
    assert json.loads(stdout)["steps"] == 2
    before, after = load_bundle(pruned), load_bundle(out)
    assert after.levels == before.levels == (0.5, 0.8)
    assert after.codes.keys() == before.codes.keys()
    for name in before.codes:
        assert torch.equal(after.codes[name], before.codes[name]), name  # schedule off: codes exactly as pruned
    assert after.tensors.keys() == before.tensors.keys()
    assert any(not torch.equal(after.tensors[n], before.tensors[n]) for n in before.codes)  # weights trained

    meta = after.metadata
    recipe = meta["recipe"]
    assert recipe["model"]["init"] == str(pruned)
    assert recipe["data"]["train"] == str(MANIFEST)
    assert recipe["training"]["steps"] == 2 and recipe["training"]["seed"] == 3 and recipe["training"]["epochs"] is None
    assert recipe["optimizer"]["lr"] == 1e-2 and recipe["schedule"]["enabled"] is False
    assert recipe["output"] == str(out)
    assert recipe_from_dict(recipe).to_dict() == recipe  # complete and valid: it reproduces the run
    assert meta["source"]["file"] == pruned.name and meta["source"]["kind"] == "dsnn-bundle"
    assert meta["allocation"] == before.metadata["allocation"] and meta["selection"] == before.metadata["selection"]
    assert meta["model"] == before.metadata["model"]
    assert meta["training"]["steps"] == 2 and set(meta["training"]["final_loss"]) == {"dense", "0.5", "0.8"}

    # the result is a working bundle for the other commands
    code, stdout, err = run_cli(capsys, "evaluate", out, "--data", MANIFEST, "--json", "-")
    assert code == 0, err
    assert [entry["level"] for entry in json.loads(stdout)["levels"]] == [0.0, 0.5, 0.8]


def test_fp16_source_stays_fp16_through_finetune_and_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """The live model trains in fp32; the written bundle and its checkpoint exports keep the source's fp16."""
    from safetensors import safe_open

    texts = [normalize_text(u.text, "default") for u in read_manifest(MANIFEST)]
    torch.manual_seed(0)
    adapter = new_adapter("conformer-ctc", CharTokenizer.build(texts).vocabulary, "xs",
                          {"d_model": 32, "num_layers": 1, "num_heads": 2, "conv_kernel": 3, "dropout": 0.0})
    half = {name: torch.float16 for name, t in adapter.model.state_dict().items() if t.is_floating_point()}
    save_checkpoint(adapter, tmp_path / "half.safetensors", dtypes=half)
    assert main(["prune", str(tmp_path / "half.safetensors"), "--levels", "0.5,0.8", "-o", str(tmp_path / "b.st")]) == 0
    code, _, err = run_cli(capsys, "finetune", tmp_path / "b.st", "--recipe", TINY, "-o", tmp_path / "ft.safetensors",
                           *CPU)
    assert code == 0, err
    assert main(["export", str(tmp_path / "ft.safetensors"), "--level", "0.8", "--format", "checkpoint", "-o",
                 str(tmp_path / "level.safetensors")]) == 0

    def dtypes(path: Path) -> dict[str, torch.dtype]:
        with safe_open(str(path), framework="pt") as fh:
            return {n: fh.get_tensor(n).dtype for n in fh.keys() if not n.endswith(".dsnn_code")}  # noqa: SIM118

    tuned = dtypes(tmp_path / "ft.safetensors")
    assert {tuned[n] for n in half} == {torch.float16}
    assert dtypes(tmp_path / "level.safetensors") == dtypes(tmp_path / "half.safetensors")
    bundle = load_bundle(tmp_path / "ft.safetensors")
    before = load_bundle(tmp_path / "b.st")
    assert any(not torch.equal(bundle.tensors[n], before.tensors[n]) for n in bundle.codes)  # it did train
