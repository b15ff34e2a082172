"""Rendering of reports: rich tables for the terminal, JSON and Markdown for machines."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from ..core.bundle import Bundle
from ..core.levels import level_label
from ..evaluation.results import EvaluationReport, LevelResult
from .structured import depth_table, structured_report, structured_table


def human_bytes(num: float) -> str:
    """``1536`` -> ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(num) < 1024 or unit == "GiB":
            return f"{num:.0f} {unit}" if unit == "B" else f"{num:.1f} {unit}"
        num /= 1024
    return f"{num:.1f} GiB"


def pct(value: float) -> str:
    """``0.7`` -> ``70.00 %``."""
    return f"{100 * value:.2f} %"


def inspect_report(bundle: Bundle, file_size: int | None = None) -> dict[str, Any]:
    """Everything `dsnn inspect` shows, as a JSON-ready dict."""
    summary = bundle.summary()
    element_size = {n: t.element_size() for n, t in bundle.tensors.items()}
    nonzero_bytes = []
    dense_bytes = sum(t.numel() * t.element_size() for t in bundle.tensors.values())
    for k, _level in enumerate(bundle.all_levels):
        pruned_bytes = sum(
            info["pruned"][k] * element_size[name] for name, info in summary["tensors"].items()
        )
        nonzero_bytes.append(dense_bytes - pruned_bytes)
    levels = [dict(entry, nonzero_bytes=nb) for entry, nb in zip(summary["levels"], nonzero_bytes)]
    meta = bundle.metadata
    return {
        "path": str(bundle.path) if bundle.path else None,
        "file_bytes": file_size,
        "dense_bytes": dense_bytes,
        "levels": levels,
        "code_bits": bundle.bits,
        "allocation": meta.get("allocation"),
        "selection": meta.get("selection"),
        "source": meta.get("source"),
        "tool": meta.get("tool"),
        "model": {k: meta["model"].get(k) for k in ("family", "config")} if isinstance(meta.get("model"), dict)
        else None,
        "prunable_params": summary["prunable_params"],
        "total_params": summary["total_params"],
        "tensors": summary["tensors"],
        "not_pruned": sorted(n for n in bundle.tensors if n not in bundle.codes),
        "evaluation": meta.get("evaluation"),
        "integrity": bundle.integrity,
        "granularity": "structured" if bundle.structured is not None else "weight",
        "pruning": pruning_summary(meta.get("pruning")),
        **({"structured": structured_report(bundle)} if bundle.structured is not None else {}),
    }


def pruning_summary(pruning: Any) -> dict[str, Any]:
    """How the bundle's weights were scored: method, comparison, profile, calibration (magnitude when unrecorded)."""
    if not isinstance(pruning, dict):
        return {"method": "magnitude", "profile": "uniform"}
    keys = ("method", "allocation", "profile", "calibration", "blocks", "owl", "magnitude_scored")
    out = {k: pruning[k] for k in keys if k in pruning}
    if isinstance(pruning.get("sensitivity"), dict):
        out["sensitivity"] = {k: v for k, v in pruning["sensitivity"].items() if k != "costs"}
    return out


def pruning_line(summary: dict[str, Any]) -> str:
    """One line: ``scores: wanda (per-row), profile sensitivity, calibration 64 clips (sha256 ...) of M``."""
    text = f"scores: {summary.get('method', 'magnitude')}"
    if summary.get("allocation"):
        text += f" ({summary['allocation']})"
    if summary.get("profile", "uniform") != "uniform":
        text += f", profile {summary['profile']}"
    calibration = summary.get("calibration")
    if isinstance(calibration, dict):
        text += (f", calibration {calibration.get('utterances')} clips, {calibration.get('seconds')} s of "
                 f"{calibration.get('manifest')} (sha256 {str(calibration.get('sha256'))[:12]}…)")
    return text


def levels_table(report: dict[str, Any], title: str) -> Table:
    """Per-level table: target, achieved sparsity of prunable and of all parameters, nonzero params, bytes."""
    table = Table(title=title, title_justify="left")
    table.add_column("level", justify="right")
    table.add_column("prunable sparsity", justify="right")
    table.add_column("overall sparsity", justify="right")
    table.add_column("nonzero params", justify="right")
    table.add_column("nonzero bytes", justify="right")
    for entry in report["levels"]:
        table.add_row(
            level_label(entry["level"]),
            pct(entry["prunable_sparsity"]),
            pct(entry["overall_sparsity"]),
            f"{entry['nonzero_params']:,}",
            human_bytes(entry["nonzero_bytes"]),
        )
    return table


