"""The seeded bundle fuzzer in CI: a few hundred mutants of a valid bundle, each rejected with DsnnError or loaded
valid and equal to the original; never another exception, never a hang (see bundle_fuzz.py; thousands run in
benchmarks/fuzz_bundles.py)."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest
from bundle_fuzz import KINDS, OK_OUTCOMES, Layout, check_mutant, mutate
from helpers import random_state_dict, write_checkpoint

from dsnn_compress.core.bundle import load_bundle
from dsnn_compress.prune import PruneOptions, prune_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MUTANTS = 320
SEED = 16


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    out = root / "bundle.safetensors"
    prune_checkpoint(write_checkpoint(root / "dense.safetensors", random_state_dict(0)), out,
                     PruneOptions((0.5, 0.7, 0.9)))
    return out


def test_fuzzed_bundles_are_rejected_or_load_unchanged(original: Path, tmp_path: Path) -> None:
    raw = original.read_bytes()
    reference = load_bundle(original)
    rng = random.Random(SEED)
    outcomes: Counter[str] = Counter()
    by_kind: Counter[tuple[str, str]] = Counter()
    failures = []
    path = tmp_path / "mutant.safetensors"
    for i in range(MUTANTS):
        kind, data, detail = mutate(raw, rng)
        path.write_bytes(data)
        outcome = check_mutant(path, reference)
        outcomes[outcome.split(":")[0]] += 1
        by_kind[(kind, outcome.split(":")[0])] += 1
        if outcome not in OK_OUTCOMES:
            failures.append(f"#{i} {kind} ({detail}): {outcome}")
    assert failures == [], "\n".join(failures[:20])
    # the run exercised what it claims: every kind of mutation, most of them rejected, some harmless ones loaded
    assert {kind for kind, _ in by_kind} == set(KINDS)
    assert outcomes["rejected"] > MUTANTS // 2 and outcomes["loaded-equal"] > 0, outcomes
    # with checksums, every bit flip in the data is refused (a flip always changes a tensor)
    for kind in ("flip-data", "flip-code"):
        assert by_kind[(kind, "rejected")] > 0 and by_kind[(kind, "loaded-equal")] == 0, by_kind


def test_the_fuzzer_catches_silent_corruption(original: Path, tmp_path: Path) -> None:
    """The property check itself: a bundle without checksums whose non-pruned weight changed loads silently, and
    check_mutant reports it (so a green fuzz run means something)."""
    layout = Layout.parse(original.read_bytes())
    del layout.metadata["dsnn_checksums"]
    data = bytearray(layout.tensor_bytes("enc.ff.bias"))
    data[0] ^= 0x40
    layout.set_tensor_bytes("enc.ff.bias", bytes(data))
    path = tmp_path / "silent.safetensors"
    path.write_bytes(layout.build())
    assert check_mutant(path, load_bundle(original)) == "loaded-different"
    unchanged = Layout.parse(original.read_bytes())
    path.write_bytes(unchanged.build())
    assert check_mutant(path, load_bundle(original)) == "loaded-equal"
