"""The model a fine-tuning run starts from: built fresh, or loaded from a bundle, checkpoint or model directory,
with its initial keep codes (and the codes a gradual schedule asks for at a step)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core.depth import StackDepth
from ..core.groups import GroupSpec, compute_group_codes, expand_codes
from ..core.masks import codes_at_sparsities, compute_codes
from ..core.schedule import scheduled_levels
from ..core.selection import select_prunable
from ..data.manifest import read_manifest
from ..data.text import CharTokenizer, normalize_text
from ..errors import DsnnError, UsageError
from ..models.base import ModelAdapter
from ..models.registry import new_adapter
from ..models.structure import model_groups
from ..sources.opener import SourceKind, open_source
from .recipe import Recipe


@dataclass
class ModelSetup:
    """The live model, its keep codes and where they came from."""

    adapter: ModelAdapter
    codes: dict[str, torch.Tensor]
    levels: tuple[float, ...]
    source: dict[str, Any]
    base_metadata: dict[str, Any] = field(default_factory=dict)
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    """The source's dtype per tensor: the written bundle keeps them (the live model trains in fp32)."""
    groups: list[GroupSpec] | None = None
    """Structured runs: the group sets whose codes the weight codes expand (None: weight granularity)."""
    allocation: str = "per-layer"
    depth: list[StackDepth] | None = None
    """Depth bundles: the layers each level drops (kept as the bundle has them)."""
    group_codes: dict[str, torch.Tensor] | None = None
    """Depth bundles: the structured group codes (the weight codes of dropped layers are capped, so they cannot be
    recovered from them)."""


def build_model(recipe: Recipe, verify: bool = True) -> ModelSetup:
    """Create the model named by the recipe (``model.init`` unset) or open ``model.init``, with its initial codes.

    A bundle brings its own levels and codes (recipe levels must agree); a dsnn checkpoint or a supported model
    directory is pruned here at the recipe's levels. ``verify`` checks the checksums ``model.init`` carries.
    """
    init = recipe.model.init
    levels: tuple[float, ...] = tuple(recipe.levels or ())
    if init is None:
        texts = [normalize_text(u.text, recipe.model.normalizer) for u in read_manifest(recipe.data.train)]
        vocabulary = CharTokenizer.build(texts).vocabulary
        torch.manual_seed(recipe.training.seed)
        adapter = new_adapter(recipe.model.family, vocabulary, recipe.model.size, dict(recipe.model.config),
                              normalizer=recipe.model.normalizer)
        source = {"file": None, "kind": "random-init", "family": recipe.model.family, "size": recipe.model.size}
        groups = _groups(adapter, recipe, levels)
        codes = initial_codes(adapter, levels, recipe, groups) if levels else {}
        return ModelSetup(adapter, codes, levels, source, groups=groups, allocation=recipe.allocation)
    if not Path(init).exists():
        raise DsnnError(f"model.init {init} does not exist",
                        "point it at a bundle, a dsnn checkpoint or a Hugging Face model directory")
    opened = open_source(init, verify=verify)
    # the directory families' descriptions carry the recipe's normaliser; a dsnn checkpoint keeps its own
    normalizer = recipe.model.normalizer if opened.kind == SourceKind.HF_DIR else None
    adapter = opened.adapter(normalizer, purpose="finetune", audio_ctx=recipe.model.audio_ctx)
    if opened.bundle is None:
        groups = _groups(adapter, recipe, levels)
        codes = initial_codes(adapter, levels, recipe, groups) if levels else {}
        return ModelSetup(adapter, codes, levels, opened.provenance(), dtypes=_dtypes(opened.tensors), groups=groups,
                          allocation=recipe.allocation)
    bundle = opened.bundle
    if recipe.levels is not None and tuple(recipe.levels) != bundle.levels:
        raise UsageError(
            f"recipe levels {list(recipe.levels)} differ from the bundle's {list(bundle.levels)}",
            "drop `levels` from the recipe to use the bundle's, or prune again with the levels you want",
        )
    if recipe.schedule.enabled and bundle.depth:
        raise UsageError("the gradual schedule recomputes the codes, which would undo this bundle's dropped layers",
                         "set schedule.enabled: false to fine-tune depth levels")
    if recipe.schedule.enabled and "pruning" in bundle.metadata:
        pruning = bundle.metadata["pruning"]
        raise UsageError(f"the gradual schedule recomputes the codes from weight magnitudes, which would discard this "
                         f"bundle's {pruning.get('method')} scores ({pruning.get('allocation')}, profile "
                         f"{pruning.get('profile')})", "set schedule.enabled: false to fine-tune these levels, or "
                         "prune with --method magnitude --profile uniform for a gradual schedule")
    base = {k: bundle.metadata.get(k) for k in ("allocation", "selection", "source", "pruning")
            if k in bundle.metadata}
    setup = ModelSetup(adapter, dict(bundle.codes), bundle.levels, opened.provenance(), base,
                       dtypes=_dtypes(opened.tensors),
                       groups=bundle.structured.specs if bundle.structured is not None else None,
                       allocation=str(bundle.metadata.get("allocation", recipe.allocation)),
                       depth=bundle.depth,
                       group_codes=dict(bundle.structured.codes) if bundle.structured is not None else None)
    if recipe.schedule.enabled:
        setup.codes = scheduled_codes(adapter, setup.codes, setup.levels, recipe, 0, setup.groups, setup.allocation)
    return setup


