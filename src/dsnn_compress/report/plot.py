"""WER-versus-sparsity plots of one or more evaluation reports (matplotlib, optional dependency)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from ..atomic import atomic_path
from ..errors import DsnnError
from ..evaluation.results import EvaluationReport


def read_report(path: str | Path) -> EvaluationReport:
    """Load an evaluation report JSON written by ``dsnn evaluate --json`` (by this version or an earlier one)."""
    file = Path(path)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DsnnError(f"report {file} does not exist", "write one with dsnn evaluate --json F") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DsnnError(f"report {file} is not valid JSON", "pass a file written by dsnn evaluate --json") from None
    try:
        return EvaluationReport.from_dict(data)
    except DsnnError as exc:
        raise DsnnError(f"{file} is {exc.message}", exc.hint) from None


def require_matplotlib():  # noqa: ANN201 - the matplotlib.pyplot module
    """``matplotlib.pyplot`` on the non-interactive Agg backend; DsnnError saying how to install it if missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DsnnError("plotting needs matplotlib", 'install it with: pip install "dsnn-compress[plot]"') from None
    return plt


def wer_curve(report: EvaluationReport) -> list[tuple[float, float]]:
    """The ``(level, WER)`` points of a report, as :func:`plot_wer` draws them."""
    return [(entry.level, entry.wer) for entry in report.levels]


def plot_wer(curves: Sequence[tuple[str, Sequence[tuple[float, float]]]], output: str | Path,
             title: str | None = None) -> Path:
    """Draw WER (%) against sparsity (%) for each ``(label, [(level, wer), ...])`` (fractions, in any order; see
    :func:`wer_curve`) and save a PNG atomically."""
    plt = require_matplotlib()
    if not curves:
        raise DsnnError("nothing to plot")
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for label, curve in curves:
        points = sorted((100 * level, 100 * wer) for level, wer in curve)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xlabel("sparsity of prunable weights (%)")
    ax.set_ylabel("WER (%)")
    ax.set_title(title or "WER vs sparsity")
    ax.grid(True, alpha=0.3)
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    out = Path(output)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out
