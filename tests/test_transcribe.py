"""`dsnn transcribe MODEL AUDIO...`: output formats, level switching against an independent decoding, errors."""

from __future__ import annotations

import json

import pytest
from asr_fixtures import (
    adapter_at,
    audio_files,
    decode_file,
    write_random_bytes,
    write_zero_length_wav,
)
from helpers import assert_one_error_line, run_cli

from dsnn_compress.errors import UsageError
from dsnn_compress.evaluation.transcribe import transcribe

FILES = [audio_files()[i] for i in (0, 6, 7)]  # one OGG and two FLAC files

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tsv(stdout: str) -> list[tuple[str, str]]:
    lines = stdout.split("\n")
    assert lines[-1] == ""  # newline-terminated
    return [tuple(line.split("\t", 1)) for line in lines[:-1]]


@pytest.fixture(scope="module")
def expected(tiny_model):
    """Transcripts per level from models rebuilt with ``state_dict_at(level)``, decoded file by file."""
    out = {}
    for level in (0.0, 0.5, 0.9):
        adapter = adapter_at(tiny_model.bundle, level)
        out[level] = [decode_file(adapter, path) for path in FILES]
    assert out[0.0] != out[0.9]  # the levels differ, so the comparisons below can tell them apart
    return out


def test_one_tab_separated_line_per_file(tiny_model, expected, capsys):
    code, stdout, err = run_cli(capsys, "transcribe", tiny_model.bundle, *FILES)
    assert code == 0, err
    assert tsv(stdout) == [(str(path), text) for path, text in zip(FILES, expected[0.0])]


@pytest.mark.parametrize("level", ["0.9", "90%", "0.5"])
def test_level_matches_the_state_dict_at_that_level(tiny_model, expected, capsys, level):
    code, stdout, err = run_cli(capsys, "transcribe", tiny_model.bundle, *FILES, "--level", level)
    assert code == 0, err
    value = 0.5 if level == "0.5" else 0.9
    assert [text for _, text in tsv(stdout)] == expected[value]


def test_json_output(tiny_model, expected, capsys):
    code, stdout, err = run_cli(capsys, "transcribe", tiny_model.bundle, *FILES, "--level", "0.9", "--json")
    assert code == 0, err
    items = json.loads(stdout)
    assert [set(item) for item in items] == [{"file", "level", "trained", "text"}] * len(FILES)
    assert [item["trained"] for item in items] == [True] * len(FILES)
    assert [item["file"] for item in items] == [str(p) for p in FILES]
    assert [item["level"] for item in items] == [0.9] * len(FILES)
    assert [item["text"] for item in items] == expected[0.9]


def test_json_output_stays_valid_with_long_paths(tiny_model, tmp_path, capsys):
    deep = tmp_path / ("d" * 200)
    deep.mkdir()
    audio = deep / "x.flac"
    audio.write_bytes(FILES[0].read_bytes())
    code, stdout, err = run_cli(capsys, "transcribe", tiny_model.bundle, audio, audio, "--json")
    assert code == 0, err
    assert [item["file"] for item in json.loads(stdout)] == [str(audio)] * 2


def test_python_api_matches_the_cli(tiny_model, expected):
    results = transcribe(tiny_model.bundle, FILES, "0.5")
    assert [r["text"] for r in results] == expected[0.5]
    assert [r["level"] for r in results] == [0.5] * len(FILES)


def test_plain_checkpoint_transcribes_densely(tiny_model, expected, capsys):
    code, stdout, err = run_cli(capsys, "transcribe", tiny_model.checkpoint, *FILES)
    assert code == 0, err
    assert [text for _, text in tsv(stdout)] == expected[0.0]
    code, _, err = run_cli(capsys, "transcribe", tiny_model.checkpoint, FILES[0], "--level", "0.5")
    assert code == 2
    assert "0.5" in assert_one_error_line(err)


def test_level_outside_the_bundle_range_is_a_usage_error(tiny_model, capsys):
    for level in ("0.95", "1.5", "lots"):
        code, stdout, err = run_cli(capsys, "transcribe", tiny_model.bundle, FILES[0], "--level", level)
        assert code == 2
        assert_one_error_line(err)
        assert stdout == ""
    with pytest.raises(UsageError, match=r"0.95 is outside \[0, 0.9\]"):
        transcribe(tiny_model.bundle, FILES[:1], 0.95)


@pytest.mark.parametrize("kind", ["missing", "corrupt", "empty"])
def test_bad_audio_fails_with_one_line(tiny_model, tmp_path, capsys, kind):
    if kind == "missing":
        bad, needle = tmp_path / "nope.wav", "not found"
    elif kind == "corrupt":
        bad, needle = write_random_bytes(tmp_path / "noise.flac"), "cannot read audio"
    else:
        bad, needle = write_zero_length_wav(tmp_path / "empty.wav"), "empty"
    code, stdout, err = run_cli(capsys, "transcribe", tiny_model.bundle, FILES[0], bad)
    assert code == 1
    line = assert_one_error_line(err)
    assert needle in line
    assert bad.name in line
    assert stdout == ""  # nothing printed for the good file either: all audio is read first


def test_missing_model(tmp_path, capsys):
    code, _, err = run_cli(capsys, "transcribe", tmp_path / "nope.safetensors", FILES[0])
    assert code == 1
    assert "does not exist" in assert_one_error_line(err)


def test_no_audio_is_a_usage_error(tiny_model, capsys):
    code, _, err = run_cli(capsys, "transcribe", tiny_model.bundle)
    assert code == 2
    assert_one_error_line(err)
