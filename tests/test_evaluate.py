"""`dsnn evaluate` and the evaluate() API on a tiny trained conformer: report schema, independent decoding
oracle, manifest formats, CI gates and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import jiwer
import pytest
import torch
from asr_fixtures import (
    AUDIOFOLDER,
    DATA,
    KALDI,
    MANIFEST,
    adapter_at,
    audio_files,
    copy_manifest,
    decode_file,
    file_seconds,
    write_random_bytes,
    write_zero_length_wav,
)
from helpers import assert_one_error_line, run_cli
from safetensors import safe_open
from safetensors.torch import save_file

from dsnn_compress.core.bundle import load_bundle
from dsnn_compress.data.manifest import read_manifest
from dsnn_compress.data.text import normalize_text
from dsnn_compress.errors import DsnnError, UsageError
from dsnn_compress.evaluation.evaluate import EvaluateOptions, evaluate
from dsnn_compress.evaluation.results import EvaluationReport, LevelResult
from dsnn_compress.evaluation.scoring import char_errors, word_errors
from dsnn_compress.models.builtin import BuiltinAdapter
from dsnn_compress.prune import PruneOptions, prune_checkpoint

REPORT_KEYS = {"schema", "tool", "model", "data", "normalizer", "decoding", "threads", "levels", "skipped",
               "gates", "kernels", "timing", "runtime"}
LEVEL_KEYS = {"level", "trained", "wer", "cer", "words", "chars", "nonzero_params", "audio_seconds",
              "processing_seconds", "rtfx", "rtfx_range", "utterances_scored", "utterances_skipped", "decodes_capped",
              "kernels"}
COUNT_KEYS = {"substitutions", "deletions", "insertions", "hits", "reference_length", "rate"}
REFERENCES = [normalize_text(u.text) for u in read_manifest(MANIFEST)]
IDS = [u.id for u in read_manifest(MANIFEST)]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run(model: Path, data: Path, levels: str = "all", repeats: int = 1, **options) -> EvaluationReport:
    """``evaluate`` with one timing pass unless a test asks for more (most tests here time nothing)."""
    return evaluate(model, data, EvaluateOptions(levels=levels, repeats=repeats, **options))


@pytest.fixture(scope="module")
def report(tiny_model) -> EvaluationReport:
    return run(tiny_model.bundle, MANIFEST, "all", details=True, repeats=2)


def by_level(rep: EvaluationReport) -> dict[float, LevelResult]:
    return {entry.level: entry for entry in rep.levels}


def scores(rep: EvaluationReport | dict) -> list[tuple]:
    """Everything of a report that must not depend on the manifest format (a JSON report is read back first)."""
    typed = EvaluationReport.from_dict(rep) if isinstance(rep, dict) else rep
    return [(e.level, e.wer, e.cer, e.words, e.chars, e.nonzero_params, e.utterances_scored) for e in typed.levels]


# ----------------------------------------------------------------------------------------------- report


def test_report_schema(report):
    """The JSON report's keys, pinned: what earlier versions wrote plus ``rtfx_range`` per level and ``timing``."""
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))  # strict JSON
    assert set(data) == REPORT_KEYS | {"utterances"}
    assert data["schema"] == "dsnn-evaluate/1"
    assert data["model"] == {"path": str(report.model.path), "kind": "bundle", "family": "conformer-ctc"}
    assert data["data"] == {"path": str(MANIFEST), "utterances": 8}
    assert data["decoding"] == "greedy-ctc"
    assert data["normalizer"] == "default"
    assert data["skipped"] == [] and data["gates"] == []
    assert data["kernels"] == {"mode": "dense"}
    assert data["timing"] == {"repeats": 2, "timed_utterances": 8}
    assert data["runtime"] == {"name": "dsnn", "compute_type": None, "chunk_length": None, "versions": {}}
    assert set(data["tool"]) == {"name", "version"}
    assert [e["level"] for e in data["levels"]] == [0.0, 0.5, 0.9]
    for entry in data["levels"]:
        assert set(entry) == LEVEL_KEYS
        assert set(entry["words"]) == COUNT_KEYS
        assert set(entry["chars"]) == COUNT_KEYS
        assert entry["kernels"] == {"mode": "dense", "sparse_layers": 0, "layers": []}
        assert entry["utterances_scored"] == 8
        assert entry["utterances_skipped"] == 0
        assert entry["trained"] is True and entry["decodes_capped"] == 0
        low, high = entry["rtfx_range"]
        assert 0 < low <= entry["rtfx"] <= high
    assert [set(u) for u in data["utterances"]] == [{"id", "reference", "hypotheses"}] * 8
    assert all(set(u["hypotheses"]) == {"0", "0.5", "0.9"} for u in data["utterances"])
    assert EvaluationReport.from_dict(data) == report  # the JSON holds the whole typed report


