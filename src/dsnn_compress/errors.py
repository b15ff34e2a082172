"""Error types with documented exit codes.

Every failure the CLI reports is a :class:`DsnnError`; the CLI prints ``error: <message>`` (plus the
remedy) on one line of stderr and exits with the error's ``exit_code``:

* 1 - the command failed (bad file, bad data, I/O failure)
* 2 - usage error (bad option values, conflicting flags, output exists without ``--force``)
* 3 - a quality gate failed (``evaluate --max-wer`` / ``--max-wer-increase``)

(130 - interrupted with Ctrl-C - is the CLI's own, not an error type.) OS errors while writing an output (a full
disk, a quota) are DsnnErrors naming the output and the cause (``dsnn_compress.atomic.write_error``).
"""

from __future__ import annotations

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_GATE = 3


class DsnnError(Exception):
    """A failure with a user-facing message and an optional remedy."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        """The message and remedy as the single stderr line the CLI prints."""
        text = self.message.rstrip(".")
        if self.hint:
            text += f"; {self.hint}"
        return " ".join(text.split())


class UsageError(DsnnError):
    """Bad arguments: wrong option values, unsupported combinations, existing outputs."""

    exit_code = EXIT_USAGE


class GateError(DsnnError):
    """A quality gate (WER limit) was exceeded."""

    exit_code = EXIT_GATE