def tensors_table(report: dict[str, Any], levels: Sequence[float]) -> Table:
    """Per-tensor table: shape, size and sparsity at every sparse level; unpruned tensors listed after."""
    table = Table(title="pruned tensors", title_justify="left")
    table.add_column("tensor")
    table.add_column("shape")
    table.add_column("params", justify="right")
    for level in levels:
        table.add_column(f"@{level:g}", justify="right")
    for name, info in report["tensors"].items():
        table.add_row(name, "x".join(map(str, info["shape"])), f"{info['numel']:,}",
                      *[pct(s) for s in info["sparsity"][1:]])
    return table


_INTEGRITY_TEXT = {
    "verified": "verified (every tensor and the metadata match)",
    "not verified": "present, not verified (--no-verify)",
    "no checksums": "no checksums (written by a dsnn that did not record them)",
    "recorded": "recorded",
}


def print_inspect(report: dict[str, Any], levels: Sequence[float], layers: bool, console: Console) -> None:
    """Print the inspect report as rich tables."""
    source = report.get("source") or {}
    size = f", file {human_bytes(report['file_bytes'])}" if report.get("file_bytes") else ""
    console.print(
        f"[bold]{report['path']}[/bold]: {len(levels)} sparse levels, {report['code_bits']}-bit codes, "
        f"{report['allocation']} allocation, {len(report['tensors'])} pruned tensors "
        f"({report['prunable_params']:,} of {report['total_params']:,} params){size}"
    )
    if source:
        console.print(f"source: {source.get('file')} (sha256 {str(source.get('sha256'))[:12]}…, {source.get('kind')})")
    console.print(f"checksums: {_INTEGRITY_TEXT.get(report.get('integrity'), report.get('integrity'))}")
    console.print(pruning_line(report.get("pruning") or {}), highlight=False)
    if report.get("model"):
        console.print(f"model: {report['model'].get('family')}")
    console.print(levels_table(report, "levels"))
    if report.get("structured"):
        console.print(structured_table(report["structured"]))
        if report["structured"].get("depth"):
            console.print(depth_table(report["structured"]))
    if layers:
        console.print(tensors_table(report, levels))
        if report["not_pruned"]:
            console.print(f"not pruned ({len(report['not_pruned'])}): " + ", ".join(report["not_pruned"]))


def to_json(data: Any) -> str:
    """Stable, indented JSON."""
    return json.dumps(data, indent=2, sort_keys=True, default=str)


UNTRAINED_MARK = "*"
UNTRAINED_NOTE = ("* a continuous level between two trained levels (not trained itself; masks from the keep codes "
                  "and the dense magnitudes, nested with the trained levels)")


def evaluated_level_label(entry: LevelResult) -> str:
    """The level label of an evaluation entry, marked with ``*`` when the level was not trained."""
    return level_label(entry.level) + ("" if entry.trained else UNTRAINED_MARK)


def _has_untrained(report: EvaluationReport) -> bool:
    return any(not entry.trained for entry in report.levels)


def _ranged(report: EvaluationReport) -> bool:
    """Whether the report's RTFx comes from several timing passes (then each has a range)."""
    return report.timing is not None and report.timing.repeats > 1


def compares_speed(report: EvaluationReport) -> bool:
    """Whether a "vs dense" speed column is shown: several timing passes, dense and another level evaluated."""
    return _ranged(report) and report.level(0.0) is not None and len(report.levels) > 1


def rtfx_text(report: EvaluationReport, entry: LevelResult) -> str:
    """``94.3 (93.1-97.7)``: the median RTFx and the slowest-fastest pass (the median alone after one pass)."""
    if not entry.rtfx:
        return "-"
    if entry.rtfx_range is None or not _ranged(report):
        return f"{entry.rtfx:.1f}"
    low, high = entry.rtfx_range
    return f"{entry.rtfx:.1f} ({low:.1f}-{high:.1f})"


def versus_dense_text(report: EvaluationReport, entry: LevelResult) -> str:
    """``same`` when the level's RTFx range overlaps dense's, else the ratio of medians (``1.34x``)."""
    comparison = report.speed_vs_dense(entry)
    if comparison is None:
        return "-"
    return f"{comparison.ratio:.2f}x" if comparison.distinct else "same"


def timing_note(report: EvaluationReport, subject: str = "RTFx") -> str | None:
    """One line on how RTFx (of ``subject``) was measured (None for reports written before repeated timing)."""
    if report.timing is None:
        return None
    if not _ranged(report):
        return f"{subject}: one timing pass, so no range and no speed comparison (--repeats 2 or more gives both)"
    text = (f"{subject}: median of {report.timing.repeats} interleaved timing passes (slowest-fastest pass) over "
            f"{report.timing.timed_utterances} utterances")
    if compares_speed(report):
        text += "; vs dense: 'same' where the ranges overlap (the difference may be noise), else the ratio"
    return text


