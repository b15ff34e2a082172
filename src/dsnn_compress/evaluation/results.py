"""The typed result of `dsnn evaluate`: the report, one result per level, gate checks, and its JSON form.

:meth:`EvaluationReport.to_dict` writes the JSON report (schema ``dsnn-evaluate/1``); :meth:`EvaluationReport.
from_dict` reads it back, also the reports of earlier versions (keys added since the first version get their
defaults: ``trained`` True, ``decodes_capped`` 0, dense kernels, no ``rtfx_range``, no gates, no ``timing``, the
``dsnn`` runtime).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..core.levels import same_level
from ..errors import DsnnError
from .scoring import ErrorCounts

REPORT_SCHEMA = "dsnn-evaluate/1"


@dataclass(frozen=True)
class KernelUse:
    """The kernels one level ran with: mode, and the layers that computed with sparse weights."""

    mode: str = "dense"
    layers: tuple[str, ...] = ()

    @property
    def sparse_layers(self) -> int:
        """How many layers computed with sparse weights."""
        return len(self.layers)

    def to_dict(self) -> dict[str, Any]:
        """JSON form: ``{"mode", "sparse_layers", "layers"}``."""
        return {"mode": self.mode, "sparse_layers": self.sparse_layers, "layers": list(self.layers)}


@dataclass(frozen=True)
class KernelsSummary:
    """The kernels of the whole run: mode, and (sparse or auto) the layers with and without a sparse path."""

    mode: str = "dense"
    layers_with_sparse_path: int | None = None
    without_sparse_path: dict[str, int] | None = None
    """Pruned layer types without a sparse path (they run dense), counted."""

    def to_dict(self) -> dict[str, Any]:
        """JSON form; a dense run is ``{"mode": "dense"}``."""
        out: dict[str, Any] = {"mode": self.mode}
        if self.layers_with_sparse_path is not None:
            out["layers_with_sparse_path"] = self.layers_with_sparse_path
        if self.without_sparse_path is not None:
            out["without_sparse_path"] = dict(self.without_sparse_path)
        return out


@dataclass(frozen=True)
class LevelResult:
    """Scores and speed of one level.

    RTFx is audio seconds / processing seconds, where ``processing_seconds`` is the median over the timing passes
    of the time one pass took to decode ``audio_seconds`` of audio; ``rtfx_range`` is (slowest, fastest) pass
    (None in reports written before it existed or when a pass took no measurable time).
    """

    level: float
    words: ErrorCounts
    chars: ErrorCounts
    nonzero_params: int
    audio_seconds: float
    processing_seconds: float
    rtfx: float | None
    utterances_scored: int
    utterances_skipped: int
    trained: bool = True
    rtfx_range: tuple[float, float] | None = None
    decodes_capped: int = 0
    kernels: KernelUse = field(default_factory=KernelUse)

    @property
    def wer(self) -> float:
        """Corpus word error rate."""
        return self.words.rate

    @property
    def cer(self) -> float:
        """Corpus character error rate."""
        return self.chars.rate

    def to_dict(self) -> dict[str, Any]:
        """The level's entry of the JSON report."""
        return {
            "level": self.level, "trained": self.trained, "wer": self.wer, "cer": self.cer,
            "words": self.words.to_dict(), "chars": self.chars.to_dict(), "nonzero_params": self.nonzero_params,
            "audio_seconds": self.audio_seconds, "processing_seconds": self.processing_seconds, "rtfx": self.rtfx,
            "rtfx_range": list(self.rtfx_range) if self.rtfx_range is not None else None,
            "utterances_scored": self.utterances_scored, "utterances_skipped": self.utterances_skipped,
            "decodes_capped": self.decodes_capped, "kernels": self.kernels.to_dict(),
        }


@dataclass(frozen=True)
class GateCheck:
    """One CI gate checked at one level: ``value`` and ``limit`` in percent (WER, or WER points above dense)."""

    gate: str
    """``max-wer`` or ``max-wer-increase``."""
    level: float
    value: float
    limit: float
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"gate": self.gate, "level": self.level, "value": self.value, "limit": self.limit,
                "passed": self.passed}


@dataclass(frozen=True)
class UtteranceResult:
    """One utterance of ``--details``: its normalised reference and the hypothesis per level label (``"0.5"``)."""

    id: str
    reference: str
    hypotheses: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"id": self.id, "reference": self.reference, "hypotheses": dict(self.hypotheses)}


