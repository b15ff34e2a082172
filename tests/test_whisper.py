"""The ``whisper`` family: tiny random Whisper models through every dsnn command, offline.

Two models are built from configs (``whisper_fixtures``: a byte-level BPE with Whisper's special tokens, a
16-wide one-layer-per-side ``WhisperForConditionalGeneration`` with the real 30 s / 1500-position encoder context,
a generation config and a ``WhisperFeatureExtractor``) and saved with ``save_pretrained``: an English-only one and a
multilingual one. Their transcripts are garbage, but dsnn's garbage must be exactly what ``model.generate`` gives
when transformers runs the same model (or the same exported level) on its own.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch

transformers = pytest.importorskip("transformers")

from asr_fixtures import copy_manifest  # noqa: E402
from helpers import assert_one_error_line, assert_usage_error, run_cli  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from whisper_fixtures import build_whisper_dir, special_ids  # noqa: E402

from dsnn_compress.cli import main  # noqa: E402
from dsnn_compress.core.bundle import load_bundle  # noqa: E402
from dsnn_compress.data.batch import pad_batch  # noqa: E402
from dsnn_compress.data.manifest import read_manifest  # noqa: E402
from dsnn_compress.evaluation.evaluate import EvaluateOptions, evaluate  # noqa: E402
from dsnn_compress.models.whisper.adapter import long_form_chunks, token_bound  # noqa: E402
from dsnn_compress.runtime.runnable import load_model  # noqa: E402
from dsnn_compress.sources.opener import open_source  # noqa: E402

DATA = Path(__file__).parent / "data"
MANIFEST = DATA / "manifest.jsonl"
LEVELS = "0.5,0.9"
POSITIONS = "model.encoder.embed_positions.weight"
LONG_CLIP = "test-00001.flac"  # 2.15 s: the one clip longer than a 100-position (2 s) encoder context

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", autouse=True)
def quiet_transformers():
    """transformers' per-call notices (max_new_tokens vs max_length, ...) off while this module runs."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    yield
    if bars:
        hf_logging.enable_progress_bar()
    hf_logging.set_verbosity(level)


@pytest.fixture(scope="module")
def whisper(tmp_path_factory, one_torch_thread, quiet_transformers) -> SimpleNamespace:
    """The English-only directory, its bundle (0.5, 0.9) and level-0.5 export (both by the CLI), the multilingual
    directory, and a manifest of the seven clips shorter than 2 s."""
    root = tmp_path_factory.mktemp("whisper")
    en = build_whisper_dir(root / "en")
    ml = build_whisper_dir(root / "ml", multilingual=True, seed=1)
    bundle = root / "b.safetensors"
    assert main(["prune", str(en), "--levels", LEVELS, "-o", str(bundle)]) == 0
    export = root / "exported-0.5"
    assert main(["export", str(bundle), "--level", "0.5", "--format", "hf", "-o", str(export)]) == 0
    (root / "short").mkdir()
    short = copy_manifest(root / "short", keep=7)
    assert all(u.audio_path.name != LONG_CLIP for u in read_manifest(short))
    return SimpleNamespace(root=root, en=en, ml=ml, bundle=bundle, export=export, short=short)


# -------------------------------------------------------------------------------------------------- reference decoding


def read_wave(path: Path) -> np.ndarray:
    """The clip's samples (16 kHz mono files) read with soundfile, not with dsnn's loader."""
    wave, rate = sf.read(str(path), dtype="float32")
    assert rate == 16000 and wave.ndim == 1
    return wave


def hf_model(directory: Path, state: dict | None = None):
    """``WhisperForConditionalGeneration.from_pretrained`` (optionally with ``state`` loaded over it)."""
    model = transformers.WhisperForConditionalGeneration.from_pretrained(str(directory), local_files_only=True)
    if state is not None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert missing == ["proj_out.weight"] and not unexpected  # tied to the token embedding
        assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
    return model.eval()


