"""Recipe loading, validation, path resolution, overrides and serialisation."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from pydantic_core import to_jsonable_python

from dsnn_compress.errors import EXIT_USAGE, UsageError
from dsnn_compress.training.recipe import (
    TOP_LEVEL_KEYS,
    DataConfig,
    ModelConfig,
    OptimizerConfig,
    Recipe,
    TrainingConfig,
    apply_overrides,
    check_loss_weights,
    check_schedule_end,
    load_recipe,
    parse_set_option,
    recipe_from_dict,
    recipe_keys,
)

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
DOC = REPO / "docs" / "recipes.md"


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(data: object, **kwargs) -> str:
    with pytest.raises(UsageError) as info:
        recipe_from_dict(data, source=Path("r.yaml"), **kwargs)  # type: ignore[arg-type]
    assert info.value.exit_code == EXIT_USAGE
    assert info.value.message.startswith("recipe r.yaml: ")
    return info.value.message


def with_data(**sections: object) -> dict:
    return {"data": {"train": "train.jsonl"}, **sections}


# ----------------------------------------------------------------------------------------------- shipped recipes


def test_recipes_directory_matches_the_documented_table():
    """docs/recipes.md lists every shipped recipe, and every listed recipe is shipped."""
    documented = set(re.findall(r"^\| `recipes/([\w.-]+\.yaml)` \|", DOC.read_text(encoding="utf-8"), re.M))
    assert documented == {p.name for p in RECIPES}
    assert documented >= {"dsnn-conformer.yaml", "dense-conformer-s.yaml", "tiny-test.yaml"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path: Path):
    recipe = load_recipe(path)
    assert recipe.source == path
    assert recipe.data.train.is_absolute() and recipe.output.is_absolute()
    json.dumps(recipe.to_dict())
    assert recipe_from_dict(recipe.to_dict()) == recipe


def test_dsnn_conformer_recipe_values():
    """The documented default DSNN method: levels 0.5/0.7/0.9, every level each step, in-place distillation."""
    recipe = load_recipe(REPO / "recipes" / "dsnn-conformer.yaml")
    assert recipe.levels == [0.5, 0.7, 0.9]
    assert (recipe.sampling.mode, recipe.sampling.loss_weights) == ("all", None)
    assert (recipe.distillation.enabled, recipe.distillation.weight, recipe.distillation.temperature) == (True, 1, 1)
    assert recipe.schedule.enabled is False
    assert recipe.model.init == REPO / "runs" / "pruned.safetensors"
    assert (recipe.training.steps, recipe.training.epochs, recipe.training.keep) == (2000, None, "best")
    assert recipe.data.dev is not None and recipe.allocation == "per-layer"
    assert recipe.output == REPO / "runs" / "dsnn-conformer.safetensors"
    # "enable the gradual schedule below" and the documented `--set training.steps=500` both give valid recipes
    assert apply_overrides(recipe, {"schedule.enabled": True}).schedule.end_step < recipe.training.steps
    assert apply_overrides(recipe, {"training.steps": 500}).training.steps == 500


def test_dense_recipe_values():
    recipe = load_recipe(REPO / "recipes" / "dense-conformer-s.yaml")
    assert recipe.levels == []
    assert recipe.model.init is None
    assert (recipe.model.family, recipe.model.size) == ("conformer-ctc", "s")
    assert recipe.optimizer.lr == 1e-3
    assert (recipe.lr_schedule.warmup_steps, recipe.lr_schedule.decay) == (400, "inverse_sqrt")
    assert recipe.data.batch_frames == 6000 and recipe.data.spec_augment is True
    assert recipe.data.train == REPO.parent / "shared" / "corpus" / "tts-en-v1" / "train.jsonl"
    assert recipe.data.dev == REPO.parent / "shared" / "corpus" / "tts-en-v1" / "dev.jsonl"


def test_tiny_test_recipe_is_a_two_step_run_on_the_test_manifest():
    """As its header says: a tiny fresh Conformer-CTC, two steps, the 8-utterance test manifest, two levels."""
    recipe = load_recipe(REPO / "recipes" / "tiny-test.yaml")
    manifest = REPO / "tests" / "data" / "manifest.jsonl"
    assert recipe.data.train == recipe.data.dev == manifest
    assert len(manifest.read_text(encoding="utf-8").splitlines()) == 8
    assert (recipe.data.batch_frames, recipe.data.spec_augment, recipe.data.max_dev_utterances) == (2000, False, 4)
    assert recipe.model.init is None and (recipe.model.family, recipe.model.size) == ("conformer-ctc", "xs")
    assert recipe.model.config == {"d_model": 32, "num_layers": 1, "num_heads": 2, "conv_kernel": 3, "dropout": 0.0}
    assert recipe.levels == [0.5, 0.8]
    assert (recipe.sampling.mode, recipe.sampling.random_levels) == ("sandwich", 1)
    assert recipe.distillation.enabled is True and recipe.distillation.temperature == 2.0
    assert (recipe.lr_schedule.warmup_steps, recipe.lr_schedule.decay) == (1, "constant")
    assert (recipe.training.steps, recipe.training.keep, recipe.training.device) == (2, "best", "cpu")
    assert recipe.output == REPO / "runs" / "tiny-test.safetensors"


# ------------------------------------------------------------------------------------------------------ defaults


def test_minimal_recipe_gets_the_documented_defaults(tmp_path: Path):
    recipe = load_recipe(write(tmp_path, "data:\n  train: train.jsonl\n"))
    assert recipe.data == DataConfig(train=tmp_path / "train.jsonl")
    assert recipe.model == ModelConfig()
    assert recipe.levels is None and recipe.allocation == "per-layer"
    assert recipe.include == [] and recipe.exclude == []
    assert recipe.optimizer == OptimizerConfig()
    assert recipe.training == TrainingConfig(steps=1000)
    assert recipe.output == tmp_path / "dsnn-finetuned.safetensors"


def test_empty_sections_mean_defaults():
    recipe = recipe_from_dict(with_data(sampling=None, training=None, include=None))
    assert recipe.sampling.mode == "all" and recipe.training.steps == 1000 and recipe.include == []


def test_number_coercions():
    recipe = recipe_from_dict(
        with_data(
            training={"steps": 1e3, "grad_clip": 1},
            optimizer={"lr": "1e-3", "eps": 1, "betas": [0, 0.5]},
            data={"train": "t.jsonl", "batch_frames": "2e4"},
        )
    )
    assert recipe.training.steps == 1000 and isinstance(recipe.training.steps, int)
    assert recipe.training.grad_clip == 1.0 and isinstance(recipe.training.grad_clip, float)
    assert recipe.optimizer.lr == 1e-3 and recipe.optimizer.eps == 1.0
    assert recipe.optimizer.betas == (0.0, 0.5)
    assert recipe.data.batch_frames == 20000


def test_epochs_instead_of_steps():
    recipe = recipe_from_dict(with_data(training={"epochs": 2.5}))
    assert recipe.training.epochs == 2.5 and recipe.training.steps is None


def test_leading_dense_level_is_dropped():
    assert recipe_from_dict(with_data(levels=[0, 0.5, 0.9])).levels == [0.5, 0.9]
    assert recipe_from_dict(with_data(levels=[])).levels == []


# ---------------------------------------------------------------------------------------------------- validation


def test_unknown_top_level_key_suggests():
    message = error_of(with_data(optimiser={"lr": 1}))
    assert "unknown key 'optimiser'" in message and "did you mean 'optimizer'" in message


def test_section_key_at_top_level_suggests_the_dotted_key():
    assert "did you mean 'optimizer.lr'" in error_of(with_data(lr=1e-3))


def test_unknown_nested_key_suggests():
    message = error_of(with_data(training={"stepz": 5}))
    assert "unknown key 'training.stepz'" in message and "did you mean 'training.steps'" in message


@pytest.mark.parametrize(
    ("data", "key"),
    [
        (with_data(training={"steps": "ten"}), "training.steps"),
        (with_data(training={"steps": 1.5}), "training.steps"),
        (with_data(training={"steps": True}), "training.steps"),
        (with_data(optimizer={"lr": "fast"}), "optimizer.lr"),
        (with_data(optimizer={"lr": float("inf")}), "optimizer.lr"),
        (with_data(optimizer={"betas": 0.9}), "optimizer.betas"),
        (with_data(optimizer={"betas": [0.9]}), "optimizer.betas"),
        ({"data": {"train": "t", "skip_bad": "yes"}}, "data.skip_bad"),
        ({"data": {"train": "t", "spec_augment": 1}}, "data.spec_augment"),
        ({"data": {"train": 5}}, "data.train"),
        ({"data": "train.jsonl"}, "data"),
        (with_data(model={"config": [1, 2]}), "model.config"),
        (with_data(include=[1]), "include"),
        (with_data(levels="0.5,0.9"), "levels"),
        (with_data(levels=[0.5, "x"]), "levels"),
        (with_data(sampling={"loss_weights": 1}), "sampling.loss_weights"),
        (with_data(training={"device": "gpu"}), "training.device"),
    ],
)
def test_wrong_type_names_the_key(data: dict, key: str):
    message = error_of(data)
    assert key in message


@pytest.mark.parametrize(
    ("data", "key", "fragment"),
    [
        (with_data(optimizer={"lr": -1}), "optimizer.lr", "must be a positive number, got -1"),
        (with_data(optimizer={"lr": 0}), "optimizer.lr", "positive"),
        (with_data(optimizer={"weight_decay": -0.1}), "optimizer.weight_decay", "non-negative"),
        (with_data(optimizer={"betas": [0.9, 1.0]}), "optimizer.betas[1]", "[0, 1)"),
        (with_data(optimizer={"eps": 0}), "optimizer.eps", "positive"),
        ({"data": {"train": "t", "batch_frames": 0}}, "data.batch_frames", "positive integer"),
        ({"data": {"train": "t", "max_batch_size": 0}}, "data.max_batch_size", "positive"),
        ({"data": {"train": "t", "num_workers": -1}}, "data.num_workers", "non-negative"),
        ({"data": {"train": "t", "max_dev_utterances": 0}}, "data.max_dev_utterances", "positive"),
        (with_data(sampling={"random_levels": -1}), "sampling.random_levels", "non-negative"),
        (with_data(sampling={"loss_weights": [1, -1]}), "sampling.loss_weights[1]", "non-negative"),
        (with_data(sampling={"loss_weights": [0, 0]}), "sampling.loss_weights", "> 0"),
        (with_data(sampling={"loss_weights": []}), "sampling.loss_weights", "empty"),
        (with_data(distillation={"weight": -1}), "distillation.weight", "non-negative"),
        (with_data(distillation={"temperature": 0}), "distillation.temperature", "positive"),
        (with_data(schedule={"initial_fraction": 1.0}), "schedule.initial_fraction", "[0, 1)"),
        (with_data(schedule={"start_step": -1}), "schedule.start_step", "non-negative"),
        (with_data(schedule={"update_every": 0}), "schedule.update_every", "positive"),
        (with_data(schedule={"start_step": 10, "end_step": 10}), "schedule.end_step", "> schedule.start_step"),
        (with_data(schedule={"enabled": True, "end_step": 500}, training={"steps": 500}, levels=[0.5]),
         "schedule.end_step", "must be before the last training step (training.steps: 500)"),
        (with_data(schedule={"enabled": True}, training={"steps": 300}, levels=[0.5]), "training.steps",
         "schedule.end_step (600) must be before the last training step (training.steps: 300)"),
        (with_data(lr_schedule={"warmup_steps": -1}), "lr_schedule.warmup_steps", "non-negative"),
        (with_data(lr_schedule={"min_lr_ratio": 1.5}), "lr_schedule.min_lr_ratio", "[0, 1]"),
        (with_data(training={"steps": 0}), "training.steps", "positive"),
        (with_data(training={"epochs": -1}), "training.epochs", "positive"),
        (with_data(training={"grad_clip": 0}), "training.grad_clip", "positive"),
        (with_data(training={"eval_every": -1}), "training.eval_every", "non-negative"),
        (with_data(training={"checkpoint_every": -5}), "training.checkpoint_every", "non-negative"),
        (with_data(training={"log_every": 0}), "training.log_every", "positive"),
        (with_data(training={"seed": -1}), "training.seed", "[0,"),
    ],
)
def test_out_of_range_names_the_key(data: dict, key: str, fragment: str):
    message = error_of(data)
    assert key in message and fragment in message


def test_gradual_schedule_defaults_fit_the_default_run_and_end_step_may_be_the_step_before_the_last():
    default = recipe_from_dict(with_data(schedule={"enabled": True}, levels=[0.5]))
    assert default.schedule.end_step < default.training.steps
    tight = recipe_from_dict(with_data(schedule={"enabled": True, "end_step": 499}, training={"steps": 500},
                                       levels=[0.5]))
    assert tight.schedule.end_step == 499
    with pytest.raises(UsageError) as info:
        recipe_from_dict(with_data(schedule={"enabled": True, "end_step": 500}, training={"steps": 500},
                                   levels=[0.5]))
    assert "e.g. 333" in (info.value.hint or "")


@pytest.mark.parametrize(
    ("data", "key", "suggestion"),
    [
        (with_data(model={"family": "conformer"}), "model.family", "conformer-ctc"),
        (with_data(model={"normalizer": "lowr"}), "model.normalizer", "lower"),
        (with_data(model={"size": "l"}), "model.size", None),
        (with_data(lr_schedule={"decay": "cosin"}), "lr_schedule.decay", "cosine"),
        (with_data(sampling={"mode": "sandwhich"}), "sampling.mode", "sandwich"),
        (with_data(training={"keep": "bset"}), "training.keep", "best"),
        (with_data(allocation="globl"), "allocation", "global"),
    ],
)
def test_unknown_choice_names_the_key(data: dict, key: str, suggestion: str | None):
    message = error_of(data)
    assert key in message
    if suggestion:
        assert f"did you mean {suggestion!r}" in message


def test_size_is_not_checked_when_starting_from_a_checkpoint():
    recipe = recipe_from_dict(with_data(model={"init": "x.safetensors", "size": "huge"}))
    assert recipe.model.size == "huge"


@pytest.mark.parametrize(
    ("levels", "fragment"),
    [([0.9, 0.5], "must increase"), ([0.5, 0.5], "given twice"), ([0.5, 1.0], "outside (0, 1)"), ([-0.1], "outside")],
)
def test_bad_levels(levels: list, fragment: str):
    message = error_of(with_data(levels=levels))
    assert "levels" in message and fragment in message


def test_missing_data_train():
    assert "missing required key data.train" in error_of({"data": {"dev": "d.jsonl"}})
    assert "missing required key data.train" in error_of({"model": {}})
    assert "missing required key data.train" in error_of({"data": None})


def test_keep_best_requires_dev():
    message = error_of(with_data(training={"keep": "best"}))
    assert "training.keep" in message and "data.dev" in message
    assert recipe_from_dict({"data": {"train": "t", "dev": "d"}, "training": {"keep": "best"}}).training.keep == "best"


def test_steps_and_epochs_are_exclusive():
    message = error_of(with_data(training={"steps": 10, "epochs": 1}))
    assert "training.steps" in message and "training.epochs" in message


@pytest.mark.parametrize("section", ["schedule", "distillation"])
def test_schedule_and_distillation_need_levels(section: str):
    assert f"{section}.enabled" in error_of(with_data(levels=[], **{section: {"enabled": True}}))
    # levels: null without an init has no levels either
    assert f"{section}.enabled" in error_of(with_data(**{section: {"enabled": True}}))
    # levels: null with an init bundle: the bundle's levels (checked later)
    recipe_from_dict(with_data(model={"init": "b.safetensors"}, **{section: {"enabled": True}}))
    recipe_from_dict(with_data(levels=[0.5], **{section: {"enabled": True}}))


def test_sandwich_with_more_random_levels_than_middle_levels_is_allowed():
    recipe = recipe_from_dict(with_data(levels=[0.5, 0.9], sampling={"mode": "sandwich", "random_levels": 10}))
    assert recipe.sampling.random_levels == 10


def test_loss_weights_length_is_not_checked_here():
    recipe = recipe_from_dict(with_data(levels=[0.5], sampling={"loss_weights": [1, 0, 2, 3]}))
    assert recipe.sampling.loss_weights == [1.0, 0.0, 2.0, 3.0]


# ------------------------------------------------------------------------------------------------- file problems


def test_missing_file(tmp_path: Path):
    with pytest.raises(UsageError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_bad_yaml_reports_the_line(tmp_path: Path):
    path = write(tmp_path, "data:\n  train: a.jsonl\ntraining:\n  steps: [1, 2\n  seed: 3\n")
    with pytest.raises(UsageError) as info:
        load_recipe(path)
    assert str(path) in info.value.message and "invalid YAML at line" in info.value.message
    path = write(tmp_path, "data:\n  train: a.jsonl\n  dev: b: c\n")
    with pytest.raises(UsageError, match="line 3"):
        load_recipe(path)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n", ""])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str):
    with pytest.raises(UsageError, match="mapping"):
        load_recipe(write(tmp_path, text))


def test_error_names_the_file(tmp_path: Path):
    path = write(tmp_path, "data:\n  train: a.jsonl\noptimizer:\n  lr: -1\n")
    with pytest.raises(UsageError) as info:
        load_recipe(path)
    assert info.value.message == f"recipe {path}: optimizer.lr must be a positive number, got -1"


def test_yaml_booleans_only(tmp_path: Path):
    with pytest.raises(UsageError, match="data.skip_bad"):
        load_recipe(write(tmp_path, "data:\n  train: a.jsonl\n  skip_bad: 'true'\n"))
    assert load_recipe(write(tmp_path, "data:\n  train: a.jsonl\n  skip_bad: true\n")).data.skip_bad is True


def test_yaml_safe_load_only(tmp_path: Path):
    path = write(tmp_path, "data:\n  train: !!python/object/apply:os.getcwd []\n")
    with pytest.raises(UsageError, match="invalid YAML"):
        load_recipe(path)


# ------------------------------------------------------------------------------------------------------- paths


def test_relative_paths_resolve_against_the_recipe_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    sub = tmp_path / "recipes"
    sub.mkdir()
    path = write(
        sub,
        "data:\n  train: ../data/train.jsonl\n  dev: dev.jsonl\nmodel:\n  init: /abs/model.safetensors\n"
        "output: out/bundle.safetensors\n",
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    recipe = load_recipe(Path("..") / "recipes" / "r.yaml")
    assert recipe.data.train == tmp_path / "data" / "train.jsonl"
    assert recipe.data.dev == sub / "dev.jsonl"
    assert recipe.model.init == Path("/abs/model.safetensors")
    assert recipe.output == sub / "out" / "bundle.safetensors"
    assert load_recipe(path) == recipe


def test_recipe_from_dict_base_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    assert recipe_from_dict({"data": {"train": "t.jsonl"}}).data.train == tmp_path / "t.jsonl"
    assert recipe_from_dict({"data": {"train": "t.jsonl"}}, base_dir=Path("/x")).data.train == Path("/x/t.jsonl")
    recipe = recipe_from_dict({"data": {"train": "t.jsonl"}}, source=Path("/y/r.yaml"))
    assert recipe.data.train == Path("/y/t.jsonl") and recipe.source == Path("/y/r.yaml")


# --------------------------------------------------------------------------------------------------- overrides


def test_parse_set_option():
    assert parse_set_option("training.steps=50") == ("training.steps", 50)
    assert parse_set_option("levels=[0.5,0.9]") == ("levels", [0.5, 0.9])
    assert parse_set_option("data.skip_bad=true") == ("data.skip_bad", True)
    assert parse_set_option("data.dev=") == ("data.dev", None)
    assert parse_set_option(" model.init = a=b.safetensors") == ("model.init", "a=b.safetensors")
    for bad in ["training.steps", "=5", "a..b=1"]:
        with pytest.raises(UsageError):
            parse_set_option(bad)
    with pytest.raises(UsageError, match="not valid YAML"):
        parse_set_option("levels=[0.5,")


def test_overrides_apply_and_revalidate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    recipe = load_recipe(write(tmp_path, "data:\n  train: t.jsonl\nlevels: [0.5, 0.9]\ntraining:\n  steps: 10\n"))
    out = apply_overrides(
        recipe,
        {
            "training.steps": 50,
            "optimizer.lr": "3e-4",
            "levels": [0.7],
            "model.config.d_model": 64,
            "sampling": {"mode": "sandwich"},
        },
    )
    assert out.training.steps == 50 and out.optimizer.lr == 3e-4 and out.levels == [0.7]
    assert out.model.config == {"d_model": 64} and out.sampling.mode == "sandwich"
    assert recipe.training.steps == 10 and recipe.levels == [0.5, 0.9]  # not modified
    assert out.source == recipe.source
    with pytest.raises(UsageError) as info:
        apply_overrides(recipe, {"training.steps": "many"})
    assert "training.steps" in info.value.message and "override" in info.value.message
    with pytest.raises(UsageError, match="optimizer.lr"):
        apply_overrides(recipe, {"optimizer.lr": -3})
    with pytest.raises(UsageError, match="training.keep"):
        apply_overrides(recipe, {"training.keep": "best"})
    with pytest.raises(UsageError, match="schedule.enabled"):
        apply_overrides(recipe, {"levels": [], "schedule.enabled": True})


@pytest.mark.parametrize("key", ["training.stepz", "optimiser.lr", "levels.first", "training", "data.train.x"])
def test_unknown_override_key(key: str):
    recipe = recipe_from_dict(with_data())
    with pytest.raises(UsageError) as info:
        apply_overrides(recipe, {key: 1})
    assert key in info.value.message or key.split(".")[0] in info.value.message


def test_unknown_override_key_suggests():
    with pytest.raises(UsageError, match="did you mean 'training.steps'"):
        apply_overrides(recipe_from_dict(with_data()), {"training.stepz": 1})


def test_override_paths_are_relative_to_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    sub = tmp_path / "recipes"
    sub.mkdir()
    recipe = load_recipe(write(sub, "data:\n  train: t.jsonl\n"))
    cwd = tmp_path / "work"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = apply_overrides(
        recipe, {"data.dev": "dev.jsonl", "model.init": "../m.safetensors", "output": "/abs/o.safetensors"}
    )
    assert out.data.train == sub / "t.jsonl"  # from the file: still the recipe directory
    assert out.data.dev == cwd / "dev.jsonl"
    assert out.model.init == tmp_path / "m.safetensors"
    assert out.output == Path("/abs/o.safetensors")
    assert apply_overrides(recipe, {"data": {"train": "x.jsonl"}}).data.train == cwd / "x.jsonl"
    assert apply_overrides(out, {"data.dev": None}).data.dev is None


def test_steps_and_epochs_overrides_replace_each_other():
    recipe = recipe_from_dict(with_data(training={"steps": 10}))
    out = apply_overrides(recipe, {"training.epochs": 2})
    assert (out.training.steps, out.training.epochs) == (None, 2.0)
    back = apply_overrides(out, {"training.steps": 5})
    assert (back.training.steps, back.training.epochs) == (5, None)
    with pytest.raises(UsageError, match="both set"):
        apply_overrides(recipe, {"training.epochs": 2, "training.steps": 3})


# --------------------------------------------------------------------------------------------------- to_dict


def test_to_dict_round_trip():
    recipe = recipe_from_dict(
        {
            "data": {"train": "t.jsonl", "dev": "d.jsonl", "max_batch_size": 8},
            "model": {"family": "lstm-ctc", "size": "xs", "config": {"hidden": 64, "extra": [1, {"a": None}]}},
            "levels": [0.5, 0.75],
            "allocation": "global",
            "include": ["enc.*"],
            "exclude": "enc.0.*",
            "sampling": {"mode": "sandwich", "random_levels": 0, "loss_weights": [1, 0.5, 0.5]},
            "distillation": {"enabled": True, "weight": 0.5, "temperature": 2},
            "schedule": {"enabled": True, "initial_fraction": 0.1, "start_step": 5, "end_step": 50},
            "optimizer": {"betas": [0.8, 0.9]},
            "lr_schedule": {"decay": "linear", "min_lr_ratio": 0.1},
            "training": {"epochs": 1.5, "grad_clip": None, "keep": "best", "device": "cuda:1"},
        },
        source=Path("/some/dir/r.yaml"),
    )
    data = recipe.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["data"]["train"] == "/some/dir/t.jsonl" and data["optimizer"]["betas"] == [0.8, 0.9]
    assert "source" not in data
    again = recipe_from_dict(data)
    assert again == recipe
    assert again.optimizer.betas == (0.8, 0.9) and again.exclude == ["enc.0.*"]
    assert set(data) == {k.split(".")[0] for k in recipe_keys()}


def test_recipe_constructed_directly_has_working_defaults():
    recipe = Recipe(data=DataConfig(train=Path("/t.jsonl")))
    assert recipe.model.config == {} and recipe.include == [] and recipe.training.steps is None
    other = Recipe(data=DataConfig(train=Path("/t.jsonl")))
    other.include.append("x")
    assert recipe.include == []  # no shared mutable defaults


# ------------------------------------------------------------------------------------------- rules used at run time


def test_check_schedule_end_is_the_rule_the_recipe_applies():
    schedule = recipe_from_dict(with_data(schedule={"enabled": True, "end_step": 600}, levels=[0.5])).schedule
    check_schedule_end(schedule, 601)
    with pytest.raises(UsageError) as info:
        check_schedule_end(schedule, 600, "600 steps from training.epochs: 2")
    assert info.value.exit_code == EXIT_USAGE
    assert "schedule.end_step (600) must be before the last training step (600 steps" in info.value.message
    assert "e.g. 400" in (info.value.hint or "")
    check_schedule_end(recipe_from_dict(with_data()).schedule, 1)  # disabled: no constraint


def test_check_loss_weights():
    assert check_loss_weights(None, 2) == [1.0, 1.0, 1.0]
    assert check_loss_weights([1, 0.5], 1) == [1.0, 0.5]
    with pytest.raises(UsageError, match="sampling.loss_weights has 4 values but there are 2 levels"):
        check_loss_weights([1, 0, 2, 3], 1)


# ------------------------------------------------------------------------------------------------ documentation

REQUIRED = object()


def doc_key_defaults() -> dict[str, str]:
    """``{dotted key: default cell}`` from the key tables (``| key | type | default | allowed |``) of the doc."""
    rows: dict[str, str] = {}
    section, in_table = "", False
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            title = line[3:].split()[0]
            section, in_table = ("" if title == "Top" else title), False
        elif line.startswith("| key |"):
            in_table = True
        elif in_table and line.startswith("| `"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            key = cells[0].strip("`")
            rows[f"{section}.{key}" if section else key] = cells[2]
        elif not line.startswith("|"):
            in_table = False
    return rows


def model_default(key: str) -> object:
    cls: type = Recipe
    *parents, leaf = key.split(".")
    for parent in parents:
        cls = Recipe.model_fields[parent].annotation  # type: ignore[assignment]
    info = cls.model_fields[leaf]  # type: ignore[attr-defined]
    return REQUIRED if info.is_required() else to_jsonable_python(info.get_default(call_default_factory=True))


def doc_default(cell: str) -> object:
    if "(required)" in cell:
        return REQUIRED
    token = re.match(r"`([^`]*)`", cell)
    assert token, f"no default in {cell!r}"
    value = yaml.safe_load(token.group(1))
    if isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value):
        value = float(value)  # YAML 1.1 reads 1e-3 as a string
    return value


def test_doc_key_tables_list_exactly_the_recipe_keys():
    documented = set(doc_key_defaults())
    expected = set(recipe_keys()) | set(TOP_LEVEL_KEYS)
    assert documented - expected == set(), "documented keys that recipes do not have"
    assert expected - documented == set(), "recipe keys missing from docs/recipes.md"


def test_doc_key_tables_give_the_model_defaults():
    for key, cell in doc_key_defaults().items():
        if key in TOP_LEVEL_KEYS and "defaults below" in cell:
            continue  # a section
        assert doc_default(cell) == model_default(key), key
