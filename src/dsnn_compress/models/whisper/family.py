"""The ``whisper`` family: adapters rebuilt from a Whisper directory's text files (``transformers`` imported here)."""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ...core.groups import GroupSpec
from ...data.text import get_normalizer
from ...errors import DsnnError, UsageError
from ..hf_files import cannot_create, described_files
from .adapter import WhisperAdapter, install_state_hooks
from .depth import STACKS, DepthViews, depth_metadata, stack_sizes
from .metadata import BAD_META_HINT, FAMILY, INSTALL_HINT, TOKENIZER_FILES, parse_json, renumber_alignment_heads
from .structure import (
    apply_ffn_dims,
    check_dims,
    compact_metadata,
    ffn_groups,
    refusal,
    refuse_directory_export,
    set_widths,
    side_widths,
)

MAX_AUDIO_CTX = 1500
"""Encoder positions of every Whisper model (30 s of audio)."""


def import_transformers() -> Any:
    """The ``transformers`` module, or a DsnnError telling how to install it."""
    try:
        import transformers
    except ImportError as exc:
        raise DsnnError("the whisper model family needs the transformers package, which is not installed",
                        INSTALL_HINT) from exc
    return transformers


def check_audio_ctx(audio_ctx: Any, positions: int = MAX_AUDIO_CTX) -> int | None:
    """``audio_ctx`` validated: None (the full context) or an integer in [1, positions]."""
    if audio_ctx is None:
        return None
    if isinstance(audio_ctx, bool) or not isinstance(audio_ctx, int) or not 1 <= audio_ctx <= positions:
        raise UsageError(f"audio_ctx must be an integer in [1, {positions}] (encoder positions, 20 ms each), "
                         f"got {audio_ctx!r}", "e.g. 500 for 10 s, or leave it unset for the full 30 s")
    return audio_ctx


