"""`dsnn demo`: prune -> joint fine-tune (short) -> evaluate -> export on the embedded model and data, offline."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from .atomic import fresh_directory
from .errors import DsnnError, UsageError

DEFAULT_LEVELS = (0.5, 0.7, 0.9)
DEFAULT_STEPS = 40


def demo_assets() -> Path:
    """Directory of the embedded demo model and data (inside the installed package)."""
    return Path(str(resources.files("dsnn_compress") / "assets" / "demo"))


@dataclass
class DemoResult:
    """Where the demo wrote its files and what it measured."""

    directory: Path
    files: dict[str, Path]
    oneshot: dict[str, Any]
    finetuned: dict[str, Any]
    seconds: dict[str, float]


def run_demo(
    out_dir: str | Path = "dsnn-demo",
    levels: Sequence[float] = DEFAULT_LEVELS,
    steps: int = DEFAULT_STEPS,
    force: bool = False,
    max_eval: int | None = None,
    report: Callable[[str, dict[str, Any]], None] | None = None,
    stage: Callable[[str], None] | None = None,
) -> DemoResult:
    """Run the whole flow into ``out_dir``: bundle, fine-tuned bundle, reports, per-level checkpoints.

    ``out_dir`` is checked before any work; it is filled all or nothing (:func:`~dsnn_compress.atomic.fresh_directory`).
    """
    assets = demo_assets()
    model = assets / "model.safetensors"
    if not model.is_file():
        raise DsnnError(f"the embedded demo model {model} is missing", "reinstall dsnn-compress")
    if steps < 1:
        raise UsageError("--steps must be at least 1")
    if max_eval is not None and max_eval < 1:
        raise UsageError(f"--max-eval must be at least 1, got {max_eval}", "leave it out to evaluate every utterance")
    out = Path(out_dir).absolute()
    if out.exists() and not out.is_dir():
        raise UsageError(f"demo output {out} is a file, not a directory", "choose another --out")
    if out.exists() and any(out.iterdir()) and not force:
        raise UsageError(f"demo directory {out} is not empty", "pass --force to replace it or choose --out")
    with fresh_directory(out, force):  # all or nothing: a failed demo leaves --out as it was
        return _demo_steps(out, assets, levels, steps, max_eval, report, stage)


def _demo_steps(out: Path, assets: Path, levels: Sequence[float], steps: int, max_eval: int | None,
                report: Callable[[str, dict[str, Any]], None] | None, stage: Callable[[str], None] | None
                ) -> DemoResult:
    """The demo's work inside its (fresh) output directory ``out``."""
    from .evaluation.evaluate import evaluate
    from .export.formats import export_bundle
    from .prune import prune_checkpoint
    from .training.recipe import recipe_from_dict
    from .training.trainer import finetune

    model = assets / "model.safetensors"
    eval_manifest = assets / "eval.jsonl"
    if max_eval is not None:
        lines = eval_manifest.read_text(encoding="utf-8").splitlines()[:max_eval]
        eval_dir = out / "eval-subset"
        eval_dir.mkdir()
        eval_manifest = eval_dir / "eval.jsonl"
        eval_manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
        (eval_dir / "eval").symlink_to(assets / "eval", target_is_directory=True)
    say = stage or (lambda _s: None)
    seconds: dict[str, float] = {}
    files: dict[str, Path] = {}

    clock = time.perf_counter()
    say("pruning the embedded dense model")
    files["pruned bundle"] = out / "pruned.safetensors"
    prune_checkpoint(model, list(levels), files["pruned bundle"], command=["dsnn", "demo"])
    seconds["prune"] = time.perf_counter() - clock

    clock = time.perf_counter()
    say(f"joint fine-tuning of all {len(levels) + 1} levels for {steps} steps")
    files["fine-tuned bundle"] = out / "dsnn.safetensors"
    recipe = recipe_from_dict({
        "data": {"train": str(assets / "train.jsonl"), "batch_frames": 4000, "spec_augment": False},
        "model": {"init": str(files["pruned bundle"])},
        "sampling": {"mode": "all"},
        "optimizer": {"lr": 5e-4, "weight_decay": 0.0},
        "lr_schedule": {"warmup_steps": min(5, steps), "decay": "cosine", "min_lr_ratio": 0.2},
        "training": {"steps": steps, "device": "cpu", "log_every": 5, "keep": "last", "grad_clip": 5.0},
        "output": str(files["fine-tuned bundle"]),
    }, base_dir=out)
    finetune(recipe, force=True, report=report)
    seconds["finetune"] = time.perf_counter() - clock

    clock = time.perf_counter()
    say("evaluating every level before and after fine-tuning")
    oneshot = evaluate(files["pruned bundle"], eval_manifest)
    finetuned = evaluate(files["fine-tuned bundle"], eval_manifest)
    seconds["evaluate"] = time.perf_counter() - clock
    from .report.tables import evaluation_markdown, to_json

    files["report (JSON)"] = out / "report.json"
    files["report (Markdown)"] = out / "report.md"
    files["report (JSON)"].write_text(to_json({"oneshot": oneshot, "finetuned": finetuned}) + "\n", encoding="utf-8")
    files["report (Markdown)"].write_text(
        "## One-shot pruning\n\n" + evaluation_markdown(oneshot) + "\n## After joint fine-tuning\n\n"
        + evaluation_markdown(finetuned), encoding="utf-8")

    clock = time.perf_counter()
    say("exporting every level as a self-describing checkpoint")
    export_dir = out / "export"
    export_dir.mkdir()
    target = export_dir / "model.safetensors"
    written = export_bundle(files["fine-tuned bundle"], "all", target, "checkpoint", force=True)
    for level, path in zip((0.0, *levels), written, strict=True):
        files[f"level {level:g} checkpoint"] = path
    seconds["export"] = time.perf_counter() - clock
    return DemoResult(out, files, oneshot, finetuned, seconds)


def comparison_rows(oneshot: dict[str, Any], finetuned: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per level: WER one-shot vs after fine-tuning, nonzero parameters, RTFx."""
    rows = []
    for before, after in zip(oneshot["levels"], finetuned["levels"], strict=True):
        rows.append({"level": after["level"], "wer_oneshot": before["wer"], "wer_finetuned": after["wer"],
                     "cer_finetuned": after["cer"], "nonzero_params": after["nonzero_params"],
                     "rtfx": after["rtfx"]})
    return rows
