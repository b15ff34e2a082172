"""`dsnn finetune` and `demo`: the commands that train."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..console import err, out
from .app import VerifyOption, app


@app.command()
def finetune(
    model: Annotated[Path | None, typer.Argument(
        metavar="[BUNDLE]", help="Bundle, dsnn checkpoint or HF directory to start from (overrides model.init).")
    ] = None,
    recipe_path: Annotated[Path | None, typer.Option("--recipe", "-r", help="YAML recipe.")] = None,
    data: Annotated[Path | None, typer.Option("--data", help="Training manifest (data.train).")] = None,
    dev: Annotated[Path | None, typer.Option("--dev", help="Dev manifest (data.dev).")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Output bundle (output).")] = None,
    levels: Annotated[str | None, typer.Option("--levels", help="Sparse levels, e.g. 0.5,0.7,0.9.")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="training.steps")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="optimizer.lr")] = None,
    sampling: Annotated[str | None, typer.Option("--sampling", help="all, sandwich or uniform.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="training.seed")] = None,
    keep: Annotated[str | None, typer.Option("--keep", help="last or best (best on dev).")] = None,
    teacher: Annotated[Path | None, typer.Option(
        "--teacher", help="Frozen original model every level learns from (distillation.teacher); with it --data may "
                          "be audio without transcripts (the teacher's transcripts become the targets).")] = None,
    set_values: Annotated[list[str] | None, typer.Option("--set", help="Override any recipe key: "
                                                                       "--set training.grad_clip=1.0")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the training state.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite output / discard a training state.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    verify: VerifyOption = True,
) -> None:
    """Joint multi-level DSNN fine-tuning (or dense training when the recipe has no levels)."""
    from ..display import TrainingDisplay
    from ..report.tables import to_json
    from ..training.options import finetune_summary, recipe_from_options
    from ..training.trainer import finetune as run_finetune

    flags = {"model": model, "data": data, "dev": dev, "output": output, "steps": steps, "lr": lr,
             "sampling": sampling, "seed": seed, "keep": keep, "teacher": teacher}
    recipe = recipe_from_options(recipe_path, flags, set_values or [], levels)
    with TrainingDisplay(json_mode=json_out) as display:
        result = run_finetune(recipe, resume=resume, force=force, report=display.report, verify=verify)
    summary = finetune_summary(result)
    if summary is None:  # a non-zero rank of a torchrun job: rank 0 reports
        return
    if json_out:
        print(to_json(summary))
    else:
        out.print(f"wrote {result.output} after {result.steps} steps in {result.seconds:.1f} s (log: {result.log})")


@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Directory for everything the demo writes.")] = Path(
        "dsnn-demo"),
    levels: Annotated[str, typer.Option("--levels", help="Sparse levels to show (levels of the shipped bundle).")] = (
        "0.5,0.7,0.9"),
    steps: Annotated[int, typer.Option("--steps", help="Steps of the live fine-tune (an illustration).")] = 40,
    max_eval: Annotated[int | None, typer.Option("--max-eval", help="Evaluate on the first N utterances only.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty --out directory.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """One-shot pruning vs the shipped DSNN bundle, plus a short live fine-tune of it, on embedded data, offline."""
    from ..core.levels import parse_levels
    from ..demo import comparison_rows, run_demo
    from ..display import TrainingDisplay
    from ..report.tables import demo_tables, to_json

    level_values = parse_levels(levels)
    with TrainingDisplay(json_mode=json_out) as display:
        result = run_demo(out_dir, level_values, steps, force, max_eval, report=display.report,
                          stage=lambda text: err.print(f"[bold]demo:[/bold] {text}"))
    rows = comparison_rows(result)
    if json_out:
        print(to_json({"directory": str(result.directory), "levels": [row.to_dict() for row in rows],
                       "live_steps": result.steps,
                       "shipped_steps": result.shipped_steps, "seconds": result.seconds,
                       "files": {k: str(v) for k, v in result.files.items()}}))
        return
    live_column = f"+ live {result.steps} steps"
    for table in demo_tables(rows, result.shipped, result.files, live_column, result.notes()):
        out.print(table)
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items())
    out.print(f"time: {timing}; total {sum(result.seconds.values()):.0f} s")


