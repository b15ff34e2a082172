"""Built-in model families: shapes, lengths, padding invariance, pruning targets, checkpoints, training."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsnn_compress.data.batch import pad_batch
from dsnn_compress.data.features import FeatureConfig, num_frames
from dsnn_compress.errors import DsnnError, UsageError
from dsnn_compress.models.base import ModelAdapter
from dsnn_compress.models.builtin import BuiltinAdapter
from dsnn_compress.models.conformer import CONFORMER_SIZES, ConformerConfig, ConformerCTC
from dsnn_compress.models.lstm import LSTM_SIZES, LSTMCTC, LSTMConfig
from dsnn_compress.models.registry import FAMILIES, adapter_from_metadata, new_adapter, register_family
from dsnn_compress.sources.checkpoint import MODEL_METADATA_KEY, save_checkpoint
from dsnn_compress.sources.opener import load_checkpoint_adapter

VOCAB = ["<blank>", " ", "'", "a", "b", "c", "d", "e"]
TINY = {
    "conformer-ctc": {"d_model": 32, "num_layers": 2, "num_heads": 2, "conv_kernel": 7, "dropout": 0.0},
    "lstm-ctc": {"hidden": 32, "num_layers": 2, "dropout": 0.0},
}
FAMILY_NAMES = sorted(TINY)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def expected_frames(family: str, length: int, subsampling: str = "stack2") -> int:
    """Output frames predicted from the documented subsampling arithmetic."""
    if family == "conformer-ctc":
        return ceil_div(ceil_div(length, 2), 2)
    factor = {"none": 1, "stack2": 2, "stack3": 3, "stack4": 4}[subsampling]
    return ceil_div(length, factor)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tiny_adapter(family: str, seed: int = 0, **extra: Any) -> BuiltinAdapter:
    torch.manual_seed(seed)
    adapter = new_adapter(family, VOCAB, overrides={**TINY[family], **extra})
    assert isinstance(adapter, BuiltinAdapter)
    return adapter


def random_batch(lengths: list[int], seed: int = 0, dim: int = 80):
    gen = torch.Generator().manual_seed(seed)
    feats = [torch.randn(n, dim, generator=gen) for n in lengths]
    texts = ["abc"] * len(lengths)
    return feats, pad_batch(feats, [[3, 4, 5]] * len(lengths), texts, [f"u{i}" for i in range(len(lengths))])


# ----------------------------------------------------------------------------- shapes and sizes


@pytest.mark.parametrize(
    ("family", "size", "low", "high"),
    [
        ("conformer-ctc", "xs", 0.8e6, 1.5e6),
        ("conformer-ctc", "s", 3.0e6, 5.0e6),
        ("conformer-ctc", "m", 25e6, 30e6),
        ("lstm-ctc", "xs", 0.8e6, 1.5e6),
        ("lstm-ctc", "s", 3.0e6, 5.0e6),
    ],
)
def test_presets_forward_shapes_and_sizes(family: str, size: str, low: float, high: float) -> None:
    torch.manual_seed(0)
    adapter = new_adapter(family, VOCAB, size=size)
    assert low <= n_params(adapter.model) <= high
    lengths = [37, 20]
    _, batch = random_batch(lengths)
    with torch.no_grad():
        log_probs, out_lengths = adapter.log_probs(batch)
    assert log_probs.shape == (2, expected_frames(family, 37), len(VOCAB))
    assert out_lengths.tolist() == [expected_frames(family, n) for n in lengths]
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(2, log_probs.shape[1]), atol=1e-4)


def test_preset_tables() -> None:
    assert set(CONFORMER_SIZES) == {"xs", "s", "m"}
    assert set(LSTM_SIZES) == {"xs", "s"}
    assert FAMILIES["conformer-ctc"].sizes is CONFORMER_SIZES
    assert FAMILIES["lstm-ctc"].sizes is LSTM_SIZES


def test_conformer_length_arithmetic_matches_tensor_shapes() -> None:
    model = ConformerCTC(ConformerConfig(vocab_size=5, input_dim=13, d_model=8, num_layers=1, num_heads=2))
    model.eval()
    for length in range(1, 26):
        with torch.no_grad():
            log_probs, out_len = model(torch.randn(1, length, 13), torch.tensor([length]))
        assert log_probs.shape[1] == out_len.item() == expected_frames("conformer-ctc", length)
    assert model.output_lengths(torch.tensor([0, 1, 4, 5, 8, 9])).tolist() == [0, 1, 1, 2, 2, 3]


@pytest.mark.parametrize("subsampling", ["none", "stack2", "stack3", "stack4"])
def test_lstm_length_arithmetic_matches_tensor_shapes(subsampling: str) -> None:
    model = LSTMCTC(LSTMConfig(vocab_size=5, input_dim=13, hidden=8, num_layers=1, subsampling=subsampling))
    model.eval()
    for length in range(1, 12):
        with torch.no_grad():
            log_probs, out_len = model(torch.randn(1, length, 13), torch.tensor([length]))
        assert log_probs.shape[1] == out_len.item() == expected_frames("lstm-ctc", length, subsampling)


@pytest.mark.skipif(not hasattr(torch.export, "Dim") or not hasattr(torch.export.Dim, "DYNAMIC"), reason="old torch")
def test_conformer_exports_with_dynamic_batch_and_time() -> None:
    """torch.export (the graph capture behind the ONNX exporter) needs no data-dependent control flow."""
    model = ConformerCTC(ConformerConfig(vocab_size=5, input_dim=16, d_model=16, num_layers=1, num_heads=2))
    model.eval()
    dyn = torch.export.Dim.DYNAMIC
    program = torch.export.export(
        model, (torch.randn(2, 30, 16), torch.tensor([30, 21])), dynamic_shapes=({0: dyn, 1: dyn}, {0: dyn})
    )
    x, lengths = torch.randn(3, 53, 16), torch.tensor([53, 40, 9])
    with torch.no_grad():
        expected, expected_len = model(x, lengths)
        got, got_len = program.module()(x, lengths)
    assert torch.equal(got_len, expected_len)
    assert torch.allclose(got, expected, atol=1e-5)


# ----------------------------------------------------------------------------- padding invariance


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("garbage_padding", [False, True])
def test_padding_invariance(family: str, garbage_padding: bool) -> None:
    adapter = tiny_adapter(family, dropout=0.1)
    adapter.model.eval()
    lengths = [41, 23, 6, 1]
    feats, batch = random_batch(lengths, seed=3)
    if garbage_padding:
        for i, n in enumerate(lengths):
            batch.inputs[i, n:] = 7.0
    with torch.no_grad():
        padded, out_lengths = adapter.log_probs(batch)
        for i, x in enumerate(feats):
            alone, alone_len = adapter.model(x[None], torch.tensor([x.shape[0]]))
            n = int(alone_len[0])
            assert n == int(out_lengths[i]) == expected_frames(family, x.shape[0])
            assert torch.allclose(alone[0], padded[i, :n], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- pruning targets


def test_default_prunable_conformer() -> None:
    adapter = tiny_adapter("conformer-ctc")
    names = adapter.default_prunable()
    params = dict(adapter.model.named_parameters())
    assert set(names) <= set(params)
    assert len(names) == len(set(names))
    for layer in range(2):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            assert f"layers.{layer}.attn.{proj}.weight" in names
        for conv in ("pointwise1", "depthwise", "pointwise2"):
            assert f"layers.{layer}.conv.{conv}.weight" in names
        for ff in ("ff1", "ff2"):
            assert f"layers.{layer}.{ff}.linear1.weight" in names
    assert {"subsampling.conv1.weight", "subsampling.conv2.weight", "subsampling.out.weight"} <= set(names)
    assert not [n for n in names if n.startswith("ctc.") or "norm" in n or n.endswith(".bias")]
    assert all(params[n].dim() >= 2 for n in names)


def test_default_prunable_lstm() -> None:
    adapter = tiny_adapter("lstm-ctc")
    names = set(adapter.default_prunable())
    expected = {
        f"lstm.weight_{kind}_l{layer}{suffix}"
        for kind in ("ih", "hh")
        for layer in range(2)
        for suffix in ("", "_reverse")
    }
    assert names == expected


# ----------------------------------------------------------------------------- adapter basics


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_adapter_protocol_prepare_and_text(family: str) -> None:
    adapter = tiny_adapter(family)
    assert isinstance(adapter, ModelAdapter)
    assert adapter.sample_rate == 16000
    wave = (0.1 * np.sin(np.linspace(0, 400 * np.pi, 8000))).astype(np.float32)
    feats = adapter.prepare(wave)
    assert feats.shape == (num_frames(8000, FeatureConfig()), 80)
    with pytest.raises(DsnnError):
        adapter.prepare(np.zeros((2, 100), dtype=np.float32))
    assert adapter.encode_text("bad cab") == [4, 3, 6, 1, 5, 3, 4]
    with pytest.raises(DsnnError):
        adapter.encode_text("xyz")
    meta = adapter.metadata()
    assert json.loads(json.dumps(meta)) == meta
    assert meta["family"] == family
    assert meta["vocabulary"] == VOCAB
    assert meta["config"]["vocab_size"] == len(VOCAB)
    assert meta["config"]["input_dim"] == 80
    assert meta["normalizer"] == "default"


def test_new_adapter_vocabulary_without_blank_and_string_overrides() -> None:
    torch.manual_seed(0)
    adapter = new_adapter(
        "conformer-ctc",
        VOCAB[1:],
        overrides={"d_model": "48", "num_layers": "1", "dropout": "0"},
        features={"n_mels": 40},
        normalizer="lower",
    )
    assert adapter.tokenizer.vocabulary == VOCAB
    assert adapter.config.d_model == 48 and adapter.config.num_layers == 1 and adapter.config.dropout == 0.0
    assert adapter.config.input_dim == 40 and adapter.features.n_mels == 40
    assert adapter.normalizer == "lower"
    assert not adapter.model.training


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"family": "transformer"}, "conformer-ctc"),
        ({"size": "xl"}, "xs, s, m"),
        ({"overrides": {"depth": 3}}, "d_model"),
        ({"overrides": {"d_model": 30, "num_heads": 4}}, "divisible"),
        ({"overrides": {"conv_kernel": 8}}, "odd"),
        ({"overrides": {"d_model": "wide"}}, "d_model"),
        ({"overrides": {"vocab_size": 99}}, "vocab_size"),
        ({"overrides": {"input_dim": 40}}, "n_mels"),
        ({"features": {"n_mel": 40}}, "n_mels"),
        ({"normalizer": "shout"}, "default"),
    ],
)
def test_new_adapter_usage_errors(kwargs: dict[str, Any], needle: str) -> None:
    args = {"family": "conformer-ctc", "vocabulary": VOCAB, **kwargs}
    with pytest.raises(UsageError) as info:
        new_adapter(**args)
    assert needle in info.value.one_line()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"d_model": "wide"}, "d_model must be a positive integer, got 'wide'; fix the model config"),
        ({"d_modle": 32}, "unknown key 'd_modle' (did you mean 'd_model'?); allowed keys: d_model, num_layers,"),
        ({"dropout": True}, "dropout must be a number in [0, 1), got true"),
        ({"subsampling": "conv2d"}, "subsampling must be one of conv2d4, got 'conv2d' (did you mean 'conv2d4'?)"),
        ({"conv_kernel": 8}, "conv_kernel must be odd, got 8"),
    ],
)
def test_model_config_errors_read_like_recipe_errors(overrides: dict[str, Any], message: str) -> None:
    """One formatter (``dsnn_compress.validation``) for recipes and model configs: same wording, same numbers."""
    with pytest.raises(UsageError) as info:
        new_adapter("conformer-ctc", VOCAB, overrides={**TINY["conformer-ctc"], **overrides})
    assert info.value.one_line().startswith(f"invalid model config for family conformer-ctc: {message}")


def test_model_config_numbers_and_booleans_follow_the_recipe_rules() -> None:
    adapter = new_adapter("conformer-ctc", VOCAB, overrides={**TINY["conformer-ctc"], "d_model": "3.2e1"})
    assert adapter.config.d_model == 32
    with pytest.raises(UsageError, match="bidirectional must be true or false, got 'yes'"):
        new_adapter("lstm-ctc", VOCAB, overrides={**TINY["lstm-ctc"], "bidirectional": "yes"})
    with pytest.raises(UsageError, match="hidden must be a positive integer, got true"):
        new_adapter("lstm-ctc", VOCAB, overrides={**TINY["lstm-ctc"], "hidden": True})


def test_register_family_from_outside() -> None:
    class DummyFamily:
        sizes: Mapping[str, Any] = {}

        def new(self, vocabulary, size=None, overrides=None, features=None, normalizer="default"):
            return ("new", list(vocabulary), size)

        def from_metadata(self, meta):
            return ("meta", meta["family"])

    register_family("dummy-test", DummyFamily())
    try:
        assert new_adapter("dummy-test", ["a"], size="q") == ("new", ["a"], "q")
        assert adapter_from_metadata({"family": "dummy-test"}) == ("meta", "dummy-test")
    finally:
        FAMILIES.pop("dummy-test")


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_checkpoint_round_trip(family: str, tmp_path: Path) -> None:
    adapter = tiny_adapter(family, seed=5)
    path = tmp_path / "model.safetensors"
    save_checkpoint(adapter, path, extra_metadata={"note": "hello"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["format"] == "dsnn-checkpoint" and meta["format_version"] == "1"
    assert meta["note"] == "hello"
    assert json.loads(meta[MODEL_METADATA_KEY]) == adapter.metadata()

    torch.manual_seed(123)  # a different init must not matter: weights come from the file
    loaded = load_checkpoint_adapter(path)
    assert loaded.metadata() == adapter.metadata()
    assert not loaded.model.training
    adapter.model.eval()
    _, batch = random_batch([30, 17], seed=9)
    with torch.no_grad():
        a, a_len = adapter.log_probs(batch)
        b, b_len = loaded.log_probs(batch)
    assert torch.equal(a_len, b_len)
    assert torch.equal(a, b)
    assert loaded.decode(batch) == adapter.decode(batch)


def test_mismatched_tensors_raise(tmp_path: Path) -> None:
    adapter = tiny_adapter("conformer-ctc")
    meta = adapter.metadata()
    tensors = {k: v.clone() for k, v in adapter.model.state_dict().items()}

    missing = dict(tensors)
    missing.pop("layers.0.attn.q_proj.weight")
    extra = {**tensors, "bogus.weight": torch.zeros(2, 2)}
    wrong_shape = {**tensors, "ctc.weight": torch.zeros(3, 32)}
    for bad, needle in ((missing, "missing"), (extra, "unexpected"), (wrong_shape, "shape")):
        with pytest.raises(DsnnError, match="model metadata does not match its tensors") as info:
            adapter_from_metadata(meta, bad)
        assert needle in info.value.message

    other = {**meta, "config": {**meta["config"], "d_model": 48, "num_heads": 4}}
    with pytest.raises(DsnnError, match="does not match its tensors"):
        adapter_from_metadata(other, tensors)

    # A file whose description and tensors disagree.
    path = tmp_path / "bad.safetensors"
    save_file(missing, str(path), metadata={"format": "dsnn-checkpoint", "model": json.dumps(meta)})
    with pytest.raises(DsnnError, match="does not match its tensors"):
        load_checkpoint_adapter(path)


def test_bad_metadata_raise(tmp_path: Path) -> None:
    adapter = tiny_adapter("lstm-ctc")
    meta = adapter.metadata()
    with pytest.raises(DsnnError) as info:
        adapter_from_metadata({**meta, "family": "nope"})
    assert type(info.value) is DsnnError and "lstm-ctc" in info.value.one_line()
    for bad in (
        {**meta, "config": {**meta["config"], "depth": 2}},
        {**meta, "config": {**meta["config"], "vocab_size": 3}},
        {**meta, "vocabulary": ["a", "b"]},
        {k: v for k, v in meta.items() if k != "features"},
    ):
        with pytest.raises(DsnnError) as info:
            adapter_from_metadata(bad)
        assert type(info.value) is DsnnError

    bare = tmp_path / "bare.safetensors"
    save_file(adapter.model.state_dict(), str(bare))
    with pytest.raises(DsnnError, match="carries no model description"):
        load_checkpoint_adapter(bare)
    with pytest.raises(DsnnError, match="does not exist"):
        load_checkpoint_adapter(tmp_path / "absent.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(DsnnError):
        load_checkpoint_adapter(junk)
    with pytest.raises(ValueError):
        save_checkpoint(adapter, tmp_path / "x.safetensors", extra_metadata={"model": "{}"})


# ----------------------------------------------------------------------------- loss and decode agree


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_tiny_model_overfits_two_utterances(family: str) -> None:
    adapter = tiny_adapter(family, seed=0)
    gen = torch.Generator().manual_seed(1)
    feats = [torch.randn(48, 80, generator=gen), torch.randn(36, 80, generator=gen)]
    texts = ["bad cab", "ace"]
    batch = pad_batch(feats, [adapter.encode_text(t) for t in texts], texts, ["u1", "u2"])
    optimizer = torch.optim.Adam(adapter.model.parameters(), lr=1e-2)
    decoded: list[str] = []
    for step in range(400):
        adapter.model.train()
        optimizer.zero_grad()
        loss = adapter.loss(batch)
        assert loss.dim() == 0 and math.isfinite(loss.item())
        loss.backward()
        optimizer.step()
        if step % 10 == 9:
            adapter.model.eval()
            decoded = adapter.decode(batch)
            if decoded == texts:
                break
    assert decoded == texts
    assert loss.item() < 0.5
