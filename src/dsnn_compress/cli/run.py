"""`dsnn evaluate` and `transcribe`: the commands that run a model's levels on audio."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ..console import err, out, progress

if TYPE_CHECKING:
    from ..atomic import StagedOutputs

from .app import KernelsOption, ModelArgument, VerifyOption, app


def write_report_file(path: Path, text: str, staged: StagedOutputs) -> None:
    """Write one report: to stdout for ``-``, else staged with the other report files (all or nothing)."""
    from ..atomic import atomic_write_text

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
    runtime: Annotated[str, typer.Option("--runtime", help="dsnn (this package's PyTorch model) or faster-whisper "
                                                           "(Whisper: each level exported to a faster-whisper "
                                                           "directory and transcribed there).")] = "dsnn",
    compute_type: Annotated[str | None, typer.Option(
        "--compute-type", help="--runtime faster-whisper: CTranslate2 compute type (int8, int8_float32, float32...; "
                               "default int8).")] = None,
) -> None:
    """WER, CER, S/D/I, nonzero parameters and RTFx per sparsity level; optional CI gates (exit 3)."""
    from ..atomic import StagedOutputs, check_report_path
    from ..evaluation.evaluate import EvaluateOptions, gate_failure
    from ..evaluation.evaluate import evaluate as run_evaluate
    from ..report.plot import plot_wer, read_report, require_matplotlib, wer_curve
    from ..report.tables import evaluation_markdown, evaluation_table, long_form_cuts, to_json

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
                                  kernels=kernels, verify=verify, compact=compact, repeats=repeats,
                                  runtime=runtime, compute_type=compute_type)
        report = run_evaluate(model, data, options, on_progress=on_progress)
    with StagedOutputs() as staged:  # the report files appear together or not at all
        if json_path is not None:
            write_report_file(json_path, to_json(report.to_dict()) + "\n", staged)
        if markdown_path is not None:
            write_report_file(markdown_path, evaluation_markdown(report), staged)
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
                      f"window were decoded in {long.chunks} chunks ({long_form_cuts(report)}): "
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
    from ..evaluation.transcribe import transcribe as run_transcribe
    from ..report.tables import to_json

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


