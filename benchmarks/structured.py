"""Structured vs unstructured levels of the embedded conformer: speed, size, switching and WER.

For levels 0.5/0.7/0.9 it prunes the embedded dense model twice (``--granularity weight`` and ``structured``),
then, in one process with one thread:

* RTFx of every level in PyTorch eager (weight levels: the zero-masked full-size model, which is what runs today;
  structured levels: the physically smaller exported checkpoint) and in ONNX Runtime (the exported ``.onnx``),
  timed interleaved (every repetition runs every model once) on the first ``--utterances`` test utterances'
  features (feature extraction excluded, the same for all); min and median over repetitions;
* exported file sizes (checkpoint and ONNX) and parameter counts;
* switch time: ``set_level`` in place (weight bundle), ``set_level`` as views (structured bundle), loading the
  exported checkpoint of the level;
* WER on the test utterances per level and granularity (``--finetune-steps N`` first jointly fine-tunes each bundle
  for N steps with the default recipe; 0 = one-shot);
* a plot of WER against measured eager RTFx (``--plot``).

Usage: ``python benchmarks/structured.py --out benchmarks/results/structured.json [--plot structured.png]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import Interference, machine_env  # noqa: E402

from dsnn_compress.core.bundle import load_bundle  # noqa: E402
from dsnn_compress.data.audio import load_audio  # noqa: E402
from dsnn_compress.data.batch import pad_batch  # noqa: E402
from dsnn_compress.data.manifest import read_manifest  # noqa: E402
from dsnn_compress.evaluation.evaluate import EvaluateOptions, evaluate  # noqa: E402
from dsnn_compress.export.formats import export_level  # noqa: E402
from dsnn_compress.prune import PruneOptions, prune_checkpoint  # noqa: E402
from dsnn_compress.runtime.runnable import load_model  # noqa: E402
from dsnn_compress.sources.opener import load_checkpoint_adapter  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DENSE = ROOT / "src" / "dsnn_compress" / "assets" / "demo" / "model.safetensors"
CORPUS = Path("/work/shared/corpus/tts-en-v1")
LEVELS = (0.5, 0.7, 0.9)


def _features(adapter, manifest: Path, count: int):  # noqa: ANN001, ANN202
    utterances = read_manifest(manifest)[:count]
    inputs = [adapter.prepare(load_audio(u.audio_path, adapter.sample_rate)) for u in utterances]
    batch = pad_batch(inputs, [[] for _ in inputs], ["" for _ in inputs], [u.id for u in utterances])
    return batch.inputs, batch.input_lengths, float(sum(u.duration or 0.0 for u in utterances))


def _finetune(bundle: Path, steps: int, work: Path) -> Path:
    from dsnn_compress.training.recipe import apply_overrides, load_recipe
    from dsnn_compress.training.trainer import finetune

    out = work / f"{bundle.stem}-ft.safetensors"
    recipe = apply_overrides(load_recipe(ROOT / "recipes" / "dsnn-conformer.yaml"), {
        "model.init": str(bundle), "data.train": str(CORPUS / "train.jsonl"), "data.dev": str(CORPUS / "dev.jsonl"),
        "output": str(out), "training.steps": steps, "training.keep": "last", "levels": None,
        "data.max_dev_utterances": 20})
    return finetune(recipe).output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--utterances", type=int, default=40)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--finetune-steps", type=int, default=0)
    parser.add_argument("--wer-utterances", type=int, default=300)
    parser.add_argument("--work", type=Path, help="Work directory; bundles and exports already there are reused.")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    work = args.work or Path(tempfile.mkdtemp(prefix="dsnn-structured-"))
    work.mkdir(parents=True, exist_ok=True)
    bundles = {}
    for granularity in ("weight", "structured"):
        path = work / f"{granularity}.safetensors"
        if not path.exists():
            prune_checkpoint(DENSE, path, PruneOptions(LEVELS, granularity=granularity))
        if args.finetune_steps:
            path = _finetune(path, args.finetune_steps, work)
        bundles[granularity] = path
    test = work / "test.jsonl"
    test.write_text("".join(
        json.dumps({**json.loads(line), "audio_filepath": str(CORPUS / json.loads(line)["audio_filepath"])}) + "\n"
        for line in (CORPUS / "test.jsonl").read_text().splitlines()[: args.wer_utterances]))

    runs: dict[str, dict] = {}
    weight_model = load_model(bundles["weight"])
    features, lengths, seconds = _features(weight_model.adapter, test, args.utterances)
    for granularity, path in bundles.items():
        bundle = load_bundle(path)
        for level in (0.0, *LEVELS):
            if granularity == "weight" and level == 0.0:
                continue
            key = "dense" if level == 0.0 else f"{granularity}-{level:g}"
            ckpt, onnx = work / f"{key}.safetensors", work / f"{key}.onnx"
            if not (ckpt.exists() and onnx.exists()):  # deterministic: reuse an earlier run's exports
                export_level(bundle, level, ckpt, "checkpoint")
                export_level(bundle, level, onnx)
            print(f"exported {key}", flush=True)
            adapter = load_checkpoint_adapter(ckpt)
            runs[key] = {"granularity": "dense" if level == 0.0 else granularity, "level": level,
                         "model": adapter.model.eval(), "session": ort.InferenceSession(str(onnx), options),
                         "params": sum(p.numel() for p in adapter.model.parameters()),
                         "nonzero_params": sum(int((p != 0).sum()) for p in adapter.model.parameters()),
                         "checkpoint_bytes": ckpt.stat().st_size, "onnx_bytes": onnx.stat().st_size,
                         "eager": [], "ort": []}
    feeds = {"features": features.numpy(), "lengths": lengths.numpy()}
    probe = Interference().start()
    with torch.inference_mode():
        for run in runs.values():  # warm-up
            run["model"](features, lengths)
            run["session"].run(None, feeds)
        for _ in range(args.reps):
            for run in runs.values():
                start = time.perf_counter()
                run["model"](features, lengths)
                run["eager"].append(time.perf_counter() - start)
                start = time.perf_counter()
                run["session"].run(None, feeds)
                run["ort"].append(time.perf_counter() - start)
    interference = probe.stop()
    print("timed", flush=True)

    switch = {"weight_in_place": [], "structured_views": [], "load_exported_checkpoint": []}
    views = load_model(bundles["structured"])
    for _ in range(args.reps):
        for level in LEVELS:
            for name, action in (("weight_in_place", lambda lv=level: weight_model.set_level(lv)),
                                 ("structured_views", lambda lv=level: views.set_level(lv)),
                                 ("load_exported_checkpoint",
                                  lambda lv=level: load_checkpoint_adapter(work / f"structured-{lv:g}.safetensors"))):
                start = time.perf_counter()
                action()
                switch[name].append(time.perf_counter() - start)

    wer = {}
    for granularity, path in bundles.items():
        report = evaluate(path, test, EvaluateOptions(compact=granularity == "structured", repeats=1))  # WER only
        for entry in report.levels:
            key = "dense" if entry.level == 0.0 else f"{granularity}-{entry.level:g}"
            wer[key] = entry.wer

    results = []
    dense = runs["dense"]
    for key, run in runs.items():
        eager, onnx_times = min(run["eager"]), min(run["ort"])
        results.append({
            "run": key, "granularity": run["granularity"], "level": run["level"], "params": run["params"],
            "nonzero_params": run["nonzero_params"], "checkpoint_bytes": run["checkpoint_bytes"],
            "onnx_bytes": run["onnx_bytes"], "wer": wer.get(key),
            "eager_rtfx_min_time": round(seconds / eager, 1),
            "eager_rtfx_median": round(seconds / statistics.median(run["eager"]), 1),
            "eager_speedup": round(min(dense["eager"]) / eager, 2),
            "ort_rtfx_min_time": round(seconds / onnx_times, 1),
            "ort_speedup": round(min(dense["ort"]) / onnx_times, 2),
        })
    summary = {
        "machine": machine_env(), "foreign_cpu_load": round(interference, 2), "threads": 1,
        "timed_audio_seconds": round(seconds, 1), "timed_utterances": args.utterances, "reps": args.reps,
        "finetune_steps": args.finetune_steps, "wer_utterances": args.wer_utterances,
        "switch_ms": {k: {"min": round(1000 * min(v), 3), "median": round(1000 * statistics.median(v), 3)}
                      for k, v in switch.items()},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    for row in results:
        print(json.dumps(row))
    print(json.dumps(summary["switch_ms"]), f"foreign load {interference:.2f}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for granularity, marker in (("weight", "o"), ("structured", "s")):
            points = [r for r in results if r["granularity"] in (granularity, "dense")]
            points.sort(key=lambda r: r["eager_rtfx_min_time"])
            ax.plot([r["eager_rtfx_min_time"] for r in points], [100 * r["wer"] for r in points], marker=marker,
                    label=granularity)
        ax.set_xlabel("RTFx, PyTorch eager, 1 thread (higher is faster)")
        ax.set_ylabel("test WER %")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
