"""`dsnn demo` end to end on a tiny stand-in for the embedded model (the real one takes minutes)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import assert_usage_error, run_cli
from safetensors import safe_open

from dsnn_compress import demo as demo_module
from dsnn_compress.data.manifest import read_manifest
from dsnn_compress.data.text import CharTokenizer, normalize_text
from dsnn_compress.models.registry import new_adapter
from dsnn_compress.sources.checkpoint import save_checkpoint

REAL_ASSETS = demo_module.demo_assets()

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_embedded_data_is_shipped_and_readable() -> None:
    evaluation = read_manifest(REAL_ASSETS / "eval.jsonl")
    training = read_manifest(REAL_ASSETS / "train.jsonl")
    assert len(evaluation) == 50 and len(training) == 120
    assert all(u.audio_path.is_file() for u in evaluation + training)


@pytest.fixture()
def tiny_assets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    assets = tmp_path / "assets"
    assets.mkdir()
    for name in ("eval", "train"):
        (assets / name).symlink_to(REAL_ASSETS / name, target_is_directory=True)
    shutil.copy(REAL_ASSETS / "eval.jsonl", assets / "eval.jsonl")
    lines = (REAL_ASSETS / "train.jsonl").read_text().splitlines()[:6]
    (assets / "train.jsonl").write_text("\n".join(lines) + "\n")
    texts = [normalize_text(u.text) for u in read_manifest(REAL_ASSETS / "train.jsonl")]
    torch.manual_seed(0)
    adapter = new_adapter("conformer-ctc", CharTokenizer.build(texts).vocabulary, size="xs",
                          overrides={"d_model": 32, "num_layers": 1, "num_heads": 2, "conv_kernel": 3})
    save_checkpoint(adapter, assets / "model.safetensors")
    monkeypatch.setattr(demo_module, "demo_assets", lambda: assets)
    return assets


def test_demo_runs_the_whole_flow(tiny_assets: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "demo-out"
    code, stdout, err = run_cli(capsys, "demo", "--out", "demo-out", "--steps", "2", "--max-eval", "4", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert [row["level"] for row in result["levels"]] == [0.0, 0.5, 0.7, 0.9]
    nonzero = [row["nonzero_params"] for row in result["levels"]]
    assert nonzero == sorted(nonzero, reverse=True) and len(set(nonzero)) == 4
    for path in result["files"].values():
        assert Path(path).is_file()
    with safe_open(str(out / "dsnn.safetensors"), framework="pt") as handle:
        meta = handle.metadata()
    assert json.loads(meta["training"])["steps"] == 2 and json.loads(meta["levels"]) == [0.5, 0.7, 0.9]
    report = json.loads((out / "report.json").read_text())
    assert report["finetuned"]["levels"][0]["utterances_scored"] == 4


def test_demo_refuses_a_non_empty_directory(tiny_assets: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_usage_error(run_cli(capsys, "demo", "--out", out, "--steps", "1"), "not empty")
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("args", [["--max-eval", "0"], ["--max-eval", "-49"], ["--out", "a-file"]])
def test_demo_refuses_bad_options_before_any_work(args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("not a directory")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert_usage_error(run_cli(capsys, "demo", *args), "demo" if "--out" in args else "--max-eval")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing pruned, trained or written
