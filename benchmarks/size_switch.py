"""Benchmark: one DSNN bundle vs. a dense checkpoint vs. separate per-level checkpoints (bytes on disk), and
switching levels inside a loaded bundle vs. loading a separate per-level checkpoint.

Two models:

* **default**: the embedded demo model (``dsnn_compress/assets/demo/model.safetensors``, a trained conformer-ctc
  ``s``) or any dsnn checkpoint given with ``--checkpoint``, converted to ``--dtype`` (fp32 by default: the
  embedded copy is fp16 to keep the package small, while per-level checkpoints are written in fp32). Sizes are of
  the files the CLI writes: ``dsnn prune`` (bundle) and ``dsnn export --level all --format checkpoint``
  (per-level checkpoints).
  Switching uses the public runtime: ``load_model(bundle)`` once, then ``set_level``; the alternative is
  ``load_model(per-level checkpoint)`` (a fresh model from the file, what a user without bundles does) and, as a
  lower bound, ``load_state_dict(load_file(...))`` into a model that is already built.
* **100M**: a ~100M-parameter fp32 stack of Linear layers (as in ``switching.py``) saved as a plain safetensors
  state dict; sizes of ``prune_checkpoint`` and ``export_level(..., "safetensors")`` per level; switching with
  ``attach`` + ``set_level`` vs. ``load_state_dict(load_file(...))``.

Per-level files hold zeros at pruned positions, so they compress; the "zlib" columns give what a generic
compressor (zlib level 1) makes of each file set, bundle included, as a fair comparison with compressed storage.
Load timings are given with the file in the page cache (warm) and with its pages dropped first (cold, Linux only).

Usage::

    python benchmarks/size_switch.py [--checkpoint dense.safetensors] [--linear-params 1e8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file, save_file

from dsnn_compress.core.bundle import load_bundle
from dsnn_compress.core.safetensors_io import read_safetensors, write_safetensors
from dsnn_compress.demo import demo_assets
from dsnn_compress.export.formats import export_levels
from dsnn_compress.prune import PruneOptions, prune_checkpoint
from dsnn_compress.runtime.runnable import load_model
from dsnn_compress.runtime.sparsity import attach

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_env  # noqa: E402
from switching import CAN_DROP_CACHE, SETTINGS, _drop_page_cache, linear_stack, timeit  # noqa: E402

LEVELS = (0.5, 0.7, 0.9)


def zlib_size(path: Path, chunk: int = 1 << 24) -> int:
    """Bytes of ``path`` after zlib level 1 (streamed)."""
    comp = zlib.compressobj(1)
    total = 0
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            total += len(comp.compress(block))
    return total + len(comp.flush())


def sizes(dense: Path, bundle: Path, per_level: list[Path]) -> dict[str, int]:
    """Raw and zlib sizes of the three ways to store the model."""
    return {
        "dense": dense.stat().st_size,
        "bundle": bundle.stat().st_size,
        "per_level": sum(p.stat().st_size for p in per_level),
        "dense_zlib": zlib_size(dense),
        "bundle_zlib": zlib_size(bundle),
        "per_level_zlib": sum(zlib_size(p) for p in per_level),
    }


def load_timings(files: list[Path], load: Any, repeats: int, warmup: int) -> dict[str, Any]:
    """``load(path)`` cycling over ``files``: warm page cache, then cold (pages dropped before each call)."""
    order: list[Path] = []

    def pick(cold: bool) -> None:
        order.append(files[len(order) % len(files)])
        if cold:
            _drop_page_cache(order[-1])

    warm = timeit(lambda: load(order[-1]), repeats, warmup, setup=lambda: pick(False))
    cold = timeit(lambda: load(order[-1]), repeats, warmup, setup=lambda: pick(True)) if CAN_DROP_CACHE else None
    return {"warm": warm, "cold": cold}


def switch_timing(set_level: Any, repeats: int, warmup: int) -> dict[str, float]:
    """Median time of ``set_level`` cycling through the sparse levels."""
    cycle = iter([LEVELS[i % len(LEVELS)] for i in range(10_000)])
    return timeit(lambda: set_level(next(cycle)), repeats, warmup)


def default_model(checkpoint: Path, work: Path, repeats: int, warmup: int, dtype: str = "float32") -> dict[str, Any]:
    """Sizes and switch/load times for a dsnn checkpoint (the embedded demo model by default), stored in ``dtype``."""
    tensors, metadata = read_safetensors(checkpoint)
    dense = work / f"default-dense-{dtype}.safetensors"  # every file in one dtype, so that sizes compare
    write_safetensors(dense, {k: v.to(getattr(torch, dtype)) if v.is_floating_point() else v
                              for k, v in tensors.items()}, metadata)
    bundle = work / "default-bundle.safetensors"
    prune_checkpoint(dense, bundle, PruneOptions(LEVELS))
    per_level = export_levels(load_bundle(bundle), "all", work / "default-level.safetensors", "checkpoint")
    loaded = load_model(bundle)
    built = load_model(per_level[0]).adapter.model
    with torch.no_grad():
        result = {
            "model": f"default: {checkpoint.name}",
            "params": sum(p.numel() for p in loaded.adapter.model.parameters()),
            "dtype": dtype,
            "sizes": sizes(dense, bundle, per_level),
            "switch": switch_timing(loaded.set_level, repeats, warmup),
            "load_bundle": load_timings([bundle], load_model, max(3, repeats // 3), 1),
            "load_checkpoint": load_timings(per_level, load_model, repeats, warmup),
            "load_state_dict": load_timings(per_level, lambda p: built.load_state_dict(load_file(str(p)), strict=False),
                                            repeats, warmup),
        }
    return result


def linear_model(params: float, d_model: int, work: Path, repeats: int, warmup: int) -> dict[str, Any]:
    """Sizes and switch/load times for a ~``params`` fp32 Linear stack."""
    torch.manual_seed(0)
    model = linear_stack(params, d_model).eval()
    dense = work / "linear-dense.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(dense))
    bundle_path = work / "linear-bundle.safetensors"
    bundle = prune_checkpoint(dense, bundle_path, PruneOptions(LEVELS))
    per_level = export_levels(bundle, "all", work / "linear-level.safetensors", "safetensors")
    with torch.no_grad():
        ds = attach(model, load_bundle(bundle_path))
        result = {
            "model": f"Linear stack d={d_model}",
            "params": sum(p.numel() for p in model.parameters()),
            "dtype": "float32",
            "sizes": sizes(dense, bundle_path, per_level),
            "switch": switch_timing(ds.set_level, repeats, warmup),
            "load_bundle": load_timings([bundle_path], lambda p: attach(model, load_bundle(p)), max(3, repeats // 3),
                                        1),
            "load_checkpoint": None,
            "load_state_dict": load_timings(per_level, lambda p: model.load_state_dict(load_file(str(p))),
                                            repeats, warmup),
        }
    return result


def _ms(entry: dict[str, Any] | None, key: str) -> str:
    if not entry or not entry.get(key):
        return "-"
    return f"{entry[key]['median'] * 1e3:.1f}"


def main(argv: list[str] | None = None) -> int:
    """Measure both models and print the two tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="dsnn checkpoint (default: the demo model)")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                        help="dtype of the default model's files (default float32, what the runtime uses)")
    parser.add_argument("--linear-params", type=float, default=1e8, help="Linear stack size (default 1e8)")
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=9, help="timed runs per measurement, median (default 9)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--idle-wait", type=float, default=60.0, metavar="S",
                        help="wait up to S s for other processes to go quiet before each measurement")
    parser.add_argument("--skip-linear", action="store_true")
    parser.add_argument("--json", type=Path, default=None, metavar="F")
    args = parser.parse_args(argv)
    SETTINGS.update(idle_wait=args.idle_wait, retries=2)
    checkpoint = args.checkpoint or demo_assets() / "model.safetensors"
    err = Console(stderr=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="dsnn-size-bench-") as tmp:
        err.print(f"[dim]measuring {checkpoint} ...[/]")
        results.append(default_model(checkpoint, Path(tmp), args.repeats, args.warmup, args.dtype))
        if not args.skip_linear:
            err.print("[dim]measuring the Linear stack ...[/]")
            results.append(linear_model(args.linear_params, args.d_model, Path(tmp), args.repeats, args.warmup))

    console = Console(width=None if sys.stdout.isatty() else 200)
    mib = 2**20
    size_table = Table(title=f"size on disk, levels 0 + {', '.join(f'{v:g}' for v in LEVELS)} (MiB; zlib -1 in "
                       "brackets)", title_justify="left")
    for col in ("model", "params", "dtype", "dense checkpoint", "DSNN bundle (4 levels)", "4 per-level checkpoints",
                "bundle / dense", "per-level / bundle"):
        size_table.add_column(col, justify="left" if col == "model" else "right")
    for r in results:
        s = r["sizes"]
        size_table.add_row(
            r["model"], f"{r['params'] / 1e6:.1f}M", r["dtype"],
            f"{s['dense'] / mib:.1f} ({s['dense_zlib'] / mib:.1f})",
            f"{s['bundle'] / mib:.1f} ({s['bundle_zlib'] / mib:.1f})",
            f"{s['per_level'] / mib:.1f} ({s['per_level_zlib'] / mib:.1f})",
            f"{s['bundle'] / s['dense']:.3f}x", f"{s['per_level'] / s['bundle']:.2f}x "
            f"({s['per_level_zlib'] / s['bundle_zlib']:.2f}x)")
    console.print(size_table)
    time_table = Table(title=f"switching levels vs loading a per-level checkpoint (ms, median of {args.repeats}; "
                       "warm / cold page cache)", title_justify="left")
    for col in ("model", "bundle: set_level", "load bundle once", "per-level: load_model",
                "per-level: load_state_dict", "load_state_dict / set_level"):
        time_table.add_column(col, justify="left" if col == "model" else "right")
    for r in results:
        sw = r["switch"]["median"]
        lsd = r["load_state_dict"]
        time_table.add_row(
            r["model"], f"{sw * 1e3:.1f}",
            f"{_ms(r['load_bundle'], 'warm')} / {_ms(r['load_bundle'], 'cold')}",
            f"{_ms(r['load_checkpoint'], 'warm')} / {_ms(r['load_checkpoint'], 'cold')}",
            f"{_ms(lsd, 'warm')} / {_ms(lsd, 'cold')}",
            f"{lsd['warm']['median'] / sw:.1f}x / "
            + (f"{lsd['cold']['median'] / sw:.1f}x" if lsd.get("cold") else "-"))
    console.print(time_table)
    loads = [t.get("foreign_load", 0.0) for r in results for t in _timings(r)]
    if loads and max(loads) > 0.1:
        console.print(f"[yellow]warning: other processes used up to {max(loads):.0%} of the CPUs during a "
                      "measurement; rerun on a quiet machine.[/]")
    if args.json:
        args.json.write_text(json.dumps({"env": machine_env(), "results": results}, indent=2) + "\n")
    return 0


def _timings(result: dict[str, Any]) -> list[dict[str, float]]:
    out = [result["switch"]]
    for key in ("load_bundle", "load_checkpoint", "load_state_dict"):
        for mode in ("warm", "cold"):
            if result.get(key) and result[key].get(mode):
                out.append(result[key][mode])
    return out


if __name__ == "__main__":
    sys.exit(main())
