"""examples/ci: the CI job script run end to end on the tiny test model (a passing run that exports the served
levels, a WER regression that fails the job with exit 3 and exports nothing, bad settings), and the GitHub Actions
workflow checked against the script it runs, so that the two cannot drift apart."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml
from asr_fixtures import MANIFEST, TinyModel
from helpers import ROOT, subprocess_env
from safetensors.torch import load_file

from dsnn_compress.core.bundle import load_bundle

CI = ROOT / "examples" / "ci"
SCRIPT = CI / "build_bundle.py"
WORKFLOW = CI / "github-actions.yml"
RECIPE = ROOT / "recipes" / "tiny-test.yaml"

# The tiny model pruned and fine-tuned 3 steps gives WER 52.4 % dense, 66.7 % at 0.5 and 100 % at 0.9 on the eight
# test utterances: the gates below pass with a margin, and 0.9 (48 points worse than dense) fails REGRESSION_LIMIT.
GATES = {"DSNN_MAX_WER": "dense:70", "DSNN_MAX_WER_INCREASE": "0.5:40"}
REGRESSION_LIMIT = 30.0


def job_env(model: TinyModel, out: Path, **settings: str) -> dict[str, str]:
    """Every setting the workflow makes, pointed at the tiny model, plus ``settings``."""
    return {"DSNN_MODEL": str(model.checkpoint), "DSNN_RECIPE": str(RECIPE), "DSNN_EVAL_DATA": str(MANIFEST),
            "DSNN_LEVELS": "0.5,0.9", "DSNN_SERVE": "dense,0.5", **GATES, "DSNN_EXPORT_FORMAT": "safetensors",
            "DSNN_FINETUNE_ARGS": "--steps 3", "DSNN_OUT": str(out), **settings}


def run_job(settings: dict[str, str], *flags: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``python examples/ci/build_bundle.py FLAGS`` with only ``settings`` as DSNN_* / GitHub variables."""
    env = {k: v for k, v in subprocess_env().items() if not k.startswith(("DSNN_", "GITHUB_"))}
    env.update(settings)
    return subprocess.run([sys.executable, str(SCRIPT), *flags], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def script_module() -> ModuleType:
    """The job script imported as a module (for its settings table)."""
    spec = importlib.util.spec_from_file_location("build_bundle", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))


def levels_by_value(report: dict) -> dict[float, dict]:
    return {entry["level"]: entry for entry in report["levels"]}


@pytest.fixture(scope="module")
def passing(tiny_model: TinyModel, tmp_path_factory: pytest.TempPathFactory):
    """One job run whose gates pass: (result, OUT, step summary file)."""
    root = tmp_path_factory.mktemp("ci-pass")
    out, summary = root / "out", root / "summary.md"
    result = run_job(job_env(tiny_model, out, GITHUB_STEP_SUMMARY=str(summary)))
    return result, out, summary


@pytest.fixture(scope="module")
def regression(tiny_model: TinyModel, tmp_path_factory: pytest.TempPathFactory):
    """The same job serving 0.9 too, gated at REGRESSION_LIMIT points over dense, under GitHub Actions."""
    root = tmp_path_factory.mktemp("ci-fail")
    out, summary = root / "out", root / "summary.md"
    result = run_job(job_env(tiny_model, out, DSNN_SERVE="dense,0.5,0.9",
                             DSNN_MAX_WER_INCREASE=f"0.5:40 0.9:{REGRESSION_LIMIT:g}",
                             GITHUB_ACTIONS="true", GITHUB_STEP_SUMMARY=str(summary)))
    return result, out, summary


# ------------------------------------------------------------------------------------------------ a passing job


def test_passing_job_exports_every_served_level_and_only_those(passing):
    result, out, summary = passing
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (out / "export").iterdir()) == [
        "model-0.5.safetensors", "model-dense.safetensors", "served.json"]  # 0.9 is trained but not served
    assert not (out / ".export-partial").exists()
    report = json.loads((out / "reports" / "evaluate.json").read_text())
    assert [(g["gate"], g["level"], g["passed"]) for g in report["gates"]] == [
        ("max-wer", 0.0, True), ("max-wer-increase", 0.5, True)]
    assert sorted(levels_by_value(report)) == [0.0, 0.5, 0.9]  # every trained level is evaluated
    finetune = json.loads((out / "reports" / "finetune.json").read_text())
    assert finetune["levels"] == [0.5, 0.9] and finetune["steps"] == 3  # DSNN_FINETUNE_ARGS reached dsnn
    assert json.loads((out / "reports" / "prune.json").read_text())["source"]["file"] == "dense.safetensors"
    assert "| max-wer | dense |" in summary.read_text()  # the Markdown report went to the job summary


