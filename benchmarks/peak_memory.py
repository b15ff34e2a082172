"""Peak memory of running exported models: each model in its own child process, one thread.

For every model file given (a dsnn checkpoint from ``dsnn export --format checkpoint`` or an ``.onnx`` file), a
fresh Python process imports torch / onnxruntime and builds the same input features first (``rss_base``), then
loads the model and runs one forward pass over them; the peak resident set size (``ru_maxrss``) it reaches minus
``rss_base`` is what loading and running that model costs. A fresh process per model means no model's memory is
counted in another's figure.

Usage: ``python benchmarks/peak_memory.py MODEL... [--seconds 10] [--json F]`` (the structured study's exports, e.g.
``dense.safetensors structured-0.5.safetensors weight-0.5.safetensors ...`` in the ``--work`` directory of
``benchmarks/structured.py``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys
import numpy as np
import torch
torch.set_num_threads(1)
path, seconds = sys.argv[1], float(sys.argv[2])
frames = int(seconds * 100)
features = torch.randn(1, frames, 80, generator=torch.Generator().manual_seed(0))
lengths = torch.tensor([frames])
if path.endswith(".onnx"):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    session = ort.InferenceSession(path, options)
    session.run(None, {"features": features.numpy(), "lengths": lengths.numpy()})
else:
    from dsnn_compress.sources.opener import load_checkpoint_adapter
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = load_checkpoint_adapter(path).model.eval()
    with torch.inference_mode():
        model(features, lengths)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"rss_base_kib": base, "rss_peak_kib": peak}))
"""


def measure(path: Path, seconds: float) -> dict[str, float]:
    """Peak RSS growth (MiB) of loading ``path`` and running it once on ``seconds`` of features, in a fresh process."""
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(seconds)], check=True, capture_output=True,
                         text=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                                         "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")})
    data = json.loads(out.stdout.strip().splitlines()[-1])
    return {"file_mib": round(path.stat().st_size / 2**20, 2),
            "peak_growth_mib": round((data["rss_peak_kib"] - data["rss_base_kib"]) / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--seconds", type=float, default=10.0, help="audio length of the one forward pass")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = {}
    for path in args.models:
        results[path.name] = measure(path, args.seconds)
        print(f"{path.name:32s} file {results[path.name]['file_mib']:7.2f} MiB   peak growth "
              f"{results[path.name]['peak_growth_mib']:7.1f} MiB", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"seconds": args.seconds, "models": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
