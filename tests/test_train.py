"""`dsnn finetune` training loop: overfitting, masking, gradient isolation, schedules, sampling, distillation,
crash/resume (a real SIGKILL), dense training, keep=best and the JSONL log.

Everything runs on tiny fresh Conformer-CTC models (``recipes/tiny-test.yaml``: d_model 32, one layer, dropout 0)
with torch limited to one thread: on a 2-core machine shared with other processes, OpenMP threads spinning against
each other make small ops 10-100x slower, and a fixed thread count keeps CPU results bit-reproducible between this
process and the ``python -m dsnn_compress`` subprocesses (started with ``OMP_NUM_THREADS=1``).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_usage_error, run_cli, run_dsnn, start_dsnn

from dsnn_compress.core import masked
from dsnn_compress.core.bundle import load_bundle
from dsnn_compress.core.masked import StepPlan, distillation_loss, masked_parameters, run_at_level, train_step
from dsnn_compress.core.schedule import lr_at, sample_levels
from dsnn_compress.data.dataset import SpeechDataset, collate
from dsnn_compress.data.manifest import read_manifest
from dsnn_compress.errors import UsageError
from dsnn_compress.evaluation.evaluate import EvaluateOptions, evaluate
from dsnn_compress.models.base import AdapterRunner
from dsnn_compress.models.registry import adapter_from_metadata
from dsnn_compress.runtime.runnable import load_model
from dsnn_compress.training import trainer as train
from dsnn_compress.training.model_setup import build_model
from dsnn_compress.training.recipe import Recipe, apply_overrides, load_recipe
from dsnn_compress.training.trainer import finetune, log_path, state_path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
TINY = ROOT / "recipes" / "tiny-test.yaml"
TINY_MODEL = {"d_model": 32, "num_layers": 1, "num_heads": 2, "conv_kernel": 3, "dropout": 0.0}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_manifest(path: Path, count: int) -> Path:
    """The first ``count`` utterances of tests/data/manifest.jsonl with absolute audio paths."""
    lines = (DATA / "manifest.jsonl").read_text().splitlines()[:count]
    with path.open("w") as fh:
        for line in lines:
            item = json.loads(line)
            item["audio_filepath"] = str(DATA / item["audio_filepath"])
            fh.write(json.dumps(item) + "\n")
    return path


def tiny(tmp_path: Path, name: str = "out", **overrides: Any) -> Recipe:
    """The tiny test recipe writing under ``tmp_path``; ``overrides`` use ``__`` for dots (training__steps=3)."""
    values: dict[str, Any] = {"output": str(tmp_path / f"{name}.safetensors"), "training.keep": "last",
                              "distillation.enabled": False, "sampling.mode": "all", "levels": [0.5, 0.8],
                              "model.config": dict(TINY_MODEL)}
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    return apply_overrides(load_recipe(TINY), values)


def batch_of(adapter: Any, recipe: Recipe, count: int = 4):
    utterances = read_manifest(recipe.data.train)[:count]
    dataset = SpeechDataset(utterances, adapter.prepare, adapter.encode_text, adapter.sample_rate)
    return collate([dataset[i] for i in range(len(utterances))])


class StepParts(NamedTuple):
    """A recipe's model set up for calling ``train_step`` by hand, and a batch of its first training utterances."""

    setup: Any
    model: torch.nn.Module
    params: dict[str, torch.nn.Parameter]
    runner: AdapterRunner
    batch: Any


def step_parts(recipe: Recipe, train: bool = True) -> StepParts:
    """:class:`StepParts` of ``recipe``'s model, in training mode or (``train=False``) eval mode."""
    setup = build_model(recipe)
    model = setup.adapter.model.train(train)
    return StepParts(setup, model, dict(model.named_parameters()), AdapterRunner(setup.adapter),
                     batch_of(setup.adapter, recipe))


def read_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)


# --------------------------------------------------------------------------------------------------- overfit


