"""The ``ct2-dir`` reader: a faster-whisper / CTranslate2 Whisper model directory (``model.bin`` + ``config.json``).

Recognised cheaply (``model.bin`` whose first bytes are a CTranslate2 header, whatever its version or spec, so that
an unsupported one gets a clear error) and read by :func:`~dsnn_compress.models.whisper.ct2.read_ct2_directory` into
the Hugging Face Whisper layout: the tensors use HF names and the model description is the ``whisper`` family's, so
every later step treats it like a Hugging Face Whisper directory. Registered ahead of the generic readers when the
opener loads its plug-ins (:data:`~dsnn_compress.sources.opener.READER_PLUGINS`).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DsnnError
from ..models.registry import describe_directory
from ..models.whisper.ct2 import ffn_dims_of, peek_ct2_header, read_ct2_directory
from .opener import Source, SourceKind, SourceReader, register_reader

KIND = SourceKind.CT2_DIR


def recognises(path: Path) -> bool:
    """A directory with ``config.json`` and a ``model.bin`` that starts like a CTranslate2 model."""
    return (path.is_dir() and (path / "config.json").is_file() and (path / "model.bin").is_file()
            and peek_ct2_header(path / "model.bin") is not None)


def read(path: Path, verify: bool = True) -> Source:
    """The HF-named tensors, ``model.bin`` as the hashed file, the HF text files and the ``whisper`` description,
    with the per-layer FFN sizes (``ffn_dims``) of a side whose layers differ (``verify`` has nothing to check:
    CTranslate2 files carry no dsnn checksums)."""
    tensors, text_files = read_ct2_directory(path)
    meta = describe_directory(text_files, list(tensors))
    if meta is None:
        raise DsnnError(f"{path}: the CTranslate2 model was read but no model family recognises it",
                        "check that the whisper family is installed (dsnn_compress.models.whisper)")
    ffn_dims = ffn_dims_of(tensors)
    if ffn_dims:
        meta = {**meta, "ffn_dims": ffn_dims}
    return Source(path, KIND, tensors, path / "model.bin", meta, hf_files=text_files)


register_reader(SourceReader(KIND, recognises, read))
