"""`dsnn demo` end to end on a tiny stand-in for the embedded model (the real one takes minutes), and the shipped
DSNN bundle checked against the embedded dense model it was trained from."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import assert_usage_error, run_cli
from safetensors import safe_open

from dsnn_compress import demo as demo_module
from dsnn_compress.core.bundle import load_bundle
from dsnn_compress.data.manifest import read_manifest
from dsnn_compress.data.text import CharTokenizer, normalize_text
from dsnn_compress.evaluation.evaluate import EvaluateOptions, evaluate
from dsnn_compress.models.registry import new_adapter
from dsnn_compress.prune import PruneOptions, prune_checkpoint
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
    with torch.no_grad():  # the stand-in "trained" bundle: other weights than the dense model, same levels
        for param in adapter.model.parameters():
            param.mul_(1.5)
    save_checkpoint(adapter, tmp_path / "trained.safetensors")
    prune_checkpoint(tmp_path / "trained.safetensors", assets / demo_module.SHIPPED_BUNDLE,
                     PruneOptions([0.5, 0.7, 0.9]))
    monkeypatch.setattr(demo_module, "demo_assets", lambda: assets)
    return assets


def test_demo_runs_the_whole_flow(tiny_assets: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "demo-out"
    code, stdout, err = run_cli(capsys, "demo", "--out", "demo-out", "--steps", "2", "--max-eval", "4", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    rows = result["levels"]
    assert [row["level"] for row in rows] == [0.0, 0.5, 0.7, 0.9]
    assert [row["servable"] for row in rows] == [True, True, True, False]
    nonzero = [row["nonzero_params"] for row in rows]
    assert nonzero == sorted(nonzero, reverse=True) and len(set(nonzero)) == 4
    for path in result["files"].values():
        assert Path(path).is_file()
    # the columns are what evaluate measures on the same 4 utterances (independent runs of the library)
    subset = out / "eval-subset" / "eval.jsonl"
    assert len(subset.read_text().splitlines()) == 4
    once = EvaluateOptions(repeats=1)
    shipped = evaluate(tiny_assets / demo_module.SHIPPED_BUNDLE, subset, once)
    oneshot = evaluate(out / "pruned.safetensors", subset, once)
    live = evaluate(out / "live.safetensors", subset, EvaluateOptions(levels=[0.0, 0.5, 0.7], repeats=1))
    assert [row["wer_shipped"] for row in rows] == [e.wer for e in shipped.levels]
    assert [row["wer_oneshot"] for row in rows] == [e.wer for e in oneshot.levels]
    assert [row["wer_live"] for row in rows] == [e.wer for e in live.levels] + [None]
    # the live fine-tune continued the shipped bundle with the demo's recipe: the servable levels only (0.9 has
    # loss weight 0), distillation on
    with safe_open(str(out / "live.safetensors"), framework="pt") as handle:
        meta = handle.metadata()
    recipe = json.loads(meta["recipe"])
    assert json.loads(meta["training"])["steps"] == 2 and json.loads(meta["levels"]) == [0.5, 0.7, 0.9]
    assert recipe["sampling"]["loss_weights"] == [1.0, 1.0, 1.0, 0.0] and recipe["distillation"]["enabled"]
    assert recipe["optimizer"]["lr"] == demo_module.LIVE_RECIPE["optimizer"]["lr"]
    assert Path(recipe["model"]["init"]) == tiny_assets / demo_module.SHIPPED_BUNDLE
    # the exported checkpoints are the shipped bundle's servable levels, nothing of 0.9
    exported = sorted(p.name for p in (out / "export").iterdir())
    assert exported == ["model-0.5.safetensors", "model-0.7.safetensors", "model-dense.safetensors"]
    report = json.loads((out / "report.json").read_text())
    assert sorted(report) == ["live", "oneshot", "shipped"]
    assert report["live"]["levels"][0]["utterances_scored"] == 4
    # only the shipped bundle's speed is shown, so only it is timed in several interleaved passes, with a range
    assert [report[k]["timing"]["repeats"] for k in ("oneshot", "shipped", "live")] == [1, demo_module.SPEED_REPEATS, 1]
    for row, entry in zip(rows, report["shipped"]["levels"], strict=True):
        assert (row["rtfx"], row["rtfx_range"]) == (entry["rtfx"], entry["rtfx_range"])
        assert row["rtfx_range"][0] <= row["rtfx"] <= row["rtfx_range"][1]
    assert "Live fine-tune: the shipped bundle, 2 more steps" in (out / "report.md").read_text()
    # report.md shows speed only where it was timed with a spread: the shipped bundle's section
    oneshot_md, shipped_md, live_md = re.split(r"^## ", (out / "report.md").read_text(), flags=re.M)[1:]
    assert "RTFx" not in oneshot_md and "RTFx" not in live_md
    assert "| RTFx (range) | vs dense |" in shipped_md and "median of 5 interleaved timing passes" in shipped_md


def test_demo_table_labels_the_levels_it_cannot_serve(tiny_assets: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, err = run_cli(capsys, "demo", "--out", tmp_path / "d", "--steps", "1", "--max-eval", "2",
                                "--levels", "0.7,0.9")
    assert code == 0, err
    lines = [line.replace("│", " ") for line in stdout.splitlines()]
    assert any(line.split()[:2] == ["0.9", "(not"] and "not trained" in line for line in lines), stdout
    row_07 = next(line for line in lines if line.split()[:1] == ["0.7"])
    assert "not servable" not in row_07 and "not trained" not in row_07
    assert "Served levels: dense, 0.5, 0.7" in stdout and "an illustration" in stdout
    # the speed column: median and range of 3 passes, and "vs dense" ("same" unless the ranges are disjoint)
    assert "vs dense" in stdout
    assert f"median of {demo_module.SPEED_REPEATS} interleaved timing passes" in " ".join(stdout.split())
    assert row_07.split()[-1] == "same" or row_07.split()[-1].endswith("x")


def test_demo_refuses_levels_the_shipped_bundle_lacks(tiny_assets: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "never"
    assert_usage_error(run_cli(capsys, "demo", "--out", out, "--levels", "0.5,0.8"),
                       "0.8 is not in the shipped demo bundle", "0.5, 0.7, 0.9")
    assert not out.exists()


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


def test_the_shipped_bundle_is_the_trained_dsnn_model_of_the_embedded_one(tmp_path: Path) -> None:
    """The shipped bundle holds the embedded model's architecture, fp16, trained: it beats one-shot pruning."""
    shipped = load_bundle(REAL_ASSETS / demo_module.SHIPPED_BUNDLE)
    assert shipped.levels == (0.5, 0.7, 0.9)
    assert {str(t.dtype) for t in shipped.tensors.values()} == {"torch.float16"}
    with safe_open(str(REAL_ASSETS / "model.safetensors"), framework="pt") as handle:
        dense = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        dense_model = json.loads(handle.metadata()["model"])
    assert sorted(shipped.tensors) == sorted(dense)
    assert all(shipped.tensors[n].shape == t.shape for n, t in dense.items())
    assert shipped.metadata["model"]["config"] == dense_model["config"]
    assert shipped.metadata["training"]["steps"] == 600
    assert not all(torch.equal(shipped.tensors[n], t) for n, t in dense.items())  # trained, not a re-pruned copy
    # on 8 embedded test utterances, 0.7 of the shipped bundle is far better than 0.7 pruned one-shot
    subset = tmp_path / "eval.jsonl"
    subset.write_text("\n".join((REAL_ASSETS / "eval.jsonl").read_text().splitlines()[:8]) + "\n")
    (tmp_path / "eval").symlink_to(REAL_ASSETS / "eval", target_is_directory=True)
    prune_checkpoint(REAL_ASSETS / "model.safetensors", tmp_path / "oneshot.safetensors", PruneOptions([0.7]))
    at_07 = EvaluateOptions(levels=[0.7], repeats=1)
    oneshot = evaluate(tmp_path / "oneshot.safetensors", subset, at_07).levels[0].wer
    trained = evaluate(REAL_ASSETS / demo_module.SHIPPED_BUNDLE, subset, at_07).levels[0].wer
    assert trained < 0.75 * oneshot, (trained, oneshot)