def test_overfits_three_utterances_dense_and_sparse(tmp_path: Path):
    """From random init, joint `all` training on 3 utterances drives dense and 50 % sparse WER to (near) 0.

    Measured: both levels reach WER 0 by step ~75 on seeds 0-3 (120 steps used); the limits leave room.
    """
    man = make_manifest(tmp_path / "three.jsonl", 3)
    recipe = tiny(tmp_path, "overfit", **{
        "data.train": str(man), "data.dev": str(man), "data.batch_frames": 100_000, "data.max_dev_utterances": None,
        "model.config": {"d_model": 64, "num_layers": 2, "num_heads": 2, "conv_kernel": 3, "dropout": 0.0},
        "levels": [0.5], "optimizer.lr": 3e-3, "optimizer.weight_decay": 0.0, "lr_schedule.warmup_steps": 10,
        "training.steps": 120, "training.log_every": 40,
    })
    result = finetune(recipe)
    assert result.steps == 120
    assert result.dev_wer is not None and result.dev_wer[0] == 0.0  # the loop's own dev evaluation
    assert max(result.final_losses.values()) < 0.1  # low CTC loss ...
    # ... and the saved bundle decodes it, through `dsnn evaluate`'s path
    report = evaluate(result.output, man, EvaluateOptions(repeats=1))
    wer = {entry.level: entry.wer for entry in report.levels}
    assert set(wer) == {0.0, 0.5}
    assert wer[0.0] == 0.0
    assert wer[0.5] <= 0.35
    assert report.levels[1].nonzero_params < report.levels[0].nonzero_params


# --------------------------------------------------------------------------------------------- masking / grads


def test_level_forward_sees_exact_zeros_for_pruned_weights(tmp_path: Path):
    recipe = tiny(tmp_path)
    setup, _, params, runner, batch = step_parts(recipe, train=False)
    codes = setup.codes
    assert codes and setup.levels == (0.5, 0.8)
    outputs = {}
    for k in (1, 2):
        masked = masked_parameters(params, codes, k)
        for name, code in codes.items():
            pruned = code < k
            assert bool(pruned.any()) and bool((~pruned).any())
            assert torch.count_nonzero(masked[name][pruned]) == 0
            assert torch.equal(masked[name][~pruned], params[name][~pruned].detach())
        with torch.no_grad():
            outputs[k] = run_at_level(runner, params, codes, k, batch, "loss")[1]
            # pruned weights do not take part: giving them huge values changes nothing at level k ...
            noisy = {n: params[n] + torch.where(codes[n] < k, 1e3, 0.0) for n in codes}
            assert torch.equal(run_at_level(runner, noisy, codes, k, batch, "loss")[1], outputs[k])
    with torch.no_grad():  # ... while weights alive at level 1 but pruned at level 2 do matter at level 1
        noisy = {n: params[n] + torch.where(codes[n] < 2, 1e3, 0.0) for n in codes}
        assert not torch.equal(run_at_level(runner, noisy, codes, 1, batch, "loss")[1], outputs[1])
    assert not torch.equal(outputs[1], outputs[2])


def test_trained_bundle_levels_match_run_at_level(tmp_path: Path):
    """After training, `state_dict_at(k)` in a plain model and the runtime switch reproduce the training forward."""
    recipe = tiny(tmp_path, training__steps=2)
    result = finetune(recipe)
    bundle = load_bundle(result.output)
    meta = bundle.metadata["model"]
    live = adapter_from_metadata(meta, bundle.tensors)
    live.model.eval()
    params = dict(live.model.named_parameters())
    runner = AdapterRunner(live)
    loaded = load_model(result.output)  # what `dsnn evaluate` runs (in-place level switching)
    batch = batch_of(live, recipe)
    for index, level in enumerate(bundle.all_levels):
        oracle = adapter_from_metadata(meta, bundle.state_dict_at(level))
        oracle.model.eval()
        loaded.set_level(level)
        with torch.no_grad():
            expected = oracle.log_probs(batch)[0]
            got = run_at_level(runner, params, bundle.codes, index, batch, "loss")[1]
            switched = loaded.adapter.log_probs(batch)[0]
        assert torch.equal(got, expected), level
        assert torch.equal(switched, expected), level
        if index:
            for name, tensor in oracle.model.named_parameters():
                if name in bundle.codes:
                    assert torch.count_nonzero(tensor[bundle.codes[name] < index]) == 0