def test_report_without_details_has_no_utterances(tiny_model):
    rep = run(tiny_model.bundle, MANIFEST, "0.9")
    assert rep.utterances is None
    assert set(rep.to_dict()) == REPORT_KEYS
    assert [e.level for e in rep.levels] == [0.9]


def test_audio_seconds_is_the_total_duration(tiny_model, report):
    total = file_seconds(audio_files())
    # the Kaldi directory has no durations: the whole files are read
    kaldi = run(tiny_model.bundle, KALDI, "0")
    assert kaldi.levels[0].audio_seconds == pytest.approx(round(total, 3), abs=1e-9)
    # the NeMo manifest gives durations rounded to the millisecond, and its audio is read up to them
    manifest_total = sum(json.loads(line)["duration"] for line in MANIFEST.read_text().splitlines())
    for entry in report.levels:
        assert entry.audio_seconds == pytest.approx(manifest_total, abs=2e-3)
        assert entry.audio_seconds == pytest.approx(total, abs=8 * 1e-3)


def test_nonzero_params_follow_the_bundle(tiny_model, report):
    bundle = load_bundle(tiny_model.bundle)
    summary = bundle.summary()
    entries = report.levels
    assert [e.nonzero_params for e in entries] == [
        summary["total_params"] - lv["pruned"] for lv in summary["levels"]]
    assert entries[0].nonzero_params == summary["total_params"]
    assert entries[0].nonzero_params > entries[1].nonzero_params > entries[2].nonzero_params
    for entry in entries:
        # independent count: nonzero values of the plain state dict at that level
        state = bundle.state_dict_at(entry.level)
        nonzero = sum(int(torch.count_nonzero(t)) for t in state.values() if t.is_floating_point())
        assert entry.nonzero_params == nonzero
    prunable = summary["prunable_params"]
    assert entries[0].nonzero_params - entries[1].nonzero_params == pytest.approx(0.5 * prunable, abs=50)
    assert entries[0].nonzero_params - entries[2].nonzero_params == pytest.approx(0.9 * prunable, abs=50)


def test_rates_and_timing_are_consistent(report):
    n_words = sum(len(r.split()) for r in REFERENCES)
    n_chars = sum(len(r) for r in REFERENCES)
    for entry in report.to_dict()["levels"]:
        words, chars = entry["words"], entry["chars"]
        assert words["reference_length"] == n_words
        assert chars["reference_length"] == n_chars
        assert entry["wer"] == words["rate"]
        assert entry["cer"] == chars["rate"]
        assert entry["wer"] == pytest.approx(
            (words["substitutions"] + words["deletions"] + words["insertions"]) / n_words)
        assert entry["processing_seconds"] > 0
        assert entry["rtfx"] > 0
        assert entry["rtfx"] == pytest.approx(entry["audio_seconds"] / entry["processing_seconds"], rel=0.01)
    # the tiny model is trained a little: dense is better than 90 % sparse
    levels = by_level(report)
    assert levels[0.0].wer < levels[0.9].wer


@pytest.fixture(scope="module")
def independent(tiny_model) -> dict[float, list[str]]:
    """Per level: the transcripts of a fresh model holding ``state_dict_at(level)``, one utterance at a time."""
    out = {}
    for level in (0.0, 0.5, 0.9):
        adapter = adapter_at(tiny_model.bundle, level)
        out[level] = [normalize_text(decode_file(adapter, path)) for path in audio_files()]
    return out


@pytest.mark.parametrize("level", [0.0, 0.5, 0.9])
def test_hypotheses_match_an_independent_decoding(report, independent, level):
    """Batched evaluation at a level == the model rebuilt from state_dict_at(level), one utterance at a time."""
    expected = independent[level]
    details = report.utterances
    assert [u.id for u in details] == IDS
    assert [u.reference for u in details] == REFERENCES
    hyps = [u.hypotheses[f"{level:g}"] for u in details]
    assert hyps == expected
    entry = by_level(report)[level]
    assert entry.wer == pytest.approx(jiwer.wer(REFERENCES, hyps))
    assert entry.cer == pytest.approx(jiwer.cer(REFERENCES, hyps))
    words = jiwer.process_words(REFERENCES, hyps)
    assert (entry.words.substitutions, entry.words.deletions, entry.words.insertions) == (
        words.substitutions, words.deletions, words.insertions)


