"""The `dsnn` command line: thin Typer commands over the library functions.

Exit codes: 0 success, 1 failure, 2 usage error, 3 quality gate failed, 130 interrupted. Errors print one line
``error: ...`` on stderr; ``--debug`` (anywhere on the command line) shows the traceback instead.
"""

from __future__ import annotations

import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

try:  # typer >= 0.20 vendors its own click
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import exceptions as click_exceptions

from . import __version__
from .console import err, out, progress
from .errors import EXIT_FAILURE, EXIT_USAGE, DsnnError

if TYPE_CHECKING:
    from .atomic import StagedOutputs

app = typer.Typer(
    name="dsnn",
    help="Dynamic Sparsity Neural Networks for ASR: nested sparsity levels in one safetensors bundle.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        print(f"dsnn-compress {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    """Dynamic Sparsity Neural Networks for ASR."""


@dataclass(frozen=True)
class Invocation:
    """The arguments :func:`main` runs (``sys.argv`` is not them when ``main(argv)`` is called in-process), handed
    to the commands as the click context's ``obj``."""

    args: tuple[str, ...]


def _command_line(ctx: typer.Context) -> list[str]:
    """The command line as a bundle records it: ``dsnn`` and the arguments, without ``--debug``."""
    args = ctx.obj.args if isinstance(ctx.obj, Invocation) else tuple(sys.argv[1:])
    return ["dsnn", *[a for a in args if a != "--debug"]]


KernelsOption = Annotated[str, typer.Option(
    "--kernels", help="dense | sparse | auto: how pruned layers compute at sparse levels (sparse: CSR weights; auto: "
                      "the faster per layer, timed at load).")]
ModelArgument = Annotated[Path, typer.Argument(
    metavar="MODEL", help="A DSNN bundle or checkpoint, or a model directory (Hugging Face CTC or Whisper, "
                          "faster-whisper).")]
VerifyOption = Annotated[bool, typer.Option(
    "--verify/--no-verify", help="Check the input's checksums before using it (default); files without checksums "
                                 "are read unverified.")]


def _split_patterns(values: list[str] | None) -> list[str]:
    patterns: list[str] = []
    for value in values or []:
        patterns.extend(p.strip() for p in value.split(",") if p.strip())
    return patterns


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
    from .core.levels import parse_levels
    from .prune import PruneOptions, PruneProgress, prune_checkpoint
    from .report.tables import inspect_report, levels_table, to_json

    options = PruneOptions(parse_levels(levels), allocation, granularity, _split_patterns(include),
                           _split_patterns(exclude), method, profile, calibration, calibration_utterances,
                           command=_command_line(ctx))
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
    from .report.tables import inspect_report, print_inspect, to_json
    from .sources.opener import open_source

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
    from .export.formats import export_bundle

    with progress() as bar:
        bar.add_task("exporting", total=None, info=str(output))
        written = export_bundle(bundle_path, level, output, fmt, force, compress, verify=verify)
    for path in written:
        err.print(f"wrote {path}", highlight=False)


def _write_report_file(path: Path, text: str, staged: StagedOutputs) -> None:
    from .atomic import atomic_write_text

    if str(path) == "-":
        # not through rich: it would wrap long lines at the console width and replace :emoji: codes,
        # which corrupts the JSON
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    atomic_write_text(staged.file(path), text)


@app.command()
def evaluate(
    model: ModelArgument,
    data: Annotated[Path, typer.Option("--data", "-d", help="Manifest: NeMo .jsonl, Kaldi dir or audiofolder.")],
    levels: Annotated[str, typer.Option("--levels", help="all (the trained levels), or a comma list such as "
                                                         "0,0.5,0.8 (any value up to the largest level).")] = "all",
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the JSON report here ('-' = stdout).")] = None,
    markdown_path: Annotated[Path | None, typer.Option("--markdown", help="Write a Markdown report here.")] = None,
    max_wer: Annotated[list[str] | None, typer.Option("--max-wer", help="Gate LEVEL:PCT, e.g. 0.9:30 "
                                                                         "(repeatable; LEVEL may be 'all').")] = None,
    max_wer_increase: Annotated[list[str] | None, typer.Option(
        "--max-wer-increase", help="Gate LEVEL:PCT: WER points above dense allowed (repeatable).")] = None,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Skip and list unusable utterances.")] = False,
    normalizer: Annotated[str | None, typer.Option(help="Text normaliser (default: the model's).")] = None,
    batch_frames: Annotated[int, typer.Option(help="Padded feature frames per batch.")] = 30_000,
    details: Annotated[bool, typer.Option("--details", help="Put every hypothesis in the JSON report.")] = False,
    plot: Annotated[Path | None, typer.Option("--plot", help="Draw WER vs sparsity to this PNG (needs matplotlib).")
                    ] = None,
    plot_with: Annotated[list[Path] | None, typer.Option("--plot-with", help="Earlier report JSON to draw on the "
                                                                             "same plot (repeatable).")] = None,
    audio_ctx: Annotated[int | None, typer.Option("--audio-ctx", help="Whisper: encoder positions (20 ms each, "
                                                                      "500 = 10 s) instead of the model's.")] = None,
    kernels: KernelsOption = "dense",
    verify: VerifyOption = True,
    compact: Annotated[bool, typer.Option("--compact", help="Structured bundles: run each level as its physically "
                                                           "smaller model (RTFx of what export writes).")] = False,
    repeats: Annotated[int, typer.Option("--repeats", help="Timing passes over the levels, interleaved (the first "
                                                           "also scores): RTFx is their median, with the range.")
                       ] = 5,
) -> None:
    """WER, CER, S/D/I, nonzero parameters and RTFx per sparsity level; optional CI gates (exit 3)."""
    from .atomic import StagedOutputs, check_report_path
    from .evaluation.evaluate import EvaluateOptions, gate_failure
    from .evaluation.evaluate import evaluate as run_evaluate
    from .report.plot import plot_wer, read_report, require_matplotlib, wer_curve
    from .report.tables import evaluation_markdown, evaluation_table, to_json

    if plot_with and plot is None:
        raise typer.BadParameter("--plot-with needs --plot F.png", param_hint="--plot-with")
    earlier = [(path.stem, read_report(path)) for path in plot_with or []]
    for path in (json_path, markdown_path, plot):
        if path is not None and str(path) != "-":
            check_report_path(path)
    if plot is not None:
        require_matplotlib()
    with progress() as bar:
        task = bar.add_task("evaluating", total=None, info="")

        def on_progress(stage: str, done: int, total: int) -> None:
            bar.update(task, description=stage, completed=done, total=total)

        options = EvaluateOptions(levels=levels, batch_frames=batch_frames, skip_bad=skip_bad, normalizer=normalizer,
                                  details=details, max_wer=tuple(max_wer or ()),
                                  max_wer_increase=tuple(max_wer_increase or ()), audio_ctx=audio_ctx,
                                  kernels=kernels, verify=verify, compact=compact, repeats=repeats)
        report = run_evaluate(model, data, options, on_progress=on_progress)
    with StagedOutputs() as staged:  # the report files appear together or not at all
        if json_path is not None:
            _write_report_file(json_path, to_json(report.to_dict()) + "\n", staged)
        if markdown_path is not None:
            _write_report_file(markdown_path, evaluation_markdown(report), staged)
        if plot is not None:
            plot_wer([(model.stem, wer_curve(report)), *((name, wer_curve(old)) for name, old in earlier)],
                     staged.file(plot))
    if json_path is None or str(json_path) != "-":
        out.print(evaluation_table(report))
        if report.skipped:
            err.print(f"skipped {len(report.skipped)} utterance(s): "
                      + ", ".join(s.id for s in report.skipped[:10])
                      + (" ..." if len(report.skipped) > 10 else ""))
        if report.long_form is not None:
            long = report.long_form
            err.print(f"note: {len(long.utterances)} utterance(s) longer than the model's {long.window_seconds:g} s "
                      f"window were decoded in {long.chunks} chunks (cut at pauses): "
                      + ", ".join(long.utterances[:10]) + (" ..." if len(long.utterances) > 10 else ""),
                      highlight=False)
    failure = gate_failure(report.gates)
    if failure is not None:
        raise failure


@app.command()
def transcribe(
    model: ModelArgument,
    audio: Annotated[list[Path], typer.Argument(metavar="AUDIO...", help="Audio files (WAV/FLAC/OGG).")],
    level: Annotated[str, typer.Option("--level", help="Sparsity level to run at (0 = dense; any value up to the "
                                                       "largest trained level).")] = "0",
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of FILE<TAB>TEXT lines.")] = False,
    audio_ctx: Annotated[int | None, typer.Option("--audio-ctx", help="Whisper: encoder positions (20 ms each) "
                                                                      "instead of the model's.")] = None,
    kernels: KernelsOption = "dense",
    verify: VerifyOption = True,
) -> None:
    """Print one transcript per audio file: FILE<TAB>TRANSCRIPT."""
    from .evaluation.transcribe import transcribe as run_transcribe
    from .report.tables import to_json

    results = run_transcribe(model, audio, level, audio_ctx, kernels, verify=verify)
    if json_out:
        print(to_json(results))  # plain print: rich would wrap long lines inside JSON strings
        return
    if results and "kernels" in results[0]:
        info = results[0]["kernels"]
        err.print(f"note: --kernels {info['mode']}: {info['sparse_layers']} layer(s) compute with sparse weights",
                  highlight=False)
    for item in results:
        print(f"{item['file']}\t{item['text']}")


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
    from .display import TrainingDisplay
    from .report.tables import to_json
    from .training.options import finetune_summary, recipe_from_options
    from .training.trainer import finetune as run_finetune

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
    from .core.levels import parse_levels
    from .demo import comparison_rows, run_demo
    from .display import TrainingDisplay
    from .report.tables import demo_tables, to_json

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


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app and turn errors into one stderr line and an exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("DSNN_DEBUG") == "1"
    args = [a for a in args if a != "--debug"]
    command = typer.main.get_command(app)
    try:
        code = command.main(args=args, prog_name="dsnn", standalone_mode=False, obj=Invocation(tuple(args)))
        if code == 130:  # typer turns Ctrl-C into this return value when not standalone
            raise KeyboardInterrupt
    except DsnnError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        print("error: aborted", file=sys.stderr)
        return 130
    except click_exceptions.ClickException as exc:
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
            print(ctx.get_help())
            return 0
        if debug:
            traceback.print_exc()
        hint = ""
        if ctx is not None:
            hint = f"; see `{ctx.command_path} --help`"
        message = " ".join(exc.format_message().split()).rstrip(".")
        print(f"error: {message}{hint}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, click_exceptions.UsageError) else EXIT_FAILURE
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("error: out of memory; use a machine with more RAM or a smaller model", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as exc:  # noqa: BLE001 - the last line of defence must not print a traceback
        if debug:
            traceback.print_exc()
        print(f"error: unexpected {type(exc).__name__}: {' '.join(str(exc).split())[:300]}; "
              "rerun with --debug and report it", file=sys.stderr)
        return EXIT_FAILURE
    return 0


if __name__ == "__main__":
    sys.exit(main())
