"""WER against measured RTFx for weight vs structured levels, one-shot and after the same joint fine-tune.

Reads the timing of ``benchmarks/structured.py`` (``--timing``, its JSON: eager speed-up of each exported level vs
dense; a fine-tune does not change a level's architecture, so the speed of its export does not change either) and
``dsnn evaluate --json`` reports of the four bundles (weight / structured x one-shot / fine-tuned), prints the table
and draws the deployer's trade-off: WER against eager speed-up over dense.

Usage: ``python benchmarks/structured_tradeoff.py --timing benchmarks/results/structured.json --reports
benchmarks/results/structured-finetuned --plot benchmarks/results/structured-tradeoff.png``; the reports directory
holds ``{weight,structured}-{pruned,ft}.json``. How they were made (80 steps of `recipes/dsnn-conformer.yaml`, the
first 100 test utterances): BENCHMARKS.md, "Structured levels".
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--timing", type=Path, required=True)
    parser.add_argument("--reports", type=Path, required=True)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    speed = {(r["granularity"], r["level"]): r["eager_speedup"] for r in json.loads(args.timing.read_text())["results"]}
    curves = {}
    for granularity in ("weight", "structured"):
        for stage in ("pruned", "ft"):
            report = json.loads((args.reports / f"{granularity}-{stage}.json").read_text())
            points = []
            for row in report["levels"]:
                key = ("dense", 0.0) if row["level"] == 0.0 else (granularity, row["level"])
                points.append((row["level"], speed[key], 100 * row["wer"]))
            curves[f"{granularity}, {'one-shot' if stage == 'pruned' else 'fine-tuned'}"] = points
    print("level: eager speed-up over dense, test WER")
    for name, points in curves.items():
        print(f"{name:28s} " + "  ".join(f"{lv:>4g}: {s:4.2f}x {w:6.1f}%" for lv, s, w in points))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, points in curves.items():
            style = "-" if "fine-tuned" in name else ":"
            ax.plot([s for _, s, _ in points], [w for _, _, w in points], style, marker="o", label=name)
            for level, s, w in points:
                ax.annotate(f"{level:g}", (s, w), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("eager PyTorch speed-up over dense (measured, exported level)")
        ax.set_ylabel("test WER % (100 utterances)")
        ax.set_ylim(0, 130)
        ax.set_title("Conformer-s: WER vs speed, weight vs structured levels")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)


if __name__ == "__main__":
    main()
