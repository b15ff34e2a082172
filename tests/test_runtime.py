"""The runtime wing's one level-switch protocol: both switches satisfy it, answer level lookups like the bundle, and
leave the model as it was on a refused level.

Oracles: the protocol's own signatures (``inspect``), the bundle's lookups (``core.levels.LevelLookups`` on the
file's levels), the zeros actually present in the live weights, and the parameter count of a structured level's
physically smaller model.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from asr_fixtures import TinyModel

from dsnn_compress.core.bundle import Bundle, load_bundle
from dsnn_compress.errors import UsageError
from dsnn_compress.prune import PruneOptions, prune_checkpoint
from dsnn_compress.runtime.runnable import LoadedModel, load_model
from dsnn_compress.runtime.sparsity import DynamicSparsity
from dsnn_compress.runtime.structured import StructuredViews, compact_adapter
from dsnn_compress.runtime.switch import LevelSwitch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SWITCHES = {"weight": DynamicSparsity, "structured": StructuredViews}


@pytest.fixture(scope="module")
def structured_bundle(tiny_model: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runtime") / "structured.safetensors"
    prune_checkpoint(tiny_model.checkpoint, out, PruneOptions((0.5, 0.9), granularity="structured"))
    return out


@pytest.fixture(params=sorted(SWITCHES))
def switched(request: pytest.FixtureRequest, tiny_model: TinyModel, structured_bundle: Path
             ) -> tuple[str, LoadedModel, Bundle]:
    path = tiny_model.bundle if request.param == "weight" else structured_bundle
    return request.param, load_model(path), load_bundle(path)


def protocol_members() -> dict[str, object]:
    """Name -> the protocol's declaration (a function, a property, or None for a plain attribute)."""
    members: dict[str, object] = dict.fromkeys(LevelSwitch.__annotations__)
    members.update({n: v for n, v in vars(LevelSwitch).items()
                    if not n.startswith("_") and (callable(v) or isinstance(v, property))})
    return members


def test_the_protocol_declares_what_callers_use() -> None:
    assert set(protocol_members()) == {"module", "levels", "allocation", "all_levels", "level", "level_index",
                                       "resolve_level", "is_trained", "set_level", "pruned_count", "detach"}


def test_both_switches_satisfy_the_protocol_with_its_signatures(switched: tuple[str, LoadedModel, Bundle]) -> None:
    kind, loaded, bundle = switched
    switch = loaded.sparsity
    assert type(switch) is SWITCHES[kind]
    assert isinstance(switch, LevelSwitch)
    for name, declared in protocol_members().items():
        assert hasattr(switch, name), name
        if callable(declared):
            implemented = getattr(type(switch), name)
            assert list(inspect.signature(implemented).parameters) == list(inspect.signature(declared).parameters), name
    assert switch.module is loaded.adapter.model
    assert (switch.levels, switch.allocation) == (bundle.levels, bundle.allocation)


def test_lookups_agree_with_the_bundle_and_the_loaded_model(switched: tuple[str, LoadedModel, Bundle]) -> None:
    kind, loaded, bundle = switched
    switch = loaded.sparsity
    assert switch.all_levels == bundle.all_levels == loaded.levels == (0.0, 0.5, 0.9)
    for spelled, index in (("dense", 0), ("50%", 1), (0.9, 2), ("0.5", 1)):
        assert switch.level_index(spelled) == bundle.level_index(spelled) == index
        assert switch.is_trained(spelled) and loaded.is_trained(spelled)
    with pytest.raises(UsageError, match="not in this bundle"):
        switch.level_index(0.7)
    assert bundle.resolve_level(0.7) == 0.7 and not bundle.is_trained(0.7)
    if kind == "weight":  # in-place masks serve continuous levels, like the bundle
        assert switch.resolve_level(0.7) == loaded.resolve_level(0.7) == 0.7
        assert not switch.is_trained(0.7) and not loaded.is_trained(0.7)
    else:  # prefix views serve the trained levels only
        for call in (switch.resolve_level, switch.is_trained, loaded.resolve_level):
            with pytest.raises(UsageError, match="not in this bundle"):
                call(0.7)
    with pytest.raises(UsageError):
        switch.resolve_level(0.95)


def live_pruned(loaded: LoadedModel, bundle: Bundle) -> int:
    """Entries the active level leaves out, measured on the model: zeros in the pruned tensors (weight bundles),
    or the difference to the level's physically smaller model (structured bundles)."""
    if isinstance(loaded.sparsity, DynamicSparsity):
        params = dict(loaded.adapter.model.named_parameters())
        return sum(int((params[name] == 0).sum()) for name in bundle.codes)
    index = bundle.level_index(loaded.sparsity.level)
    full = sum(p.numel() for p in loaded.adapter.model.parameters())
    if index == 0:
        return 0
    small = compact_adapter(bundle, loaded.adapter, index)
    return full - sum(p.numel() for p in small.model.parameters())


def test_pruned_count_is_what_the_active_level_leaves_out(switched: tuple[str, LoadedModel, Bundle]) -> None:
    _, loaded, bundle = switched
    counts = []
    for level in (0.9, 0.0, 0.5):
        loaded.set_level(level)
        counts.append(loaded.sparsity.pruned_count())
        assert counts[-1] == live_pruned(loaded, bundle), level
        assert loaded.sparsity.level == level
    assert counts[1] == 0 < counts[2] < counts[0]


def test_a_refused_level_leaves_the_switch_as_it_was(switched: tuple[str, LoadedModel, Bundle]) -> None:
    _, loaded, _ = switched
    loaded.set_level(0.5)
    before = {n: p.detach().clone() for n, p in loaded.adapter.model.named_parameters()}
    pruned = loaded.sparsity.pruned_count()
    with pytest.raises(UsageError):
        loaded.set_level(0.95)
    assert loaded.sparsity.level == 0.5 and loaded.sparsity.pruned_count() == pruned
    after = dict(loaded.adapter.model.named_parameters())
    assert all(torch.equal(after[n], t) for n, t in before.items())
    assert loaded.sparsity.detach() is loaded.adapter.model and loaded.sparsity.level == 0.0
