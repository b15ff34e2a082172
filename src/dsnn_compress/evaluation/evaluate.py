"""`dsnn evaluate`: WER / CER / RTFx per sparsity level on a manifest, with CI gates."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import tool_metadata
from ..core.continuous import SCORE
from ..core.levels import level_label, parse_level, same_level
from ..data.batch import pad_batch
from ..data.dataset import bucket_batches
from ..data.manifest import read_manifest
from ..data.prepare import prepare_data
from ..data.text import get_normalizer
from ..errors import DsnnError, GateError, UsageError
from ..runtime.runnable import LoadedModel, load_model
from .scoring import char_errors, word_errors

REPORT_SCHEMA = "dsnn-evaluate/1"
DEFAULT_BATCH_FRAMES = 30_000


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


def evaluate(
    model_path: str | Path,
    data_path: str | Path,
    levels: str | Sequence[float] = "all",
    batch_frames: int = DEFAULT_BATCH_FRAMES,
    skip_bad: bool = False,
    normalizer: str | None = None,
    details: bool = False,
    on_progress: Callable[[str, int, int], None] | None = None,
    max_wer: Sequence[str] = (),
    max_wer_increase: Sequence[str] = (),
    audio_ctx: int | None = None,
    kernels: str = "dense",
    verify: bool = True,
    compact: bool = False,
) -> dict[str, Any]:
    """Evaluate every requested level on ``data_path``; returns the JSON-ready report.

    ``verify`` checks the model file's checksums (when it has them) before anything runs.
    ``compact`` (structured bundles): run each level as its physically smaller model, so RTFx is that model's.

    ``max_wer`` / ``max_wer_increase`` are CI gates (``LEVEL:PCT``, see :func:`check_gates`), checked for syntax
    before any work and recorded under ``gates`` in the report; :func:`gate_failure` turns failures into an error.

    RTFx follows the Open ASR Leaderboard: audio seconds / processing seconds, where processing covers feature
    extraction, the forward pass and decoding (audio is read from disk once beforehand), after one untimed
    warm-up batch.

    ``kernels`` (``dense`` | ``sparse`` | ``auto``, :mod:`~dsnn_compress.runtime.kernels`): how pruned layers compute at
    sparse levels; ``auto`` times dense against CSR per layer on the shapes of the first batch, before the timed
    passes. Each level's entry says how many layers ran sparse.
    """
    if batch_frames <= 0:
        raise UsageError("--batch-frames must be positive")
    for spec in max_wer:
        parse_gate(spec, "--max-wer")
    for spec in max_wer_increase:
        parse_gate(spec, "--max-wer-increase")
    loaded = load_model(model_path, audio_ctx, kernels, verify=verify, compact=compact)  # checks --kernels first
    chosen = select_levels(loaded, levels)
    norm = normalizer or loaded.adapter.normalizer
    normalize = get_normalizer(norm)  # validates the name
    utterances = read_manifest(data_path)
    done = 0

    def tick_load() -> None:
        nonlocal done
        done += 1
        if on_progress:
            on_progress("loading audio", done, len(utterances))

    data = prepare_data(utterances, loaded.adapter.sample_rate, loaded.adapter.encode_text, norm, skip_bad, tick_load)
    if not data.ids:
        raise DsnnError(f"no utterance of {data_path} could be used ({len(data.skipped)} skipped)",
                        "check the audio files and transcripts")
    if not any(ref.split() for ref in data.references):
        raise DsnnError(f"the transcripts of {data_path} hold no words after normalisation, so WER is undefined",
                        "evaluate on data with non-empty transcripts")
    batches = bucket_batches(data.seconds, batch_frames, shuffle=False, seed=0)
    first = batches[0]
    if loaded.kernels is not None:  # auto times each layer on the input shapes of a real batch
        loaded.use_kernels(kernels, lambda: transcribe_waveforms(loaded, [data.waveforms[i] for i in first],
                                                                 [data.ids[i] for i in first]))
    loaded.set_level(chosen[0])
    transcribe_waveforms(loaded, [data.waveforms[i] for i in first], [data.ids[i] for i in first])  # warm-up
    total_steps = len(chosen) * len(batches)
    step = 0
    results = []
    hypotheses: dict[float, list[str]] = {}
    for level in chosen:
        loaded.set_level(level)
        loaded.adapter.capped_decodes = 0
        hyps = [""] * len(data.ids)
        elapsed = 0.0
        for batch in batches:
            start = time.perf_counter()
            texts = transcribe_waveforms(loaded, [data.waveforms[i] for i in batch], [data.ids[i] for i in batch])
            elapsed += time.perf_counter() - start
            for i, text in zip(batch, texts, strict=True):
                hyps[i] = normalize(text)  # scored like the references (no stray or doubled spaces)
            step += 1
            if on_progress:
                on_progress(f"level {level_label(level)}", step, total_steps)
        words = word_errors(data.references, hyps)
        chars = char_errors(data.references, hyps)
        audio_seconds = float(sum(data.seconds))
        results.append({
            "level": level,
            "trained": loaded.is_trained(level),
            "wer": words.rate,
            "cer": chars.rate,
            "words": words.to_dict(),
            "chars": chars.to_dict(),
            "nonzero_params": loaded.nonzero_params(),
            "audio_seconds": round(audio_seconds, 3),
            "processing_seconds": round(elapsed, 4),
            "rtfx": round(audio_seconds / elapsed, 2) if elapsed > 0 else None,
            "utterances_scored": len(data.ids),
            "utterances_skipped": len(data.skipped),
            "decodes_capped": loaded.adapter.capped_decodes,
            "kernels": loaded.kernel_report(),
        })
        hypotheses[level] = hyps
    loaded.set_level(0.0)
    report: dict[str, Any] = {
        "schema": REPORT_SCHEMA,
        "tool": tool_metadata(),
        "model": {"path": str(model_path), "kind": loaded.kind, "family": loaded.adapter.family,
                  **({"compact": True} if compact else {})},
        "data": {"path": str(data_path), "utterances": len(utterances)},
        "normalizer": norm,
        "decoding": loaded.adapter.decoding,
        "threads": torch.get_num_threads(),
        "kernels": loaded.kernels.summary() if loaded.kernels else {"mode": "dense"},
        "levels": results,
        "skipped": data.skipped,
    }
    if not all(entry["trained"] for entry in results):
        report["continuous_levels"] = {"score": SCORE, "allocation": loaded.sparsity.allocation if loaded.sparsity
                                       else None}
    if details:
        report["utterances"] = [
            {"id": uid, "reference": ref, "hypotheses": {f"{lv:g}": hypotheses[lv][i] for lv in chosen}}
            for i, (uid, ref) in enumerate(zip(data.ids, data.references, strict=True))
        ]
    report["gates"] = check_gates(report, max_wer, max_wer_increase)
    return report


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


def check_gates(report: dict[str, Any], max_wer: Sequence[str] = (), max_increase: Sequence[str] = ()) -> list[dict]:
    """Evaluate the gates against ``report``; returns one record per checked (gate, level), failures marked.

    ``--max-wer LEVEL:PCT``: WER at LEVEL must be at most PCT percent. ``--max-wer-increase LEVEL:PCT``: WER at
    LEVEL minus WER of the dense level must be at most PCT percentage points. ``all`` (or ``*``) as LEVEL checks
    every evaluated level.
    """
    by_level = {entry["level"]: entry for entry in report["levels"]}
    checks = []
    for kind, specs in (("max-wer", max_wer), ("max-wer-increase", max_increase)):
        for spec in specs:
            level, limit = parse_gate(spec, f"--{kind}")
            targets = list(by_level) if level is None else [lv for lv in by_level if same_level(lv, level)]
            if level is not None and not targets:
                raise UsageError(f"--{kind} names level {level:g}, which was not evaluated",
                                 "add it to --levels or fix the gate")
            for lv in targets:
                value = 100 * by_level[lv]["wer"]
                if kind == "max-wer-increase":
                    if 0.0 not in by_level:
                        raise UsageError("--max-wer-increase needs the dense level 0 among --levels")
                    value -= 100 * by_level[0.0]["wer"]
                checks.append({"gate": kind, "level": lv, "value": round(value, 4), "limit": limit,
                               "passed": value <= limit + 1e-9})
    return checks


def gate_failure(checks: Sequence[dict]) -> GateError | None:
    """A GateError describing every failed check, or None when all passed."""
    failed = [c for c in checks if not c["passed"]]
    if not failed:
        return None
    parts = []
    for c in failed:
        what = "WER" if c["gate"] == "max-wer" else "WER increase over dense"
        parts.append(f"{what} at level {c['level']:g} is {c['value']:.2f} %, above the limit {c['limit']:g} %")
    return GateError("quality gate failed: " + "; ".join(parts), None)
