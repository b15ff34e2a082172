"""Calibration-aware nested pruning: Wanda scores, comparison groups, per-block profiles, the prune command.

Oracles: Wanda scores and input statistics computed by hand on small layers; per-row codes from an explicit
per-row sort; nesting checked mask by mask for every method; the bundle's calibration record against the manifest's
own sha256."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from asr_fixtures import MANIFEST, TinyModel
from helpers import assert_usage_error, run_cli

from dsnn_compress.calibration.audio import load_calibration
from dsnn_compress.calibration.sensitivity import block_costs, sensitivity_grid
from dsnn_compress.calibration.statistics import ActivationStats, collect_stats, observing
from dsnn_compress.core.bundle import load_bundle
from dsnn_compress.core.masks import compute_codes, pruned_count, row_codes
from dsnn_compress.core.scores import (
    activation_scores,
    block_of,
    blocks,
    greedy_profile,
    offset_profile,
    owl_offsets,
    scored_codes,
    tensor_profile,
)
from dsnn_compress.errors import UsageError
from dsnn_compress.prune import PruneOptions, prune_checkpoint
from dsnn_compress.sources.opener import open_source

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def audio_only(tmp_path: Path, keep: int | None = None) -> Path:
    """The test manifest without its transcripts (absolute audio paths)."""
    rows = [json.loads(line) for line in MANIFEST.read_text().splitlines()][:keep]
    path = tmp_path / "audio-only.jsonl"
    path.write_text("".join(json.dumps({"audio_filepath": str(MANIFEST.parent / r["audio_filepath"])}) + "\n"
                            for r in rows))
    return path


def assert_nested(codes: dict[str, torch.Tensor], levels: int) -> None:
    for name, code in codes.items():
        for k in range(1, levels):
            assert bool(((code >= k + 1) & ~(code >= k)).sum() == 0), (name, k)


# ----------------------------------------------------------------------------------------------- scores


def test_wanda_scores_equal_a_hand_computation():
    weight = torch.tensor([[1.0, -2.0, 3.0], [-0.5, 0.25, 4.0]])
    inputs = torch.tensor([[1.0, 0.0, 2.0], [3.0, 4.0, 0.0]])  # two positions, three input features
    rms = [((inputs[0, j] ** 2 + inputs[1, j] ** 2) / 2) ** 0.5 for j in range(3)]  # sqrt(mean x_j^2)
    expected = torch.tensor([[abs(float(weight[i, j])) * float(rms[j]) for j in range(3)] for i in range(2)])

    layer = torch.nn.Linear(3, 2, bias=False)
    layer.weight.data.copy_(weight)
    model = torch.nn.Sequential(layer)
    stats = ActivationStats()
    with observing(model, ["0.weight"], stats) as switch:
        model(inputs[:1])  # not observed: the hooks are off
        switch(True)
        model(inputs[None])  # [1, 2, 3]: positions are every leading index
    assert stats.positions["0.weight"] == 2
    assert torch.allclose(stats.rms["0.weight"], torch.tensor(rms, dtype=torch.float64))
    assert torch.allclose(activation_scores(layer.weight, stats.rms["0.weight"]), expected)


def test_convolution_inputs_are_observed_per_channel_and_grouped_ones_are_not():
    model = torch.nn.Sequential(torch.nn.Conv1d(2, 3, 3), torch.nn.Conv1d(3, 3, 1, groups=3))
    x = torch.randn(2, 2, 7)
    stats = ActivationStats()
    with observing(model, ["0.weight", "1.weight"], stats) as switch:
        switch(True)
        model(x)
    expected = x.double().pow(2).mean(dim=(0, 2)).sqrt()  # each input channel over batch and time
    assert torch.allclose(stats.rms["0.weight"], expected)
    assert stats.unobserved == ["1.weight"]
    score = activation_scores(model[0].weight, stats.rms["0.weight"])
    assert torch.allclose(score, model[0].weight.abs() * expected.float()[None, :, None])


def test_row_codes_equal_a_per_row_sort_and_are_nested():
    torch.manual_seed(0)
    scores = torch.rand(5, 13)
    scores[2, 3] = scores[2, 7]  # a tie: the lower index goes first
    levels = [0.3, 0.5, 0.8]
    codes = row_codes(scores, levels)
    for row in range(5):
        order = sorted(range(13), key=lambda j: (float(scores[row, j]), j))
        for k, level in enumerate(levels, start=1):
            pruned = set(order[: pruned_count(level, 13)])
            assert {j for j in range(13) if codes[row, j] < k} == pruned
    assert_nested({"w": codes}, len(levels))


@pytest.mark.parametrize("allocation", ["per-row", "per-layer", "global"])
def test_scored_codes_are_nested_for_every_comparison(allocation: str):
    torch.manual_seed(1)
    scores = {"a.0.w": torch.rand(6, 8), "a.1.w": torch.rand(4, 10), "b.w": torch.rand(3, 3)}
    codes = scored_codes(scores, [0.2, 0.5, 0.9], allocation)
    assert_nested(codes, 3)
    if allocation == "global":
        assert sum(int((c < 2).sum()) for c in codes.values()) == pruned_count(0.5, 6 * 8 + 40 + 9)
    if allocation == "per-layer":
        assert all(int((c < 2).sum()) == pruned_count(0.5, c.numel()) for c in codes.values())


def test_magnitude_per_row_codes_are_the_scored_codes_of_abs_weights():
    torch.manual_seed(2)
    tensors = {"x.0.weight": torch.randn(7, 5), "x.1.weight": torch.randn(3, 4, 2)}
    by_magnitude = compute_codes(tensors, [0.4, 0.6], "per-row")
    by_score = scored_codes({n: t.abs() for n, t in tensors.items()}, [0.4, 0.6], "per-row")
    assert all(torch.equal(by_magnitude[n], by_score[n]) for n in tensors)
    assert by_magnitude["x.1.weight"].shape == (3, 4, 2)


# ----------------------------------------------------------------------------------------------- profiles


def test_blocks_are_numbered_layers():
    assert block_of("model.encoder.layers.3.fc1.weight") == "model.encoder.layers.3"
    assert block_of("model.decoder.layers.10.encoder_attn.q_proj.weight") == "model.decoder.layers.10"
    assert block_of("head.weight") == "head"
    assert list(blocks(["l.1.b", "l.0.a", "l.1.a"])) == ["l.0", "l.1"]


def test_owl_gives_blocks_with_more_outliers_a_lower_sparsity_and_keeps_the_mean():
    torch.manual_seed(3)
    plain = torch.rand(50, 50)
    spiky = torch.rand(50, 50)
    spiky[:, :3] *= 60  # a few outlier columns
    scores = {"m.0.w": plain, "m.1.w": spiky, "m.2.w": torch.rand(50, 50)}
    offsets = owl_offsets(scores, m=5.0, lam=0.08)
    assert offsets["m.1"] < 0 < offsets["m.0"] + 1e-9
    assert abs(sum(offsets.values())) < 1e-9
    sizes = {b: 2500 for b in offsets}
    levels = [0.3, 0.5, 0.7]
    profile = offset_profile(offsets, sizes, levels)
    for k, level in enumerate(levels):
        assert abs(sum(profile[b][k] for b in profile) / 3 - level) < 1e-6
        assert profile["m.1"][k] < profile["m.0"][k]
    assert all(values == sorted(values) for values in profile.values())  # nested: non-decreasing per block


def test_sensitivity_profile_prunes_the_cheap_block_first_and_stays_nested():
    costs = {"cheap": [(0.25, 0.0), (0.5, 0.1), (0.75, 0.2)],
             "costly": [(0.25, 1.0), (0.5, 5.0), (0.75, 20.0)]}
    sizes = {"cheap": 100, "costly": 100}
    profile = greedy_profile(costs, sizes, [0.2, 0.4, 0.6])
    # 0.2 of 200 weights = 40: all from the cheap block (slope 0 up to 0.25)
    assert profile["cheap"][0] == pytest.approx(0.4) and profile["costly"][0] == 0
    for k, level in enumerate([0.2, 0.4, 0.6]):
        assert sum(profile[b][k] * 100 for b in profile) == pytest.approx(pruned_count(level, 200))
    assert all(values == sorted(values) for values in profile.values())
    with pytest.raises(UsageError, match="cannot reach level 0.9"):
        greedy_profile(costs, sizes, [0.9])


def test_profiled_codes_hold_each_blocks_sparsity_and_are_nested():
    torch.manual_seed(4)
    scores = {"l.0.a": torch.rand(8, 10), "l.0.b": torch.rand(10, 8), "l.1.a": torch.rand(8, 10)}
    per_block = {"l.0": [0.2, 0.6], "l.1": [0.5, 0.7]}
    codes = scored_codes(scores, tensor_profile(per_block, list(scores)), "per-row")
    assert_nested(codes, 2)
    assert int((codes["l.1.a"] < 1).sum()) == 8 * pruned_count(0.5, 10)
    assert int((codes["l.0.b"] < 2).sum()) == 10 * pruned_count(0.6, 8)
    with pytest.raises(UsageError, match="per-layer or per-row"):
        scored_codes(scores, tensor_profile(per_block, list(scores)), "global")


# ------------------------------------------------------------------------------------------- on a real model


def test_wanda_bundle_records_its_calibration_and_its_codes_follow_the_statistics(tiny_model: TinyModel,
                                                                                   tmp_path: Path):
    manifest = audio_only(tmp_path)
    out = tmp_path / "wanda.safetensors"
    bundle = prune_checkpoint(tiny_model.checkpoint, out, PruneOptions(
        [0.5, 0.9], allocation="per-row", method="wanda", calibration=manifest, calibration_utterances=5))
    loaded = load_bundle(out)  # the declared per-row sparsities hold
    record = loaded.metadata["pruning"]
    assert (record["method"], record["allocation"], record["profile"]) == ("wanda", "per-row", "uniform")
    assert record["calibration"]["sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert record["calibration"]["utterances"] == 5 and record["calibration"]["skipped"] == 0
    assert_nested(loaded.codes, 2)

    # the oracle: statistics collected again by hand, scores compared within each row
    source = open_source(tiny_model.checkpoint)
    adapter = source.adapter()
    audio = load_calibration(manifest, adapter, 5)
    names = sorted(bundle.codes)
    stats = collect_stats(adapter, audio, names)
    params = dict(adapter.model.named_parameters())
    for name in names:
        if name in stats.rms:
            expected = row_codes(activation_scores(params[name], stats.rms[name]), [0.5, 0.9])
        else:
            expected = compute_codes({name: params[name]}, [0.5, 0.9], "per-row")[name]
        assert torch.equal(loaded.codes[name], expected), name
    assert set(record.get("magnitude_scored", [])) == set(stats.unobserved)
    magnitude = prune_checkpoint(tiny_model.checkpoint, tmp_path / "m.safetensors",
                                 PruneOptions([0.5, 0.9], allocation="per-row"))
    assert any(not torch.equal(magnitude.codes[n], loaded.codes[n]) for n in stats.rms)


@pytest.mark.parametrize("profile", ["owl", "sensitivity"])
def test_profile_bundles_load_and_finetune_keeps_their_record(tiny_model: TinyModel, tmp_path: Path, profile: str,
                                                             capsys: pytest.CaptureFixture[str]):
    manifest = audio_only(tmp_path, keep=4)
    out = tmp_path / f"{profile}.safetensors"
    code, _, err = run_cli(capsys, "prune", tiny_model.checkpoint, "--levels", "0.5,0.7", "-o", out, "--method",
                           "wanda", "--profile", profile, "--calibration", manifest)
    assert code == 0, err
    bundle = load_bundle(out)
    record = bundle.metadata["pruning"]
    assert_nested(bundle.codes, 2)
    for block, values in record["blocks"].items():
        assert values == sorted(values), block
    sizes = {b: sum(bundle.codes[n].numel() for n in members) for b, members in blocks(list(bundle.codes)).items()}
    for k, level in enumerate([0.5, 0.7]):
        mean = sum(record["blocks"][b][k] * sizes[b] for b in sizes) / sum(sizes.values())
        assert mean == pytest.approx(level, abs=0.01)
    code, out_text, _ = run_cli(capsys, "inspect", out, "--json")
    shown = json.loads(out_text)["pruning"]
    assert (shown["method"], shown["profile"], shown["blocks"]) == ("wanda", profile, record["blocks"])
    assert shown["calibration"]["sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert f"profile {profile}, calibration 4 clips" in run_cli(capsys, "inspect", out).out
    tuned = tmp_path / "tuned.safetensors"
    code, _, err = run_cli(capsys, "finetune", out, "--data", MANIFEST, "--steps", "1", "-o", tuned)
    assert code == 0, err
    assert load_bundle(tuned).metadata["pruning"]["blocks"] == record["blocks"]
    assert_usage_error(run_cli(capsys, "finetune", out, "--data", MANIFEST, "--steps", "2", "-o",
                               tmp_path / "g.safetensors", "--set", "schedule.enabled=true", "--set",
                               "schedule.end_step=1"), "gradual schedule recomputes the codes")
    assert not (tmp_path / "g.safetensors").exists()


def test_sensitivity_costs_restore_the_weights_and_grow_with_sparsity(tiny_model: TinyModel, tmp_path: Path):
    adapter = open_source(tiny_model.checkpoint).adapter()
    before = {n: p.detach().clone() for n, p in adapter.model.named_parameters()}
    audio = load_calibration(audio_only(tmp_path), adapter, 4)
    names = adapter.default_prunable()
    params = dict(adapter.model.named_parameters())
    scores = {n: params[n].detach().abs() for n in names}
    grid = sensitivity_grid([0.5])
    assert grid == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
    costs = block_costs(adapter, audio, scores, "per-layer", grid, utterances=4)
    assert set(costs) == set(blocks(names))
    assert all(torch.equal(before[n], p) for n, p in adapter.model.named_parameters())
    for points in costs.values():
        assert [s for s, _ in points] == grid and all(c >= 0 for _, c in points)
    # pruning 70 % of a block costs more than 10 % (averaged over blocks, robust to one noisy block)
    assert sum(p[-1][1] for p in costs.values()) > sum(p[0][1] for p in costs.values())


def test_structured_wanda_scores_neurons_by_their_activations(tiny_model: TinyModel, tmp_path: Path):
    manifest = audio_only(tmp_path)
    wanda = prune_checkpoint(tiny_model.checkpoint, tmp_path / "sw.safetensors", PruneOptions(
        [0.5], granularity="structured", method="wanda", calibration=manifest))
    plain = prune_checkpoint(tiny_model.checkpoint, tmp_path / "sm.safetensors",
                             PruneOptions([0.5], granularity="structured"))
    assert wanda.metadata["pruning"]["calibration"]["utterances"] == 8
    assert load_bundle(tmp_path / "sw.safetensors").structured is not None
    # both bundles put each set's kept groups first; other scores keep (and so order) other neurons
    members = sorted({m.tensor for spec in wanda.structured.specs for m in spec.members})
    assert wanda.structured.kept(1) == plain.structured.kept(1)
    assert any(not torch.equal(wanda.tensors[n], plain.tensors[n]) for n in members)


def test_calibration_skips_unusable_clips_and_names_them(tiny_model: TinyModel, tmp_path: Path):
    manifest = audio_only(tmp_path, keep=2)
    manifest.write_text(manifest.read_text() + json.dumps({"audio_filepath": str(tmp_path / "gone.wav")}) + "\n")
    adapter = open_source(tiny_model.checkpoint).adapter()
    audio = load_calibration(manifest, adapter, 10)
    assert len(audio.ids) == 2 and len(audio.skipped) == 1 and "gone.wav" in audio.skipped[0]["reason"]
    with pytest.raises(UsageError, match="must be positive"):
        load_calibration(manifest, adapter, 0)