def test_levels_really_switch_in_interleaved_passes(tiny_model, independent, monkeypatch):
    """Each level is decoded with exactly the weights of ``state_dict_at(level)``, also when switching back to a
    denser level, and gives the transcripts and WER of a fresh model holding those weights. The timing passes are
    interleaved: every pass runs every level once, the order rotated by one level from pass to pass."""
    bundle = load_bundle(tiny_model.bundle)
    decoded_with: list[dict[str, torch.Tensor]] = []  # the model's weights at each decode call
    decode = BuiltinAdapter.decode

    def spy(self, batch):
        decoded_with.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        return decode(self, batch)

    monkeypatch.setattr(BuiltinAdapter, "decode", spy)
    order = [0.9, 0.0, 0.5]  # sparse first: going back to dense must restore the pruned weights
    rep = run(tiny_model.bundle, MANIFEST, ",".join(map(str, order)), details=True, repeats=3)
    assert [e.level for e in rep.levels] == order
    # the first call is a warm-up at the first level; then each pass decodes every batch at every level (the data
    # is far below the audio a pass times at least)
    per_level, rest = divmod(len(decoded_with) - 1, 3 * len(order))
    assert per_level >= 1 and rest == 0
    passes = [[0.9, 0.0, 0.5], [0.0, 0.5, 0.9], [0.5, 0.9, 0.0]]
    phases = [order[0]] + [level for levels in passes for level in levels for _ in range(per_level)]
    for level, weights in zip(phases, decoded_with, strict=True):
        expected = bundle.state_dict_at(level)
        assert weights.keys() == expected.keys()
        assert all(torch.equal(weights[k], expected[k]) for k in expected), level
    for entry in rep.levels:
        hyps = [u.hypotheses[f"{entry.level:g}"] for u in rep.utterances]
        assert hyps == independent[entry.level]
        assert entry.wer == pytest.approx(jiwer.wer(REFERENCES, hyps))
    # the levels decode differently, so transcripts of the wrong level would not pass
    assert independent[0.0] != independent[0.9] and independent[0.5] != independent[0.9]


def test_hypotheses_are_normalised_before_scoring(tiny_model, monkeypatch):
    """Stray and doubled spaces in the decoder output are not counted as character errors."""
    monkeypatch.setattr(BuiltinAdapter, "decode", lambda self, batch: ["  call   sarah "] * len(batch))
    rep = run(tiny_model.bundle, MANIFEST, "0", details=True)
    entry = rep.levels[0]
    assert [u.hypotheses["0"] for u in rep.utterances] == ["call sarah"] * 8
    assert entry.chars == char_errors(REFERENCES, ["call sarah"] * 8)
    assert entry.words == word_errors(REFERENCES, ["call sarah"] * 8)


def test_level_selection(tiny_model):
    rep = run(tiny_model.bundle, MANIFEST, "0.9, 0,90%")
    assert [e.level for e in rep.levels] == [0.9, 0.0]
    with pytest.raises(UsageError, match=r"level 0.95 is outside \[0, 0.9\]"):
        run(tiny_model.bundle, MANIFEST, "0.95")
    with pytest.raises(UsageError, match="--batch-frames"):
        run(tiny_model.bundle, MANIFEST, "0.5", batch_frames=0)
    with pytest.raises(UsageError, match="--repeats must be at least 1"):
        run(tiny_model.bundle, MANIFEST, "0.5", repeats=0)


def test_batch_size_does_not_change_the_result(tiny_model, report):
    one_by_one = run(tiny_model.bundle, MANIFEST, "all", batch_frames=1)
    assert scores(one_by_one) == scores(report)


def test_plain_checkpoint_is_one_dense_level(tiny_model, report):
    rep = run(tiny_model.checkpoint, MANIFEST)
    assert rep.model.kind == "checkpoint"
    assert [e.level for e in rep.levels] == [0.0]
    # same weights as the bundle's dense level
    assert scores(rep) == scores(report)[:1]
    with pytest.raises(UsageError, match="level 0.5"):
        run(tiny_model.checkpoint, MANIFEST, "0.5")