def test_gradients_do_not_reach_weights_pruned_at_the_trained_level(tmp_path: Path):
    recipe = tiny(tmp_path)
    setup, model, params, runner, batch = step_parts(recipe)
    codes = setup.codes

    def grads(levels: list[int]) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        train_step(runner, params, codes, batch, StepPlan(levels, [1.0, 1.0, 1.0]))
        return {n: params[n].grad.clone() for n in codes}

    for levels, floor in (([1], 1), ([2], 2), ([1, 2], 1)):
        g = grads(levels)
        for name, code in codes.items():
            assert torch.count_nonzero(g[name][code < floor]) == 0, (levels, name)
            assert torch.count_nonzero(g[name][code >= floor]) > 0, (levels, name)
    dense = grads([0])  # control: the dense level does reach the weights the sparse levels prune
    assert all(torch.count_nonzero(dense[n][c < 2]) > 0 for n, c in codes.items())


def test_zero_loss_weight_leaves_gradients_as_without_that_level(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    recipe = tiny(tmp_path)
    forwards: list[int] = []
    real_run_at_level = masked.run_at_level

    def counting(runner: Any, params: Any, codes: Any, index: int, batch: Any, mode: str,
                 prefix: str = "model.") -> Any:
        forwards.append(index)
        return real_run_at_level(runner, params, codes, index, batch, mode, prefix)

    monkeypatch.setattr(masked, "run_at_level", counting)
    setup, model, params, runner, batch = step_parts(recipe)

    def grads(levels: list[int], weights: list[float]) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        forwards.clear()
        losses = train_step(runner, params, setup.codes, batch, StepPlan(levels, weights))
        trained = [i for i in sorted(levels) if weights[i] > 0]
        assert sorted(losses) == trained
        assert sorted(forwards) == trained  # a zero-weight level costs no forward pass
        return {n: p.grad.clone() for n, p in params.items() if p.grad is not None}

    without = grads([0, 2], [1.0, 1.0, 1.0])
    zero_weight = grads([0, 1, 2], [1.0, 0.0, 1.0])
    with_level = grads([0, 1, 2], [1.0, 1.0, 1.0])
    assert max_abs_diff(zero_weight, without) == 0.0
    assert max_abs_diff(with_level, without) > 0.0
    half = grads([0, 1, 2], [1.0, 0.5, 1.0])  # weights scale a level's contribution linearly
    expected = {n: (without[n] + with_level[n]) / 2 for n in without}
    assert max_abs_diff(half, expected) < 1e-5
    forwards.clear()  # a zero-weight dense level still runs once, without gradient, as the distillation teacher
    losses = train_step(runner, params, setup.codes, batch, StepPlan([0, 2], [0.0, 1.0, 1.0], distill_weight=1.0))
    assert forwards == [0, 2] and sorted(losses) == [2]


def test_loss_weights_of_the_wrong_length_are_rejected(tmp_path: Path):
    recipe = tiny(tmp_path, sampling__loss_weights=[1.0, 1.0])
    with pytest.raises(UsageError, match="loss_weights"):
        finetune(recipe)


# ----------------------------------------------------------------------------------------------- gradual schedule


def test_gradual_schedule_ramps_and_ends_exactly_at_the_targets(tmp_path: Path):
    targets = (0.5, 0.8)
    recipe = tiny(tmp_path, **{"schedule.enabled": True, "schedule.start_step": 0, "schedule.end_step": 4,
                               "schedule.update_every": 1, "training.steps": 6, "training.checkpoint_every": 1})
    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def report(event: str, data: dict[str, Any]) -> None:
        if event == "checkpoint":  # the output bundle was just written with the codes in use
            snapshots[data["step"]] = load_bundle(recipe.output).codes

    result = finetune(recipe, report=report)
    assert sorted(snapshots) == [1, 2, 3, 4, 5]

    def fraction(step: int) -> float:  # cubic ramp from 0 over steps 0..4 (Zhu & Gupta), by hand
        return 1.0 - (1.0 - min(step, 4) / 4) ** 3

    ramp = []
    for done, codes in sorted(snapshots.items()):
        used_at = done - 1  # codes recomputed at the start of 0-based step `done - 1`
        for name, code in codes.items():
            n = code.numel()
            for k, target in enumerate(targets, 1):
                assert int((code < k).sum()) == round(target * fraction(used_at) * n), (done, name, k)
        ramp.append(sum(int((c < 2).sum()) for c in codes.values()))
    assert ramp[0] == 0 and all(b > a for a, b in zip(ramp, ramp[1:]))  # from 0, strictly up to the target

    bundle = load_bundle(result.output)
    assert bundle.levels == targets
    for name, code in bundle.codes.items():
        n = code.numel()
        assert code.dtype == torch.uint8 and int(code.max()) <= len(targets)
        for k, target in enumerate(targets, 1):
            assert int((code < k).sum()) == round(target * n), (name, k)
        for k in range(len(targets)):
            assert not bool((bundle.mask(name, bundle.all_levels[k + 1]) & ~bundle.mask(name, bundle.all_levels[k]))
                            .any())
    summary = bundle.summary()["levels"]
    assert [round(v["prunable_sparsity"], 2) for v in summary] == [0.0, 0.5, 0.8]


def test_keep_best_with_the_gradual_schedule_only_picks_steps_at_the_target_sparsity(tmp_path: Path):
    # Dev WER is evaluated every step from step 1; the early, barely pruned steps would win on WER, but they do not
    # hold the sparsities the bundle declares, so only evaluations after end_step may be kept.
    recipe = tiny(tmp_path, **{"schedule.enabled": True, "schedule.start_step": 0, "schedule.end_step": 3,
                               "schedule.update_every": 1, "training.steps": 6, "training.eval_every": 1,
                               "training.keep": "best"})
    evals: list[int] = []
    result = finetune(recipe, report=lambda event, data: evals.append(data["step"]) if event == "eval" else None)
    assert evals == [1, 2, 3, 4, 5, 6]
    bundle = load_bundle(result.output)
    assert bundle.metadata["training"]["best_step"] > 3
    for name, code in bundle.codes.items():
        for k, target in enumerate((0.5, 0.8), 1):
            assert int((code < k).sum()) == round(target * code.numel()), (name, k)


def test_gradual_schedule_ending_after_an_epochs_run_is_refused(tmp_path: Path):
    recipe = tiny(tmp_path, **{"schedule.enabled": True, "schedule.end_step": 10_000, "training.steps": None,
                               "training.epochs": 1})
    with pytest.raises(UsageError, match=r"schedule.end_step \(10000\) must be before the last training step"):
        finetune(recipe)
    assert not recipe.output.exists()


# ------------------------------------------------------------------------------------------------ level sampling


def test_sample_levels_all_and_dense_only():
    assert sample_levels(3, "all", 1, seed=0, step=5) == [0, 1, 2, 3]
    assert sample_levels(0, "all", 1, seed=0, step=0) == [0]
    assert sample_levels(0, "sandwich", 2, seed=0, step=0) == [0]
    with pytest.raises(ValueError):
        sample_levels(2, "random", 1, seed=0, step=0)


@pytest.mark.parametrize(("num_levels", "k"), [(1, 1), (2, 1), (3, 1), (5, 2), (6, 3), (4, 7), (4, 0)])
def test_sample_levels_sandwich(num_levels: int, k: int):
    middle = set(range(1, num_levels))
    seen: set[int] = set()
    choices = []
    for step in range(200):
        picked = sample_levels(num_levels, "sandwich", k, seed=3, step=step)
        assert picked == sorted(set(picked))
        assert picked[0] == 0 and picked[-1] == num_levels
        inner = set(picked) - {0, num_levels}
        assert inner <= middle and len(inner) == min(k, num_levels - 1)
        assert sample_levels(num_levels, "sandwich", k, seed=3, step=step) == picked  # deterministic
        seen |= inner
        choices.append(tuple(picked))
    if 0 < k < len(middle):
        assert seen == middle  # every middle level gets trained over many steps
        assert len(set(choices)) > 1
        other_seed = [tuple(sample_levels(num_levels, "sandwich", k, seed=4, step=s)) for s in range(200)]
        assert other_seed != choices


# ---------------------------------------------------------------------------------------------------- distillation


def test_distillation_loss_against_kl_div():
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 5, 4, generator=gen)
    student = torch.randn(2, 5, 4, generator=gen)
    lengths = torch.tensor([5, 3])
    student[1, 3:] = 1e4 * torch.randn(2, 4, generator=gen)  # garbage in padding frames must not count
    temperature = 2.0
    assert float(distillation_loss(teacher, teacher, lengths, temperature)) == pytest.approx(0.0, abs=1e-7)
    value = float(distillation_loss(teacher, student, lengths, temperature))
    assert value > 0
    per_frame = F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1),
                         reduction="none", log_target=True).sum(-1)
    valid = [per_frame[0, :5], per_frame[1, :3]]
    expected = temperature**2 * float(torch.cat(valid).mean())
    assert value == pytest.approx(expected, rel=1e-5)
    # by hand for one frame: sum_v p_t (log p_t - log p_s)
    p_t = torch.softmax(teacher[0, 0] / temperature, -1)
    one = float((p_t * (p_t.log() - torch.log_softmax(student[0, 0] / temperature, -1))).sum())
    assert one == pytest.approx(float(per_frame[0, 0]), rel=1e-5)