@dataclass(frozen=True)
class ModelInfo:
    """What was evaluated: the model's path, kind (``bundle`` / ``checkpoint``), family, and ``--compact``."""

    path: str
    kind: str
    family: str
    compact: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON form (``compact`` only when set)."""
        return {"path": self.path, "kind": self.kind, "family": self.family, **({"compact": True} if self.compact
                                                                               else {})}


@dataclass(frozen=True)
class DataInfo:
    """The manifest evaluated on and its number of utterances (skipped ones included)."""

    path: str
    utterances: int

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"path": self.path, "utterances": self.utterances}


@dataclass(frozen=True)
class SkippedUtterance:
    """An utterance left out with ``--skip-bad``, and why."""

    id: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        """JSON form."""
        return {"id": self.id, "reason": self.reason}


@dataclass(frozen=True)
class ContinuousLevels:
    """How levels between two trained levels were served (present when such a level was evaluated)."""

    score: str
    allocation: str | None

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"score": self.score, "allocation": self.allocation}


@dataclass(frozen=True)
class LongForm:
    """Utterances longer than the model's window (Whisper's encoder context), decoded in chunks, never truncated."""

    window_seconds: float
    utterances: tuple[str, ...]
    chunks: int
    """Chunks they were decoded in (at every level: the same audio, the same cuts)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"window_seconds": self.window_seconds, "utterances": list(self.utterances), "chunks": self.chunks}


@dataclass(frozen=True)
class Timing:
    """How RTFx was measured: ``repeats`` interleaved passes over the levels, each decoding ``timed_utterances``."""

    repeats: int
    timed_utterances: int

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"repeats": self.repeats, "timed_utterances": self.timed_utterances}


@dataclass(frozen=True)
class RuntimeInfo:
    """Where the levels ran: ``dsnn`` (its own PyTorch model and level switch) or ``faster-whisper`` (each level
    exported to a faster-whisper directory and transcribed there, one utterance at a time).

    ``compute_type`` is CTranslate2's (``int8``, ``float32``...; None for ``dsnn``); ``chunk_length`` the
    faster-whisper window in seconds when the model's encoder context is shorter than 30 s (None: faster-whisper's
    own 30 s); ``versions`` the runtime packages' versions.
    """

    name: str = "dsnn"
    compute_type: str | None = None
    chunk_length: int | None = None
    versions: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON form: ``{"name", "compute_type", "chunk_length", "versions"}``."""
        return {"name": self.name, "compute_type": self.compute_type, "chunk_length": self.chunk_length,
                "versions": dict(self.versions)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> RuntimeInfo:
        """The runtime of a JSON report (``dsnn`` for reports written before runtimes existed)."""
        if not data:
            return cls()
        chunk = data.get("chunk_length")
        return cls(str(data.get("name", "dsnn")), None if data.get("compute_type") is None
                   else str(data["compute_type"]), None if chunk is None else int(chunk),
                   {str(k): str(v) for k, v in (data.get("versions") or {}).items()})


@dataclass(frozen=True)
class SpeedComparison:
    """A level's speed against dense: the ratio of median RTFx, and whether the two ranges do not overlap."""

    ratio: float
    distinct: bool
    """True only when the level's RTFx range and dense's are disjoint: otherwise the difference may be noise."""


@dataclass
class EvaluationReport:
    """Everything `dsnn evaluate` measured; :meth:`to_dict` is the JSON report."""

    model: ModelInfo
    data: DataInfo
    normalizer: str
    decoding: str
    threads: int
    levels: list[LevelResult]
    skipped: list[SkippedUtterance] = field(default_factory=list)
    gates: list[GateCheck] = field(default_factory=list)
    kernels: KernelsSummary = field(default_factory=KernelsSummary)
    timing: Timing | None = None
    """None in reports written before repeated timing (one pass per level, level after level)."""
    continuous_levels: ContinuousLevels | None = None
    long_form: LongForm | None = None
    """Present when some utterance was longer than the model's window (decoded in chunks)."""
    utterances: list[UtteranceResult] | None = None
    """Per utterance transcripts (``--details``)."""
    tool: dict[str, str] = field(default_factory=dict)
    runtime: RuntimeInfo = field(default_factory=RuntimeInfo)
    """Where the levels ran (``dsnn`` in reports written before runtimes existed)."""
    schema: str = REPORT_SCHEMA

    def level(self, value: float) -> LevelResult | None:
        """The result of level ``value`` (one tolerance, ``core.levels.same_level``), None if not evaluated."""
        return next((entry for entry in self.levels if same_level(entry.level, value)), None)

    def speed_vs_dense(self, entry: LevelResult) -> SpeedComparison | None:
        """``entry``'s speed against the dense level's; None when there is nothing to compare: one timing pass
        (no spread), no dense level, ``entry`` is dense, or a range is missing."""
        dense = self.level(0.0)
        if (self.timing is None or self.timing.repeats < 2 or dense is None or dense is entry
                or not entry.rtfx or not dense.rtfx or entry.rtfx_range is None or dense.rtfx_range is None):
            return None
        (low, high), (dense_low, dense_high) = entry.rtfx_range, dense.rtfx_range
        return SpeedComparison(entry.rtfx / dense.rtfx, high < dense_low or low > dense_high)

    def to_dict(self) -> dict[str, Any]:
        """The JSON report (the format ``dsnn evaluate --json`` writes and :meth:`from_dict` reads)."""
        out: dict[str, Any] = {
            "schema": self.schema, "tool": dict(self.tool), "model": self.model.to_dict(), "data": self.data.to_dict(),
            "normalizer": self.normalizer, "decoding": self.decoding, "threads": self.threads,
            "kernels": self.kernels.to_dict(), "levels": [entry.to_dict() for entry in self.levels],
            "skipped": [s.to_dict() for s in self.skipped], "gates": [g.to_dict() for g in self.gates],
            "runtime": self.runtime.to_dict(),
        }
        if self.timing is not None:
            out["timing"] = self.timing.to_dict()
        if self.continuous_levels is not None:
            out["continuous_levels"] = self.continuous_levels.to_dict()
        if self.long_form is not None:
            out["long_form"] = self.long_form.to_dict()
        if self.utterances is not None:
            out["utterances"] = [u.to_dict() for u in self.utterances]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvaluationReport:
        """Read a JSON report (any version); DsnnError naming the first missing or malformed key."""
        try:
            return _report_from_dict(data)
        except KeyError as exc:
            raise DsnnError(f"not a dsnn evaluation report (no {exc.args[0]!r})",
                            "use a file written by dsnn evaluate --json") from None
        except (TypeError, ValueError, AttributeError) as exc:
            raise DsnnError(f"not a dsnn evaluation report ({exc})", "use a file written by dsnn evaluate --json") \
                from None


