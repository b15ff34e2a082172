"""What the commands leave on disk when things go wrong (issue 16, items 1, 2, 7, 9).

* every output path is checked before any work, and multi-file outputs (``export --level all``, ``evaluate``'s
  reports, ``finetune``'s result + state + log, ``demo --out``) are all or nothing;
* a full disk (and any other OS error while writing) is one ``error:`` line naming the output and the cause, exit 1,
  with nothing left behind: the disk is really full, the kernel's ``/dev/full`` answering our writes (ENOSPC), a disk
  that fills up mid-file (a short write, then ENOSPC), and in a child process a real file-size limit (EFBIG) reaches
  writers that do not go through Python's ``open``;
* NaN/inf in any tensor makes ``prune`` fail, and ``evaluate``/``transcribe`` refuse such a model;
* temporary files are named ``.dsnn-tmp-<pid>-<hex>.NAME``, removed by a normal failure, and the stale ones of a
  killed process are removed by the next write to the same output (or ``--resume``), a live writer's kept.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from asr_fixtures import AUDIO, MANIFEST
from helpers import (
    ROOT,
    assert_one_error_line,
    assert_usage_error,
    random_state_dict,
    run_cli,
    subprocess_env,
    write_checkpoint,
)

from dsnn_compress import atomic
from dsnn_compress.atomic import StagedOutputs, atomic_path
from dsnn_compress.core.bundle import load_bundle, save_bundle
from dsnn_compress.errors import DsnnError
from dsnn_compress.training.recipe import apply_overrides, load_recipe
from dsnn_compress.training.state import TrainState
from dsnn_compress.training.trainer import finetune, log_path, state_path

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ROOT / "recipes" / "tiny-test.yaml"
FINETUNE = ["--recipe", TINY, "--set", "training.device=cpu", "--set", "data.spec_augment=false"]
TEMP_NAME = re.compile(r"^\.dsnn-tmp-(\d+)-([0-9a-f]{8})\.(.+)$")
ENOSPC_LINE = "No space left on device (ENOSPC)"


def leftovers(directory: Path) -> list[str]:
    """Our temporary names (and the old ``.NAME.XXXXXXXX.tmp`` style) anywhere under ``directory``."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                  if p.name.startswith(".dsnn-") or p.name.endswith(".tmp"))


def assert_error_ends(err: str, *fragments: str) -> str:
    """Training progress on stderr, then exactly one ``error: ...`` line (the last) holding every fragment."""
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert "Traceback" not in err and len(errors) == 1 and lines[-1] == errors[0], err
    for fragment in fragments:
        assert fragment in errors[0], (fragment, err)
    return errors[0]


