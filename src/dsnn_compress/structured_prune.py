"""`dsnn prune --granularity structured`: rank a model's structured groups and write nested group codes.

Groups are scored by the RMS of their member entries: of the weights themselves (``magnitude``), or of the
activation-weighted weights ``|w| * rms(input)`` (``wanda``: an FFN neuron's ``fc1`` row is weighted by the RMS of
the layer's inputs, its ``fc2`` column by the RMS of the neuron's own activation, so a neuron that rarely fires
ranks low however large its weights).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import tool_metadata
from .calibration.audio import CalibrationAudio, load_calibration
from .calibration.depth import full_order, importance_order
from .calibration.statistics import collect_stats
from .core.bundle import Bundle
from .core.depth import StackDepth, apply_depth, auto_counts, first_last_order, parse_depth
from .core.group_format import structured_bundle_parts
from .core.groups import compute_group_codes
from .core.levels import level_label
from .core.scores import activation_scores
from .errors import UsageError
from .models.base import ModelAdapter
from .models.structure import family_of, model_groups, structured_families
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
    audio = None
    if options.calibration is not None and (options.method == "wanda" or measured_depth(options)):
        progress.stage("reading calibration audio")
        audio = load_calibration(options.calibration, adapter, options.calibration_utterances)
    if options.method == "wanda":
        assert audio is not None
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
    depth = depth_plan(adapter, options, progress, audio) if options.depth or options.encoder_depth else None
    if depth:
        codes = apply_depth(depth, tensors, codes)
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
    if depth and audio is not None and measured_depth(options):
        metadata["depth_calibration"] = audio.provenance()
    if source.hf_files:
        metadata["hf_files"] = source.hf_files
    return Bundle(tensors=tensors, codes=codes, levels=tuple(options.levels), metadata=metadata,
                  structured=structured, depth=depth)


DEPTH_ORDERS = ("auto", "importance", "first-last")
"""``--depth-order`` choices: which layers of a stack go first."""


def measured_depth(options: PruneOptions) -> bool:
    """True when the depth plan measures layer importance on calibration audio."""
    if not (options.depth or options.encoder_depth):
        return False
    return options.depth_order == "importance" or (options.depth_order == "auto" and options.calibration is not None)


def depth_plan(adapter: ModelAdapter, options: PruneOptions, progress: PruneProgress,
               audio: CalibrationAudio | None) -> list[StackDepth]:
    """The nested drop plan of every stack named by ``--depth`` (decoder) and ``--encoder-depth`` (encoder).

    Counts come from ``LEVEL:N`` lists (or ``auto``: ``floor(level * layers)``); the order from the measured cost of
    skipping layers (greedy, each layer measured together with those already gone) or distil-whisper's rule of
    keeping the first and the last layer longest. Progress notes say what was chosen.
    """
    hook = getattr(family_of(adapter), "depth_stacks", None)
    if not callable(hook):
        raise UsageError(f"depth levels are not available for {adapter.family} models (the family declares no "
                         "droppable layer stacks)", "drop --depth/--encoder-depth (whisper models support them)")
    sizes = hook(adapter)
    wanted = {"decoder": options.depth, "encoder": options.encoder_depth}
    stacks = []
    for side, spec in wanted.items():
        if not spec:
            continue
        name = next(n for n in sizes if f".{side}." in n)
        layers = sizes[name]
        option = "--depth" if side == "decoder" else "--encoder-depth"
        counts = auto_counts(options.levels, layers) if spec == "auto" else parse_depth(spec, options.levels,
                                                                                        layers, option)
        if measured_depth(options):
            assert audio is not None
            progress.stage(f"measuring {side} layer importance")
            chosen, costs = importance_order(adapter, audio, name, layers, max(counts),
                                             options.sensitivity_utterances, progress.progress)
            order, how = full_order(chosen, layers), "importance"
            measured = ", ".join(f"{layer} ({cost:.3g})" for layer, cost in zip(chosen, costs))
            progress.note(f"{side} layers dropped first by measured importance (cumulative calibration KL): "
                          f"{measured or 'none'}")
        else:
            order, how = first_last_order(layers), "first-last"
        stack = StackDepth(name, layers, order, counts, how)
        stack.check(len(options.levels))
        shown = ", ".join(f"{level_label(lv)}: {', '.join(map(str, stack.order[:d])) or '-'}"
                          for lv, d in zip(options.levels, counts))
        progress.note(f"{side} layers dropped per level ({how} order): {shown}")
        stacks.append(stack)
    return stacks
