"""Continuous levels: any sparsity in [0, largest] from one bundle, nested, with exact counts, against oracles."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from asr_fixtures import adapter_at, audio_files, decode_file
from helpers import DEFAULT_PRUNED, assert_one_error_line, oracle_codes, random_state_dict, run_cli

from dsnn_compress.core.bundle import Bundle, load_bundle, save_bundle
from dsnn_compress.core.masks import compute_codes
from dsnn_compress.errors import UsageError
from dsnn_compress.evaluation.evaluate import EvaluateOptions, evaluate
from dsnn_compress.evaluation.results import EvaluationReport
from dsnn_compress.report.tables import evaluation_markdown
from dsnn_compress.runtime.sparsity import DynamicSparsity

LEVELS = (0.3, 0.6, 0.9)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def pruned_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """The pruned tensors of ``helpers.random_state_dict`` (``half.weight`` renamed: ``Module.half`` exists)."""
    state = random_state_dict(seed, scale=3)
    return {n.replace("half.", "fp16."): state[n] for n in DEFAULT_PRUNED}


def make_bundle(allocation: str, shuffled: bool) -> Bundle:
    """A bundle over fp32/fp16/bf16 tensors. ``shuffled``: its codes come from *other* weights, as after fine-tuning
    (codes no longer follow the stored magnitudes), so the band order is not the codes' order."""
    tensors = pruned_tensors(0)
    ranked = pruned_tensors(1) if shuffled else tensors
    codes = compute_codes(ranked, LEVELS, allocation)
    return Bundle(tensors=dict(tensors), codes=codes, levels=LEVELS, metadata={"allocation": allocation})


def oracle_masks(bundle: Bundle, s: float) -> dict[str, np.ndarray]:
    """Independent reference: band weights dropped by a numpy stable argsort of |w| over the band stream."""
    all_levels = (0.0, *bundle.levels)
    k = max(i for i, v in enumerate(all_levels) if v <= s)
    names = sorted(bundle.codes)
    groups = [[n] for n in names] if bundle.allocation == "per-layer" else [names]
    out = {}
    for group in groups:
        codes = np.concatenate([bundle.codes[n].reshape(-1).numpy().astype(np.int64) for n in group])
        mags = np.concatenate([bundle.tensors[n].float().abs().reshape(-1).numpy() for n in group])
        keep = codes >= k + 1
        band = np.nonzero(codes == k)[0]
        drop = round(s * codes.size) - int((codes < k).sum())
        drop = min(max(drop, 0), band.size)
        order = band[np.argsort(mags[band], kind="stable")]
        keep[order[drop:]] = True
        start = 0
        for n in group:
            size = bundle.codes[n].numel()
            out[n] = keep[start : start + size].reshape(tuple(bundle.codes[n].shape))
            start += size
    return out


@pytest.mark.parametrize("allocation", ["per-layer", "global"])
@pytest.mark.parametrize("shuffled", [False, True], ids=["fresh", "finetuned"])
def test_random_levels_are_nested_exact_and_follow_the_score(allocation, shuffled):
    bundle = make_bundle(allocation, shuffled)
    rng = random.Random(7)
    values = sorted({0.0, *LEVELS, *(round(rng.uniform(0, 0.9), 4) for _ in range(12))})
    previous = None
    total = sum(c.numel() for c in bundle.codes.values())
    for s in values:
        masks = bundle.masks_at(s)
        expected = oracle_masks(bundle, s)
        for name, mask in masks.items():
            assert np.array_equal(mask.numpy(), expected[name]), (s, name)
        if allocation == "per-layer":
            for name, mask in masks.items():
                assert int((~mask).sum()) == round(s * mask.numel()), (s, name)
        else:
            assert sum(int((~m).sum()) for m in masks.values()) == round(s * total), s
        if previous is not None:  # nested: everything kept at the larger s is kept at the smaller one
            assert all(bool((masks[n] <= previous[n]).all()) for n in masks), s
        previous = masks


@pytest.mark.parametrize("allocation", ["per-layer", "global"])
def test_a_fresh_bundle_at_any_level_is_plain_magnitude_pruning_at_that_level(allocation):
    """Before fine-tuning the codes follow the magnitudes, so a continuous level must equal pruning the dense weights
    to that level directly (the independent sort of ``helpers.oracle_codes``)."""
    bundle = make_bundle(allocation, shuffled=False)
    for s in (0.1, 0.45, 0.77, 0.85):
        reference = oracle_codes(bundle.tensors, [s], allocation)
        masks = bundle.masks_at(s)
        assert all(np.array_equal(masks[n].numpy(), reference[n] >= 1) for n in masks), s


def test_a_trained_level_reached_as_a_continuous_level_is_the_trained_level():
    bundle = make_bundle("per-layer", shuffled=True)
    for k, s in enumerate(LEVELS, start=1):
        trained = {n: c >= k for n, c in bundle.codes.items()}
        for spelled in (s, s + 5e-7, f"{100 * s:g}%"):
            masks = bundle.masks_at(spelled)
            assert all(torch.equal(masks[n], trained[n]) for n in masks), spelled
        assert bundle.is_trained(s)
        # the first band weight goes just above a trained level, the last just below the next one
        if s < LEVELS[-1]:
            above = bundle.masks_at(s + 1e-3)
            assert all(bool((above[n] <= trained[n]).all()) for n in above)
    assert not bundle.is_trained(0.45)


