"""The package's layering, checked on its source (``ast``), so that it stays as docs/architecture.md draws it.

Stages, lowest first: ``core`` (the formats and algorithms: levels, masks, groups, bundle, masked forward,
schedules, safetensors) and ``data`` know nothing above them; ``models`` know core and data; ``sources`` open inputs
with models' help; ``runtime`` runs what they opened (level switches, kernels, ``LoadedModel``); ``training``,
``evaluation`` and ``export`` use sources and runtime; ``report`` formats results; the CLI with its presenters
(``console``, ``display``), the demo and the prune stage sit on top. The utilities (``errors``, ``atomic``,
``validation``, the package itself) sit below every stage: any module may import them, and ``validation`` (the field
types and the one validation-error formatter shared by recipes and model-family configs) imports nothing of the
package but ``errors``. docs/architecture.md names every module in the row of its stage (checked here too).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "dsnn_compress"
DOC = PACKAGE.parents[1] / "docs" / "architecture.md"
STAGES = ("core", "data", "models", "sources", "calibration", "runtime", "training", "evaluation", "export",
          "report")
TOP = ("cli", "__main__", "display", "console", "demo", "prune", "structured_prune")
UTILITIES = ("errors", "atomic", "validation", "")  # "" = the package itself (version, tool_metadata)

FORBIDDEN: dict[str, set[str]] = {
    "core": set(STAGES) - {"core"} | set(TOP),
    "data": set(STAGES) - {"data", "core"} | set(TOP),
    "models": {"sources", "calibration", "runtime", "training", "evaluation", "export", "report", *TOP},
    "sources": {"calibration", "runtime", "training", "evaluation", "export", "report", *TOP},
    "calibration": {"runtime", "training", "evaluation", "export", "report", *TOP},
    "runtime": {"training", "evaluation", "export", "report", *TOP},
    "evaluation": {"training", "export", "report", *TOP},
    "training": {"export", "report", *TOP},  # console and display included: the trainer reports through callbacks
    "export": {"training", "evaluation", "report", *TOP},
    "report": {"training", "evaluation", "sources", "calibration", "runtime", "export", *TOP},
}
"""Stage -> the stages and top-level modules it must not import (never a utility: everybody may import those)."""

RESULT_RECORDS = ("evaluation.results", "evaluation.scoring")
"""The typed results of an evaluation (plain records, no model is run): ``report`` formats them, so it may import
these modules of ``evaluation`` and no other."""

THIRD_PARTY_PRIVATE = {"_register_state_dict_hook", "_register_load_state_dict_pre_hook",
                       "_get_feat_extract_output_lengths"}
"""Private methods of torch / transformers objects that the code calls on purpose (no public equivalent)."""

MAX_LINES = 450


def modules() -> dict[str, Path]:
    """Dotted module name (relative to the package) -> file."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imported(name: str, path: Path) -> set[str]:
    """Package-relative dotted names of everything ``name`` imports from the package (relative or absolute)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            elif node.module and node.module.startswith("dsnn_compress"):
                target = node.module[len("dsnn_compress"):].lstrip(".")
            else:
                continue
            found.add(target)
            found.update(f"{target}.{alias.name}".lstrip(".") for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name[len("dsnn_compress"):].lstrip(".") for a in node.names
                         if a.name.startswith("dsnn_compress"))
    return found


def stage_of(dotted: str) -> str:
    return dotted.split(".")[0]


def test_the_walker_sees_relative_and_absolute_imports(tmp_path: Path) -> None:
    fake = tmp_path / "mod.py"
    fake.write_text("from ..training.trainer import finetune\nfrom . import masks\nimport dsnn_compress.cli\n")
    assert imported("core.mod", fake) >= {"training.trainer", "training.trainer.finetune", "core.masks", "cli"}


@pytest.mark.parametrize("stage", sorted(FORBIDDEN))
def test_no_stage_imports_above_itself(stage: str) -> None:
    bad = []
    for name, path in modules().items():
        if stage_of(name) != stage:
            continue
        for target in imported(name, path):
            if stage == "report" and any(target == r or target.startswith(r + ".") for r in RESULT_RECORDS):
                continue
            if stage_of(target) in FORBIDDEN[stage]:
                bad.append(f"{name} imports {target}")
    assert not bad, "forbidden imports:\n" + "\n".join(sorted(bad))


def test_the_result_records_run_nothing() -> None:
    """What ``report`` may import of ``evaluation`` stays records: they import core, errors and each other only."""
    found = {name: imported(name, path) for name, path in modules().items() if name in RESULT_RECORDS}
    assert sorted(found) == sorted(RESULT_RECORDS)
    allowed = ("core", "errors", *RESULT_RECORDS)
    bad = [f"{name} imports {target}" for name, targets in found.items() for target in targets
           if not any(target == a or target.startswith(a + ".") for a in allowed)]
    assert not bad, bad


def test_utilities_are_importable_by_every_stage() -> None:
    assert not {u for u in UTILITIES if any(u in forbidden for forbidden in FORBIDDEN.values())}
    assert not set(UTILITIES) & (set(STAGES) | set(TOP))


def test_validation_imports_nothing_of_the_package_but_errors() -> None:
    """``validation`` sits below ``models`` and ``training`` (both use it), so it may lean on ``errors`` only."""
    found = {name: imported(name, path) for name, path in modules().items() if stage_of(name) == "validation"}
    assert found, "no validation package"
    bad = [f"{name} imports {target}" for name, targets in found.items() for target in targets
           if stage_of(target) not in ("validation", "errors")]
    assert not bad, bad


def test_nothing_but_the_entry_points_import_the_cli_or_the_demo() -> None:
    bad = [f"{name} imports {target}" for name, path in modules().items()
           if name != "__main__" and stage_of(name) != "cli"  # the cli package's modules build one app together
           for target in imported(name, path) if stage_of(target) in ("cli", "demo")]
    assert not bad, bad


def test_adapters_print_nothing() -> None:
    """Model code reports through return values and errors; only the CLI and reports write to the terminal."""
    bad = []
    for name, path in modules().items():
        if stage_of(name) != "models":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                bad.append(f"{name}:{node.lineno} calls print")
        bad += [f"{name} imports {t}" for t in imported(name, path) if t.split(".")[0] == "console"]
        bad += [f"{name} imports rich" for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                and any((getattr(node, "module", None) or a.name).startswith("rich") for a in node.names)]
    assert not bad, bad


def test_no_module_reads_another_modules_private_names() -> None:
    """``from x import _name`` across modules, or ``obj._attr`` where ``_attr`` belongs to another module."""
    all_modules = modules()
    own_private: dict[str, set[str]] = {}
    trees = {name: ast.parse(path.read_text(encoding="utf-8")) for name, path in all_modules.items()}
    for name, tree in trees.items():
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ("self",
                                                                                                          "cls"):
                names.add(node.attr)
            elif isinstance(node, ast.Name):
                names.add(node.id)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
        own_private[name] = {n for n in names if n.startswith("_") and not n.startswith("__")}
    bad = []
    for name, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("dsnn_compress")):
                bad += [f"{name}:{node.lineno} imports {a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
            elif (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                  and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
                  and node.attr not in own_private[name] and node.attr not in THIRD_PARTY_PRIVATE):
                bad.append(f"{name}:{node.lineno} reads {ast.unparse(node)}")
    assert not bad, "\n".join(bad)


def test_no_source_module_is_over_the_size_limit() -> None:
    sizes = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in modules().items()}
    assert not {n: s for n, s in sizes.items() if s > MAX_LINES}, f"modules over {MAX_LINES} lines"


def test_one_opener_recognises_inputs() -> None:
    """Only sources/ decides what kind of file an input is: nobody else calls the readers or torch.load."""
    bad = []
    for name, path in modules().items():
        # the opener's own readers, the safetensors module, and the trainer's state file (its own format, not an input)
        if stage_of(name) == "sources" or name in ("core.safetensors_io", "training.state"):
            continue
        text = path.read_text(encoding="utf-8")
        for needle in ("torch.load(", "safe_open(", "load_file(", "read_torch_file(", "read_hf_dir("):
            if needle in text:
                bad.append(f"{name} calls {needle}")
    assert not bad, bad


def test_only_the_opener_builds_adapters_from_model_descriptions() -> None:
    """Outside ``models/``, a model description becomes a runnable model in one place: ``Source.adapter``."""
    bad = [name for name, path in modules().items()
           if stage_of(name) != "models" and name != "sources.opener"
           and "adapter_from_metadata(" in path.read_text(encoding="utf-8")]
    assert not bad, bad


def test_no_module_rebinds_a_global() -> None:
    """No ``global`` statement: state such as the command line travels as arguments (the CLI's click context)."""
    bad = [f"{name}:{node.lineno}" for name, path in modules().items()
           for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))) if isinstance(node, ast.Global)]
    assert not bad, bad


