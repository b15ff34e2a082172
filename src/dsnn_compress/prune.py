"""`dsnn prune`: dense checkpoint -> DSNN bundle with nested keep codes from one fixed score per weight.

Scores: magnitude, or Wanda's ``|w| * rms(input)`` from calibration audio; comparison groups: ``per-row``,
``per-layer``, ``global``; optional per-block sparsity profiles (``owl``, ``sensitivity``). Every combination gives
nested levels by construction (``core.scores``, ``docs/calibration.md``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import tool_metadata
from .atomic import check_output_path
from .calibration.audio import DEFAULT_UTTERANCES, CalibrationAudio, load_calibration
from .calibration.sensitivity import DEFAULT_UTTERANCES as SENSITIVITY_UTTERANCES
from .calibration.sensitivity import block_costs, sensitivity_grid
from .calibration.statistics import collect_stats
from .core.bundle import Bundle, save_bundle
from .core.finite import describe_nonfinite, nonfinite_tensors
from .core.groups import check_granularity
from .core.levels import validate_levels
from .core.masks import ALLOCATIONS, compute_codes
from .core.scores import (
    OWL_LAMBDA,
    OWL_M,
    activation_scores,
    blocks,
    check_method,
    check_profile,
    greedy_profile,
    needs_calibration,
    offset_profile,
    owl_offsets,
    scored_codes,
    tensor_profile,
)
from .core.selection import select_prunable
from .errors import DsnnError, UsageError
from .models.base import ModelAdapter
from .sources.opener import Source, open_source
from .structured_prune import DEPTH_ORDERS, build_structured_bundle


@dataclass(frozen=True)
class PruneOptions:
    """What ``dsnn prune`` builds: levels, how weights are scored and compared, and what is pruned."""

    levels: Sequence[float]
    allocation: str = "per-layer"
    """Comparison group: ``per-layer``, ``global`` or ``per-row``."""
    granularity: str = "weight"
    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    method: str = "magnitude"
    """Score: ``magnitude`` or ``wanda`` (needs ``calibration``)."""
    profile: str = "uniform"
    """Per-block sparsities: ``uniform``, ``owl`` or ``sensitivity`` (needs ``calibration``)."""
    calibration: Path | None = None
    """Audio-only manifest the model runs on to score weights (transcripts not needed)."""
    calibration_utterances: int = DEFAULT_UTTERANCES
    sensitivity_utterances: int = SENSITIVITY_UTTERANCES
    owl_m: float = OWL_M
    owl_lambda: float = OWL_LAMBDA
    depth: str | None = None
    """Decoder layers dropped per level, ``LEVEL:N,...`` or ``auto`` (structured granularity)."""
    encoder_depth: str | None = None
    """Encoder layers dropped per level, the same way."""
    depth_order: str = "auto"
    """Which layers go first: ``importance`` (measured on calibration audio), ``first-last`` (distil-whisper: keep
    the first and the last layer longest), ``auto`` (importance when calibration audio is given)."""
    command: Any = None
    """The command line recorded in the bundle."""

    def check(self) -> None:
        """UsageError (exit 2) for unknown names and combinations that cannot work, before any work."""
        validate_levels(list(self.levels))
        check_granularity(self.granularity)
        if self.allocation not in ALLOCATIONS:
            raise UsageError(f"unknown allocation {self.allocation!r}", f"choose one of {', '.join(ALLOCATIONS)}")
        check_method(self.method)
        check_profile(self.profile)
        if needs_calibration(self.method, self.profile) and self.calibration is None:
            what = f"--method {self.method}" if self.method != "magnitude" else f"--profile {self.profile}"
            raise UsageError(f"{what} scores weights from activations, which needs calibration audio",
                             "add --calibration MANIFEST (audio only; transcripts are not needed)")
        if self.profile != "uniform" and self.allocation == "global":
            raise UsageError(f"--profile {self.profile} sets each block's sparsity, which global allocation decides "
                             "by one threshold", "use --allocation per-layer or per-row with a profile")
        if self.granularity == "structured" and self.profile != "uniform":
            raise UsageError("--profile applies to weight granularity", "drop --profile, or use --granularity weight")
        if (self.depth or self.encoder_depth) and self.granularity != "structured":
            raise UsageError("depth levels (--depth, --encoder-depth) drop whole layers: they need --granularity "
                             "structured", "add --granularity structured")
        if self.depth_order not in DEPTH_ORDERS:
            raise UsageError(f"unknown --depth-order {self.depth_order!r}", f"choose one of {', '.join(DEPTH_ORDERS)}")
        measured = self.depth_order == "importance" or "auto" in (self.depth, self.encoder_depth)
        if measured and self.calibration is None:
            what = "--depth-order importance" if self.depth_order == "importance" else "--depth auto"
            raise UsageError(f"{what} measures each layer's importance on calibration audio",
                             "add --calibration MANIFEST (audio only), or give --depth LEVEL:N with --depth-order "
                             "first-last")


@dataclass
class PruneProgress:
    """Callbacks of a prune run: ``stage(name)`` (loading, calibrating, ranking, writing...), ``progress(done,
    total)`` within a stage, ``note(text)`` for remarks to the user."""

    stage: Callable[[str], None] = field(default=lambda _name: None)
    progress: Callable[[int, int], None] = field(default=lambda _done, _total: None)
    note: Callable[[str], None] = field(default=lambda _text: None)


def build_bundle(source: Source, options: PruneOptions, progress: PruneProgress | None = None) -> Bundle:
    """Score the selected tensors of ``source`` once and encode every level as keep codes.

    Without ``include`` patterns, a source that describes its model prunes the model's own default set
    (``adapter.default_prunable()``); any other source prunes what the generic name rules select.
    ``granularity="structured"`` ranks the family's structured groups instead (``docs/structured.md``).
    """
    options.check()
    report = progress or PruneProgress()
    levels = validate_levels(list(options.levels))
    calibrated = needs_calibration(options.method, options.profile)
    if calibrated and not source.runnable:
        raise UsageError(f"{source.path} carries no model description, so dsnn cannot run it on calibration audio",
                         "prune a model dsnn can rebuild (a dsnn checkpoint or a supported model directory), or use "
                         "--method magnitude --profile uniform")
    if check_granularity(options.granularity) == "structured":
        return build_structured_bundle(source, options, report)
    # the model is built only when needed: explicit --include patterns prune by name, without the model's code
    adapter = source.adapter() if source.runnable and (calibrated or not options.include) else None
    defaults = None if options.include or adapter is None else adapter.default_prunable()
    names = select_prunable(source.tensors, options.include, options.exclude, defaults)
    check_finite(source.tensors)
    pruning: dict[str, Any] = {"method": options.method, "allocation": options.allocation, "profile": options.profile}
    if not calibrated:
        report.stage("ranking")
        codes = compute_codes({n: source.tensors[n] for n in names}, levels, options.allocation, report.progress)
    else:
        assert adapter is not None and options.calibration is not None
        audio = calibration_audio(adapter, options, report)
        scores = weight_scores(adapter, audio, names, options, report, pruning)
        report.stage("ranking")
        codes = profiled_codes(adapter, audio, scores, levels, options, report, pruning)
        pruning["calibration"] = audio.provenance()
    metadata: dict[str, Any] = {
        "allocation": options.allocation,
        "selection": {"include": list(options.include), "exclude": list(options.exclude),
                      "defaults": "model" if defaults is not None else "name-rules"},
        "source": source.provenance(physical=True),
        "tool": tool_metadata(),
        "command": options.command,
    }
    if options.method != "magnitude" or options.profile != "uniform" or options.allocation == "per-row":
        metadata["pruning"] = pruning
    if source.model_meta is not None:
        metadata["model"] = source.model_meta
    if source.hf_files:
        metadata["hf_files"] = source.hf_files
    return Bundle(tensors=dict(source.tensors), codes=codes, levels=levels, metadata=metadata)


def calibration_audio(adapter: ModelAdapter, options: PruneOptions, report: PruneProgress) -> CalibrationAudio:
    """The calibration clips of ``options``, with a note about skipped ones."""
    report.stage("reading calibration audio")
    assert options.calibration is not None
    audio = load_calibration(options.calibration, adapter, options.calibration_utterances)
    if audio.skipped:
        report.note(f"skipped {len(audio.skipped)} calibration utterance(s) the model cannot take "
                    f"(first: {audio.skipped[0]['id']}: {audio.skipped[0]['reason']})")
    return audio


def weight_scores(adapter: ModelAdapter, audio: CalibrationAudio, names: Sequence[str], options: PruneOptions,
                  report: PruneProgress, pruning: dict[str, Any]) -> dict[str, torch.Tensor]:
    """One score per weight of every tensor in ``names``: Wanda's from activation statistics, or magnitude."""
    params = dict(adapter.model.named_parameters())
    if options.method == "magnitude":
        return {n: params[n].detach().float().abs() for n in names}
    report.stage("calibrating")
    stats = collect_stats(adapter, audio, names, report.progress)
    if stats.unobserved:
        report.note(f"{len(stats.unobserved)} pruned tensor(s) are not Linear/Conv weights whose inputs can be "
                    f"observed; they are scored by magnitude ({', '.join(stats.unobserved[:3])}"
                    f"{' ...' if len(stats.unobserved) > 3 else ''})")
        pruning["magnitude_scored"] = list(stats.unobserved)
        if options.allocation == "global":
            raise UsageError("--allocation global compares scores across tensors, but some pruned tensors have no "
                             "activation statistics (their magnitudes would be compared with Wanda scores)",
                             "use --allocation per-row or per-layer, or --exclude those tensors")
    return {n: activation_scores(params[n], stats.rms[n]) if n in stats.rms else params[n].detach().float().abs()
            for n in names}


