"""The `dsnn` command line: thin Typer commands over the library functions.

Exit codes: 0 success, 1 failure, 2 usage error, 3 quality gate failed, 130 interrupted. Errors print one line
``error: ...`` on stderr; ``--debug`` (anywhere on the command line) shows the traceback instead.
"""

from __future__ import annotations

import os
import sys
import traceback

import typer

try:  # typer >= 0.20 vendors its own click
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import exceptions as click_exceptions

from ..errors import EXIT_FAILURE, EXIT_USAGE, DsnnError
from . import models, run, train  # noqa: F401 - importing them registers the commands on the app
from .app import Invocation, app

__all__ = ["app", "main"]


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


