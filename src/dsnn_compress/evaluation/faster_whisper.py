"""`dsnn evaluate --runtime faster-whisper`: a Whisper model's levels measured where Whisper users run them.

Every requested level is exported once, before anything is timed, to a temporary faster-whisper (CTranslate2)
directory, as ``dsnn export --format ct2`` writes it: a structured level (narrower FFNs, dropped layers) as its
physically smaller model (:func:`~dsnn_compress.runtime.structured.compact_adapter`), a weight-level one as its
full-size masked weights (what a user would ship), in the source's floating-point dtype. Each directory is loaded
with ``faster_whisper.WhisperModel(dir, device="cpu", compute_type=..., cpu_threads=torch.get_num_threads())``, and
every utterance is transcribed on its own the way dsnn decodes: greedy (``beam_size=1``), temperature 0 only (no
fallback, no no-speech skipping), no timestamps, no conditioning on earlier text, no VAD, English, new tokens
bounded by the audio length as dsnn bounds them (:func:`~dsnn_compress.models.whisper.adapter.token_bound`, through
:func:`max_new_tokens`; a decode cut there counts in ``decodes_capped``), and a
``chunk_length`` of the model's encoder context when it records a shorter one than 30 s (``audio_ctx``; faster-whisper
1.2 still pads every window's log-mel to 30 s before the encoder, so this sets the window, not the encoder's work).

Scoring and timing are `dsnn evaluate`'s: the same normaliser and references, WER/CER from the first pass, RTFx the
median of interleaved passes (:mod:`~dsnn_compress.evaluation.timing`; utterances in order of length, the passes
after the first time the same subset). Timed: ``WhisperModel.transcribe`` on the loaded waveform until its last
segment (faster-whisper's feature extraction, encoder and decoding), after one untimed warm-up per level.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .. import tool_metadata
from ..core.levels import level_label, level_tag
from ..data.prepare import PreparedData
from ..errors import UsageError
from ..models.base import ModelAdapter
from ..models.registry import get_family
from ..runtime.runnable import LoadedModel, runnable_model
from ..runtime.structured import compact_adapter
from ..sources.opener import open_source
from . import timing
from .results import DataInfo, EvaluationReport, LevelResult, LongForm, ModelInfo, RuntimeInfo, SkippedUtterance, Timing
from .timing import LevelTiming, pass_order, timed_batches

if TYPE_CHECKING:
    from .evaluate import EvaluateOptions

NAME = "faster-whisper"
DEFAULT_COMPUTE_TYPE = "int8"
"""What faster-whisper users on CPU usually run."""
INSTALL_HINT = 'install it: pip install "dsnn-compress[whisper]" (or pip install faster-whisper)'
FIXED_OPTIONS: dict[str, Any] = {
    "language": "en", "task": "transcribe", "beam_size": 1, "best_of": 1, "temperature": 0.0,
    "without_timestamps": True, "condition_on_previous_text": False, "vad_filter": False,
    "compression_ratio_threshold": None, "log_prob_threshold": None, "no_speech_threshold": None,
}
"""``WhisperModel.transcribe`` options for dsnn's decoding (``language`` is ignored by English-only models)."""
FASTER_WHISPER_MAX_LENGTH = 448
"""faster-whisper's bound on its ``max_length`` (prompt + ``max_new_tokens``)."""


def import_runtime() -> tuple[Any, Any]:
    """The ``faster_whisper`` and ``ctranslate2`` modules, or a UsageError telling how to install them."""
    try:
        import ctranslate2
        import faster_whisper
    except ImportError:
        raise UsageError("--runtime faster-whisper needs the faster-whisper package, which is not installed",
                         INSTALL_HINT) from None
    return faster_whisper, ctranslate2


def check_compute_type(ctranslate2: Any, compute_type: str) -> str:
    """``compute_type`` when CTranslate2 supports it on this CPU, else a UsageError listing the ones it does."""
    supported = sorted(ctranslate2.get_supported_compute_types("cpu"))
    if compute_type not in supported:
        raise UsageError(f"--compute-type {compute_type!r} is not one CTranslate2 {ctranslate2.__version__} runs on "
                         "this CPU", f"choose one of {', '.join(supported)}")
    return compute_type


def chunk_length(adapter: Any) -> int | None:
    """faster-whisper's window in whole seconds for a model whose encoder context (``audio_ctx``, 20 ms positions)
    is set; None for the full 30 s. UsageError when the context is not a whole number of seconds."""
    audio_ctx = getattr(adapter, "audio_ctx", None)
    if audio_ctx is None:
        return None
    if audio_ctx % 50:
        raise UsageError(f"faster-whisper windows are whole seconds, but the encoder context is {audio_ctx} "
                         f"positions ({audio_ctx * 0.02:g} s)", "pass --audio-ctx with a multiple of 50 (500 = 10 s)")
    return audio_ctx // 50