def runtime_note(report: EvaluationReport) -> str | None:
    """Where the levels ran when it was not dsnn itself (``faster-whisper (ctranslate2 4.8.5, faster-whisper
    1.2.1), compute type int8, ...``), or None."""
    runtime = report.runtime
    if runtime.name == "dsnn":
        return None
    versions = ", ".join(f"{name.replace('_', '-')} {version}" for name, version in sorted(runtime.versions.items()))
    text = runtime.name + (f" ({versions})" if versions else "")
    if runtime.compute_type:
        text += f", compute type {runtime.compute_type}"
    text += f", one utterance at a time, {report.threads} thread(s)"
    if runtime.chunk_length is not None:
        text += f", {runtime.chunk_length} s windows"
    return text


def long_form_cuts(report: EvaluationReport) -> str:
    """How the runtime cut utterances longer than the window: at pauses (dsnn) or in fixed windows."""
    return "cut at pauses" if report.runtime.name == "dsnn" else f"{report.runtime.name}'s fixed windows"


def evaluation_table(report: EvaluationReport) -> Table:
    """WER/CER per level with S/D/I, nonzero parameters and RTFx (with its range and the speed against dense)."""
    table = Table(title=f"{report.model.path} on {report.data.path} (normaliser: {report.normalizer})",
                  title_justify="left", caption_justify="left")
    bounded = _bounded(report)
    sparse = _sparse_kernels(report)
    versus = compares_speed(report)
    columns = ("level", "WER %", "CER %", "sub", "del", "ins", "nonzero params", "RTFx", *(("vs dense",) if versus
                                                                                          else ()), "scored",
               "skipped")
    for column in columns + (("capped",) if bounded else ()) + (("sparse layers",) if sparse else ()):
        table.add_column(column, justify="left" if column == "level" else "right")
    for entry in report.levels:
        words = entry.words
        table.add_row(
            evaluated_level_label(entry), f"{100 * entry.wer:.2f}", f"{100 * entry.cer:.2f}",
            str(words.substitutions), str(words.deletions), str(words.insertions), f"{entry.nonzero_params:,}",
            rtfx_text(report, entry), *((versus_dense_text(report, entry),) if versus else ()),
            str(entry.utterances_scored), str(entry.utterances_skipped),
            *((str(entry.decodes_capped),) if bounded else ()), *((_sparse_count(report, entry),) if sparse else ()),
        )
    runtime = runtime_note(report)
    notes = [f"runtime: {runtime}" if runtime else None, UNTRAINED_NOTE if _has_untrained(report) else None,
             _kernels_caption(report) if sparse else None, timing_note(report)]
    table.caption = "\n".join(note for note in notes if note) or None
    return table


def _sparse_kernels(report: EvaluationReport) -> bool:
    """Whether the report ran with ``--kernels sparse`` or ``auto`` (then sparse layers are shown per level)."""
    return report.kernels.mode != "dense"


def _sparse_count(report: EvaluationReport, entry: LevelResult) -> str:
    """``sparse layers / layers with a sparse path`` of one level."""
    return f"{entry.kernels.sparse_layers}/{report.kernels.layers_with_sparse_path}"


def _kernels_caption(report: EvaluationReport) -> str:
    """One line on the kernels: mode, and which pruned layer types have no sparse path (they run dense)."""
    kernels = report.kernels
    text = f"kernels: {kernels.mode}"
    without = kernels.without_sparse_path or {}
    if without:
        text += "; pruned layers without a sparse path (run dense): " + ", ".join(
            f"{kind} x{count}" for kind, count in without.items())
    return text


def _bounded(report: EvaluationReport) -> bool:
    """Whether the report's decoding has a length bound (autoregressive models), so capped decodes are shown."""
    return report.decoding != "greedy-ctc"


