"""`dsnn prune --granularity structured`: rank a model's structured groups and write nested group codes.

Groups are scored by the RMS of their member entries: of the weights themselves (``magnitude``), or of the
activation-weighted weights ``|w| * rms(input)`` (``wanda``: an FFN neuron's ``fc1`` row is weighted by the RMS of
the layer's inputs, its ``fc2`` column by the RMS of the neuron's own activation, so a neuron that rarely fires
ranks low however large its weights).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import tool_metadata
from .calibration.audio import load_calibration
from .calibration.statistics import collect_stats
from .core.bundle import Bundle
from .core.group_format import structured_bundle_parts
from .core.groups import compute_group_codes
from .core.scores import activation_scores
from .errors import UsageError
from .models.structure import model_groups, structured_families
from .sources.opener import Source

if TYPE_CHECKING:
    from .prune import PruneOptions, PruneProgress


def build_structured_bundle(source: Source, options: PruneOptions, progress: PruneProgress) -> Bundle:
    """The structured bundle of ``source``: group codes from one ranking, each set permuted into descending code
    order (every level a prefix), member tensors coded with the expanded weight codes."""
    if not source.runnable:
        raise UsageError(f"{source.path} carries no model description, so its structures (neurons, heads, channels) "
                         "are unknown", "structured pruning needs a model dsnn can rebuild (a dsnn checkpoint or a "
                         f"supported model directory) of a family that declares groups: "
                         f"{', '.join(structured_families())}; or use --granularity weight")
    if options.allocation == "per-row":
        raise UsageError("--allocation per-row compares single weights within a row; structured levels prune whole "
                         "groups", "use --allocation per-layer or global with --granularity structured")
    adapter = source.adapter()
    specs = model_groups(adapter, options.include, options.exclude)
    ranked = dict(source.tensors)
    pruning: dict[str, Any] = {"method": options.method, "allocation": options.allocation}
    if options.method == "wanda":
        assert options.calibration is not None
        progress.stage("reading calibration audio")
        audio = load_calibration(options.calibration, adapter, options.calibration_utterances)
        scored = sorted({m.tensor for spec in specs for m in spec.members if m.scored})
        progress.stage("calibrating")
        stats = collect_stats(adapter, audio, scored, progress.progress)
        params = dict(adapter.model.named_parameters())
        ranked.update({n: activation_scores(params[n], stats.rms[n]) for n in scored if n in stats.rms})
        pruning["calibration"] = audio.provenance()
        if stats.unobserved:
            pruning["magnitude_scored"] = list(stats.unobserved)
    progress.stage("ranking")
    group_codes = compute_group_codes(specs, ranked, list(options.levels), options.allocation)
    tensors, codes, structured = structured_bundle_parts(specs, source.tensors, group_codes, len(options.levels))
    metadata: dict[str, Any] = {
        "allocation": options.allocation,
        "selection": {"include": list(options.include), "exclude": list(options.exclude),
                      "defaults": "model-groups"},
        "source": source.provenance(physical=True),
        "tool": tool_metadata(),
        "command": options.command,
        "model": source.model_meta,
    }
    if options.method != "magnitude":
        metadata["pruning"] = pruning
    if source.hf_files:
        metadata["hf_files"] = source.hf_files
    return Bundle(tensors=tensors, codes=codes, levels=tuple(options.levels), metadata=metadata,
                  structured=structured)