def _check_whisper(path: Path, meta: Mapping[str, Any] | None) -> Any:
    """The model's family when it can be written as a faster-whisper directory, else a UsageError."""
    name = (meta or {}).get("family")
    family = get_family(str(name), UsageError) if name else None
    if family is None or "ct2" not in tuple(getattr(family, "export_formats", ())):
        what = f"a {name} model" if name else "not a model dsnn can run"
        raise UsageError(f"--runtime faster-whisper runs Whisper models; {path} is {what}",
                         "use --runtime dsnn (the default)")
    return family


def stored_dtype(tensors: Mapping[str, torch.Tensor]) -> torch.dtype | None:
    """The most common floating-point dtype of ``tensors`` (what ``dsnn export`` keeps in a directory)."""
    counts: dict[torch.dtype, int] = {}
    for tensor in tensors.values():
        if tensor.is_floating_point():
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel()
    return max(counts, key=lambda d: counts[d]) if counts else None


def level_model(loaded: LoadedModel, level: float) -> tuple[ModelAdapter, int]:
    """The model of ``level`` as it is exported, and its nonzero parameters: a structured bundle's sparse level is its
    physically smaller model, any other level the full-size model with the level's masked weights."""
    bundle = loaded.bundle
    if bundle is not None and bundle.structured is not None:
        index = bundle.level_index(level)
        adapter = loaded.adapter if index == 0 else compact_adapter(bundle, loaded.adapter, index, "ct2")
        return adapter, sum(p.numel() for p in adapter.model.parameters())
    loaded.set_level(level)
    return loaded.adapter, loaded.nonzero_params()


def max_new_tokens(bound: int, prompt: int) -> int:
    """The ``max_new_tokens`` that makes faster-whisper stop a decode after ``bound`` new tokens (``prompt``: its
    prompt's length, 2 or 4 tokens).

    faster-whisper passes ``max_length = prompt + max_new_tokens`` to CTranslate2, whose Whisper ``generate`` (4.x,
    without a previous-text prompt) makes at most ``max_length // 2`` new tokens, OpenAI's ``sample_len =
    n_text_ctx // 2`` convention; so ``max_new_tokens=N`` alone gives about ``N / 2`` tokens
    (``tests/test_whisper_fw.py`` checks this against the installed versions).
    """
    return 2 * bound - prompt


@dataclass(frozen=True)
class _Decoding:
    """How every utterance is transcribed: the fixed options, the window, each utterance's token bound."""

    chunk_length: int | None
    bounds: list[int]
    prompt: int

    def transcribe(self, model: Any, wave: Any, bound: int) -> tuple[str, bool]:
        """The transcript of one waveform and whether a window's decode was cut at its token bound."""
        segments, _ = model.transcribe(wave, chunk_length=self.chunk_length,
                                       max_new_tokens=max_new_tokens(bound, self.prompt), **FIXED_OPTIONS)
        pieces = list(segments)  # transcribe is lazy: the segments are decoded here
        return "".join(s.text for s in pieces).strip(), any(len(s.tokens) >= bound for s in pieces)


