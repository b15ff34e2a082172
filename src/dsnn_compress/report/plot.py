"""WER-versus-sparsity plots of one or more evaluation reports (matplotlib, optional dependency)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..atomic import atomic_path
from ..errors import DsnnError


def read_report(path: str | Path) -> dict[str, Any]:
    """Load an evaluation report JSON written by ``dsnn evaluate --json``."""
    file = Path(path)
    try:
        report = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DsnnError(f"report {file} does not exist", "write one with dsnn evaluate --json F") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DsnnError(f"report {file} is not valid JSON", "pass a file written by dsnn evaluate --json") from None
    if not isinstance(report, dict) or not isinstance(report.get("levels"), list):
        raise DsnnError(f"{file} is not a dsnn evaluation report (no 'levels')", "use dsnn evaluate --json output")
    return report


def require_matplotlib():  # noqa: ANN201 - the matplotlib.pyplot module
    """``matplotlib.pyplot`` on the non-interactive Agg backend; DsnnError saying how to install it if missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DsnnError("plotting needs matplotlib", 'install it with: pip install "dsnn-compress[plot]"') from None
    return plt


def plot_wer(curves: Sequence[tuple[str, dict[str, Any]]], output: str | Path, title: str | None = None) -> Path:
    """Draw WER (%) against sparsity (%) for each ``(label, report)`` and save a PNG atomically."""
    plt = require_matplotlib()
    if not curves:
        raise DsnnError("nothing to plot")
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for label, report in curves:
        points = sorted((100 * e["level"], 100 * e["wer"]) for e in report["levels"])
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
