"""What each level of a structured bundle keeps: neurons, heads and channels per layer, and layers per stack (for
`dsnn inspect`)."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from ..core.bundle import Bundle
from ..core.levels import level_label


def structured_report(bundle: Bundle) -> dict[str, Any] | None:
    """``{"granularity", "sets": [{"name", "kind", "layer", "count", "kept": {label: n}}], "kinds": {kind: {label:
    n}}}`` of a structured bundle (None for a weight bundle)."""
    structured = bundle.structured
    if structured is None:
        return None
    labels = [level_label(v) for v in bundle.all_levels]
    sets = []
    kinds: dict[str, dict[str, int]] = {}
    for spec in structured.specs:
        kept = {label: structured.kept(k)[spec.name] for k, label in enumerate(labels)}
        sets.append({"name": spec.name, "kind": spec.kind, "layer": spec.layer, "count": spec.count, "kept": kept})
        totals = kinds.setdefault(spec.kind, dict.fromkeys(labels, 0))
        for label, n in kept.items():
            totals[label] += n
    out = {"granularity": "structured", "prefix_ordered": structured.prefix_ordered(), "sets": sets, "kinds": kinds}
    if bundle.depth:
        out["depth"] = [{"stack": stack.name, "layers": stack.layers, "order": list(stack.order),
                         "chosen_by": stack.chosen_by,
                         "kept": {label: [i for i in range(stack.layers) if i not in stack.dropped_at(k)]
                                  for k, label in enumerate(labels)}} for stack in bundle.depth]
        for entry in sets:  # a dropped layer runs none of its structures
            for k, label in enumerate(labels):
                if any(entry["name"].startswith(f"{stack.name}.{i}.") for stack in bundle.depth
                       for i in stack.dropped_at(k)):
                    kinds[entry["kind"]][label] -= entry["kept"][label]
                    entry["kept"][label] = 0
    return out


def structured_table(report: dict[str, Any]) -> Table:
    """One row per group set (neurons / heads / channels of one module), the groups kept at each level."""
    labels = list(next(iter(report["sets"]))["kept"]) if report["sets"] else []
    table = Table(title="structures kept per level", title_justify="left")
    for column in ("set", "kind"):
        table.add_column(column)
    for label in labels:
        table.add_column(label, justify="right")
    for entry in report["sets"]:
        table.add_row(entry["name"], entry["kind"], *(str(entry["kept"][label]) for label in labels))
    for kind, totals in sorted(report["kinds"].items()):
        table.add_row("[bold]all[/bold]", f"[bold]{kind}[/bold]",
                      *(f"[bold]{totals[label]}[/bold]" for label in labels))
    return table


def depth_table(report: dict[str, Any]) -> Table:
    """One row per layer stack: the layers each level runs (the others are dropped)."""
    labels = list(report["depth"][0]["kept"])
    table = Table(title="layers kept per level", title_justify="left")
    table.add_column("stack")
    table.add_column("drop order")
    for label in labels:
        table.add_column(label, justify="right")
    for entry in report["depth"]:
        table.add_row(entry["stack"], f"{', '.join(map(str, entry['order']))} ({entry['chosen_by']})",
                      *(f"{len(kept)}: {', '.join(map(str, kept))}" for kept in (entry["kept"][lb] for lb in labels)))
    return table
