"""Shared test helpers: the ``dsnn`` runners (in this process and in a child process), the one-error-line check,
a structured ``dsnn prune``, a one-thread torch block, random state dicts, checkpoint files and a tie-aware pruning
oracle."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------------ running dsnn


class CliResult(NamedTuple):
    """One ``dsnn`` run: exit code, stdout and stderr (unpacks as ``code, out, err``)."""

    code: int
    out: str
    err: str


def run_cli(capsys: pytest.CaptureFixture[str], *args: object) -> CliResult:
    """``dsnn ARGS`` in this process (``dsnn_compress.cli.main``); output printed before the call is dropped."""
    from dsnn_compress.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return CliResult(code, captured.out, captured.err)


def assert_one_error_line(err: str, *fragments: str) -> str:
    """``err`` is exactly one ``error: ...`` line holding every fragment, without a traceback; returns the line."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, err)
    assert "Traceback" not in err, err
    return lines[0]


def assert_usage_error(result: CliResult, *fragments: str) -> str:
    """Exit code 2 and one ``error: ...`` line holding every fragment; returns the line."""
    assert result.code == 2, result.err
    return assert_one_error_line(result.err, *fragments)


def prune_structured(capsys: pytest.CaptureFixture[str], source: Path, out: Path, levels: Sequence[float],
                     allocation: str = "per-layer", *extra: object) -> Path:
    """``dsnn prune SOURCE --granularity structured`` at ``levels`` to ``out``, checked to succeed; returns ``out``."""
    result = run_cli(capsys, "prune", source, "--granularity", "structured", "--allocation", allocation,
                     "--levels", ",".join(map(str, levels)), "-o", out, *extra)
    assert result.code == 0, result.err
    return out


PYTHON_M_DSNN = (sys.executable, "-m", "dsnn_compress")


def torchrun(nproc: int) -> tuple[str, ...]:
    """The launcher of ``dsnn`` under ``torchrun --standalone --nproc_per_node NPROC``."""
    return (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "dsnn_compress")


def console_script() -> tuple[str, ...]:
    """The installed ``dsnn`` entry point (next to this interpreter, else on PATH, else ``python -m``)."""
    script = Path(sys.executable).parent / "dsnn"
    if script.is_file():
        return (str(script),)
    found = shutil.which("dsnn")
    return (found,) if found else (sys.executable, "-m", "dsnn_compress.cli")


def subprocess_env() -> dict[str, str]:
    """The environment of a ``dsnn`` child process.

    This checkout's ``src`` first on the path; one OpenMP thread, so CPU results are bit-identical to this process
    under ``one_torch_thread``; a wide console, so one error line is not wrapped; no ``DSNN_DEBUG`` and no inherited
    torch.distributed variables.
    """
    drop = {"DSNN_DEBUG", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"), COLUMNS="200")
    return env


def start_dsnn(*args: object, launcher: Sequence[str] = PYTHON_M_DSNN, cwd: Path | None = None,
               stdout: object = subprocess.PIPE, stderr: object = subprocess.PIPE) -> subprocess.Popen[str]:
    """Start ``dsnn ARGS`` in a child process (for a test that must kill it)."""
    return subprocess.Popen([*launcher, *map(str, args)], env=subprocess_env(), cwd=cwd, stdout=stdout,
                            stderr=stderr, text=True)


def run_dsnn(*args: object, launcher: Sequence[str] = PYTHON_M_DSNN, cwd: Path | None = None,
             timeout: float = 300) -> CliResult:
    """``dsnn ARGS`` in a child process, to its end: only where a test needs a separate process (a resume after
    SIGKILL, torchrun, the installed script); everything else uses :func:`run_cli`."""
    with start_dsnn(*args, launcher=launcher, cwd=cwd) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    return CliResult(proc.returncode, out, err)


# ------------------------------------------------------------------------------------------------------- torch


@contextmanager
def single_torch_thread() -> Iterator[None]:
    """torch on one intra-op thread inside the block (the previous count restored after).

    Tiny models run as fast so, tests do not fight over shared cores, and CPU results are bit-reproducible against
    child processes started with ``OMP_NUM_THREADS=1``. Tests use the ``one_torch_thread`` fixture (conftest.py).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------- tensors, files


def random_state_dict(seed: int = 0, scale: int = 1) -> dict[str, torch.Tensor]:
    """A small conformer/LSTM-like state dict with mixed dtypes; ``scale`` multiplies the widths.

    Default rule prunes: ``enc.ff.weight``, ``enc.conv.weight``, ``lstm.weight_ih_l0``, ``lstm.weight_hh_l0``,
    ``half.weight`` (fp16) and ``brain.weight`` (bf16). Not pruned: biases, the norm, the head and the int64 buffer.
    """
    gen = torch.Generator().manual_seed(seed)
    w = 8 * scale

    def randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    return {
        "enc.ff.weight": randn(w, 2 * w),
        "enc.ff.bias": randn(w),
        "enc.conv.weight": randn(w, 2, 3),
        "enc.norm.weight": randn(w),
        "lstm.weight_ih_l0": randn(4 * w, w),
        "lstm.weight_hh_l0": randn(4 * w, w),
        "lstm.bias_ih_l0": randn(4 * w),
        "half.weight": randn(w, w, dtype=torch.float16),
        "brain.weight": randn(w, 5, dtype=torch.bfloat16),
        "lm_head.weight": randn(10, w),
        "bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
    }


DEFAULT_PRUNED = sorted(
    ["enc.ff.weight", "enc.conv.weight", "lstm.weight_ih_l0", "lstm.weight_hh_l0", "half.weight", "brain.weight"]
)


def write_checkpoint(path: Path, state: Mapping[str, torch.Tensor]) -> Path:
    """Write ``state`` as safetensors (by extension) or with ``torch.save``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(dict(state), str(path))
    return path


def oracle_codes(
    tensors: Mapping[str, torch.Tensor], levels: Sequence[float], allocation: str = "per-layer"
) -> dict[str, np.ndarray]:
    """Reference keep codes by a plain stable sort: smallest ``|w|`` first, ties by stream position.

    Independent of ``dsnn_compress.core.masks`` (no radix select); slow but exact for small tensors.
    """
    names = sorted(tensors)
    flats = {n: tensors[n].detach().float().abs().reshape(-1).numpy().astype(np.float64) for n in names}
    groups = [[n] for n in names] if allocation == "per-layer" else [names]
    codes = {n: np.zeros(flats[n].size, dtype=np.int64) for n in names}
    for group in groups:
        stream = np.concatenate([flats[n] for n in group])
        order = np.argsort(stream, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(stream.size)
        code = np.zeros(stream.size, dtype=np.int64)
        for s in levels:
            p = int(round(s * stream.size))
            code += rank >= p  # survives level s
        start = 0
        for n in group:
            codes[n] = code[start : start + flats[n].size].reshape(tuple(tensors[n].shape))
            start += flats[n].size
    return codes