def _dtypes(tensors: dict[str, torch.Tensor]) -> dict[str, torch.dtype]:
    return {name: tensor.dtype for name, tensor in tensors.items()}


def _groups(adapter: ModelAdapter, recipe: Recipe, levels: tuple[float, ...]) -> list[GroupSpec] | None:
    """The structured group sets a run with ``granularity: structured`` prunes (None for weight granularity)."""
    if recipe.granularity != "structured" or not levels:
        return None
    return model_groups(adapter, recipe.include, recipe.exclude)


def initial_codes(adapter: ModelAdapter, levels: tuple[float, ...], recipe: Recipe,
                  groups: list[GroupSpec] | None = None) -> dict[str, torch.Tensor]:
    """Codes of the recipe's prunable set at ``levels`` (at step 0 of the gradual schedule when it is enabled);
    with ``groups``, the expanded codes of the structured groups."""
    if groups is not None:
        return scheduled_codes(adapter, {}, levels, recipe, 0, groups, recipe.allocation)
    params = dict(adapter.model.named_parameters())
    names = select_prunable(params, recipe.include, recipe.exclude,
                            None if recipe.include else adapter.default_prunable())
    tensors = {n: params[n].detach() for n in names}
    if recipe.schedule.enabled:
        return codes_at_sparsities(tensors, scheduled_levels(levels, 0, recipe.schedule), recipe.allocation)
    return compute_codes(tensors, levels, recipe.allocation)


def scheduled_codes(adapter: ModelAdapter, codes: dict[str, torch.Tensor], levels: Sequence[float], recipe: Recipe,
                    step: int, groups: list[GroupSpec] | None = None,
                    allocation: str | None = None) -> dict[str, torch.Tensor]:
    """Codes recomputed from the current magnitudes at the gradual schedule's sparsities for ``step`` (nested).

    With ``groups`` the *group* codes are recomputed (same RMS scores and allocation rule as ``dsnn prune``) and
    expanded to the member tensors, so structured levels stay whole structures and nested."""
    params = dict(adapter.model.named_parameters())
    if groups is not None:
        live = {n: p.detach().cpu() for n, p in params.items()}
        group_codes = compute_group_codes(groups, live, scheduled_levels(levels, step, recipe.schedule),
                                          allocation or recipe.allocation)
        fresh = expand_codes(groups, group_codes, {n: t.shape for n, t in live.items()}, len(levels))
        device = next(iter(params.values())).device
        return {n: c.to(device) for n, c in fresh.items()}
    tensors = {n: params[n].detach().cpu() for n in codes}
    fresh = codes_at_sparsities(tensors, scheduled_levels(levels, step, recipe.schedule), recipe.allocation)
    device = next(iter(params.values())).device
    return {n: c.to(device) for n, c in fresh.items()}
