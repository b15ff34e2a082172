"""WER-vs-sparsity plots (matplotlib is optional)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from asr_fixtures import MANIFEST
from helpers import assert_usage_error, run_cli

from dsnn_compress.errors import DsnnError
from dsnn_compress.evaluation.results import EvaluationReport
from dsnn_compress.report.plot import plot_wer, read_report, wer_curve


def first_version_level(level: float, errors: int) -> dict:
    """A level entry as the first `dsnn evaluate` wrote it (no trained, rtfx_range, decodes_capped, kernels)."""
    words = {"substitutions": errors, "deletions": 0, "insertions": 0, "hits": 20 - errors, "reference_length": 20,
             "rate": errors / 20}
    chars = {"substitutions": errors, "deletions": 0, "insertions": 0, "hits": 100 - errors,
             "reference_length": 100, "rate": errors / 100}
    return {"level": level, "wer": errors / 20, "cer": errors / 100, "words": words, "chars": chars,
            "nonzero_params": 1000, "audio_seconds": 10.0, "processing_seconds": 0.5, "rtfx": 20.0,
            "utterances_scored": 4, "utterances_skipped": 0}


FIRST_VERSION = {  # written by dsnn evaluate before gates, kernels, continuous levels and repeated timing
    "schema": "dsnn-evaluate/1", "tool": {"name": "dsnn-compress", "version": "0.1.0"},
    "model": {"path": "old.safetensors", "kind": "bundle", "family": "conformer-ctc"},
    "data": {"path": "test.jsonl", "utterances": 4}, "normalizer": "default", "decoding": "greedy-ctc",
    "threads": 2, "levels": [first_version_level(0.0, 4), first_version_level(0.5, 5), first_version_level(0.9, 12)],
    "skipped": [],
}
REPORT = EvaluationReport.from_dict(FIRST_VERSION)


def test_plot_writes_a_png(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The PNG holds one labelled line per report: x = sparsity in %, y = WER in %, in level order."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    saved: list[Figure] = []
    savefig = Figure.savefig

    def spy(self: Figure, *args: object, **kwargs: object) -> None:
        saved.append(self)
        savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    shuffled = replace(REPORT, levels=[REPORT.levels[i] for i in (2, 0, 1)])  # levels need not be in order
    assert wer_curve(shuffled) == [(0.9, 0.6), (0.0, 0.2), (0.5, 0.25)]
    out = plot_wer([("a", wer_curve(shuffled)), ("b", [(0.0, 0.2), (0.5, 0.25)])], tmp_path / "p.png", title="T")
    assert out == tmp_path / "p.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dsnn-") or p.name.endswith(".tmp")]

    assert len(saved) == 1 and len(saved[0].axes) == 1  # the figure written to the PNG
    ax = saved[0].axes[0]
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["a", "b"]
    assert list(lines[0].get_xdata()) == pytest.approx([0.0, 50.0, 90.0])
    assert list(lines[0].get_ydata()) == pytest.approx([20.0, 25.0, 60.0])
    assert list(lines[1].get_xdata()) == pytest.approx([0.0, 50.0])
    assert list(lines[1].get_ydata()) == pytest.approx([20.0, 25.0])
    assert [text.get_text() for text in ax.get_legend().get_texts()] == ["a", "b"]
    assert ax.get_xlabel() == "sparsity of prunable weights (%)" and ax.get_ylabel() == "WER (%)"
    assert ax.get_title() == "T"


def test_read_report_reads_the_first_version_of_the_format(tmp_path: Path) -> None:
    """``--plot-with`` takes reports of earlier versions: keys added since get their defaults."""
    (tmp_path / "old.json").write_text(json.dumps(FIRST_VERSION))
    report = read_report(tmp_path / "old.json")
    assert [(e.level, e.wer, e.rtfx, e.rtfx_range, e.trained) for e in report.levels] == [
        (0.0, 0.2, 20.0, None, True), (0.5, 0.25, 20.0, None, True), (0.9, 0.6, 20.0, None, True)]
    assert report.timing is None and report.gates == [] and report.kernels.mode == "dense"
    again = report.to_dict()  # written back: the old keys unchanged, the new ones at their defaults
    for old, new in zip(FIRST_VERSION["levels"], again["levels"], strict=True):
        assert new == {**old, "trained": True, "rtfx_range": None, "decodes_capped": 0,
                       "kernels": {"mode": "dense", "sparse_layers": 0, "layers": []}}


def test_read_report_rejects_non_reports(tmp_path: Path) -> None:
    (tmp_path / "r.json").write_text(json.dumps({"x": 1}))
    with pytest.raises(DsnnError, match="not a dsnn evaluation report"):
        read_report(tmp_path / "r.json")
    (tmp_path / "list.json").write_text(json.dumps([1, 2]))
    with pytest.raises(DsnnError, match="not a dsnn evaluation report"):
        read_report(tmp_path / "list.json")
    broken = {**FIRST_VERSION, "levels": [{k: v for k, v in FIRST_VERSION["levels"][0].items() if k != "words"}]}
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(DsnnError, match="no 'words'"):
        read_report(tmp_path / "broken.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DsnnError, match="not valid JSON"):
        read_report(tmp_path / "bad.json")
    with pytest.raises(DsnnError, match="does not exist"):
        read_report(tmp_path / "missing.json")


def test_plot_with_needs_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "r.json").write_text(json.dumps(FIRST_VERSION))
    result = run_cli(capsys, "evaluate", "m.safetensors", "--data", "d.jsonl", "--plot-with", tmp_path / "r.json")
    assert_usage_error(result, "--plot-with needs --plot")


def test_evaluate_plots_with_a_first_version_report(tiny_model, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    from dsnn_compress.report import plot as plot_module

    drawn: list[list[tuple[str, list[tuple[float, float]]]]] = []
    plot_wer_real = plot_module.plot_wer

    def spy(curves, output, title=None):
        drawn.append([(label, list(curve)) for label, curve in curves])
        return plot_wer_real(curves, output, title)

    monkeypatch.setattr(plot_module, "plot_wer", spy)
    (tmp_path / "old.json").write_text(json.dumps(FIRST_VERSION))
    code, _, err = run_cli(capsys, "evaluate", tiny_model.bundle, "--data", MANIFEST, "--levels", "0,0.9",
                           "--repeats", "1", "--plot", tmp_path / "p.png", "--plot-with", tmp_path / "old.json")
    assert code == 0, err
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    [(label, points), old] = drawn[0]
    assert label == tiny_model.bundle.stem and [level for level, _ in points] == [0.0, 0.9]
    assert old == ("old", [(0.0, 0.2), (0.5, 0.25), (0.9, 0.6)])
