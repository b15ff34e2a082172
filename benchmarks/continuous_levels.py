"""Study: WER at every 0.05 step from dense to the sparsest level of a DSNN bundle (continuous levels), trained
levels marked.

Levels between two trained levels are served by ``core.continuous`` (band weights dropped in ascending dense
magnitude). The evaluation is ``dsnn evaluate``'s library function, audio read once for all levels. ``--limit N``
scores the first ``N`` utterances of the manifest (a subset manifest with absolute audio paths is written to a
temporary directory). WER does not depend on machine load; the RTFx column does, and is not the point here.

Usage::

    python benchmarks/continuous_levels.py BUNDLE --data test.jsonl [--limit 150] [--step 0.05] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from dsnn_compress.core.bundle import load_bundle
from dsnn_compress.evaluation.evaluate import EvaluateOptions, evaluate


def subset_manifest(data: Path, limit: int | None, tmp: Path) -> tuple[Path, int]:
    """The first ``limit`` lines of a NeMo manifest, audio paths made absolute."""
    lines = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    if limit:
        lines = lines[:limit]
    for entry in lines:
        entry["audio_filepath"] = str((data.parent / entry["audio_filepath"]).resolve())
    out = tmp / "subset.jsonl"
    out.write_text("".join(json.dumps(e) + "\n" for e in lines))
    return out, len(lines)


def grid(top: float, step: float, trained: tuple[float, ...]) -> list[float]:
    """0, step, 2*step, ... up to ``top``, plus the trained levels."""
    values = {round(i * step, 6) for i in range(int(round(top / step)) + 1) if i * step <= top + 1e-9}
    return sorted(values | {0.0, *trained})


def monotone_report(rows: list[dict[str, Any]]) -> list[str]:
    """Where WER goes down while sparsity goes up (non-monotone steps), by more than one word error."""
    notes = []
    for a, b in zip(rows, rows[1:]):
        words = a["words"]["reference_length"]
        if b["wer"] < a["wer"] - 1.0 / max(words, 1):
            notes.append(f"{a['level']:g} -> {b['level']:g}: WER {100 * a['wer']:.2f} -> {100 * b['wer']:.2f} %")
    return notes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--step", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    bundle = load_bundle(args.bundle)
    levels = grid(bundle.levels[-1], args.step, bundle.levels)
    with tempfile.TemporaryDirectory() as name:
        manifest, count = subset_manifest(args.data, args.limit, Path(name))

        def progress(stage: str, done: int, total: int) -> None:
            if done == total or done % 50 == 0:
                print(f"{stage}: {done}/{total}", file=sys.stderr)

        report = evaluate(args.bundle, manifest, EvaluateOptions(levels=levels, repeats=1), on_progress=progress)
    rows = [entry.to_dict() for entry in report.levels]
    table = Table(title=f"{args.bundle.name}: WER per level on {count} utterances of {args.data} "
                        "(* = continuous level, not trained)", title_justify="left")
    for column in ("level", "WER %", "CER %", "nonzero params"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(f"{r['level']:g}" + ("" if r["trained"] else "*"), f"{100 * r['wer']:.2f}",
                      f"{100 * r['cer']:.2f}", f"{r['nonzero_params']:,}")
    console = Console(width=160)
    console.print(table)
    notes = monotone_report(rows)
    console.print("non-monotone steps: " + ("; ".join(notes) if notes else "none (WER never falls as s grows)"))
    if args.json:
        args.json.write_text(json.dumps({"bundle": str(args.bundle), "utterances": count, "levels": [
            {k: r[k] for k in ("level", "trained", "wer", "cer", "nonzero_params")} for r in rows],
            "non_monotone": notes, "allocation": bundle.allocation}, indent=2) + "\n")


if __name__ == "__main__":
    main()
