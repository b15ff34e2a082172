"""`dsnn evaluate`: WER / CER / RTFx per sparsity level on a manifest, with CI gates; returns a typed report."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import tool_metadata
from ..core.continuous import SCORE
from ..core.levels import level_label, parse_level, same_level
from ..data.batch import pad_batch
from ..data.dataset import bucket_batches
from ..data.manifest import read_manifest
from ..data.prepare import PreparedData, prepare_data
from ..data.text import get_normalizer
from ..errors import DsnnError, GateError, UsageError
from ..runtime.runnable import LoadedModel, load_model
from . import timing
from .results import (
    ContinuousLevels,
    DataInfo,
    EvaluationReport,
    GateCheck,
    KernelsSummary,
    KernelUse,
    LevelResult,
    LongForm,
    ModelInfo,
    SkippedUtterance,
    Timing,
    UtteranceResult,
)
from .scoring import char_errors, word_errors
from .timing import LevelTiming, pass_order, timed_batches

RUNTIMES = ("dsnn", "faster-whisper")
"""Where :func:`evaluate` runs the levels: dsnn's own PyTorch model and level switch, or faster-whisper
(:mod:`~dsnn_compress.evaluation.faster_whisper`: each level exported to a faster-whisper directory)."""
DEFAULT_BATCH_FRAMES = 30_000
DEFAULT_REPEATS = 5
"""Timing passes by default: with 5 samples a level, two levels of equal speed show disjoint ranges by chance with
probability 2/252 (under 1 %) where 3 samples give 2/20; the passes after the first cost at most
:data:`~.timing.TIMED_AUDIO_SECONDS` of audio each."""


def select_levels(loaded: LoadedModel, spec: str | Sequence[float] = "all") -> list[float]:
    """Levels to evaluate: ``all`` (the trained ones) or a comma list of levels in [0, largest]; a level between
    two trained levels is served by continuous levels (``core.continuous``)."""
    if loaded.sparsity is None:
        return loaded.level_set().select(spec, loaded.path.name)
    return loaded.level_set().select_range(spec, loaded.path.name)


def transcribe_waveforms(loaded: LoadedModel, waves: Sequence[np.ndarray], ids: Sequence[str]) -> list[str]:
    """Greedy transcripts of already loaded waveforms at the model's active level (one padded batch)."""
    adapter = loaded.adapter
    inputs = [adapter.prepare(w) for w in waves]
    batch = pad_batch(inputs, [[] for _ in waves], ["" for _ in waves], list(ids))
    with torch.inference_mode():
        return adapter.decode(batch)


@dataclass(frozen=True)
class EvaluateOptions:
    """What :func:`evaluate` runs and how (the options of ``dsnn evaluate``).

    ``levels``: ``all`` (the trained levels) or levels in [0, largest] (:func:`select_levels`). ``batch_frames``:
    padded feature frames per batch. ``skip_bad``: leave out and list unusable utterances instead of failing.
    ``normalizer``: text normaliser (default: the model's). ``details``: keep every transcript in the report.
    ``max_wer`` / ``max_wer_increase``: CI gates ``LEVEL:PCT`` (:func:`check_gates`), checked for syntax before any
    work. ``audio_ctx``: a Whisper model's encoder context. ``kernels``: ``dense`` | ``sparse`` | ``auto``
    (:mod:`~dsnn_compress.runtime.kernels`): how pruned layers compute at sparse levels; ``auto`` times dense against
    CSR per layer on the shapes of the first batch, before the timed passes. ``verify``: check the model file's
    checksums (when it has them) before anything runs. ``compact`` (structured bundles): run each level as its
    physically smaller model, so RTFx is that model's. ``repeats``: timing passes over the levels
    (:mod:`~dsnn_compress.evaluation.timing`); 1 times each level once. ``runtime``: ``dsnn`` or ``faster-whisper``
    (Whisper models: each level exported to a faster-whisper directory and transcribed there, one utterance at a
    time, with ``compute_type``; ``kernels`` and ``compact`` do not apply; see
    :mod:`~dsnn_compress.evaluation.faster_whisper`).
    """

    levels: str | Sequence[float] = "all"
    batch_frames: int = DEFAULT_BATCH_FRAMES
    skip_bad: bool = False
    normalizer: str | None = None
    details: bool = False
    max_wer: Sequence[str] = ()
    max_wer_increase: Sequence[str] = ()
    audio_ctx: int | None = None
    kernels: str = "dense"
    verify: bool = True
    compact: bool = False
    repeats: int = DEFAULT_REPEATS
    runtime: str = "dsnn"
    compute_type: str | None = None

    def check(self) -> None:
        """UsageError for a value that no model or data could make valid (before any file is read)."""
        if self.batch_frames <= 0:
            raise UsageError("--batch-frames must be positive")
        if self.repeats < 1:
            raise UsageError(f"--repeats must be at least 1, got {self.repeats}", "e.g. --repeats 3")
        if self.runtime not in RUNTIMES:
            raise UsageError(f"unknown --runtime {self.runtime!r}", f"choose one of {', '.join(RUNTIMES)}")
        if self.runtime == "faster-whisper":
            for flag, given in (("--kernels", self.kernels != "dense"), ("--compact", self.compact)):
                if given:
                    raise UsageError(f"{flag} does not apply to --runtime faster-whisper (faster-whisper runs each "
                                     "level's exported model with its own kernels)", f"drop {flag}")
        elif self.compute_type is not None:
            raise UsageError("--compute-type applies to --runtime faster-whisper only",
                             "add --runtime faster-whisper, or drop --compute-type")
        for spec in self.max_wer:
            parse_gate(spec, "--max-wer")
        for spec in self.max_wer_increase:
            parse_gate(spec, "--max-wer-increase")