def evaluation_markdown(report: EvaluationReport, speed: bool = True) -> str:
    """The evaluation report as a Markdown section (for CI summaries); ``speed=False`` leaves RTFx out."""
    versus = speed and compares_speed(report)
    speed_head = (" RTFx (range) |" if _ranged(report) else " RTFx |") if speed else ""
    lines = [
        f"### WER per sparsity level: `{report.model.path}`",
        "",
        f"Data: `{report.data.path}`; normaliser: `{report.normalizer}`; decoding: {report.decoding}; "
        f"threads: {report.threads}." + (f" Runtime: {runtime_note(report)}." if runtime_note(report) else ""),
        "",
        f"| level | WER % | CER % | sub | del | ins | nonzero params |{speed_head}{' vs dense |' if versus else ''}"
        " scored | skipped |",
        "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if speed else "") + ("---:|" if versus else "") + "---:|---:|",
    ]
    for e in report.levels:
        w = e.words
        label = evaluated_level_label(e).replace("*", "\\*")
        speed_cells = (f" {rtfx_text(report, e)} |" if speed else "") + (
            f" {versus_dense_text(report, e)} |" if versus else "")
        lines.append(
            f"| {label} | {100 * e.wer:.2f} | {100 * e.cer:.2f} | {w.substitutions} | {w.deletions} | "
            f"{w.insertions} | {e.nonzero_params:,} |{speed_cells} {e.utterances_scored} | {e.utterances_skipped} |"
        )
    note = timing_note(report) if speed else None
    if note:
        lines += ["", note + "."]
    if _sparse_kernels(report):
        counts = ", ".join(f"{level_label(e.level)}: {_sparse_count(report, e)}" for e in report.levels)
        lines += ["", f"Layers computing with sparse weights ({_kernels_caption(report)}): {counts}."]
    if _has_untrained(report):
        lines += ["", "\\" + UNTRAINED_NOTE + "."]
    if _bounded(report):
        capped = ", ".join(f"{level_label(e.level)}: {e.decodes_capped}" for e in report.levels)
        lines += ["", f"Decodes cut at the token bound (a looping decoder): {capped}."]
    if report.long_form is not None:
        long = report.long_form
        lines += ["", f"Decoded in {long.chunks} chunks (longer than the model's {long.window_seconds:g} s window, "
                      f"{long_form_cuts(report)}): {', '.join(f'`{u}`' for u in long.utterances)}."]
    if report.skipped:
        lines += ["", f"Skipped {len(report.skipped)} utterance(s):", ""]
        lines += [f"- `{s.id}`: {s.reason}" for s in report.skipped]
    if report.gates:
        lines += ["", "| gate | level | value % | limit % | result |", "|---|---|---:|---:|---|"]
        for g in report.gates:
            lines.append(f"| {g.gate} | {level_label(g.level)} | {g.value:.2f} | {g.limit:g} | "
                         f"{'pass' if g.passed else '**FAIL**'} |")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class DemoRow:
    """One level of the demo's table: WER of one-shot pruning and of the live fine-tune (None where the level was
    not trained live), and the shipped bundle's result, which also gives CER, size and speed."""

    level: float
    servable: bool
    wer_oneshot: float
    wer_live: float | None
    shipped: LevelResult

    def to_dict(self) -> dict[str, Any]:
        """The row of ``dsnn demo --json``."""
        span = self.shipped.rtfx_range
        return {"level": self.level, "servable": self.servable, "wer_oneshot": self.wer_oneshot,
                "wer_live": self.wer_live, "wer_shipped": self.shipped.wer, "cer_shipped": self.shipped.cer,
                "nonzero_params": self.shipped.nonzero_params, "rtfx": self.shipped.rtfx,
                "rtfx_range": list(span) if span is not None else None}


def demo_tables(rows: Sequence[DemoRow], shipped: EvaluationReport, files: dict[str, Any], live_column: str,
                notes: Sequence[str]) -> list[Table]:
    """The demo's result: WER one-shot / shipped bundle / live fine-tune per level, the shipped bundle's speed
    (RTFx range and, where the ranges do not overlap, the ratio to dense), and the files it wrote.

    A row whose ``servable`` is false is labelled "not servable"; ``notes`` become the table's caption lines.
    """
    versus = compares_speed(shipped)
    note = timing_note(shipped, "RTFx of the shipped bundle")
    table = Table(title=f"WER % per level on {shipped.data.utterances} embedded test utterances (speakers unseen in "
                        "training)", title_justify="left", caption="\n".join([*notes, *([note] if note else [])]),
                  caption_justify="left")
    for column in ("level", "one-shot", "shipped bundle", "CER % shipped", live_column, "nonzero params", "RTFx",
                   *(("vs dense",) if versus else ())):
        table.add_column(column, justify="left" if column == "level" else "right")
    for row in rows:
        label = level_label(row.level) + ("" if row.servable else " (not servable)")
        live = "not trained" if row.wer_live is None else f"{100 * row.wer_live:.2f}"
        table.add_row(label, f"{100 * row.wer_oneshot:.2f}", f"{100 * row.shipped.wer:.2f}",
                      f"{100 * row.shipped.cer:.2f}", live, f"{row.shipped.nonzero_params:,}",
                      rtfx_text(shipped, row.shipped),
                      *((versus_dense_text(shipped, row.shipped),) if versus else ()))
    listing = Table(title="files", title_justify="left", show_header=False)
    for name, path in files.items():
        listing.add_row(name, str(path))
    return [table, listing]


def demo_markdown(sections: Sequence[tuple[str, EvaluationReport]]) -> str:
    """The demo's reports as Markdown: one ``## title`` section with the evaluation table per report; RTFx only
    for the reports timed in several passes (one pass gives a figure with no spread, which misleads)."""
    return "\n".join(f"## {title}\n\n{evaluation_markdown(report, speed=_ranged(report))}"
                     for title, report in sections)
