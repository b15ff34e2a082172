"""Loading dense checkpoints: safetensors, torch pickles (weights only), nesting, Hugging Face dirs, bad files."""

from __future__ import annotations

import builtins
import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch
from helpers import random_state_dict, write_checkpoint
from safetensors.torch import save_file

from dsnn_compress.errors import DsnnError
from dsnn_compress.sources.opener import SourceKind, open_source


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert actual[name].shape == tensor.shape, name
        assert torch.equal(actual[name], tensor), name


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_safetensors_file(tmp_path: Path) -> None:
    state = random_state_dict(1)
    path = tmp_path / "model.safetensors"
    save_file(state, str(path), metadata={"note": "hello"})
    source = open_source(path)
    assert source.kind == "safetensors"
    assert source.sha256 == sha256(path)
    assert source.file_metadata == {"note": "hello"}
    assert source.skipped_entries == []
    assert_same_tensors(source.tensors, state)


def test_source_kinds_are_an_enum_that_reads_and_records_as_before(tmp_path: Path) -> None:
    """The kinds are enum members; messages, JSON reports and bundles still show the strings they always did."""
    assert {kind: kind.value for kind in SourceKind} == {
        SourceKind.BUNDLE: "dsnn-bundle", SourceKind.CHECKPOINT: "dsnn-checkpoint",
        SourceKind.SAFETENSORS: "safetensors", SourceKind.TORCH: "torch", SourceKind.HF_DIR: "hf-dir",
        SourceKind.CT2_DIR: "ct2-dir"}
    source = open_source(write_checkpoint(tmp_path / "model.pt", random_state_dict(2)))
    assert source.kind is SourceKind.TORCH and source.kind == "torch"
    assert f"{source.kind} / {source.container}" == "torch / torch" and str(source.kind) == "torch"
    record = source.provenance(physical=True)
    assert type(record["kind"]) is str and json.dumps(record["kind"]) == '"torch"'


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt"])
def test_plain_torch_state_dict(tmp_path: Path, suffix: str) -> None:
    state = random_state_dict(2)
    path = write_checkpoint(tmp_path / f"model{suffix}", state)
    source = open_source(path)
    assert source.kind == "torch"
    assert source.sha256 == sha256(path)
    assert_same_tensors(source.tensors, state)


def test_lightning_nesting(tmp_path: Path) -> None:
    state = random_state_dict(3)
    path = tmp_path / "epoch=3.ckpt"
    torch.save({"state_dict": state, "epoch": 3, "global_step": 120, "hyper_parameters": {"lr": 0.1}}, path)
    source = open_source(path)
    assert_same_tensors(source.tensors, state)


@pytest.mark.parametrize("key", ["model", "module", "model_state_dict"])
def test_model_nesting(tmp_path: Path, key: str) -> None:
    state = random_state_dict(4)
    path = tmp_path / "model.pt"
    torch.save({key: state, "optimizer": {"lr": 0.1}}, path)
    assert_same_tensors(open_source(path).tensors, state)


def test_double_nesting_and_non_tensor_entries(tmp_path: Path) -> None:
    state = random_state_dict(5)
    path = tmp_path / "model.pt"
    torch.save({"model": {"module": {**state, "version": 2, "config_name": "x"}}}, path)
    source = open_source(path)
    assert_same_tensors(source.tensors, state)
    assert source.skipped_entries == ["config_name", "version"]


def write_hf_config(directory: Path) -> str:
    text = json.dumps({"model_type": "toy", "hidden_size": 8})
    (directory / "config.json").write_text(text)
    return text


def test_hf_dir_with_model_safetensors(tmp_path: Path) -> None:
    state = random_state_dict(6)
    config = write_hf_config(tmp_path)
    (tmp_path / "vocab.json").write_text('{"a": 0}')
    (tmp_path / "big.bin.json").write_bytes(b"x" * (4 * 1024 * 1024 + 1))  # too big to keep
    save_file(state, str(tmp_path / "model.safetensors"))
    source = open_source(tmp_path)
    assert source.kind == "hf-dir"
    assert source.sha256 == sha256(tmp_path / "model.safetensors")
    assert source.hf_files == {"config.json": config, "vocab.json": '{"a": 0}'}
    assert_same_tensors(source.tensors, state)