def _tokenizer(transformers: Any, files: Mapping[str, str]) -> Any:
    with tempfile.TemporaryDirectory(prefix="dsnn-whisper-tokenizer-") as tmp:
        for name in TOKENIZER_FILES:
            if name in files:
                (Path(tmp) / name).write_text(files[name], encoding="utf-8")
        try:
            return transformers.WhisperTokenizerFast.from_pretrained(tmp, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - transformers raises many kinds of errors for bad files
            raise DsnnError(f"cannot rebuild the Whisper tokenizer ({' '.join(str(exc).split())[:300]})",
                            BAD_META_HINT) from exc


def _generation_config(transformers: Any, files: Mapping[str, str], config: Any) -> Any:
    if "generation_config.json" in files:
        data = parse_json(files, "generation_config.json")
        return transformers.GenerationConfig.from_dict(data)
    generation = transformers.GenerationConfig.from_model_config(config)
    if config.vocab_size >= 51865:  # multilingual vocabularies: language/task tokens need the generation config
        raise DsnnError("the multilingual Whisper directory has no generation_config.json, which holds the "
                        "language and task tokens", "save the model with save_pretrained (it writes the file)")
    return generation


def prompt_tokens(generation: Any, tokenizer: Any) -> tuple[list[int], bool]:
    """The decoder prompt for English transcription without timestamps, and whether the model is multilingual."""
    start = generation.decoder_start_token_id
    no_timestamps = getattr(generation, "no_timestamps_token_id", None)
    if no_timestamps is None:
        no_timestamps = tokenizer.convert_tokens_to_ids("<|notimestamps|>")
    if start is None or no_timestamps is None:
        raise DsnnError("the Whisper generation config lacks decoder_start_token_id or no_timestamps_token_id",
                        BAD_META_HINT)
    if getattr(generation, "is_multilingual", False):
        lang = (generation.lang_to_id or {}).get("<|en|>")
        task = (generation.task_to_id or {}).get("transcribe")
        if lang is None or task is None:
            raise DsnnError("the multilingual Whisper generation config has no <|en|> or transcribe token",
                            BAD_META_HINT)
        return [int(start), int(lang), int(task), int(no_timestamps)], True
    return [int(start), int(no_timestamps)], False


def build_adapter(files: Mapping[str, str], normalizer: str = "default", audio_ctx: int | None = None
                  ) -> WhisperAdapter:
    """An adapter with a freshly built (randomly initialised) model from the directory's text files."""
    for name in ("config.json", "preprocessor_config.json"):
        if name not in files:
            raise DsnnError(f"the Whisper model description lacks {name}", BAD_META_HINT)
    get_normalizer(normalizer)
    transformers = import_transformers()
    data = parse_json(files, "config.json")
    if not isinstance(data, dict):
        raise DsnnError("config.json of the Whisper model is not a JSON object", BAD_META_HINT)
    try:
        config = transformers.WhisperConfig.from_dict(dict(data))
        with contextlib.redirect_stderr(io.StringIO()):
            model = transformers.WhisperForConditionalGeneration(config)
        features = transformers.WhisperFeatureExtractor.from_dict(dict(parse_json(files, "preprocessor_config.json")))
    except DsnnError:
        raise
    except Exception as exc:  # noqa: BLE001 - a config transformers cannot build
        raise DsnnError(f"cannot build the Whisper model from its config ({' '.join(str(exc).split())[:300]})",
                        BAD_META_HINT) from exc
    audio_ctx = check_audio_ctx(audio_ctx, int(config.max_source_positions))
    tokenizer = _tokenizer(transformers, files)
    generation = _generation_config(transformers, files, config)
    prompt, multilingual = prompt_tokens(generation, tokenizer)
    eot = generation.eos_token_id if isinstance(generation.eos_token_id, int) else tokenizer.eos_token_id
    model.generation_config = generation
    install_state_hooks(model, audio_ctx)
    model.eval()
    return WhisperAdapter(model=model, hf_files=dict(files), feature_extractor=features, tokenizer=tokenizer,
                          generation_config=generation, prompt=prompt, eot=int(eot), normalizer=normalizer,
                          audio_ctx=audio_ctx, multilingual=multilingual)


class WhisperFamily:
    """Family factory of ``whisper``: adapters are rebuilt from metadata (a model starts from a directory)."""

    name = FAMILY
    sizes: Mapping[str, Any] = {}
    export_formats = ("checkpoint", "hf", "ct2")

    def new(self, vocabulary: list[str], size: str | None = None, overrides: Mapping[str, Any] | None = None,
            features: Mapping[str, Any] | None = None, normalizer: str = "default") -> WhisperAdapter:
        """Not supported: a Whisper model starts from a Hugging Face or faster-whisper directory."""
        raise cannot_create(FAMILY, "a Whisper model directory (Hugging Face or faster-whisper) or a bundle")

    def from_metadata(self, meta: Mapping[str, Any]) -> WhisperAdapter:
        """Rebuild an adapter (random weights) from :meth:`WhisperAdapter.metadata` output."""
        files, normalizer = described_files(meta, FAMILY)
        adapter = build_adapter(files, normalizer, meta.get("audio_ctx"))
        if meta.get("ffn_dims") is not None:
            adapter.ffn_dims = check_dims(meta["ffn_dims"], adapter.model, BAD_META_HINT)
            apply_ffn_dims(adapter.model, adapter.ffn_dims)
        return adapter

    # structured levels (docs/structured.md): FFN neurons of every encoder and decoder layer

    def structured_groups(self, adapter: WhisperAdapter) -> list[GroupSpec]:
        """One ``ffn-neuron`` group set per encoder layer, then per decoder layer (no heads: see ``.structure``)."""
        return ffn_groups(adapter.model)

    def compact(self, adapter: WhisperAdapter, kept: Mapping[str, int],
                dropped: Mapping[str, Sequence[int]] | None = None) -> WhisperAdapter:
        """A fresh adapter whose layers have ``kept[name]`` FFN neurons and whose stacks lack the ``dropped`` layers
        (weights to be loaded, kept layers renumbered, and so are the decoder's alignment heads)."""
        widths = side_widths(adapter.model, kept)
        dropped = dropped or {}
        for side in widths:
            gone = set(dropped.get(STACKS[side], ()))
            widths[side] = [w for i, w in enumerate(widths[side]) if i not in gone]
        meta = compact_metadata(adapter.metadata(), widths)
        if dropped:
            sizes = stack_sizes(adapter.model)
            meta = depth_metadata(meta, {stack: size - len(dropped.get(stack, ())) for stack, size in sizes.items()})
            meta = renumber_alignment_heads(meta, dropped.get(STACKS["decoder"]), sizes[STACKS["decoder"]])
        return self.from_metadata(meta)

    # depth levels (docs/depth.md): encoder and decoder layers dropped at sparse levels

    @staticmethod
    def depth_stacks(adapter: WhisperAdapter) -> dict[str, int]:
        """Layers per droppable stack: ``model.encoder.layers`` and ``model.decoder.layers``."""
        return stack_sizes(adapter.model)

    @staticmethod
    def set_depth(adapter: WhisperAdapter, dropped: Mapping[str, Sequence[int]] | None) -> bool:
        """Leave the ``dropped`` layers out of each stack, on the same modules (None: every layer runs)."""
        if adapter.depth_views is None:
            adapter.depth_views = DepthViews(adapter.model)
        adapter.depth_views.apply(dropped)
        return True

    def set_widths(self, adapter: WhisperAdapter, kept: Mapping[str, int] | None) -> bool:
        """Run each FFN's first ``kept[name]`` neurons on views of its weights (None: full width)."""
        set_widths(adapter.model, kept)
        return True

    @staticmethod
    def compact_refusal(kept: Mapping[str, int], fmt: str) -> str | None:
        """Why ``fmt`` cannot hold these FFN sizes (``hf``: one size per side), or None (``ct2`` holds a size per
        layer)."""
        return refusal(kept, fmt)

    @staticmethod
    def save_hf(adapter: WhisperAdapter, output: Any, level: float | None = None, dtype: Any = None) -> Path:
        """``dsnn export --format hf``: a complete ``save_pretrained`` directory (not for per-layer FFN sizes)."""
        from .export import save_hf_directory

        refuse_directory_export(adapter.ffn_dims, "hf")
        return save_hf_directory(adapter, output, level, dtype)

    @staticmethod
    def save_ct2(adapter: WhisperAdapter, output: Any, level: float | None = None, dtype: Any = None) -> Path:
        """``dsnn export --format ct2``: a faster-whisper (CTranslate2) model directory (FFN sizes may differ per
        layer)."""
        from .export import save_ct2_directory

        return save_ct2_directory(adapter, output, level, dtype)


WHISPER = WhisperFamily()
