"""Nested depth levels: Whisper layers dropped per level (``dsnn prune --depth/--encoder-depth``).

Oracles: the drop plan's codes against the rule written out per layer; a dropped layer (all its parameters zero) is
the identity, so the masked full model equals the physically smaller model transformers builds from the exported
directory (``from_pretrained`` of ``--format hf``), token for token; the measured importance order against costs
computed here by skipping each layer by hand.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from asr_fixtures import MANIFEST, TinyModel
from helpers import assert_usage_error, run_cli
from whisper_fixtures import build_whisper_dir

from dsnn_compress.calibration.audio import load_calibration
from dsnn_compress.calibration.depth import importance_order, layer_parameters
from dsnn_compress.calibration.statistics import self_labelled
from dsnn_compress.core.bundle import load_bundle
from dsnn_compress.core.depth import StackDepth, auto_counts, first_last_order, parse_depth
from dsnn_compress.core.masked import distillation_loss
from dsnn_compress.data.audio import load_audio
from dsnn_compress.data.batch import pad_batch
from dsnn_compress.errors import UsageError
from dsnn_compress.runtime.runnable import load_model
from dsnn_compress.sources.opener import open_source

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")
LEVELS = "0.2,0.5,0.7"
CLIPS = [MANIFEST.parent / "audio" / name for name in ("train-02732.ogg", "train-01493.ogg", "train-00813.ogg")]


@pytest.fixture(scope="module")
def deep(tmp_path_factory) -> SimpleNamespace:
    """A 4-layer tiny Whisper and a structured bundle dropping decoder layers at 0.5 and 0.7 and one encoder layer
    at 0.7 (distil-whisper order)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    root = tmp_path_factory.mktemp("depth")
    directory = build_whisper_dir(root / "w4", layers=4)
    bundle = root / "d.safetensors"
    from dsnn_compress.cli import main

    assert main(["prune", str(directory), "--granularity", "structured", "--levels", LEVELS, "--depth",
                 "0.5:1,0.7:2", "--encoder-depth", "0.7:1", "--depth-order", "first-last", "-o", str(bundle)]) == 0
    return SimpleNamespace(root=root, directory=directory, bundle=bundle)


def audio_only(path: Path, keep: int = 6) -> Path:
    rows = [json.loads(line) for line in MANIFEST.read_text().splitlines()][:keep]
    path.write_text("".join(json.dumps({"audio_filepath": str(MANIFEST.parent / r["audio_filepath"])}) + "\n"
                            for r in rows))
    return path


# ----------------------------------------------------------------------------------------------- the plan


def test_depth_counts_follow_the_nearest_denser_named_level():
    assert parse_depth("0.5:1,0.9:3", [0.3, 0.5, 0.7, 0.9], 4) == (0, 1, 1, 3)
    assert parse_depth("0.3:1", [0.3, 0.5], 4) == (1, 1)
    assert auto_counts([0.3, 0.5, 0.7], 4) == (1, 2, 2)
    assert auto_counts([0.9], 2) == (1,)  # never every layer


@pytest.mark.parametrize("spec, fragment", [
    ("0.5:4", "drops 4 of 4 layers: every layer would be removed"),
    ("0.3:2,0.5:1", "drops fewer layers at a sparser level"),
    ("0.6:1", "0.6"),
    ("0.5", "is not LEVEL:LAYERS"),
    ("0.5:x", "is not a whole number"),
    ("0:1", "the dense level keeps every layer"),
])
def test_bad_depth_specs_are_usage_errors(spec: str, fragment: str):
    with pytest.raises(UsageError, match=fragment.replace(".", r"\.")):
        parse_depth(spec, [0.3, 0.5], 4)


def test_layer_codes_make_nested_drops():
    stack = StackDepth("s", 5, (3, 1, 0, 2, 4), (1, 1, 3))
    stack.check(3)
    # layer 3 goes at level 1, layer 1 at level 3 (the counts stay at 1 for level 2), layer 0 at level 3
    assert stack.layer_codes() == [2, 2, 3, 0, 3]
    assert [stack.dropped_at(k) for k in range(4)] == [[], [3], [3], [3, 1, 0]]
    for k in range(1, 3):
        assert set(stack.dropped_at(k)) <= set(stack.dropped_at(k + 1))
    assert first_last_order(4) == (2, 1, 0, 3) and first_last_order(5)[-2:] == (0, 4)


