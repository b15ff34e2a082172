"""`dsnn prune / inspect / export` end to end, in-process and through the installed console script."""

from __future__ import annotations

import builtins
import json
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import (
    DEFAULT_PRUNED,
    assert_one_error_line,
    console_script,
    random_state_dict,
    run_cli,
    run_dsnn,
    write_checkpoint,
)
from safetensors import safe_open
from safetensors.torch import save_file

from dsnn_compress import __version__
from dsnn_compress.cli import main
from dsnn_compress.core.bundle import load_bundle

LEVELS = "0.5,0.7,0.9"
# Sizes of the default-pruned tensors of helpers.random_state_dict(): brain, conv, ff, half, hh, ih.
PRUNED_SIZES = [40, 48, 128, 64, 256, 256]
TOTAL_FLOAT_PARAMS = 920  # every floating-point tensor of random_state_dict(); the int64 buffer is not a param


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, dense_checkpoint: Path) -> Path:
    """A read-only bundle of ``dense_checkpoint`` at LEVELS, shared by the module's tests."""
    out = tmp_path_factory.mktemp("bundle") / "bundle.safetensors"
    assert main(["prune", str(dense_checkpoint), "--levels", LEVELS, "-o", str(out)]) == 0
    return out


def expected_pruned(level: float) -> int:
    return sum(round(level * n) for n in PRUNED_SIZES)


# ---------------------------------------------------------------- happy path


