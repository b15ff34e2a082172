"""The one place that recognises inputs: :func:`open_source` turns a path into a :class:`Source`.

Every command starts here. A *reader* recognises one kind of input (a :class:`SourceKind`, whose value is what
reports and bundles record) and reads it; readers are tried in order and the first that recognises the path wins:

* ``dsnn-bundle``: a safetensors file with ``format = dsnn-bundle`` metadata (weights, keep codes, levels);
* ``dsnn-checkpoint``: a safetensors file carrying a dsnn model description (written by ``finetune``/``export``);
* ``safetensors``: any other safetensors file (a plain state dict);
* ``torch``: ``.pt/.pth/.bin/.ckpt``, loaded with ``torch.load(weights_only=True)``, common nesting unwrapped;
* ``ct2-dir`` (plug-in :mod:`.ct2`): a faster-whisper / CTranslate2 Whisper directory (``model.bin``);
* ``hf-dir``: a Hugging Face ``save_pretrained`` directory (``config.json`` plus weights); the model families'
  directory describers (``models.registry.describe_directory``) say whether it is a model dsnn can run.

A new kind of input (another toolkit's model directory, say) is one more :class:`SourceKind` member and one more
reader registered with :func:`register_reader`, ahead of the generic ones; a new model family stored as a Hugging
Face directory only registers a describer in ``models.registry``. Callers never change: they get a
:class:`Source` with the tensors, the model description when the input has one (:meth:`Source.adapter` builds the
runnable model), the codes and levels of a bundle, and provenance.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from ..core.bundle import FORMAT_NAME as BUNDLE_FORMAT
from ..core.bundle import Bundle, bundle_from_file
from ..core.checksums import INTEGRITY_NONE
from ..core.compressed import decompress_state_dict
from ..core.levels import Levels
from ..core.safetensors_io import SafetensorsFile, open_safetensors, read_safetensors_metadata
from ..errors import DsnnError, UsageError
from ..models.base import ModelAdapter
from ..models.registry import adapter_from_metadata, describe_directory
from .checkpoint import CHECKPOINT_FORMAT, MODEL_METADATA_KEY, check_checkpoint_metadata
from .files import TORCH_SUFFIXES, read_hf_dir, read_torch_file, sha256_file


class SourceKind(str, Enum):
    """What an input is; each member's value is the name reports and bundles record (``"hf-dir"``), and a member
    compares equal to it."""

    BUNDLE = BUNDLE_FORMAT
    """``dsnn-bundle``: weights, keep codes and levels."""
    CHECKPOINT = CHECKPOINT_FORMAT
    """``dsnn-checkpoint``: a safetensors file carrying a dsnn model description."""
    SAFETENSORS = "safetensors"
    """Any other safetensors file (a plain state dict)."""
    TORCH = "torch"
    """A torch pickle (``.pt/.pth/.bin/.ckpt``)."""
    HF_DIR = "hf-dir"
    """A Hugging Face ``save_pretrained`` directory."""
    CT2_DIR = "ct2-dir"
    """A faster-whisper / CTranslate2 model directory (reader: :mod:`.ct2`)."""

    def __str__(self) -> str:
        return self.value


@dataclass
class Source:
    """An opened input: its tensors, what it describes, and where it came from."""

    path: Path
    kind: SourceKind
    tensors: dict[str, torch.Tensor]
    hashed_file: Path
    """The file whose sha256 identifies the source (the weights file of a directory)."""
    model_meta: dict[str, Any] | None = None
    """The model description (family, config, vocabulary...) when the input describes a model dsnn can run."""
    bundle: Bundle | None = None
    """For a bundle: the codes, levels and metadata."""
    file_metadata: dict[str, str] = field(default_factory=dict)
    hf_files: dict[str, str] = field(default_factory=dict)
    """Small text files of a model directory (config.json, vocab.json, ...), by name."""
    skipped_entries: list[str] = field(default_factory=list)
    """Non-tensor entries of a torch state dict that were ignored."""
    integrity: str = INTEGRITY_NONE
    """``verified``, ``not verified`` or ``no checksums``: what reading established about the file's checksums."""
    digest: Callable[[], str] | None = field(default=None, repr=False)
    """Computes :attr:`sha256` from the bytes that were read (the file as it was when opened), where the reader
    keeps them; otherwise :attr:`hashed_file` is read again."""

    @cached_property
    def sha256(self) -> str:
        """Hex sha256 of :attr:`hashed_file` (computed on first use)."""
        return self.digest() if self.digest is not None else sha256_file(self.hashed_file)

    @property
    def is_bundle(self) -> bool:
        """True for a DSNN bundle."""
        return self.bundle is not None

    @property
    def levels(self) -> Levels:
        """The bundle's sparse levels (empty for anything else)."""
        return Levels(self.bundle.levels) if self.bundle is not None else Levels()

    @property
    def codes(self) -> dict[str, torch.Tensor]:
        """The bundle's keep codes (empty for anything else)."""
        return dict(self.bundle.codes) if self.bundle is not None else {}

    @property
    def runnable(self) -> bool:
        """True when the input describes a model dsnn can rebuild and run."""
        return self.model_meta is not None

    @property
    def container(self) -> SourceKind:
        """The physical format: the kind, except that a bundle or checkpoint is ``safetensors``."""
        return SourceKind.SAFETENSORS if self.kind in (SourceKind.BUNDLE, SourceKind.CHECKPOINT) else self.kind

    def require_bundle(self) -> Bundle:
        """The bundle, or the error a command that needs one gives for anything else."""
        if self.bundle is None:
            raise DsnnError(f"{self.path} is not a DSNN bundle (no format={BUNDLE_FORMAT} metadata)",
                            "create a bundle with `dsnn prune CHECKPOINT --levels ... -o BUNDLE`")
        return self.bundle

    def provenance(self, physical: bool = False) -> dict[str, Any]:
        """``{"file", "sha256", "kind"}``: what bundles record as their source. ``kind`` is :attr:`kind`, or with
        ``physical`` the :attr:`container` (what ``dsnn prune`` records for the dense checkpoint)."""
        kind = self.container if physical else self.kind
        return {"file": self.path.name, "sha256": self.sha256, "kind": kind.value}

    def adapter(self, normalizer: str | None = None, purpose: str = "run", audio_ctx: int | None = None,
                tensors: Mapping[str, torch.Tensor] | None = None) -> ModelAdapter:
        """The runnable model with this source's weights loaded (eval mode); DsnnError when the input has no model
        description. ``normalizer`` replaces the description's text normaliser, ``audio_ctx`` a Whisper model's
        encoder context (UsageError for other families); ``purpose`` words the error. ``tensors`` are loaded instead
        of the source's own (one level of a bundle: ``bundle.state_dict_at(level)``)."""
        if self.model_meta is None:
            raise DsnnError(f"{self.path} carries no model description, so it cannot be {_PURPOSES[purpose]}",
                            _NO_MODEL_HINT.get(self.kind, _NO_MODEL_HINT_OTHER))
        meta = dict(self.model_meta)
        if normalizer is not None:
            meta["normalizer"] = normalizer
        if audio_ctx is not None:
            if "audio_ctx" not in meta:
                raise UsageError(f"audio_ctx applies to Whisper models, but {self.path} holds a "
                                 f"{meta.get('family')} model", "leave audio_ctx unset")
            meta["audio_ctx"] = audio_ctx
        adapter = adapter_from_metadata(meta, self.tensors if tensors is None else tensors)
        adapter.model.eval()
        return adapter