def hf_decode(model, directory: Path, paths: list[Path], **generate_kwargs) -> list[SimpleNamespace]:
    """Plain transformers, one clip at a time: ``WhisperProcessor`` features, ``model.generate`` (the directory's
    generation config: no timestamps) with ``max_new_tokens = token_bound(seconds)``.

    For each clip: ``tokens`` (the new tokens, without the end token), ``capped`` (the hypothesis reached the bound:
    no end token within it) and ``text`` (``batch_decode`` without special tokens, stripped).
    """
    processor = transformers.WhisperProcessor.from_pretrained(str(directory), local_files_only=True)
    eot = processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    results = []
    for path in paths:
        wave = read_wave(path)
        bound = token_bound(len(wave) / 16000)
        features = processor(wave, sampling_rate=16000, return_tensors="pt").input_features
        assert features.shape == (1, 80, 3000)
        with torch.no_grad():
            out = model.generate(input_features=features, max_new_tokens=bound, return_timestamps=False,
                                 **generate_kwargs)
        row = out[0].tolist()  # the new tokens (generate drops the prompt and the end token)
        tokens = row[: row.index(eot)] if eot in row else row
        assert len(tokens) <= bound
        capped = len(tokens) == bound  # generate stopped at the bound, not at an end token
        results.append(SimpleNamespace(tokens=tokens, capped=capped, bound=bound,
                                       text=processor.batch_decode([tokens], skip_special_tokens=True)[0].strip()))
    return results


def manifest_paths(manifest: Path = MANIFEST) -> list[Path]:
    return [u.audio_path for u in read_manifest(manifest)]


def expected_prunable(model) -> list[str]:
    """By construction: every ``nn.Linear`` inside an encoder or decoder layer (Whisper's q/k/v/out projections of
    self- and cross-attention, fc1 and fc2), found by module type, not by name."""
    return sorted(f"{name}.weight" for name, module in model.named_modules()
                  if isinstance(module, torch.nn.Linear) and re.match(r"model\.(encoder|decoder)\.layers\.\d+\.", name))


# ------------------------------------------------------------------------------------------- 1. open / prune / inspect