def _level_from_dict(data: Mapping[str, Any]) -> LevelResult:
    kernels = data.get("kernels") or {}
    span = data.get("rtfx_range")
    return LevelResult(
        level=float(data["level"]), words=ErrorCounts.from_dict(data["words"]),
        chars=ErrorCounts.from_dict(data["chars"]),
        nonzero_params=int(data["nonzero_params"]), audio_seconds=float(data["audio_seconds"]),
        processing_seconds=float(data["processing_seconds"]),
        rtfx=None if data["rtfx"] is None else float(data["rtfx"]),
        utterances_scored=int(data["utterances_scored"]), utterances_skipped=int(data["utterances_skipped"]),
        trained=bool(data.get("trained", True)),
        rtfx_range=None if span is None else (float(span[0]), float(span[1])),
        decodes_capped=int(data.get("decodes_capped", 0)),
        kernels=KernelUse(str(kernels.get("mode", "dense")), tuple(kernels.get("layers", ()))),
    )


def _report_from_dict(data: Mapping[str, Any]) -> EvaluationReport:
    if not isinstance(data, Mapping):
        raise TypeError("not a JSON object")
    if not isinstance(data["levels"], list):
        raise TypeError("'levels' is not a list")
    kernels = data.get("kernels") or {}
    timing, utterances, continuous = data.get("timing"), data.get("utterances"), data.get("continuous_levels")
    long_form = data.get("long_form")
    model, source = data["model"], data["data"]
    return EvaluationReport(
        model=ModelInfo(str(model["path"]), str(model["kind"]), str(model["family"]), bool(model.get("compact"))),
        data=DataInfo(str(source["path"]), int(source["utterances"])), normalizer=str(data["normalizer"]),
        decoding=str(data.get("decoding", "greedy-ctc")), threads=int(data.get("threads", 0)),
        levels=[_level_from_dict(entry) for entry in data["levels"]],
        skipped=[SkippedUtterance(str(s["id"]), str(s["reason"])) for s in data.get("skipped", [])],
        gates=[GateCheck(str(g["gate"]), float(g["level"]), float(g["value"]), float(g["limit"]), bool(g["passed"]))
               for g in data.get("gates", [])],
        kernels=KernelsSummary(str(kernels.get("mode", "dense")), kernels.get("layers_with_sparse_path"),
                               kernels.get("without_sparse_path")),
        timing=None if timing is None else Timing(int(timing["repeats"]), int(timing["timed_utterances"])),
        continuous_levels=None if continuous is None else ContinuousLevels(str(continuous["score"]),
                                                                           continuous.get("allocation")),
        long_form=None if long_form is None else LongForm(float(long_form["window_seconds"]),
                                                          tuple(str(u) for u in long_form["utterances"]),
                                                          int(long_form["chunks"])),
        utterances=None if utterances is None else [
            UtteranceResult(str(u["id"]), str(u["reference"]), dict(u["hypotheses"])) for u in utterances],
        tool=dict(data.get("tool", {})), runtime=RuntimeInfo.from_dict(data.get("runtime")),
        schema=str(data.get("schema", REPORT_SCHEMA)),
    )
