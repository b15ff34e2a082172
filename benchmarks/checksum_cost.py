"""Benchmark: what checking a bundle's per-tensor checksums costs, and which hash to use for it.

Two measurements, both reported as milliseconds per 100M parameters, for fp32 and fp16 weights:

* **hashes**: one pass of each candidate over the same in-memory tensor bytes (the bytes ``load_bundle`` has just
  copied out of the file): ``xxh3-64`` and ``xxh3-128`` and ``xxh64`` (package ``xxhash``), ``crc32``
  (``zlib``), ``blake2b`` and ``sha256`` (``hashlib``). Repetitions are interleaved (one round runs every hash
  once, in a rotating order), min and median are reported, and the throughput in GB/s.
* **load**: ``load_bundle(path, verify=True)`` vs ``verify=False`` on a bundle of the same size written by
  ``save_bundle`` (levels 0.5/0.7/0.9 on every weight matrix), interleaved, file in the page cache.

Usage::

    python benchmarks/checksum_cost.py                       # 1e8 parameters, 5 rounds
    python benchmarks/checksum_cost.py --params 2e7 --rounds 3 --idle-wait 0   # quick
    python benchmarks/checksum_cost.py --json checksum.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
import xxhash
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import Interference, machine_env, wait_for_idle  # noqa: E402

from dsnn_compress.core.bundle import Bundle, load_bundle, save_bundle  # noqa: E402
from dsnn_compress.core.masks import compute_codes  # noqa: E402

HASHES: dict[str, Callable[[memoryview], object]] = {
    "xxh3-64": lambda b: xxhash.xxh3_64_intdigest(b),
    "xxh3-128": lambda b: xxhash.xxh3_128_intdigest(b),
    "xxh64": lambda b: xxhash.xxh64_intdigest(b),
    "crc32 (zlib)": lambda b: zlib.crc32(b),
    "blake2b": lambda b: hashlib.blake2b(b).digest(),
    "sha256": lambda b: hashlib.sha256(b).digest(),
}


def weights(params: int, dtype: torch.dtype, width: int = 1024) -> dict[str, torch.Tensor]:
    """About ``params`` parameters as ``width x width`` matrices plus a remainder (a real model's mix of sizes)."""
    gen = torch.Generator().manual_seed(0)
    out: dict[str, torch.Tensor] = {}
    full, rest = divmod(params, width * width)
    for i in range(full):
        out[f"layer{i:04d}.weight"] = torch.randn(width, width, generator=gen).to(dtype)
    if rest:
        out["tail.weight"] = torch.randn(rest // width or 1, width, generator=gen).to(dtype)
    return out


def per_100m(seconds: float, params: int) -> float:
    return 1000 * seconds * 1e8 / params


def time_hashes(tensors: dict[str, torch.Tensor], rounds: int) -> dict[str, list[float]]:
    views = [memoryview(t.reshape(-1).view(torch.uint8).numpy()) for t in tensors.values()]
    times: dict[str, list[float]] = {name: [] for name in HASHES}
    names = list(HASHES)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            fn = HASHES[name]
            start = time.perf_counter()
            for view in views:
                fn(view)
            times[name].append(time.perf_counter() - start)
    return times


def time_loads(path: Path, rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"verify": [], "no-verify": []}
    load_bundle(path, verify=False)  # page cache warm
    for r in range(rounds):
        order = [("verify", True), ("no-verify", False)]
        for label, verify in order if r % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            load_bundle(path, verify=verify)
            times[label].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=1e8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--idle-wait", type=float, default=60.0)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    out, err = Console(), Console(stderr=True)
    params = int(args.params)
    results: dict[str, object] = {"params": params, "rounds": args.rounds, "machine": machine_env(), "runs": {}}
    for dtype in (torch.float32, torch.float16):
        label = str(dtype).replace("torch.", "")
        err.print(f"{label}: building {params:,} parameters")
        tensors = weights(params, dtype)
        n = sum(t.numel() for t in tensors.values())
        wait_for_idle(args.idle_wait, err)
        probe = Interference().start()
        hash_times = time_hashes(tensors, args.rounds)
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            path = Path(tmp) / "bundle.safetensors"
            save_bundle(Bundle(tensors, compute_codes(tensors, (0.5, 0.7, 0.9)), (0.5, 0.7, 0.9)), path)
            load_times = time_loads(path, args.rounds)
        load = probe.stop()
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        table = Table(title=f"{label}: {n:,} parameters ({nbytes / 1e6:.0f} MB); other load {load:.0%}",
                      title_justify="left")
        for column in ("what", "min ms / 100M params", "median ms / 100M params", "GB/s (min)"):
            table.add_column(column, justify="left" if column == "what" else "right")
        rows = {}
        for name, secs in {**hash_times, **{f"load_bundle {k}": v for k, v in load_times.items()}}.items():
            best, median = min(secs), statistics.median(secs)
            rows[name] = {"min_ms_per_100m": per_100m(best, n), "median_ms_per_100m": per_100m(median, n),
                          "gbps": nbytes / best / 1e9, "seconds": secs}
            table.add_row(name, f"{per_100m(best, n):.0f}", f"{per_100m(median, n):.0f}", f"{nbytes / best / 1e9:.2f}")
        out.print(table)
        if load > 0.1:
            err.print(f"[yellow]warning: other processes used {load:.0%} of the CPUs; numbers are pessimistic[/]")
        results["runs"][label] = {"params": n, "bytes": nbytes, "other_load": load, "rows": rows}  # type: ignore[index]
        del tensors
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
