"""Read speech manifests (NeMo JSONL, Kaldi data directories, Hugging Face audiofolder) into utterances.

Accepted inputs of :func:`read_manifest`:

* a ``.jsonl`` / ``.json`` file: NeMo manifest, one JSON object per line with ``audio_filepath``
  (relative to the manifest's directory, or absolute), ``text`` and optional ``duration``, ``offset``,
  ``id`` / ``utt_id``;
* a directory holding ``wav.scp`` and ``text``: Kaldi data directory (``wav.scp`` lines
  ``<uttid> <path>``, relative paths resolved against the data directory; optional ``segments``);
  piped commands and ark entries are rejected;
* a directory holding ``metadata.csv`` or ``metadata.jsonl`` (or that file itself): Hugging Face
  audiofolder with a ``file_name`` column relative to that directory and a transcript column
  ``text``, ``transcription`` or ``sentence``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DsnnError

FORMATS_HINT = (
    "accepted manifests: a NeMo .jsonl/.json file, a Kaldi data directory with wav.scp and text, "
    "or a Hugging Face audiofolder directory with metadata.csv or metadata.jsonl"
)
TRANSCRIPT_COLUMNS = ("text", "transcription", "sentence")
ID_KEYS = ("id", "utt_id")


@dataclass(frozen=True)
class Utterance:
    """One utterance: where its audio is, what was said, and where in the manifest it came from."""

    id: str
    audio_path: Path
    text: str | None
    """The transcript; None when the manifest gives none (allowed only by ``read_manifest(require_text=False)``)."""
    duration: float | None = None
    offset: float = 0.0
    source: str = ""
    """``file:line`` of the manifest entry, for error messages."""


@dataclass
class _Entry:
    explicit_id: str | None
    audio_path: Path
    text: str | None
    duration: float | None
    offset: float
    source: str
    lineno: int


def read_manifest(path: str | os.PathLike[str], require_text: bool = True) -> list[Utterance]:
    """Read a NeMo, Kaldi or audiofolder manifest (see the module docstring) into utterances.

    ``require_text=False`` accepts audio-only manifests (calibration audio, label-free fine-tuning): an entry without
    a transcript (no ``text`` key or column, no Kaldi ``text`` line) gets ``text=None``.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DsnnError(f"manifest not found: {p}", hint="check the path; " + FORMATS_HINT)
    if p.is_dir():
        if (p / "wav.scp").is_file():
            utterances = _read_kaldi(p, require_text)
        else:
            meta = [p / name for name in ("metadata.csv", "metadata.jsonl") if (p / name).is_file()]
            if len(meta) > 1:
                raise DsnnError(f"{p} holds both metadata.csv and metadata.jsonl", hint="keep only one metadata file")
            if not meta:
                raise DsnnError(f"unknown manifest format: directory {p}", hint=FORMATS_HINT)
            utterances = _read_audiofolder(meta[0], require_text)
    elif p.name == "wav.scp":
        raise DsnnError(f"{p} is a Kaldi wav.scp file", hint=f"pass its data directory ({p.parent}) instead")
    elif p.name == "metadata.csv" or (p.name == "metadata.jsonl" and _looks_like_audiofolder_jsonl(p)):
        utterances = _read_audiofolder(p, require_text)
    elif p.suffix.lower() in (".jsonl", ".json"):
        utterances = _read_nemo(p, require_text)
    else:
        raise DsnnError(f"unknown manifest format: {p}", hint=FORMATS_HINT)
    if not utterances:
        raise DsnnError(f"manifest {p} holds no utterances", hint="add at least one entry")
    return utterances


# ----------------------------------------------------------------------------------------- helpers


def _resolve(base: Path, value: str) -> Path:
    """``value`` as an absolute, normalised path; relative values are taken against ``base``."""
    candidate = Path(value).expanduser()
    if not candidate.is_absolute():
        candidate = base.absolute() / candidate
    return Path(os.path.normpath(candidate))


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """Non-blank lines of a UTF-8 text file with their 1-based numbers."""
    try:
        with open(path, encoding="utf-8-sig") as fh:
            for lineno, line in enumerate(fh, start=1):
                if line.strip():
                    yield lineno, line.rstrip("\r\n")
    except UnicodeDecodeError as exc:
        raise DsnnError(f"{path} is not UTF-8 text ({exc.reason})", hint="re-save it as UTF-8") from None
    except OSError as exc:
        raise DsnnError(f"cannot read {path}: {exc.strerror or exc}") from None


