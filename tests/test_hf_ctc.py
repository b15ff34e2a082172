"""The ``hf-ctc`` family: tiny random Hugging Face CTC models through every dsnn command, offline.

Three models are built from configs and saved with ``save_pretrained`` (plus a ``Wav2Vec2CTCTokenizer`` and a
``Wav2Vec2FeatureExtractor``): a group-norm ``Wav2Vec2ForCTC`` (no attention mask), a layer-norm (stable layer norm)
``Wav2Vec2ForCTC`` (attention mask) and a group-norm ``HubertForCTC``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

transformers = pytest.importorskip("transformers")

from helpers import run_cli  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from dsnn_compress.cli import main  # noqa: E402
from dsnn_compress.core.bundle import load_bundle  # noqa: E402
from dsnn_compress.data.audio import load_audio  # noqa: E402
from dsnn_compress.data.batch import pad_batch  # noqa: E402
from dsnn_compress.data.manifest import read_manifest  # noqa: E402
from dsnn_compress.errors import DsnnError, UsageError  # noqa: E402
from dsnn_compress.models import hf_ctc  # noqa: E402
from dsnn_compress.models.registry import adapter_from_metadata  # noqa: E402
from dsnn_compress.runtime.runnable import load_model  # noqa: E402
from dsnn_compress.sources.opener import open_source  # noqa: E402

DATA = Path(__file__).parent / "data"
MANIFEST = DATA / "manifest.jsonl"
VOCAB = ["<pad>", "<unk>", "|", *"ABCDEFGHIJKLMNOPQRSTUVWXYZ'"]
LEVELS = "0.5,0.9"
LAYERS = 2
KINDS = ("w2v-group", "w2v-layer", "hubert")
PREFIX = {"w2v-group": "wav2vec2", "w2v-layer": "wav2vec2", "hubert": "hubert"}
ARCH = {"w2v-group": "Wav2Vec2ForCTC", "w2v-layer": "Wav2Vec2ForCTC", "hubert": "HubertForCTC"}
ENCODER_LINEARS = ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.out_proj",
                   "feed_forward.intermediate_dense", "feed_forward.output_dense")


def expected_prunable(kind: str) -> list[str]:
    """By construction: the six Linear layers of each transformer encoder layer, nothing else."""
    return sorted(f"{PREFIX[kind]}.encoder.layers.{i}.{name}.weight" for i in range(LAYERS) for name in ENCODER_LINEARS)


def _config_kwargs(kind: str) -> dict:
    return dict(
        hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=48,
        conv_dim=(16, 16, 16), conv_kernel=(10, 3, 3), conv_stride=(5, 4, 4), conv_bias=kind == "w2v-layer",
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, vocab_size=len(VOCAB), pad_token_id=0,
        feat_extract_norm="layer" if kind == "w2v-layer" else "group", do_stable_layer_norm=kind == "w2v-layer",
        hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0, final_dropout=0.0,
        layerdrop=0.0,
    )


CLASSES = {"w2v-group": ("Wav2Vec2ForCTC", "Wav2Vec2Config"), "w2v-layer": ("Wav2Vec2ForCTC", "Wav2Vec2Config"),
           "hubert": ("HubertForCTC", "HubertConfig"), "wavlm": ("WavLMForCTC", "WavLMConfig"),
           "data2vec": ("Data2VecAudioForCTC", "Data2VecAudioConfig")}
PREFIX.update({"wavlm": "wavlm", "data2vec": "data2vec_audio"})


def build_hf_dir(directory: Path, kind: str, seed: int = 0) -> Path:
    """A tiny random ``*ForCTC`` model, its tokenizer and feature extractor, saved with ``save_pretrained``."""
    directory.mkdir(parents=True)
    torch.manual_seed(seed)
    kwargs = _config_kwargs(kind)
    if kind == "data2vec":  # layer-norm feature encoder always; a stack of positional convolutions
        for key in ("feat_extract_norm", "do_stable_layer_norm", "num_conv_pos_embeddings"):
            kwargs.pop(key)
        kwargs.update(conv_pos_kernel_size=5, num_conv_pos_embeddings=5)
    model_name, config_name = CLASSES[kind]
    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**kwargs))
    with torch.no_grad():  # an uninformative head (zero init) would make every level decode to ""
        model.lm_head.weight.normal_(0.0, 0.5)
        model.lm_head.bias.normal_(0.0, 0.5)
    model.save_pretrained(str(directory))
    vocab_file = directory / "vocab.json"
    vocab_file.write_text(json.dumps({token: i for i, token in enumerate(VOCAB)}))
    tokenizer = transformers.Wav2Vec2CTCTokenizer(str(vocab_file), unk_token="<unk>", pad_token="<pad>",
                                                  word_delimiter_token="|")
    tokenizer.save_pretrained(str(directory))
    transformers.Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                                          return_attention_mask=kind == "w2v-layer").save_pretrained(str(directory))
    return directory


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory, one_torch_thread) -> dict[str, dict[str, Path]]:
    """For each kind: the save_pretrained directory and its bundle (levels 0.5, 0.9) pruned through the CLI."""
    root = tmp_path_factory.mktemp("hf_ctc")
    out = {}
    for i, kind in enumerate(KINDS):
        directory = build_hf_dir(root / kind, kind, seed=i)
        bundle = root / f"{kind}.safetensors"
        assert main(["prune", str(directory), "--levels", LEVELS, "-o", str(bundle)]) == 0
        out[kind] = {"dir": directory, "bundle": bundle}
    return out


def utterance_batch(adapter, count: int = 3):
    utterances = read_manifest(MANIFEST)[-count:]
    waves = [load_audio(u.audio_path, adapter.sample_rate) for u in utterances]
    return pad_batch([adapter.prepare(w) for w in waves], [[] for _ in waves], ["" for _ in waves],
                     [u.id for u in utterances])


def attention_mask(adapter, batch):
    if not adapter.use_attention_mask:
        return None
    return (torch.arange(batch.inputs.shape[1])[None, :] < batch.input_lengths[:, None]).long()


# ----------------------------------------------------------------------------------------------- prune / inspect


@pytest.mark.parametrize("kind", KINDS)
def test_prune_uses_the_encoder_linears_only(models, kind):
    bundle = load_bundle(models[kind]["bundle"])
    assert sorted(bundle.codes) == expected_prunable(kind)
    assert "lm_head.weight" in bundle.tensors and "lm_head.weight" not in bundle.codes
    dense = [n for n in bundle.tensors if any(p in n for p in ("feature_extractor", "pos_conv", "norm",
                                                                "masked_spec_embed", "feature_projection"))]
    assert dense and not set(dense) & set(bundle.codes)
    meta = bundle.metadata["model"]
    assert meta["family"] == "hf-ctc" and meta["architecture"] == ARCH[kind]
    assert meta["sample_rate"] == 16000 and meta["normalizer"] == "default"
    assert {"config.json", "vocab.json", "preprocessor_config.json"} <= set(meta["hf_files"])
    assert bundle.metadata["selection"]["defaults"] == "model"
    # the bundle keeps exactly the tensors (and names) save_pretrained wrote
    assert set(bundle.tensors) == set(load_file(str(models[kind]["dir"] / "model.safetensors")))


def test_inspect(models, capsys):
    code, out, err = run_cli(capsys, "inspect", models["w2v-group"]["bundle"], "--json")
    assert code == 0, err
    report = json.loads(out)
    assert [entry["level"] for entry in report["levels"]] == [0.0, 0.5, 0.9]
    assert report["model"]["family"] == "hf-ctc" and report["selection"]["defaults"] == "model"
    assert "lm_head.weight" in report["not_pruned"]
    code, out, err = run_cli(capsys, "inspect", models["w2v-group"]["bundle"], "--layers")
    assert code == 0, err
    assert "encoder.layers.1.feed_forward.output_dense.weight" in out


def test_default_prunable_of_the_adapter_matches(models, capfd):
    from dsnn_compress.models.base import ModelAdapter

    adapter = hf_ctc.adapter_from_source(open_source(models["hubert"]["dir"]))
    assert sorted(adapter.default_prunable()) == expected_prunable("hubert")
    assert adapter.output_head() is adapter.model.lm_head  # found structurally, not by name
    # the protocol's public attributes, normalizer included (evaluate / finetune read it)
    assert isinstance(adapter, ModelAdapter) and adapter.family == "hf-ctc"
    assert adapter.normalizer == "default" == adapter.metadata()["normalizer"]
    batch = utterance_batch(adapter, 2)
    adapter.decode(batch)
    adapter.loss(pad_batch([batch.inputs[0]], [adapter.encode_text("call sarah")], [""], ["x"]))
    assert capfd.readouterr() == ("", "")  # adapters print nothing (the CLI owns the console)


# ----------------------------------------------------------------------------------------------- evaluate / transcribe


def _jiwer_counts(output) -> dict:
    return {"substitutions": output.substitutions, "deletions": output.deletions, "insertions": output.insertions,
            "hits": output.hits}


@pytest.mark.parametrize("kind", ["w2v-group", "w2v-layer"])
def test_evaluate_report_is_complete(models, kind, tmp_path, capsys):
    """Every level's scores equal an independent decode-and-score of the same utterances at that level."""
    import jiwer

    from dsnn_compress.data.text import get_normalizer

    report_path = tmp_path / "report.json"
    code, _, err = run_cli(capsys, "evaluate", models[kind]["bundle"], "--data", MANIFEST, "--json", report_path,
                           "--details")
    assert code == 0, err
    report = json.loads(report_path.read_text())
    bundle = load_bundle(models[kind]["bundle"])
    assert report["model"]["family"] == "hf-ctc" and report["normalizer"] == "default"
    assert [entry["level"] for entry in report["levels"]] == list(bundle.all_levels) == [0.0, 0.5, 0.9]

    utterances = read_manifest(MANIFEST)
    normalize = get_normalizer("default")
    references = [normalize(u.text) for u in utterances]
    assert [u["reference"] for u in report["utterances"]] == references
    # parameters counted from a plain Hugging Face model: dense tensors whole, pruned tensors by their nonzeros
    hf_params = dict(getattr(transformers, ARCH[kind]).from_pretrained(str(models[kind]["dir"]),
                                                                       local_files_only=True).named_parameters())
    assert set(bundle.codes) < set(hf_params)
    assert all(torch.count_nonzero(bundle.tensors[n]) == bundle.tensors[n].numel() for n in bundle.codes)
    dense_params = sum(p.numel() for n, p in hf_params.items() if n not in bundle.codes)

    hypotheses = {}
    for entry in report["levels"]:
        level = entry["level"]
        state = bundle.state_dict_at(level)
        # a fresh adapter holding the level's weights (no level switching), all utterances in one padded batch
        adapter = adapter_from_metadata(bundle.metadata["model"], state)
        waves = [load_audio(u.audio_path, adapter.sample_rate) for u in utterances]
        batch = pad_batch([adapter.prepare(w) for w in waves], [[] for _ in waves], ["" for _ in waves],
                          [u.id for u in utterances])
        with torch.no_grad():
            hyps = [normalize(text) for text in adapter.decode(batch)]
        hypotheses[level] = hyps
        assert [u["hypotheses"][f"{level:g}"] for u in report["utterances"]] == hyps
        words = jiwer.process_words(references, hyps)
        chars = jiwer.process_characters(references, hyps)
        assert entry["wer"] == pytest.approx(words.wer, abs=1e-9)
        assert entry["cer"] == pytest.approx(chars.cer, abs=1e-9)
        assert {k: entry["words"][k] for k in _jiwer_counts(words)} == _jiwer_counts(words)
        assert {k: entry["chars"][k] for k in _jiwer_counts(chars)} == _jiwer_counts(chars)
        assert entry["words"]["reference_length"] == sum(len(r.split()) for r in references) == 21
        assert entry["nonzero_params"] == dense_params + sum(int(torch.count_nonzero(state[n])) for n in bundle.codes)
        assert entry["utterances_scored"] == 8 and entry["utterances_skipped"] == 0 and entry["rtfx"] > 0
    assert hypotheses[0.0] != hypotheses[0.9]  # the levels really decode differently, so a level mix-up shows
    nonzero = [entry["nonzero_params"] for entry in report["levels"]]
    assert nonzero[0] == sum(p.numel() for p in hf_params.values()) and nonzero[0] > nonzero[1] > nonzero[2]


