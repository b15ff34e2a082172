"""Label-free DSNN fine-tuning from a frozen teacher (``distillation.teacher``, ``dsnn finetune --teacher``).

Oracles: the teacher's pseudo-labels against transformers' own ``generate`` on the teacher directory; the first
step's losses against what they must be when the student starts as a copy of the teacher (the KL term is exactly 0,
so a Whisper student's dense loss is the teacher's cross-entropy on its own greedy tokens and a CTC student's is 0).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from asr_fixtures import MANIFEST, TinyModel
from helpers import assert_usage_error, run_cli
from whisper_fixtures import build_whisper_dir

from dsnn_compress.core.bundle import load_bundle
from dsnn_compress.data.audio import load_audio
from dsnn_compress.data.batch import pad_batch
from dsnn_compress.data.manifest import read_manifest
from dsnn_compress.models.whisper.adapter import token_bound
from dsnn_compress.sources.opener import open_source
from dsnn_compress.training.teacher import Teacher

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")
SHORT = 6  # clips used: the manifest's first six (all under 2 s)


def audio_only(path: Path, keep: int = SHORT) -> Path:
    rows = [json.loads(line) for line in MANIFEST.read_text().splitlines()][:keep]
    path.write_text("".join(json.dumps({"audio_filepath": str(MANIFEST.parent / r["audio_filepath"]),
                                        "duration": r["duration"]}) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def whisper(tmp_path_factory) -> SimpleNamespace:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("teacher")
    directory = build_whisper_dir(root / "en")
    bundle = root / "b.safetensors"
    from dsnn_compress.cli import main

    assert main(["prune", str(directory), "--levels", "0.5", "-o", str(bundle)]) == 0
    return SimpleNamespace(root=root, directory=directory, bundle=bundle, audio=audio_only(root / "audio.jsonl"))


def log_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_pseudo_labels_equal_the_teachers_own_generate(whisper):
    adapter = open_source(whisper.directory).adapter()
    teacher = Teacher(whisper.directory, adapter, torch.device("cpu"))
    utterances = read_manifest(whisper.audio, require_text=False)
    waves = [load_audio(u.audio_path, 16000) for u in utterances]
    batch = pad_batch([adapter.prepare(w) for w in waves], [[] for _ in waves], ["" for _ in waves],
                      [u.id for u in utterances])
    labelled = teacher.labelled(batch)

    model = transformers.WhisperForConditionalGeneration.from_pretrained(str(whisper.directory), local_files_only=True)
    processor = transformers.WhisperProcessor.from_pretrained(str(whisper.directory), local_files_only=True)
    eot = processor.tokenizer.eos_token_id
    for i, wave in enumerate(waves):  # each clip decoded alone by transformers, bounded like every dsnn decode
        features = processor(wave, sampling_rate=16000, return_tensors="pt").input_features
        with torch.no_grad():
            row = model.generate(input_features=features, max_new_tokens=token_bound(len(wave) / 16000),
                                 return_timestamps=False)[0].tolist()
        tokens = row[: row.index(eot)] if eot in row else row  # generate returns the new tokens only
        length = int(labelled.target_lengths[i])
        assert labelled.targets[i, :length].tolist() == tokens[: token_bound(len(wave) / 16000)], utterances[i].id
    # decoded once per utterance: a second call reuses them (generate is not run again)
    teacher.adapter.greedy_tokens = None  # type: ignore[assignment]
    again = teacher.labelled(batch)
    assert torch.equal(again.targets, labelled.targets)


def test_label_free_whisper_finetune_learns_the_teachers_transcripts(whisper, tmp_path, capsys):
    out = tmp_path / "lf.safetensors"
    code, _, err = run_cli(capsys, "finetune", whisper.bundle, "--data", whisper.audio, "--teacher", whisper.directory,
                           "--steps", "1", "-o", out, "--set", f"data.max_batch_size={SHORT}", "--set",
                           "data.batch_frames=100000000", "--set", "training.log_every=1", "--lr", "1e-9")
    assert code == 0, err
    step = next(r for r in log_records(out.with_suffix("").with_suffix(".log.jsonl")) if r["event"] == "step")
    # the dense student is the teacher: KL = 0, so its loss is the teacher's cross-entropy on its own greedy tokens
    adapter = open_source(whisper.directory).adapter()
    utterances = read_manifest(whisper.audio, require_text=False)
    waves = [load_audio(u.audio_path, 16000) for u in utterances]
    batch = pad_batch([adapter.prepare(w) for w in waves], [[] for _ in waves], ["" for _ in waves],
                      [u.id for u in utterances])
    with torch.no_grad():
        expected = float(adapter.loss(batch.with_targets(adapter.greedy_tokens(batch))))
    assert step["loss"]["dense"] == pytest.approx(expected, rel=1e-4)
    assert step["loss"]["0.5"] > step["loss"]["dense"]
    meta = load_bundle(out).metadata
    assert meta["recipe"]["distillation"]["teacher"] == str(whisper.directory.absolute())


def test_a_manifest_without_text_needs_a_teacher(whisper, tmp_path, capsys):
    out = tmp_path / "plain.safetensors"
    result = run_cli(capsys, "finetune", whisper.bundle, "--data", whisper.audio, "--steps", "1", "-o", out)
    assert_usage_error(result, f"{SHORT} of {SHORT} utterances", "no transcript", "--teacher SOURCE")
    assert result.out == "" and not out.exists() and not list(tmp_path.iterdir())
    result = run_cli(capsys, "finetune", whisper.bundle, "--data", whisper.audio, "--teacher", whisper.directory,
                     "--set", "distillation.labels=transcripts", "--steps", "1", "-o", out)
    assert_usage_error(result, "distillation.labels is transcripts")
    result = run_cli(capsys, "finetune", whisper.bundle, "--data", MANIFEST, "--set", "distillation.labels=teacher",
                     "--steps", "1", "-o", out)
    assert_usage_error(result, "distillation.labels: teacher", "distillation.teacher is not set")
    assert not list(tmp_path.iterdir())


def test_a_teacher_of_another_family_is_refused(whisper, tiny_model: TinyModel, tmp_path, capsys):
    result = run_cli(capsys, "finetune", tiny_model.bundle, "--data", MANIFEST, "--teacher", whisper.directory,
                     "--steps", "1", "-o", tmp_path / "x.safetensors")
    assert_usage_error(result, "the teacher is a whisper model but the student a conformer-ctc one")
    assert not list(tmp_path.iterdir())


def test_label_free_ctc_student_learns_the_teachers_posteriors_only(tiny_model: TinyModel, tmp_path, capsys):
    out = tmp_path / "ctc.safetensors"
    code, _, err = run_cli(capsys, "finetune", tiny_model.bundle, "--data", audio_only(tmp_path / "a.jsonl", 8),
                           "--teacher", tiny_model.checkpoint, "--steps", "2", "-o", out, "--set",
                           "training.log_every=1", "--set", "data.batch_frames=100000000", "--lr", "1e-3")
    assert code == 0, err
    steps = [r for r in log_records(out.with_suffix("").with_suffix(".log.jsonl")) if r["event"] == "step"]
    # step 1: the dense student equals the teacher (dropout 0): KL 0 and no label loss; sparse levels differ
    assert steps[0]["loss"]["dense"] == pytest.approx(0.0, abs=1e-6)
    assert steps[0]["loss"]["0.5"] > 1e-4 and steps[0]["loss"]["0.9"] > steps[0]["loss"]["0.5"]
    # the sparse levels moved the shared weights, so at step 2 the dense level no longer equals the teacher
    assert steps[1]["loss"]["dense"] > 0


def test_mixed_labels_add_the_teacher_term_to_the_labelled_loss(tiny_model: TinyModel, tmp_path, capsys):
    common = ["--data", MANIFEST, "--steps", "1", "--set", "training.log_every=1", "--set",
              "data.batch_frames=100000000", "--set", "data.spec_augment=false", "--lr", "1e-9"]
    plain, mixed = tmp_path / "plain.safetensors", tmp_path / "mixed.safetensors"
    assert run_cli(capsys, "finetune", tiny_model.bundle, *common, "-o", plain).code == 0
    code, _, err = run_cli(capsys, "finetune", tiny_model.bundle, *common, "-o", mixed, "--teacher",
                           tiny_model.checkpoint, "--set", "distillation.labels=transcripts")
    assert code == 0, err

    def first(path: Path) -> dict:
        return next(r for r in log_records(path.with_suffix("").with_suffix(".log.jsonl")) if r["event"] == "step")

    # dense: KL(teacher || dense) is 0, so the mixed loss is the labelled loss; sparse levels add a positive KL
    assert first(mixed)["loss"]["dense"] == pytest.approx(first(plain)["loss"]["dense"], rel=1e-5)
    assert first(mixed)["loss"]["0.9"] > first(plain)["loss"]["0.9"]