# ------------------------------------------------------------------------------------------ on a real model


def test_every_parameter_of_a_dropped_layer_is_pruned_exactly_where_dropped(deep):
    bundle = load_bundle(deep.bundle)
    stacks = {s.name: s for s in bundle.depth}
    assert stacks["model.decoder.layers"].dropped == (0, 1, 2)
    assert stacks["model.encoder.layers"].dropped == (0, 0, 1)
    for name in bundle.tensors:
        for stack in bundle.depth:
            for k in range(1, 4):
                inside = any(name.startswith(f"{stack.name}.{i}.") for i in stack.dropped_at(k))
                if inside:  # every entry of the tensor is pruned at level k
                    assert name in bundle.codes and bool((bundle.codes[name] < k).all()), (name, k)
    report = json.loads(run_cli_json(deep.bundle))
    depth = {d["stack"]: d["kept"] for d in report["structured"]["depth"]}
    assert depth["model.decoder.layers"]["0.7"] == [0, 3] and depth["model.encoder.layers"]["0.7"] == [0, 1, 3]


def run_cli_json(bundle: Path) -> str:
    import contextlib
    import io

    from dsnn_compress.cli import main

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(["inspect", str(bundle), "--json"]) == 0
    return buffer.getvalue()


@pytest.mark.parametrize("level", ["0.5", "0.7"])
def test_exported_smaller_model_decodes_like_the_bundles_level(deep, tmp_path, capsys, level):
    export = tmp_path / f"hf-{level}"
    code, _, err = run_cli(capsys, "export", deep.bundle, "--level", level, "--format", "hf", "-o", export)
    assert code == 0, err
    config = json.loads((export / "config.json").read_text())
    dropped = {"0.5": (1, 0), "0.7": (2, 1)}[level]
    assert (config["decoder_layers"], config["encoder_layers"]) == (4 - dropped[0], 4 - dropped[1])
    small = transformers.WhisperForConditionalGeneration.from_pretrained(str(export), local_files_only=True).eval()
    processor = transformers.WhisperProcessor.from_pretrained(str(deep.directory), local_files_only=True)
    # the independent reference: transformers' own smaller model; against it, dsnn's level on views and the
    # full-size model with the level's weights zeroed (a zeroed pre-norm layer is the identity)
    loaded = load_model(deep.bundle)
    loaded.set_level(level)
    masked = open_source(deep.bundle).adapter()
    masked.model.load_state_dict(load_bundle(deep.bundle).state_dict_at(level), strict=False)
    for clip in CLIPS:
        wave = load_audio(clip, 16000)
        features = processor(wave, sampling_rate=16000, return_tensors="pt").input_features
        with torch.no_grad():
            expected = small.generate(input_features=features, max_new_tokens=12, return_timestamps=False)[0]
            batch = pad_batch([loaded.adapter.prepare(wave)], [[]], [""], ["x"])
            views = loaded.adapter.model.generate(input_features=loaded.adapter.features(batch), max_new_tokens=12,
                                                  return_timestamps=False)[0]
            full = masked.model.generate(input_features=features, max_new_tokens=12, return_timestamps=False)[0]
        assert views.tolist() == expected.tolist() == full.tolist(), clip.name
    loaded.set_level(0)  # views restore every layer and the layer indices of the decoder cache
    assert len(loaded.adapter.model.model.decoder.layers) == 4
    assert [layer.self_attn.layer_idx for layer in loaded.adapter.model.model.decoder.layers] == [0, 1, 2, 3]