def test_directory_is_recognised_and_prunable_set_is_the_layer_linears(whisper):
    source = open_source(whisper.en)
    assert source.kind == "hf-dir"
    meta = source.model_meta
    assert meta["family"] == "whisper" and meta["audio_ctx"] is None and meta["sample_rate"] == 16000
    assert {"config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= set(meta["hf_files"])

    reference = hf_model(whisper.en)
    expected = expected_prunable(reference)
    config = reference.config
    assert len(expected) == 6 * config.encoder_layers + 10 * config.decoder_layers == 16
    assert sum("encoder_attn" in n for n in expected) == 4 * config.decoder_layers
    adapter = source.adapter()
    assert sorted(adapter.default_prunable()) == expected
    params = dict(reference.named_parameters())
    assert set(expected) < set(params)
    dense = [n for n in params if any(p in n for p in ("conv1", "conv2", "embed_tokens", "embed_positions",
                                                       "layer_norm", "proj_out"))]
    assert {"model.encoder.conv1.weight", "model.encoder.conv2.weight", POSITIONS,
            "model.decoder.embed_positions.weight", "model.decoder.embed_tokens.weight"} <= set(dense)
    assert not set(dense) & set(adapter.default_prunable())


def test_prune_bundle_and_inspect(whisper, capsys):
    bundle = load_bundle(whisper.bundle)
    expected = expected_prunable(hf_model(whisper.en))
    assert sorted(bundle.codes) == expected and bundle.levels == (0.5, 0.9)
    assert bundle.metadata["model"]["family"] == "whisper" and bundle.metadata["selection"]["defaults"] == "model"
    # the bundle holds exactly the directory's tensors, values included (the tied proj_out absent in both)
    source = load_file(str(whisper.en / "model.safetensors"))
    assert "proj_out.weight" not in source and set(bundle.tensors) == set(source)
    for name, tensor in source.items():
        assert torch.equal(bundle.tensors[name], tensor), name

    code, out, err = run_cli(capsys, "inspect", whisper.bundle, "--layers", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert sorted(report["tensors"]) == expected
    assert sorted(report["not_pruned"]) == sorted(set(source) - set(expected))
    assert report["model"]["family"] == "whisper"
    assert [entry["level"] for entry in report["levels"]] == [0.0, 0.5, 0.9]


# ------------------------------------------------------------------------------------------------------ 2. transcripts


def test_dense_transcripts_equal_transformers_generate(whisper, capsys):
    paths = manifest_paths()
    reference = hf_decode(hf_model(whisper.en), whisper.en, paths)
    code, out, err = run_cli(capsys, "transcribe", whisper.bundle, *paths, "--json")
    assert code == 0, err
    assert [item["text"] for item in json.loads(out)] == [r.text for r in reference]
    assert len({r.text for r in reference}) >= 4  # the random model's output depends on the audio


def test_level_transcripts_equal_the_exported_directory(whisper, capsys):
    export = whisper.export
    names = {p.name for p in export.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "preprocessor_config.json",
            "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"} <= names
    # the exported weights are the bundle's level-0.5 state dict, nothing more, nothing less
    bundle = load_bundle(whisper.bundle)
    exported = load_file(str(export / "model.safetensors"))
    state = bundle.state_dict_at(0.5)
    assert set(exported) == set(state) and "proj_out.weight" not in exported
    for name, tensor in state.items():
        assert torch.equal(exported[name], tensor), name
    assert any(not torch.equal(state[n], bundle.tensors[n]) for n in bundle.codes)
    # the slow tokenizer (vocab.json + merges.txt) loads and agrees with the fast one
    slow = transformers.WhisperTokenizer.from_pretrained(str(export), local_files_only=True)
    fast = transformers.WhisperTokenizerFast.from_pretrained(str(export), local_files_only=True)
    for text in (" call sarah", " it can't make things any worse"):
        assert slow.encode(text, add_special_tokens=False) == fast.encode(text, add_special_tokens=False)
    assert len(slow) == len(fast) == hf_model(export).config.vocab_size

    paths = manifest_paths()[-4:]
    reference = hf_decode(hf_model(export), export, paths)
    code, out, err = run_cli(capsys, "transcribe", whisper.bundle, *paths, "--level", "0.5", "--json")
    assert code == 0, err
    assert [item["text"] for item in json.loads(out)] == [r.text for r in reference]
    dense = hf_decode(hf_model(whisper.en), whisper.en, paths)
    assert [r.text for r in dense] != [r.text for r in reference]  # a level mix-up would show


# --------------------------------------------------------------------------------------------------- 3. capped decodes


def test_evaluate_counts_capped_decodes_like_transformers(whisper, tmp_path):
    """Every level's hypotheses and ``decodes_capped`` equal an independent transformers decode at that level."""
    # a small batch budget: clips decoded alone and in pairs (generate's length set by one clip or by the longer)
    report = evaluate(whisper.bundle, MANIFEST, EvaluateOptions(batch_frames=300, normalizer="none", details=True,
                                                                repeats=1))
    bundle = load_bundle(whisper.bundle)
    paths = manifest_paths()
    models = {0.0: (hf_model(whisper.en), whisper.en), 0.5: (hf_model(whisper.export), whisper.export),
              0.9: (hf_model(whisper.en, bundle.state_dict_at(0.9)), whisper.en)}
    assert [entry.level for entry in report.levels] == [0.0, 0.5, 0.9]
    counts = []
    for entry in report.levels:
        level = entry.level
        reference = hf_decode(*models[level], paths)
        assert [u.hypotheses[f"{level:g}"] for u in report.utterances] == [r.text for r in reference]
        assert entry.decodes_capped == sum(r.capped for r in reference)
        counts.append(entry.decodes_capped)
    # the random model loops on some clips and ends early on others, so both directions of a miscount show
    assert 0 < counts[0] < len(paths)
    assert counts[0] != counts[1]


def test_decode_never_passes_the_bound(whisper, monkeypatch):
    """All eight clips in one batch (one ``generate`` call, the longest clip's bound): each hypothesis is the
    transformers decode of that clip alone, so at most ``token_bound(its seconds)`` tokens."""
    adapter = load_model(whisper.bundle).adapter
    paths = manifest_paths()
    waves = [read_wave(p) for p in paths]
    bounds = [token_bound(len(w) / 16000) for w in waves]
    assert len(set(bounds)) > 2
    decoded, calls = [], []
    decode, generate = adapter.tokenizer.decode, adapter.model.generate

    def spy_decode(tokens, *args, **kwargs):
        decoded.append(list(tokens))
        return decode(tokens, *args, **kwargs)

    def spy_generate(*args, **kwargs):
        calls.append(kwargs.get("max_new_tokens"))
        return generate(*args, **kwargs)

    monkeypatch.setattr(adapter.tokenizer, "decode", spy_decode)
    monkeypatch.setattr(adapter.model, "generate", spy_generate)
    batch = pad_batch([adapter.prepare(w) for w in waves], [[] for _ in waves], ["" for _ in waves],
                      [p.name for p in paths])
    adapter.capped_decodes = 0
    texts = adapter.decode(batch)
    assert calls == [max(bounds)]
    reference = hf_decode(hf_model(whisper.en), whisper.en, paths)
    assert decoded == [r.tokens for r in reference]
    assert all(len(tokens) <= bound for tokens, bound in zip(decoded, bounds, strict=True))
    assert texts == [r.text for r in reference]
    assert adapter.capped_decodes == sum(r.capped for r in reference)


def test_capped_count_follows_the_bound_not_the_end_token(whisper, monkeypatch):
    """transformers' Whisper ``generate`` drops each row's end token and pads rows with the pad (= end) token. A decode
    is capped exactly when its hypothesis fills its own bound, whatever longer clips in the same batch let
    ``generate`` do: the count is that of decoding every clip alone."""
    adapter = load_model(whisper.bundle).adapter
    eot = special_ids(whisper.en)["<|endoftext|>"]
    short, long = np.zeros(8000, dtype=np.float32), np.zeros(16000, dtype=np.float32)
    bound = token_bound(0.5)
    assert bound < token_bound(1.0)
    word = adapter.tokenizer.encode(" call", add_special_tokens=False)
    assert len(word) == 1
    rows: list[list[int]] = []
    monkeypatch.setattr(adapter.model, "generate", lambda **kwargs: torch.tensor(rows))

    def decode(*waves) -> tuple[list[str], int]:
        adapter.capped_decodes = 0
        texts = adapter.decode(pad_batch([adapter.prepare(w) for w in waves], [[] for _ in waves],
                                         ["" for _ in waves], [str(i) for i in range(len(waves))]))
        return texts, adapter.capped_decodes

    rows[:] = [word * 3]  # alone, ended after 3 tokens (the end token dropped by generate): not capped
    assert decode(short) == (["call call call"], 0)
    rows[:] = [word * bound]  # alone, stopped by max_new_tokens=bound: capped
    assert decode(short) == ([" ".join(["call"] * bound)], 1)
    # batched with a longer clip: the short clip's row fills its bound then ends; the long clip's row ends early
    rows[:] = [word * bound, word * 3 + [eot] * (bound - 3)]
    assert decode(short, long) == ([" ".join(["call"] * bound), "call call call"], 1)
    # the short clip's row runs past its bound (generate went on for the long clip): cut at the bound, capped
    rows[:] = [word * (bound + 5), word * 2 + [eot] * (bound + 3)]
    assert decode(short, long) == ([" ".join(["call"] * bound), "call call"], 1)


# --------------------------------------------------------------------------------------------------------- 4. finetune


def test_finetune_cli_keeps_masks_codes_and_frozen_tables(whisper, tmp_path, capsys):
    out = tmp_path / "tuned.safetensors"
    code, _, err = run_cli(capsys, "finetune", whisper.bundle, "--data", MANIFEST, "--steps", "3",
                           "--set", "data.max_batch_size=2", "--set", "distillation.enabled=true", "-o", out, "--json")
    assert code == 0, err
    before, after = load_bundle(whisper.bundle), load_bundle(out)
    assert after.metadata["model"]["family"] == "whisper" and after.levels == before.levels
    assert set(after.tensors) == set(before.tensors) and "proj_out.weight" not in after.tensors
    assert set(after.codes) == set(before.codes)
    for name, codes in after.codes.items():
        assert torch.equal(codes, before.codes[name]), f"codes of {name} changed"
    # the encoder's sinusoidal positions are frozen in transformers' Whisper; everything else trains (convs included)
    assert torch.equal(after.tensors[POSITIONS], before.tensors[POSITIONS])
    trained = [*after.codes, "model.encoder.conv1.weight", "model.encoder.conv2.weight",
               "model.decoder.embed_tokens.weight", "model.decoder.embed_positions.weight",
               "model.decoder.layer_norm.weight", "model.encoder.layers.0.self_attn_layer_norm.weight"]
    unmoved = [n for n in trained if torch.equal(after.tensors[n], before.tensors[n])]
    assert not unmoved, f"fine-tuning left {unmoved} unchanged"
    for k, level in enumerate(after.levels, start=1):
        state = after.state_dict_at(level)
        for name, codes in after.codes.items():
            dropped = codes < k
            assert dropped.any() and torch.all(state[name][dropped] == 0), (name, level)
            assert torch.equal(state[name][~dropped], after.tensors[name][~dropped])
    code, _, err = run_cli(capsys, "transcribe", out, manifest_paths()[0], "--level", "0.9")
    assert code == 0, err


def test_finetune_overfits_two_utterances_at_one_level(whisper, tmp_path):
    from dsnn_compress.models.registry import adapter_from_metadata
    from dsnn_compress.training.recipe import recipe_from_dict
    from dsnn_compress.training.trainer import finetune

    train = copy_manifest(tmp_path, keep=2)
    out = tmp_path / "overfit.safetensors"
    recipe = recipe_from_dict({
        "data": {"train": str(train), "max_batch_size": 2, "spec_augment": False},
        "model": {"init": str(whisper.bundle), "audio_ctx": 100},
        "sampling": {"loss_weights": [0, 1, 0]},  # level 0.5 only
        "optimizer": {"lr": 1e-2, "weight_decay": 0.0},
        "lr_schedule": {"decay": "constant"},
        "training": {"steps": 20, "log_every": 1},
        "output": str(out),
    })
    finetune(recipe)

    def loss_at_half(path: Path) -> float:
        bundle = load_bundle(path)
        adapter = adapter_from_metadata(dict(bundle.metadata["model"], audio_ctx=100), bundle.state_dict_at(0.5))
        utterances = read_manifest(train)
        batch = pad_batch([adapter.prepare(read_wave(u.audio_path)) for u in utterances],
                          [adapter.encode_text(u.text) for u in utterances], [u.text for u in utterances],
                          [u.id for u in utterances])
        adapter.model.eval()
        with torch.no_grad():
            return float(adapter.loss(batch))

    start, end = loss_at_half(whisper.bundle), loss_at_half(out)
    assert end < 0.5 * start, (start, end)


# -------------------------------------------------------------------------------------------------------- 5. audio_ctx


def test_audio_ctx_shortens_the_encoder_context(whisper, tmp_path, capsys):
    report_path = tmp_path / "short.json"
    code, _, err = run_cli(capsys, "evaluate", whisper.bundle, "--data", whisper.short, "--audio-ctx", "100",
                           "--levels", "0", "--normalizer", "none", "--details", "--json", report_path)
    assert code == 0, err
    report = json.loads(report_path.read_text())
    assert report["levels"][0]["utterances_scored"] == 7

    # the reference: transformers' model with its first 100 positions, on 200 frames of 2 s of padded audio
    model = hf_model(whisper.en)
    model.model.encoder.embed_positions = torch.nn.Embedding.from_pretrained(
        model.model.encoder.embed_positions.weight[:100].clone(), freeze=True)
    model.config.max_source_positions = 100
    processor = transformers.WhisperProcessor.from_pretrained(str(whisper.en), local_files_only=True)
    expected = []
    for path in manifest_paths(whisper.short):
        wave = read_wave(path)
        features = processor(wave, sampling_rate=16000, return_tensors="pt", padding="max_length",
                             max_length=32000).input_features
        assert features.shape == (1, 80, 200)
        with torch.no_grad():
            row = model.generate(input_features=features, max_new_tokens=token_bound(len(wave) / 16000),
                                 return_timestamps=False)[0].tolist()
        eot = processor.tokenizer.eos_token_id
        expected.append(processor.batch_decode([row[: row.index(eot)] if eot in row else row],
                                               skip_special_tokens=True)[0].strip())
    assert [u["hypotheses"]["0"] for u in report["utterances"]] == expected

    # the live model runs 100 positions; its state dict (what bundles and exports see) keeps all 1500 rows
    loaded = load_model(whisper.bundle, audio_ctx=100)
    adapter = loaded.adapter
    assert adapter.model.model.encoder.embed_positions.num_embeddings == 100 and adapter.context_seconds == 2.0
    assert torch.equal(adapter.model.state_dict()[POSITIONS], load_bundle(whisper.bundle).tensors[POSITIONS])
    assert adapter.model.state_dict()[POSITIONS].shape[0] == 1500

    # a clip longer than the context is decoded in chunks cut at its quietest point (never truncated): the
    # transcript is the chunks' greedy transcripts joined, each chunk decoded as above
    wave = read_wave(DATA / "audio" / LONG_CLIP)
    spans = long_form_chunks(wave, 32000, 16000)
    assert len(spans) == 2 and spans[0][0] == 0 and spans[-1][1] == len(wave) and spans[0][1] == spans[1][0]
    pieces = []
    for start, stop in spans:
        features = processor(wave[start:stop], sampling_rate=16000, return_tensors="pt", padding="max_length",
                             max_length=32000).input_features
        with torch.no_grad():
            row = model.generate(input_features=features, max_new_tokens=token_bound((stop - start) / 16000),
                                 return_timestamps=False)[0].tolist()
        eot = processor.tokenizer.eos_token_id
        pieces.append(processor.batch_decode([row[: row.index(eot)] if eot in row else row],
                                             skip_special_tokens=True)[0].strip())
    code, out, err = run_cli(capsys, "transcribe", whisper.bundle, DATA / "audio" / LONG_CLIP, "--audio-ctx", "100")
    assert code == 0, err
    assert out.split("\t", 1)[1].strip() == " ".join(p for p in pieces if p)
    # evaluate scores it the same way and says which utterances were chunked
    long_report = tmp_path / "long.json"
    code, _, err = run_cli(capsys, "evaluate", whisper.bundle, "--data", MANIFEST, "--audio-ctx", "100", "--levels",
                           "0", "--normalizer", "none", "--details", "--repeats", "1", "--json", long_report)
    assert code == 0, err
    assert "1 utterance(s) longer than the model's 2 s window were decoded in 2 chunks" in err
    long = json.loads(long_report.read_text())
    assert long["long_form"] == {"window_seconds": 2.0, "utterances": ["test-00001"], "chunks": 2}
    row = next(u for u in long["utterances"] if u["id"] == "test-00001")
    assert row["hypotheses"]["0"] == " ".join(p for p in pieces if p)


def test_finetune_with_audio_ctx_keeps_the_source_tensors(whisper, tmp_path, capsys):
    out = tmp_path / "ctx.safetensors"
    code, _, err = run_cli(capsys, "finetune", whisper.bundle, "--data", whisper.short, "--steps", "1",
                           "--set", "data.max_batch_size=2", "--set", "model.audio_ctx=100", "-o", out, "--json")
    assert code == 0, err
    before, after = load_bundle(whisper.bundle), load_bundle(out)
    assert after.metadata["model"]["audio_ctx"] == 100
    assert {n: t.shape for n, t in after.tensors.items()} == {n: t.shape for n, t in before.tensors.items()}
    assert after.tensors[POSITIONS].shape[0] == 1500
    assert torch.equal(after.tensors[POSITIONS], before.tensors[POSITIONS])
    assert any(not torch.equal(after.tensors[n], before.tensors[n]) for n in after.codes)
    # the bundle runs with its 2 s context by default; --audio-ctx replaces it
    assert load_model(out).adapter.context_seconds == 2.0
    assert load_model(out, audio_ctx=1500).adapter.context_seconds == 30.0
    # training never takes a clip longer than the context (inference would chunk it)
    code, _, err = run_cli(capsys, "finetune", out, "--data", MANIFEST, "--steps", "1", "-o",
                           tmp_path / "no.safetensors")
    assert code == 1  # the error comes with the first batch, after the run's start line
    assert_one_error_line(err.strip().splitlines()[-1], "longer than the encoder context (2 s)")
    assert not (tmp_path / "no.safetensors").exists()


@pytest.mark.parametrize("value", ["0", "2000"])
def test_audio_ctx_out_of_range_is_a_usage_error(whisper, capsys, value):
    result = run_cli(capsys, "evaluate", whisper.bundle, "--data", whisper.short, "--audio-ctx", value)
    assert_usage_error(result, "audio_ctx", "[1, 1500]")
    result = run_cli(capsys, "transcribe", whisper.bundle, manifest_paths()[0], "--audio-ctx", value)
    assert_usage_error(result, "audio_ctx")


def test_audio_ctx_on_a_conformer_is_a_usage_error(tmp_path, capsys):
    from dsnn_compress.models.registry import new_adapter
    from dsnn_compress.sources.checkpoint import save_checkpoint

    adapter = new_adapter("conformer-ctc", vocabulary=list("abc "), size="xs",
                          overrides={"d_model": 16, "num_layers": 1, "num_heads": 2, "ff_mult": 2, "conv_kernel": 3},
                          features={"n_mels": 40})
    checkpoint, bundle = tmp_path / "conformer.safetensors", tmp_path / "conformer-bundle.safetensors"
    save_checkpoint(adapter, checkpoint)
    assert run_cli(capsys, "prune", checkpoint, "--levels", "0.5", "-o", bundle).code == 0
    clip = manifest_paths()[0]
    for model in (bundle, checkpoint):
        result = run_cli(capsys, "transcribe", model, clip, "--audio-ctx", "100")
        assert_usage_error(result, "audio_ctx applies to Whisper models", "conformer-ctc")
    result = run_cli(capsys, "evaluate", bundle, "--data", MANIFEST, "--audio-ctx", "100")
    assert_usage_error(result, "audio_ctx applies to Whisper models")
    code, _, err = run_cli(capsys, "transcribe", bundle, clip, "--level", "0.5")
    assert code == 0, err


# ---------------------------------------------------------------------------------------------------------- 6. prompts


def test_prompts_of_english_only_and_multilingual_models(whisper, capsys):
    ids = special_ids(whisper.en)
    english = open_source(whisper.en).adapter()
    assert english.prompt == [ids["<|startoftranscript|>"], ids["<|notimestamps|>"]] and not english.multilingual

    ids = special_ids(whisper.ml)
    assert ids["<|en|>"] != ids["<|de|>"]
    source = open_source(whisper.ml)
    assert source.model_meta["family"] == "whisper"
    adapter = source.adapter()
    assert adapter.multilingual
    assert adapter.prompt == [ids["<|startoftranscript|>"], ids["<|en|>"], ids["<|transcribe|>"],
                              ids["<|notimestamps|>"]]
    bundle = whisper.root / "ml.safetensors"
    code, _, err = run_cli(capsys, "prune", whisper.ml, "--levels", LEVELS, "-o", bundle)
    assert code == 0, err
    paths = manifest_paths()[:3]
    code, out, err = run_cli(capsys, "transcribe", bundle, *paths, "--json")
    assert code == 0, err
    reference = hf_decode(hf_model(whisper.ml), whisper.ml, paths, language="en", task="transcribe")
    assert [item["text"] for item in json.loads(out)] == [r.text for r in reference]
    german = hf_decode(hf_model(whisper.ml), whisper.ml, paths, language="de", task="transcribe")
    assert [r.tokens for r in german] != [r.tokens for r in reference]  # the language token matters


# -------------------------------------------------------------------------------------------------------- 7. bad input


@pytest.mark.parametrize(("removed", "message"), [
    (("tokenizer.json", "tokenizer_config.json"), "the Whisper directory has no tokenizer"),
    (("preprocessor_config.json",), "the Whisper directory has no preprocessor_config.json"),
])
def test_incomplete_directory_is_refused(whisper, tmp_path, capsys, removed, message):
    broken = tmp_path / "broken"
    shutil.copytree(whisper.en, broken)
    for name in removed:
        (broken / name).unlink()
    code, _, err = run_cli(capsys, "prune", broken, "--levels", LEVELS, "-o", tmp_path / "b.safetensors")
    assert code == 1
    assert_one_error_line(err, message, "WhisperProcessor.save_pretrained")
    assert not (tmp_path / "b.safetensors").exists()
    code, _, err = run_cli(capsys, "finetune", broken, "--data", MANIFEST, "--steps", "1", "-o", tmp_path / "f")
    assert code == 1
    assert_one_error_line(err, message)


def test_whisper_normalizer_is_applied_and_recorded(whisper, tmp_path, capsys):
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    report_path = tmp_path / "report.json"
    code, _, err = run_cli(capsys, "evaluate", whisper.bundle, "--data", MANIFEST, "--levels", "0",
                           "--normalizer", "whisper", "--details", "--json", report_path)
    assert code == 0, err
    report = json.loads(report_path.read_text())
    assert report["normalizer"] == "whisper"
    normalize = EnglishTextNormalizer({})
    references = [u["reference"] for u in report["utterances"]]
    assert references == [normalize(u.text) for u in read_manifest(MANIFEST)]
    assert "it can not make things any worse" in references  # Whisper's normaliser expands contractions
    assert math.isfinite(report["levels"][0]["wer"])


def test_long_form_chunks_cut_at_the_quietest_point_and_cover_the_clip():
    rng = np.random.default_rng(0)
    rate = 1000
    wave = rng.standard_normal(95 * rate).astype(np.float32)  # 95 s of loud noise...
    wave[27_000:27_400] = 0.0  # ...with a pause 3 s before the first 30 s window ends
    wave[55_000:55_400] *= 0.01  # and a quieter stretch inside the second window's search span
    spans = long_form_chunks(wave, 30 * rate, rate, search_seconds=5.0)
    assert spans[0][0] == 0 and spans[-1][1] == len(wave)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # contiguous: nothing dropped or repeated
    assert all(stop - start <= 30 * rate for start, stop in spans)
    assert 27_000 <= spans[0][1] < 27_400 and 55_000 <= spans[1][1] < 55_400
    assert long_form_chunks(wave[: 30 * rate], 30 * rate, rate) == [(0, 30 * rate)]