def listing(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


@pytest.fixture()
def dense(tmp_path: Path) -> Path:
    return write_checkpoint(tmp_path / "dense.safetensors", random_state_dict(0))


@pytest.fixture()
def full_disk(monkeypatch: pytest.MonkeyPatch) -> Callable[[Callable[[Path], bool]], None]:
    """``full_disk(which)``: files opened for writing whose path satisfies ``which`` go to ``/dev/full``.

    The kernel answers every write there with ENOSPC, exactly as a full disk does, so the code under test meets a
    real ``OSError(28)`` from a real write (Python-level ``open`` only: C++/Rust writers are covered by the file
    size limit test below).
    """
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full (Linux)")
    real_open = builtins.open

    def install(which: Callable[[Path], bool]) -> None:
        def fake_open(file, mode="r", *args, **kwargs):  # noqa: ANN001, ANN202 - the signature of open()
            if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax") and which(Path(file)):
                return real_open("/dev/full", mode.replace("x", "w"), *args, **kwargs)
            return real_open(file, mode, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(io, "open", fake_open)

    return install


class FillingFile(io.FileIO):
    """A file on a disk with ``room`` bytes free, as the kernel writes it: a write past the room is cut short (the
    bytes that fit are written), the next one fails with ENOSPC."""

    def __init__(self, path: Path, mode: str, room: int) -> None:
        super().__init__(path, mode)
        self.room = room

    def write(self, data) -> int:  # noqa: ANN001 - any bytes-like object, as io.FileIO.write takes
        if self.room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written = super().write(memoryview(data).cast("B")[: self.room])
        self.room -= written
        return written


@pytest.fixture()
def filling_disk(monkeypatch: pytest.MonkeyPatch) -> Callable[[Callable[[Path], bool], int], None]:
    """``filling_disk(which, room)``: binary files opened for writing whose path satisfies ``which`` fill up after
    ``room`` bytes, so the disk runs full in the middle of a file (``full_disk`` fails the very first write)."""
    real_open = builtins.open

    def install(which: Callable[[Path], bool], room: int) -> None:
        def fake_open(file, mode="r", *args, **kwargs):  # noqa: ANN001, ANN202 - the signature of open()
            if (isinstance(file, (str, os.PathLike)) and "b" in mode and any(c in mode for c in "wax")
                    and which(Path(file))):
                return io.BufferedWriter(FillingFile(Path(file), mode.replace("b", "").replace("x", "w"), room))
            return real_open(file, mode, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(io, "open", fake_open)

    return install


def inside(directory: Path, *fragments: str, unless: str | None = None) -> Callable[[Path], bool]:
    """Files in ``directory`` whose name holds every fragment (and not ``unless``): the full part of the disk."""
    return lambda path: (path.parent == directory and all(f in path.name for f in fragments)
                         and (unless is None or unless not in path.name))


# ------------------------------------------------------------------------------------ item 9: temporary names


def test_temporary_name_is_recognisable_and_beside_the_target(tmp_path: Path) -> None:
    target = tmp_path / "model.onnx"
    with atomic_path(target) as tmp:
        match = TEMP_NAME.match(tmp.name)
        assert match and tmp.parent == tmp_path
        assert int(match.group(1)) == os.getpid() and match.group(3) == "model.onnx"  # the extension stays last
        tmp.write_bytes(b"x")
    assert target.read_bytes() == b"x" and leftovers(tmp_path) == []


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _plant(path: Path, directory: bool = False, age: float = 3600.0) -> Path:
    if directory:
        path.mkdir()
        (path / "weights.bin").write_bytes(b"\0" * 100)
    else:
        path.write_bytes(b"\0" * 100)
    stamp = time.time() - age
    os.utime(path, (stamp, stamp))
    return path


def test_next_write_removes_stale_temporaries_of_that_output_only(tmp_path: Path, dense: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out = tmp_path / "b.safetensors"
        stale = [_plant(tmp_path / f".dsnn-tmp-{dead}-0badc0de.b.safetensors"),
                 _plant(tmp_path / f".dsnn-old-{dead}-0badc0df.b.safetensors", directory=True),
                 _plant(tmp_path / f".dsnn-tmp-{dead}-00000001..dsnn-tmp-{dead}-00000002.b.safetensors"),
                 # this process's own pid on a file older than the process: left by an earlier process with our pid
                 _plant(tmp_path / f".dsnn-tmp-{os.getpid()}-00000003.b.safetensors", age=10 * 86400)]
        kept = [_plant(tmp_path / f".dsnn-tmp-{live.pid}-0badc0de.b.safetensors"),  # a concurrent writer
                _plant(tmp_path / f".dsnn-tmp-{dead}-0badc0de.other.safetensors"),  # another output
                _plant(tmp_path / f".dsnn-tmp-{dead}-0badc0de.xb.safetensors"),
                _plant(tmp_path / f".dsnn-tmp-{dead}-0badc0d0.b.safetensors", age=-60)]  # newer than this process
        code, _, err = run_cli(capsys, "prune", dense, "--levels", "0.5", "-o", out)
        assert code == 0, err
        assert [p for p in stale if p.exists()] == []
        assert all(p.exists() for p in kept)
    finally:
        live.kill()
        live.wait()


def test_resume_removes_stale_temporaries(tmp_path: Path) -> None:
    recipe = apply_overrides(load_recipe(TINY), {"output": str(tmp_path / "run.safetensors"), "training.steps": 3,
                                                 "training.checkpoint_every": 1, "training.keep": "last",
                                                 "distillation.enabled": False})
    finetune(recipe, stop_after=2)  # what a kill after the checkpoint of step 1 leaves
    assert state_path(recipe.output).is_file()
    dead = _dead_pid()
    stale = [_plant(tmp_path / f".dsnn-tmp-{dead}-00c0ffee.{name}")
             for name in ("run.safetensors", "run.safetensors.train-state.pt", "run.log.jsonl")]
    finetune(recipe, resume=True)
    assert [p for p in stale if p.exists()] == []
    assert leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.log.jsonl", "run.safetensors"]


# --------------------------------------------------------------------- item 2: a full disk is one clean line


def test_prune_on_a_full_disk(tmp_path: Path, dense: Path, capsys: pytest.CaptureFixture[str], full_disk) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    full_disk(inside(out_dir))
    code, _, err = run_cli(capsys, "prune", dense, "--levels", "0.5", "-o", out_dir / "b.safetensors")
    assert code == 1
    assert_one_error_line(err, f"cannot write {out_dir / 'b.safetensors'}: {ENOSPC_LINE}", "free some space")
    assert listing(out_dir) == []


@pytest.mark.parametrize("fmt", ["safetensors", "torch", "checkpoint"])
def test_export_on_a_full_disk(tmp_path: Path, tiny_model, fmt: str, capsys: pytest.CaptureFixture[str],
                               full_disk) -> None:
    full_disk(inside(tmp_path))
    out = tmp_path / "m.bin"
    code, _, err = run_cli(capsys, "export", tiny_model.bundle, "--level", "0.5", "--format", fmt, "-o", out)
    assert code == 1
    assert_one_error_line(err, f"cannot write {out}: {ENOSPC_LINE}")  # torch: not "[enforce fail at ...]"
    assert listing(tmp_path) == []


@pytest.mark.parametrize("fmt", ["safetensors", "torch", "checkpoint"])
def test_export_on_a_disk_that_fills_up_mid_file(tmp_path: Path, tiny_model, fmt: str,
                                                 capsys: pytest.CaptureFixture[str], filling_disk) -> None:
    """The disk runs full half-way through the file (a short write, then ENOSPC): still the one error line. torch's
    zip writer cannot unwind from such a write and used to say ``[enforce fail at inline_container.cc] unexpected
    pos``."""
    reference = tmp_path / "reference.bin"
    assert run_cli(capsys, "export", tiny_model.bundle, "--level", "0.5", "--format", fmt, "-o", reference).code == 0
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    filling_disk(inside(out_dir), reference.stat().st_size // 2)
    out = out_dir / "m.bin"
    code, _, err = run_cli(capsys, "export", tiny_model.bundle, "--level", "0.5", "--format", fmt, "-o", out)
    assert code == 1
    assert_one_error_line(err, f"cannot write {out}: {ENOSPC_LINE}")
    assert listing(out_dir) == []


def test_training_state_on_a_disk_that_fills_up_mid_file(tmp_path: Path, filling_disk) -> None:
    """``TrainState.save`` (torch.save, as ``export --format torch``) on a disk that runs full half-way."""
    state = TrainState(recipe="{}", model={"w": torch.randn(64, 64)}, codes={}, optimizer={}, step=1, epoch=0,
                       position=0, **TrainState.rng_states(torch.device("cpu")))
    filling_disk(inside(tmp_path), 8000)
    with pytest.raises(DsnnError) as excinfo:
        state.save(tmp_path / "state.pt")
    assert excinfo.value.one_line().startswith(f"cannot write {tmp_path / 'state.pt'}: {ENOSPC_LINE}")
    assert listing(tmp_path) == []


def test_export_all_levels_is_all_or_nothing(tmp_path: Path, tiny_model, capsys: pytest.CaptureFixture[str],
                                             full_disk) -> None:
    """The disk fills while the last level (0.9) is written: the dense and 0.5 files must not stay."""
    full_disk(inside(tmp_path, "-0.9."))
    code, _, err = run_cli(capsys, "export", tiny_model.bundle, "--level", "all", "--format", "checkpoint", "-o",
                           tmp_path / "m.safetensors")
    assert code == 1
    assert_one_error_line(err, f"cannot write {tmp_path / 'm-0.9.safetensors'}: {ENOSPC_LINE}")
    assert listing(tmp_path) == []


def test_export_all_levels_replaces_old_files_only_on_success(tmp_path: Path, tiny_model, full_disk,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("m-dense.safetensors", "m-0.5.safetensors", "m-0.9.safetensors"):
        (tmp_path / name).write_text("old")
    full_disk(inside(tmp_path, "-0.9."))
    code, _, err = run_cli(capsys, "export", tiny_model.bundle, "--level", "all", "--format", "checkpoint", "-o",
                           tmp_path / "m.safetensors", "--force")
    assert code == 1, err
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {
        "m-dense.safetensors": "old", "m-0.5.safetensors": "old", "m-0.9.safetensors": "old"}


def test_staged_outputs_put_previous_files_back_when_a_rename_fails(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    targets = [tmp_path / "a.txt", tmp_path / "b.txt"]
    for target in targets:
        target.write_text("old")
    real_replace = os.replace

    def replace(src, dst):  # noqa: ANN001, ANN202
        if Path(dst) == targets[1] and TEMP_NAME.match(Path(src).name):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(DsnnError, match=f"cannot write {re.escape(str(targets[1]))}"), StagedOutputs() as staged:
        for target in targets:
            staged.file(target).write_text("new")
    assert [t.read_text() for t in targets] == ["old", "old"]
    assert leftovers(tmp_path) == []


def test_staged_outputs_never_leave_a_file_target_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kill at any moment of a checkpoint leaves the old or the new training state under its name, never none."""
    target = tmp_path / "run.safetensors.train-state.pt"
    target.write_text("old")
    present: list[bool] = []
    real_replace = os.replace

    def spy(src, dst):  # noqa: ANN001, ANN202
        present.append(target.exists())
        real_replace(src, dst)
        present.append(target.exists())

    monkeypatch.setattr(atomic.os, "replace", spy)
    with StagedOutputs() as staged:
        staged.file(target).write_text("new")
    assert present and all(present)
    assert target.read_text() == "new" and leftovers(tmp_path) == []


@pytest.mark.parametrize("full", ["json", "markdown", "plot"])
def test_evaluate_reports_are_all_or_nothing_on_a_full_disk(tmp_path: Path, tiny_model, full: str, full_disk,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    names = {"json": "r.json", "markdown": "r.md", "plot": "r.png"}
    full_disk(inside(tmp_path, names[full]))
    code, _, err = run_cli(capsys, "evaluate", tiny_model.bundle, "--data", MANIFEST, "--levels", "0.5",
                           "--json", tmp_path / "r.json", "--markdown", tmp_path / "r.md", "--plot", tmp_path / "r.png")
    assert code == 1
    assert_one_error_line(err, f"cannot write {tmp_path / names[full]}: {ENOSPC_LINE}")
    assert listing(tmp_path) == []


def test_finetune_on_a_full_disk_leaves_no_log(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               full_disk) -> None:
    full_disk(inside(tmp_path))
    out = tmp_path / "o.safetensors"
    code, _, err = run_cli(capsys, "finetune", *FINETUNE, "-o", out, "--steps", "2")
    assert code == 1
    assert_error_ends(err, f"cannot write {log_path(out)}: {ENOSPC_LINE}")
    assert listing(tmp_path) == []


def test_finetune_failing_at_its_final_write_leaves_nothing_new(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                full_disk) -> None:
    full_disk(inside(tmp_path, "o.safetensors", unless="train-state"))
    out = tmp_path / "o.safetensors"
    code, _, err = run_cli(capsys, "finetune", *FINETUNE, "-o", out, "--steps", "2")
    assert code == 1
    assert_error_ends(err, f"cannot write {out}: {ENOSPC_LINE}")
    assert listing(tmp_path) == []  # no bundle, no log, no state, no zero-byte temporary


def test_finetune_failing_after_a_checkpoint_keeps_what_resume_needs(tmp_path: Path, full_disk,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o.safetensors"
    args = [*FINETUNE, "-o", out, "--steps", "3", "--set", "training.checkpoint_every=1"]
    calls = {"n": 0}

    def second_state_write(path: Path) -> bool:  # the disk fills at the checkpoint of step 2
        if path.parent == tmp_path and ".train-state.pt" in path.name:
            calls["n"] += 1
            return calls["n"] == 2
        return False

    full_disk(second_state_write)
    code, _, err = run_cli(capsys, "finetune", *args)
    assert code == 1
    assert_error_ends(err, ENOSPC_LINE, f"the training state {state_path(out)} is kept", "--resume")
    assert listing(tmp_path) == sorted([out.name, log_path(out).name, state_path(out).name])
    full_disk(lambda path: False)  # the disk has room again
    code, _, err = run_cli(capsys, "finetune", *args, "--resume")
    assert code == 0, err
    assert listing(tmp_path) == sorted([out.name, log_path(out).name])
    steps = [json.loads(line)["step"] for line in log_path(out).read_text().splitlines()
             if json.loads(line)["event"] == "step"]
    assert steps == [1, 2, 3]


def test_finetune_failing_in_its_first_checkpoint_leaves_nothing(tmp_path: Path, full_disk,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The state of step 1 is written, then the disk fills while its bundle is: neither may stay (nor the log)."""
    full_disk(inside(tmp_path, "o.safetensors", unless="train-state"))
    out = tmp_path / "o.safetensors"
    code, _, err = run_cli(capsys, "finetune", *FINETUNE, "-o", out, "--steps", "3", "--set",
                           "training.checkpoint_every=1")
    assert code == 1
    line = assert_error_ends(err, f"cannot write {out}: {ENOSPC_LINE}")
    assert "--resume" not in line
    assert listing(tmp_path) == []


def test_finetune_interrupted_before_a_checkpoint_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from dsnn_compress.training import trainer

    real_step = trainer.Finetuner.train_step

    def interrupted(self, batch):  # noqa: ANN001, ANN202
        if self.step == 1:
            raise KeyboardInterrupt
        return real_step(self, batch)

    monkeypatch.setattr(trainer.Finetuner, "train_step", interrupted)
    code, _, err = run_cli(capsys, "finetune", *FINETUNE, "-o", tmp_path / "o.safetensors", "--steps", "3")
    assert code == 130 and assert_error_ends(err) == "error: interrupted"
    assert listing(tmp_path) == []


RLIMIT_CHILD = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))
from dsnn_compress.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize(("fmt", "name"), [("torch", "m.pt"), ("onnx", "m.onnx"), ("safetensors", "m.safetensors")])
@pytest.mark.parametrize("where", ["start", "middle"])
def test_export_over_the_file_size_limit_in_a_child_process(tmp_path: Path, tiny_model, fmt: str, name: str,
                                                            where: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A real OS error (EFBIG) from every writer, those that bypass Python's open() included (torch, ONNX), with the
    limit at 4 KiB or half-way through the file (a short write first, then EFBIG)."""
    limit = 4096
    if where == "middle":
        reference = tmp_path / name
        result = run_cli(capsys, "export", tiny_model.bundle, "--level", "0.5", "--format", fmt, "-o", reference)
        assert result.code == 0, result.err
        limit = reference.stat().st_size // 2
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-c", RLIMIT_CHILD, str(limit), "export", str(tiny_model.bundle),
                           "--level", "0.5", "--format", fmt, "-o", str(out / name)],
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert_one_error_line(proc.stderr, f"cannot write {out / name}: File too large (EFBIG)")  # not "[enforce fail"
    assert listing(out) == []


# ---------------------------------------------------------------- item 1: outputs checked before any work


@pytest.mark.parametrize("clash", ["log-dir", "state-dir", "log-exists", "output-dir"])
def test_finetune_checks_every_output_before_any_work(tmp_path: Path, clash: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o.safetensors"
    {"log-dir": lambda: log_path(out).mkdir(), "state-dir": lambda: state_path(out).mkdir(),
     "log-exists": lambda: log_path(out).write_text("an earlier run's log\n"), "output-dir": out.mkdir}[clash]()
    before = {str(p): (p.is_dir() or p.read_text()) for p in tmp_path.iterdir()}
    result = run_cli(capsys, "finetune", *FINETUNE, "-o", out, "--steps", "1")
    assert_usage_error(result, "already exists" if clash == "log-exists" else "is a directory")
    assert {str(p): (p.is_dir() or p.read_text()) for p in tmp_path.iterdir()} == before


def test_evaluate_needs_matplotlib_before_any_work(tmp_path: Path, tiny_model, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import dsnn_compress.evaluation.evaluate as evaluation

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setattr(evaluation, "load_model", lambda *a, **k: pytest.fail("evaluated without a way to plot"))
    code, _, err = run_cli(capsys, "evaluate", tiny_model.bundle, "--data", MANIFEST, "--json", tmp_path / "r.json",
                           "--plot", tmp_path / "r.png")
    assert code == 1
    assert_one_error_line(err, "plotting needs matplotlib")
    assert listing(tmp_path) == []


def test_demo_is_all_or_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A demo that fails at its last stage leaves --out as it was: absent, or (with --force) the old content."""
    from dsnn_compress import demo

    monkeypatch.setattr(demo, "_demo_steps", _failing_demo_steps)
    fresh = tmp_path / "fresh"
    with pytest.raises(DsnnError, match="export failed"):
        demo.run_demo(fresh, steps=1)
    assert not fresh.exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(DsnnError, match="export failed"):
        demo.run_demo(busy, steps=1, force=True)
    assert listing(busy) == ["keep.txt"] and (busy / "keep.txt").read_text() == "mine"
    assert leftovers(tmp_path) == []


def _failing_demo_steps(out: Path, *args: object) -> None:
    """The demo's outputs appear one after the other; the export (its last stage) fails."""
    (out / "pruned.safetensors").write_bytes(b"\0" * 64)
    (out / "export").mkdir()
    (out / "export" / "model-dense.safetensors").write_bytes(b"\0" * 64)
    raise DsnnError("export failed")


# ----------------------------------------------------------------------------------- item 7: NaN / inf weights


@pytest.mark.parametrize(("tensor", "value"), [("enc.norm.weight", float("nan")), ("enc.ff.bias", float("inf")),
                                                ("lm_head.weight", float("-inf"))])
def test_prune_refuses_nonfinite_values_in_tensors_it_does_not_prune(tmp_path: Path, tensor: str, value: float,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    state = random_state_dict(0)
    state[tensor].view(-1)[1] = value
    source = write_checkpoint(tmp_path / "dense.safetensors", state)
    code, _, err = run_cli(capsys, "prune", source, "--levels", "0.5", "-o", tmp_path / "b.safetensors")
    assert code == 1
    size = state[tensor].numel()
    assert_one_error_line(err, f"NaN/inf values in {tensor} (1 of {size} values)", "fix the checkpoint")
    assert not (tmp_path / "b.safetensors").exists()


def _nonfinite_bundle(tiny_model, path: Path) -> tuple[Path, str]:
    bundle = load_bundle(tiny_model.bundle)
    name = next(n for n in sorted(bundle.tensors) if n.endswith("bias") and n not in bundle.codes)
    bundle.tensors[name] = torch.full_like(bundle.tensors[name], float("nan"))
    save_bundle(bundle, path)
    return path, name


def test_evaluate_and_transcribe_refuse_nonfinite_weights(tmp_path: Path, tiny_model,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    bundle, name = _nonfinite_bundle(tiny_model, tmp_path / "nan.safetensors")
    size = load_bundle(bundle).tensors[name].numel()
    code, _, err = run_cli(capsys, "evaluate", bundle, "--data", MANIFEST, "--json", tmp_path / "r.json")
    assert code == 1
    assert_one_error_line(err, f"{bundle} holds NaN/inf weights in {name} ({size} of {size} values)")
    assert not (tmp_path / "r.json").exists()
    audio = sorted(AUDIO.iterdir())[0]
    code, out, err = run_cli(capsys, "transcribe", bundle, audio)
    assert code == 1 and out == ""
    assert_one_error_line(err, f"NaN/inf weights in {name}")
