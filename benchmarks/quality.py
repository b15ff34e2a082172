"""The DSNN quality study: one jointly fine-tuned bundle vs. models pruned and fine-tuned one level at a time.

From one dense baseline, at levels 0.5/0.7/0.9 (plus dense), on a test manifest:

  a   one-shot magnitude pruning, no fine-tuning
  b   single-sparsity: for each level, prune and fine-tune that level alone for K steps
  c   DSNN `all`: one joint fine-tune of every level for K steps
  d   DSNN `sandwich` (dense + sparsest + 1 random middle level per step) for K steps
  e1  (c) with in-place distillation
  e2  (c) with the gradual cubic pruning schedule
  f   (c) with both: in-place distillation and the gradual schedule

Each variant's result is written to OUT/<variant>.json as soon as it finishes and is reused on the next run, so the
study can be run in pieces (``--variants c,d``). At the end a table (WER per level, wall time, forward/backward
passes), the bar check (c or d within 3 % relative of b at every level, dense included; the best DSNN variant at
or below b at the sparsest level), a Markdown summary and a plot are written.

Usage:
  python benchmarks/quality.py --baseline runs/dense.safetensors --train TRAIN.jsonl --test TEST.jsonl \\
      --steps 600 --out bench-out/quality [--variants a,b,c,d,e1,e2] [--lr 3e-4] [--batch-frames 6000] \\
      [--loss-weights 1,1,1,2] [--distill-weight 1.0] [--b-levels 0.9]

``--b-levels 0.9`` runs (b) at 0.9 only (the other (b) levels are reused from OUT/b/level-X.json when present).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from dsnn_compress.evaluation.evaluate import EvaluateOptions, evaluate
from dsnn_compress.prune import PruneOptions, prune_checkpoint
from dsnn_compress.report.plot import plot_wer
from dsnn_compress.training.recipe import recipe_from_dict
from dsnn_compress.training.trainer import finetune

VARIANTS = ("a", "b", "c", "d", "e1", "e2", "f")
WER_ONLY = EvaluateOptions(repeats=1)
"""The study compares WER: one timing pass is enough."""
LABELS = {
    "a": "(a) one-shot, no fine-tuning",
    "b": "(b) single-sparsity, one model per level",
    "c": "(c) DSNN all",
    "d": "(d) DSNN sandwich",
    "e1": "(e1) DSNN all + distillation",
    "e2": "(e2) DSNN all + gradual schedule",
    "f": "(f) DSNN all + distillation + gradual",
}
console = Console(width=140)


def _recipe(args: argparse.Namespace, init: Path, output: Path, **extra: Any) -> Any:
    data: dict[str, Any] = {
        "data": {"train": str(args.train), "batch_frames": args.batch_frames, "spec_augment": True},
        "model": {"init": str(init)},
        "optimizer": {"lr": args.lr, "weight_decay": 0.01},
        "lr_schedule": {"warmup_steps": max(1, args.steps // 10), "decay": "cosine", "min_lr_ratio": 0.1},
        "training": {"steps": args.steps, "seed": args.seed, "log_every": 25, "keep": "last"},
        "output": str(output),
    }
    for key, value in extra.items():
        section, _, name = key.partition("__")
        if name:
            data.setdefault(section, {})[name] = value
        else:
            data[section] = value
    return recipe_from_dict(data, base_dir=Path.cwd())


def _progress(event: str, data: dict[str, Any]) -> None:
    if event == "step":
        losses = " ".join(f"{k}={v:.3f}" for k, v in data["loss"].items())
        console.print(f"  step {data['step']}: {losses} ({data['steps_per_s']:.2f} steps/s)", highlight=False)


def run_single_level(level: float, args: argparse.Namespace, work: Path) -> dict[str, Any] | None:
    """Variant (b) at one level: prune to that level alone, fine-tune it for K steps, evaluate it.

    Level 0 is the dense baseline fine-tuned for the same K steps (``levels: []``). A sparse level is a single-level
    bundle trained with loss weight 0 on its dense level, so only the sparse level learns. The result is cached in
    ``work/level-X.json``; a level that is neither cached nor listed in ``--b-levels`` is skipped (returns None).
    """
    cache = work / f"level-{level:g}.json"
    if cache.exists() and not args.rerun:
        return json.loads(cache.read_text())
    if args.b_levels is not None and level not in args.b_levels:
        return None
    started = time.perf_counter()
    output = work / f"ft-{level:g}.safetensors"
    if level == 0.0:
        passes = finetune(_recipe(args, args.baseline, output, levels=[]), force=True, report=_progress).forward_passes
        entry = evaluate(output, args.test, WER_ONLY).levels[0]
    else:
        pruned = work / f"pruned-{level:g}.safetensors"
        prune_checkpoint(args.baseline, pruned, PruneOptions([level]))
        recipe = _recipe(args, pruned, output, sampling={"mode": "all", "loss_weights": [0.0, 1.0]})
        passes = finetune(recipe, force=True, report=_progress).forward_passes
        entry = evaluate(output, args.test, WER_ONLY).levels[-1]
    single = {"level": entry.level, "wer": entry.wer, "cer": entry.cer, "passes": passes,
              "seconds": round(time.perf_counter() - started, 1)}
    cache.write_text(json.dumps(single, indent=2) + "\n", encoding="utf-8")
    console.print(f"  (b) at {level:g}: WER {100 * single['wer']:.2f} % (CER {100 * single['cer']:.1f} %)")
    return single


def run_variant(name: str, args: argparse.Namespace, levels: list[float]) -> dict[str, Any] | None:
    """Train (if needed) and evaluate one variant; returns its result record (None: b not complete yet)."""
    work = args.out / name
    work.mkdir(parents=True, exist_ok=True)
    if name == "b":
        # One model per level, each fine-tuned alone for K steps. Each level is cached on its own (OUT/b/level-X.json)
        # so the single-sparsity runs can be done in pieces (--b-levels); b.json is written once all are there.
        singles = [run_single_level(level, args, work) for level in [0.0, *levels]]
        entries = [single for single in singles if single is not None]
        if len(entries) < len(singles):
            return None
        return {
            "variant": name,
            "label": LABELS[name],
            "steps": args.steps,
            "seconds": round(sum(e["seconds"] for e in entries), 1),
            "forward_backward_passes": sum(e["passes"] for e in entries),
            "levels": [{"level": e["level"], "wer": e["wer"], "cer": e["cer"]} for e in entries],
        }
    started = time.perf_counter()
    passes = 0
    bundle = work / "pruned.safetensors"
    prune_checkpoint(args.baseline, bundle, PruneOptions(levels))
    model = bundle
    if name != "a":
        extra: dict[str, Any] = {"sampling": {"mode": "sandwich" if name == "d" else "all", "random_levels": 1,
                                              "loss_weights": args.loss_weights}}
        if name in ("e1", "f"):
            extra["distillation"] = {"enabled": True, "weight": args.distill_weight, "temperature": 1.0}
        if name in ("e2", "f"):
            extra["schedule"] = {"enabled": True, "initial_fraction": 0.0, "start_step": 0,
                                 "end_step": max(2, args.steps * 2 // 3),
                                 "update_every": max(1, args.steps // 20)}
        model = work / "dsnn.safetensors"
        result = finetune(_recipe(args, bundle, model, **extra), force=True, report=_progress)
        passes = result.forward_passes
    entries = evaluate(model, args.test, WER_ONLY).levels
    return {
        "variant": name,
        "label": LABELS[name],
        "steps": 0 if name == "a" else args.steps,
        "seconds": round(time.perf_counter() - started, 1),
        "forward_backward_passes": passes,
        "levels": [{"level": e.level, "wer": e.wer, "cer": e.cer} for e in entries],
    }


def bar_check(results: dict[str, dict[str, Any]], levels: list[float]) -> list[str]:
    """The study's bar, as human-readable verdict lines."""
    if "b" not in results:
        return ["bar not checked: variant b missing"]
    wer = {k: {e["level"]: e["wer"] for e in r["levels"]} for k, r in results.items()}
    levels = [0.0, *levels]  # the bar holds at every level, dense included
    lines = []
    for candidate in ("c", "d", "e1", "e2", "f"):  # the bar names c and d; the e/f variants are the improvements
        if candidate not in wer:
            continue
        ok = all(wer[candidate][lv] <= wer["b"][lv] * 1.03 + 1e-12 for lv in levels)
        worst = max(wer[candidate][lv] / max(wer["b"][lv], 1e-12) - 1 for lv in levels)
        lines.append(f"{LABELS[candidate]} within 3 % relative of (b) at every level: {'YES' if ok else 'NO'} "
                     f"(worst {100 * worst:+.1f} % relative)")
    dsnn = [k for k in ("c", "d", "e1", "e2", "f") if k in wer]
    if dsnn:
        sparsest = levels[-1]
        best = min(dsnn, key=lambda k: wer[k][sparsest])
        verdict = "YES" if wer[best][sparsest] <= wer["b"][sparsest] else "NO"
        lines.append(f"best DSNN variant at {sparsest:g}: {LABELS[best]} with {100 * wer[best][sparsest]:.2f} % vs "
                     f"(b) {100 * wer['b'][sparsest]:.2f} %: {verdict}")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Run the requested variants and summarise every variant found in the output directory."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, required=True, help="dense dsnn checkpoint")
    parser.add_argument("--train", type=Path, required=True)
    parser.add_argument("--test", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=600, help="fine-tuning steps K per run")
    parser.add_argument("--levels", default="0.5,0.7,0.9")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--loss-weights", type=lambda v: [float(x) for x in v.split(",")], default=None,
                        help="DSNN variants: one loss weight per level, dense first (default: all 1)")
    parser.add_argument("--distill-weight", type=float, default=1.0, help="e1: weight of the distillation term")
    parser.add_argument("--batch-frames", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench-out/quality"))
    parser.add_argument("--rerun", action="store_true", help="recompute variants that already have results")
    parser.add_argument("--b-levels", type=lambda v: [float(x) for x in v.split(",")], default=None,
                        help="b: fine-tune only these levels now (0 = dense); the others are reused if cached")
    args = parser.parse_args(argv)
    levels = [float(v) for v in args.levels.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        if name not in VARIANTS:
            parser.error(f"unknown variant {name}")
        target = args.out / f"{name}.json"
        if target.exists() and not args.rerun:
            console.print(f"{LABELS[name]}: reusing {target}")
            continue
        console.print(f"[bold]{LABELS[name]}[/bold]")
        result = run_variant(name, args, levels)
        if result is None:
            done = sorted(p.stem for p in (args.out / name).glob("level-*.json"))
            console.print(f"{LABELS[name]}: incomplete ({', '.join(done) or 'no level'} done); not in the table yet")
            continue
        result["config"] = {"steps": args.steps, "lr": args.lr, "batch_frames": args.batch_frames,
                            "loss_weights": args.loss_weights, "distill_weight": args.distill_weight,
                            "seed": args.seed, "baseline": str(args.baseline), "test": str(args.test)}
        target.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    results = {p.stem: json.loads(p.read_text()) for p in sorted(args.out.glob("*.json")) if p.stem in VARIANTS}
    table = Table(title=f"WER % (CER %) on {args.test} (K = {args.steps} steps)", title_justify="left")
    for column in ("variant", "dense", *[f"{lv:g}" for lv in levels], "wall s", "fwd/bwd passes"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    markdown = ["| variant | dense | " + " | ".join(f"{lv:g}" for lv in levels) + " | wall s | fwd/bwd passes |",
                "|---|---:|" + "---:|" * len(levels) + "---:|---:|"]
    for name in VARIANTS:
        if name not in results:
            continue
        r = results[name]
        cells = [f"{100 * e['wer']:.2f} ({100 * e['cer']:.1f})" for e in r["levels"]]
        table.add_row(r["label"], *cells, f"{r['seconds']:.0f}", str(r["forward_backward_passes"]))
        markdown.append(f"| {r['label']} | " + " | ".join(cells) + f" | {r['seconds']:.0f} | "
                        f"{r['forward_backward_passes']} |")
    console.print(table)
    verdict = bar_check(results, levels)
    for line in verdict:
        console.print(line)
    (args.out / "summary.md").write_text("\n".join(markdown + [""] + [f"- {v}" for v in verdict]) + "\n")
    curves = [(results[k]["label"], [(e["level"], e["wer"]) for e in results[k]["levels"]]) for k in VARIANTS
              if k in results]
    if curves:
        plot_wer(curves, args.out / "quality.png", title=f"WER vs sparsity, K = {args.steps} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
