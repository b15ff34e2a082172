"""Benchmark: bytes on disk of a level exported with ``--compress`` (sparse-bitmask) vs. the dense export vs. the
bundle, per level, and how many bytes the pruned tensors take against their dense fp32 bytes.

Two models:

* **conformer**: the embedded demo model (``dsnn_compress/assets/demo/model.safetensors``, conformer-ctc ``s``,
  4.47M parameters, stored fp16) pruned to 0.5/0.7/0.9; also converted to fp32 (``--skip-fp32`` leaves that out),
  since the embedded copy is fp16 only to keep the package small. Exports: ``--format checkpoint`` with and without
  ``--compress``.
* **wav2vec2-base**: a random ``Wav2Vec2ForCTC`` with wav2vec2-base's default config (94.4M parameters, fp32, built
  offline from ``Wav2Vec2Config()``; weights are random, which does not matter for sizes), saved with
  ``save_pretrained``, pruned with the default selection (the encoder's Linear layers). Exports: ``--format hf``
  with and without ``--compress`` (the size of ``model.safetensors``). ``--skip-hf`` leaves it out.

Sizes do not depend on machine load, so this benchmark has no idle wait. ``pruned/fp32`` is the bytes the pruned
tensors take in the compressed file (the four sparse-bitmask parts, or dense bytes for a tensor that compression
would not make smaller) over ``4 * numel``; the 0.9 bar is 0.15.

Usage::

    python benchmarks/compressed_size.py [--json out.json] [--skip-hf] [--skip-fp32]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from safetensors import safe_open

from dsnn_compress.core.bundle import load_bundle
from dsnn_compress.core.compressed import COMPRESSION_KEY, PARTS
from dsnn_compress.core.safetensors_io import read_safetensors, write_safetensors
from dsnn_compress.demo import demo_assets
from dsnn_compress.export.formats import export_level
from dsnn_compress.prune import PruneOptions, prune_checkpoint

LEVELS = (0.5, 0.7, 0.9)


def pruned_tensor_bytes(path: Path, pruned: list[str]) -> tuple[int, int]:
    """``(stored bytes, compressed count)`` of the pruned tensors in a (possibly compressed) safetensors file."""
    with safe_open(str(path), "pt") as fh:
        keys = set(fh.keys())
        record = json.loads((fh.metadata() or {}).get(COMPRESSION_KEY, '{"tensors": []}'))
        total = 0
        for name in pruned:
            names = [name] if name in keys else [f"{name[: -len('.weight')]}.{part}" for part in PARTS]
            for key in names:
                tensor = fh.get_tensor(key)
                total += tensor.numel() * tensor.element_size()
    return total, len(record["tensors"])


def measure(bundle_path: Path, export: Any, weights_of: Any, tmp: Path, label: str) -> list[dict[str, Any]]:
    """One row per level: bundle, dense and compressed export bytes, pruned-tensor bytes."""
    bundle = load_bundle(bundle_path)
    pruned = sorted(bundle.codes)
    fp32 = sum(bundle.tensors[n].numel() * 4 for n in pruned)
    own = sum(bundle.tensors[n].numel() * bundle.tensors[n].element_size() for n in pruned)
    rows = []
    for level in (0.0, *LEVELS):
        dense_out = export(bundle, level, tmp / f"{label}-{level:g}-dense", False)
        comp_out = export(bundle, level, tmp / f"{label}-{level:g}-compressed", True)
        dense_file, comp_file = weights_of(dense_out), weights_of(comp_out)
        comp_pruned, count = pruned_tensor_bytes(comp_file, pruned)
        rows.append({
            "model": label, "level": level, "bundle_bytes": bundle_path.stat().st_size,
            "dense_export_bytes": dense_file.stat().st_size, "compressed_bytes": comp_file.stat().st_size,
            "pruned_fp32_bytes": fp32, "pruned_dense_bytes": own, "pruned_compressed_bytes": comp_pruned,
            "compressed_tensors": count, "pruned_tensors": len(pruned),
            "pruned_over_fp32": round(comp_pruned / fp32, 4), "pruned_over_own_dtype": round(comp_pruned / own, 4),
        })
        print(f"{label} {level:g}: {rows[-1]}", file=sys.stderr)
    return rows


def checkpoint_export(bundle: Any, level: float, out: Path, compress: bool) -> Path:
    return export_level(bundle, level, out.with_name(out.name + ".safetensors"), "checkpoint", compress)


def hf_export(bundle: Any, level: float, out: Path, compress: bool) -> Path:
    return export_level(bundle, level, out, "hf", compress)


def conformer(tmp: Path, fp32: bool) -> list[dict[str, Any]]:
    source = demo_assets() / "model.safetensors"
    label = "conformer fp16"
    if fp32:
        tensors, meta = read_safetensors(source)
        source = tmp / "conformer-fp32.safetensors"
        write_safetensors(source, {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}, meta)
        label = "conformer fp32"
    bundle = prune_checkpoint(source, tmp / f"{label.replace(' ', '-')}.bundle.safetensors", PruneOptions(LEVELS))
    return measure(bundle.path, checkpoint_export, lambda p: p, tmp, label.replace(" ", "-"))


def wav2vec2_base(tmp: Path) -> list[dict[str, Any]]:
    import transformers

    torch.manual_seed(0)
    config = transformers.Wav2Vec2Config(vocab_size=32)
    model = transformers.Wav2Vec2ForCTC(config)
    directory = tmp / "w2v2-base"
    model.save_pretrained(str(directory))
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", "|", *"ABCDEFGHIJKLMNOPQRSTUVWXYZ'"])}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    transformers.Wav2Vec2CTCTokenizer(str(directory / "vocab.json")).save_pretrained(str(directory))
    transformers.Wav2Vec2FeatureExtractor().save_pretrained(str(directory))
    params = sum(p.numel() for p in model.parameters())
    print(f"wav2vec2-base: {params:,} parameters", file=sys.stderr)
    del model
    bundle = prune_checkpoint(directory, tmp / "w2v2-base.bundle.safetensors", PruneOptions(LEVELS))
    return measure(bundle.path, hf_export, lambda p: p / "model.safetensors", tmp, "wav2vec2-base")


def mib(num: int) -> str:
    return f"{num / 2**20:.2f}"


def table(rows: list[dict[str, Any]]) -> Table:
    out = Table(title="bytes on disk per level (MiB): compressed export vs dense export vs bundle",
                title_justify="left")
    for column in ("model", "level", "bundle", "dense export", "compressed", "compressed / dense",
                   "pruned tensors: compressed / fp32", "/ own dtype", "compressed tensors"):
        out.add_column(column, justify="left" if column == "model" else "right")
    for r in rows:
        out.add_row(r["model"], "dense" if r["level"] == 0 else f"{r['level']:g}", mib(r["bundle_bytes"]),
                    mib(r["dense_export_bytes"]), mib(r["compressed_bytes"]),
                    f"{r['compressed_bytes'] / r['dense_export_bytes']:.3f}", f"{r['pruned_over_fp32']:.3f}",
                    f"{r['pruned_over_own_dtype']:.3f}", f"{r['compressed_tensors']}/{r['pruned_tensors']}")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--skip-fp32", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        rows += conformer(tmp, fp32=False)
        if not args.skip_fp32:
            rows += conformer(tmp, fp32=True)
        if not args.skip_hf:
            rows += wav2vec2_base(tmp)
    Console(width=160).print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
