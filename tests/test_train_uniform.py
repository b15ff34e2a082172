"""`sampling.mode: uniform`: continuous levels drawn uniformly from (0, largest) trained each step next to dense and
the sparsest level (the sampler, the per-step masks against an independent oracle, gradients, a whole run, the
recipe and CLI checks)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import assert_usage_error, run_cli
from test_train import step_parts

from dsnn_compress.core.bundle import load_bundle
from dsnn_compress.core.continuous import keep_masks
from dsnn_compress.core.masked import StepPlan, run_with_masks, train_step
from dsnn_compress.core.schedule import sample_continuous, sample_levels
from dsnn_compress.errors import UsageError
from dsnn_compress.runtime.runnable import load_model
from dsnn_compress.training.model_setup import build_model
from dsnn_compress.training.recipe import Recipe, apply_overrides, load_recipe, recipe_from_dict
from dsnn_compress.training.trainer import Finetuner, finetune

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny-test.yaml"
MANIFEST = ROOT / "tests" / "data" / "manifest.jsonl"
TINY_MODEL = {"d_model": 32, "num_layers": 1, "num_heads": 2, "conv_kernel": 3, "dropout": 0.0}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(tmp_path: Path, **overrides: Any) -> Recipe:
    """The tiny test recipe in uniform mode writing under ``tmp_path`` (``__`` for dots in ``overrides``)."""
    values: dict[str, Any] = {"output": str(tmp_path / "out.safetensors"), "training.keep": "last",
                              "sampling.mode": "uniform", "sampling.random_levels": 2, "levels": [0.5, 0.8],
                              "model.config": dict(TINY_MODEL)}
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    return apply_overrides(load_recipe(TINY), values)


def band_oracle(weight: torch.Tensor, code: torch.Tensor, k: int, value: float) -> torch.Tensor:
    """Per-layer keep-mask at a continuous ``value`` between trained levels k and k+1, by a stable sort: the
    ``round(value * n)`` pruned weights are those coded below k plus the smallest-|w| band weights (code == k)."""
    flat_w, flat_c = weight.detach().reshape(-1).float().abs(), code.reshape(-1)
    keep = flat_c >= k + 1
    band = (flat_c == k).nonzero().reshape(-1)
    drop = min(max(round(value * flat_c.numel()) - int((flat_c < k).sum()), 0), band.numel())
    order = torch.sort(flat_w[band], stable=True).indices
    keep[band[order[drop:]]] = True
    return keep.reshape(code.shape)


# ------------------------------------------------------------------------------------------------ the sampler


def test_sample_continuous_draws_in_the_open_range_reproducibly_and_spread_out():
    draws = [sample_continuous(0.8, 3, seed=5, step=s) for s in range(300)]
    flat = [v for d in draws for v in d]
    assert all(len(d) == 3 and d == sorted(d) for d in draws)
    assert all(0.0 < v < 0.8 for v in flat)
    assert draws == [sample_continuous(0.8, 3, seed=5, step=s) for s in range(300)]  # (seed, step) decides
    assert draws != [sample_continuous(0.8, 3, seed=6, step=s) for s in range(300)]
    # uniform on (0, 0.8): mean 0.4, each fifth of the range gets about a fifth of the 900 draws
    assert statistics.mean(flat) == pytest.approx(0.4, abs=0.03)
    counts = [sum(1 for v in flat if i * 0.16 <= v < (i + 1) * 0.16) for i in range(5)]
    assert all(130 < c < 230 for c in counts), counts
    assert sample_continuous(0.8, 0, seed=0, step=0) == []


def test_uniform_mode_trains_dense_and_the_sparsest_trained_level():
    assert sample_levels(3, "uniform", 2, seed=0, step=7) == [0, 3]
    assert sample_levels(1, "uniform", 2, seed=0, step=7) == [0, 1]


# ------------------------------------------------------------------------------------------------ one step


def test_uniform_step_masks_follow_the_band_order_of_the_current_weights_and_are_nested(tmp_path: Path):
    run = Finetuner(tiny(tmp_path, sampling__random_levels=3))
    run.setup()
    codes, levels = run.codes, run.levels
    for step in (0, 1, 17):
        run.step = step
        values = sample_continuous(levels[-1], 3, run.cfg.seed, step)
        masks = run.continuous_masks()
        assert len(masks) == 3
        for value, mask in zip(values, masks):
            k = 0 if value < levels[0] else 1
            for name, code in codes.items():
                assert torch.equal(mask[name], band_oracle(run.params[name], code, k, value)), (step, value, name)
                assert bool(((code >= k + 1) <= mask[name]).all())  # nested between the trained levels
                assert bool((mask[name] <= (code >= k)).all())
        for low, high in zip(masks, masks[1:]):  # and with each other: a larger level keeps a subset
            assert all(bool((high[n] <= low[n]).all()) for n in codes)
    # the masks follow the weights as they move: shrinking one band weight to 0 makes it the first dropped
    run.step = 0
    value = sample_continuous(levels[-1], 3, run.cfg.seed, 0)[0]
    k = 0 if value < levels[0] else 1
    name = next(iter(codes))
    kept = (run.continuous_masks()[0][name] & (codes[name] == k)).nonzero()[0]
    with torch.no_grad():
        run.params[name][tuple(kept)] = 0.0
    assert not run.continuous_masks()[0][name][tuple(kept)]


def test_a_continuous_level_gets_gradient_only_where_its_mask_keeps(tmp_path: Path):
    recipe = tiny(tmp_path)
    setup, _, params, runner, batch = step_parts(recipe, train=False)
    mask = keep_masks({n: params[n].detach() for n in setup.codes}, setup.codes, setup.levels, 0.65)
    losses = train_step(runner, params, setup.codes, batch, StepPlan([], [1.0, 1.0, 1.0], extra_masks=[mask]))
    for name in setup.codes:
        grad = params[name].grad
        assert torch.count_nonzero(grad[~mask[name]]) == 0 and torch.count_nonzero(grad[mask[name]]) > 0
    # the loss is the loss of the model whose weights were zeroed outside the mask (an independent forward)
    with torch.no_grad():
        saved = {n: params[n].detach().clone() for n in setup.codes}
        for name in setup.codes:
            params[name][~mask[name]] = 0.0
        expected = float(runner(batch, "loss")[0])
        for name, tensor in saved.items():
            params[name].copy_(tensor)
        assert float(run_with_masks(runner, params, mask, batch, "loss")[0]) == pytest.approx(expected, rel=1e-6)
    assert set(losses) == {"uniform"} and losses["uniform"] == pytest.approx(expected, rel=1e-6)


# ------------------------------------------------------------------------------------------------ a whole run


def test_two_uniform_steps_write_a_valid_bundle_with_the_trained_levels_and_codes(tmp_path: Path):
    recipe = tiny(tmp_path, training__steps=2, distillation__enabled=True)
    initial = build_model(recipe).codes
    result = finetune(recipe)
    assert result.forward_passes == 2 * (2 + 2)  # dense (the teacher) + sparsest + two drawn levels, per step
    assert set(result.final_losses) == {"dense", "0.8", "uniform"}
    bundle = load_bundle(result.output)  # verifies the checksums
    assert bundle.levels == (0.5, 0.8)
    assert all(torch.equal(bundle.codes[n], initial[n]) for n in initial)
    assert bundle.metadata["recipe"]["sampling"]["mode"] == "uniform"
    loaded = load_model(result.output)
    loaded.set_level(0.65)  # a continuous level is served from the written bundle
    assert not loaded.is_trained(0.65)


def test_uniform_mode_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "cli.safetensors"
    result = run_cli(capsys, "finetune", "--recipe", TINY, "--sampling", "uniform", "--steps", "1", "-o", out,
                     "--json", "--set", "training.keep=last", "--set", "training.device=cpu")
    assert result.code == 0, result.err
    assert set(json.loads(result.out)["final_loss"]) == {"dense", "0.8", "uniform"}


# ------------------------------------------------------------------------------------------------ validation


def test_recipe_validation_of_uniform_mode():
    data = {"data": {"train": str(MANIFEST)}}
    recipe = recipe_from_dict({**data, "levels": [0.5, 0.9], "sampling": {"mode": "uniform", "random_levels": 3}})
    assert (recipe.sampling.mode, recipe.sampling.random_levels) == ("uniform", 3)
    with pytest.raises(UsageError, match=r"sampling\.mode: uniform .* levels is \[\]"):
        recipe_from_dict({**data, "levels": [], "sampling": {"mode": "uniform"}})
    with pytest.raises(UsageError, match="levels is not set and there is no model.init"):
        recipe_from_dict({**data, "sampling": {"mode": "uniform"}})
    with pytest.raises(UsageError, match="sampling.mode must be one of all, sandwich, uniform"):
        recipe_from_dict({**data, "sampling": {"mode": "uniformly"}})


def test_cli_uniform_without_levels_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    result = run_cli(capsys, "finetune", "--data", MANIFEST, "--set", "levels=[]", "--sampling", "uniform", "-o",
                     tmp_path / "x.safetensors")
    assert_usage_error(result, "sampling.mode: uniform")
    assert not (tmp_path / "x.safetensors").exists()