def test_exports_are_the_fine_tuned_bundle_at_each_level(passing, tiny_model: TinyModel):
    _, out, _ = passing
    dense = load_file(out / "export" / "model-dense.safetensors")
    half = load_file(out / "export" / "model-0.5.safetensors")
    bundle = load_bundle(out / "bundle.safetensors")
    not_pruned = set(json.loads((out / "reports" / "prune.json").read_text())["not_pruned"])
    pruned = sorted(set(dense) - not_pruned)
    assert pruned and set(half) == set(dense)
    for name in pruned:  # per-layer allocation: each pruned tensor loses exactly half of its weights at 0.5
        zeros = int((half[name] == 0).sum())
        assert abs(zeros - half[name].numel() / 2) <= 1, name
        assert int((dense[name] == 0).sum()) < zeros, name
    for name in not_pruned:
        assert half[name].equal(dense[name]), name
    trained = bundle.state_dict_at(0.0)
    assert all(dense[k].equal(trained[k]) for k in dense)
    one_shot = load_bundle(out / "pruned.safetensors").state_dict_at(0.0)
    assert any(not dense[k].equal(one_shot[k]) for k in pruned)  # fine-tuned weights, not the pruned input's


def test_served_json_names_each_file_with_its_scores(passing):
    _, out, _ = passing
    served = json.loads((out / "export" / "served.json").read_text())
    report = levels_by_value(json.loads((out / "reports" / "evaluate.json").read_text()))
    assert [(e["level"], e["label"], e["path"]) for e in served["levels"]] == [
        (0.0, "dense", "model-dense.safetensors"), (0.5, "0.5", "model-0.5.safetensors")]
    for entry in served["levels"]:
        assert entry["wer"] == report[entry["level"]]["wer"]
        assert [g["passed"] for g in entry["gates"]] == [True]
        assert entry["sha256"] == hashlib.sha256((out / "export" / entry["path"]).read_bytes()).hexdigest()
    assert served["bundle"] == "bundle.safetensors" and served["format"] == "safetensors"


# -------------------------------------------------------------------------------------------- a WER regression


def test_a_wer_regression_fails_the_job_with_exit_3_and_exports_nothing(regression):
    result, out, summary = regression
    assert result.returncode == 3, result.stderr
    report = json.loads((out / "reports" / "evaluate.json").read_text())  # written although the gate failed
    levels = levels_by_value(report)
    increase = 100 * (levels[0.9]["wer"] - levels[0.0]["wer"])
    assert increase > REGRESSION_LIMIT  # the sparsest level really regressed
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        f"error: quality gate failed: WER increase over dense at level 0.9 is {increase:.2f} %, "
        f"above the limit {REGRESSION_LIMIT:g} %",
        f"error: evaluate failed with exit 3 (a quality gate failed); nothing exported; reports in {out / 'reports'}",
    ]
    assert "Traceback" not in result.stderr
    assert [(g["level"], g["passed"]) for g in report["gates"] if g["gate"] == "max-wer-increase"] == [
        (0.5, True), (0.9, False)]
    assert not (out / "export").exists() and not (out / ".export-partial").exists()
    assert (out / "bundle.safetensors").is_file()  # kept for inspection
    assert "**FAIL**" in summary.read_text()
    assert "::error title=dsnn bundle job::evaluate failed with exit 3" in result.stdout
    assert "::group::dsnn evaluate" in result.stdout


# ----------------------------------------------------------------------------------------------- bad settings


@pytest.mark.parametrize(("change", "fragment"), [
    ({"DSNN_SERVE": "dense,0.5,0.9"}, "no gate covers served level(s) 0.9"),
    ({"DSNN_MAX_WER": "0.5:20", "DSNN_MAX_WER_INCREASE": "all:40"}, "no gate covers served level(s) dense"),
    ({"DSNN_MAX_WER": "dense"}, "DSNN_MAX_WER: 'dense' is not LEVEL:PCT"),
    ({"DSNN_MAX_WER": "dense:lots"}, "DSNN_MAX_WER: 'dense:lots' is not LEVEL:PCT"),
    ({"DSNN_SERVE": "dense,0.95"}, "level 0.95 (DSNN_SERVE or a gate) is above the largest trained level 0.9"),
    ({"DSNN_LEVELS": ""}, "DSNN_LEVELS (or --levels) is required"),
    ({"DSNN_EXPORT_FORMAT": "zip"}, "DSNN_EXPORT_FORMAT 'zip' is not one of"),
])
def test_bad_settings_are_usage_errors_before_any_work(tiny_model, tmp_path, change, fragment):
    out = tmp_path / "out"
    result = run_job(job_env(tiny_model, out, **change))
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and fragment in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert not out.exists()