def test_importance_order_drops_the_layer_whose_skip_costs_least(deep, tmp_path):
    adapter = open_source(deep.directory).adapter()
    audio = load_calibration(audio_only(tmp_path / "a.jsonl"), adapter, 6)
    order, costs = importance_order(adapter, audio, "model.decoder.layers", 4, 2, utterances=6)
    # by hand: skip each decoder layer alone and measure the KL from the dense posteriors
    batch = next(audio.batches(adapter, batch_size=6))
    with torch.no_grad():
        labelled = self_labelled(adapter, batch)
        reference, lengths = adapter.log_probs(labelled)
        alone = []
        for layer in range(4):
            saved = [p.detach().clone() for p in layer_parameters(adapter.model, "model.decoder.layers", layer)]
            for p in layer_parameters(adapter.model, "model.decoder.layers", layer):
                p.zero_()
            alone.append(float(distillation_loss(reference, adapter.log_probs(labelled)[0], lengths, 1.0)))
            for p, value in zip(layer_parameters(adapter.model, "model.decoder.layers", layer), saved, strict=True):
                p.copy_(value)
    assert order[0] == min(range(4), key=lambda i: alone[i])
    assert costs[0] == pytest.approx(alone[order[0]], rel=1e-5)
    assert len(set(order)) == 2 and costs[1] >= 0


def test_depth_auto_measures_and_says_what_it_chose(deep, tmp_path, capsys):
    out = tmp_path / "auto.safetensors"
    code, _, err = run_cli(capsys, "prune", deep.directory, "--granularity", "structured", "--levels", "0.3,0.5",
                           "--depth", "auto", "--calibration", audio_only(tmp_path / "a.jsonl"), "-o", out)
    assert code == 0, err
    assert "decoder layers dropped first by measured importance" in " ".join(err.split())
    stack = load_bundle(out).depth[0]
    assert (stack.chosen_by, stack.dropped) == ("importance", (1, 2))
    assert load_bundle(out).metadata["depth_calibration"]["utterances"] == 6


def test_finetuning_keeps_the_dropped_layers(deep, tmp_path, capsys):
    out = tmp_path / "tuned.safetensors"
    code, _, err = run_cli(capsys, "finetune", deep.bundle, "--data", MANIFEST, "--steps", "1", "-o", out, "--set",
                           "data.max_batch_size=4")
    assert code == 0, err
    before, after = load_bundle(deep.bundle), load_bundle(out)
    assert [s.to_json() for s in after.depth] == [s.to_json() for s in before.depth]
    assert all(torch.equal(after.structured.codes[n], c) for n, c in before.structured.codes.items())
    assert all(torch.equal(after.codes[n], before.codes[n]) for n in before.codes)
    assert_usage_error(run_cli(capsys, "finetune", deep.bundle, "--data", MANIFEST, "--steps", "2", "-o",
                               tmp_path / "g.safetensors", "--set", "schedule.enabled=true", "--set",
                               "schedule.end_step=1"), "would undo this bundle's dropped layers")


@pytest.mark.parametrize("extra, fragment", [
    (["--granularity", "structured", "--depth", "0.5:4"], "every layer would be removed"),
    (["--granularity", "structured", "--depth", "0.2:2,0.5:1"], "depth levels must be nested"),
    (["--depth", "0.5:1"], "need --granularity structured"),
    (["--granularity", "structured", "--depth", "auto"], "--depth auto measures each layer's importance"),
    (["--granularity", "structured", "--depth", "0.5:1", "--depth-order", "random"], "unknown --depth-order"),
])
def test_bad_depth_requests_exit_2_and_write_nothing(deep, tmp_path, capsys, extra, fragment):
    out = tmp_path / "out"
    out.mkdir()
    result = run_cli(capsys, "prune", deep.directory, "--levels", LEVELS, "-o", out / "b.safetensors", *extra)
    assert_usage_error(result, fragment)
    assert result.out == "" and list(out.iterdir()) == []


def test_depth_on_a_family_without_layer_stacks_is_refused(tiny_model: TinyModel, tmp_path, capsys):
    result = run_cli(capsys, "prune", tiny_model.checkpoint, "--levels", "0.5", "--granularity", "structured",
                     "--depth", "0.5:1", "--depth-order", "first-last", "-o", tmp_path / "b.safetensors")
    assert_usage_error(result, "depth levels are not available for conformer-ctc models")
    assert not (tmp_path / "b.safetensors").exists()
