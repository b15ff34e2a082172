"""Fuzz DSNN bundles at scale: thousands of seeded mutants of a valid bundle (bit flips, truncations, metadata and
header edits, changed codes; see ``tests/bundle_fuzz.py``), each loaded the way the CLI does, with checksums
verified. Prints the count of every outcome per kind of mutation. ``rejected`` and ``loaded-equal`` are fine;
anything else (``loaded-different``, ``crash``, ``hang``, ``paths-disagree``, ``parser-disagrees``) is a bug, listed
below the table, and makes the script exit 1. CI runs a few hundred of the same mutants
(``tests/test_fuzz_bundles.py``).

Usage::

    python benchmarks/fuzz_bundles.py                      # 5000 mutants, seed 0
    python benchmarks/fuzz_bundles.py --count 20000 --seed 7 --json fuzz.json
    python benchmarks/fuzz_bundles.py --bundle my.safetensors   # mutate your own bundle instead
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from bundle_fuzz import KINDS, OK_OUTCOMES, check_mutant, mutate  # noqa: E402
from helpers import random_state_dict, write_checkpoint  # noqa: E402

from dsnn_compress.core.bundle import load_bundle  # noqa: E402
from dsnn_compress.prune import PruneOptions, prune_checkpoint  # noqa: E402

OUTCOMES = ("rejected", "loaded-equal", "loaded-different", "crash", "hang", "paths-disagree", "parser-disagrees")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bundle", type=Path, default=None, help="bundle to mutate (default: a small random one)")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds one load may take before it is a hang")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    out, err = Console(), Console(stderr=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        original = args.bundle
        if original is None:
            original = work / "bundle.safetensors"
            prune_checkpoint(write_checkpoint(work / "dense.safetensors", random_state_dict(0)), original,
                             PruneOptions((0.5, 0.7, 0.9)))
        raw, reference = original.read_bytes(), load_bundle(original)
        rng = random.Random(args.seed)
        counts: Counter[tuple[str, str]] = Counter()
        failures: list[str] = []
        path = work / "mutant.safetensors"
        started = time.perf_counter()
        with Progress(console=err, transient=True) as progress:
            task = progress.add_task("mutants", total=args.count)
            for i in range(args.count):
                kind, data, detail = mutate(raw, rng)
                path.write_bytes(data)
                outcome = check_mutant(path, reference, args.timeout)
                counts[(kind, outcome.split(":")[0])] += 1
                if outcome not in OK_OUTCOMES:
                    failures.append(f"#{i} {kind} ({detail}): {outcome}")
                progress.advance(task)
        seconds = time.perf_counter() - started
    table = Table(title=f"{args.count} mutants of {original.name} ({len(raw):,} bytes), seed {args.seed}, "
                        f"{seconds:.0f} s", title_justify="left")
    table.add_column("mutation")
    for outcome in OUTCOMES:
        table.add_column(outcome, justify="right")
    for kind in (*KINDS, "total"):
        row = [sum(n for (k, o), n in counts.items() if o == outcome and kind in (k, "total")) for outcome in OUTCOMES]
        table.add_row(kind, *(str(n) if n else "" for n in row), style="bold" if kind == "total" else None)
    out.print(table)
    for line in failures[:50]:
        out.print(f"[red]{line}[/red]", highlight=False)
    if args.json:
        record = {"count": args.count, "seed": args.seed, "seconds": seconds, "failures": failures,
                  "counts": {f"{k}/{o}": n for (k, o), n in sorted(counts.items())}}
        args.json.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
