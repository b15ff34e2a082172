"""Bundle integrity: per-tensor checksums (recorded by every writer, checked on load, `--no-verify` to skip) and
reading a file once, so that a concurrent `os.replace` of the path gives the old or the new file, never an error."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import xxhash
from asr_fixtures import MANIFEST, TinyModel
from helpers import assert_one_error_line, random_state_dict, run_cli, write_checkpoint
from safetensors.torch import load_file, save_file

import dsnn_compress.core.safetensors_io as safetensors_io
from dsnn_compress.core.bundle import load_bundle
from dsnn_compress.errors import DsnnError
from dsnn_compress.export.formats import export_level
from dsnn_compress.prune import PruneOptions, prune_checkpoint
from dsnn_compress.runtime.runnable import load_model
from dsnn_compress.sources.opener import open_source

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LEVELS = (0.5, 0.7, 0.9)


# ------------------------------------------------------------------ an independent reader of the documented layout


def read_layout(path: Path) -> tuple[dict[str, dict], dict[str, str], int]:
    """Header entries, metadata and data start of a safetensors file, parsed with struct + json only."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    return {k: v for k, v in header.items() if k != "__metadata__"}, header.get("__metadata__", {}), 8 + length


def independent_checksums(path: Path) -> dict:
    """The ``dsnn_checksums`` record recomputed from the file's bytes as docs/bundle-format.md specifies."""
    raw = path.read_bytes()
    entries, metadata, start = read_layout(path)
    tensors = {}
    for name, info in entries.items():
        begin, end = info["data_offsets"]
        prefix = f"{info['dtype']}:{','.join(map(str, info['shape']))}:".encode("ascii")
        tensors[name] = xxhash.xxh3_64_hexdigest(prefix + raw[start + begin : start + end])
    encoded = b""
    for key in sorted(k for k in metadata if k != "dsnn_checksums"):
        for text in (key, metadata[key]):
            data = text.encode("utf-8")
            encoded += struct.pack("<Q", len(data)) + data
    return {"algorithm": "xxh3-64", "metadata": xxhash.xxh3_64_hexdigest(encoded), "tensors": tensors}


def flip_byte(path: Path, tensor: str, index: int = 0) -> Path:
    """Invert one byte of ``tensor``'s stored data in place."""
    entries, _, start = read_layout(path)
    position = start + entries[tensor]["data_offsets"][0] + index
    raw = bytearray(path.read_bytes())
    raw[position] ^= 0xFF
    path.write_bytes(bytes(raw))
    return path


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("integrity")
    dense = write_checkpoint(root / "dense.safetensors", random_state_dict(0))
    out = root / "bundle.safetensors"
    prune_checkpoint(dense, out, PruneOptions(LEVELS))
    return out


# ------------------------------------------------------------------------------------------------ what is recorded


def test_bundle_records_checksums_an_independent_reader_reproduces(bundle_path: Path) -> None:
    _, metadata, _ = read_layout(bundle_path)
    recorded = json.loads(metadata["dsnn_checksums"])
    expected = independent_checksums(bundle_path)
    assert recorded == expected
    entries, _, _ = read_layout(bundle_path)
    assert sorted(recorded["tensors"]) == sorted(entries)  # every tensor, the code tensors included
    assert any(name.endswith(".dsnn_code") for name in recorded["tensors"])
    bundle = load_bundle(bundle_path)
    assert bundle.integrity == "verified"
    assert "dsnn_checksums" not in bundle.metadata  # recomputed by every writer, never carried over


def test_exports_carry_the_checksums_of_the_level_they_hold(bundle_path: Path, tmp_path: Path) -> None:
    bundle = load_bundle(bundle_path)
    dense = export_level(bundle, 0, tmp_path / "dense.safetensors")
    sparse = export_level(bundle, 0.9, tmp_path / "sparse.safetensors")
    for path, level in ((dense, 0.0), (sparse, 0.9)):
        _, metadata, _ = read_layout(path)
        recorded = json.loads(metadata["dsnn_checksums"])
        assert recorded == independent_checksums(path)
        state = bundle.state_dict_at(level)
        for name, tensor in state.items():  # the digest of the level's tensor, not of the bundle's dense one
            data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            prefix = f"{safetensors_io.DTYPE_NAMES[tensor.dtype]}:{','.join(map(str, tensor.shape))}:"
            assert recorded["tensors"][name] == xxhash.xxh3_64_hexdigest(prefix.encode() + data), name
    dense_sums = json.loads(read_layout(dense)[1]["dsnn_checksums"])["tensors"]
    sparse_sums = json.loads(read_layout(sparse)[1]["dsnn_checksums"])["tensors"]
    assert dense_sums["enc.ff.weight"] != sparse_sums["enc.ff.weight"]
    assert dense_sums["enc.ff.bias"] == sparse_sums["enc.ff.bias"]
    assert open_source(sparse).integrity == "verified"