def test_a_non_empty_output_directory_is_refused_untouched(tiny_model, tmp_path):
    out = tmp_path / "out"
    (out / "export").mkdir(parents=True)
    (out / "export" / "model-dense.safetensors").write_bytes(b"last week's model")
    result = run_job(job_env(tiny_model, out))
    assert result.returncode == 2
    assert "is not an empty directory" in result.stderr
    assert [p.name for p in out.rglob("*")] == ["export", "model-dense.safetensors"]


def test_flags_override_the_environment(tiny_model, tmp_path):
    result = run_job(job_env(tiny_model, tmp_path / "out"), "--serve", "dense,0.9", "--max-wer", "dense:70")
    assert result.returncode == 2
    assert "no gate covers served level(s) 0.9" in result.stderr


@pytest.mark.parametrize(("stage", "code", "change"), [
    ("prune", 1, {"DSNN_MODEL": "corrupt.safetensors"}),
    ("finetune", 2, {"DSNN_FINETUNE_ARGS": "--set training.stepz=3"}),
])
def test_a_failing_stage_passes_its_exit_code_through(tiny_model, tmp_path, stage, code, change):
    (tmp_path / "corrupt.safetensors").write_bytes(b"not a model")
    out = tmp_path / "out"
    result = run_job(job_env(tiny_model, out, **change), cwd=tmp_path)
    assert result.returncode == code
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2, result.stderr  # dsnn's own line, then the job's
    assert errors[1] == f"error: {stage} failed with exit {code} ({'failure' if code == 1 else 'usage error'})"
    assert not (out / "export").exists() and not (out / "reports" / "evaluate.json").exists()


# ------------------------------------------------------------------------------------------------ the workflow


def _build_step() -> dict:
    steps = [s for s in workflow()["jobs"]["bundle"]["steps"] if SCRIPT.name in s.get("run", "")]
    assert len(steps) == 1
    return steps[0]


def test_the_workflow_runs_the_tested_script_with_settings_it_knows(tiny_model, tmp_path):
    parsed = workflow()
    assert {"push", "pull_request", "workflow_dispatch"} <= set(parsed["on"])
    command = shlex.split(_build_step()["run"])
    assert command[0] == "python" and Path(command[1]).name == SCRIPT.name
    assert command[2:] == []  # configured by the env block alone, as the tests run it
    env = parsed["jobs"]["bundle"]["env"]
    known = {s.env for s in script_module().SETTINGS}
    assert set(env) <= known
    assert set(env) <= set(job_env(tiny_model, tmp_path))  # the tests exercise every setting the workflow makes


def test_the_workflow_settings_pass_the_scripts_checks(tmp_path):
    """The workflow's own levels, serve list and gates are valid: the job gets as far as looking for the model."""
    env = {k: str(v) for k, v in workflow()["jobs"]["bundle"]["env"].items()}
    result = run_job(env, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == f"error: DSNN_MODEL: {env['DSNN_MODEL']} does not exist\n"
    assert not (tmp_path / env["DSNN_OUT"]).exists()


def test_the_uploaded_artifacts_are_what_the_job_writes(passing, regression):
    steps = [s for s in workflow()["jobs"]["bundle"]["steps"] if "upload-artifact" in s.get("uses", "")]
    by_name = {s["with"]["name"]: s for s in steps}
    assert set(by_name) == {"dsnn-reports", "dsnn-bundle"}
    assert by_name["dsnn-reports"]["if"] == "always()"  # the reports of a failed gate are uploaded too
    assert "if" not in by_name["dsnn-bundle"]  # only a passing job uploads a bundle
    for name, (_, out, _) in (("dsnn-reports", regression), ("dsnn-bundle", passing)):
        for line in by_name[name]["with"]["path"].splitlines():
            path = Path(line.strip().replace("${{ env.DSNN_OUT }}", str(out)))
            assert path.exists(), (name, line)


def test_the_readme_documents_every_setting_and_exit_code():
    text = (CI / "README.md").read_text(encoding="utf-8")
    for setting in script_module().SETTINGS:
        assert f"| `{setting.flag}` | `{setting.env}` |" in text
    for code in (0, 1, 2, 3, 130):
        assert f"\n| {code} |" in text
    assert os.path.basename(WORKFLOW) in text and SCRIPT.name in text
