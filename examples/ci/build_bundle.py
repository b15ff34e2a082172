#!/usr/bin/env python3
"""Build a deployable DSNN bundle in a CI job: prune -> fine-tune from a recipe -> evaluate with quality gates ->
export the served levels. See examples/ci/README.md.

Every setting is a flag or, for CI, an environment variable (``--model`` / ``DSNN_MODEL``; a flag wins). The job:

1. ``dsnn prune MODEL --levels LEVELS`` -> ``OUT/pruned.safetensors``
2. ``dsnn finetune OUT/pruned.safetensors --recipe RECIPE --levels LEVELS`` -> ``OUT/bundle.safetensors``
3. ``dsnn evaluate OUT/bundle.safetensors --data EVAL_DATA --max-wer ... --max-wer-increase ...``
   -> ``OUT/reports/evaluate.json`` and ``.md`` (written even when a gate fails)
4. ``dsnn export`` of every served level -> ``OUT/export/model-<level>.<ext>`` plus ``OUT/export/served.json``

Every served level must be covered by a gate (checked before any work): nothing ungated ships. A failed gate stops
the job before the export, so ``OUT/export`` exists only when every gate passed; a failed export leaves none.

Exit codes (those of the failing ``dsnn`` stage, passed through): 0 every stage succeeded and the served levels
are exported; 1 failure (missing or corrupt input, I/O error, a stage killed); 2 usage error (a bad or missing
setting, a non-empty output directory, or a dsnn usage error); 3 a quality gate failed (reports written, nothing
exported); 130 interrupted. Errors are one ``error: ...`` line on stderr (plus an ``::error::`` annotation when
run by GitHub Actions).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_GATE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
PASSED_THROUGH = (EXIT_FAILURE, EXIT_USAGE, EXIT_GATE, EXIT_INTERRUPTED)
EXTENSIONS = {"safetensors": ".safetensors", "checkpoint": ".safetensors", "torch": ".pt", "onnx": ".onnx",
              "hf": "", "ct2": ""}


@dataclass(frozen=True)
class Setting:
    """One setting of the job: its flag, its environment variable, its default (None = required) and its help."""

    flag: str
    env: str
    default: str | None
    help: str


SETTINGS = (
    Setting("--model", "DSNN_MODEL", None, "dense checkpoint to prune (.safetensors, .pt, or a HF directory)"),
    Setting("--recipe", "DSNN_RECIPE", None, "fine-tuning recipe (YAML); its levels and output are overridden"),
    Setting("--eval-data", "DSNN_EVAL_DATA", None, "evaluation manifest (NeMo JSONL, Kaldi dir or audiofolder)"),
    Setting("--levels", "DSNN_LEVELS", None, "sparse levels to prune and train, e.g. 0.5,0.7,0.9"),
    Setting("--serve", "DSNN_SERVE", "all", "levels to export, e.g. dense,0.5,0.7 ('all': dense + every level)"),
    Setting("--max-wer", "DSNN_MAX_WER", "", "gates LEVEL:PCT separated by spaces, e.g. 'dense:35 0.7:50'"),
    Setting("--max-wer-increase", "DSNN_MAX_WER_INCREASE", "", "gates LEVEL:PCT (WER points above dense)"),
    Setting("--export-format", "DSNN_EXPORT_FORMAT", "safetensors", "|".join(EXTENSIONS)),
    Setting("--out", "DSNN_OUT", "dsnn-out", "output directory (must be absent or empty)"),
    Setting("--prune-args", "DSNN_PRUNE_ARGS", "", "extra dsnn prune arguments, e.g. '--allocation global'"),
    Setting("--finetune-args", "DSNN_FINETUNE_ARGS", "", "extra dsnn finetune arguments, e.g. '--steps 600'"),
    Setting("--evaluate-args", "DSNN_EVALUATE_ARGS", "", "extra dsnn evaluate arguments, e.g. '--batch-frames 20000'"),
    Setting("--export-args", "DSNN_EXPORT_ARGS", "", "extra dsnn export arguments, e.g. '--compress'"),
)


class JobError(Exception):
    """A failure that ends the job with ``code`` after one ``error:`` line."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Gate:
    """A parsed ``LEVEL:PCT`` gate; ``level`` None means every evaluated level (``all``)."""

    kind: str
    spec: str
    level: float | None


def _level(text: str, what: str) -> float:
    """A level spelled as dsnn accepts it (``0.7``, ``70%``, ``dense``), checked to be in [0, 1)."""
    word = text.strip().lower()
    try:
        value = 0.0 if word == "dense" else float(word[:-1]) / 100 if word.endswith("%") else float(word)
    except ValueError:
        raise JobError(f"{what}: level {text!r} is not a number (use e.g. 0.7 or dense)", EXIT_USAGE) from None
    if not (math.isfinite(value) and 0.0 <= value < 1.0):
        raise JobError(f"{what}: level {text!r} is outside [0, 1)", EXIT_USAGE)
    return value