def test_a_rewrite_by_another_tool_with_the_same_content_still_verifies(bundle_path: Path, tmp_path: Path) -> None:
    # safetensors' own writer orders tensors differently (by alignment), but the data and header entries agree.
    copy = tmp_path / "copy.safetensors"
    _, metadata, _ = read_layout(bundle_path)
    save_file(load_file(str(bundle_path)), str(copy), metadata=metadata)
    assert copy.read_bytes() != bundle_path.read_bytes()
    assert load_bundle(copy).integrity == "verified"


# ----------------------------------------------------------------------------------------------- what is refused


def test_a_flipped_byte_names_the_damaged_tensor(bundle_path: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    bad = flip_byte(Path(shutil.copy(bundle_path, tmp_path / "bad.safetensors")), "enc.ff.bias", 2)
    with pytest.raises(DsnnError, match="checksum mismatch in tensor enc.ff.bias") as info:
        load_bundle(bad)
    assert info.value.exit_code == 1
    for flags in ([], ["--verify"]):
        result = run_cli(capsys, "inspect", bad, *flags)
        assert result.code == 1 and result.out == ""
        assert_one_error_line(result.err, f"{bad} is corrupt: checksum mismatch in tensor enc.ff.bias", "--no-verify")
    # skipping the check loads the damaged weights as they are, and says so
    loaded = load_bundle(bad, verify=False)
    assert loaded.integrity == "not verified"
    assert not torch.equal(loaded.tensors["enc.ff.bias"], load_bundle(bundle_path).tensors["enc.ff.bias"])
    result = run_cli(capsys, "inspect", bad, "--no-verify")
    assert result.code == 0, result.err
    assert "checksums: present, not verified" in result.out
    result = run_cli(capsys, "inspect", bad, "--no-verify", "--json")
    assert json.loads(result.out)["integrity"] == "not verified"


def test_several_damaged_tensors_are_all_named(bundle_path: Path, tmp_path: Path) -> None:
    bad = Path(shutil.copy(bundle_path, tmp_path / "bad.safetensors"))
    for name in ("lstm.weight_hh_l0", "enc.norm.weight", "half.weight.dsnn_code"):
        flip_byte(bad, name, 1)
    with pytest.raises(DsnnError) as info:
        load_bundle(bad)
    names = "enc.norm.weight, half.weight.dsnn_code, lstm.weight_hh_l0"
    assert f"checksum mismatch in tensors {names}" in info.value.message


def test_edited_metadata_is_refused_unless_unverified(bundle_path: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    edited = tmp_path / "edited.safetensors"
    _, metadata, _ = read_layout(bundle_path)
    metadata["allocation"] = "global"  # structurally fine, but not what was written
    save_file(load_file(str(bundle_path)), str(edited), metadata=metadata)
    result = run_cli(capsys, "inspect", edited)
    assert result.code == 1
    assert_one_error_line(result.err, "is corrupt: its metadata does not match its checksum")
    assert run_cli(capsys, "inspect", edited, "--no-verify").code == 0


def test_a_bundle_without_checksums_loads_and_says_so(bundle_path: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    old = tmp_path / "old.safetensors"
    _, metadata, _ = read_layout(bundle_path)
    del metadata["dsnn_checksums"]
    save_file(load_file(str(bundle_path)), str(old), metadata=metadata)
    bundle = load_bundle(old)
    assert bundle.integrity == "no checksums"
    reference = load_bundle(bundle_path)
    assert all(torch.equal(bundle.tensors[n], reference.tensors[n]) for n in reference.tensors)
    result = run_cli(capsys, "inspect", old)
    assert result.code == 0, result.err
    assert "checksums: no checksums" in result.out
    # and re-writing it (here: an export of its dense level) records them again
    exported = export_level(bundle, 0, tmp_path / "dense.safetensors")
    assert open_source(exported).integrity == "verified"


@pytest.mark.parametrize(("record", "message"), [
    ("{oops", "is not valid JSON"),
    ("[1]", "is not a JSON object"),
    ('{"algorithm":"md5","metadata":"0","tensors":{}}', "checksum algorithm 'md5'"),
    ('{"algorithm":"xxh3-64","metadata":"zz","tensors":{}}', "is malformed"),
])
def test_a_malformed_checksum_entry_is_refused(bundle_path: Path, tmp_path: Path, record: str, message: str) -> None:
    bad = tmp_path / "bad.safetensors"
    _, metadata, _ = read_layout(bundle_path)
    metadata["dsnn_checksums"] = record
    save_file(load_file(str(bundle_path)), str(bad), metadata=metadata)
    with pytest.raises(DsnnError, match=message):
        load_bundle(bad)
    assert load_bundle(bad, verify=False).integrity == "not verified"


def test_evaluate_refuses_a_damaged_model_and_no_verify_runs_it(tiny_model: TinyModel, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    bad = Path(shutil.copy(tiny_model.bundle, tmp_path / "bad.safetensors"))
    entries, _, _ = read_layout(bad)
    bias = sorted(n for n in entries if n.endswith(".bias"))[0]
    flip_byte(bad, bias, 1)
    result = run_cli(capsys, "evaluate", bad, "--data", MANIFEST, "--levels", "0")
    assert result.code == 1 and result.out == ""
    assert_one_error_line(result.err, f"checksum mismatch in tensor {bias}")
    result = run_cli(capsys, "evaluate", bad, "--data", MANIFEST, "--levels", "0", "--no-verify", "--json", "-")
    assert result.code == 0, result.err
    assert json.loads(result.out)["levels"][0]["level"] == 0.0
    result = run_cli(capsys, "transcribe", bad, MANIFEST.parent / "audio" / "test-00001.flac")
    assert result.code == 1
    assert_one_error_line(result.err, f"checksum mismatch in tensor {bias}")


# -------------------------------------------------------------------------------- one read per file, under races


def two_bundles(root: Path, checkpoint: Path) -> tuple[Path, Path, Path]:
    """Runnable bundles A and B of ``checkpoint`` with different levels (different sizes too), and the path that
    will flip between them."""
    a, b = root / "a.safetensors", root / "b.safetensors"
    prune_checkpoint(checkpoint, a, PruneOptions((0.5, 0.9)))
    prune_checkpoint(checkpoint, b, PruneOptions((0.3,)))
    assert a.stat().st_size != b.stat().st_size
    target = root / "model.safetensors"
    shutil.copy(a, target)
    return a, b, target


def same_bundle(x, y) -> bool:  # noqa: ANN001 - two Bundles
    return (x.levels == y.levels and sorted(x.tensors) == sorted(y.tensors) and sorted(x.codes) == sorted(y.codes)
            and all(torch.equal(x.tensors[n], y.tensors[n]) for n in x.tensors)
            and all(torch.equal(x.codes[n], y.codes[n]) for n in x.codes))


def test_a_replace_after_the_header_is_read_does_not_reach_the_tensors(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model: TinyModel) -> None:
    """Deterministic: the path is replaced by another bundle right after the header was parsed; the tensors must
    still come from the file whose header it was."""
    a, b, target = two_bundles(tmp_path, tiny_model.checkpoint)
    real = safetensors_io.parse_header
    replaced: list[bool] = []

    def parse_then_replace(head: bytes, size: int):  # noqa: ANN202
        result = real(head, size)
        if not replaced:
            replaced.append(True)
            staged = tmp_path / "staged.safetensors"
            shutil.copy(b, staged)
            os.replace(staged, target)
        return result

    monkeypatch.setattr(safetensors_io, "parse_header", parse_then_replace)
    loaded = open_source(target).require_bundle()
    assert replaced and same_bundle(loaded, load_bundle(a))
    assert open_source(target).sha256 == open_source(b).sha256  # the next open sees the new file


def test_prune_refuses_a_source_that_became_a_bundle_after_the_check(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bundle_path: Path) -> None:
    import dsnn_compress.sources.opener as opener

    a = bundle_path
    dense = write_checkpoint(tmp_path / "dense.safetensors", random_state_dict(3))
    real = opener.read_safetensors_metadata

    def check_then_replace(path: Path) -> dict[str, str]:
        result = real(path)
        shutil.copy(a, tmp_path / "staged.safetensors")
        os.replace(tmp_path / "staged.safetensors", dense)
        return result

    monkeypatch.setattr(opener, "read_safetensors_metadata", check_then_replace)
    with pytest.raises(DsnnError, match="already a DSNN bundle"):
        prune_checkpoint(dense, tmp_path / "out.safetensors", PruneOptions(LEVELS))
    assert not (tmp_path / "out.safetensors").exists()


FLIPPER = """
import os, sys
a, b, target, stop = sys.argv[1:]
i = 0
while not os.path.exists(stop):
    staged = target + ".staged"
    os.link(b if i % 2 == 0 else a, staged)
    os.replace(staged, target)
    i += 1
"""


def test_loads_racing_with_replaces_always_give_one_of_the_two_bundles(tmp_path: Path, tiny_model: TinyModel) -> None:
    """Another process replaces the path between two valid bundles (``os.replace``, as dsnn's writers do) while this
    one loads it repeatedly: the race that gave 'smaller than the required mapping size', 'codes exceed N levels'
    and 'not a DSNN bundle' before. Every load must succeed and be exactly one of the two."""
    a, b, target = two_bundles(tmp_path, tiny_model.checkpoint)
    originals = [load_bundle(a), load_bundle(b)]
    stop = tmp_path / "stop"
    flipper = subprocess.Popen([sys.executable, "-c", FLIPPER, str(a), str(b), str(target), str(stop)])
    seen = [0, 0]
    try:
        for i in range(300):
            bundle = load_model(target).bundle if i % 10 == 0 else load_bundle(target)
            match = [k for k, ref in enumerate(originals) if same_bundle(bundle, ref)]
            assert len(match) == 1
            seen[match[0]] += 1
    finally:
        stop.touch()
        flipper.wait(timeout=30)
    assert flipper.returncode == 0
    assert min(seen) > 0, seen  # the race really happened
