"""File output: checked before any work, written atomically, all-or-nothing across several files.

Every file the project writes goes to a temporary name beside the target, is fsynced and renamed over the target,
so a reader sees the old file or the new one, never a partial one. Temporary names are recognisably ours:

* ``.dsnn-tmp-<pid>-<random>.<NAME>`` - a file or directory being written for ``NAME`` (the target's own name
  and extension come last, so libraries that look at the extension still see it);
* ``.dsnn-old-<pid>-<random>.<NAME>`` - an existing ``NAME`` moved aside while its replacement is put in place.

A process killed mid-write (SIGKILL, power loss) leaves such a file behind. The next write to the same output
removes the leftovers of that output whose process is gone and that are older than the running process
(:func:`clean_stale_temps`), so a concurrent writer's temporary file is never touched. A normal failure (an
exception, Ctrl-C) removes its temporary files before the error is reported.

OS errors while writing (a full disk, a quota, a read-only file system) become one :class:`DsnnError` naming the
output and the cause (:func:`write_error`), which the CLI prints as one line with exit code 1.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, cast

from .errors import DsnnError, UsageError

TEMP_PREFIX = ".dsnn-tmp-"
OLD_PREFIX = ".dsnn-old-"
_MARKED = re.compile(r"^\.dsnn-(tmp|old)-(\d+)-([0-9a-f]+)\.(.+)$", re.DOTALL)
_STARTED = time.time()
"""When this process (near enough: this module's import) started; older leftovers of a dead process are stale."""

_HINTS = {
    errno.ENOSPC: "free some space on that disk or choose another location",
    errno.EDQUOT: "free some space within your disk quota or choose another location",
    errno.EFBIG: "the file is larger than the file system or the process's file size limit allows",
    errno.EACCES: "choose a writable location",
    errno.EPERM: "choose a writable location",
    errno.EROFS: "the file system is read-only; choose a writable location",
}


# ------------------------------------------------------------------------------------------------ checks


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
    parent = _parent(out)
    if not parent.is_dir():
        raise UsageError(f"output directory {parent} does not exist", "create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DsnnError(f"output directory {parent} is not writable", "choose a writable location")


# ------------------------------------------------------------------------------------------ temporary names


def _parent(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def temp_path(target: str | os.PathLike, prefix: str = TEMP_PREFIX) -> Path:
    """A fresh temporary name beside ``target``: ``.dsnn-tmp-<pid>-<random>.<NAME>`` (nothing is created)."""
    out = Path(target)
    while True:
        candidate = out.with_name(f"{prefix}{os.getpid()}-{secrets.token_hex(4)}.{out.name}")
        if not (candidate.exists() or candidate.is_symlink()):
            return candidate


def display_path(path: str | os.PathLike) -> Path:
    """The output a temporary name stands for (``.dsnn-tmp-1-ab.m.onnx`` -> ``m.onnx``); other paths unchanged."""
    out = Path(path)
    name = out.name
    while (match := _MARKED.match(name)) is not None:
        name = match.group(4)
    return out.with_name(name) if name != out.name else out


def _process_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill would terminate the process there: never judge, never clean
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # somebody else's live process
        return True
    except OSError:
        return False
    return True


def _is_stale(entry: Path, pids: list[int]) -> bool:
    """Left by processes that are gone (or by an earlier process that had this one's pid), and older than us."""
    try:
        if entry.lstat().st_mtime >= _STARTED:
            return False
    except OSError:
        return False
    return all(pid == os.getpid() or not _process_alive(pid) for pid in pids)


def clean_stale_temps(target: str | os.PathLike) -> list[Path]:
    """Remove the temporary leftovers of ``target`` (see the module docstring) that are stale; returns them.

    A leftover is stale when the process that made it no longer runs and it was last modified before the current
    process started; temporaries of a live writer (another process writing the same output now) are kept.
    Errors are ignored: cleaning up must never stop the write it precedes.
    """
    out = Path(target)
    parent = _parent(out)
    removed: list[Path] = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        if not name.startswith((TEMP_PREFIX, OLD_PREFIX)):
            continue
        pids, inner = [], name
        while (match := _MARKED.match(inner)) is not None:
            pids.append(int(match.group(2)))
            inner = match.group(4)
        if inner != out.name or not pids:
            continue
        entry = parent / name
        if not _is_stale(entry, pids):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
    return removed


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            path.unlink()


# ------------------------------------------------------------------------------------------------ errors


def write_error(path: str | os.PathLike, exc: OSError) -> DsnnError:
    """One error naming the output (not its temporary name) and the OS's reason, with what to do."""
    cause = exc.strerror or str(exc) or type(exc).__name__
    code = errno.errorcode.get(exc.errno or -1)
    if code:
        cause = f"{cause} ({code})"
    return DsnnError(f"cannot write {display_path(path)}: {cause}", _HINTS.get(exc.errno or -1, "check the output "
                                                                                             "path and free space"))


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


# ------------------------------------------------------------------------------------------------ writers


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``.

    Stale leftovers of earlier writes to ``path`` are removed first. On any exception the temporary file is removed
    and ``path`` is left untouched; an OSError becomes one :class:`DsnnError` naming ``path`` and the cause.
    """
    target = Path(path)
    directory = _parent(target)
    clean_stale_temps(target)
    tmp = temp_path(target)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for any new file
        os.close(fd)
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        _fsync_directory(directory)
    except OSError as exc:
        _remove(tmp)
        raise write_error(target, exc) from exc
    except BaseException:
        _remove(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


class _KeepFirstError:
    """A binary sink for writers that take a file object: data goes to ``file`` until a write fails; that OSError is
    kept and later data is dropped (reported as written), so the writer runs to its end and the cause survives."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        if self.error is None:
            try:
                return self.file.write(data)
            except OSError as exc:
                self.error = exc
        return memoryview(data).nbytes

    def flush(self) -> None:
        if self.error is None:
            self.file.flush()


@contextlib.contextmanager
def atomic_stream(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """:func:`atomic_path` for a writer that takes a binary file object (``torch.save``), whose first failed write
    is the error, whatever the writer makes of it (torch's zip writer, when the disk fills up mid-file, goes on and
    reports ``[enforce fail at inline_container.cc] unexpected pos``): its later data is dropped."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        sink = _KeepFirstError(fh)
        try:
            yield cast(BinaryIO, sink)
        except Exception:
            if sink.error is None:
                raise
        if sink.error is not None:
            raise sink.error


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path`` (file or directory) in one rename.

    An existing ``path`` is moved aside first and removed only once the new directory is in place; on any error the
    temporary directory is removed and ``path`` is left as it was. OS errors become one DsnnError naming the path.
    """
    out = Path(path)
    clean_stale_temps(out)
    tmp = temp_path(out)
    try:
        tmp.mkdir()
        yield tmp
        old = None
        if out.exists() or out.is_symlink():
            old = temp_path(out, OLD_PREFIX)
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            if old is not None:
                os.replace(old, out)
            raise
        if old is not None:
            _remove(old)
        _fsync_directory(_parent(out))
    except OSError as exc:
        _remove(tmp)
        raise write_error(out, exc) from exc
    except BaseException:
        _remove(tmp)
        raise


def _keep_previous(out: Path) -> Path | None:
    """Keep ``out``'s current content under a ``.dsnn-old-`` name, so that a failed commit can put it back.

    A file is hard-linked (``out`` itself never disappears, so a kill at any moment leaves the old or the new file
    under its name: a training state stays resumable); a directory, or a file system without hard links, is moved.
    """
    if not (out.exists() or out.is_symlink()):
        return None
    old = temp_path(out, OLD_PREFIX)
    if not out.is_dir() or out.is_symlink():
        try:
            os.link(out, old, follow_symlinks=False)
            return old
        except OSError:
            pass
    os.replace(out, old)
    return old


class StagedOutputs:
    """Several outputs that appear together or not at all (``export --level all``, ``evaluate``'s reports).

    :meth:`file` hands out a temporary name beside each target for the caller's writer (which may itself write
    atomically, and may make a file or a directory there); :meth:`commit` then moves every staged output into place,
    existing targets being set aside first and put back if a later rename fails; :meth:`discard` removes whatever
    was staged. As a context manager: commit on success, discard on any exception (an OSError becomes a DsnnError).
    """

    def __init__(self) -> None:
        self.staged: list[tuple[Path, Path]] = []

    def file(self, target: str | os.PathLike) -> Path:
        """The temporary path to write ``target`` to (a file or a directory alike); nothing is created."""
        out = Path(target)
        clean_stale_temps(out)
        tmp = temp_path(out)
        self.staged.append((out, tmp))
        return tmp

    def discard(self) -> None:
        """Remove everything staged so far (the targets are untouched)."""
        for _, tmp in self.staged:
            _remove(tmp)
        self.staged = []

    def commit(self) -> list[Path]:
        """Move every staged output into place, all or none; returns the targets."""
        targets = [out for out, _ in self.staged]
        missing = [out for out, tmp in self.staged if not (tmp.exists() or tmp.is_symlink())]
        if missing:
            self.discard()
            raise DsnnError(f"{missing[0]} was not written", "rerun with --debug and report it")
        done: list[tuple[Path, Path | None]] = []  # (target, where its previous content went)
        current = targets[0] if targets else Path(".")
        try:
            for out, tmp in self.staged:
                current = out
                old = _keep_previous(out)
                try:
                    os.replace(tmp, out)
                except OSError:
                    done.append((out, old))  # undone below like the others: the previous content goes back
                    raise
                done.append((out, old))
        except OSError as exc:
            for out, old in reversed(done):  # undo: the new outputs go, the previous ones come back
                with contextlib.suppress(OSError):
                    if old is None:
                        _remove(out)
                    elif out.exists() and os.path.samestat(old.lstat(), out.lstat()):
                        old.unlink()  # never replaced (a hard link of it): rename() would do nothing
                    else:
                        if old.is_dir() and not old.is_symlink():
                            _remove(out)  # a directory cannot be renamed over a non-empty one
                        os.replace(old, out)  # a file: in one rename, the target never missing
            self.discard()
            raise write_error(current, exc) from exc
        for _, old in done:
            if old is not None:
                _remove(old)
        for directory in {_parent(out) for out in targets}:
            _fsync_directory(directory)
        self.staged = []
        return targets

    def __enter__(self) -> StagedOutputs:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if exc is None:
            self.commit()
            return
        target = self.staged[-1][0] if self.staged else Path(".")
        self.discard()
        if isinstance(exc, OSError):
            raise write_error(target, exc) from exc


@contextlib.contextmanager
def fresh_directory(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """An output directory filled all-or-nothing (``dsnn demo --out``): checked first, replaced only on success.

    ``path`` must be absent, an empty directory, or (with ``force``) a non-empty one, and its parent must exist and
    be writable. A non-empty ``path`` is set aside (``.dsnn-old-...``) while the body runs. On success the previous
    content is removed; on any exception everything the body wrote is removed and ``path`` is as it was before.
    OS errors become one DsnnError naming ``path``.
    """
    out = Path(path)
    if (out.exists() or out.is_symlink()) and not out.is_dir():
        raise UsageError(f"output {out} is a file, not a directory", "choose another directory")
    check_output_parent(out)
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UsageError(f"output directory {out} is not empty", "pass --force to replace it or choose another")
    clean_stale_temps(out)
    existed = out.is_dir()
    aside = None
    try:
        if existed and any(out.iterdir()):
            aside = temp_path(out, OLD_PREFIX)
            os.replace(out, aside)
            existed = False
        out.mkdir(exist_ok=existed)
    except OSError as exc:
        if aside is not None and not out.exists():
            os.replace(aside, out)
        raise write_error(out, exc) from exc
    try:
        yield out
    except BaseException as exc:
        _remove(out)
        with contextlib.suppress(OSError):
            if aside is not None:
                os.replace(aside, out)
            elif existed:
                out.mkdir(exist_ok=True)
        if isinstance(exc, OSError):
            raise write_error(getattr(exc, "filename", None) or out, exc) from exc
        raise
    if aside is not None:
        _remove(aside)
