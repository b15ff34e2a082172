"""The bundle file: round trip, independent decoding from the documented layout, determinism, size, validation."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import DEFAULT_PRUNED, random_state_dict, write_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dsnn_compress.core.bundle import Bundle, load_bundle, save_bundle
from dsnn_compress.core.levels import parse_level
from dsnn_compress.core.masks import compute_codes, pack_codes, unpack_codes
from dsnn_compress.core.safetensors_io import write_safetensors
from dsnn_compress.errors import DsnnError, UsageError
from dsnn_compress.prune import PruneOptions, prune_checkpoint
from dsnn_compress.sources.opener import open_source

LEVELS = (0.5, 0.7, 0.9)


def raw(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy())


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory: pytest.TempPathFactory, dense_checkpoint: Path) -> Path:
    """A read-only bundle of ``dense_checkpoint`` at LEVELS."""
    out = tmp_path_factory.mktemp("bundle") / "bundle.safetensors"
    prune_checkpoint(dense_checkpoint, out, PruneOptions(LEVELS))
    return out


def test_round_trip_is_bit_identical(dense_checkpoint: Path, bundle_path: Path) -> None:
    state = random_state_dict(0)
    bundle = load_bundle(bundle_path)
    assert bundle.levels == LEVELS and bundle.all_levels == (0.0, *LEVELS) and bundle.bits == 2
    assert bundle.path == bundle_path
    assert sorted(bundle.tensors) == sorted(state)
    for name, tensor in state.items():
        assert bundle.tensors[name].dtype == tensor.dtype, name
        assert bundle.tensors[name].shape == tensor.shape, name
        assert raw(bundle.tensors[name]) == raw(tensor), name
    assert {t.dtype for t in bundle.tensors.values()} >= {torch.float32, torch.float16, torch.bfloat16, torch.int64}
    assert sorted(bundle.codes) == DEFAULT_PRUNED
    expected = compute_codes({n: state[n] for n in DEFAULT_PRUNED}, LEVELS)
    for name in DEFAULT_PRUNED:
        assert bundle.codes[name].dtype == torch.uint8
        assert torch.equal(bundle.codes[name], expected[name]), name
    assert bundle.metadata["allocation"] == "per-layer"
    assert bundle.metadata["source"]["sha256"] == open_source(dense_checkpoint).sha256
    assert bundle.metadata["source"]["file"] == "dense.safetensors"


def test_save_load_of_hand_made_bundle_keeps_codes_and_metadata(tmp_path: Path) -> None:
    tensors = {"a.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4), "steps": torch.tensor([5])}
    # global allocation over 12 weights prunes round(s * 12) = 1, 2, 4, 5, 6, 7, 8 weights at 0.1 ... 0.7
    codes = {"a.weight": torch.tensor([[0, 1, 2, 2], [3, 4, 5, 6], [7, 7, 7, 7]], dtype=torch.uint8)}
    levels = tuple(round(0.1 * i, 1) for i in range(1, 8))
    path = save_bundle(Bundle(tensors, codes, levels, {"allocation": "global", "custom": "x"}), tmp_path / "b.st")
    loaded = load_bundle(path)
    assert loaded.bits == 3
    assert torch.equal(loaded.codes["a.weight"], codes["a.weight"])
    assert loaded.metadata["allocation"] == "global" and loaded.metadata["custom"] == "x"


def decode_independently(path: Path) -> tuple[list[float], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Decode a bundle with safetensors + numpy only, following the documented layout."""
    with safe_open(str(path), framework="np") as fh:
        meta = fh.metadata()
        levels = json.loads(meta["levels"])
        bits = int(meta["code_bits"])
        tensors = {n: fh.get_tensor(n) for n in fh.keys() if not n.endswith(".dsnn_code")}  # noqa: SIM118
        packed = {n[: -len(".dsnn_code")]: fh.get_tensor(n) for n in fh.keys() if n.endswith(".dsnn_code")}  # noqa: SIM118
    assert meta["format"] == "dsnn-bundle" and meta["format_version"] == "1"
    codes = {}
    for name, stream in packed.items():
        assert stream.dtype == np.uint8 and stream.ndim == 1
        n = tensors[name].size
        pos = np.arange(n)[:, None] * bits + np.arange(bits)[None, :]  # stream bit of every code bit
        bit = (stream[pos // 8] >> (pos % 8)) & 1
        codes[name] = (bit.astype(np.int64) << np.arange(bits)).sum(axis=1).reshape(tensors[name].shape)
    return levels, tensors, codes


def test_independent_numpy_decoder_reproduces_every_level(tmp_path: Path) -> None:
    state = {k: v for k, v in random_state_dict(1).items() if v.dtype != torch.bfloat16}  # numpy has no bf16
    src = write_checkpoint(tmp_path / "dense.safetensors", state)
    bundle = prune_checkpoint(src, tmp_path / "bundle.safetensors", PruneOptions(LEVELS, allocation="global"))
    levels, tensors, codes = decode_independently(tmp_path / "bundle.safetensors")
    assert levels == list(LEVELS)
    assert sorted(codes) == sorted(n for n in DEFAULT_PRUNED if n in state)
    for k, level in enumerate([0.0, *levels]):
        expected = bundle.state_dict_at(level)
        assert sorted(expected) == sorted(tensors)
        for name, dense in tensors.items():
            mine = np.where(codes[name] >= k, dense, np.zeros((), dense.dtype)) if name in codes else dense
            assert expected[name].numpy().dtype == mine.dtype
            np.testing.assert_array_equal(expected[name].numpy(), mine, err_msg=f"{name} at {level}")
    total = sum(c.size for c in codes.values())
    for k, s in enumerate(levels, 1):
        assert sum(int((c < k).sum()) for c in codes.values()) == round(s * total)


def test_identical_inputs_give_identical_bytes(tmp_path: Path, dense_checkpoint: Path) -> None:
    prune_checkpoint(dense_checkpoint, tmp_path / "a.safetensors", PruneOptions(LEVELS))
    prune_checkpoint(dense_checkpoint, tmp_path / "b.safetensors", PruneOptions(LEVELS))
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    state = random_state_dict(2)
    write_safetensors(tmp_path / "x.safetensors", state, {"k": "v"})
    write_safetensors(tmp_path / "y.safetensors", dict(reversed(list(state.items()))), {"k": "v"})
    assert (tmp_path / "x.safetensors").read_bytes() == (tmp_path / "y.safetensors").read_bytes()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".dsnn-") or p.name.endswith(".tmp")] == []


