"""faster-whisper / CTranslate2 Whisper directories <-> the Hugging Face layout (``docs/whisper.md``).

A CTranslate2 Whisper directory holds ``model.bin`` (binary version 6, spec ``WhisperSpec`` revision 3), ``config.json``
(alignment heads, language ids, suppress lists), ``vocabulary.txt`` or ``vocabulary.json`` and ``tokenizer.json``.
:func:`read_ct2_directory` maps it to a ``WhisperForConditionalGeneration`` state dict (tensors keep the file's
dtype; fused q/k/v are split; the all-zero key biases CTranslate2 stores are dropped, which is exact: a key bias adds
a per-query constant to the scores that softmax cancels) plus the Hugging Face text files the ``whisper`` describer
needs; :func:`ffn_dims_of` gives the per-layer FFN sizes of a side whose layers differ (which CTranslate2 holds and
a Hugging Face config cannot). :func:`write_ct2_directory` is the reverse and reproduces the converter's files
byte for byte.

Modules: :mod:`.model_bin` (the ``model.bin`` file format), :mod:`.names` (the CTranslate2 <-> Hugging Face name map
and what both directions share), :mod:`.read` (directory -> Hugging Face), :mod:`.write` (Hugging Face -> directory).
"""

from __future__ import annotations

from .model_bin import peek_ct2_header, read_model_bin, write_model_bin
from .read import ffn_dims_of, read_ct2_directory
from .write import write_ct2_directory

__all__ = ["ffn_dims_of", "peek_ct2_header", "read_ct2_directory", "read_model_bin", "write_ct2_directory",
           "write_model_bin"]
