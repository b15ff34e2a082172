"""`dsnn demo`: one-shot pruning vs the shipped DSNN bundle, plus a short live fine-tune, offline.

The package ships the embedded dense conformer-ctc (``assets/demo/model.safetensors``) and the DSNN bundle that
the default recipe (``recipes/dsnn-conformer.yaml``, 600 steps on the full tts-en-v1 train split) made of it
(``assets/demo/dsnn.safetensors``; provenance in ``assets/demo/README.md``). The demo

1. prunes the dense model one-shot at the bundle's levels,
2. fine-tunes the shipped bundle *live* for a few more steps on the 120 embedded training utterances - an
   illustration of joint training you can watch (as you would adapt the bundle to your own data), not the recipe:
   a low learning rate, distillation from the dense level and only the servable levels trained, so that dense stays
   better than the embedded model (``LIVE_RECIPE``; measured in README.md: within 3 words of the shipped bundle; a
   live fine-tune of the one-shot bundle on 120 utterances made dense worse at every setting measured),
3. evaluates one-shot pruning, the shipped bundle and the live fine-tune on the 50 embedded test utterances
   (the shipped bundle's speed in :data:`SPEED_REPEATS` interleaved timing passes, the only speed it shows),
4. exports the shipped bundle's servable levels as self-describing checkpoints.

Which levels are servable comes from the quality study (BENCHMARKS.md): at the shipped budget 0.5 and 0.7 work,
0.9 does not (about 100 % WER for every method tried on this corpus), so 0.9 is shown only labelled as such.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from .atomic import fresh_directory
from .core.levels import level_label, level_tag, same_level
from .errors import DsnnError, UsageError
from .evaluation.results import EvaluationReport
from .report.tables import DemoRow

SERVED_LEVELS = (0.5, 0.7)
"""Sparse levels of the shipped bundle that the model can serve (BENCHMARKS.md, quality study at 600 steps)."""
DEFAULT_LEVELS = (0.5, 0.7, 0.9)
DEFAULT_STEPS = 40
SPEED_REPEATS = 5
"""Interleaved timing passes of the shipped bundle's evaluation (``dsnn evaluate``'s default): its RTFx is shown
with the range, and a level is said to differ in speed from dense only where the ranges do not overlap."""
SHIPPED_BUNDLE = "dsnn.safetensors"

LIVE_RECIPE: dict[str, Any] = {
    "data": {"batch_frames": 4000, "spec_augment": True},
    "sampling": {"mode": "all"},
    "distillation": {"enabled": True, "weight": 1.0},
    "optimizer": {"lr": 3e-5, "weight_decay": 0.0},
    "lr_schedule": {"decay": "cosine", "min_lr_ratio": 0.2},
    "training": {"device": "cpu", "log_every": 5, "keep": "last", "grad_clip": 5.0},
}
"""The live fine-tune (measured choice: see the demo paragraph of README.md); levels not servable get loss weight 0."""


def demo_assets() -> Path:
    """Directory of the embedded demo model, shipped bundle and data (inside the installed package)."""
    return Path(str(resources.files("dsnn_compress") / "assets" / "demo"))


def servable(level: float) -> bool:
    """True for the dense level and the levels in :data:`SERVED_LEVELS`."""
    return same_level(level, 0.0) or any(same_level(level, s) for s in SERVED_LEVELS)


@dataclass
class DemoResult:
    """Where the demo wrote its files and what it measured (three evaluation reports on the same utterances)."""

    directory: Path
    files: dict[str, Path]
    oneshot: EvaluationReport
    live: EvaluationReport
    shipped: EvaluationReport
    seconds: dict[str, float]
    steps: int
    train_utterances: int
    shipped_steps: int | None

    def sections(self) -> list[tuple[str, EvaluationReport]]:
        """The three evaluation reports with their titles, in the order the demo tells the story."""
        budget = f"{self.shipped_steps} steps" if self.shipped_steps else "trained"
        return [("One-shot pruning (no training)", self.oneshot),
                (f"Shipped DSNN bundle: recipes/dsnn-conformer.yaml, {budget} on the full tts-en-v1 train split",
                 self.shipped),
                (f"Live fine-tune: the shipped bundle, {self.steps} more steps on {self.train_utterances} embedded "
                 "training utterances (an illustration, not the recipe; servable levels only)", self.live)]

    def notes(self) -> list[str]:
        """What the columns are and which levels are served (the caption of the demo's table)."""
        budget = f", {self.shipped_steps} steps" if self.shipped_steps else ""
        served = ", ".join(level_label(level) for level in (0.0, *SERVED_LEVELS))
        return [f"shipped bundle: the default recipe{budget} on the 2.2 h train split (assets/demo/README.md).",
                f"+ live: the shipped bundle fine-tuned {self.steps} more steps on {self.train_utterances} embedded "
                "utterances, an illustration of joint training (not the recipe).",
                f"Served levels: {served}; the bundle's other levels are not servable at this budget "
                "(quality study, BENCHMARKS.md)."]


def shipped_info(bundle: Path) -> tuple[tuple[float, ...], int | None]:
    """The sparse levels of the shipped bundle and the fine-tuning steps that made it, from its metadata."""
    from .core.safetensors_io import read_safetensors_metadata

    meta = read_safetensors_metadata(bundle)
    try:
        levels = tuple(float(v) for v in json.loads(meta["levels"]))
    except (KeyError, ValueError, TypeError) as exc:
        raise DsnnError(f"the shipped demo bundle {bundle} has no valid levels", "reinstall dsnn-compress") from exc
    try:
        steps = int(json.loads(meta["training"])["steps"])
    except (KeyError, ValueError, TypeError):
        steps = None
    return levels, steps


def check_levels(levels: Sequence[float], available: Sequence[float]) -> tuple[float, ...]:
    """``levels`` sorted, each one a level of the shipped bundle (UsageError otherwise)."""
    chosen = tuple(sorted(levels))
    known = ", ".join(f"{v:g}" for v in available)
    for level in chosen:
        if not any(same_level(level, v) for v in available):
            raise UsageError(f"level {level:g} is not in the shipped demo bundle ({known})",
                             f"choose --levels among {known}")
    return chosen


def live_recipe(assets: Path, init: Path, output: Path, levels: Sequence[float], steps: int) -> Any:
    """The live fine-tune's recipe: :data:`LIVE_RECIPE` from bundle ``init`` (sparse ``levels``) on the embedded
    training utterances for ``steps`` steps; levels that are not servable get loss weight 0."""
    from .training.recipe import recipe_from_dict

    spec = json.loads(json.dumps(LIVE_RECIPE))
    spec["data"]["train"] = str(assets / "train.jsonl")
    spec["model"] = {"init": str(init)}
    spec["sampling"]["loss_weights"] = [1.0] + [1.0 if servable(level) else 0.0 for level in levels]
    spec["lr_schedule"]["warmup_steps"] = min(5, steps)
    spec["training"]["steps"] = steps
    spec["output"] = str(output)
    return recipe_from_dict(spec, base_dir=output.parent)


def run_demo(
    out_dir: str | Path = "dsnn-demo",
    levels: Sequence[float] = DEFAULT_LEVELS,
    steps: int = DEFAULT_STEPS,
    force: bool = False,
    max_eval: int | None = None,
    report: Callable[[str, dict[str, Any]], None] | None = None,
    stage: Callable[[str], None] | None = None,
) -> DemoResult:
    """Run the whole flow into ``out_dir``: pruned and live bundles, reports, per-level checkpoints.

    ``out_dir`` is checked before any work; it is filled all or nothing (:func:`~dsnn_compress.atomic.fresh_directory`).
    """
    assets = demo_assets()
    model, shipped = assets / "model.safetensors", assets / SHIPPED_BUNDLE
    for path in (model, shipped):
        if not path.is_file():
            raise DsnnError(f"the embedded demo file {path} is missing", "reinstall dsnn-compress")
    available, shipped_steps = shipped_info(shipped)
    levels = check_levels(levels, available)
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
        return _demo_steps(out, assets, ShippedBundle(shipped, available, shipped_steps), levels, steps, max_eval,
                           report, stage)


@dataclass(frozen=True)
class ShippedBundle:
    """The DSNN bundle shipped beside the dense model: its path, trained levels and training steps."""

    path: Path
    levels: tuple[float, ...]
    steps: int | None


def _demo_steps(out: Path, assets: Path, bundle: ShippedBundle, levels: Sequence[float], steps: int,
                max_eval: int | None, report: Callable[[str, dict[str, Any]], None] | None,
                stage: Callable[[str], None] | None) -> DemoResult:
    """The demo's work inside its (fresh) output directory ``out``."""
    shipped, available, shipped_steps = bundle.path, bundle.levels, bundle.steps
    from .evaluation.evaluate import EvaluateOptions, evaluate
    from .export.formats import export_bundle
    from .prune import PruneOptions, prune_checkpoint
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
    files: dict[str, Path] = {"shipped DSNN bundle": shipped}
    shown = [0.0, *levels]
    served = [level for level in shown if servable(level)]

    clock = time.perf_counter()
    say("pruning the embedded dense model one-shot")
    files["one-shot bundle"] = out / "pruned.safetensors"
    prune_checkpoint(model, files["one-shot bundle"], PruneOptions(list(levels), command=["dsnn", "demo"]))
    seconds["prune"] = time.perf_counter() - clock

    clock = time.perf_counter()
    trained = ", ".join(level_label(level) for level in (0.0, *available) if servable(level))
    say(f"live fine-tune (an illustration): the shipped bundle, {steps} more steps on the embedded training "
        f"utterances, levels {trained}")
    files["live bundle"] = out / "live.safetensors"
    finetune(live_recipe(assets, shipped, files["live bundle"], available, steps), force=True, report=report)
    seconds["live fine-tune"] = time.perf_counter() - clock

    clock = time.perf_counter()
    say("evaluating one-shot pruning, the shipped bundle and the live fine-tune")
    # only the shipped bundle's speed is shown (and compared with dense), so only it is timed repeatedly
    oneshot = evaluate(files["one-shot bundle"], eval_manifest, EvaluateOptions(levels=shown, repeats=1))
    shipped_report = evaluate(shipped, eval_manifest, EvaluateOptions(levels=shown, repeats=SPEED_REPEATS))
    live = evaluate(files["live bundle"], eval_manifest, EvaluateOptions(levels=served, repeats=1))
    seconds["evaluate"] = time.perf_counter() - clock
    train_utterances = len((assets / "train.jsonl").read_text(encoding="utf-8").splitlines())
    result = DemoResult(out, files, oneshot, live, shipped_report, seconds, steps, train_utterances, shipped_steps)
    from .report.tables import demo_markdown, to_json

    files["report (JSON)"] = out / "report.json"
    files["report (Markdown)"] = out / "report.md"
    files["report (JSON)"].write_text(to_json({"oneshot": oneshot.to_dict(), "live": live.to_dict(),
                                               "shipped": shipped_report.to_dict()}) + "\n", encoding="utf-8")
    files["report (Markdown)"].write_text(demo_markdown(result.sections()), encoding="utf-8")

    clock = time.perf_counter()
    say("exporting the shipped bundle's servable levels as self-describing checkpoints")
    export_dir = out / "export"
    export_dir.mkdir()
    for level in served:
        tag = level_tag(level)
        files[f"level {level_label(level)} checkpoint"] = export_dir / f"model-{tag}.safetensors"
        export_bundle(shipped, tag, files[f"level {level_label(level)} checkpoint"], "checkpoint", force=True)
    seconds["export"] = time.perf_counter() - clock
    return result


def comparison_rows(result: DemoResult) -> list[DemoRow]:
    """One row per shown level: WER one-shot / live (``None`` where not trained live), and the shipped bundle's
    result (WER, CER, size, speed)."""
    rows = []
    for before, after in zip(result.oneshot.levels, result.shipped.levels, strict=True):
        live = result.live.level(after.level)
        rows.append(DemoRow(after.level, servable(after.level), before.wer, live.wer if live else None, after))
    return rows
