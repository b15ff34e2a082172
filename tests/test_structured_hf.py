"""Structured levels of the hf-ctc family (wav2vec2, HuBERT, WavLM, Data2VecAudio ForCTC): FFN neuron groups.

Oracles: a permutation of the FFN neurons applied to both Linears computes the same logits (and the same permutation
of the rows alone does not); the smaller ``save_pretrained`` directory of a level, loaded by transformers'
``from_pretrained`` with no dsnn code, computes the logits of the full-size model with the level's zero masks
(``Bundle.state_dict_at``); a ``global`` level is refused for ``hf`` and written as a dsnn checkpoint instead.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from asr_fixtures import adapter_at  # noqa: E402
from helpers import assert_usage_error, prune_structured, run_cli  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from test_hf_ctc import ARCH, MANIFEST, PREFIX, attention_mask, build_hf_dir, utterance_batch  # noqa: E402

from dsnn_compress.core.bundle import load_bundle  # noqa: E402
from dsnn_compress.core.groups import permute_groups  # noqa: E402
from dsnn_compress.data.manifest import read_manifest  # noqa: E402
from dsnn_compress.errors import DsnnError  # noqa: E402
from dsnn_compress.models.hf_ctc import HF_CTC  # noqa: E402
from dsnn_compress.runtime.runnable import load_model  # noqa: E402
from dsnn_compress.sources.opener import load_checkpoint_adapter, open_source  # noqa: E402

KINDS = ("w2v-group", "w2v-layer", "hubert", "wavlm", "data2vec")
ARCH.update({"wavlm": "WavLMForCTC", "data2vec": "Data2VecAudioForCTC"})
HIDDEN = 48
LEVELS = (0.5, 0.75)
TOL = 1e-4

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, one_torch_thread) -> dict[str, Path]:
    """A tiny random model directory per kind (2 encoder layers, FFN size 48), FFN weights spread in magnitude."""
    root = tmp_path_factory.mktemp("structured_hf")
    out = {}
    for i, kind in enumerate(KINDS):
        directory = build_hf_dir(root / kind, kind, seed=10 + i)
        state = load_file(str(directory / "model.safetensors"))
        torch.manual_seed(i)
        for name in state:  # distinct neuron norms, so the ranking is not a near-tie of the random init
            if "feed_forward.intermediate_dense.weight" in name:
                state[name] = (state[name] * torch.rand(state[name].shape[0], 1) * 3).contiguous()
        save_file(state, str(directory / "model.safetensors"), {"format": "pt"})
        out[kind] = directory
    return out


def log_probs(adapter, batch) -> torch.Tensor:
    with torch.no_grad():
        values, lengths = adapter.log_probs(batch)
    return values * (torch.arange(values.shape[1])[None, :, None] < lengths[:, None, None])


# ------------------------------------------------------------------------------------------------- groups


@pytest.mark.parametrize("kind", KINDS)
def test_a_permutation_of_ffn_neurons_does_not_change_the_logits(dirs, kind):
    adapter = open_source(dirs[kind]).adapter()
    specs = HF_CTC.structured_groups(adapter)
    assert [s.name for s in specs] == [f"{PREFIX[kind]}.encoder.layers.{i}.feed_forward" for i in range(2)]
    assert {s.kind for s in specs} == {"ffn-neuron"} and all(s.count == HIDDEN for s in specs)
    batch = utterance_batch(adapter, 2)
    before = log_probs(adapter, batch)
    state = adapter.model.state_dict()
    torch.manual_seed(1)
    orders = {s.name: torch.randperm(s.count) for s in specs}
    adapter.model.load_state_dict(permute_groups(specs, state, orders))
    assert (log_probs(adapter, batch) - before).abs().max() <= TOL
    # the same permutation of the first Linear alone (a broken coupling) changes what the network computes
    rows_only = [type(s)(s.name, s.kind, s.layer, s.count, s.members[:2]) for s in specs]
    adapter.model.load_state_dict(permute_groups(rows_only, state, orders))
    assert (log_probs(adapter, batch) - before).abs().max() > 1e-2


# --------------------------------------------------------------------------------------------- hf export


@pytest.mark.parametrize("kind", KINDS)
def test_per_layer_levels_export_as_smaller_hf_directories_equal_to_the_level(dirs, kind, tmp_path, capsys):
    bundle = prune_structured(capsys, dirs[kind], tmp_path / "b.safetensors", LEVELS)
    loaded = load_model(bundle)
    batch = utterance_batch(loaded.adapter, 3)
    dense_params = sum(p.numel() for p in loaded.adapter.model.parameters())
    for level in LEVELS:
        out = tmp_path / f"hf-{level}"
        result = run_cli(capsys, "export", bundle, "--level", level, "--format", "hf", "-o", out)
        assert result.code == 0, result.err
        width = HIDDEN - round(level * HIDDEN)
        assert json.loads((out / "config.json").read_text())["intermediate_size"] == width
        model, info = getattr(transformers, ARCH[kind]).from_pretrained(str(out), output_loading_info=True)
        model.eval()
        assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
        assert sum(p.numel() for p in model.parameters()) == dense_params - 2 * (HIDDEN - width) * (2 * 32 + 1)
        reference = adapter_at(bundle, level)
        with torch.no_grad():
            logits = model(batch.inputs, attention_mask=attention_mask(reference, batch)).logits
        expected = log_probs(reference, batch)
        got = torch.log_softmax(logits, -1)
        got = got * (expected != 0)  # the reference masks the padded frames
        assert (got - expected).abs().max() <= TOL
        loaded.set_level(level)  # the bundle's own level forward: prefix views of the dense weights
        assert (log_probs(loaded.adapter, batch) - expected).abs().max() <= TOL
        assert loaded.adapter.model.state_dict().keys() == reference.model.state_dict().keys()
    loaded.set_level(0.0)
    assert (log_probs(loaded.adapter, batch) - log_probs(adapter_at(bundle, 0.0), batch)).abs().max() <= TOL


def test_global_levels_are_refused_for_hf_and_exported_as_checkpoints(dirs, tmp_path, capsys):
    bundle = prune_structured(capsys, dirs["w2v-group"], tmp_path / "g.safetensors", LEVELS, "global")
    structured = load_bundle(bundle).structured
    kept = list(structured.kept(1).values())
    assert len(set(kept)) > 1 and sum(kept) == 2 * HIDDEN - round(0.5 * 2 * HIDDEN)  # one ranking, uneven layers
    result = run_cli(capsys, "export", bundle, "--level", "0.5", "--format", "hf", "-o", tmp_path / "hf")
    assert_usage_error(result, "cannot be written as hf", "one intermediate_size for all layers",
                       ", ".join(map(str, kept)), "--format checkpoint")
    assert not (tmp_path / "hf").exists()
    checkpoint = tmp_path / "level.safetensors"
    assert run_cli(capsys, "export", bundle, "--level", "0.5", "--format", "checkpoint", "-o", checkpoint).code == 0
    adapter = load_checkpoint_adapter(checkpoint)
    assert adapter.ffn_dims == kept
    assert [ff.feed_forward.intermediate_dense.out_features for ff in adapter.model.wav2vec2.encoder.layers] == kept
    batch = utterance_batch(adapter, 3)
    assert (log_probs(adapter, batch) - log_probs(adapter_at(bundle, 0.5), batch)).abs().max() <= TOL
    result = run_cli(capsys, "transcribe", checkpoint, read_manifest(MANIFEST)[0].audio_path)
    assert result.code == 0, result.err
    result = run_cli(capsys, "evaluate", bundle, "--data", MANIFEST, "--compact", "--json", tmp_path / "r.json")
    assert result.code == 0, result.err  # evaluate runs each level as its smaller model (checkpoint sizes)
    # the checkpoint of the smaller model still cannot become a Hugging Face directory
    with pytest.raises(DsnnError, match="one intermediate_size"):
        HF_CTC.save_hf(adapter, tmp_path / "hf2")


def test_bad_ffn_dims_metadata_is_refused(dirs):
    meta = dict(open_source(dirs["hubert"]).model_meta)
    for bad in ([10], [10, 0], "48,48", [10, True]):
        with pytest.raises(DsnnError, match="ffn_dims must be a list of 2 positive integers"):
            HF_CTC.from_metadata({**meta, "ffn_dims": bad})


def test_structured_finetune_then_export_round_trip(dirs, tmp_path, capsys):
    bundle = prune_structured(capsys, dirs["w2v-layer"], tmp_path / "b.safetensors", LEVELS)
    tuned = tmp_path / "tuned.safetensors"
    result = run_cli(capsys, "finetune", bundle, "--data", MANIFEST, "-o", tuned, "--steps", "2",
                     "--set", "data.max_batch_size=4", "--json")
    assert result.code == 0, result.err
    before, after = load_bundle(bundle), load_bundle(tuned)
    assert after.structured is not None and after.structured.prefix_ordered()
    assert after.structured.kept(1) == before.structured.kept(1)
    assert any(not torch.equal(before.tensors[n], after.tensors[n]) for n in before.codes)
    out = tmp_path / "hf"
    assert run_cli(capsys, "export", tuned, "--level", "0.5", "--format", "hf", "-o", out).code == 0
    model = transformers.Wav2Vec2ForCTC.from_pretrained(str(out)).eval()
    reference = adapter_at(tuned, 0.5)
    batch = utterance_batch(reference, 3)
    with torch.no_grad():
        got = torch.log_softmax(model(batch.inputs, attention_mask=attention_mask(reference, batch)).logits, -1)
    expected = log_probs(reference, batch)
    assert ((got * (expected != 0)) - expected).abs().max() <= TOL