def _levels(text: str, what: str) -> list[float]:
    """A comma list of levels."""
    parts = [p for p in text.split(",") if p.strip()]
    if not parts:
        raise JobError(f"{what} is empty (give levels such as 0.5,0.7)", EXIT_USAGE)
    return [_level(p, what) for p in parts]


def _gates(text: str, kind: str, what: str) -> list[Gate]:
    """Space-separated ``LEVEL:PCT`` gates."""
    gates = []
    for spec in text.split():
        level, sep, pct = spec.partition(":")
        try:
            limit = float(pct.rstrip("%")) if sep else math.nan
        except ValueError:
            limit = math.nan
        if not math.isfinite(limit):
            raise JobError(f"{what}: {spec!r} is not LEVEL:PCT (e.g. 0.7:40)", EXIT_USAGE)
        all_levels = level.strip().lower() in ("all", "*")
        gates.append(Gate(kind, spec, None if all_levels else _level(level, what)))
    return gates


def _same(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6


def _label(level: float) -> str:
    """dsnn's label of a level: ``dense`` or ``0.7``."""
    return "dense" if _same(level, 0.0) else f"{level:g}"


def _ungated(levels: list[float], gates: list[Gate]) -> list[float]:
    """Served levels that no gate covers; dense needs a --max-wer gate (its increase over itself is always 0)."""
    def covered(level: float) -> bool:
        kinds = ("max-wer",) if _same(level, 0.0) else ("max-wer", "max-wer-increase")
        return any(g.kind in kinds and (g.level is None or _same(g.level, level)) for g in gates)
    return [lv for lv in levels if not covered(lv)]


def _dsnn(stage: str, args: list[str], capture: Path | None = None) -> None:
    """Run one dsnn command (the interpreter running this script, so the same installation); stop on failure."""
    command = [sys.executable, "-m", "dsnn_compress", *args]
    _annotate("group", f"dsnn {stage}")
    print(f"+ dsnn {shlex.join(args)}", flush=True)
    try:
        result = subprocess.run(command, stdout=subprocess.PIPE if capture else None, text=True)
    finally:
        _annotate("endgroup", "")
    code = result.returncode
    if code != EXIT_OK:
        reason = {EXIT_GATE: "a quality gate failed", EXIT_USAGE: "usage error", EXIT_INTERRUPTED: "interrupted"}
        raise JobError(f"{stage} failed with exit {code} ({reason.get(code, 'failure')})",
                       code if code in PASSED_THROUGH else EXIT_FAILURE)
    if capture:
        capture.write_text(result.stdout, encoding="utf-8")


def _annotate(command: str, text: str) -> None:
    """A GitHub Actions workflow command (log group, error annotation); nothing elsewhere."""
    if os.environ.get("GITHUB_ACTIONS") == "true":
        text = text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")  # the commands' escaping
        print(f"::{command}::{text}", flush=True)


def _sha256(path: Path) -> str | None:
    if not path.is_file():
        return None  # hf / ct2 exports are directories
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _summarise(markdown: Path) -> None:
    """Append the evaluation report to the GitHub Actions job summary, when there is one."""
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary and markdown.is_file():
        with open(summary, "a", encoding="utf-8") as f:
            f.write(markdown.read_text(encoding="utf-8") + "\n")


def _served_record(report_path: Path, served: list[float], files: dict[float, Path], bundle: Path, fmt: str) -> dict:
    """``served.json``: which file is which level, its checksum, and the WER/CER and gates it passed."""
    report = json.loads(report_path.read_text(encoding="utf-8"))
    entries = []
    for level in served:
        scores = next(e for e in report["levels"] if _same(e["level"], level))
        entries.append({"level": level, "label": _label(level), "path": files[level].name,
                        "sha256": _sha256(files[level]), "wer": scores["wer"], "cer": scores["cer"],
                        "gates": [g for g in report["gates"] if _same(g["level"], level)]})
    return {"bundle": bundle.name, "bundle_sha256": _sha256(bundle), "format": fmt,
            "report": "../reports/evaluate.json", "levels": entries}


def _parse(argv: list[str]) -> dict[str, str]:
    """Flags over environment variables over defaults; a missing required setting is a usage error."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for s in SETTINGS:
        default = "required" if s.default is None else repr(s.default)
        parser.add_argument(s.flag, help=f"{s.help} [env {s.env}; default {default}]")
    flags = vars(parser.parse_args(argv))
    values = {}
    for s in SETTINGS:
        value = flags[s.flag[2:].replace("-", "_")]
        value = value if value is not None else os.environ.get(s.env, s.default)
        if value is None or (s.default is None and not value.strip()):
            raise JobError(f"{s.env} (or {s.flag}) is required: {s.help}", EXIT_USAGE)
        values[s.env] = value
    return values


def run(argv: list[str]) -> None:
    """The whole job; raises JobError on the first failure."""
    cfg = _parse(argv)
    levels = [lv for lv in _levels(cfg["DSNN_LEVELS"], "DSNN_LEVELS") if not _same(lv, 0.0)]  # dense is implicit
    if not levels:
        raise JobError("DSNN_LEVELS names no sparse level (give e.g. 0.5,0.7,0.9)", EXIT_USAGE)
    serve = cfg["DSNN_SERVE"].strip().lower()
    served = [0.0, *levels] if serve == "all" else sorted(set(_levels(cfg["DSNN_SERVE"], "DSNN_SERVE")))
    gates = _gates(cfg["DSNN_MAX_WER"], "max-wer", "DSNN_MAX_WER")
    gates += _gates(cfg["DSNN_MAX_WER_INCREASE"], "max-wer-increase", "DSNN_MAX_WER_INCREASE")
    evaluated = {0.0, *levels, *served, *(g.level for g in gates if g.level is not None)}
    if (top := max(evaluated)) > max(levels) + 1e-6:
        raise JobError(f"level {top:g} (DSNN_SERVE or a gate) is above the largest trained level {max(levels):g}",
                       EXIT_USAGE)
    if ungated := _ungated(served, gates):
        raise JobError(f"no gate covers served level(s) {', '.join(map(_label, ungated))}: add one to DSNN_MAX_WER "
                       "(dense needs one there) or DSNN_MAX_WER_INCREASE, or stop serving them", EXIT_USAGE)
    fmt = cfg["DSNN_EXPORT_FORMAT"]
    if fmt not in EXTENSIONS:
        raise JobError(f"DSNN_EXPORT_FORMAT {fmt!r} is not one of {', '.join(EXTENSIONS)}", EXIT_USAGE)
    extra = {k: shlex.split(cfg[k]) for k in ("DSNN_PRUNE_ARGS", "DSNN_FINETUNE_ARGS", "DSNN_EVALUATE_ARGS",
                                              "DSNN_EXPORT_ARGS")}
    out = Path(cfg["DSNN_OUT"])
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise JobError(f"output directory {out} is not an empty directory: remove it or choose another DSNN_OUT "
                       "(a stale export must never pass for this run's)", EXIT_USAGE)
    for key in ("DSNN_MODEL", "DSNN_RECIPE", "DSNN_EVAL_DATA"):
        if not Path(cfg[key]).exists():
            raise JobError(f"{key}: {cfg[key]} does not exist", EXIT_FAILURE)

    reports = out / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    pruned, bundle = out / "pruned.safetensors", out / "bundle.safetensors"
    level_list = ",".join(f"{lv:g}" for lv in levels)
    _dsnn("prune", ["prune", cfg["DSNN_MODEL"], "--levels", level_list, "-o", str(pruned), "--json",
                    *extra["DSNN_PRUNE_ARGS"]], capture=reports / "prune.json")
    _dsnn("finetune", ["finetune", str(pruned), "--recipe", cfg["DSNN_RECIPE"], "--levels", level_list,
                       "-o", str(bundle), "--json", *extra["DSNN_FINETUNE_ARGS"]], capture=reports / "finetune.json")

    gate_args = [arg for g in gates for arg in (f"--{g.kind}", g.spec)]
    markdown = reports / "evaluate.md"
    try:
        _dsnn("evaluate", ["evaluate", str(bundle), "--data", cfg["DSNN_EVAL_DATA"], "--levels",
                           ",".join(f"{lv:g}" for lv in sorted(evaluated)), "--json", str(reports / "evaluate.json"),
                           "--markdown", str(markdown), *gate_args, *extra["DSNN_EVALUATE_ARGS"]])
    except JobError as exc:
        _summarise(markdown)
        written = f"; reports in {reports}" if (reports / "evaluate.json").is_file() else ""
        raise JobError(f"{exc}; nothing exported{written}", exc.code) from None
    _summarise(markdown)

    staging, export = out / ".export-partial", out / "export"
    staging.mkdir()
    try:
        files = {}
        for level in served:
            files[level] = staging / f"model-{_label(level)}{EXTENSIONS[fmt]}"
            _dsnn("export", ["export", str(bundle), "--level", f"{level:g}", "-o", str(files[level]), "--format", fmt,
                             *extra["DSNN_EXPORT_ARGS"]])
        record = _served_record(reports / "evaluate.json", served, files, bundle, fmt)
        (staging / "served.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        staging.rename(export)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"served levels {', '.join(map(_label, served))} exported to {export}")


def main(argv: list[str] | None = None) -> int:
    """Run the job; returns the exit code."""
    try:
        run(sys.argv[1:] if argv is None else argv)
    except JobError as exc:
        _annotate("error title=dsnn bundle job", str(exc))
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
