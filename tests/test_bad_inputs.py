"""One table of bad inputs for every command: the exit code and a fragment of the one `error:` line each gives,
with no output left behind. The model inputs (missing, a directory, empty, truncated, damaged, not a model, ...)
run through every command that reads one, so a new command or a new reader is checked against all of them.
Cases that need their own set-up live with their command (test_cli_foundation: prune sources and export
options; test_evaluate: manifests and gates; test_transcribe: audio; test_cli_finetune: recipes; test_demo:
--out and --max-eval; test_integrity: checksums and races)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from asr_fixtures import AUDIO, MANIFEST, TinyModel
from helpers import assert_one_error_line, random_state_dict, run_cli, write_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

AUDIO_FILE = AUDIO / "test-00001.flac"


def _flipped(root: Path, model: TinyModel) -> Path:
    raw = bytearray(model.bundle.read_bytes())
    raw[-3] ^= 0xFF  # inside the last tensor's data
    path = root / "flipped.safetensors"
    path.write_bytes(bytes(raw))
    return path


def _truncated(root: Path, model: TinyModel) -> Path:
    path = root / "truncated.safetensors"
    path.write_bytes(model.bundle.read_bytes()[: model.bundle.stat().st_size // 2])
    return path


def _write(name: str, data: bytes) -> Callable[[Path, TinyModel], Path]:
    def make(root: Path, _model: TinyModel) -> Path:
        (root / name).write_bytes(data)
        return root / name

    return make


def _directory(root: Path, _model: TinyModel) -> Path:
    (root / "folder").mkdir()
    return root / "folder"


# input name -> how to make it
MODEL_INPUTS: dict[str, Callable[[Path, TinyModel], Path]] = {
    "missing": lambda root, _m: root / "nope.safetensors",
    "directory": _directory,
    "empty": _write("empty.safetensors", b""),
    "short": _write("short.safetensors", b"\x08\x00\x00"),
    "huge-header": _write("huge.safetensors", (2**62).to_bytes(8, "little") + b"{}"),
    "header-not-json": _write("text.safetensors", (8).to_bytes(8, "little") + b"not json"),
    "truncated": _truncated,
    "flipped-byte": _flipped,
    "plain-state-dict": lambda root, _m: write_checkpoint(root / "plain.safetensors", random_state_dict(0)),
    "text-file": _write("notes.txt", b"hello"),
    "pickle-garbage": _write("model.pt", b"\x80\x04garbage"),
}

# fragment of the error line for each input; a command that reads any model (evaluate, transcribe, finetune) and
# one that needs a bundle (inspect, export) differ only for a missing path and for a file without a model
EXPECTED = {
    "missing": "does not exist",
    "directory": "is a directory without config.json",
    "empty": "not a readable safetensors file (the file has 0 bytes",
    "short": "not a readable safetensors file (the file has 3 bytes",
    "huge-header": "exceeds the 100000000-byte limit",
    "header-not-json": "the header does not start with '{'",
    "truncated": "not a readable safetensors file (the tensors end at byte",
    "flipped-byte": "is corrupt: checksum mismatch in tensor",
    "plain-state-dict": {"bundle": "is not a DSNN bundle", "evaluate": "nor a model directory dsnn can run",
                         "transcribe": "nor a model directory dsnn can run",
                         "finetune": "carries no model description, so it cannot be fine-tuned"},
    "text-file": "has an unsupported extension '.txt'",
    "pickle-garbage": "is not a readable torch checkpoint",
}

COMMANDS: dict[str, Callable[[Path, Path], list[object]]] = {
    "inspect": lambda model, out: ["inspect", model],
    "export": lambda model, out: ["export", model, "--level", "0", "-o", out / "x.safetensors"],
    "evaluate": lambda model, out: ["evaluate", model, "--data", MANIFEST, "--json", out / "r.json"],
    "transcribe": lambda model, out: ["transcribe", model, AUDIO_FILE],
    "finetune": lambda model, out: ["finetune", model, "--data", MANIFEST, "--steps", "1", "-o",
                                    out / "f.safetensors", "--set", "training.device=cpu"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("kind", sorted(MODEL_INPUTS))
def test_bad_model_input(command: str, kind: str, tiny_model: TinyModel, tmp_path: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    work, out = tmp_path / "in", tmp_path / "out"
    work.mkdir()
    out.mkdir()
    model = MODEL_INPUTS[kind](work, tiny_model)
    expected = EXPECTED[kind]
    if isinstance(expected, dict):
        expected = expected.get(command, expected.get("bundle"))
    before = sorted(work.iterdir())
    result = run_cli(capsys, *COMMANDS[command](model, out))
    assert result.code == 1, result.err
    assert_one_error_line(result.err, expected)
    assert result.out == ""
    assert list(out.iterdir()) == []  # nothing written, no temporary file
    assert sorted(work.iterdir()) == before


# command-specific bad options: (arguments with {bundle}/{out} placeholders, exit code, fragment)
OPTION_CASES: dict[str, tuple[list[str], int, str]] = {
    "inspect-unknown-option": (["inspect", "{bundle}", "--levels", "0.5"], 2, "No such option: --levels"),
    "inspect-two-bundles": (["inspect", "{bundle}", "{bundle}"], 2, "unexpected extra argument"),
    "export-level-beyond-bundle": (["export", "{bundle}", "--level", "0.95", "-o", "{out}/x.safetensors"], 2,
                                   "level 0.95 is outside [0, 0.9]"),
    "export-all-unknown-format": (["export", "{bundle}", "--level", "all", "--format", "zip", "-o",
                                   "{out}/x.safetensors"], 2, "unknown export format 'zip'"),
    "evaluate-level-beyond-bundle": (["evaluate", "{bundle}", "--data", "{manifest}", "--levels", "0.95"], 2,
                                     "level 0.95 is outside [0, 0.9]"),
    "evaluate-level-text": (["evaluate", "{bundle}", "--data", "{manifest}", "--levels", "abc"], 2,
                            "level 'abc' is not a number"),
    "evaluate-batch-frames": (["evaluate", "{bundle}", "--data", "{manifest}", "--batch-frames", "0"], 2,
                              "--batch-frames must be positive"),
    "evaluate-normalizer": (["evaluate", "{bundle}", "--data", "{manifest}", "--normalizer", "klingon"], 2,
                            "unknown text normalizer 'klingon'"),
    "transcribe-level-text": (["transcribe", "{bundle}", "{audio}", "--level", "abc"], 2, "is not a number"),
    "transcribe-level-one": (["transcribe", "{bundle}", "{audio}", "--level", "1.5"], 2,
                             "level 1.5 is outside [0, 0.9]"),
    "finetune-negative-steps": (["finetune", "{bundle}", "--data", "{manifest}", "--steps", "-1", "-o",
                                 "{out}/f.safetensors"], 2, "training.steps must be a positive integer"),
    "finetune-nan-lr": (["finetune", "{bundle}", "--data", "{manifest}", "--lr", "nan", "-o", "{out}/f.safetensors"],
                        2, "optimizer.lr must be a positive number, got nan"),
    "finetune-sampling": (["finetune", "{bundle}", "--data", "{manifest}", "--sampling", "some", "-o",
                           "{out}/f.safetensors"], 2, "sampling.mode must be one of all, sandwich, uniform"),
    "finetune-resume-nothing": (["finetune", "{bundle}", "--data", "{manifest}", "--resume", "-o",
                                 "{out}/f.safetensors"], 2, "no training state"),
    "finetune-missing-data": (["finetune", "{bundle}", "--data", "{out}/none.jsonl", "-o", "{out}/f.safetensors"], 1,
                              "none.jsonl"),
    "prune-allocation": (["prune", "{checkpoint}", "--levels", "0.5", "--allocation", "x", "-o",
                          "{out}/p.safetensors"], 2, "unknown allocation 'x'; choose one of per-layer"),
    "prune-method": (["prune", "{checkpoint}", "--levels", "0.5", "--method", "obs", "-o", "{out}/p.safetensors"], 2,
                     "unknown pruning method 'obs'; choose one of magnitude, wanda"),
    "prune-wanda-without-calibration": (["prune", "{checkpoint}", "--levels", "0.5", "--method", "wanda", "-o",
                                         "{out}/p.safetensors"], 2, "--method wanda scores weights from activations"),
    "prune-sensitivity-without-calibration": (["prune", "{checkpoint}", "--levels", "0.5", "--profile", "sensitivity",
                                               "-o", "{out}/p.safetensors"], 2, "add --calibration MANIFEST"),
    "prune-calibration-without-usable-audio": (["prune", "{checkpoint}", "--levels", "0.5", "--method", "wanda",
                                                "--calibration", "{unusable}", "-o", "{out}/p.safetensors"], 2,
                                               "holds no usable audio: 1 utterance(s) skipped"),
    "prune-profile": (["prune", "{checkpoint}", "--levels", "0.5", "--profile", "flat", "-o", "{out}/p.safetensors"],
                      2, "unknown sparsity profile 'flat'"),
    "prune-profile-global": (["prune", "{checkpoint}", "--levels", "0.5", "--profile", "owl", "--allocation", "global",
                              "-o", "{out}/p.safetensors"], 2, "--profile owl sets each block's sparsity"),
    "finetune-without-transcripts": (["finetune", "{bundle}", "--data", "{audio_only}", "-o", "{out}/f.safetensors"],
                                     2, "have no transcript ('text'), and there is no teacher"),
    "demo-duplicate-level": (["demo", "--levels", "0.5,0.5", "--out", "{out}/d"], 2, "0.5 is given twice"),
    "demo-level-text": (["demo", "--levels", "abc", "--out", "{out}/d"], 2, "'abc' is not a number"),
    "demo-only-dense": (["demo", "--levels", "0", "--out", "{out}/d"], 2, "no sparse level given"),
    "demo-negative-steps": (["demo", "--steps", "-1", "--out", "{out}/d"], 2, "--steps must be at least 1"),
}


@pytest.mark.parametrize("case", sorted(OPTION_CASES))
def test_bad_option(case: str, tiny_model: TinyModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args, code, fragment = OPTION_CASES[case]
    out = tmp_path / "out"
    out.mkdir()
    bundle = Path(shutil.copy(tiny_model.bundle, tmp_path / "bundle.safetensors"))
    unusable = tmp_path / "unusable.jsonl"  # audio that does not exist: no usable calibration clip
    unusable.write_text(json.dumps({"audio_filepath": str(tmp_path / "missing.wav")}) + "\n")
    audio_only = tmp_path / "audio-only.jsonl"  # the test manifest without its transcripts
    audio_only.write_text("".join(json.dumps({"audio_filepath": str(MANIFEST.parent / row["audio_filepath"])}) + "\n"
                                  for row in map(json.loads, MANIFEST.read_text().splitlines())))
    values = {"bundle": bundle, "checkpoint": tiny_model.checkpoint, "manifest": MANIFEST, "audio": AUDIO_FILE,
              "out": out, "unusable": unusable, "audio_only": audio_only}
    result = run_cli(capsys, *[a.format(**values) for a in args])
    assert result.code == code, result.err
    assert_one_error_line(result.err, fragment)
    assert result.out == ""
    assert list(out.iterdir()) == []