_MISSING_HINT = {
    "bundle": "check the path, or create one with `dsnn prune`",
    "model": "pass a DSNN bundle or a dsnn checkpoint (.safetensors)",
}
_PURPOSES = {"run": "run", "finetune": "fine-tuned", "export": "exported as a model"}
_NO_MODEL_HINT = {
    SourceKind.BUNDLE: "prune a checkpoint that describes its model (a dsnn checkpoint or a supported Hugging Face "
                   "model directory) to get a runnable bundle",
    SourceKind.HF_DIR: "supported Hugging Face architectures are listed in docs/huggingface.md",
}
_NO_MODEL_HINT_OTHER = "pass a DSNN bundle, a dsnn checkpoint or a supported Hugging Face model directory"


@dataclass(frozen=True)
class SourceReader:
    """A kind of input: ``recognises(path)`` is cheap (names, headers); ``read(path, verify)`` loads it (checking
    the checksums it carries when ``verify``)."""

    kind: SourceKind
    recognises: Callable[[Path], bool]
    read: Callable[[Path, bool], Source]


_READERS: list[SourceReader] = []
READER_PLUGINS: tuple[str, ...] = ("dsnn_compress.sources.ct2",)
"""Modules that register more readers when imported (on the first :func:`open_source` call, so they may import
this module)."""
_plugins_loaded: list[bool] = []


def register_reader(reader: SourceReader, first: bool = True) -> None:
    """Add a reader; ``first`` puts it ahead of the built-in ones (specific kinds before generic ones)."""
    _READERS.insert(0 if first else len(_READERS), reader)


def open_source(path: str | Path, allow_bundle: bool = True, role: str = "input", verify: bool = True) -> Source:
    """Open ``path`` with the first reader that recognises it; DsnnError naming what is accepted otherwise.

    ``role`` names the input in messages (``checkpoint``, ``bundle``, ``model``). With ``allow_bundle=False``
    (inputs that must be dense, as for ``dsnn prune``) a DSNN bundle is refused before it is read. ``verify``
    checks the checksums a file carries (bundles and files written by dsnn); a file without them opens unverified.
    Each file is read once: a concurrent ``os.replace`` of ``path`` gives the old or the new file, never a mixture.
    """
    if not _plugins_loaded:
        _plugins_loaded.append(True)
        for module in READER_PLUGINS:
            importlib.import_module(module)
    src = Path(path)
    if not src.exists():
        raise DsnnError(f"{role} {src} does not exist", _MISSING_HINT.get(role, "check the path"))
    if (not allow_bundle and _looks_like_safetensors(src)
            and read_safetensors_metadata(src).get("format") == BUNDLE_FORMAT):
        raise DsnnError(f"{src} is already a DSNN bundle",
                        "prune the dense checkpoint instead, or `dsnn export --level 0` it first")
    for reader in _READERS:
        if reader.recognises(src):
            source = reader.read(src, verify)
            if not allow_bundle and source.is_bundle:  # replaced by a bundle since the check above
                raise DsnnError(f"{src} is already a DSNN bundle",
                                "prune the dense checkpoint instead, or `dsnn export --level 0` it first")
            if not source.tensors:
                raise DsnnError(f"checkpoint {src} contains no tensors", "check that it is the right file")
            return source
    if src.is_dir():
        raise DsnnError(f"{src} is a directory without config.json",
                        "pass a checkpoint file or a Hugging Face save_pretrained directory")
    raise DsnnError(f"{src} has an unsupported extension {src.suffix!r}",
                    "use .safetensors, .pt, .pth, .bin, .ckpt or a Hugging Face model directory")


