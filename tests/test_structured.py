"""Structured nested levels: group scores and codes, permutation invariance, prefix views, physically smaller
exports equal to the bundle's masked level forward, bundle validation, inspect, fine-tuning, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from asr_fixtures import adapter_at
from helpers import assert_usage_error, run_cli

from dsnn_compress.core.bundle import load_bundle
from dsnn_compress.core.groups import (
    compute_group_codes,
    expand_codes,
    group_scores,
    permute_groups,
    structured_pruned_count,
)
from dsnn_compress.core.safetensors_io import read_safetensors, write_safetensors
from dsnn_compress.errors import DsnnError, UsageError
from dsnn_compress.export.formats import export_level
from dsnn_compress.models.registry import FAMILIES, get_family, new_adapter, register_family
from dsnn_compress.models.structure import model_groups
from dsnn_compress.prune import PruneOptions, prune_checkpoint
from dsnn_compress.runtime.runnable import load_model
from dsnn_compress.runtime.structured import StructuredViews
from dsnn_compress.sources.checkpoint import save_checkpoint
from dsnn_compress.sources.opener import load_checkpoint_adapter

VOCABULARY = list("abcdefghijklmnopqrstuvwxyz' ")
LEVELS = [0.5, 0.7]
CONFIGS = {"conformer-ctc": {"d_model": 32, "num_layers": 2, "num_heads": 4, "conv_kernel": 3, "dropout": 0.0},
           "lstm-ctc": {"hidden": 16, "num_layers": 2, "dropout": 0.0}}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _adapter(family: str, seed: int = 0):
    torch.manual_seed(seed)
    adapter = new_adapter(family, VOCABULARY, size="xs", overrides=CONFIGS[family])
    with torch.no_grad():  # spread the magnitudes so rankings are not near-ties of the random init
        for p in adapter.model.parameters():
            p.mul_(torch.rand_like(p) * 2)
    return adapter.model.eval() and adapter


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(7)
    return torch.randn(3, 53, 80), torch.tensor([53, 30, 11])


def _forward(model: torch.nn.Module) -> torch.Tensor:
    features, lengths = _inputs()
    with torch.no_grad():
        log_probs, out_lengths = model(features, lengths)
    return log_probs * (torch.arange(log_probs.shape[1])[None, :, None] < out_lengths[:, None, None])


@pytest.fixture(scope="module", params=["conformer-ctc", "lstm-ctc"])
def structured(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp(request.param)
    save_checkpoint(_adapter(request.param), root / "dense.safetensors")
    prune_checkpoint(root / "dense.safetensors", root / "bundle.safetensors",
                     PruneOptions(LEVELS, granularity="structured"))
    return root / "bundle.safetensors"


@pytest.mark.parametrize("family", ["conformer-ctc", "lstm-ctc"])
def test_random_permutation_of_every_set_keeps_the_outputs(family: str) -> None:
    adapter = _adapter(family)
    specs = get_family(family).structured_groups(adapter)
    before = _forward(adapter.model)
    state = adapter.model.state_dict()
    generator = torch.Generator().manual_seed(3)
    orders = {s.name: torch.randperm(s.count, generator=generator) for s in specs}
    permuted = permute_groups(specs, state, orders)
    assert any(not torch.equal(permuted[n], state[n]) for n in state)  # it really moved weights
    adapter.model.load_state_dict(permuted)
    assert torch.allclose(_forward(adapter.model), before, atol=1e-5)


def test_ffn_neuron_scores_and_per_layer_codes_against_a_hand_oracle() -> None:
    adapter = _adapter("conformer-ctc")
    specs = {s.name: s for s in get_family("conformer-ctc").structured_groups(adapter)}
    spec = specs["layers.1.ff2"]
    state = adapter.model.state_dict()
    w1, w2 = state["layers.1.ff2.linear1.weight"].double(), state["layers.1.ff2.linear2.weight"].double()
    oracle = [((w1[i] ** 2).sum() + (w2[:, i] ** 2).sum()).div(w1.shape[1] + w2.shape[0]).sqrt().item()
              for i in range(spec.count)]
    assert group_scores(spec, state).tolist() == pytest.approx(oracle)
    codes = compute_group_codes([spec], state, LEVELS)[spec.name]
    ranked = sorted(range(spec.count), key=lambda i: oracle[i])  # lowest first
    for k, level in enumerate(LEVELS, start=1):
        pruned = set(ranked[:round(level * spec.count)])
        assert {i for i in range(spec.count) if codes[i] < k} == pruned
    # 4 heads at 0.9 would prune round(3.6) = 4: every set keeps one
    assert structured_pruned_count(0.9, 4) == 3


def test_global_allocation_prunes_per_kind_and_keeps_one_per_set() -> None:
    adapter = _adapter("conformer-ctc")
    specs = get_family("conformer-ctc").structured_groups(adapter)
    state = adapter.model.state_dict()
    codes = compute_group_codes(specs, state, [0.5, 0.95], "global")
    for kind in {s.kind for s in specs}:
        sets = [s for s in specs if s.kind == kind]
        total = sum(s.count for s in sets)
        for k, level in enumerate([0.5, 0.95], start=1):
            pruned = sum(int((codes[s.name] < k).sum()) for s in sets)
            assert pruned == structured_pruned_count(level, total, len(sets))
            assert all(int((codes[s.name] >= k).sum()) >= 1 for s in sets)
    assert all(bool((codes[s.name][None] >= 0).all()) for s in specs)


def test_bundle_codes_are_whole_structures_nested_and_prefix_ordered(structured: Path) -> None:
    bundle = load_bundle(structured)
    assert bundle.structured is not None and bundle.structured.prefix_ordered()
    for spec in bundle.structured.specs:
        codes = bundle.structured.codes[spec.name]
        assert codes.tolist() == sorted(codes.tolist(), reverse=True)
        for k, level in enumerate(LEVELS, start=1):
            assert int((codes < k).sum()) == structured_pruned_count(level, spec.count)
    expanded = expand_codes(bundle.structured.specs, bundle.structured.codes,
                            {n: t.shape for n, t in bundle.tensors.items()}, len(LEVELS))
    assert expanded.keys() == bundle.codes.keys()
    assert all(torch.equal(expanded[n], bundle.codes[n]) for n in expanded)


def test_prune_permutation_keeps_the_dense_network(structured: Path) -> None:
    dense = load_checkpoint_adapter(structured.parent / "dense.safetensors").model.eval()
    assert torch.allclose(_forward(adapter_at(structured, 0.0).model), _forward(dense), atol=1e-5)


@pytest.mark.parametrize("level", LEVELS)
def test_exported_checkpoint_is_smaller_and_equals_the_masked_level(structured: Path, tmp_path: Path,
                                                                    level: float) -> None:
    bundle = load_bundle(structured)
    if bundle.metadata["model"]["family"] == "lstm-ctc":
        pass  # per-layer allocation: one hidden size, so LSTM levels export too
    out = export_level(bundle, level, tmp_path / "small.safetensors", "checkpoint")
    small = load_checkpoint_adapter(out).model.eval()
    reference = adapter_at(structured, level).model
    full = sum(p.numel() for p in reference.parameters())
    kept = full - sum(int((c < bundle.level_index(level)).sum()) for c in bundle.codes.values())
    assert sum(p.numel() for p in small.parameters()) == kept < 0.6 * full
    assert torch.allclose(_forward(small), _forward(reference), atol=1e-4)


def test_onnx_export_of_a_structured_level_is_smaller_and_matches(structured: Path, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    bundle = load_bundle(structured)
    dense = export_level(bundle, 0.0, tmp_path / "dense.onnx")
    out = export_level(bundle, 0.7, tmp_path / "small.onnx")
    assert out.stat().st_size < 0.8 * dense.stat().st_size  # tiny model: graph and CTC head weigh in
    features, lengths = _inputs()
    log_probs, out_lengths = ort.InferenceSession(str(out)).run(
        None, {"features": features.numpy(), "lengths": lengths.numpy()})
    reference = _forward(adapter_at(structured, 0.7).model)
    mask = torch.arange(log_probs.shape[1])[None, :, None] < torch.from_numpy(out_lengths)[:, None, None]
    assert torch.allclose(torch.from_numpy(log_probs) * mask, reference, atol=1e-4)


def test_set_level_runs_views_without_copying(structured: Path) -> None:
    loaded = load_model(structured)
    if loaded.adapter.family == "lstm-ctc":
        assert not isinstance(loaded.sparsity, StructuredViews)  # nn.LSTM cannot run on views: masks
        return
    assert isinstance(loaded.sparsity, StructuredViews)
    pointers = {n: p.data_ptr() for n, p in loaded.adapter.model.named_parameters()}
    values = {n: p.detach().clone() for n, p in loaded.adapter.model.named_parameters()}
    for level in (0.7, 0.5, 0.0, 0.7):
        loaded.set_level(level)
        assert torch.allclose(_forward(loaded.adapter.model), _forward(adapter_at(structured, level).model),
                              atol=1e-4)
    params = dict(loaded.adapter.model.named_parameters())
    assert all(params[n].data_ptr() == pointers[n] and torch.equal(params[n], values[n]) for n in params)


@pytest.mark.parametrize("structured", ["conformer-ctc"], indirect=True)
def test_view_switched_bundles_serve_trained_levels_only_and_refuse_sparse_kernels(structured: Path) -> None:
    loaded = load_model(structured)
    assert isinstance(loaded.sparsity, StructuredViews)  # conformer-ctc runs its levels on views of the weights
    between = (LEVELS[0] + LEVELS[1]) / 2
    with pytest.raises(UsageError, match="not in this bundle"):
        loaded.set_level(between)
    assert loaded.sparsity.level == 0.0  # a refused level leaves the model as it was
    for mode in ("sparse", "auto"):
        with pytest.raises(UsageError, match="structured bundle"):
            load_model(structured, kernels=mode)


@pytest.mark.parametrize("structured", ["lstm-ctc"], indirect=True)
def test_lstm_structured_levels_switch_by_masks(structured: Path) -> None:
    loaded = load_model(structured)
    assert not isinstance(loaded.sparsity, StructuredViews)  # lstm-ctc has no views: its levels are masks
    loaded.set_level(LEVELS[1])
    torch.testing.assert_close(_forward(loaded.adapter.model), _forward(adapter_at(structured, LEVELS[1]).model),
                               rtol=0, atol=1e-5)


def test_compact_evaluation_reports_the_smaller_model(structured: Path) -> None:
    from dsnn_compress.evaluation.evaluate import EvaluateOptions, evaluate

    data = Path(__file__).parent / "data" / "manifest.jsonl"
    masked = evaluate(structured, data, EvaluateOptions(levels="0,0.7", details=True, repeats=1))
    compact = evaluate(structured, data, EvaluateOptions(levels="0,0.7", details=True, compact=True, repeats=1))
    assert compact.model.compact is True and compact.to_dict()["model"]["compact"] is True
    assert [u.hypotheses for u in compact.utterances] == [u.hypotheses for u in masked.utterances]
    assert [e.nonzero_params for e in compact.levels] == [e.nonzero_params for e in masked.levels]


def test_edited_group_codes_are_refused(structured: Path, tmp_path: Path) -> None:
    tensors, meta = read_safetensors(structured)
    groups = json.loads(meta["structured"])
    groups["groups"][0]["codes"][0] = 0  # the weight codes no longer follow
    groups["groups"][0]["kept"] = [groups["groups"][0]["count"]] + groups["groups"][0]["kept"][1:]
    write_safetensors(tmp_path / "bad.safetensors", tensors, {**meta, "structured": json.dumps(groups)})
    with pytest.raises(DsnnError, match="kept|differ"):
        load_bundle(tmp_path / "bad.safetensors")


def test_inspect_shows_what_each_level_keeps(structured: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "inspect", structured, "--json")
    assert code == 0
    report = json.loads(out)
    assert report["granularity"] == "structured"
    bundle = load_bundle(structured)
    for entry in report["structured"]["sets"]:
        codes = bundle.structured.codes[entry["name"]]
        assert entry["kept"] == {"dense": entry["count"], "0.5": int((codes >= 1).sum()),
                                 "0.7": int((codes >= 2).sum())}
    code, out, _ = run_cli(capsys, "inspect", structured)
    assert code == 0
    table = out[out.index("structures kept per level"):]
    rows = [[cell.strip() for cell in line.strip("│").split("│")]
            for line in table.splitlines() if line.startswith("│")]
    expected, totals = [], {}
    for spec in bundle.structured.specs:  # a row per set: name, kind and what dense, 0.5 and 0.7 keep
        codes = bundle.structured.codes[spec.name]
        kept = [spec.count, int((codes >= 1).sum()), int((codes >= 2).sum())]
        expected.append([spec.name, spec.kind, *map(str, kept)])
        totals[spec.kind] = [a + b for a, b in zip(totals.get(spec.kind, [0, 0, 0]), kept, strict=True)]
    expected += [["all", kind, *map(str, kept)] for kind, kept in sorted(totals.items())]
    assert rows == expected


def test_lstm_global_levels_are_refused_for_compact_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    adapter = _adapter("lstm-ctc")
    save_checkpoint(adapter, tmp_path / "dense.safetensors")
    prune_checkpoint(tmp_path / "dense.safetensors", tmp_path / "g.safetensors",
                     PruneOptions([0.5], allocation="global", granularity="structured"))
    bundle = load_bundle(tmp_path / "g.safetensors")
    if len(set(bundle.structured.kept(1).values())) == 1:
        pytest.skip("the global ranking happened to keep equal counts per layer")
    result = run_cli(capsys, "export", tmp_path / "g.safetensors", "--level", "0.5", "--format", "checkpoint",
                     "-o", tmp_path / "x.safetensors")
    assert_usage_error(result, "one hidden size", "per-layer")


def test_structured_needs_a_family_that_declares_groups(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from safetensors.torch import save_file

    save_file({"layer.weight": torch.randn(8, 8)}, str(tmp_path / "plain.safetensors"))
    result = run_cli(capsys, "prune", tmp_path / "plain.safetensors", "--levels", "0.5", "--granularity",
                     "structured", "-o", tmp_path / "b.safetensors")
    assert_usage_error(result, "conformer-ctc", "lstm-ctc")

    class NoGroups:
        sizes: dict = {}

    register_family("no-groups-test", NoGroups())  # type: ignore[arg-type]
    try:
        fake = type("Fake", (), {"family": "no-groups-test"})()
        with pytest.raises(UsageError, match="not available for no-groups-test") as caught:
            model_groups(fake)  # type: ignore[arg-type]
        assert "conformer-ctc, hf-ctc, lstm-ctc, whisper" in str(caught.value.hint)
    finally:
        FAMILIES.pop("no-groups-test")
    result = run_cli(capsys, "prune", tmp_path / "plain.safetensors", "--levels", "0.5", "--granularity", "rows",
                     "-o", tmp_path / "b.safetensors")
    assert_usage_error(result, "granularity", "structured")


def test_finetune_structured_with_the_gradual_schedule_stays_whole_structures(tmp_path: Path) -> None:
    from dsnn_compress.core.groups import group_codes_from_weights, kept_counts
    from dsnn_compress.training import model_setup
    from dsnn_compress.training.recipe import apply_overrides, load_recipe
    from dsnn_compress.training.trainer import finetune

    root = Path(__file__).resolve().parents[1]
    recipe = apply_overrides(load_recipe(root / "recipes" / "tiny-test.yaml"), {
        "output": str(tmp_path / "ft.safetensors"), "training.keep": "last", "training.steps": 4,
        "granularity": "structured", "levels": [0.5, 0.8], "model.config": dict(CONFIGS["conformer-ctc"]),
        "schedule.enabled": True, "schedule.start_step": 0, "schedule.end_step": 2, "schedule.update_every": 1,
        "schedule.initial_fraction": 0.2})
    calls: list[dict[str, list[int]]] = []
    original = model_setup.scheduled_codes

    def spy(*args, **kwargs):  # record each recompute's group codes: whole structures and nested every time
        codes = original(*args, **kwargs)
        groups = args[5] if len(args) > 5 else kwargs.get("groups")
        assert groups is not None
        cpu = {n: c.cpu() for n, c in codes.items()}
        group_codes = group_codes_from_weights(groups, cpu)
        expanded = expand_codes(groups, group_codes, {n: c.shape for n, c in cpu.items()}, 2)
        assert all(torch.equal(expanded[n], cpu[n]) for n in cpu)
        calls.append({n: kept_counts(c, 2) for n, c in group_codes.items()})
        return codes

    import dsnn_compress.training.trainer as trainer_module
    trainer_module.scheduled_codes, model_setup.scheduled_codes = spy, spy
    try:
        result = finetune(recipe)
    finally:
        trainer_module.scheduled_codes, model_setup.scheduled_codes = original, original
    assert len(calls) >= 3
    ff = [c["layers.0.ff1"] for c in calls]
    assert ff[0][1] > ff[-1][1]  # the schedule ramped the pruned neuron count up
    bundle = load_bundle(result.output)  # validated: group codes expand to the weight codes, declared levels
    assert bundle.structured is not None and bundle.structured.prefix_ordered()
    assert bundle.metadata["recipe"]["granularity"] == "structured"
    assert bundle.structured.kept(1)["layers.0.ff1"] == 128 - round(0.5 * 128)