def evaluate(model_path: str | Path, data_path: str | Path, options: EvaluateOptions | None = None, *,
             on_progress: Callable[[str, int, int], None] | None = None) -> EvaluationReport:
    """Evaluate every requested level of ``model_path`` on ``data_path`` (:class:`EvaluateOptions`).

    The first pass decodes every utterance at every level (the scored transcripts); passes 2 to ``repeats`` decode
    the timed batches again at every level, for timing only. The passes are interleaved: each runs every level once
    (:func:`~.timing.pass_order`), so background load spreads over the levels instead of falling on the ones that
    happened to run during it; RTFx is the median pass and ``rtfx_range`` the slowest and fastest
    (:mod:`~dsnn_compress.evaluation.timing`). The gates are recorded in the report; :func:`gate_failure` turns
    failures into an error.

    RTFx follows the Open ASR Leaderboard: audio seconds / processing seconds, where processing covers feature
    extraction, the forward pass and decoding (audio is read from disk once beforehand), after one untimed
    warm-up batch. Level switches (compact adapters, sparse kernels rebuilt for the level) are not timed.
    """
    opts = options or EvaluateOptions()
    opts.check()
    if opts.runtime == "faster-whisper":
        from .faster_whisper import evaluate_faster_whisper

        return evaluate_faster_whisper(model_path, data_path, opts, on_progress=on_progress)
    loaded = load_model(model_path, opts.audio_ctx, opts.kernels, verify=opts.verify,
                        compact=opts.compact)  # checks --kernels first
    chosen = select_levels(loaded, opts.levels)
    data, norm, normalize, count = read_scoring_data(loaded, data_path, opts, on_progress)
    batches = bucket_batches(data.seconds, opts.batch_frames, shuffle=False, seed=0)
    first = batches[0]
    if loaded.kernels is not None:  # auto times each layer on the input shapes of a real batch
        loaded.use_kernels(opts.kernels, lambda: transcribe_waveforms(loaded, [data.waveforms[i] for i in first],
                                                                      [data.ids[i] for i in first]))
    loaded.set_level(chosen[0])
    transcribe_waveforms(loaded, [data.waveforms[i] for i in first], [data.ids[i] for i in first])  # warm-up
    runs = _LevelRuns(loaded, data, batches, normalize, on_progress)
    runs.run(chosen, opts.repeats)
    loaded.set_level(0.0)
    results = [runs.result(level) for level in chosen]
    report = EvaluationReport(
        model=ModelInfo(str(model_path), loaded.kind, loaded.adapter.family, opts.compact),
        data=DataInfo(str(data_path), count), normalizer=norm, decoding=loaded.adapter.decoding,
        threads=torch.get_num_threads(), levels=results,
        skipped=[SkippedUtterance(s["id"], s["reason"]) for s in data.skipped],
        kernels=_kernels_summary(loaded), timing=Timing(opts.repeats, sum(len(batches[b]) for b in runs.timed)),
        tool=tool_metadata(),
    )
    report.long_form = long_form_record(loaded, data, runs.chunks)
    return complete_report(report, loaded, data, runs.hypotheses, opts)


def read_scoring_data(loaded: LoadedModel, data_path: str | Path, opts: EvaluateOptions,
                      on_progress: Callable[[str, int, int], None] | None
                      ) -> tuple[PreparedData, str, Callable[[str], str], int]:
    """The manifest's audio and normalised references, read once for every level (DsnnError when nothing usable is
    left); also the normaliser's name, the normaliser and the number of utterances in the manifest."""
    norm = opts.normalizer or loaded.adapter.normalizer
    normalize = get_normalizer(norm)  # validates the name
    utterances = read_manifest(data_path)
    done = 0

    def tick_load() -> None:
        nonlocal done
        done += 1
        if on_progress:
            on_progress("loading audio", done, len(utterances))

    data = prepare_data(utterances, loaded.adapter.sample_rate, loaded.adapter.encode_text, norm, opts.skip_bad,
                        tick_load)
    if not data.ids:
        raise DsnnError(f"no utterance of {data_path} could be used ({len(data.skipped)} skipped)",
                        "check the audio files and transcripts")
    if not any(ref.split() for ref in data.references):
        raise DsnnError(f"the transcripts of {data_path} hold no words after normalisation, so WER is undefined",
                        "evaluate on data with non-empty transcripts")
    return data, norm, normalize, len(utterances)