def test_train_step_adds_weighted_distillation_to_sparse_levels(tmp_path: Path):
    recipe = tiny(tmp_path)
    setup, model, params, runner, batch = step_parts(recipe, train=False)  # deterministic forwards to compare
    losses = train_step(runner, params, setup.codes, batch, StepPlan([0, 2], [1.0, 1.0, 1.0], distill_weight=0.5,
                                                                  temperature=2.0))
    with torch.no_grad():
        _, teacher, _ = run_at_level(runner, params, setup.codes, 0, batch, "loss")
        ctc, student, lengths = run_at_level(runner, params, setup.codes, 2, batch, "loss")
        dense_ctc = run_at_level(runner, params, setup.codes, 0, batch, "loss")[0]
    assert losses[0] == pytest.approx(float(dense_ctc), rel=1e-6)  # no self-distillation at the dense level
    kl = float(distillation_loss(teacher, student, lengths, 2.0))
    assert kl > 0
    assert losses[2] == pytest.approx(float(ctc) + 0.5 * kl, rel=1e-5)
    # without the dense level in the step, the teacher is still the dense output
    again = train_step(runner, params, setup.codes, batch, StepPlan([2], [1.0, 1.0, 1.0], distill_weight=0.5,
                                                                  temperature=2.0))
    assert again[2] == pytest.approx(losses[2], rel=1e-5)


