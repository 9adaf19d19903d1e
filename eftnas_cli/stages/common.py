"""Inputs several stages load the same way: the task's data and the teacher."""

from __future__ import annotations

from pathlib import Path

from eftnas_cli.data import TaskData, load_task_data
from eftnas_cli.recipe import Recipe
from eftnas_cli.rundir import RunDir


def task_data(recipe: Recipe, tokenizer) -> TaskData:
    task = recipe.task
    return load_task_data(
        task.name,
        tokenizer,
        data_dir=task.data_dir,
        max_seq_length=task.max_seq_length,
        max_train_samples=task.max_train_samples,
        max_eval_samples=task.max_eval_samples,
        seed=recipe.seed,
    )


def teacher_folder(recipe: Recipe, run: RunDir, *, by: str) -> str:
    """The fine-tuned teacher: the recipe's `model.teacher`, else this run's `finetune` output."""
    if recipe.model.teacher:
        return recipe.model.teacher
    return str(run.require("finetune", by=by) / "model")


def start_weights(recipe: Recipe, run: RunDir, start_from: str, *, by: str) -> str:
    """Where a training stage starts: the teacher's weights or the pretrained model."""
    return teacher_folder(recipe, run, by=by) if start_from == "teacher" else recipe.model.name


def first_eval_split(data: TaskData) -> str:
    return data.spec.eval_splits[0]


def model_files(folder: str | Path) -> list[Path]:
    """The files of a model folder a stage should record as its inputs."""
    folder = Path(folder)
    return [p for p in (folder / "model.safetensors", folder / "config.json") if p.is_file()]
