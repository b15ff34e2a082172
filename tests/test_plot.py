"""WER-vs-sparsity plots (matplotlib is optional)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import assert_usage_error, run_cli

from dsnn_compress.errors import DsnnError
from dsnn_compress.report.plot import plot_wer, read_report

REPORT = {"levels": [{"level": 0.0, "wer": 0.2}, {"level": 0.5, "wer": 0.25}, {"level": 0.9, "wer": 0.6}]}


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
    shuffled = {"levels": [REPORT["levels"][i] for i in (2, 0, 1)]}  # a report need not list its levels in order
    out = plot_wer([("a", shuffled), ("b", {"levels": REPORT["levels"][:2]})], tmp_path / "p.png", title="T")
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


def test_read_report_rejects_non_reports(tmp_path: Path) -> None:
    (tmp_path / "r.json").write_text(json.dumps({"x": 1}))
    with pytest.raises(DsnnError, match="not a dsnn evaluation report"):
        read_report(tmp_path / "r.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DsnnError, match="not valid JSON"):
        read_report(tmp_path / "bad.json")
    with pytest.raises(DsnnError, match="does not exist"):
        read_report(tmp_path / "missing.json")


def test_plot_with_needs_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "r.json").write_text(json.dumps(REPORT))
    result = run_cli(capsys, "evaluate", "m.safetensors", "--data", "d.jsonl", "--plot-with", tmp_path / "r.json")
    assert_usage_error(result, "--plot-with needs --plot")
