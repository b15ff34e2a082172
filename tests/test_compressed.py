"""`dsnn export --compress`: the sparse-bitmask layout, bit-exact round trips, sizes, loaders and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from asr_fixtures import adapter_at, audio_files, decode_file
from helpers import assert_one_error_line, random_state_dict, run_cli, write_checkpoint
from safetensors import safe_open

from dsnn_compress.core.bundle import load_bundle
from dsnn_compress.core.compressed import (
    COMPRESSION_KEY,
    compress_state_dict,
    compress_tensor,
    decompress_state_dict,
    decompress_tensor,
)
from dsnn_compress.errors import DsnnError, UsageError
from dsnn_compress.export.formats import export_level
from dsnn_compress.prune import PruneOptions, prune_checkpoint
from dsnn_compress.sources.opener import open_source

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, so that comparisons are bit-exact (``-0.0 != 0.0``, NaN payloads)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(a[n].dtype == b[n].dtype and a[n].shape == b[n].shape
                                    and torch.equal(bits(a[n]), bits(b[n])) for n in a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(7, 13), (4, 3, 9), (16,), (5, 1)])
def test_tensor_round_trip_is_bit_exact(dtype, shape):
    gen = torch.Generator().manual_seed(3)
    dense = torch.randn(*shape, generator=gen).to(dtype)
    dense[torch.rand(*shape, generator=gen) < 0.7] = 0.0
    dense.reshape(-1)[0] = -0.0  # a kept negative zero keeps its sign
    parts = compress_tensor(dense)
    assert torch.equal(bits(decompress_tensor(parts)), bits(dense))
    # the layout, checked independently with numpy
    mask = dense.contiguous().view({8: torch.int64, 4: torch.int32, 2: torch.int16}[dense.element_size()]) != 0
    assert parts["shape"].tolist() == list(shape) and parts["shape"].dtype == torch.int64
    assert torch.equal(bits(parts["compressed"]), bits(dense[mask]))
    assert np.array_equal(parts["bitmask"].numpy(), np.packbits(mask.numpy(), axis=-1, bitorder="little"))
    rows = mask.reshape(-1, shape[-1]).sum(1).numpy()
    assert parts["row_offsets"].tolist() == (np.cumsum(rows) - rows).tolist()


def test_bitmask_decodes_with_the_compressed_tensors_library():
    """compressed-tensors' own unpacker (the library that defines the layout) reads our bitmask, and its
    BitmaskConfig accepts the sparsity_config written into a Hugging Face config.json."""
    helpers = pytest.importorskip("compressed_tensors.utils")
    config = pytest.importorskip("compressed_tensors.config")
    from dsnn_compress.export.compressed import sparsity_config

    dense = torch.randn(12, 21)
    dense[dense.abs() < 1.0] = 0.0
    parts = compress_tensor(dense)
    mask = helpers.unpack_bitmasks(parts["bitmask"], list(dense.shape))
    rebuilt = torch.zeros_like(dense)
    rebuilt[mask] = parts["compressed"]
    assert torch.equal(rebuilt, dense)
    entry = sparsity_config(["a.weight"], 0.5)["sparsity_config"]
    parsed = config.SparsityCompressionConfig.load_from_registry(entry["format"], **entry)
    assert type(parsed).__name__ == "BitmaskConfig" and parsed.targets == ["a"]


def test_only_weights_that_get_smaller_are_compressed():
    state = {"a.weight": torch.zeros(8, 64), "b.weight": torch.randn(8, 64), "c.weight": torch.zeros(64, 1),
             "d.bias": torch.zeros(64), "e.weight": torch.zeros(4, 16), "f.weight": torch.zeros(16, 32, 1)}
    state["a.weight"][0, :3] = 1.0
    state["f.weight"][3, 5:9, 0] = -2.0
    stored, meta = compress_state_dict(state, ["a.weight", "b.weight", "c.weight", "d.bias", "f.weight"])
    # b is dense (no gain), c has one mask byte per weight plus offsets (no gain), d and e are no candidates; the
    # pointwise convolution f is compressed as its 2-D view [16, 32] and its shape recorded
    assert json.loads(meta[COMPRESSION_KEY]) == {"format": "sparse-bitmask", "tensors": ["a.weight", "f.weight"],
                                                 "shapes": {"f.weight": [16, 32, 1]}}
    assert sorted(stored) == ["a.bitmask", "a.compressed", "a.row_offsets", "a.shape", "b.weight", "c.weight",
                              "d.bias", "e.weight", "f.bitmask", "f.compressed", "f.row_offsets", "f.shape"]
    assert stored["f.shape"].tolist() == [16, 32] and list(stored["f.bitmask"].shape) == [16, 4]
    assert same_bits(decompress_state_dict(stored, meta), state)


def test_unsupported_dtype_says_which_dtypes_work():
    state = {"q.weight": torch.zeros(4, 16, dtype=torch.int8)}
    with pytest.raises(UsageError) as info:
        compress_state_dict(state, ["q.weight"])
    assert "float32, float16, bfloat16, float64" in str(info.value) and "q.weight is int8" in str(info.value)


def test_corrupt_parts_are_refused():
    parts = compress_tensor(torch.tensor([[0.0, 1.0, 0.0, 2.0]]))
    with pytest.raises(DsnnError, match="the bitmask keeps 2 weights but 1 values are stored"):
        decompress_tensor({**parts, "compressed": parts["compressed"][:1]})
    with pytest.raises(DsnnError, match="do not fit its shape"):
        decompress_tensor({**parts, "shape": torch.tensor([2, 2])})


# ----------------------------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def fp32_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("compressed")
    gen = torch.Generator().manual_seed(5)
    state = {"enc.q.weight": torch.randn(256, 256, generator=gen),
             "enc.ff1.weight": torch.randn(512, 256, generator=gen),
             "enc.ff2.weight": torch.randn(256, 512, generator=gen),
             "enc.ff2.bias": torch.randn(256, generator=gen),
             **random_state_dict(5, scale=2)}
    checkpoint = write_checkpoint(root / "dense.safetensors", state)
    return prune_checkpoint(checkpoint, root / "bundle.safetensors", PruneOptions([0.5, 0.7, 0.9]))


@pytest.mark.parametrize("level", [0.0, 0.5, 0.8, 0.9])
def test_compressed_export_round_trip_is_bit_exact_and_small(fp32_bundle, tmp_path, level):
    bundle = load_bundle(fp32_bundle.path)
    out = export_level(bundle, level, tmp_path / "c.safetensors", "safetensors", compress=True)
    dense_out = export_level(bundle, level, tmp_path / "d.safetensors", "safetensors")
    source = open_source(out)
    assert same_bits(source.tensors, bundle.state_dict_at(level))
    with safe_open(str(out), "pt") as fh:
        record = json.loads(fh.metadata()[COMPRESSION_KEY])
        names = record["tensors"]
        stored = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open
    fp32 = {n: bundle.tensors[n].numel() * 4 for n in names}
    used = {n: sum(stored[f"{n[:-7]}.{p}"].numel() * stored[f"{n[:-7]}.{p}"].element_size()
                   for p in ("shape", "compressed", "bitmask", "row_offsets")) for n in names}
    if level == 0.0:
        assert names == [] and 0 < out.stat().st_size - dense_out.stat().st_size < 128  # the metadata record
    else:
        assert names  # the fp32 weights ending in .weight (not lstm.weight_ih_l0, not tiny or 1-wide tensors)
        assert out.stat().st_size < dense_out.stat().st_size
    if level == 0.9:  # the bar for Linear weights of realistic width (a 3-wide convolution pays a mask byte per
        linear = [n for n in names if n.startswith("enc.") and bundle.tensors[n].shape[-1] >= 256]  # 3 weights)
        assert len(linear) == 3
        assert sum(used[n] for n in linear) <= 0.15 * sum(fp32[n] for n in linear)


def test_compressed_checkpoint_runs_like_the_level(tiny_model, tmp_path, capsys):
    out = tmp_path / "c.safetensors"
    code, _, err = run_cli(capsys, "export", tiny_model.bundle, "--level", "0.9", "--format", "checkpoint",
                           "-o", out, "--compress")
    assert code == 0, err
    with safe_open(str(out), "pt") as fh:
        assert json.loads(fh.metadata()[COMPRESSION_KEY])["tensors"]
    files = audio_files()[:2]
    code, stdout, err = run_cli(capsys, "transcribe", out, *files, "--json")
    assert code == 0, err
    adapter = adapter_at(tiny_model.bundle, 0.9)
    assert [item["text"] for item in json.loads(stdout)] == [decode_file(adapter, f) for f in files]
    assert same_bits({k: v for k, v in open_source(out).tensors.items()},
                     {k: v.contiguous() for k, v in adapter.model.state_dict().items()})


@pytest.mark.parametrize("fmt, suffix", [("torch", ".pt"), ("onnx", ".onnx")])
def test_compress_with_a_format_that_cannot_hold_it(tiny_model, tmp_path, capsys, fmt, suffix):
    out = tmp_path / f"x{suffix}"
    code, _, err = run_cli(capsys, "export", tiny_model.bundle, "--level", "0.9", "--format", fmt, "-o", out,
                           "--compress")
    assert code == 2
    assert_one_error_line(err, f"--compress does not apply to --format {fmt}", "safetensors, checkpoint, hf")
    assert not out.exists()