def test_hf_dir_with_pytorch_model_bin(tmp_path: Path) -> None:
    state = random_state_dict(7)
    config = write_hf_config(tmp_path)
    torch.save(state, tmp_path / "pytorch_model.bin")
    source = open_source(tmp_path)
    assert source.kind == "hf-dir"
    assert source.hf_files == {"config.json": config}
    assert_same_tensors(source.tensors, state)


def test_hf_dir_sharded_safetensors(tmp_path: Path) -> None:
    state = random_state_dict(8)
    config = write_hf_config(tmp_path)
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[:5], "model-00002-of-00002.safetensors": names[5:]}
    weight_map = {}
    for shard, shard_names in shards.items():
        save_file({n: state[n] for n in shard_names}, str(tmp_path / shard))
        weight_map.update(dict.fromkeys(shard_names, shard))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    source = open_source(tmp_path)
    assert source.hf_files == {"config.json": config}  # the index is not kept as a text file
    assert_same_tensors(source.tensors, state)


def test_hf_dir_missing_shard(tmp_path: Path) -> None:
    write_hf_config(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(DsnnError, match="gone.safetensors"):
        open_source(tmp_path)


def test_hf_dir_without_weights(tmp_path: Path) -> None:
    write_hf_config(tmp_path)
    with pytest.raises(DsnnError, match="no model.safetensors"):
        open_source(tmp_path)


def test_directory_without_config(tmp_path: Path) -> None:
    save_file(random_state_dict(9), str(tmp_path / "model.safetensors"))
    with pytest.raises(DsnnError, match="without config.json"):
        open_source(tmp_path)


class CreatesMarker:
    """Unpickling this object would create a file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


def test_pickled_module_is_refused_and_mentions_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(3, 2), path)
    with pytest.raises(DsnnError) as info:
        open_source(path)
    assert info.value.exit_code == 1
    assert "state_dict" in info.value.one_line()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_code_carrying_pickle_is_not_executed(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "pwned"
    payload = {"weight": torch.ones(2, 2), "evil": CreatesMarker(marker)}
    path = tmp_path / "model.pt"
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as fh:
            pickle.dump(payload, fh)
    assert not marker.exists()
    with pytest.raises(DsnnError, match="refuses to unpickle"):
        open_source(path)
    assert not marker.exists()


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DsnnError, match="does not exist"):
        open_source(tmp_path / "nope.safetensors")


def test_truncated_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file(random_state_dict(10), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DsnnError, match="not a readable safetensors file"):
        open_source(path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_garbage_bytes(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"model{suffix}"
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(DsnnError):
        open_source(path)


def test_truncated_torch_file(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path / "model.pt", random_state_dict(11))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DsnnError, match="not a readable torch checkpoint"):
        open_source(path)


@pytest.mark.parametrize("content", [{}, {"epoch": 3}, {"state_dict": {}}])
def test_empty_torch_state_dict(tmp_path: Path, content: dict) -> None:
    path = tmp_path / "model.pt"
    torch.save(content, path)
    with pytest.raises(DsnnError, match="contains no tensors"):
        open_source(path)


def test_empty_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({}, str(path))
    with pytest.raises(DsnnError, match="contains no tensors"):
        open_source(path)


def test_top_level_tensor_or_list_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save([torch.ones(2)], path)
    with pytest.raises(DsnnError, match="not a state dict"):
        open_source(path)


def test_unsupported_extension(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\x00" * 16)
    with pytest.raises(DsnnError, match="unsupported extension"):
        open_source(path)


def test_dsnn_bundle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bundle.safetensors"
    save_file({"w": torch.ones(2, 2)}, str(path), metadata={"format": "dsnn-bundle"})
    with pytest.raises(DsnnError, match="already a DSNN bundle"):
        open_source(path, allow_bundle=False)