def token_bounds(adapter: Any, data: PreparedData) -> list[int]:
    """dsnn's bound on new tokens for each utterance (of one window at most), within the decoder's positions and
    faster-whisper's own limit (224 new tokens: :func:`max_new_tokens`)."""
    from ..models.whisper.adapter import token_bound

    prompt = len(adapter.prompt)
    room = min(int(adapter.model.config.max_target_positions) - prompt, FASTER_WHISPER_MAX_LENGTH // 2)
    window = adapter.context_seconds
    return [max(1, min(room, token_bound(min(seconds, window)))) for seconds in data.seconds]


class _Runs:
    """The interleaved passes over the levels' faster-whisper models, and what they measured."""

    def __init__(self, models: Mapping[float, Any], data: PreparedData, normalize: Callable[[str], str],
                 decoding: _Decoding, on_progress: Callable[[str, int, int], None] | None) -> None:
        self.models, self.data, self.normalize, self.decoding = models, data, normalize, decoding
        self.on_progress = on_progress
        order = sorted(range(len(data.ids)), key=lambda i: data.seconds[i])
        self.batches = [[i] for i in order]  # one utterance at a time, shortest first
        self.timed = timed_batches(self.batches, data.seconds, timing.TIMED_AUDIO_SECONDS)
        self.timed_set = set(self.timed)
        self.step = self.total = 0
        self.hypotheses: dict[float, list[str]] = {}
        self.passes: dict[float, list[float]] = {}
        self.capped: dict[float, int] = {}

    def warm_up(self) -> None:
        """One untimed transcription per level model (its first call allocates)."""
        first = self.batches[0][0]
        for model in self.models.values():
            self.decoding.transcribe(model, self.data.waveforms[first], self.decoding.bounds[first])

    def run(self, levels: Sequence[float], repeats: int) -> None:
        """Pass 1 transcribes every utterance at every level (transcripts and timing), passes 2.. the timed ones."""
        self.total = len(levels) * (len(self.batches) + (repeats - 1) * len(self.timed))
        for index in range(repeats):
            for level in pass_order(levels, index):
                if index == 0:
                    hyps = self.hypotheses.setdefault(level, [""] * len(self.data.ids))
                    seconds = self._pass(level, range(len(self.batches)), f"level {level_label(level)}", hyps)
                else:
                    seconds = self._pass(level, self.timed, f"timing {index + 1}/{repeats}: level {level_label(level)}")
                self.passes.setdefault(level, []).append(seconds)

    def _pass(self, level: float, numbers: Sequence[int], stage: str, hyps: list[str] | None = None) -> float:
        """Transcribe the utterances of ``numbers`` with ``level``'s model; the seconds the timed ones took."""
        seconds, capped = 0.0, 0
        for number in numbers:
            (i,) = self.batches[number]
            start = timing.clock()
            text, cut = self.decoding.transcribe(self.models[level], self.data.waveforms[i], self.decoding.bounds[i])
            if number in self.timed_set:
                seconds += timing.clock() - start
            capped += cut
            if hyps is not None:
                hyps[i] = self.normalize(text)
            self.step += 1
            if self.on_progress:
                self.on_progress(stage, self.step, self.total)
        if hyps is not None:
            self.capped[level] = capped
        return seconds

    def measured(self, level: float) -> LevelTiming:
        """The timing passes of ``level``."""
        audio = sum(self.data.seconds[i] for b in self.timed for i in self.batches[b])
        return LevelTiming(audio, tuple(self.passes[level]))


def long_form(adapter: Any, data: PreparedData, window: int | None) -> LongForm | None:
    """The utterances longer than faster-whisper's window, and the windows they took (None when all fitted)."""
    seconds = float(window or adapter.context_seconds)
    long = [(uid, s) for uid, s in zip(data.ids, data.seconds, strict=True) if s > seconds]
    if not long:
        return None
    return LongForm(round(seconds, 3), tuple(uid for uid, _ in long), sum(math.ceil(s / seconds) for _, s in long))


def evaluate_faster_whisper(model_path: str | Path, data_path: str | Path, opts: EvaluateOptions, *,
                            on_progress: Callable[[str, int, int], None] | None = None) -> EvaluationReport:
    """:func:`~dsnn_compress.evaluation.evaluate.evaluate` with every level run in faster-whisper (module doc)."""
    from .evaluate import complete_report, level_result, read_scoring_data, select_levels

    faster_whisper, ctranslate2 = import_runtime()
    compute_type = check_compute_type(ctranslate2, opts.compute_type or DEFAULT_COMPUTE_TYPE)
    source = open_source(model_path, role="model", verify=opts.verify)
    family = _check_whisper(source.path, source.model_meta)
    loaded = runnable_model(source, opts.audio_ctx)
    chosen = select_levels(loaded, opts.levels)
    window = chunk_length(loaded.adapter)
    data, norm, normalize, count = read_scoring_data(loaded, data_path, opts, on_progress)
    threads = torch.get_num_threads()
    dtype = stored_dtype(source.bundle.tensors if source.bundle is not None else source.tensors)
    decoding = _Decoding(window, token_bounds(loaded.adapter, data), len(loaded.adapter.prompt))
    nonzero: dict[float, int] = {}
    with tempfile.TemporaryDirectory(prefix="dsnn-faster-whisper-") as tmp:
        models = {}
        for number, level in enumerate(chosen):
            if on_progress:
                on_progress(f"exporting level {level_label(level)}", number + 1, len(chosen))
            adapter, nonzero[level] = level_model(loaded, level)
            directory = family.save_ct2(adapter, Path(tmp) / f"level-{level_tag(level)}", level, dtype)
            models[level] = faster_whisper.WhisperModel(str(directory), device="cpu", compute_type=compute_type,
                                                        cpu_threads=threads)
        runs = _Runs(models, data, normalize, decoding, on_progress)
        runs.warm_up()
        runs.run(chosen, opts.repeats)
    results: list[LevelResult] = [
        level_result(level, data, runs.hypotheses[level], runs.measured(level), nonzero[level],
                     loaded.is_trained(level), runs.capped[level]) for level in chosen]
    versions = {"faster_whisper": str(faster_whisper.__version__), "ctranslate2": str(ctranslate2.__version__)}
    report = EvaluationReport(
        model=ModelInfo(str(model_path), loaded.kind, loaded.adapter.family), data=DataInfo(str(data_path), count),
        normalizer=norm, decoding=loaded.adapter.decoding, threads=threads, levels=results,
        skipped=[SkippedUtterance(s["id"], s["reason"]) for s in data.skipped],
        timing=Timing(opts.repeats, len(runs.timed)), tool=tool_metadata(),
        runtime=RuntimeInfo(NAME, compute_type, window, versions),
    )
    report.long_form = long_form(loaded.adapter, data, window)
    return complete_report(report, loaded, data, runs.hypotheses, opts)