@pytest.mark.parametrize("data", [KALDI, AUDIOFOLDER, DATA / "audiofolder_jsonl"], ids=["kaldi", "csv", "jsonl"])
def test_every_manifest_format_gives_the_same_numbers(tiny_model, report, data):
    rep = run(tiny_model.bundle, data, "all", details=True)
    assert scores(rep) == scores(report)
    assert [u.hypotheses for u in rep.utterances] == [u.hypotheses for u in report.utterances]
    assert [u.reference for u in rep.utterances] == REFERENCES


# ------------------------------------------------------------------------------------------------ gates


def test_gate_passes(tiny_model, tmp_path, capsys):
    out = tmp_path / "r.json"
    code, stdout, err = run_cli(capsys, "evaluate", tiny_model.bundle, "--data", MANIFEST, "--max-wer", "0.9:1000",
                                "--json", out)
    assert code == 0, err
    rep = json.loads(out.read_text())
    value = pytest.approx(100 * by_level(EvaluationReport.from_dict(rep))[0.9].wer, abs=1e-3)
    assert rep["gates"] == [{"gate": "max-wer", "level": 0.9, "value": value, "limit": 1000.0, "passed": True}]
    assert "WER %" in stdout  # the table


def test_gate_fails_with_exit_3_and_reports_are_still_written(tiny_model, report, tmp_path, capsys):
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    code, _, err = run_cli(capsys, "evaluate", tiny_model.bundle, "--data", MANIFEST, "--max-wer", "0.9:0",
                           "--json", out, "--markdown", md)
    assert code == 3
    line = assert_one_error_line(err)
    wer = 100 * by_level(report)[0.9].wer
    assert wer > 0
    assert "level 0.9" in line
    assert f"{wer:.2f} %" in line
    assert "limit 0 %" in line
    rep = json.loads(out.read_text())
    assert rep["gates"][0]["passed"] is False
    assert scores(rep) == scores(report)
    text = md.read_text()
    assert "**FAIL**" in text
    assert f"| 0.9 | {wer:.2f} |" in text


def test_max_wer_increase(tiny_model, report, tmp_path, capsys):
    levels = by_level(report)
    increase = 100 * (levels[0.5].wer - levels[0.0].wer)
    out = tmp_path / "r.json"
    args = ["evaluate", tiny_model.bundle, "--data", MANIFEST, "--levels", "0,0.5", "--json", out]
    code, _, err = run_cli(capsys, *args, "--max-wer-increase", "0.5:-1000")
    assert code == 3
    line = assert_one_error_line(err)
    assert "WER increase over dense at level 0.5" in line
    assert f"{increase:.2f} %" in line
    code, _, err = run_cli(capsys, *args, "--max-wer-increase", f"0.5:{increase + 0.01}")
    assert code == 0, err
    gate = json.loads(out.read_text())["gates"][0]
    assert gate["value"] == pytest.approx(increase, abs=1e-3)
    if increase > 0.01:
        code, _, _ = run_cli(capsys, *args, "--max-wer-increase", f"0.5:{increase - 0.01}")
        assert code == 3


@pytest.mark.parametrize("gate", [["--max-wer", "0.9"], ["--max-wer", "0.9:lots"], ["--max-wer-increase", "0.5"],
                                  ["--max-wer", "1.5:10"]])
def test_malformed_gate_is_a_usage_error(tiny_model, tmp_path, capsys, gate):
    out = tmp_path / "r.json"
    code, _, err = run_cli(capsys, "evaluate", tiny_model.bundle, "--data", MANIFEST, *gate, "--json", out)
    assert code == 2
    assert_one_error_line(err)
    assert not out.exists()


def test_gate_on_a_level_not_evaluated_is_a_usage_error(tiny_model, capsys):
    code, _, err = run_cli(capsys, "evaluate", tiny_model.bundle, "--data", MANIFEST, "--levels", "0.9",
                           "--max-wer", "0.5:50")
    assert code == 2
    assert "0.5" in assert_one_error_line(err)
    code, _, err = run_cli(capsys, "evaluate", tiny_model.bundle, "--data", MANIFEST, "--levels", "0.9",
                           "--max-wer-increase", "0.9:50")
    assert code == 2
    assert "dense" in assert_one_error_line(err)


def test_json_to_stdout(tiny_model, report, capsys):
    code, stdout, err = run_cli(capsys, "evaluate", tiny_model.bundle, "--data", MANIFEST, "--json", "-")
    assert code == 0, err
    rep = json.loads(stdout)
    assert scores(rep) == scores(report)
    assert rep["gates"] == []