# ------------------------------------------------------------------------------------------ crash and resume


def _cli_args(recipe_file: Path, output: Path, steps: int) -> list[str]:
    # dropout and SpecAugment on, so the RNG state and the (seed, step) streams must survive the crash
    return ["finetune", "--recipe", str(recipe_file), "-o", str(output), "--set", f"training.steps={steps}",
            "--set", "training.checkpoint_every=1", "--set", "model.config.dropout=0.1", "--set",
            "data.spec_augment=true", "--set", "training.eval_every=3", "--set", "sampling.mode=sandwich",
            "--set", "data.batch_frames=450"]  # 3 batches per epoch: the crash lands mid-epoch


def _state_step(path: Path) -> int:
    try:
        return int(torch.load(str(path), map_location="cpu", weights_only=True)["step"])
    except Exception:  # noqa: BLE001 - absent or being replaced: not there yet
        return -1


def test_resume_after_sigkill_is_bit_identical(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """Kill -9 a CLI run after its 2nd+ checkpoint, resume it in a new process, compare with an uninterrupted run.

    Tolerance: none. On CPU with the same thread count the resumed run repeats the exact float operations
    (weights, AdamW moments, torch RNG state, epoch/position and the (seed, step)-derived augmentation and level
    choices are all restored), so the weights must be bit-identical.
    """
    steps = 12
    out = tmp_path / "killed.safetensors"
    args = _cli_args(TINY, out, steps)
    stderr = (tmp_path / "killed.stderr").open("w")
    proc = start_dsnn(*args, stdout=subprocess.DEVNULL, stderr=stderr)
    state = state_path(out)
    killed_at = -1
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if state.exists() and _state_step(state) >= 2:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.005)
    finally:
        if proc.poll() is None and time.monotonic() >= deadline:
            proc.kill()
        proc.wait()
        stderr.close()
    detail = (tmp_path / "killed.stderr").read_text()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {detail}"
    killed_at = _state_step(state)
    assert 2 <= killed_at < steps

    # an interrupted run's state blocks a plain rerun, and resuming needs the same recipe
    assert_usage_error(run_cli(capsys, *args), "--resume")
    assert_usage_error(run_cli(capsys, *args, "--set", "optimizer.lr=2e-3", "--resume"), "recipe differs")
    assert _state_step(state) == killed_at  # untouched by the refused attempts

    resumed = run_dsnn(*args, "--resume")
    assert resumed.code == 0, resumed.err
    assert not state.exists()

    reference = finetune(apply_overrides(load_recipe(TINY), {
        "output": str(tmp_path / "straight.safetensors"), "training.steps": steps, "training.checkpoint_every": 1,
        "model.config.dropout": 0.1, "data.spec_augment": True, "training.eval_every": 3,
        "sampling.mode": "sandwich", "data.batch_frames": 450}))
    a, b = load_bundle(out), load_bundle(reference.output)
    assert a.codes.keys() == b.codes.keys() and all(torch.equal(a.codes[n], b.codes[n]) for n in a.codes)
    assert max_abs_diff(a.tensors, b.tensors) == 0.0
    assert a.metadata["training"] == {**b.metadata["training"]}
    assert a.metadata["training"]["best_step"] is not None  # keep=best state survived the crash

    # the log reads as one run: every step once, in order, and one end event
    records = read_log(log_path(out))
    step_events = [r["step"] for r in records if r["event"] == "step"]
    assert step_events == list(range(1, steps + 1))
    assert [r["event"] for r in records].count("end") == 1 and records[-1]["event"] == "end"
    assert [r["step"] for r in records if r["event"] == "eval"] == [3, 6, 9, 12]


