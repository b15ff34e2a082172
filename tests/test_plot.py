"""WER-vs-sparsity plots (matplotlib is optional)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsnn_compress.cli import main
from dsnn_compress.errors import DsnnError
from dsnn_compress.report.plot import plot_wer, read_report

REPORT = {"levels": [{"level": 0.0, "wer": 0.2}, {"level": 0.5, "wer": 0.25}, {"level": 0.9, "wer": 0.6}]}


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = plot_wer([("a", REPORT), ("b", {"levels": REPORT["levels"][:2]})], tmp_path / "p.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


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
    code = main(["evaluate", "m.safetensors", "--data", "d.jsonl", "--plot-with", str(tmp_path / "r.json")])
    assert code == 2 and "--plot-with needs --plot" in capsys.readouterr().err