def complete_report(report: EvaluationReport, loaded: LoadedModel, data: PreparedData,
                    hypotheses: Mapping[float, Sequence[str]], opts: EvaluateOptions) -> EvaluationReport:
    """``report`` with what every runtime adds the same way: how continuous levels were served, the transcripts
    (``details``) and the gates."""
    results = report.levels
    if not all(entry.trained for entry in results):
        report.continuous_levels = ContinuousLevels(SCORE, loaded.sparsity.allocation if loaded.sparsity else None)
    if opts.details:
        report.utterances = [
            UtteranceResult(uid, ref, {f"{entry.level:g}": hypotheses[entry.level][i] for entry in results})
            for i, (uid, ref) in enumerate(zip(data.ids, data.references, strict=True))
        ]
    report.gates = check_gates(results, opts.max_wer, opts.max_wer_increase)
    return report


def long_form_record(loaded: LoadedModel, data: PreparedData, chunks: int) -> LongForm | None:
    """The utterances longer than the model's window (a Whisper encoder context), which it decoded in ``chunks``
    chunks; None when every utterance fitted (or the model has no window)."""
    window = getattr(loaded.adapter, "context_samples", None)
    if window is None:
        return None
    long = tuple(uid for uid, wave in zip(data.ids, data.waveforms, strict=True) if wave.shape[0] > window)
    if not long:
        return None
    return LongForm(round(window / loaded.adapter.sample_rate, 3), long, chunks)


def _kernels_summary(loaded: LoadedModel) -> KernelsSummary:
    if loaded.kernels is None:
        return KernelsSummary()
    summary = loaded.kernels.summary()
    return KernelsSummary(summary["mode"], summary["layers_with_sparse_path"], summary["without_sparse_path"])


class _LevelRuns:
    """The interleaved passes of :func:`evaluate` over the levels, and what they measured per level."""

    def __init__(self, loaded: LoadedModel, data: PreparedData, batches: list[list[int]],
                 normalize: Callable[[str], str], on_progress: Callable[[str, int, int], None] | None) -> None:
        self.loaded, self.data, self.batches, self.normalize = loaded, data, batches, normalize
        self.on_progress = on_progress
        self.timed = timed_batches(batches, data.seconds, timing.TIMED_AUDIO_SECONDS)
        self.timed_set = set(self.timed)
        self.step = self.total = 0
        self.hypotheses: dict[float, list[str]] = {}
        self.passes: dict[float, list[float]] = {}
        self.scored: dict[float, tuple[int, KernelUse, int]] = {}  # nonzero params, kernels, capped decodes
        self.chunks = 0  # chunks of the utterances longer than the model's window (long-form decoding)

    def run(self, levels: Sequence[float], repeats: int) -> None:
        """Pass 1 decodes every batch at every level (transcripts and timing), passes 2.. the timed batches."""
        self.total = len(levels) * (len(self.batches) + (repeats - 1) * len(self.timed))
        for index in range(repeats):
            for level in pass_order(levels, index):
                self.loaded.set_level(level)  # not timed: compact swaps the adapter, sparse kernels rebuild CSR
                if index == 0:
                    self.loaded.adapter.capped_decodes = 0
                    if hasattr(self.loaded.adapter, "chunks_decoded"):
                        self.loaded.adapter.chunks_decoded = 0
                    seconds = self._decode(range(len(self.batches)), f"level {level_label(level)}",
                                           self.hypotheses.setdefault(level, [""] * len(self.data.ids)))
                    report = self.loaded.kernel_report()
                    self.chunks = getattr(self.loaded.adapter, "chunks_decoded", 0)
                    self.scored[level] = (self.loaded.nonzero_params(),
                                          KernelUse(report["mode"], tuple(report["layers"])),
                                          self.loaded.adapter.capped_decodes)
                else:
                    seconds = self._decode(self.timed, f"timing {index + 1}/{repeats}: level {level_label(level)}")
                self.passes.setdefault(level, []).append(seconds)

    def _decode(self, numbers: Iterable[int], stage: str, hyps: list[str] | None = None) -> float:
        """Decode the batches ``numbers`` at the active level; the seconds the timed ones took. With ``hyps``, the
        normalised transcripts are stored there (scored like the references: no stray or doubled spaces)."""
        seconds = 0.0
        for number in numbers:
            batch = self.batches[number]
            start = timing.clock()
            texts = transcribe_waveforms(self.loaded, [self.data.waveforms[i] for i in batch],
                                         [self.data.ids[i] for i in batch])
            if number in self.timed_set:
                seconds += timing.clock() - start
            if hyps is not None:
                for i, text in zip(batch, texts, strict=True):
                    hyps[i] = self.normalize(text)
            self.step += 1
            if self.on_progress:
                self.on_progress(stage, self.step, self.total)
        return seconds

    def result(self, level: float) -> LevelResult:
        """The scores (first pass) and the speed (every pass) of ``level``."""
        nonzero, kernels, capped = self.scored[level]
        measured = LevelTiming(sum(self.data.seconds[i] for b in self.timed for i in self.batches[b]),
                               tuple(self.passes[level]))
        return level_result(level, self.data, self.hypotheses[level], measured, nonzero,
                            self.loaded.is_trained(level), capped, kernels)


