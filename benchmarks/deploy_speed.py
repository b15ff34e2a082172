"""Whisper levels where users run them: faster-whisper (CTranslate2), int8 by default (issue 21).

Every level of every bundle is exported to a CTranslate2 directory and run by faster-whisper itself
(``dsnn evaluate --runtime faster-whisper``): greedy, no timestamps, no conditioning on earlier text, with the
bundle's encoder window as faster-whisper's ``chunk_length``. Within one bundle the levels are timed interleaved
(round-robin passes, median and range); the speed-up of a level is its median RTFx over the same bundle's dense
level in the same run (the dense level has the original architecture), and the WER change is against the original
model's dense WER on the same clips.

Usage:
  python benchmarks/deploy_speed.py --model WHISPER_DIR --data bench-out/real/data/real-subset.jsonl \\
      --bundle weight=oneshot-wanda.safetensors --bundle depth=depth.safetensors --out bench-out/deploy \\
      [--compute-type int8] [--repeats 3] [--plot deploy.png]

Writes OUT/<name>.json (the evaluate reports) and OUT/summary.json; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def evaluate(model: Path, data: Path, out: Path, compute_type: str, repeats: int) -> dict[str, Any]:
    """``dsnn evaluate --runtime faster-whisper`` of every level of ``model`` (cached in ``out``)."""
    if not out.exists():
        command = [sys.executable, "-m", "dsnn_compress", "evaluate", str(model), "--data", str(data),
                   "--runtime", "faster-whisper", "--compute-type", compute_type, "--repeats", str(repeats),
                   "--normalizer", "whisper", "--skip-bad", "--json", str(out)]
        log(" ".join(command[2:]))
        done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            raise SystemExit(f"evaluate failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(out.read_text())


def rows(name: str, report: dict[str, Any], baseline_wer: float) -> list[dict[str, Any]]:
    """One row per level: WER, its change against the original model, RTFx (median, range), speed-up vs the
    bundle's own dense level timed in the same passes."""
    levels = report["levels"]
    dense = next(e for e in levels if e["level"] == 0.0)
    out = []
    for entry in levels:
        span = entry.get("rtfx_range") or [None, None]
        disjoint = (entry is not dense and span[0] is not None and dense.get("rtfx_range") is not None
                    and (span[1] < dense["rtfx_range"][0] or span[0] > dense["rtfx_range"][1]))
        out.append({"bundle": name, "level": entry["level"], "wer": 100 * entry["wer"],
                    "wer_change": 100 * (entry["wer"] - baseline_wer), "capped": entry.get("decodes_capped", 0),
                    "rtfx": entry["rtfx"], "rtfx_range": span,
                    "speedup": entry["rtfx"] / dense["rtfx"] if entry["rtfx"] and dense["rtfx"] else None,
                    "distinct": bool(disjoint) or entry is dense})
    return out


def plot(table: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r["bundle"] for r in table):
        points = sorted((r["speedup"], r["wer"], r["level"]) for r in table if r["bundle"] == name and r["speedup"])
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        for x, y, level in points:
            ax.annotate(f"{level:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("speed-up over dense (faster-whisper, median RTFx ratio)")
    ax.set_ylabel("WER % (real speech)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="the original Whisper directory (the baseline)")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--bundle", action="append", default=[], help="NAME=BUNDLE (repeatable)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--compute-type", default="int8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    baseline = evaluate(args.model, args.data, args.out / "baseline.json", args.compute_type, args.repeats)
    baseline_wer = baseline["levels"][0]["wer"]
    table = rows("original", baseline, baseline_wer)
    for item in args.bundle:
        name, _, path = item.partition("=")
        table += rows(name, evaluate(Path(path), args.data, args.out / f"{name}.json", args.compute_type,
                                     args.repeats), baseline_wer)
    (args.out / "summary.json").write_text(json.dumps(table, indent=2) + "\n")
    print(f"| bundle | level | WER % | vs original | capped | RTFx median (range) | speed-up ({args.compute_type}) |")
    print("|---|---|---:|---:|---:|---|---:|")
    for r in table:
        span = r["rtfx_range"]
        speed = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x" + ("" if r["distinct"] else " (same)")
        rng = "" if span[0] is None else f" ({span[0]:.1f}-{span[1]:.1f})"
        print(f"| {r['bundle']} | {r['level']:g} | {r['wer']:.2f} | {r['wer_change']:+.2f} | {r['capped']} | "
              f"{r['rtfx']:.1f}{rng} | {speed} |")
    if args.plot:
        plot(table, args.plot)


if __name__ == "__main__":
    main()