def profiled_codes(adapter: ModelAdapter, audio: CalibrationAudio, scores: Mapping[str, torch.Tensor],
                   levels: Sequence[float], options: PruneOptions, report: PruneProgress,
                   pruning: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Keep codes of ``scores`` under the profile of ``options`` (block sparsities recorded in ``pruning``)."""
    if options.profile == "uniform":
        return scored_codes(scores, list(levels), options.allocation)
    sizes = {block: sum(scores[n].numel() for n in members) for block, members in blocks(list(scores)).items()}
    if options.profile == "owl":
        offsets = owl_offsets(scores, options.owl_m, options.owl_lambda)
        per_block = offset_profile(offsets, sizes, levels)
        pruning["owl"] = {"m": options.owl_m, "lambda": options.owl_lambda}
    else:
        report.stage("measuring block sensitivity")
        grid = sensitivity_grid(levels)
        costs = block_costs(adapter, audio, scores, options.allocation, grid, options.sensitivity_utterances,
                            report.progress)
        per_block = greedy_profile(costs, sizes, levels)
        pruning["sensitivity"] = {"utterances": min(options.sensitivity_utterances, len(audio.ids)),
                                  "grid": grid, "costs": {b: [c for _, c in points] for b, points in costs.items()}}
    pruning["blocks"] = {b: [round(s, 6) for s in values] for b, values in per_block.items()}
    return scored_codes(scores, tensor_profile(per_block, list(scores)), options.allocation)


def prune_checkpoint(checkpoint: str | Path, output: str | Path, options: PruneOptions, *, force: bool = True,
                     verify: bool = True, progress: PruneProgress | None = None) -> Bundle:
    """Open the dense ``checkpoint``, build the bundle of ``options`` and write it atomically to ``output``.

    The options and the output path are checked before any work (an existing file is replaced only with
    ``force``). ``verify`` checks the checksums of a checkpoint written by dsnn (an exported level) before it is
    pruned. ``progress`` is told the stages (``loading``, ``calibrating``, ``ranking``, ``writing``...) as the work
    proceeds, progress within them, and notes for the user (ignored non-tensor entries, skipped calibration clips).
    """
    report = progress or PruneProgress()
    options.check()
    check_output_path(output, force)
    report.stage("loading")
    source = open_source(checkpoint, allow_bundle=False, role="checkpoint", verify=verify)
    if source.skipped_entries:
        report.note(f"ignored {len(source.skipped_entries)} non-tensor entries of the checkpoint")
    bundle = build_bundle(source, options, report)
    report.stage("writing")
    save_bundle(bundle, output)
    return bundle


def check_finite(tensors: Mapping[str, torch.Tensor]) -> None:
    """Refuse a checkpoint with NaN or infinite values in any floating-point tensor, pruned or not.

    Every tensor is copied into the bundle, so a NaN norm or bias would make every level of it output garbage
    (``evaluate`` reports 100 % WER); the error names the tensors before any ranking work.
    """
    bad = nonfinite_tensors(tensors)
    if bad:
        raise DsnnError(f"the checkpoint holds NaN/inf values in {describe_nonfinite(bad, tensors)}, so every level "
                        "of its bundle would output garbage",
                        "fix the checkpoint (a diverged training run? restore an earlier one) and prune again; "
                        "--exclude does not help, every tensor is copied into the bundle")