def test_state_dict_and_live_switch_agree_at_continuous_levels():
    bundle = make_bundle("global", shuffled=True)
    module = torch.nn.Module()
    for name, tensor in bundle.tensors.items():
        owner = module
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(owner, part):
                owner.add_module(part, torch.nn.Module())
            owner = getattr(owner, part)
        owner.register_parameter(leaf, torch.nn.Parameter(tensor.clone(), requires_grad=False))
    live = DynamicSparsity(module, bundle.codes, bundle.levels, bundle.allocation)
    for s in (0.75, 0.2, 0.6, 0.0, 0.88):
        live.set_level(s)
        expected = bundle.state_dict_at(s)
        params = dict(module.named_parameters())
        assert all(torch.equal(params[n], expected[n]) for n in bundle.codes), s
        assert live.level == s
        assert live.pruned_count() == sum(int((~m).sum()) for m in bundle.masks_at(s).values())
        assert live.is_trained(s) == (s in (0.0, *LEVELS))


@pytest.mark.parametrize("bad, fragment", [(0.95, "level 0.95 is outside [0, 0.9]"),
                                           (-0.1, "level -0.1 is outside [0, 0.9]"),
                                           ("1.5", "level 1.5 is outside [0, 0.9]"),
                                           ("abc", "is not a number")])
def test_levels_outside_the_range_say_the_range(bad, fragment):
    bundle = make_bundle("per-layer", shuffled=False)
    for call in (bundle.state_dict_at, bundle.masks_at):
        with pytest.raises(UsageError) as info:
            call(bad)
        assert fragment in str(info.value)


# --------------------------------------------------------------------------------------------- CLI and reports


def test_evaluate_marks_untrained_levels(tiny_model, tmp_path, capsys):
    manifest = audio_files()[0].parent.parent / "manifest.jsonl"
    report_path = tmp_path / "r.json"
    markdown = tmp_path / "r.md"
    code, stdout, err = run_cli(capsys, "evaluate", tiny_model.bundle, "--data", manifest, "--levels", "0,0.7,0.9",
                                "--json", report_path, "--markdown", markdown)
    assert code == 0, err
    report = json.loads(report_path.read_text())
    assert [(e["level"], e["trained"]) for e in report["levels"]] == [(0.0, True), (0.7, False), (0.9, True)]
    assert set(report["continuous_levels"]) == {"score", "allocation"}
    assert "dense magnitude" in report["continuous_levels"]["score"]
    assert "0.7*" in stdout and "continuous level" in stdout
    text = markdown.read_text()
    assert "| 0.7\\* |" in text and "| 0.9 |" in text and "continuous level" in text
    # the 0.7 entry is the model at state_dict_at(0.7): its nonzero count lies between the trained neighbours'
    counts = [e["nonzero_params"] for e in report["levels"]]
    assert counts[0] > counts[1] > counts[2]
    assert evaluation_markdown(EvaluationReport.from_dict(report)) == text


def test_evaluate_level_between_trained_levels_scores_the_interpolated_model(tiny_model):
    manifest = audio_files()[0].parent.parent / "manifest.jsonl"
    report = evaluate(tiny_model.bundle, manifest, EvaluateOptions(levels="0.7", details=True, repeats=1))
    adapter = adapter_at(tiny_model.bundle, 0.7)  # rebuilt independently from Bundle.state_dict_at(0.7)
    bundle = load_bundle(tiny_model.bundle)
    pruned = sum(int((~m).sum()) for m in bundle.masks_at(0.7).values())
    total = sum(p.numel() for p in adapter.model.parameters())
    assert report.levels[0].nonzero_params == total - pruned
    assert report.levels[0].trained is False


def test_transcribe_at_an_untrained_level(tiny_model, capsys):
    files = audio_files()[:2]
    code, stdout, err = run_cli(capsys, "transcribe", tiny_model.bundle, *files, "--level", "0.7", "--json")
    assert code == 0, err
    items = json.loads(stdout)
    adapter = adapter_at(tiny_model.bundle, 0.7)
    assert [i["text"] for i in items] == [decode_file(adapter, f) for f in files]
    assert [(i["level"], i["trained"]) for i in items] == [(0.7, False)] * 2


@pytest.mark.parametrize("command", ["transcribe", "evaluate", "export"])
def test_cli_level_outside_the_range(tiny_model, tmp_path, capsys, command):
    manifest = audio_files()[0].parent.parent / "manifest.jsonl"
    args = {"transcribe": ("transcribe", tiny_model.bundle, audio_files()[0], "--level", "0.95"),
            "evaluate": ("evaluate", tiny_model.bundle, "--data", manifest, "--levels", "0.5,0.95"),
            "export": ("export", tiny_model.bundle, "--level", "0.95", "-o", tmp_path / "x.safetensors")}[command]
    code, _, err = run_cli(capsys, *args)
    assert code == 2
    assert_one_error_line(err, "level 0.95 is outside [0, 0.9]", "choose a level between 0 and 0.9")
    assert not (tmp_path / "x.safetensors").exists()


def test_export_of_a_continuous_level_is_its_state_dict(tiny_model, tmp_path, capsys):
    out = tmp_path / "l.safetensors"
    code, _, err = run_cli(capsys, "export", tiny_model.bundle, "--level", "0.7", "-o", out)
    assert code == 0, err
    from safetensors.torch import load_file
    expected = load_bundle(tiny_model.bundle).state_dict_at(0.7)
    got = load_file(str(out))
    assert set(got) == set(expected) and all(torch.equal(got[n], expected[n]) for n in got)


def test_saved_bundle_keeps_the_allocation_that_orders_continuous_levels(tmp_path):
    bundle = make_bundle("global", shuffled=False)
    bundle.metadata.update({"selection": {}, "source": {}})
    path = save_bundle(bundle, tmp_path / "b.safetensors")
    loaded = load_bundle(path)
    assert loaded.allocation == "global"
    assert all(torch.equal(loaded.masks_at(0.5)[n], bundle.masks_at(0.5)[n]) for n in bundle.codes)