def test_resume_without_state_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    line = assert_usage_error(run_cli(capsys, *_cli_args(TINY, tmp_path / "none.safetensors", 3), "--resume"))
    assert line.startswith("error: no training state")
    assert not (tmp_path / "none.safetensors").exists()


def test_stop_after_then_resume_in_process_matches(tmp_path: Path):
    recipe = tiny(tmp_path, "crash", training__steps=4, training__checkpoint_every=2, model__config__dropout=0.1,
                  data__spec_augment=True, data__batch_frames=450)  # 3 batches per epoch
    partial = finetune(recipe, stop_after=3)  # ends after step 3: the state of step 2 is what a crash leaves
    assert partial.steps == 3 and _state_step(state_path(recipe.output)) == 2
    with pytest.raises(UsageError, match="interrupted run"):
        finetune(recipe)
    finetune(recipe, resume=True)
    straight = finetune(apply_overrides(recipe, {"output": str(tmp_path / "straight.safetensors")}))
    assert max_abs_diff(load_bundle(recipe.output).tensors, load_bundle(straight.output).tensors) == 0.0
    assert [r["step"] for r in read_log(log_path(recipe.output)) if r["event"] == "step"] == [1, 2, 3, 4]


# ------------------------------------------------------------------------------------------- dense, best, log


def test_dense_training_writes_an_evaluable_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    recipe = tiny(tmp_path, "dense", levels=[], training__steps=2)
    result = finetune(recipe)
    assert result.levels == ()
    from dsnn_compress.core.safetensors_io import read_safetensors_metadata

    meta = read_safetensors_metadata(result.output)
    assert meta["format"] == "dsnn-checkpoint"
    assert json.loads(meta["recipe"])["levels"] == []
    assert json.loads(meta["training"])["steps"] == 2
    code, stdout, err = run_cli(capsys, "evaluate", result.output, "--data", DATA / "manifest.jsonl", "--json", "-")
    assert code == 0, err
    report = json.loads(stdout)
    assert [entry["level"] for entry in report["levels"]] == [0.0]
    assert [r["loss"].keys() for r in read_log(result.log) if r["event"] == "step"] == [{"dense"}, {"dense"}]


def test_keep_best_keeps_the_best_dev_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A scripted dev WER (best at step 2 of 4) picks step 2's weights and codes; the real WERs are tested below."""
    scripted = iter([[0.9, 0.9, 0.9], [0.4, 0.5, 0.6], [0.6, 0.6, 0.6], [0.8, 0.7, 0.9]])
    monkeypatch.setattr(train, "dev_wer", lambda *args, **kwargs: next(scripted))
    recipe = tiny(tmp_path, "best", training__keep="best", training__steps=4, training__eval_every=1,
                  training__checkpoint_every=1, optimizer__lr=1e-2)
    events: list[dict[str, Any]] = []
    weights: dict[int, dict[str, torch.Tensor]] = {}

    def report(event: str, data: dict[str, Any]) -> None:
        if event == "eval":
            events.append(data)
        if event == "checkpoint":
            weights[data["step"]] = load_bundle(recipe.output).tensors

    finetune(recipe, report=report)
    assert [e["step"] for e in events] == [1, 2, 3, 4]
    assert events[1]["dev_wer"] == {"dense": 0.4, "0.5": 0.5, "0.8": 0.6}
    bundle = load_bundle(recipe.output)
    training = bundle.metadata["training"]
    assert training["best_step"] == 2 and training["steps"] == 4
    assert training["dev_wer"] == {"dense": 0.4, "0.5": 0.5, "0.8": 0.6}  # the WER of the weights it holds
    assert max_abs_diff(bundle.tensors, weights[2]) == 0.0
    assert max_abs_diff(bundle.tensors, weights[3]) > 0.0