def load_checkpoint_adapter(path: str | Path) -> ModelAdapter:
    """The adapter of a self-describing dsnn checkpoint, weights loaded (DsnnError for anything else)."""
    return open_source(path, role="checkpoint").adapter()


def bundle_source(bundle: Bundle) -> Source:
    """The :class:`Source` of a bundle (what :func:`open_source` returns for its file; also for a bundle in memory,
    whose path is then a placeholder)."""
    path = bundle.path if bundle.path is not None else Path("(bundle in memory)")
    meta = bundle.metadata.get("model")
    return Source(path, SourceKind.BUNDLE, bundle.tensors, path, meta if isinstance(meta, dict) else None, bundle,
                  hf_files=dict(bundle.metadata.get("hf_files") or {}), integrity=bundle.integrity)


# ----------------------------------------------------------------------------------------------- built-in readers


def _read_safetensors_file(path: Path, verify: bool = True) -> Source:
    """A bundle, a dsnn checkpoint or a plain state dict, told apart by the file's metadata; the file is mapped once
    and stays mapped while the source lives (for :attr:`Source.sha256`)."""
    file = open_safetensors(path)
    try:
        source = _source_of_file(file, verify)
    except BaseException:
        file.close()
        raise
    source.digest = file.sha256
    return source


def _source_of_file(file: SafetensorsFile, verify: bool) -> Source:
    path, metadata = file.path, file.metadata
    if metadata.get("format") == BUNDLE_FORMAT:
        return bundle_source(bundle_from_file(file, verify))
    if verify:
        file.verify_metadata()
    if metadata.get("format") == CHECKPOINT_FORMAT or MODEL_METADATA_KEY in metadata:
        check_checkpoint_metadata(path, metadata)
        if MODEL_METADATA_KEY not in metadata:
            raise DsnnError(f"{path}: the {CHECKPOINT_FORMAT} has no 'model' metadata", "re-save the checkpoint")
        try:
            meta = json.loads(metadata[MODEL_METADATA_KEY])
        except json.JSONDecodeError as exc:
            raise DsnnError(f"{path} has malformed model metadata: {exc}", "re-save the checkpoint") from exc
        if not isinstance(meta, dict):
            raise DsnnError(f"{path}: the 'model' metadata is not a JSON object", "re-save the checkpoint")
        tensors = decompress_state_dict(file.load(verify), metadata)
        return Source(path, SourceKind.CHECKPOINT, tensors, path, meta, file_metadata=dict(metadata),
                      integrity=file.integrity)
    tensors = decompress_state_dict(file.load(verify), metadata)
    return Source(path, SourceKind.SAFETENSORS, tensors, path, file_metadata=dict(metadata), integrity=file.integrity)


def _read_torch(path: Path, verify: bool = True) -> Source:
    tensors, skipped, digest = read_torch_file(path)
    return Source(path, SourceKind.TORCH, tensors, path, skipped_entries=skipped, digest=digest)


def _read_hf(path: Path, verify: bool = True) -> Source:
    tensors, hashed, hf_files, digest = read_hf_dir(path, verify)
    meta = describe_directory(hf_files, list(tensors))
    return Source(path, SourceKind.HF_DIR, tensors, hashed, meta, hf_files=hf_files, digest=digest)


def _looks_like_safetensors(path: Path) -> bool:
    """A ``.safetensors`` name, or (any other name that no reader claims) a safetensors header: a little-endian
    u64 header length that fits the file, followed by a JSON object."""
    if not path.is_file():
        return False
    if path.suffix == ".safetensors":
        return True
    if path.suffix in TORCH_SUFFIXES:
        return False
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError:
        return False
    return len(head) == 9 and 0 < int.from_bytes(head[:8], "little") < path.stat().st_size and head[8:] == b"{"


register_reader(SourceReader(SourceKind.SAFETENSORS, _looks_like_safetensors, _read_safetensors_file), first=False)
register_reader(SourceReader(SourceKind.TORCH, lambda p: p.is_file() and p.suffix in TORCH_SUFFIXES, _read_torch),
                first=False)
register_reader(SourceReader(SourceKind.HF_DIR, lambda p: p.is_dir() and (p / "config.json").is_file(), _read_hf),
                first=False)
