"""`dsnn prune`, `inspect` and `export`: the commands that write and read bundles."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..console import err, out, progress
from .app import VerifyOption, app, command_line, split_patterns


@app.command()
def prune(
    ctx: typer.Context,
    checkpoint: Annotated[Path, typer.Argument(
        metavar="CHECKPOINT",
        help="Dense checkpoint: .safetensors, .pt/.pth/.bin/.ckpt, or a Hugging Face / faster-whisper model "
             "directory.")],
    levels: Annotated[str, typer.Option("--levels", "-l", help="Sparse levels, e.g. 0.5,0.7,0.9.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Bundle file to write (.safetensors).")],
    allocation: Annotated[str, typer.Option(help="How weights compete: per-layer (each tensor), global (all "
                                                 "tensors) or per-row (each output row, as Wanda).")] = "per-layer",
    granularity: Annotated[str, typer.Option(help="weight (per-weight masks) or structured (whole "
                                                  "neurons/heads/channels: levels export as smaller, faster "
                                                  "models).")] = "weight",
    method: Annotated[str, typer.Option(help="Weight score: magnitude, or wanda (|w| x input RMS on calibration "
                                             "audio; needs --calibration).")] = "magnitude",
    calibration: Annotated[Path | None, typer.Option(
        "--calibration", help="Manifest of calibration audio (transcripts not needed) the model runs on for "
                              "--method wanda and --profile sensitivity.")] = None,
    calibration_utterances: Annotated[int, typer.Option(
        help="Calibration clips used (the first usable ones).")] = 64,
    profile: Annotated[str, typer.Option(help="Per-layer sparsity of each level: uniform, owl (outlier-weighted, "
                                              "from the scores) or sensitivity (measured calibration loss; "
                                              "needs --calibration).")] = "uniform",
    depth: Annotated[str | None, typer.Option(
        "--depth", help="Structured: decoder layers dropped per level, LEVEL:N,... (nested; a level not named drops "
                        "as many as the nearest denser named level), or auto (floor(level x layers), order measured "
                        "on --calibration).")] = None,
    encoder_depth: Annotated[str | None, typer.Option(
        "--encoder-depth", help="Structured: encoder layers dropped per level, as --depth.")] = None,
    depth_order: Annotated[str, typer.Option(
        help="Which layers go first: importance (measured on --calibration), first-last (keep the first and last "
             "layers longest, as distil-whisper), auto (importance when --calibration is given).")] = "auto",
    include: Annotated[list[str] | None, typer.Option("--include", help="Glob on parameter names to prune "
                                                                        "(structured: on group set names; "
                                                                        "repeatable).")] = None,
    exclude: Annotated[list[str] | None, typer.Option("--exclude", help="Glob on names to keep dense "
                                                                        "(repeatable).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    verify: VerifyOption = True,
) -> None:
    """Score weights once and write one bundle holding every nested sparsity level."""
    from ..core.levels import parse_levels
    from ..prune import PruneOptions, PruneProgress, prune_checkpoint
    from ..report.tables import inspect_report, levels_table, to_json

    options = PruneOptions(parse_levels(levels), allocation, granularity, split_patterns(include),
                           split_patterns(exclude), method, profile, calibration, calibration_utterances,
                           depth=depth, encoder_depth=encoder_depth, depth_order=depth_order,
                           command=command_line(ctx))
    options.check()
    notes: list[str] = []
    with progress() as bar:
        task = bar.add_task("loading", total=None, info=str(checkpoint))

        def on_stage(stage: str) -> None:
            bar.update(task, description=stage, info=str(output) if stage == "writing" else "", total=None,
                       completed=0)

        bundle = prune_checkpoint(checkpoint, output, options, force=force, verify=verify,
                                  progress=PruneProgress(on_stage, lambda done, total: bar.update(
                                      task, total=total, completed=done), notes.append))
    report = inspect_report(bundle, output.stat().st_size)
    if json_out:
        print(to_json({k: v for k, v in report.items() if k != "tensors"}))
        return
    for note in notes:
        err.print(f"note: {note}", highlight=False)
    out.print(levels_table(report, f"wrote {output} ({len(bundle.codes)} pruned tensors)"))


@app.command()
def inspect(
    bundle_path: Annotated[Path, typer.Argument(metavar="BUNDLE", help="A DSNN bundle.")],
    layers: Annotated[bool, typer.Option("--layers", help="Also show every tensor.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    verify: VerifyOption = True,
) -> None:
    """Show levels, achieved sparsity and what was pruned; check the bundle's checksums (exit 1 naming the damaged
    tensors)."""
    from ..report.tables import inspect_report, print_inspect, to_json
    from ..sources.opener import open_source

    bundle = open_source(bundle_path, role="bundle", verify=verify).require_bundle()
    report = inspect_report(bundle, bundle_path.stat().st_size)
    if json_out:
        if not layers:
            report = {k: v for k, v in report.items() if k != "tensors"}
        print(to_json(report))
        return
    print_inspect(report, bundle.levels, layers, out)


@app.command()
def export(
    bundle_path: Annotated[Path, typer.Argument(metavar="BUNDLE", help="A DSNN bundle.")],
    level: Annotated[str, typer.Option("--level", help="Level to export, e.g. 0.7 (0 = dense; any value up to the "
                                                       "largest level), or 'all' (the trained levels).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output file (with --level all: the name "
                                                                "pattern, e.g. model.onnx -> model-0.7.onnx).")],
    fmt: Annotated[str | None, typer.Option("--format", help="safetensors | torch | checkpoint | onnx | hf "
                                                                 "(default: from the extension; hf: a Hugging Face "
                                                                 "save_pretrained directory).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.")] = False,
    verify: VerifyOption = True,
    compress: Annotated[bool, typer.Option("--compress", help="Store pruned weights in compressed-tensors' "
                                                               "sparse-bitmask layout (safetensors, checkpoint, "
                                                               "hf).")] = False,
) -> None:
    """Write a level as a plain state dict, a self-describing checkpoint, ONNX or a Hugging Face directory."""
    from ..export.formats import export_bundle

    with progress() as bar:
        bar.add_task("exporting", total=None, info=str(output))
        written = export_bundle(bundle_path, level, output, fmt, force, compress, verify=verify)
    for path in written:
        err.print(f"wrote {path}", highlight=False)