def level_result(level: float, data: PreparedData, hypotheses: Sequence[str], measured: LevelTiming, nonzero: int,
                 trained: bool, capped: int, kernels: KernelUse | None = None) -> LevelResult:
    """One level's entry: WER/CER of its normalised ``hypotheses`` against the references, the speed ``measured``
    over the timing passes (median and range), and what the caller counted."""
    rtfx, span = measured.rtfx, measured.rtfx_range
    return LevelResult(
        level=level, words=word_errors(data.references, hypotheses), chars=char_errors(data.references, hypotheses),
        nonzero_params=nonzero, audio_seconds=round(measured.audio_seconds, 3),
        processing_seconds=round(measured.processing_seconds, 4), rtfx=None if rtfx is None else round(rtfx, 2),
        rtfx_range=None if span is None else (round(span[0], 2), round(span[1], 2)),
        utterances_scored=len(data.ids), utterances_skipped=len(data.skipped),
        trained=trained, decodes_capped=capped, kernels=kernels or KernelUse(),
    )


def parse_gate(spec: str, option: str) -> tuple[float | None, float]:
    """``LEVEL:PCT`` -> (level or None for all levels, limit in percent)."""
    level_text, sep, pct_text = spec.partition(":")
    if not sep:
        raise UsageError(f"{option} {spec!r} is not LEVEL:PCT", f"e.g. {option} 0.9:25")
    try:
        limit = float(pct_text.rstrip("%"))
    except ValueError:
        raise UsageError(f"{option} {spec!r}: {pct_text!r} is not a number", f"e.g. {option} 0.9:25") from None
    if not math.isfinite(limit):
        raise UsageError(f"{option} {spec!r}: the limit must be a finite number of percent", f"e.g. {option} 0.9:25")
    level = None if level_text.strip().lower() in ("all", "*") else parse_level(level_text)
    return level, limit


def check_gates(levels: Sequence[LevelResult], max_wer: Sequence[str] = (),
                max_increase: Sequence[str] = ()) -> list[GateCheck]:
    """Check the gates against the evaluated ``levels``; one record per checked (gate, level), failures marked.

    ``--max-wer LEVEL:PCT``: WER at LEVEL must be at most PCT percent. ``--max-wer-increase LEVEL:PCT``: WER at
    LEVEL minus WER of the dense level must be at most PCT percentage points. ``all`` (or ``*``) as LEVEL checks
    every evaluated level.
    """
    by_level = {entry.level: entry for entry in levels}
    checks = []
    for kind, specs in (("max-wer", max_wer), ("max-wer-increase", max_increase)):
        for spec in specs:
            level, limit = parse_gate(spec, f"--{kind}")
            targets = list(by_level) if level is None else [lv for lv in by_level if same_level(lv, level)]
            if level is not None and not targets:
                raise UsageError(f"--{kind} names level {level:g}, which was not evaluated",
                                 "add it to --levels or fix the gate")
            for lv in targets:
                value = 100 * by_level[lv].wer
                if kind == "max-wer-increase":
                    if 0.0 not in by_level:
                        raise UsageError("--max-wer-increase needs the dense level 0 among --levels")
                    value -= 100 * by_level[0.0].wer
                checks.append(GateCheck(kind, lv, round(value, 4), limit, value <= limit + 1e-9))
    return checks


def gate_failure(checks: Sequence[GateCheck]) -> GateError | None:
    """A GateError describing every failed check, or None when all passed."""
    failed = [c for c in checks if not c.passed]
    if not failed:
        return None
    parts = []
    for c in failed:
        what = "WER" if c.gate == "max-wer" else "WER increase over dense"
        parts.append(f"{what} at level {c.level:g} is {c.value:.2f} %, above the limit {c.limit:g} %")
    return GateError("quality gate failed: " + "; ".join(parts), None)
