"""The Typer application of `dsnn`, its root options and what every command shares (option types, the command
line a bundle records)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from .. import __version__

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


def command_line(ctx: typer.Context) -> list[str]:
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


def split_patterns(values: list[str] | None) -> list[str]:
    """Comma-separated values of a repeatable option, flattened and stripped."""
    patterns: list[str] = []
    for value in values or []:
        patterns.extend(p.strip() for p in value.split(",") if p.strip())
    return patterns


