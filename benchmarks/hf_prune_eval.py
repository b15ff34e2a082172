"""Benchmark: ``dsnn prune`` + ``dsnn evaluate`` on a wav2vec2-base-sized Hugging Face CTC model.

A benchmark, not a timed test. It builds a *random* ``Wav2Vec2ForCTC`` of wav2vec2-base size from its config
(hidden 768, 12 layers, 12 heads, intermediate 3072, the default 7-layer convolutional feature encoder; about 94M
parameters, 32-symbol character vocabulary), saves it with ``save_pretrained`` together with a
``Wav2Vec2CTCTokenizer`` and a ``Wav2Vec2FeatureExtractor`` in a temporary directory (nothing is downloaded), then
measures, each in a fresh subprocess so that the peak RSS belongs to that measurement alone:

* ``prune``: ``open_source`` (read the directory, sha256) + ``build_bundle`` (build the ``hf-ctc`` adapter from the
  config and load the weights strictly for the default prunable set, then rank once for every level) +
  ``save_bundle`` (pack codes, write, fsync);
* ``evaluate``: ``evaluate(bundle, manifest, levels="all")`` - rebuild the model from the bundle, load and resample
  the audio, one warm-up batch, then greedy decoding of every utterance at every level (dense included).

Times are measured inside the child: interpreter start and the import of the ``transformers`` model classes are
excluded and reported on their own (``process`` is the child's whole wall time). The WER of a random model is
meaningless and not reported. The machine may be shared: each measurement first waits (``--idle-wait``) for other
processes to go quiet and reports the CPU share they used meanwhile ("other load"); runs above 10 % are flagged.

Examples::

    python benchmarks/hf_prune_eval.py                         # levels 0.5,0.7,0.9 on tests/data/manifest.jsonl
    python benchmarks/hf_prune_eval.py --json hf.json --idle-wait 600
    python benchmarks/hf_prune_eval.py --hidden 64 --layers 2 --heads 2 --intermediate 128 --idle-wait 0  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import Interference, wait_for_idle  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT / "tests" / "data" / "manifest.jsonl"
VOCAB = ["<pad>", "<s>", "</s>", "<unk>", "|", *"ETAONIHSRDLUMWCFGYPBVK'XJQZ"]  # 32 symbols, like base-960h


# ----------------------------------------------------------------------------------------------------------------
# Interference from other processes (the machine may be shared)
# ----------------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------


def build_model_dir(directory: Path, hidden: int, layers: int, heads: int, intermediate: int, seed: int) -> int:
    """Save a random wav2vec2 CTC model (with tokenizer and feature extractor) to ``directory``; return params."""
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

    torch.manual_seed(seed)
    config = Wav2Vec2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=intermediate, vocab_size=len(VOCAB), pad_token_id=0,
                            architectures=["Wav2Vec2ForCTC"])
    model = Wav2Vec2ForCTC(config)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.5)  # an informative random head: hypotheses are not all empty
    model.save_pretrained(str(directory))
    vocab_file = directory / "vocab.json"
    vocab_file.write_text(json.dumps({token: i for i, token in enumerate(VOCAB)}))
    Wav2Vec2CTCTokenizer(str(vocab_file), unk_token="<unk>", pad_token="<pad>",
                         word_delimiter_token="|").save_pretrained(str(directory))
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=False).save_pretrained(str(directory))
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------------
# Child processes (one measurement each)
# ----------------------------------------------------------------------------------------------------------------


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child_prune(model_dir: Path, bundle: Path, levels: list[float]) -> dict[str, Any]:
    from dsnn_compress.core.bundle import save_bundle
    from dsnn_compress.prune import PruneOptions, build_bundle
    from dsnn_compress.sources.opener import open_source

    start = time.perf_counter()
    from transformers import Wav2Vec2CTCTokenizer, Wav2Vec2ForCTC  # noqa: F401 - timed on its own (lazy modules)

    t_import = time.perf_counter() - start
    t0 = time.perf_counter()
    source = open_source(model_dir)
    _ = source.sha256  # what prune records (the old load_source hashed eagerly)
    t1 = time.perf_counter()
    result = build_bundle(source, PruneOptions(levels))
    t2 = time.perf_counter()
    save_bundle(result, bundle)
    t3 = time.perf_counter()
    summary = result.summary()
    return {"import_transformers_s": t_import, "load_s": t1 - t0, "select_rank_s": t2 - t1, "write_s": t3 - t2,
            "total_s": t3 - t0, "pruned_tensors": len(result.codes), "prunable_params": summary["prunable_params"],
            "total_params": summary["total_params"], "bundle_bytes": bundle.stat().st_size,
            "peak_rss_bytes": _peak_rss()}


def child_evaluate(bundle: Path, data: Path) -> dict[str, Any]:
    from dsnn_compress.evaluation.evaluate import EvaluateOptions, evaluate

    start = time.perf_counter()
    from transformers import Wav2Vec2CTCTokenizer, Wav2Vec2ForCTC  # noqa: F401

    t_import = time.perf_counter() - start
    t0 = time.perf_counter()
    report = evaluate(bundle, data, EvaluateOptions(levels="all", repeats=1))  # one pass: the cost of one evaluation
    total = time.perf_counter() - t0
    levels = [{k: entry.to_dict()[k] for k in ("level", "processing_seconds", "rtfx", "audio_seconds",
                                                "nonzero_params", "utterances_scored")} for entry in report.levels]
    return {"import_transformers_s": t_import, "total_s": total, "levels": levels, "threads": report.threads,
            "peak_rss_bytes": _peak_rss()}


def run_child(args: list[str], idle_wait: float) -> dict[str, Any]:
    wait_for_idle(idle_wait)
    probe = Interference().start()
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    wall = time.perf_counter() - started
    other = probe.stop()
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"child {args[:2]} failed with exit code {proc.returncode}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update({"process_wall_s": wall, "other_load": other})
    return result


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def _tag(level: float) -> str:
    return "dense" if level == 0 else f"{level:g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default="0.5,0.7,0.9")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="evaluation manifest")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--intermediate", type=int, default=3072)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--idle-wait", type=float, default=300.0, help="max seconds to wait for an idle machine")
    parser.add_argument("--workdir", type=Path, default=None, help="where the temporary directory goes")
    parser.add_argument("--json", type=Path, default=None, help="write every number here")
    parser.add_argument("--child", choices=["prune", "evaluate"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--bundle", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    levels = [float(v) for v in args.levels.split(",") if v.strip()]

    if args.child == "prune":
        print(json.dumps(child_prune(args.model_dir, args.bundle, levels)))
        return 0
    if args.child == "evaluate":
        print(json.dumps(child_evaluate(args.bundle, args.data)))
        return 0

    import torch

    work = Path(tempfile.mkdtemp(prefix="dsnn-hf-bench-", dir=args.workdir))
    try:
        model_dir, bundle = work / "wav2vec2-random", work / "bundle.safetensors"
        print(f"building a random Wav2Vec2ForCTC (hidden {args.hidden}, {args.layers} layers) in {model_dir}",
              file=sys.stderr)
        params = build_model_dir(model_dir, args.hidden, args.layers, args.heads, args.intermediate, args.seed)
        common = ["--levels", args.levels, "--data", str(args.data), "--model-dir", str(model_dir),
                  "--bundle", str(bundle)]
        print("measuring prune ...", file=sys.stderr)
        prune = run_child(["--child", "prune", *common], args.idle_wait)
        print("measuring evaluate ...", file=sys.stderr)
        evaluation = run_child(["--child", "evaluate", *common], args.idle_wait)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    import transformers

    result = {
        "model": {"architecture": "Wav2Vec2ForCTC", "params": params, "hidden": args.hidden, "layers": args.layers,
                  "heads": args.heads, "intermediate": args.intermediate, "vocab": len(VOCAB)},
        "levels": levels,
        "data": str(args.data),
        "prune": prune,
        "evaluate": evaluation,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "transformers": transformers.__version__, "processor": platform.processor() or platform.machine()},
    }
    gib = 1024 ** 3
    print(f"model: random Wav2Vec2ForCTC, {params / 1e6:.1f}M parameters; {prune['pruned_tensors']} pruned tensors "
          f"({prune['prunable_params'] / 1e6:.1f}M prunable)")
    print(f"prune {args.levels}: {prune['total_s']:.2f} s (load {prune['load_s']:.2f}, adapter + select + rank "
          f"{prune['select_rank_s']:.2f}, write {prune['write_s']:.2f}); transformers import "
          f"{prune['import_transformers_s']:.2f} s; process {prune['process_wall_s']:.2f} s; peak RSS "
          f"{prune['peak_rss_bytes'] / gib:.2f} GiB; other load {prune['other_load']:.0%}")
    audio = evaluation["levels"][0]["audio_seconds"]
    per_level = ", ".join(f"{_tag(e['level'])} {e['processing_seconds']:.2f} s (RTFx {e['rtfx']})"
                          for e in evaluation["levels"])
    print(f"evaluate all {len(evaluation['levels'])} levels on {evaluation['levels'][0]['utterances_scored']} "
          f"utterances ({audio:.1f} s audio): {evaluation['total_s']:.2f} s; per level: {per_level}; peak RSS "
          f"{evaluation['peak_rss_bytes'] / gib:.2f} GiB; other load {evaluation['other_load']:.0%}")
    for name, entry in (("prune", prune), ("evaluate", evaluation)):
        if entry["other_load"] > 0.10:
            print(f"WARNING: other processes used {entry['other_load']:.0%} of the CPUs during {name}; "
                  "do not record these numbers", file=sys.stderr)
    rtfx = " / ".join(str(e["rtfx"]) for e in evaluation["levels"])
    print("\n| model | params | levels | prune | evaluate (all levels) | RTFx dense / " +
          " / ".join(f"{v:g}" for v in levels) + " | peak RSS prune / evaluate | machine |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| random wav2vec2-base (Wav2Vec2ForCTC) | {params / 1e6:.1f}M | {args.levels} | {prune['total_s']:.1f} s "
          f"| {evaluation['total_s']:.1f} s ({evaluation['levels'][0]['utterances_scored']} utts, {audio:.1f} s audio"
          f" x {len(evaluation['levels'])}) | {rtfx} | {prune['peak_rss_bytes'] / gib:.2f} / "
          f"{evaluation['peak_rss_bytes'] / gib:.2f} GiB | {os.cpu_count()} CPU, torch {torch.__version__}, "
          f"transformers {transformers.__version__} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