def test_transcribe_matches_the_runtime_at_that_level(models, capsys):
    files = [u.audio_path for u in read_manifest(MANIFEST)[-2:]]
    code, out, err = run_cli(capsys, "transcribe", models["w2v-layer"]["bundle"], *files, "--level", "0.9")
    assert code == 0, err
    texts = [line.split("\t", 1)[1] for line in out.splitlines()]
    loaded = load_model(models["w2v-layer"]["bundle"])
    loaded.set_level(0.9)
    expected = [loaded.adapter.decode(pad_batch([loaded.adapter.prepare(load_audio(f, 16000))], [[]], [""], ["x"]))[0]
                for f in files]
    assert texts == expected
    assert all(text == text.lower() for text in texts)  # the default normaliser lower-cases


def test_8khz_audio_is_resampled_to_the_feature_extractor_rate(models, tmp_path, capsys, monkeypatch):
    source = read_manifest(MANIFEST)[-1].audio_path
    wave16 = load_audio(source, 16000)
    wav8 = tmp_path / "narrowband.wav"
    sf.write(str(wav8), soxr.resample(wave16, 16000, 8000), 8000, subtype="PCM_16")
    seen = []
    original = hf_ctc.HFCTCAdapter.prepare

    def spy(self, waveform):
        seen.append(len(waveform))
        return original(self, waveform)

    monkeypatch.setattr(hf_ctc.HFCTCAdapter, "prepare", spy)
    code, out, err = run_cli(capsys, "transcribe", models["w2v-group"]["bundle"], wav8)
    assert code == 0, err
    assert out.startswith(f"{wav8}\t")
    assert abs(seen[0] - len(wave16)) <= 2  # 8 kHz file -> 16 kHz samples