def test_jsonl_log_has_step_eval_and_end_events(tmp_path: Path, tiny_model):
    """The log holds what the run did: every ``log_every``-th step and the last, with the losses the run reported
    and the LR of the schedule; dev WERs equal to an independent evaluation of the weights the bundle keeps.

    Starts from the trained tiny conformer (asr_fixtures), so the dev WERs differ between levels and steps.
    """
    steps, log_every = 3, 2
    recipe = tiny(tmp_path, "logged", training__steps=steps, training__eval_every=2, training__log_every=log_every,
                  training__keep="best", lr_schedule__warmup_steps=3, model__init=str(tiny_model.checkpoint))
    reported: list[tuple[str, dict[str, Any]]] = []
    result = finetune(recipe, report=lambda event, data: reported.append((event, dict(data))))
    records = read_log(log_path(recipe.output))
    assert result.log == log_path(recipe.output)
    assert [r["event"] for r in records] == ["step", "eval", "step", "eval", "end"]
    assert all(isinstance(r["time"], float) for r in records)
    seen = [event for event, _ in reported]
    assert seen[0] == "start" and seen[-1] == "end" and seen.count("eval") == 2

    logged = [r for r in records if r["event"] == "step"]
    assert [r["step"] for r in logged] == [s for s in range(1, steps + 1) if s % log_every == 0 or s == steps]
    by_step = {data["step"]: data for event, data in reported if event in ("step", "tick")}  # tick: not logged
    assert sorted(by_step) == list(range(1, steps + 1))
    for record in logged:
        assert set(record["loss"]) == {"dense", "0.5", "0.8"}
        assert all(math.isfinite(v) and v > 0 for v in record["loss"].values())
        assert record["loss"] == by_step[record["step"]]["loss"]  # the losses of that step, as the run reported
        # the LR the step trained with: the schedule at the 0-based step (warm-up over 3 steps, so it moves)
        assert record["lr"] == lr_at(record["step"] - 1, recipe.optimizer.lr, recipe.lr_schedule, steps)
        assert record["grad_norm"] > 0 and record["steps_per_s"] > 0
    assert [r["lr"] for r in logged] == pytest.approx([recipe.optimizer.lr * 2 / 3, recipe.optimizer.lr])
    bundle = load_bundle(recipe.output)
    training = bundle.metadata["training"]
    assert training["final_loss"] == result.final_losses == logged[-1]["loss"]

    evals = [r for r in records if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [2, 3]
    assert [data["dev_wer"] for event, data in reported if event == "eval"] == [r["dev_wer"] for r in evals]
    best = min(evals, key=lambda r: sum(r["dev_wer"].values()))  # the first lowest mean, as keep=best picks
    assert training["best_step"] == best["step"] and training["dev_wer"] == best["dev_wer"]
    # real WERs: `dsnn evaluate` of the kept weights on the dev utterances gives the logged ones, level by level
    dev = make_manifest(tmp_path / "dev.jsonl", recipe.data.max_dev_utterances)
    wer = {entry.level: entry.wer for entry in evaluate(recipe.output, dev, EvaluateOptions(repeats=1)).levels}
    assert best["dev_wer"] == {"dense": wer[0.0], "0.5": wer[0.5], "0.8": wer[0.8]}
    assert len(set(best["dev_wer"].values())) == 3  # distinct, so a WER of the wrong level cannot pass

    assert records[-1]["output"] == str(recipe.output) and records[-1]["step"] == steps
    assert bundle.metadata["recipe"] == recipe.to_dict()
