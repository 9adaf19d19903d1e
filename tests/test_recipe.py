from pathlib import Path

import pytest
from typer.testing import CliRunner

from eftnas_cli.cli import app
from eftnas_cli.recipe import RecipeError, load_recipe
from eftnas_cli.testing import make_tiny_model

CONFIGS = sorted(Path(__file__).parents[1].joinpath("configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.name


def test_there_are_shipped_recipes():
    assert any(p.name == "quickstart.yaml" for p in CONFIGS)


def test_dotted_overrides_are_typed(write_recipe):
    recipe = load_recipe(write_recipe(), ["finetune.epochs=1", "seed=3", "search.budgets=[0.5,0.3]", "model.teacher=null"])
    assert recipe.finetune.epochs == 1.0 and recipe.seed == 3
    assert recipe.search.budgets == [0.5, 0.3] and recipe.model.teacher is None


def test_the_polish_trains_like_the_supernet_at_its_own_learning_rate(write_recipe):
    recipe = load_recipe(write_recipe())
    assert recipe.export.finetune_learning_rate is None
    assert recipe.export.polish_training(recipe.supernet) == recipe.supernet
    own = load_recipe(write_recipe(), ["export.finetune_learning_rate=3e-5", "supernet.learning_rate=1e-4"])
    training = own.export.polish_training(own.supernet)
    assert training.learning_rate == 3e-5 and own.supernet.learning_rate == 1e-4
    assert training.model_dump(exclude={"learning_rate"}) == own.supernet.model_dump(exclude={"learning_rate"})


def test_unknown_key_suggests_the_nearest(write_recipe):
    with pytest.raises(RecipeError, match=r"unknown key 'finetune.learning_rat'; did you mean 'finetune.learning_rate'"):
        load_recipe(write_recipe(), ["finetune.learning_rat=1e-4"])


# Eleven bad recipes (as YAML text or as overrides), each a one-line error, exit 2, nothing written.
BAD_RECIPES = [
    ("unknown top-level key", {"sead": 1}, [], "unknown key 'sead'; did you mean 'seed'"),
    ("unknown section key", {"finetune.epoch": 1}, [], "did you mean 'finetune.epochs'"),
    ("wrong type", {"finetune.batch_size": "big"}, [], "finetune.batch_size"),
    ("out of range", {"finetune.learning_rate": -1}, [], "finetune.learning_rate"),
    ("polish lr out of range", {}, ["export.finetune_learning_rate=0"], "export.finetune_learning_rate"),
    ("bad budget", {}, ["search.budgets=[1.5]"], "budgets are fractions"),
    ("warm-up order", {"importance.warmup_start_epoch": 3, "importance.warmup_end_epoch": 1}, [], "warmup_end_epoch"),
    ("bad override syntax", {}, ["finetune.epochs"], "is not key=value"),
    ("unknown task", {"task.name": "mrcp"}, [], "unknown task 'mrcp'"),
    ("missing model folder", {"model.name": "./no/such/model"}, [], "no config.json"),
    ("missing data folder", {"task.data_dir": "/no/such/glue"}, [], "/no/such/glue"),
    ("search rows from train", {"task.search_split": "train"}, [], "task.search_split: the search rows must be rows no stage"),
    ("search rows from validation", {"task.search_split": "validation"}, [], "'validation' is an eval split of mrpc"),
    ("missing search split", {}, ["task.search_split=dev"], "mrpc/dev.parquet does not exist"),
]


@pytest.mark.parametrize("label,changes,overrides,message", BAD_RECIPES, ids=[b[0] for b in BAD_RECIPES])
def test_bad_recipe_is_one_line_exit_2_no_debris(write_recipe, tmp_path, label, changes, overrides, message):
    recipe = write_recipe(changes)
    result = CliRunner().invoke(app, ["finetune", str(recipe), *overrides])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert message in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


def test_missing_recipe_file(tmp_path):
    result = CliRunner().invoke(app, ["finetune", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "recipe file not found" in result.output


def test_invalid_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("finetune: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(path)


def test_sequence_lengths_are_checked_against_a_packaged_model_at_load():
    quickstart = next(path for path in CONFIGS if path.name == "quickstart.yaml")  # model: minilm-l6
    with pytest.raises(RecipeError, match=r"task.max_seq_length: 1024 is more than the 512 positions of model 'minilm-l6'"):
        load_recipe(quickstart, ["task.max_seq_length=1024"])
    with pytest.raises(RecipeError, match=r"search.latency_seq_len: 600 is more than the 512"):
        load_recipe(quickstart, ["search.latency=true", "search.latency_seq_len=600"])
    # A hub id is not looked up: loading a recipe never touches the network.
    assert load_recipe(quickstart, ["model.name=bert-base-uncased", "task.max_seq_length=4096"])


def test_roberta_positions_leave_out_the_padding_offset(write_recipe, tmp_path):
    roberta = make_tiny_model(tmp_path / "tiny-roberta", "roberta")  # 64 positions, pad_token_id 1
    assert load_recipe(write_recipe(), [f"model.name={roberta}", "task.max_seq_length=62"])
    with pytest.raises(RecipeError, match="63 is more than the 62 positions"):
        load_recipe(write_recipe(), [f"model.name={roberta}", "task.max_seq_length=63"])