def test_prune_prints_level_table(tmp_path: Path, dense_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "b.safetensors"
    code, stdout, err = run_cli(capsys, "prune", dense_checkpoint, "--levels", LEVELS, "-o", out)
    assert code == 0 and err == ""
    assert f"wrote {out}" in stdout and "6 pruned tensors" in stdout
    assert re.search(r"dense\s*│\s*0\.00 %", stdout)
    for level in (0.5, 0.7, 0.9):
        pct = f"{100 * expected_pruned(level) / sum(PRUNED_SIZES):.2f} %"
        assert re.search(rf"{level:g}\s*│\s*{re.escape(pct)}", stdout), (level, pct, stdout)
    assert sorted(load_bundle(out).codes) == DEFAULT_PRUNED


def test_prune_records_its_own_command_line(tmp_path: Path, dense_checkpoint: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "b.safetensors"
    args = ["prune", str(dense_checkpoint), "--levels", LEVELS, "-o", str(out), "--allocation", "global"]
    assert run_cli(capsys, *args, "--debug")[0] == 0
    bundle = load_bundle(out)
    assert bundle.metadata["command"] == ["dsnn", *args]
    assert bundle.metadata["allocation"] == "global"


def test_prune_json(tmp_path: Path, dense_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, _ = run_cli(capsys, "prune", dense_checkpoint, "--levels", LEVELS, "-o", tmp_path / "b.safetensors",
                              "--json")
    assert code == 0
    report = json.loads(stdout)
    assert [e["pruned"] for e in report["levels"]] == [0, *(expected_pruned(s) for s in (0.5, 0.7, 0.9))]


def test_inspect_table(bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, _ = run_cli(capsys, "inspect", bundle)
    assert code == 0
    flat = " ".join(stdout.split())  # the header line may wrap at the console width
    assert "3 sparse levels, 2-bit codes, per-layer allocation, 6 pruned tensors" in flat
    assert f"({sum(PRUNED_SIZES):,} of {TOTAL_FLOAT_PARAMS:,} params)" in flat
    for level in ("dense", "0.5", "0.7", "0.9"):
        assert re.search(rf"│\s*{re.escape(level)}\s*│", stdout), level
    assert "lstm.weight_ih_l0" not in stdout  # per-tensor rows only with --layers


def test_inspect_layers(bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, _ = run_cli(capsys, "inspect", bundle, "--layers")
    assert code == 0
    for name in DEFAULT_PRUNED:
        assert name in stdout
    # enc.conv.weight: 48 weights, round(0.7 * 48) = 34 pruned -> 70.83 %
    assert re.search(r"enc\.conv\.weight\s*│\s*8x2x3\s*│\s*48\s*│\s*50\.00 %\s*│\s*70\.83 %\s*│\s*89\.58 %", stdout)
    assert "not pruned (5): bn.num_batches_tracked, enc.ff.bias, enc.norm.weight, lm_head.weight, lstm.bias_ih_l0" in (
        " ".join(stdout.split())
    )


def test_inspect_json(bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, _ = run_cli(capsys, "inspect", bundle, "--json")
    assert code == 0
    report = json.loads(stdout)
    assert "tensors" not in report
    assert [e["level"] for e in report["levels"]] == [0.0, 0.5, 0.7, 0.9]
    assert report["code_bits"] == 2 and report["allocation"] == "per-layer"
    assert report["prunable_params"] == sum(PRUNED_SIZES) and report["total_params"] == TOTAL_FLOAT_PARAMS
    for entry in report["levels"]:
        pruned = expected_pruned(entry["level"])
        assert entry["pruned"] == pruned
        assert entry["prunable_sparsity"] == pytest.approx(pruned / sum(PRUNED_SIZES), abs=1e-8)
        assert entry["overall_sparsity"] == pytest.approx(pruned / TOTAL_FLOAT_PARAMS, abs=1e-8)
        assert entry["nonzero_params"] == TOTAL_FLOAT_PARAMS - pruned
    assert report["source"]["file"] == "dense.safetensors"
    code, stdout, _ = run_cli(capsys, "inspect", bundle, "--json", "--layers")
    tensors = json.loads(stdout)["tensors"]
    assert sorted(tensors) == DEFAULT_PRUNED
    assert tensors["half.weight"]["pruned"] == [0, 32, 45, 58]  # 64 weights: round(32), round(44.8), round(57.6)


def check_export(state: dict[str, torch.Tensor], bundle: Path, level_index: int) -> None:
    source = random_state_dict(0)
    codes = load_bundle(bundle).codes
    assert sorted(state) == sorted(source)
    for name, dense in source.items():
        assert state[name].dtype == dense.dtype and state[name].shape == dense.shape, name
        if name not in codes:
            assert torch.equal(state[name], dense), name
            continue
        keep = codes[name] >= level_index
        assert torch.equal(state[name][keep], dense[keep]), name
        assert bool((state[name][~keep] == 0).all()), name
        assert int((state[name] == 0).sum()) == int((~keep).sum()) + int((dense[keep] == 0).sum())


def test_export_safetensors_and_torch(tmp_path: Path, bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    st_path, pt_path = tmp_path / "l70.safetensors", tmp_path / "l70.pt"
    code, _, err = run_cli(capsys, "export", bundle, "--level", "0.7", "-o", st_path)
    assert code == 0, err
    with safe_open(str(st_path), framework="pt") as fh:
        exported = {n: fh.get_tensor(n) for n in fh.keys()}  # noqa: SIM118
        meta = fh.metadata()
    assert meta["dsnn_level"] == "0.7" and meta["format"] == "pt"
    check_export(exported, bundle, 2)
    code, _, err = run_cli(capsys, "export", bundle, "--level", "70%", "-o", pt_path)
    assert code == 0, err
    check_export(torch.load(pt_path, weights_only=True), bundle, 2)
    again = tmp_path / "again.safetensors"
    assert run_cli(capsys, "export", bundle, "--level", "70%", "-o", again)[0] == 0
    assert again.read_bytes() == st_path.read_bytes()


def test_export_dense_level_equals_source(tmp_path: Path, bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "dense_again.safetensors"
    assert run_cli(capsys, "export", bundle, "--level", "dense", "-o", out)[0] == 0
    with safe_open(str(out), framework="pt") as fh:
        exported = {n: fh.get_tensor(n) for n in fh.keys()}  # noqa: SIM118
    source = random_state_dict(0)
    for name, tensor in source.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor)
    out_pt = tmp_path / "l90.bin"
    assert run_cli(capsys, "export", bundle, "--level", "0.9", "-o", out_pt, "--format", "torch")[0] == 0
    check_export(torch.load(out_pt, weights_only=True), bundle, 3)


def test_force_overwrites_existing_output(tmp_path: Path, dense_checkpoint: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "b.safetensors"
    out.write_bytes(b"old contents")
    code, _, err = run_cli(capsys, "prune", dense_checkpoint, "--levels", LEVELS, "-o", out)
    assert code == 2
    assert_one_error_line(err, "already exists")
    assert out.read_bytes() == b"old contents"
    code, _, err = run_cli(capsys, "prune", dense_checkpoint, "--levels", "0.6", "-o", out, "--force")
    assert code == 0, err
    assert load_bundle(out).levels == (0.6,)
    exported = tmp_path / "e.pt"
    exported.write_bytes(b"old export")
    code, _, err = run_cli(capsys, "export", out, "--level", "0.6", "-o", exported)
    assert code == 2 and exported.read_bytes() == b"old export"
    assert_one_error_line(err, "already exists")
    assert run_cli(capsys, "export", out, "--level", "0.6", "-o", exported, "--force")[0] == 0
    assert torch.load(exported, weights_only=True).keys() == random_state_dict(0).keys()


def test_version_and_no_args(capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, _ = run_cli(capsys, "--version")
    assert code == 0 and stdout.strip() == f"dsnn-compress {__version__}"
    code, stdout, _ = run_cli(capsys)
    assert code == 0 and "prune" in stdout and "inspect" in stdout and "export" in stdout


# ---------------------------------------------------------------- failures


class CreatesMarker:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


def _truncated(tmp: Path) -> Path:
    path = write_checkpoint(tmp / "cut.safetensors", random_state_dict(0))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _evil(tmp: Path) -> Path:
    path = tmp / "evil.pt"
    torch.save({"w.weight": torch.ones(2, 2), "x": CreatesMarker(tmp / "pwned")}, path)
    return path


def _empty(tmp: Path) -> Path:
    path = tmp / "empty.safetensors"
    save_file({}, str(path))
    return path


def _nan(tmp: Path) -> Path:
    state = random_state_dict(0)
    state["enc.ff.weight"][3, 4] = float("nan")
    return write_checkpoint(tmp / "nan.pt", state)


def _bundle_as_source(tmp: Path) -> Path:
    path = write_checkpoint(tmp / "d.safetensors", random_state_dict(0))
    assert main(["prune", str(path), "--levels", "0.5", "-o", str(tmp / "already.safetensors")]) == 0
    path.unlink()
    return tmp / "already.safetensors"


def _dense(tmp: Path) -> Path:
    return write_checkpoint(tmp / "d.safetensors", random_state_dict(0))


def _garbage(tmp: Path) -> Path:
    path = tmp / "garbage.safetensors"
    path.write_bytes(bytes(range(256)) * 4)
    return path


def _dir_without_config(tmp: Path) -> Path:
    (tmp / "model").mkdir()
    write_checkpoint(tmp / "model" / "model.safetensors", random_state_dict(0))
    return tmp / "model"


# name: (make source, extra args, exit code, fragment of the error line)
PRUNE_FAILURES: dict[str, tuple[Callable[[Path], Path], list[str], int, str]] = {
    "missing": (lambda t: t / "nope.safetensors", [], 1, "does not exist"),
    "truncated": (_truncated, [], 1, "not a readable safetensors file"),
    "garbage": (_garbage, [], 1, "not a readable safetensors file"),
    "code-pickle": (_evil, [], 1, "refuses to unpickle"),
    "empty": (_empty, [], 1, "contains no tensors"),
    "nan": (_nan, [], 1, "enc.ff.weight"),
    "bundle-source": (_bundle_as_source, [], 1, "already a DSNN bundle"),
    "dir-without-config": (_dir_without_config, [], 1, "without config.json"),
    "unsorted": (_dense, ["--levels", "0.7,0.5"], 2, "must increase"),
    "duplicate": (_dense, ["--levels", "0.5,0.5,0.9"], 2, "given twice"),
    "level-one": (_dense, ["--levels", "0.5,1.0"], 2, "outside (0, 1)"),
    "level-negative": (_dense, ["--levels", "-0.5"], 2, "outside (0, 1)"),
    "level-text": (_dense, ["--levels", "half"], 2, "not a number"),
    "only-dense": (_dense, ["--levels", "0"], 2, "no sparse level"),
    "exclude-all": (_dense, ["--exclude", "*"], 2, "nothing left to prune"),
    "exclude-unmatched": (_dense, ["--exclude", "decoder.*"], 2, "'decoder.*' matches no parameter"),
    "include-1d": (_dense, ["--include", "*.bias"], 2, "cannot be pruned"),
    "allocation": (_dense, ["--allocation", "per-channel"], 2, "per-channel"),
    "unknown-option": (_dense, ["--sparsity", "0.5"], 2, "No such option: --sparsity"),
    "missing-output-dir": (_dense, ["-o", "{tmp}/no/such/dir/b.safetensors"], 2, "does not exist"),
}


@pytest.mark.parametrize("case", sorted(PRUNE_FAILURES))
def test_prune_failures(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    make, extra, expected_code, fragment = PRUNE_FAILURES[case]
    work = tmp_path / "work"
    work.mkdir()
    source = make(work)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = ["prune", str(source), "--levels", LEVELS, "-o", str(out_dir / "b.safetensors")]
    args += [a.replace("{tmp}", str(tmp_path)) for a in extra]
    before = sorted(work.iterdir())
    code, stdout, err = run_cli(capsys, *args)
    assert code == expected_code, err
    assert_one_error_line(err, fragment)
    assert stdout == ""
    assert list(out_dir.iterdir()) == []  # no output, no temporary file
    assert sorted(work.iterdir()) == before
    assert not (work / "pwned").exists()


@pytest.mark.parametrize("case", ["nan", "code-pickle", "exclude-all"])
def test_failed_prune_with_force_leaves_existing_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    make, extra, expected_code, fragment = PRUNE_FAILURES[case]
    out = tmp_path / "b.safetensors"
    out.write_bytes(b"previous bundle")
    code, _, err = run_cli(capsys, "prune", make(tmp_path), "--levels", LEVELS, "-o", out, "--force", *extra)
    assert code == expected_code
    assert_one_error_line(err, fragment)
    assert out.read_bytes() == b"previous bundle"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_unwritable_output_directory(tmp_path: Path, dense_checkpoint: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running with privileges that ignore directory permissions")
        code, _, err = run_cli(capsys, "prune", dense_checkpoint, "--levels", LEVELS, "-o", locked / "b.safetensors")
        assert code == 1
        assert_one_error_line(err, "not writable")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(stat.S_IRWXU)


def test_unwritable_output_directory_reported_before_work(
    tmp_path: Path, dense_checkpoint: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Works as root too: pretend the directory is read-only for the access check.
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == locked else real_access(p, mode, **kw))
    code, _, err = run_cli(capsys, "prune", dense_checkpoint, "--levels", LEVELS, "-o", locked / "b.safetensors")
    assert code == 1
    assert_one_error_line(err, f"output directory {locked} is not writable")
    assert list(locked.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "expected_code", "fragment"),
    [
        (["--level", "0.95"], 2, "choose a level between 0 and 0.9 (trained: 0, 0.5, 0.7, 0.9)"),
        (["--level", "abc"], 2, "not a number"),
        (["--level", "1.5"], 2, "level 1.5 is outside [0, 0.9]"),
        (["--level", "0.7", "--format", "zip"], 2, "unknown export format"),
        (["--level", "0.7", "--format", "onnx"], 1, "carries no model description"),
        (["--level", "0.7", "--bogus"], 2, "No such option: --bogus"),
        ([], 2, "--level"),
    ],
)
def test_export_failures(
    tmp_path: Path, bundle: Path, capsys: pytest.CaptureFixture[str], args: list[str], expected_code: int, fragment: str
) -> None:
    out_dir = tmp_path / "exports"
    out_dir.mkdir()
    code, _, err = run_cli(capsys, "export", bundle, *args, "-o", out_dir / "x.safetensors")
    assert code == expected_code
    assert_one_error_line(err, fragment)
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("command", ["inspect", "export"])
def test_non_bundle_inputs(tmp_path: Path, dense_checkpoint: Path, capsys: pytest.CaptureFixture[str],
                           command: str) -> None:
    extra = ["--level", "0.5", "-o", str(tmp_path / "x.safetensors")] if command == "export" else []
    code, _, err = run_cli(capsys, command, dense_checkpoint, *extra)
    assert code == 1
    assert_one_error_line(err, "is not a DSNN bundle")
    code, _, err = run_cli(capsys, command, _truncated(tmp_path), *extra)
    assert code == 1
    assert_one_error_line(err, "not a readable safetensors file")
    code, _, err = run_cli(capsys, command, tmp_path / "missing.safetensors", *extra)
    assert code == 1
    assert_one_error_line(err, "does not exist")
    assert not (tmp_path / "x.safetensors").exists()


def test_debug_shows_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "nope.pt"
    code, _, err = run_cli(capsys, "--debug", "prune", missing, "--levels", LEVELS, "-o", tmp_path / "b.safetensors")
    assert code == 1
    assert "Traceback (most recent call last)" in err and "DsnnError" in err
    assert err.strip().splitlines()[-1].startswith("error: checkpoint")
    monkeypatch.setenv("DSNN_DEBUG", "1")
    code, _, err = run_cli(capsys, "inspect", missing)
    assert code == 1 and "Traceback" in err


# ---------------------------------------------------------------- the installed entry point


def test_console_script_end_to_end(tmp_path: Path, dense_checkpoint: Path) -> None:
    def dsnn(*args: object):
        return run_dsnn(*args, launcher=console_script(), cwd=tmp_path, timeout=120)

    bundle = tmp_path / "b.safetensors"
    result = dsnn("prune", dense_checkpoint, "--levels", LEVELS, "-o", bundle, "--json")
    assert result.code == 0, result.err
    assert [e["pruned"] for e in json.loads(result.out)["levels"]] == [
        0, *(expected_pruned(s) for s in (0.5, 0.7, 0.9))
    ]
    result = dsnn("inspect", bundle, "--json", "--layers")
    assert result.code == 0, result.err
    assert sorted(json.loads(result.out)["tensors"]) == DEFAULT_PRUNED
    result = dsnn("inspect", dense_checkpoint)
    assert result.code == 1 and result.out == ""
    assert_one_error_line(result.err, "is not a DSNN bundle")


@pytest.mark.parametrize("command", ["evaluate", "transcribe"])
def test_help_names_every_model_the_command_runs(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, command, "--help")
    assert code == 0
    text = " ".join(out.split())
    assert "MODEL <path> A DSNN bundle or checkpoint, or a model directory (Hugging Face CTC or Whisper, " \
           "faster-whisper)." in text
