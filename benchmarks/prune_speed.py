"""Benchmark: ``dsnn prune`` end to end vs. ``torch.nn.utils.prune.l1_unstructured`` per level.

A benchmark, not a timed test. It builds a synthetic fp32 checkpoint of Linear/LSTM-shaped tensors (transformer-ish
``d x 4d`` / ``4d x d`` feed-forward pairs plus LSTM ``weight_ih`` / ``weight_hh`` ``4H x H`` matrices, with
biases), writes it as ``.safetensors`` to a temporary directory (streamed tensor by tensor, so a 1B-parameter
checkpoint never sits in this process's memory), then runs each measurement in a fresh subprocess so that the peak
RSS (``ru_maxrss`` of the child) belongs to that measurement alone:

* ``ours``: ``prune_checkpoint(src, out, PruneOptions(levels))`` - load + rank once + write the bundle (fsync included);
* ``baseline``: ``safetensors.torch.load_file`` + one ``torch.nn.utils.prune.l1_unstructured`` call per level per
  prunable tensor (each tensor wrapped in a fresh module); with ``--allocation global``, one
  ``prune.global_unstructured(..., L1Unstructured)`` call per level over all prunable tensors. The baseline writes
  nothing and keeps no result (each pruned module is dropped right after its call), which favours it in both time
  and memory.

Both sides prune the same tensors (the name rules of :func:`dsnn_compress.core.selection.is_default_prunable`: weight
matrices, not biases). Wall times are measured inside the child (interpreter start and imports excluded); the
checkpoint was just written, so it is read from a warm page cache by both sides. The machine may be shared: each
run first waits (``--idle-wait``) until other processes are quiet, and the CPU share they used during the run is
reported ("other load"); runs with more than 10 % are flagged.

Examples::

    python benchmarks/prune_speed.py                      # 100M parameters, levels 0.5,0.7,0.9, with baseline
    python benchmarks/prune_speed.py --allocation global
    python benchmarks/prune_speed.py --params 1e9         # ours only (the baseline is skipped above 2e8)
    python benchmarks/prune_speed.py --params 2e6 --d-model 128 --json out.json   # quick smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import Interference, machine_env, wait_for_idle  # noqa: E402

TARGET_SPEEDUP = 3.0
TARGET_RSS_RATIO = 2.5
TARGET_BUNDLE_RATIO = 1.07
TARGET_1B_SECONDS = 60.0
BASELINE_AUTO_SKIP_PARAMS = 2e8
NOISY_LOAD = 0.1
"""A run during which other processes used more than this share of the CPUs is retried, then flagged."""


# ----------------------------------------------------------------------------------------------------------------
# Interference from other processes (the benchmark machine may be shared)
# ----------------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------------
# Synthetic checkpoint
# ----------------------------------------------------------------------------------------------------------------


def checkpoint_layout(params: float, d_model: int) -> list[tuple[str, tuple[int, ...], float]]:
    """``(name, shape, init std)`` of a synthetic checkpoint with about ``params`` parameters.

    The unit is ``2 * 4 * d_model**2`` parameters: either a feed-forward pair (``fc1`` ``[4d, d]``, ``fc2``
    ``[d, 4d]``) or one LSTM layer with hidden size ``d`` (``weight_ih_l*`` and ``weight_hh_l*``, both ``[4d, d]``);
    about one unit in six is an LSTM layer. Biases are added for realism (they are not pruned).
    """
    unit = 8 * d_model * d_model
    units = max(1, round(params / unit))
    lstm = units // 6 if units >= 6 else (1 if units >= 2 else 0)
    ffn = units - lstm
    d, h = d_model, 4 * d_model
    layout: list[tuple[str, tuple[int, ...], float]] = []
    for i in range(ffn):
        prefix = f"encoder.layers.{i}.ffn"
        layout += [
            (f"{prefix}.fc1.weight", (h, d), d ** -0.5),
            (f"{prefix}.fc1.bias", (h,), 0.01),
            (f"{prefix}.fc2.weight", (d, h), h ** -0.5),
            (f"{prefix}.fc2.bias", (d,), 0.01),
        ]
    for j in range(lstm):
        prefix = "decoder.lstm"
        layout += [
            (f"{prefix}.weight_ih_l{j}", (h, d), d ** -0.5),
            (f"{prefix}.weight_hh_l{j}", (h, d), d ** -0.5),
            (f"{prefix}.bias_ih_l{j}", (h,), 0.01),
            (f"{prefix}.bias_hh_l{j}", (h,), 0.01),
        ]
    return sorted(layout)


def write_checkpoint(path: Path, layout: list[tuple[str, tuple[int, ...], float]], seed: int = 0) -> int:
    """Stream a safetensors file of seeded Gaussian fp32 tensors to ``path``; return the parameter count.

    The header is computed from the shapes first, then each tensor is generated and written on its own, so peak
    memory is one tensor whatever the checkpoint size.
    """
    import torch

    header: dict[str, Any] = {}
    offset = 0
    for name, shape, _ in layout:
        size = 4 * _numel(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    total = 0
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for index, (_, shape, std) in enumerate(layout):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
            tensor = torch.randn(shape, generator=gen, dtype=torch.float32).mul_(std)
            fh.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
            total += tensor.numel()
            del tensor
        fh.flush()
        os.fsync(fh.fileno())
    return total


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


# ----------------------------------------------------------------------------------------------------------------
# Child processes (one measurement each)
# ----------------------------------------------------------------------------------------------------------------


def _peak_rss_bytes() -> dict[str, int]:
    """Peak resident set size of this process: ``ru_maxrss`` (KiB on Linux) and ``VmHWM`` when available."""
    out = {"ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                out["vmhwm"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def child_ours(src: Path, out: Path, levels: list[float], allocation: str) -> dict[str, Any]:
    """Time ``prune_checkpoint`` end to end, with load and write phases timed by wrapping them."""
    import dsnn_compress.prune as prune_mod

    phases: dict[str, float] = {}

    def timed(key: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                phases[key] = phases.get(key, 0.0) + time.perf_counter() - t0

        return wrapper

    prune_mod.open_source = timed("load", prune_mod.open_source)
    prune_mod.save_bundle = timed("write", prune_mod.save_bundle)
    rss_before = _peak_rss_bytes()["ru_maxrss"]
    t0 = time.perf_counter()
    bundle = prune_mod.prune_checkpoint(src, out, prune_mod.PruneOptions(levels, allocation=allocation))
    wall = time.perf_counter() - t0
    phases["rank"] = wall - phases.get("load", 0.0) - phases.get("write", 0.0)
    peak = _peak_rss_bytes()
    summary = bundle.summary()
    return {
        "wall_s": wall,
        "phases_s": phases,
        "rss_at_start": rss_before,
        **peak,
        "bundle_bytes": out.stat().st_size,
        "pruned_tensors": len(bundle.codes),
        "prunable_params": summary["prunable_params"],
        "achieved_sparsity": [lvl["prunable_sparsity"] for lvl in summary["levels"][1:]],
    }


def child_baseline(src: Path, levels: list[float], allocation: str) -> dict[str, Any]:
    """Load with safetensors, then prune once per level with ``torch.nn.utils.prune`` (nothing kept).

    ``per-layer``: ``l1_unstructured`` per prunable tensor; ``global``: one ``global_unstructured`` call (L1) over
    all prunable tensors.
    """
    import torch
    from safetensors.torch import load_file
    from torch.nn.utils import prune

    from dsnn_compress.core.selection import select_prunable

    class Holder(torch.nn.Module):
        def __init__(self, weight: torch.Tensor) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(weight, requires_grad=False)

    rss_before = _peak_rss_bytes()["ru_maxrss"]
    t0 = time.perf_counter()
    state = load_file(str(src))
    t_load = time.perf_counter() - t0
    names = select_prunable(state)
    calls = 0
    for level in levels:
        if allocation == "global":
            modules = [Holder(state[name]) for name in names]
            prune.global_unstructured([(m, "weight") for m in modules], prune.L1Unstructured, amount=level)
            calls += 1
            del modules
            continue
        for name in names:
            module = Holder(state[name])
            prune.l1_unstructured(module, "weight", amount=level)
            calls += 1
            del module
    wall = time.perf_counter() - t0
    return {
        "wall_s": wall,
        "phases_s": {"load": t_load, "rank": wall - t_load},
        "rss_at_start": rss_before,
        **_peak_rss_bytes(),
        "calls": calls,
        "pruned_tensors": len(names),
    }


def run_child(kind: str, args: list[str]) -> dict[str, Any]:
    """Run this script as ``--child kind`` in a fresh interpreter and parse its JSON result (last stdout line).

    ``foreign_load`` in the result is the share of the machine's CPUs that other processes used meanwhile.
    """
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, *args]
    probe = Interference().start()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    foreign = probe.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"child {kind} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["foreign_load"] = foreign
    return result


# ----------------------------------------------------------------------------------------------------------------
# Parent: orchestration and report
# ----------------------------------------------------------------------------------------------------------------


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _median_result(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median wall time, plus the median/min/max times and the largest peak RSS of all runs."""
    ordered = sorted(results, key=lambda r: r["wall_s"])
    pick = dict(ordered[(len(ordered) - 1) // 2])
    pick["wall_s_median"] = statistics.median(r["wall_s"] for r in results)
    pick["wall_s_all"] = [r["wall_s"] for r in results]
    pick["peak_rss_max"] = max(r["ru_maxrss"] for r in results)
    pick["foreign_load_max"] = max(r.get("foreign_load", 0.0) for r in results)
    pick["runs"] = [{k: r[k] for k in ("wall_s", "phases_s", "ru_maxrss", "foreign_load") if k in r} for r in results]
    return pick


def environment() -> dict[str, Any]:
    """The shared benchmark environment record plus the machine architecture and total memory."""
    return {**machine_env(), "machine": platform.machine(), "mem_total_gib": _mem_total_gib()}


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=1e8, help="approximate parameter count (default 1e8)")
    parser.add_argument("--levels", default="0.5,0.7,0.9", help="sparse levels (default 0.5,0.7,0.9)")
    parser.add_argument("--allocation", default="per-layer", choices=("per-layer", "global"))
    parser.add_argument("--skip-baseline", action="store_true",
                        help=f"measure ours only (automatic above {BASELINE_AUTO_SKIP_PARAMS:.0e} parameters)")
    parser.add_argument("--baseline", action="store_true", help="run the baseline even above the automatic limit")
    parser.add_argument("--repeats", type=int, default=None,
                        help="fresh-process runs per measurement, median reported (default 3, or 1 above 2e8)")
    parser.add_argument("--d-model", type=int, default=1024, help="feed-forward / LSTM width d (default 1024)")
    parser.add_argument("--workdir", type=Path, default=None, help="where to create the temporary directory")
    parser.add_argument("--idle-wait", type=float, default=300.0, metavar="S",
                        help="before each run wait up to S s for other processes to go quiet (default 300; 0: no wait)")
    parser.add_argument("--retries", type=int, default=3,
                        help="repeat a run (up to N times) while other processes used > 10%% of the CPUs during it; "
                             "the cleanest attempt is kept (default 3)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary checkpoint and bundle")
    parser.add_argument("--json", type=Path, default=None, metavar="F", help="also write the results as JSON to F")
    parser.add_argument("--child", choices=("ours", "baseline"), help=argparse.SUPPRESS)
    parser.add_argument("--src", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    from dsnn_compress.core.levels import parse_levels

    levels = list(parse_levels(args.levels))
    if args.child == "ours":
        print(json.dumps(child_ours(args.src, args.out, levels, args.allocation)))
        return 0
    if args.child == "baseline":
        print(json.dumps(child_baseline(args.src, levels, args.allocation)))
        return 0

    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)
    err = Console(stderr=True)
    big = args.params > BASELINE_AUTO_SKIP_PARAMS
    skip_baseline = args.skip_baseline or (big and not args.baseline)
    repeats = args.repeats or (1 if big else 3)
    env = environment()
    layout = checkpoint_layout(args.params, args.d_model)
    workdir = Path(tempfile.mkdtemp(prefix="dsnn-prune-bench-", dir=args.workdir))
    try:
        src = workdir / "dense.safetensors"
        out = workdir / "bundle.dsnn.safetensors"
        err.print(f"[dim]writing synthetic checkpoint ({len(layout)} tensors) to {src} ...[/]")
        t0 = time.perf_counter()
        total_params = write_checkpoint(src, layout)
        gen_s = time.perf_counter() - t0
        dense_bytes = src.stat().st_size
        err.print(f"[dim]{total_params:,} parameters, {_gib(dense_bytes)}, written in {gen_s:.1f} s[/]")

        child_args = ["--src", str(src), "--out", str(out), "--levels", ",".join(map(str, levels)),
                      "--allocation", args.allocation]
        ours_runs, base_runs = [], []
        for rep in range(repeats):
            kinds = ["ours"] if skip_baseline else ["ours", "baseline"]
            for kind in kinds:
                best: dict[str, Any] | None = None
                for attempt in range(1 + max(0, args.retries)):
                    if args.idle_wait > 0:
                        wait_for_idle(args.idle_wait, err=err)
                    err.print(f"[dim]run {rep + 1}/{repeats}: {kind}{f' (retry {attempt})' if attempt else ''} ...[/]")
                    result = run_child(kind, child_args)
                    if best is None or result["foreign_load"] < best["foreign_load"]:
                        best = result
                    if best["foreign_load"] <= NOISY_LOAD:
                        break
                    err.print(f"[yellow]other processes used {result['foreign_load']:.0%} of the CPUs meanwhile[/]")
                (ours_runs if kind == "ours" else base_runs).append(best)
        ours = _median_result(ours_runs)
        base = _median_result(base_runs) if base_runs else None
    finally:
        if args.keep:
            err.print(f"[bold]kept[/] {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    results: dict[str, Any] = {
        "env": env,
        "config": {"params": total_params, "levels": levels, "allocation": args.allocation, "d_model": args.d_model,
                   "tensors": len(layout), "repeats": repeats, "dense_bytes": dense_bytes,
                   "checkpoint_write_s": gen_s},
        "ours": ours,
        "baseline": base,
    }
    rss_ratio = ours["peak_rss_max"] / dense_bytes
    bundle_ratio = ours["bundle_bytes"] / dense_bytes
    checks: list[tuple[str, str, str, bool | None]] = []
    if base is not None:
        speedup = base["wall_s_median"] / ours["wall_s_median"]
        results["speedup"] = speedup
        checks.append(("speed-up (baseline time / ours)", f"{speedup:.2f}x", f">= {TARGET_SPEEDUP:g}x",
                       speedup >= TARGET_SPEEDUP))
    checks.append(("our peak RSS / checkpoint size", f"{rss_ratio:.2f}x", f"<= {TARGET_RSS_RATIO:g}x",
                   rss_ratio <= TARGET_RSS_RATIO))
    checks.append((f"bundle size / dense size ({len(levels)} levels, fp32)", f"{bundle_ratio:.4f}x",
                   f"<= {TARGET_BUNDLE_RATIO:g}x", bundle_ratio <= TARGET_BUNDLE_RATIO))
    if total_params >= 9e8:
        checks.append(("our prune wall time (1B)", f"{ours['wall_s_median']:.1f} s", f"< {TARGET_1B_SECONDS:g} s",
                       ours["wall_s_median"] < TARGET_1B_SECONDS))
    results["rss_ratio"] = rss_ratio
    results["bundle_ratio"] = bundle_ratio
    results["checks"] = [{"what": w, "value": v, "target": t, "met": m} for w, v, t, m in checks]

    title = (f"prune speed: {total_params / 1e6:,.1f}M fp32 params ({_gib(dense_bytes)}), levels "
             f"{','.join(f'{v:g}' for v in levels)}, {args.allocation}; {env['cpu_count']} CPUs, "
             f"torch {env['torch']} ({env['torch_threads']} threads), median of {repeats}")
    table = Table(title=title, title_justify="left")
    for col in ("measurement", "wall (s)", "load (s)", "rank (s)", "write (s)", "peak RSS", "RSS / ckpt",
                "other load"):
        table.add_column(col, justify="left" if col == "measurement" else "right")
    rows = [("ours: prune_checkpoint (load+rank+write)", ours)]
    if base is not None:
        call = "global_unstructured" if args.allocation == "global" else "l1_unstructured"
        rows.append((f"baseline: load + {call} x{len(levels)} (no write)", base))
    for label, res in rows:
        ph = res["phases_s"]
        table.add_row(label, f"{res['wall_s_median']:.2f}", f"{ph.get('load', 0):.2f}", f"{ph.get('rank', 0):.2f}",
                      f"{ph['write']:.2f}" if "write" in ph else "-", _gib(res["peak_rss_max"]),
                      f"{res['peak_rss_max'] / dense_bytes:.2f}x", f"{res['foreign_load_max']:.0%}")
    console.print(table)
    console.print("[dim]ours: load = load_source (mmap + sha256 of the file), rank = the rest of build_bundle "
                  "(selection + compute_codes), write = save_bundle (pack codes, statistics, write, fsync). Peak RSS "
                  f"includes about {_gib(ours['rss_at_start'])} of interpreter + torch.[/]")
    checks_table = Table(title="targets", title_justify="left")
    for col in ("ratio", "value", "target", "met"):
        checks_table.add_column(col)
    for what, value, target, met in checks:
        checks_table.add_row(what, value, target, "[green]yes[/]" if met else "[red]NO[/]")
    console.print(checks_table)
    if base is not None:
        console.print("[dim]The baseline writes nothing and keeps no mask (favours it); ours writes and fsyncs the "
                      "bundle. All wall times: ours " + ", ".join(f"{t:.2f}" for t in ours["wall_s_all"])
                      + "; baseline " + ", ".join(f"{t:.2f}" for t in base["wall_s_all"]) + " s.[/]")
    worst = max(r["foreign_load_max"] for _, r in rows)
    if worst > NOISY_LOAD:
        console.print(f"[yellow]warning: other processes used up to {worst:.0%} of the CPUs during a run; "
                      "the times are not clean - rerun on a quiet machine.[/]")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
