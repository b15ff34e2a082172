"""The ``whisper`` family: OpenAI Whisper through ``transformers.WhisperForConditionalGeneration``.

Any size, English-only and multilingual, distil-whisper shapes included. Sources: a Hugging Face ``save_pretrained``
directory (recognised by :func:`~.metadata.whisper_metadata_from_files`, registered as a directory describer) or a
faster-whisper / CTranslate2 model directory (read by :mod:`.ct2` and mapped to the Hugging Face layout in memory;
the reader is registered with the opener by ``sources.ct2``). ``transformers`` is optional and imported only when a
model is built; importing this package does not import it.

Modules: :mod:`.metadata` (what a directory holds), :mod:`.adapter` (features, loss, bounded greedy decoding),
:mod:`.family` (building adapters, the family factory), :mod:`.export` (Hugging Face and faster-whisper
directories), :mod:`.ct2` (faster-whisper directories: the ``model.bin`` format, the name map, the reader and the
writer). See ``docs/whisper.md``.
"""

from __future__ import annotations

from ..registry import register_family
from .family import WHISPER, WhisperFamily, build_adapter
from .metadata import FAMILY, whisper_metadata_from_files

register_family(FAMILY, WHISPER)

__all__ = ["FAMILY", "WHISPER", "WhisperFamily", "build_adapter", "whisper_metadata_from_files"]