# ----------------------------------------------------------------------------------------------- text and conventions


def test_text_mapping_and_decoding(models):
    adapter = load_model(models["w2v-group"]["bundle"]).adapter
    ids = adapter.encode_text("call liam it can't")
    assert ids == adapter.tokenizer.convert_tokens_to_ids(list("CALL|LIAM|IT|CAN'T"))
    assert adapter.decode_ids(ids) == "call liam it can't"
    with pytest.raises(DsnnError, match="outside the model's vocabulary"):
        adapter.encode_text("café")
    assert adapter.blank_id == 0
    assert adapter.prepare(np.zeros(10, dtype=np.float32)).shape[0] >= 10  # padded to one output frame


def test_layer_norm_model_masks_padding(models):
    adapter = load_model(models["w2v-layer"]["bundle"]).adapter
    assert adapter.use_attention_mask
    batch = utterance_batch(adapter)
    assert len(set(batch.input_lengths.tolist())) == 3
    with torch.no_grad():
        padded, lengths = adapter.log_probs(batch)
        for i in range(len(batch)):
            n = int(batch.input_lengths[i])
            single = pad_batch([batch.inputs[i, :n]], [[]], [""], ["x"])
            alone, alone_len = adapter.log_probs(single)
            assert int(alone_len[0]) == int(lengths[i]) == alone.shape[1]
            torch.testing.assert_close(padded[i, : int(lengths[i])], alone[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_attention_mask_convention(models, kind, monkeypatch):
    adapter = load_model(models[kind]["bundle"]).adapter
    batch = utterance_batch(adapter, 2)
    calls = []
    forward = adapter.model.forward

    def spy(*args, **kwargs):
        calls.append(kwargs.get("attention_mask"))
        return forward(*args, **kwargs)

    monkeypatch.setattr(adapter.model, "forward", spy)
    with torch.no_grad():
        adapter.log_probs(batch)
        adapter.loss(pad_batch([batch.inputs[0]], [adapter.encode_text("call sarah")], [""], ["x"]))
    if kind == "w2v-layer":
        assert all(mask is not None for mask in calls)
        assert calls[0].sum(-1).tolist() == batch.input_lengths.tolist()
    else:
        assert calls == [None, None]  # group-norm models were trained without attention masks


def test_loss_is_the_models_ctc_loss_with_zero_infinity_and_mean(models):
    adapter = load_model(models["w2v-group"]["bundle"]).adapter
    batch = utterance_batch(adapter, 2)
    batch = pad_batch([batch.inputs[i, : int(batch.input_lengths[i])] for i in range(2)],
                      [adapter.encode_text("call sarah"), adapter.encode_text("x" * 500)], ["", ""], ["a", "b"])
    loss, log_probs, lengths = adapter.loss_and_log_probs(batch)
    assert torch.isfinite(loss)  # the impossible second target is zeroed, not inf
    config = adapter.model.config
    assert (config.ctc_zero_infinity, config.ctc_loss_reduction) == (False, "sum")  # the stored config is unchanged
    targets = batch.targets.masked_fill(batch.targets < 0, 0)
    per_utt = torch.nn.functional.ctc_loss(log_probs.transpose(0, 1), targets,
                                           torch.full_like(lengths, log_probs.shape[1]), batch.target_lengths,
                                           blank=0, reduction="none", zero_infinity=True)
    expected = (per_utt / batch.target_lengths).mean()  # no attention mask: the model uses every frame
    torch.testing.assert_close(loss, expected, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("kind", KINDS)
def test_export_hf_matches_the_runtime_level(models, kind, tmp_path, capsys):
    from dsnn_compress.core.masked import run_at_level
    from dsnn_compress.models.base import AdapterRunner

    out_dir = tmp_path / "exported"
    code, _, err = run_cli(capsys, "export", models[kind]["bundle"], "--level", "0.9", "--format", "hf",
                           "-o", out_dir)
    assert code == 0, err
    assert {"config.json", "model.safetensors", "vocab.json", "preprocessor_config.json",
            "tokenizer_config.json"} <= {p.name for p in out_dir.iterdir()}
    hf_cls = getattr(transformers, ARCH[kind])
    exported = hf_cls.from_pretrained(str(out_dir), local_files_only=True).eval()
    bundle = load_bundle(models[kind]["bundle"])
    state = exported.state_dict()
    for name in bundle.codes:
        pruned = ~bundle.mask(name, 0.9)
        assert pruned.any() and torch.all(state[name][pruned] == 0)
        torch.testing.assert_close(state[name][~pruned], bundle.tensors[name][~pruned], atol=0, rtol=0)

    loaded = load_model(models[kind]["bundle"])
    loaded.set_level(0.9)
    adapter = loaded.adapter
    batch = utterance_batch(adapter)
    mask = attention_mask(adapter, batch)
    with torch.no_grad():
        ours = adapter.model(batch.inputs, attention_mask=mask).logits
        theirs = exported(batch.inputs, attention_mask=mask).logits
    assert (ours - theirs).abs().max() <= 1e-5
    # the functional (training) path at that level gives the same transcripts as the in-place switch
    fresh = adapter_from_metadata(bundle.metadata["model"], bundle.tensors)
    params = dict(fresh.model.named_parameters())
    with torch.no_grad():
        functional = run_at_level(AdapterRunner(fresh), params, bundle.codes, 2, batch, "decode")
    assert functional == adapter.decode(batch)

    # the exported directory is a complete Hugging Face model: its processor decodes like our runtime
    processor = transformers.Wav2Vec2Processor.from_pretrained(str(out_dir), local_files_only=True)
    waves = [load_audio(u.audio_path, 16000) for u in read_manifest(MANIFEST)[-1:]]
    features = processor(waves[0], sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        ids = exported(features.input_values).logits.argmax(-1)
    # HF's skip_special_tokens would drop blanks before merging repeats; ours drops <unk> after CTC collapsing
    hf_text = " ".join(processor.batch_decode(ids)[0].replace("<unk>", "").lower().split())
    ours_text = adapter.decode(pad_batch([adapter.prepare(waves[0])], [[]], [""], ["x"]))[0]
    assert hf_text == ours_text


def test_compressed_hf_export_is_read_back_bit_exact(models, tmp_path, capsys):
    """``--format hf --compress``: a sparse-bitmask ``model.safetensors`` plus ``quantization_config`` in
    ``config.json``; dsnn's loader (evaluate/transcribe) reads it back bit-exactly, also at a continuous level."""
    bundle = load_bundle(models["w2v-group"]["bundle"])
    for level in ("0.9", "0.7"):
        out_dir, dense_dir = tmp_path / f"c{level}", tmp_path / f"d{level}"
        for target, extra in ((out_dir, ["--compress"]), (dense_dir, [])):
            code, _, err = run_cli(capsys, "export", models["w2v-group"]["bundle"], "--level", level, "--format", "hf",
                                   "-o", target, *extra)
            assert code == 0, err
        config = json.loads((out_dir / "config.json").read_text())["quantization_config"]
        assert config["quant_method"] == "compressed-tensors"
        assert config["sparsity_config"]["format"] == "sparse-bitmask"
        assert sorted(config["sparsity_config"]["targets"]) == sorted(n[:-7] for n in bundle.codes)
        with safe_open(str(out_dir / "model.safetensors"), "pt") as fh:
            names = set(fh.keys())
        assert not any(n in names for n in bundle.codes)
        assert all(f"{n[:-7]}.bitmask" in names for n in bundle.codes)
        assert (out_dir / "model.safetensors").stat().st_size < 0.8 * (dense_dir / "model.safetensors").stat().st_size
        source = open_source(out_dir)
        expected = bundle.state_dict_at(float(level))
        assert source.runnable and set(source.tensors) == set(expected)
        assert all(torch.equal(source.tensors[n].view(torch.uint8), expected[n].contiguous().view(torch.uint8))
                   if expected[n].is_floating_point() else torch.equal(source.tensors[n], expected[n])
                   for n in expected)
    code, stdout, err = run_cli(capsys, "evaluate", tmp_path / "c0.9", "--data", MANIFEST, "--json", "-")
    assert code == 0, err
    report = json.loads(stdout)
    from dsnn_compress.evaluation.evaluate import EvaluateOptions, evaluate
    from_bundle = evaluate(models["w2v-group"]["bundle"], MANIFEST, EvaluateOptions(levels="0.9", repeats=1))
    assert report["levels"][0]["wer"] == from_bundle.levels[0].wer


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")  # torch, inside WavLM attention
@pytest.mark.parametrize("kind", ["wavlm", "data2vec"])
def test_other_architectures_prune_and_export(kind, tmp_path, capsys):
    directory = build_hf_dir(tmp_path / kind, kind)
    bundle_path = tmp_path / "b.safetensors"
    code, _, err = run_cli(capsys, "prune", directory, "--levels", LEVELS, "-o", bundle_path)
    assert code == 0, err
    assert sorted(load_bundle(bundle_path).codes) == expected_prunable(kind)
    code, _, err = run_cli(capsys, "export", bundle_path, "--level", "0.9", "--format", "hf", "-o", tmp_path / "x")
    assert code == 0, err
    exported = getattr(transformers, CLASSES[kind][0]).from_pretrained(str(tmp_path / "x"), local_files_only=True)
    loaded = load_model(bundle_path)
    loaded.set_level(0.9)
    assert loaded.adapter.use_attention_mask == (kind == "data2vec")
    batch = utterance_batch(loaded.adapter, 2)
    mask = attention_mask(loaded.adapter, batch)
    with torch.no_grad():
        ours = loaded.adapter.model(batch.inputs, attention_mask=mask).logits
        theirs = exported.eval()(batch.inputs, attention_mask=mask).logits
    assert (ours - theirs).abs().max() <= 1e-5


def test_export_all_levels_refuses_existing_dirs_without_force(models, tmp_path, capsys):
    bundle = models["w2v-group"]["bundle"]
    code, _, err = run_cli(capsys, "export", bundle, "--level", "all", "--format", "hf", "-o", tmp_path / "m")
    assert code == 0, err
    dirs = sorted(p.name for p in tmp_path.iterdir())
    assert dirs == ["m-0.5", "m-0.9", "m-dense"]  # no temp dirs left behind
    assert json.loads((tmp_path / "m-0.5" / "dsnn_export.json").read_text())["level"] == 0.5
    code, _, err = run_cli(capsys, "export", bundle, "--level", "0.5", "--format", "hf", "-o", tmp_path / "m-0.5")
    assert code == 2 and "already exists" in err
    before = (tmp_path / "m-dense" / "model.safetensors").read_bytes()
    code, _, err = run_cli(capsys, "export", bundle, "--level", "0.9", "--format", "hf", "-o", tmp_path / "m-dense",
                           "--force")
    assert code == 0, err
    assert (tmp_path / "m-dense" / "model.safetensors").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-0.5", "m-0.9", "m-dense"]
    code, _, err = run_cli(capsys, "export", bundle, "--level", "0.5", "--format", "onnx", "-o", tmp_path / "m.onnx")
    assert code == 2 and "--format hf" in err


def test_legacy_weight_norm_names_round_trip(models, tmp_path, capsys):
    """Checkpoints saved by older transformers spell the positional conv ``weight_g``/``weight_v``."""
    legacy = tmp_path / "legacy"
    shutil.copytree(models["w2v-group"]["dir"], legacy)
    tensors = load_file(str(legacy / "model.safetensors"))
    renamed = {k.replace("parametrizations.weight.original0", "weight_g")
               .replace("parametrizations.weight.original1", "weight_v"): v for k, v in tensors.items()}
    assert renamed.keys() != tensors.keys()
    save_file(renamed, str(legacy / "model.safetensors"), metadata={"format": "pt"})
    bundle_path = tmp_path / "legacy.safetensors"
    code, _, err = run_cli(capsys, "prune", legacy, "--levels", LEVELS, "-o", bundle_path)
    assert code == 0, err
    bundle = load_bundle(bundle_path)
    assert set(bundle.tensors) == set(renamed) and bundle.metadata["model"]["weight_norm"] == "weight_g"
    loaded = load_model(bundle_path)
    assert set(loaded.adapter.model.state_dict()) == set(renamed)
    out_dir = tmp_path / "exported"
    code, _, err = run_cli(capsys, "export", bundle_path, "--level", "0", "--format", "hf", "-o", out_dir)
    assert code == 0, err
    with safe_open(str(out_dir / "model.safetensors"), framework="pt") as handle:
        assert set(handle.keys()) == set(renamed)  # the export keeps the source's names
    exported = transformers.Wav2Vec2ForCTC.from_pretrained(str(out_dir), local_files_only=True).eval()
    original = transformers.Wav2Vec2ForCTC.from_pretrained(str(models["w2v-group"]["dir"]),
                                                           local_files_only=True).eval()
    batch = utterance_batch(loaded.adapter, 1)
    with torch.no_grad():
        assert (exported(batch.inputs).logits - original(batch.inputs).logits).abs().max() <= 1e-5
        assert (loaded.adapter.model(batch.inputs).logits - original(batch.inputs).logits).abs().max() <= 1e-5


# ----------------------------------------------------------------------------------------------- finetune


def test_finetune_two_steps_from_the_bundle(models, tmp_path, capsys):
    out = tmp_path / "tuned.safetensors"
    code, _, err = run_cli(capsys, "finetune", models["w2v-layer"]["bundle"], "--data", MANIFEST, "-o", out,
                           "--steps", "2", "--set", "data.max_batch_size=4", "--json")
    assert code == 0, err
    before, after = load_bundle(models["w2v-layer"]["bundle"]), load_bundle(out)
    assert set(after.tensors) == set(before.tensors) and set(after.codes) == set(before.codes)
    assert after.metadata["model"]["family"] == "hf-ctc"
    changed = [n for n in before.tensors if not torch.equal(before.tensors[n], after.tensors[n])]
    assert any("encoder.layers" in n for n in changed)
    assert not any("feature_extractor.conv_layers" in n for n in changed)  # the feature encoder is frozen
    code, _, err = run_cli(capsys, "transcribe", out, read_manifest(MANIFEST)[0].audio_path, "--level", "0.5")
    assert code == 0, err


def test_finetune_from_the_hf_directory(models, tmp_path, capsys):
    out = tmp_path / "tuned.safetensors"
    code, _, err = run_cli(capsys, "finetune", models["hubert"]["dir"], "--data", MANIFEST, "-o", out,
                           "--steps", "1", "--levels", LEVELS, "--set", "data.max_batch_size=4", "--json")
    assert code == 0, err
    bundle = load_bundle(out)
    assert sorted(bundle.codes) == expected_prunable("hubert")
    assert bundle.metadata["source"]["kind"] == "hf-dir"
    assert bundle.levels == (0.5, 0.9)

    # trained tensors moved away from the directory's weights; the frozen feature encoder did not
    source = load_file(str(models["hubert"]["dir"] / "model.safetensors"))
    assert set(bundle.tensors) == set(source)
    frozen = {n for n in source if n.startswith("hubert.feature_extractor.")}
    assert any("conv_layers.0.conv.weight" in n for n in frozen)
    for name in frozen:
        assert torch.equal(bundle.tensors[name], source[name]), f"frozen {name} moved"
    trained = set(bundle.codes) | {n for n in source if n.startswith(("lm_head.", "hubert.encoder.layers."))}
    unmoved = sorted(n for n in trained if torch.equal(bundle.tensors[n], source[n]))
    assert not unmoved, f"fine-tuning left {unmoved} unchanged"

    # no schedule: the codes are those of magnitude pruning the directory (the pruned fixture bundle), one nested code
    # per weight, and every weight coded below level k is zero at level k (state dict and live model alike)
    pruned = load_bundle(models["hubert"]["bundle"])
    assert set(pruned.codes) == set(bundle.codes)
    loaded = load_model(out)
    for name, codes in bundle.codes.items():
        assert torch.equal(codes, pruned.codes[name]), f"codes of {name} changed"
        assert codes.shape == bundle.tensors[name].shape and int(codes.min()) >= 0 and int(codes.max()) <= 2
    prunable = sum(c.numel() for c in bundle.codes.values())
    for k, level in enumerate(bundle.levels, start=1):
        state = bundle.state_dict_at(level)
        loaded.set_level(level)
        live = dict(loaded.adapter.model.named_parameters())
        removed = 0
        for name, codes in bundle.codes.items():
            dropped = codes < k
            assert torch.all(state[name][dropped] == 0) and torch.all(live[name].detach()[dropped] == 0)
            torch.testing.assert_close(live[name].detach()[~dropped], bundle.tensors[name][~dropped], atol=0, rtol=0)
            removed += int(dropped.sum())
        assert removed / prunable == pytest.approx(level, abs=2e-3)


# ----------------------------------------------------------------------------------------------- errors and laziness


def test_unsupported_architecture(models, tmp_path, capsys):
    other = tmp_path / "pretraining"
    shutil.copytree(models["w2v-group"]["dir"], other)
    config = json.loads((other / "config.json").read_text())
    config["architectures"] = ["Wav2Vec2ForPreTraining"]
    (other / "config.json").write_text(json.dumps(config))
    source = open_source(other)
    assert hf_ctc.hf_metadata_from_files(source.hf_files, list(source.tensors)) is None
    with pytest.raises(DsnnError, match="Wav2Vec2ForPreTraining") as excinfo:
        hf_ctc.adapter_from_source(source)
    assert "Wav2Vec2ForCTC, HubertForCTC, WavLMForCTC, Data2VecAudioForCTC" in excinfo.value.one_line()
    bundle_path = tmp_path / "generic.safetensors"
    code, _, err = run_cli(capsys, "prune", other, "--levels", LEVELS, "-o", bundle_path)
    assert code == 0, err  # generic (name-rule) pruning still works
    assert "model" not in load_bundle(bundle_path).metadata
    meta = dict(load_bundle(models["w2v-group"]["bundle"]).metadata["model"], architecture="SEWForCTC")
    with pytest.raises(DsnnError, match="SEWForCTC") as excinfo:
        adapter_from_metadata(meta)
    assert "supported architectures: Wav2Vec2ForCTC" in excinfo.value.one_line()
    with pytest.raises(UsageError, match="from scratch") as excinfo:
        hf_ctc.HF_CTC.new(list("abc"))
    assert "save_pretrained directory" in excinfo.value.one_line()


def test_missing_transformers_gives_the_install_hint(models, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    code, _, err = run_cli(capsys, "transcribe", models["w2v-group"]["bundle"], read_manifest(MANIFEST)[0].audio_path)
    assert code == 1
    assert 'install the Hugging Face extra: pip install "dsnn-compress[hf]"' in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "prune", models["w2v-group"]["dir"], "--levels", LEVELS, "-o", tmp_path / "b")
    assert code == 1 and "dsnn-compress[hf]" in err
    # explicit patterns need no model code: the bundle is written (and records the model for later use)
    code, _, err = run_cli(capsys, "prune", models["w2v-group"]["dir"], "--levels", LEVELS, "-o",
                           tmp_path / "b.safetensors", "--include", "*encoder.layers.*.weight")
    assert code == 0, err
    assert load_bundle(tmp_path / "b.safetensors").metadata["model"]["family"] == "hf-ctc"


def test_importing_the_cli_does_not_import_transformers():
    code = ("import sys, dsnn_compress.cli, dsnn_compress.prune, dsnn_compress.export.formats, "
            "dsnn_compress.models.hf_ctc; "
            "print('transformers' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