def test_json_to_stdout_stays_valid_with_long_lines(tiny_model, tmp_path, capsys):
    """Long paths must not be wrapped (a newline inside a JSON string is invalid)."""
    deep = tmp_path / ("d" * 150)
    deep.mkdir()
    manifest = copy_manifest(deep, keep=2)
    code, stdout, err = run_cli(capsys, "evaluate", tiny_model.bundle, "--data", manifest, "--levels", "0",
                                "--json", "-")
    assert code == 0, err
    assert json.loads(stdout)["data"]["path"] == str(manifest)


# -------------------------------------------------------------------------------------------- bad input


def _bad_utterance(kind: str, directory: Path) -> dict:
    """A manifest entry that cannot be used, with id ``bad``."""
    if kind == "missing":
        return {"audio_filepath": str(directory / "nope.flac"), "text": "call emma", "id": "bad"}
    if kind == "corrupt":
        return {"audio_filepath": str(write_random_bytes(directory / "noise.flac")), "text": "call emma", "id": "bad"}
    if kind == "empty":
        return {"audio_filepath": str(write_zero_length_wav(directory / "empty.wav")), "text": "call emma",
                "id": "bad"}
    if kind in ("umlaut", "digits"):
        text = "call jürgen" if kind == "umlaut" else "call 911"
        return {"audio_filepath": str(audio_files()[0]), "text": text, "id": "bad"}
    raise AssertionError(kind)


BAD_UTTERANCES = {"missing": "nope.flac", "corrupt": "noise.flac", "empty": "empty.wav", "umlaut": "vocabulary",
                  "digits": "vocabulary"}


@pytest.mark.parametrize("kind", sorted(BAD_UTTERANCES))
def test_bad_utterance_fails(tiny_model, tmp_path, capsys, kind):
    manifest = copy_manifest(tmp_path, extra=[_bad_utterance(kind, tmp_path)])
    out = tmp_path / "r.json"
    code, _, err = run_cli(capsys, "evaluate", tiny_model.bundle, "--data", manifest, "--json", out)
    assert code == 1
    line = assert_one_error_line(err)
    assert BAD_UTTERANCES[kind] in line
    assert "bad" in line  # the utterance id
    assert not out.exists()


@pytest.mark.parametrize("kind", sorted(BAD_UTTERANCES))
def test_bad_utterance_is_skipped_with_skip_bad(tiny_model, report, tmp_path, capsys, kind):
    manifest = copy_manifest(tmp_path, extra=[_bad_utterance(kind, tmp_path)])
    out = tmp_path / "r.json"
    code, _, err = run_cli(capsys, "evaluate", tiny_model.bundle, "--data", manifest, "--json", out, "--skip-bad")
    assert code == 0, err
    rep = json.loads(out.read_text())
    assert [set(s) for s in rep["skipped"]] == [{"id", "reason"}]
    assert [s["id"] for s in rep["skipped"]] == ["bad"]
    assert BAD_UTTERANCES[kind] in rep["skipped"][0]["reason"]
    assert rep["data"]["utterances"] == 9
    for entry in rep["levels"]:
        assert entry["utterances_skipped"] == 1
        assert entry["utterances_scored"] == 8
    # the eight good utterances score exactly as without the bad one
    assert scores(rep) == scores(report)
    assert "bad" in err  # the note on stderr names the skipped utterance


def test_several_bad_utterances_are_all_listed(tiny_model, tmp_path):
    extra = []
    for kind in ("missing", "corrupt", "digits"):
        entry = _bad_utterance(kind, tmp_path)
        entry["id"] = f"bad-{kind}"
        extra.append(entry)
    manifest = copy_manifest(tmp_path, extra=extra, keep=3)
    rep = run(tiny_model.bundle, manifest, "0", skip_bad=True)
    assert [s.id for s in rep.skipped] == ["bad-missing", "bad-corrupt", "bad-digits"]
    assert rep.levels[0].utterances_scored == 3
    assert rep.levels[0].utterances_skipped == 3


def test_only_bad_utterances_fail_even_with_skip_bad(tiny_model, tmp_path, capsys):
    manifest = copy_manifest(tmp_path, extra=[_bad_utterance("missing", tmp_path)], keep=0)
    code, _, err = run_cli(capsys, "evaluate", tiny_model.bundle, "--data", manifest, "--skip-bad")
    assert code == 1
    assert "no utterance" in assert_one_error_line(err)