# ----------------------------------------------------------------------------------- docs/architecture.md

TOP_LEVEL_ROWS = ("utilities", "top")
"""The rows of docs/architecture.md's stage table that name top-level modules (the others are folders)."""


def documented_rows(text: str) -> dict[str, set[str]]:
    """The stage table of docs/architecture.md: row key -> the backticked module names of its *modules* cell.

    A row's key is its folder (``core`` for ``| `core/` |``, ``validation`` for ``| `validation/` (utility) |``)
    or, for the rows of top-level modules, its plain first cell (``top``, ``utilities``).
    """
    section = text.split("## Stages", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, set[str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) < 2 or cells[0] in ("stage", "") or set(cells[0]) <= {"-"}:
            continue
        folder = re.match(r"`(\w+)/`", cells[0])
        key = folder.group(1) if folder else cells[0]
        assert key not in rows, f"two rows for {key}"
        rows[key] = set(re.findall(r"`([\w.]+)`", cells[1]))
    return rows


def module_rows(names: list[str]) -> dict[str, set[str]]:
    """Where the naming rule puts each module: ``a.b.c`` -> row ``a``, name ``b.c``; a stage package's
    ``__init__`` (``core``) -> its own row, no name; a top-level file -> the top-level rows (key ``""``). The package
    itself (``""``, its ``__init__``: version and ``tool_metadata``) is not a row of the table. The modules of a
    top-level package (``cli.app``) are named in full in the top-level rows."""
    folders = {path.parent.name for path in PACKAGE.glob("*/__init__.py")}
    wanted: dict[str, set[str]] = {}
    for name in names:
        head, _, rest = name.partition(".")
        if not name:
            continue
        if head in folders and head not in TOP:
            wanted.setdefault(head, set()).update({rest} if rest else set())
        else:  # a top-level module, or a module of a top-level package (the cli's): named in full
            wanted.setdefault("", set()).add(name)
    return wanted


def test_the_doc_reader_applies_the_naming_rule() -> None:
    doc = ("## Stages\n\n| stage | modules | job |\n|---|---|---|\n| utilities | `errors` | x |\n"
           "| `models/` | `base`, `hf_ctc`, `hf_ctc.adapter` | `not_a_module_cell` |\n| top | `cli` | y |\n\n## Next\n"
           "| `core/` | `ignored` | after the section |\n")
    assert documented_rows(doc) == {"utilities": {"errors"}, "models": {"base", "hf_ctc", "hf_ctc.adapter"},
                                    "top": {"cli"}}
    assert module_rows(["", "cli", "errors", "models", "models.base", "models.hf_ctc", "models.hf_ctc.adapter"]) == {
        "": {"cli", "errors"}, "models": {"base", "hf_ctc", "hf_ctc.adapter"}}


def test_the_architecture_page_names_every_module_in_its_stage_row() -> None:
    """Every module under src/dsnn_compress is named in docs/architecture.md's table, in the row of its stage,
    relative to the stage's folder (``hf_ctc.adapter`` in the ``models/`` row); top-level modules in the rows
    *utilities* or *top*. And every name there is a module, so the page cannot keep a moved or deleted one."""
    rows = documented_rows(DOC.read_text(encoding="utf-8"))
    top_level = set().union(*(rows.get(key, set()) for key in TOP_LEVEL_ROWS))
    wanted = module_rows(list(modules()))
    missing = [f"{stage or 'top-level'}: {name}" for stage, names in wanted.items()
               for name in sorted(names - (top_level if not stage else rows.get(stage, set())))]
    missing += [f"no row for {stage}/" for stage in wanted if stage and stage not in rows]
    assert not missing, "modules docs/architecture.md does not name:\n" + "\n".join(missing)
    stale = [f"{key}: {name}" for key, names in rows.items() for name in sorted(names)
             if (name if key in TOP_LEVEL_ROWS else f"{key}.{name}") not in modules()]
    assert not stale, "docs/architecture.md names modules that do not exist:\n" + "\n".join(stale)


def test_the_architecture_page_has_the_layering_of_this_test() -> None:
    """The table's rows are this test's stages, top modules and utilities, lowest stage first."""
    rows = documented_rows(DOC.read_text(encoding="utf-8"))
    assert {name.split(".")[0] for name in rows["top"]} == set(TOP)
    assert rows["utilities"] | {"validation", ""} == set(UTILITIES)
    folders = [key for key in rows if key not in ("top", "utilities", "validation")]
    assert folders == list(STAGES)
