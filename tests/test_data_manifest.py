"""Manifest readers: NeMo JSONL, Kaldi data directories, Hugging Face audiofolder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsnn_compress.data.manifest import Utterance, read_manifest
from dsnn_compress.errors import DsnnError

DATA = Path(__file__).parent / "data"
AUDIO = (DATA / "audio").absolute()


def _key(utts: list[Utterance]) -> list[tuple[str, Path, str]]:
    return [(u.id, u.audio_path, u.text) for u in utts]


def test_nemo_manifest_fields() -> None:
    utts = read_manifest(DATA / "manifest.jsonl")
    assert len(utts) == 8
    first = utts[0]
    assert first.id == "train-02732"
    assert first.audio_path == AUDIO / "train-02732.ogg"
    assert first.audio_path.is_file()
    assert first.text == "call liam"
    assert first.duration == pytest.approx(1.28)
    assert first.offset == 0.0
    assert first.source.endswith("manifest.jsonl:1")
    assert utts[-1].text == "it can't make things any worse"


@pytest.mark.parametrize(
    "path",
    [
        "kaldi",
        "audiofolder",
        "audiofolder/metadata.csv",
        "audiofolder_jsonl",
        "audiofolder_jsonl/metadata.jsonl",
    ],
)
def test_all_formats_parse_to_the_same_utterances(path: str) -> None:
    reference = _key(read_manifest(DATA / "manifest.jsonl"))
    assert _key(read_manifest(DATA / path)) == reference


def test_string_path_and_absolute_audio(tmp_path: Path) -> None:
    audio = AUDIO / "test-00010.flac"
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"audio_filepath": str(audio), "text": "skip this song"}) + "\n")
    (utt,) = read_manifest(str(manifest))
    assert utt.audio_path == audio
    assert utt.duration is None


def test_blank_lines_skipped_and_explicit_ids(tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        "\n"
        + json.dumps({"audio_filepath": "a.wav", "text": "x", "id": "u1", "offset": 0.5, "duration": 1})
        + "\n   \n"
        + json.dumps({"audio_filepath": "b.wav", "text": "y", "utt_id": "u2"})
        + "\n\n"
    )
    utts = read_manifest(manifest)
    assert [u.id for u in utts] == ["u1", "u2"]
    assert utts[0].offset == 0.5 and utts[0].duration == 1.0
    assert utts[0].audio_path == tmp_path.absolute() / "a.wav"
    assert utts[1].source.endswith("m.jsonl:4")


def test_repeated_audio_stems_get_line_numbers(tmp_path: Path) -> None:
    lines = [
        {"audio_filepath": "a/x.wav", "text": "one"},
        {"audio_filepath": "b/x.wav", "text": "two"},
        {"audio_filepath": "y.wav", "text": "three"},
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert [u.id for u in read_manifest(manifest)] == ["x-1", "x-2", "y"]


def test_duplicate_explicit_ids_rejected(tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    rec = {"audio_filepath": "a.wav", "text": "x", "id": "same"}
    manifest.write_text(json.dumps(rec) + "\n" + json.dumps(rec) + "\n")
    with pytest.raises(DsnnError, match=r"m\.jsonl:2: duplicate utterance id 'same'"):
        read_manifest(manifest)


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(DsnnError, match="manifest not found") as info:
        read_manifest(tmp_path / "nope.jsonl")
    assert info.value.hint


def test_non_json_line_names_file_and_line(tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"audio_filepath": "a.wav", "text": "x"}) + "\n\n{not json\n")
    with pytest.raises(DsnnError, match=r"m\.jsonl:3: not valid JSON"):
        read_manifest(manifest)


def test_non_object_line(tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("[1, 2]\n")
    with pytest.raises(DsnnError, match=r"m\.jsonl:1: expected a JSON object"):
        read_manifest(manifest)


@pytest.mark.parametrize("missing", ["audio_filepath", "text"])
def test_missing_key_names_file_line_and_key(tmp_path: Path, missing: str) -> None:
    rec = {"audio_filepath": "a.wav", "text": "x"}
    del rec[missing]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"audio_filepath": "b.wav", "text": "y"}) + "\n" + json.dumps(rec) + "\n")
    with pytest.raises(DsnnError, match=rf"m\.jsonl:2: missing key '{missing}'"):
        read_manifest(manifest)


@pytest.mark.parametrize(
    ("record", "pattern"),
    [
        ({"audio_filepath": "a.wav", "text": 3}, "'text' must be a string"),
        ({"audio_filepath": "", "text": "x"}, "'audio_filepath' must be a non-empty string"),
        ({"audio_filepath": "a.wav", "text": "x", "duration": "long"}, "'duration' must be a number"),
        ({"audio_filepath": "a.wav", "text": "x", "offset": -1}, "'offset' must be a non-negative number"),
    ],
)
def test_bad_values(tmp_path: Path, record: dict, pattern: str) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps(record) + "\n")
    with pytest.raises(DsnnError, match=pattern):
        read_manifest(manifest)


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_empty_manifest(tmp_path: Path, content: str) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(content)
    with pytest.raises(DsnnError, match="holds no utterances"):
        read_manifest(manifest)


def test_unknown_formats(tmp_path: Path) -> None:
    other = tmp_path / "list.txt"
    other.write_text("a.wav hello\n")
    with pytest.raises(DsnnError, match="unknown manifest format") as info:
        read_manifest(other)
    assert "NeMo" in (info.value.hint or "") and "Kaldi" in (info.value.hint or "")
    with pytest.raises(DsnnError, match="unknown manifest format"):
        read_manifest(tmp_path)


def test_wav_scp_file_points_to_directory() -> None:
    with pytest.raises(DsnnError, match="wav.scp") as info:
        read_manifest(DATA / "kaldi" / "wav.scp")
    assert "data directory" in (info.value.hint or "")


def _kaldi(tmp_path: Path, wav_scp: str, text: str) -> Path:
    d = tmp_path / "kaldi"
    d.mkdir()
    (d / "wav.scp").write_text(wav_scp)
    (d / "text").write_text(text)
    return d


@pytest.mark.parametrize(
    "entry",
    ["sox a.wav -t wav - |", "flac -c -d -s a.flac |", "| cat a.wav", "sph2pipe -f wav a.sph"],
)
def test_kaldi_rejects_commands(tmp_path: Path, entry: str) -> None:
    d = _kaldi(tmp_path, f"u1 a.wav\nu2 {entry}\n", "u1 hi\nu2 there\n")
    with pytest.raises(DsnnError, match=r"wav\.scp:2: .*(piped|command)"):
        read_manifest(d)


def test_kaldi_rejects_ark_entries(tmp_path: Path) -> None:
    d = _kaldi(tmp_path, "u1 feats.ark:1234\n", "u1 hi\n")
    with pytest.raises(DsnnError, match=r"wav\.scp:1: ark"):
        read_manifest(d)


def test_kaldi_missing_transcript(tmp_path: Path) -> None:
    d = _kaldi(tmp_path, "u1 a.wav\nu2 b.wav\n", "u1 hi\n")
    with pytest.raises(DsnnError, match=r"wav\.scp:2: utterance 'u2' has no transcript"):
        read_manifest(d)


def test_kaldi_missing_text_file(tmp_path: Path) -> None:
    d = tmp_path / "kaldi"
    d.mkdir()
    (d / "wav.scp").write_text("u1 a.wav\n")
    with pytest.raises(DsnnError, match="no 'text' file"):
        read_manifest(d)


def test_kaldi_duplicate_key(tmp_path: Path) -> None:
    d = _kaldi(tmp_path, "u1 a.wav\nu1 b.wav\n", "u1 hi\n")
    with pytest.raises(DsnnError, match=r"wav\.scp:2: duplicate key 'u1'"):
        read_manifest(d)


def test_kaldi_segments_and_empty_transcript(tmp_path: Path) -> None:
    d = _kaldi(tmp_path, "rec /abs/rec.wav\n", "s1 hello world\ns2\n")
    (d / "segments").write_text("s1 rec 0.0 1.5\ns2 rec 1.5 -1\n")
    utts = read_manifest(d)
    assert [(u.id, u.text, u.offset, u.duration) for u in utts] == [
        ("s1", "hello world", 0.0, 1.5),
        ("s2", "", 1.5, None),
    ]
    assert utts[0].audio_path == Path("/abs/rec.wav")


def test_audiofolder_needs_columns(tmp_path: Path) -> None:
    d = tmp_path / "af"
    d.mkdir()
    (d / "metadata.csv").write_text("path,text\na.wav,hi\n")
    with pytest.raises(DsnnError, match="no 'file_name' column"):
        read_manifest(d)
    (d / "metadata.csv").write_text("file_name,label\na.wav,3\n")
    with pytest.raises(DsnnError, match=r"metadata\.csv:2: missing key 'text'"):
        read_manifest(d)


def test_audiofolder_sentence_column_and_quoting(tmp_path: Path) -> None:
    d = tmp_path / "af"
    d.mkdir()
    (d / "metadata.csv").write_text('file_name,sentence\nclips/a.mp3,"hello, world"\n\nb.wav,bye\n')
    utts = read_manifest(d)
    assert [(u.id, u.text) for u in utts] == [("a", "hello, world"), ("b", "bye")]
    assert utts[0].audio_path == d.absolute() / "clips" / "a.mp3"


def test_audiofolder_with_two_metadata_files(tmp_path: Path) -> None:
    (tmp_path / "metadata.csv").write_text("file_name,text\na.wav,x\n")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.wav", "text": "x"}\n')
    with pytest.raises(DsnnError, match="both metadata.csv and metadata.jsonl"):
        read_manifest(tmp_path)