def test_bundle_size_overhead(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    state = {
        "enc.big.weight": torch.randn(1000, 1000, generator=gen),
        "enc.small.weight": torch.randn(64, 64, generator=gen),
        "enc.big.bias": torch.randn(1000, generator=gen),
    }
    src = write_checkpoint(tmp_path / "dense.safetensors", state)
    out = tmp_path / "bundle.safetensors"
    prune_checkpoint(src, out, PruneOptions(LEVELS))
    dense_bytes = sum(t.numel() * t.element_size() for t in state.values())
    code_bytes = math.ceil(1000 * 1000 * 2 / 8) + math.ceil(64 * 64 * 2 / 8)
    size = out.stat().st_size
    assert dense_bytes + code_bytes < size <= 1.07 * dense_bytes


# ---------------------------------------------------------------- validation on load


def rewrite(
    src: Path,
    dst: Path,
    tensors_fn: Callable[[dict[str, torch.Tensor]], None] | None = None,
    meta_fn: Callable[[dict[str, str]], None] | None = None,
) -> Path:
    with safe_open(str(src), framework="pt") as fh:
        meta = dict(fh.metadata())
        tensors = {n: fh.get_tensor(n) for n in fh.keys()}  # noqa: SIM118
    if tensors_fn:
        tensors_fn(tensors)
    if meta_fn:
        meta_fn(meta)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def edit_json(key: str, fn: Callable[[object], object]) -> Callable[[dict[str, str]], None]:
    def apply(meta: dict[str, str]) -> None:
        meta[key] = json.dumps(fn(json.loads(meta[key])))

    return apply


def set_code(name: str, index: int, value: int, bits: int) -> Callable[[dict[str, torch.Tensor]], None]:
    def apply(tensors: dict[str, torch.Tensor]) -> None:
        shape = tensors[name].shape
        code = unpack_codes(tensors[name + ".dsnn_code"], bits, shape).reshape(-1).clone()
        code[index] = value
        tensors[name + ".dsnn_code"] = pack_codes(code.reshape(shape), bits)

    return apply


def test_unmodified_rewrite_still_loads(tmp_path: Path, bundle_path: Path) -> None:
    # The rewriting helper itself must not break a bundle, so each rejection below is caused by its tweak.
    loaded = load_bundle(rewrite(bundle_path, tmp_path / "copy.safetensors"))
    assert torch.equal(loaded.codes["enc.ff.weight"], load_bundle(bundle_path).codes["enc.ff.weight"])


def _pop(d: dict, key: str) -> None:
    d.pop(key)


CORRUPTIONS: dict[str, tuple[dict, str]] = {
    "format-name": ({"meta_fn": lambda m: m.update(format="other-bundle")}, "not a DSNN bundle"),
    "no-format": ({"meta_fn": lambda m: _pop(m, "format")}, "not a DSNN bundle"),
    "format-version": ({"meta_fn": lambda m: m.update(format_version="2")}, "format version 2"),
    "missing-key": ({"meta_fn": lambda m: _pop(m, "code_bits")}, "lacks 'code_bits'"),
    "code-bits": ({"meta_fn": lambda m: m.update(code_bits="3")}, "code_bits 3"),
    "levels-not-json": ({"meta_fn": lambda m: m.update(levels="[0.5, 0.7")}, "'levels' is not valid JSON"),
    "pruned-not-json": ({"meta_fn": lambda m: m.update(pruned="{oops")}, "'pruned' is not valid JSON"),
    "levels-unsorted": ({"meta_fn": lambda m: m.update(levels="[0.9, 0.7, 0.5]")}, "invalid levels"),
    "levels-strings": ({"meta_fn": lambda m: m.update(levels='["a"]')}, "invalid levels"),
    "code-too-short": (
        {"tensors_fn": lambda t: t.update({"enc.ff.weight.dsnn_code": t["enc.ff.weight.dsnn_code"][:-1].clone()})},
        "wrong size",
    ),
    "code-too-long": (
        {"tensors_fn": lambda t: t.update({"enc.ff.weight.dsnn_code": torch.cat(
            [t["enc.ff.weight.dsnn_code"], torch.zeros(1, dtype=torch.uint8)])})},
        "wrong size",
    ),
    "shape-in-metadata": (
        {"meta_fn": edit_json("pruned", lambda p: {**p, "enc.ff.weight": {**p["enc.ff.weight"], "shape": [16, 8]}})},
        "metadata says",
    ),
    "tensor-reshaped": (
        {"tensors_fn": lambda t: t.update({"enc.ff.weight": t["enc.ff.weight"].reshape(16, 8).clone()})},
        "metadata says",
    ),
    "counts": (
        {"meta_fn": edit_json("pruned", lambda p: {**p, "enc.ff.weight": {
            **p["enc.ff.weight"], "pruned": [0, 65, 90, 115]}})},
        "do not match",
    ),
    "code-changed": ({"tensors_fn": set_code("enc.ff.weight", 0, 0, 2)}, "do not match"),
    "stray-code": (
        {"tensors_fn": lambda t: t.update({"ghost.weight.dsnn_code": torch.zeros(4, dtype=torch.uint8)})},
        "belongs to no listed tensor",
    ),
    "missing-code": ({"tensors_fn": lambda t: _pop(t, "lstm.weight_hh_l0.dsnn_code")}, "codes are missing"),
    "unlisted-code": (
        {"meta_fn": edit_json("pruned", lambda p: {k: v for k, v in p.items() if k != "half.weight"})},
        "belongs to no listed tensor",
    ),
    "nothing-pruned": ({"meta_fn": lambda m: m.update(pruned="{}")}, "lists no pruned tensors"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_load_rejects_corrupt_bundle(tmp_path: Path, bundle_path: Path, case: str) -> None:
    """Each edit is caught twice: by its checksums, and (verify=False, or a bundle without checksums) by the
    structural validation."""
    kwargs, fragment = CORRUPTIONS[case]
    bad = rewrite(bundle_path, tmp_path / "bad.safetensors", **kwargs)
    with pytest.raises(DsnnError, match=fragment) as info:
        load_bundle(bad, verify=False)
    assert info.value.exit_code == 1
    with pytest.raises(DsnnError, match="is corrupt: (checksum mismatch|its metadata|it lacks|it holds)") as info:
        load_bundle(bad)
    assert info.value.exit_code == 1


def test_load_rejects_code_values_above_level_count(tmp_path: Path, dense_checkpoint: Path) -> None:
    # Two levels use 2-bit codes, so the value 3 fits in the stream but means nothing.
    good = tmp_path / "two.safetensors"
    prune_checkpoint(dense_checkpoint, good, PruneOptions((0.5, 0.8)))
    assert int(load_bundle(good).codes["enc.ff.weight"].max()) == 2
    bad = rewrite(good, tmp_path / "bad.safetensors", tensors_fn=set_code("enc.ff.weight", 5, 3, 2))
    with pytest.raises(DsnnError, match="exceed 2 levels"):
        load_bundle(bad, verify=False)


def test_load_rejects_stray_padding_bits(tmp_path: Path, dense_checkpoint: Path) -> None:
    # 9 weights at 1 bit fill 2 bytes; bits 1..7 of the last byte are padding and must be zero.
    tensors = {"w.weight": torch.randn(3, 3)}
    path = save_bundle(Bundle(tensors, compute_codes(tensors, (0.5,)), (0.5,)), tmp_path / "odd.safetensors")

    def set_padding(t: dict[str, torch.Tensor]) -> None:
        code = t["w.weight.dsnn_code"].clone()
        code[-1] |= 0x80
        t["w.weight.dsnn_code"] = code

    with pytest.raises(DsnnError, match="stray padding"):
        load_bundle(rewrite(path, tmp_path / "bad.safetensors", tensors_fn=set_padding), verify=False)


def test_load_rejects_plain_checkpoint_and_missing_file(tmp_path: Path, dense_checkpoint: Path) -> None:
    with pytest.raises(DsnnError, match="not a DSNN bundle"):
        load_bundle(dense_checkpoint)
    with pytest.raises(DsnnError, match="does not exist"):
        load_bundle(tmp_path / "missing.safetensors")
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(dense_checkpoint.read_bytes()[:100])
    with pytest.raises(DsnnError, match="not a readable safetensors"):
        load_bundle(truncated)


def test_save_refuses_inconsistent_bundles(tmp_path: Path) -> None:
    tensors = {"w.weight": torch.randn(3, 3)}
    with pytest.raises(DsnnError, match="shape"):
        save_bundle(Bundle(tensors, {"w.weight": torch.zeros(9, dtype=torch.uint8)}, (0.5,)), tmp_path / "a.st")
    with pytest.raises(DsnnError, match="has no tensor"):
        save_bundle(Bundle(tensors, {"x.weight": torch.zeros(3, 3, dtype=torch.uint8)}, (0.5,)), tmp_path / "b.st")
    clash = {**tensors, "w.weight.dsnn_code": torch.zeros(2, dtype=torch.uint8)}
    with pytest.raises(DsnnError, match="reserves"):
        save_bundle(Bundle(clash, compute_codes(tensors, (0.5,)), (0.5,)), tmp_path / "c.st")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- state_dict_at and levels


def test_state_dict_at_zeroes_exactly_the_pruned_weights(bundle_path: Path) -> None:
    state = random_state_dict(0)
    bundle = load_bundle(bundle_path)
    for k, level in enumerate(bundle.all_levels):
        out = bundle.state_dict_at(level)
        assert sorted(out) == sorted(state)
        for name, dense in state.items():
            assert out[name].dtype == dense.dtype and out[name].shape == dense.shape
            if name not in bundle.codes:
                assert raw(out[name]) == raw(dense)
                continue
            keep = bundle.codes[name] >= k
            assert int((~keep).sum()) == round(level * dense.numel())
            assert torch.equal(out[name][keep], dense[keep])
            assert bool((out[name][~keep] == 0).all())
            # Pruned weights are exactly the smallest magnitudes of that tensor.
            if k:
                assert float(dense[~keep].float().abs().max()) <= float(dense[keep].float().abs().min())


def test_level_parsing(bundle_path: Path) -> None:
    bundle = load_bundle(bundle_path)
    assert bundle.level_index("dense") == 0
    assert bundle.level_index("0") == 0
    assert bundle.level_index(0) == 0
    assert bundle.level_index("70%") == 2
    assert bundle.level_index(" 90% ") == 3
    assert bundle.level_index(0.7) == 2
    assert bundle.level_index("0.7") == 2
    assert bundle.level_index(0.5 + 5e-7) == 1
    assert torch.equal(bundle.mask("enc.ff.weight", "70%"), bundle.codes["enc.ff.weight"] >= 2)
    a, b = bundle.state_dict_at("70%"), bundle.state_dict_at(0.7)
    assert all(torch.equal(a[n], b[n]) for n in a)
    with pytest.raises(UsageError) as info:
        bundle.level_index(0.6)
    assert "0.6" in info.value.message
    assert info.value.hint == "choose one of 0, 0.5, 0.7, 0.9"
    assert info.value.exit_code == 2


@pytest.mark.parametrize("bad", ["abc", "1.5", "100%", "-0.1", "nan", "%", 1.0])
def test_parse_level_errors(bad: str | float) -> None:
    with pytest.raises(UsageError):
        parse_level(bad)


def test_parse_level_values() -> None:
    assert parse_level("dense") == 0.0
    assert parse_level("DENSE") == 0.0
    assert parse_level("70%") == pytest.approx(0.7)
    assert parse_level("0.9") == 0.9
    assert parse_level(0.5) == 0.5


def test_declared_levels_must_match_the_codes(tmp_path: Path) -> None:
    """Metadata saying 0.5/0.7/0.8 over codes made for 0.5/0.7/0.9 is refused (it would evaluate 0.9 as "0.8")."""
    weights = torch.randn(20, 10)
    codes = compute_codes({"w": weights}, (0.5, 0.7, 0.9))
    path = save_bundle(Bundle({"w": weights}, codes, (0.5, 0.7, 0.9)), tmp_path / "b.safetensors")
    tensors, meta = load_file(str(path)), dict(safe_open(str(path), framework="pt").metadata())
    meta["levels"] = json.dumps([0.5, 0.7, 0.8])
    save_file(tensors, str(tmp_path / "edited.safetensors"), metadata=meta)
    with pytest.raises(DsnnError, match="declares level 0.8 but its codes prune 90.00 %"):
        load_bundle(tmp_path / "edited.safetensors", verify=False)
    meta["levels"] = json.dumps([0.5, 0.7, 0.9])
    meta["pruned"] = json.dumps({"w": [1, 2]})
    save_file(tensors, str(tmp_path / "listed.safetensors"), metadata=meta)
    with pytest.raises(DsnnError, match="is not a JSON object"):
        load_bundle(tmp_path / "listed.safetensors", verify=False)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("source", "42", "'source' is not a JSON object"),
    ("tool", "[1]", "'tool' is not a JSON object"),
    ("code_suffix", ".codes", "code_suffix '.codes'"),
])
def test_metadata_of_the_wrong_type_is_refused(key: str, value: str, message: str, tmp_path: Path) -> None:
    weights = torch.randn(8, 4)
    bundle = Bundle({"w": weights}, compute_codes({"w": weights}, (0.5,)), (0.5,))
    path = save_bundle(bundle, tmp_path / "b.safetensors")
    tensors, meta = load_file(str(path)), dict(safe_open(str(path), framework="pt").metadata())
    meta[key] = value
    save_file(tensors, str(tmp_path / "edited.safetensors"), metadata=meta)
    with pytest.raises(DsnnError, match=message):
        load_bundle(tmp_path / "edited.safetensors", verify=False)
