"""Benchmark: the cost of one joint DSNN fine-tuning step, and DDP (2 processes) vs 1 process throughput.

Part 1 - step cost. On one model (built-in Conformer-CTC, size ``--size``, random init, levels ``--levels``) and one
fixed batch (``--batch`` utterances of ``tests/data``, real log-mel features), one optimizer step is timed for:

* **single level k**: a step that trains only level ``k`` (``train_step`` with ``[k]``): the cost of single-level
  training, one level per step. The baseline is the mean over the ``L + 1`` levels, i.e. training the levels one
  after another, one per step;
* **all**: every level (``L + 1`` forward/backward passes) in one step;
* **sandwich k=1**: dense + sparsest + one random middle level (3 passes);
* **all + distillation**: ``all`` with in-place distillation from the dense level (weight 1, T = 1).

Every step is what ``dsnn_compress.training.trainer.finetune`` does: ``zero_grad``, ``train_step`` (one backward per
level on the shared weights, sparse levels through ``masked_parameters`` + ``functional_call``), gradient clipping,
AdamW.
The modes are timed side by side - round-robin, one step of each mode per round - so drifting machine load hits
all of them alike; ``--warmup`` rounds are dropped and the median of ``--repeats`` rounds is reported. The ratios
``all / single`` and ``sandwich / single`` would be ``L + 1`` (4.0) and 3.0 if a step were nothing but its
forward/backward passes; they come out lower because the optimizer step and gradient clipping are paid once.

Part 2 - DDP. ``dsnn finetune`` on the same kind of model (the tiny-test recipe with ``model.size`` ``--ddp-size``,
levels ``--levels``, sampling ``all``, no dev set) for ``--ddp-steps`` steps as (a) 1 process x 1 thread, (b) 1
process x 2 threads and (c) ``torchrun --nproc_per_node 2`` x 1 thread each, ``--ddp-repeats`` times round-robin
(the fastest run of each is reported: interference from other processes only ever slows a run down). The global
batch is the same in all three (8 utterances; under DDP each rank takes 4), so steps/s compare directly. Steps/s is
the median of the per-step rates in the run's JSONL log (``log_every`` 1) after the first 2 steps; start-up is
reported separately. On a 2-core machine the two DDP processes share the same two cores that (b) uses.

Examples::

    python benchmarks/finetune_cost.py
    python benchmarks/finetune_cost.py --repeats 30 --threads 2 --json finetune-cost.json
    python benchmarks/finetune_cost.py --size xs --repeats 5 --ddp-steps 6 --idle-wait 0     # quick run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from dsnn_compress.core.levels import parse_levels
from dsnn_compress.core.masked import train_step
from dsnn_compress.core.masks import compute_codes
from dsnn_compress.core.schedule import sample_levels
from dsnn_compress.data.dataset import SpeechDataset, collate
from dsnn_compress.data.manifest import read_manifest
from dsnn_compress.data.text import CharTokenizer, normalize_text
from dsnn_compress.models.base import AdapterRunner
from dsnn_compress.models.registry import new_adapter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import Interference, machine_env, wait_for_idle  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "tests" / "data" / "manifest.jsonl"
TINY_RECIPE = ROOT / "recipes" / "tiny-test.yaml"

# ----------------------------------------------------------------------------------------------------------------
# Interference from other processes (the benchmark machine may be shared)
# ----------------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------------
# Part 1: step cost
# ----------------------------------------------------------------------------------------------------------------


def _setup(size: str, levels: tuple[float, ...], batch_size: int) -> tuple[Any, dict[str, torch.Tensor], Any]:
    utterances = read_manifest(MANIFEST)
    texts = [normalize_text(u.text, "default") for u in utterances]
    torch.manual_seed(0)
    adapter = new_adapter("conformer-ctc", CharTokenizer.build(texts).vocabulary, size)
    params = dict(adapter.model.named_parameters())
    codes = compute_codes({n: params[n].detach() for n in adapter.default_prunable()}, levels)
    chosen = [utterances[i % len(utterances)] for i in range(batch_size)]
    dataset = SpeechDataset(chosen, adapter.prepare, adapter.encode_text, adapter.sample_rate)
    batch = collate([dataset[i] for i in range(len(chosen))])
    return adapter, codes, batch


def measure_steps(size: str, levels: tuple[float, ...], batch_size: int, repeats: int, warmup: int,
                  err: Console, idle_wait: float) -> dict[str, Any]:
    adapter, codes, batch = _setup(size, levels, batch_size)
    model = adapter.model.train()
    params = dict(model.named_parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    runner = AdapterRunner(adapter)
    num = len(levels)
    weights = [1.0] * (num + 1)
    counter = [0]

    def step(indices_of: Callable[[int], list[int]], distill: float = 0.0) -> Callable[[], None]:
        def run() -> None:
            optimizer.zero_grad(set_to_none=True)
            train_step(runner, params, codes, batch, indices_of(counter[0]), weights, distill, 1.0)
            torch.nn.utils.clip_grad_norm_(list(params.values()), 5.0)
            optimizer.step()
            counter[0] += 1
        return run

    modes: dict[str, Callable[[], None]] = {}
    for k in range(num + 1):
        modes[f"single level {'dense' if k == 0 else f'{levels[k - 1]:g}'}"] = step(lambda _s, k=k: [k])
    modes["all"] = step(lambda _s: list(range(num + 1)))
    modes["sandwich k=1"] = step(lambda s: sample_levels(num, "sandwich", 1, 0, s))
    modes["all + distillation"] = step(lambda _s: list(range(num + 1)), 1.0)
    passes = {name: 1 for name in modes}
    passes.update({"all": num + 1, "sandwich k=1": min(3, num + 1), "all + distillation": num + 1})

    waited_load = wait_for_idle(idle_wait, err)
    times: dict[str, list[float]] = {name: [] for name in modes}
    probe: Interference | None = None
    for round_ in range(warmup + repeats):
        if round_ == warmup:
            probe = Interference().start()
        for name, fn in modes.items():
            t0 = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - t0
            if round_ >= warmup:
                times[name].append(elapsed)
    foreign = probe.stop() if probe else 0.0
    medians = {name: statistics.median(v) for name, v in times.items()}
    singles = [medians[name] for name in modes if name.startswith("single")]
    single_mean = statistics.fmean(singles)
    single_min = statistics.fmean(min(times[name]) for name in modes if name.startswith("single"))
    return {
        "model": f"conformer-ctc {size}",
        "params": sum(p.numel() for p in params.values()),
        "prunable": sum(c.numel() for c in codes.values()),
        "levels": list(levels),
        "batch_utterances": len(batch),
        "batch_frames": list(batch.inputs.shape[:2]),
        "repeats": repeats,
        "warmup": warmup,
        "seconds": {name: {"median": medians[name], "min": min(v), "max": max(v)} for name, v in times.items()},
        "passes": passes,
        "single_mean": single_mean,
        "ratios": {
            "all / single": medians["all"] / single_mean,
            "sandwich / single": medians["sandwich k=1"] / single_mean,
            "all+distill / single": medians["all + distillation"] / single_mean,
            "all / sum of singles": medians["all"] / sum(singles),
        },
        "ratios_of_min": {
            "all / single": min(times["all"]) / single_min,
            "sandwich / single": min(times["sandwich k=1"]) / single_min,
        },
        "ideal": {"all / single": float(num + 1), "sandwich / single": float(min(3, num + 1))},
        "foreign_load": foreign,
        "load_before": waited_load,
    }


# ----------------------------------------------------------------------------------------------------------------
# Part 2: DDP vs one process
# ----------------------------------------------------------------------------------------------------------------


def run_finetune(label: str, nproc: int, threads: int, size: str, levels: tuple[float, ...], steps: int,
                 workdir: Path, err: Console, idle_wait: float) -> dict[str, Any]:
    out = workdir / f"ddp-{nproc}x{threads}.safetensors"
    sets = [f"model.size={size}", "model.config={}", f"levels=[{','.join(f'{v:g}' for v in levels)}]",
            "sampling.mode=all", "distillation.enabled=false", "data.dev=null", "training.keep=last",
            f"training.steps={steps}", "training.log_every=1", "training.device=cpu"]
    args = ["-m", "dsnn_compress", "finetune", "--recipe", str(TINY_RECIPE), "-o", str(out), "--force", "--json"]
    for item in sets:
        args += ["--set", item]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    else:
        cmd = [sys.executable, *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT / "src")}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    waited_load = wait_for_idle(idle_wait, err)
    err.print(f"[dim]dsnn finetune: {label} ...[/]")
    probe = Interference().start()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=workdir, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    foreign = probe.stop()
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    summary = json.loads(proc.stdout)
    log = Path(summary["log"])
    rates = [r["steps_per_s"] for r in map(json.loads, log.read_text().splitlines()) if r.get("event") == "step"]
    timed = rates[2:] if len(rates) > 4 else rates
    steps_per_s = statistics.median(timed)
    return {
        "label": label, "processes": nproc, "threads_per_process": threads, "steps": summary["steps"],
        "steps_per_s": steps_per_s, "step_seconds": 1.0 / steps_per_s, "train_seconds": summary["seconds"],
        "wall_seconds": wall, "startup_seconds": wall - summary["steps"] / steps_per_s,
        "final_loss": summary["final_loss"], "foreign_load": foreign, "load_before": waited_load,
    }


# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default="0.5,0.7,0.9", help="sparse levels (default 0.5,0.7,0.9)")
    parser.add_argument("--size", default="xs", help="built-in conformer-ctc size preset (default xs)")
    parser.add_argument("--batch", type=int, default=8, help="utterances in the fixed batch (default 8)")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds, median (default 15)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for part 1 (default 1: on a shared 2-core machine OpenMP threads that "
                             "compete with other processes slow small ops down by 10x or more)")
    parser.add_argument("--ddp-size", default="xs", help="model.size of the DDP runs (default xs)")
    parser.add_argument("--ddp-steps", type=int, default=12, help="steps of each DDP/single run (default 12)")
    parser.add_argument("--ddp-repeats", type=int, default=3,
                        help="runs of each configuration, round-robin; the fastest is reported (default 3)")
    parser.add_argument("--skip-ddp", action="store_true", help="only part 1")
    parser.add_argument("--idle-wait", type=float, default=60.0, metavar="S",
                        help="before each measurement wait up to S s for other processes to go quiet (default 60)")
    parser.add_argument("--json", type=Path, default=None, metavar="F", help="also write the results as JSON to F")
    args = parser.parse_args(argv)

    levels = parse_levels(args.levels)
    torch.set_num_threads(args.threads)
    console = Console(width=None if sys.stdout.isatty() else 150)
    err = Console(stderr=True)
    env = machine_env()
    err.print(f"[dim]part 1: step cost of conformer-ctc {args.size}, {args.repeats} rounds ...[/]")
    steps = measure_steps(args.size, levels, args.batch, args.repeats, args.warmup, err, args.idle_wait)
    table = Table(title=f"one optimizer step, conformer-ctc {args.size} ({steps['params'] / 1e6:.2f}M params), "
                  f"levels dense+{','.join(f'{v:g}' for v in levels)}, batch {steps['batch_utterances']} utt "
                  f"({steps['batch_frames'][1]} frames); {env['cpu_count']} CPUs, torch {env['torch']} "
                  f"({env['torch_threads']} threads), median of {args.repeats}", title_justify="left")
    for col, justify in (("mode", "left"), ("fwd/bwd passes", "right"), ("ms / step", "right"),
                         ("min-max ms", "right"), ("x single", "right"), ("ideal", "right")):
        table.add_column(col, justify=justify)
    ideal = {"all": steps["ideal"]["all / single"], "sandwich k=1": steps["ideal"]["sandwich / single"],
             "all + distillation": steps["ideal"]["all / single"]}
    for name, s in steps["seconds"].items():
        table.add_row(name, str(steps["passes"][name]), f"{s['median'] * 1e3:.1f}",
                      f"{s['min'] * 1e3:.0f}-{s['max'] * 1e3:.0f}", f"{s['median'] / steps['single_mean']:.2f}",
                      f"{ideal[name]:.1f}" if name in ideal else "")
    console.print(table)
    r = steps["ratios"]
    console.print(f"single = mean of the single-level steps ({steps['single_mean'] * 1e3:.1f} ms). all / single "
                  f"{r['all / single']:.2f} (ideal {steps['ideal']['all / single']:.0f}), sandwich / single "
                  f"{r['sandwich / single']:.2f} (ideal {steps['ideal']['sandwich / single']:.0f}), all / sum of "
                  f"single levels {r['all / sum of singles']:.2f}; from the fastest rounds: all / single "
                  f"{steps['ratios_of_min']['all / single']:.2f}, sandwich / single "
                  f"{steps['ratios_of_min']['sandwich / single']:.2f}; other load {steps['foreign_load']:.0%}")

    ddp: list[dict[str, Any]] = []
    if not args.skip_ddp:
        configs = (("1 process x 1 thread", 1, 1), ("1 process x 2 threads", 1, 2),
                   ("torchrun 2 processes x 1 thread", 2, 1))
        runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _n, _t in configs}
        with tempfile.TemporaryDirectory(prefix="dsnn-finetune-bench-") as tmp:
            for _ in range(args.ddp_repeats):  # round-robin, so slow phases of the machine hit every configuration
                for label, nproc, threads in configs:
                    runs[label].append(run_finetune(label, nproc, threads, args.ddp_size, levels, args.ddp_steps,
                                                    Path(tmp), err, args.idle_wait))
        for results in runs.values():
            best = max(results, key=lambda res: res["steps_per_s"])
            ddp.append({**best, "all_steps_per_s": [res["steps_per_s"] for res in results],
                        "median_steps_per_s": statistics.median(res["steps_per_s"] for res in results)})
        base = ddp[0]["steps_per_s"]
        table = Table(title=f"dsnn finetune, conformer-ctc {args.ddp_size}, sampling all, {args.ddp_steps} steps of "
                      f"8 utterances (same global batch in every run); fastest of {args.ddp_repeats} runs",
                      title_justify="left")
        for col in ("run", "steps/s", "s / step", "x (1 proc, 1 thread)", "all runs steps/s", "start-up s",
                    "other load"):
            table.add_column(col, justify="left" if col == "run" else "right")
        for res in ddp:
            table.add_row(res["label"], f"{res['steps_per_s']:.2f}", f"{res['step_seconds']:.2f}",
                          f"{res['steps_per_s'] / base:.2f}", " ".join(f"{v:.2f}" for v in res["all_steps_per_s"]),
                          f"{res['startup_seconds']:.1f}", f"{res['foreign_load']:.0%}")
        console.print(table)
    worst = max([steps["foreign_load"], *(res["foreign_load"] for res in ddp)])
    if worst > 0.1:
        console.print(f"[yellow]warning: other processes used up to {worst:.0%} of the CPUs during a measurement; "
                      "absolute times are not clean (part 1 ratios are interleaved, so less affected).[/]")
    if args.json:
        args.json.write_text(json.dumps({"env": env, "steps": steps, "ddp": ddp}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
