"""Atomic file output: write to a temporary file beside the target, fsync, rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import DsnnError, UsageError


def check_output_path(path: str | os.PathLike, force: bool = False) -> Path:
    """Validate an output path before any work is done: parent writable, no overwrite without force."""
    out = Path(path)
    if out.exists() and out.is_dir():
        raise UsageError(f"output {out} is a directory", "give a file name")
    if out.exists() and not force:
        raise UsageError(f"output {out} already exists", "pass --force to overwrite it or choose another path")
    check_output_parent(out)
    return out


def check_report_path(path: str | os.PathLike) -> Path:
    """Validate a report output (replaced if it exists) before any work: not a directory, parent writable."""
    out = Path(path)
    if out.is_dir():
        raise UsageError(f"output {out} is a directory", "give a file name")
    check_output_parent(out)
    return out


def check_output_parent(out: Path) -> None:
    """The directory ``out`` will be written into must exist and be writable."""
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"output directory {parent} does not exist", "create it first")
    if not os.access(parent, os.W_OK):
        raise DsnnError(f"output directory {parent} is not writable", "choose a writable location")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's directory; on success fsync and rename it over ``path``.

    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; outputs get the usual permissions
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        with contextlib.suppress(OSError):
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path`` (file or directory) in one rename.

    An existing ``path`` is moved aside first and removed only once the new directory is in place; on any error the
    temporary directory is removed and ``path`` is left as it was. OS errors become one DsnnError naming the path.
    """
    out = Path(path)
    parent = out.parent if str(out.parent) else Path(".")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
    try:
        yield tmp
        old = None
        if out.exists() or out.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=parent))
            os.replace(out, old / "previous")
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DsnnError(f"cannot write {out}: {exc}", "check the output path and free space") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