def _json_records(path: Path, hint: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """The JSON object on each non-blank line, with its number; DsnnError naming the line (and ``hint``) otherwise."""
    for lineno, line in _lines(path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DsnnError(f"{path}:{lineno}: not valid JSON ({exc.msg})", hint=hint) from None
        if not isinstance(record, dict):
            raise DsnnError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}", hint=hint)
        yield lineno, record


def _number(value: Any, key: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise DsnnError(f"{source}: '{key}' must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise DsnnError(f"{source}: '{key}' must be a number, got {value!r}") from None
    if not math.isfinite(number) or number < 0:
        raise DsnnError(f"{source}: '{key}' must be a non-negative number, got {value!r}")
    return number


def _optional_number(record: dict[str, Any], key: str, source: str) -> float | None:
    value = record.get(key)
    if value is None or value == "":
        return None
    return _number(value, key, source)


def _explicit_id(record: dict[str, Any], source: str) -> str | None:
    for key in ID_KEYS:
        value = record.get(key)
        if value is not None and value != "":
            if not isinstance(value, (str, int)) or isinstance(value, bool):
                raise DsnnError(f"{source}: '{key}' must be a string, got {value!r}")
            return str(value)
    return None


def _assign_ids(entries: list[_Entry]) -> list[Utterance]:
    """Utterances with unique ids: explicit ids as given, else the audio stem (plus line if repeated)."""
    stems = Counter(e.audio_path.stem for e in entries if e.explicit_id is None)
    seen: dict[str, str] = {}
    utterances = []
    for e in entries:
        if e.explicit_id is not None:
            utt_id = e.explicit_id
        else:
            stem = e.audio_path.stem
            utt_id = stem if stems[stem] == 1 else f"{stem}-{e.lineno}"
        if utt_id in seen:
            raise DsnnError(
                f"{e.source}: duplicate utterance id {utt_id!r} (first at {seen[utt_id]})",
                hint="utterance ids must be unique",
            )
        seen[utt_id] = e.source
        utterances.append(Utterance(utt_id, e.audio_path, e.text, e.duration, e.offset, e.source))
    return utterances


# ------------------------------------------------------------------------------------------- NeMo


def _json_entry(record: dict[str, Any], audio_path: Path, text: str | None, source: str, lineno: int) -> _Entry:
    """The entry of a JSON record (NeMo line or audiofolder row): its optional id, duration and offset read."""
    return _Entry(
        explicit_id=_explicit_id(record, source),
        audio_path=audio_path,
        text=text,
        duration=_optional_number(record, "duration", source),
        offset=_optional_number(record, "offset", source) or 0.0,
        source=source,
        lineno=lineno,
    )


def _read_nemo(path: Path, require_text: bool = True) -> list[Utterance]:
    base = path.parent
    entries = []
    for lineno, record in _json_records(path, "a NeMo manifest holds one JSON object per line"):
        source = f"{path}:{lineno}"
        for key in ("audio_filepath", "text") if require_text else ("audio_filepath",):
            if key not in record:
                hint = "each line needs 'audio_filepath' and 'text'"
                if "file_name" in record:
                    hint = "this looks like Hugging Face audiofolder metadata; pass its directory"
                raise DsnnError(f"{source}: missing key '{key}'", hint=hint)
        audio, text = record["audio_filepath"], record.get("text")
        if not isinstance(audio, str) or not audio.strip():
            raise DsnnError(f"{source}: 'audio_filepath' must be a non-empty string, got {audio!r}")
        if not isinstance(text, str) and (require_text or text is not None):
            raise DsnnError(f"{source}: 'text' must be a string, got {text!r}")
        entries.append(_json_entry(record, _resolve(base, audio), text, source, lineno))
    return _assign_ids(entries)


# ------------------------------------------------------------------------------------------ Kaldi

_ARK_ENTRY = re.compile(r"\.(ark|scp):\d+$")


def _kaldi_table(path: Path) -> dict[str, tuple[str, int]]:
    """``key -> (rest of line, line number)`` of a Kaldi table file; duplicate keys are an error."""
    table: dict[str, tuple[str, int]] = {}
    for lineno, line in _lines(path):
        parts = line.strip().split(maxsplit=1)
        key, value = parts[0], (parts[1].strip() if len(parts) > 1 else "")
        if key in table:
            raise DsnnError(f"{path}:{lineno}: duplicate key {key!r} (first at {path}:{table[key][1]})")
        table[key] = (value, lineno)
    return table


def _kaldi_audio(base: Path, value: str, source: str) -> Path:
    if not value:
        raise DsnnError(f"{source}: missing audio path", hint="wav.scp lines are '<uttid> <path>'")
    if value.endswith("|") or value.startswith("|") or " | " in value:
        raise DsnnError(
            f"{source}: piped wav.scp entries are not supported ({value!r})",
            hint="convert the audio to files (e.g. WAV or FLAC) and list their paths",
        )
    if _ARK_ENTRY.search(value):
        raise DsnnError(f"{source}: ark/scp offsets are not supported ({value!r})", hint="list plain audio file paths")
    resolved = _resolve(base, value)
    if any(c.isspace() for c in value) and not resolved.exists():
        raise DsnnError(
            f"{source}: wav.scp entry looks like a command, not an audio file ({value!r})",
            hint="list plain audio file paths; commands are not supported",
        )
    return resolved


def _read_kaldi(directory: Path, require_text: bool = True) -> list[Utterance]:
    wav_scp, text_file = directory / "wav.scp", directory / "text"
    if require_text and not text_file.is_file():
        raise DsnnError(f"Kaldi data directory {directory} has no 'text' file", hint="add '<uttid> <transcript>' lines")
    recordings = _kaldi_table(wav_scp)
    texts = _kaldi_table(text_file) if text_file.is_file() else {}
    audio = {key: _kaldi_audio(directory, value, f"{wav_scp}:{lineno}") for key, (value, lineno) in recordings.items()}

    # (utterance id, audio path, offset, duration, source, line number)
    rows: list[tuple[str, Path, float, float | None, str, int]] = []
    segments = directory / "segments"
    if segments.is_file():
        for lineno, line in _lines(segments):
            source = f"{segments}:{lineno}"
            parts = line.split()
            if len(parts) != 4:
                raise DsnnError(f"{source}: expected '<uttid> <recording> <start> <end>'")
            utt_id, rec_id = parts[0], parts[1]
            if rec_id not in audio:
                raise DsnnError(f"{source}: recording {rec_id!r} is not in {wav_scp}")
            start = _number(parts[2], "start", source)
            duration = None
            if parts[3] != "-1":
                end = _number(parts[3], "end", source)
                if end <= start:
                    raise DsnnError(f"{source}: segment end {end} is not after start {start}")
                duration = end - start
            rows.append((utt_id, audio[rec_id], start, duration, source, lineno))
    else:
        for utt_id, (_, lineno) in recordings.items():
            rows.append((utt_id, audio[utt_id], 0.0, None, f"{wav_scp}:{lineno}", lineno))

    entries = []
    for utt_id, path, offset, duration, source, lineno in rows:
        if utt_id not in texts and require_text:
            raise DsnnError(
                f"{source}: utterance {utt_id!r} has no transcript in {text_file}",
                hint="every utterance needs a '<uttid> <transcript>' line",
            )
        text = texts[utt_id][0] if utt_id in texts else None
        entries.append(_Entry(utt_id, path, text, duration, offset, source, lineno))
    return _assign_ids(entries)


# ------------------------------------------------------------------------------------ audiofolder


def _looks_like_audiofolder_jsonl(path: Path) -> bool:
    for _, line in _lines(path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            return False
        return isinstance(record, dict) and "file_name" in record and "audio_filepath" not in record
    return False


def _audiofolder_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    if path.suffix == ".csv":
        try:
            with open(path, encoding="utf-8-sig", newline="") as fh:
                reader = csv.DictReader(fh)
                columns = reader.fieldnames or []
                if "file_name" not in columns:
                    raise DsnnError(
                        f"{path}:1: no 'file_name' column (columns: {', '.join(columns) or 'none'})",
                        hint="audiofolder metadata needs 'file_name' and a transcript column",
                    )
                for row in reader:
                    if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
                        continue
                    yield reader.line_num, row
        except UnicodeDecodeError as exc:
            raise DsnnError(f"{path} is not UTF-8 text ({exc.reason})", hint="re-save it as UTF-8") from None
        except csv.Error as exc:
            raise DsnnError(f"{path}: malformed CSV ({exc})") from None
        return
    yield from _json_records(path, "metadata.jsonl holds one JSON object per line")


def _read_audiofolder(path: Path, require_text: bool = True) -> list[Utterance]:
    base = path.parent
    entries = []
    for lineno, record in _audiofolder_records(path):
        source = f"{path}:{lineno}"
        file_name = record.get("file_name")
        if not isinstance(file_name, str) or not file_name.strip():
            raise DsnnError(f"{source}: missing key 'file_name'", hint="each row needs the audio file name")
        column = next((c for c in TRANSCRIPT_COLUMNS if c in record), None)
        if column is None and require_text:
            raise DsnnError(
                f"{source}: missing key 'text'",
                hint=f"audiofolder metadata needs one of the columns {', '.join(TRANSCRIPT_COLUMNS)}",
            )
        text = record[column] if column is not None else None
        if text is None and column is not None:
            text = ""
        if text is not None and not isinstance(text, str):
            raise DsnnError(f"{source}: '{column}' must be a string, got {text!r}")
        entries.append(_json_entry(record, _resolve(base, file_name.strip()), text, source, lineno))
    return _assign_ids(entries)