def test_transcripts_without_words_fail(tiny_model, tmp_path, capsys):
    """WER is undefined without reference words; the report must not hold Infinity (not valid JSON)."""
    manifest = tmp_path / "silence.jsonl"
    manifest.write_text("".join(json.dumps({"audio_filepath": str(p), "text": t}) + "\n"
                                for p, t in zip(audio_files()[:2], ["", " ... "])))
    out = tmp_path / "r.json"
    code, _, err = run_cli(capsys, "evaluate", tiny_model.bundle, "--data", manifest, "--json", out)
    assert code == 1
    assert "no words" in assert_one_error_line(err)
    assert not out.exists()


def _manifest_text(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "m.jsonl"
    path.write_text(text, encoding="utf-8")
    return path


def test_manifest_line_that_is_not_json(tiny_model, tmp_path, capsys):
    good = json.dumps({"audio_filepath": str(audio_files()[0]), "text": "call liam"})
    manifest = _manifest_text(tmp_path, f"{good}\n{{not json\n")
    out = tmp_path / "r.json"
    for extra in ([], ["--skip-bad"]):
        code, _, err = run_cli(capsys, "evaluate", tiny_model.bundle, "--data", manifest, "--json", out, *extra)
        assert code == 1
        assert f"{manifest}:2" in assert_one_error_line(err)
        assert not out.exists()


def test_manifest_line_without_text(tiny_model, tmp_path, capsys):
    manifest = _manifest_text(tmp_path, json.dumps({"audio_filepath": str(audio_files()[0])}) + "\n")
    code, _, err = run_cli(capsys, "evaluate", tiny_model.bundle, "--data", manifest)
    assert code == 1
    line = assert_one_error_line(err)
    assert f"{manifest}:1" in line
    assert "text" in line


def test_empty_manifest(tiny_model, tmp_path, capsys):
    manifest = _manifest_text(tmp_path, "")
    out = tmp_path / "r.json"
    code, _, err = run_cli(capsys, "evaluate", tiny_model.bundle, "--data", manifest, "--json", out)
    assert code == 1
    assert "no utterances" in assert_one_error_line(err)
    assert not out.exists()


def test_missing_model_and_manifest(tiny_model, tmp_path, capsys):
    code, _, err = run_cli(capsys, "evaluate", tmp_path / "nope.safetensors", "--data", MANIFEST)
    assert code == 1
    assert "does not exist" in assert_one_error_line(err)
    code, _, err = run_cli(capsys, "evaluate", tiny_model.bundle, "--data", tmp_path / "nope.jsonl")
    assert code == 1
    assert "not found" in assert_one_error_line(err)


def test_bundle_without_model_metadata(tiny_model, tmp_path, capsys):
    """A bundle pruned from a plain state dict holds no model description: it cannot be evaluated."""
    with safe_open(str(tiny_model.checkpoint), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    plain = tmp_path / "plain.safetensors"
    save_file(tensors, str(plain))
    bundle = tmp_path / "anonymous.safetensors"
    prune_checkpoint(plain, bundle, PruneOptions([0.5]))
    out = tmp_path / "r.json"
    code, _, err = run_cli(capsys, "evaluate", bundle, "--data", MANIFEST, "--json", out)
    assert code == 1
    assert "no model description" in assert_one_error_line(err)
    assert not out.exists()


def test_bundle_whose_model_metadata_does_not_match_its_tensors(tiny_model, tmp_path, capsys):
    with safe_open(str(tiny_model.bundle), framework="pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    model = json.loads(metadata["model"])
    assert model["config"]["d_model"] == 32
    model["config"]["d_model"] = 48
    metadata["model"] = json.dumps(model)
    del metadata["dsnn_checksums"]  # edited, without checksums (as older dsnn wrote): the model check catches it
    forged = tmp_path / "forged.safetensors"
    save_file(tensors, str(forged), metadata=metadata)
    assert load_bundle(forged).metadata["model"]["config"]["d_model"] == 48  # still a valid bundle
    out = tmp_path / "r.json"
    code, _, err = run_cli(capsys, "evaluate", forged, "--data", MANIFEST, "--json", out)
    assert code == 1
    assert "does not match" in assert_one_error_line(err)
    assert not out.exists()
    with pytest.raises(DsnnError, match="does not match"):
        run(forged, MANIFEST)
