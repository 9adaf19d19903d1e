"""The finetune stage continues an interrupted run from its checkpoints (#11)."""

import pytest
import torch
from safetensors.torch import load_file

from eftnas_cli.recipe import load_recipe
from eftnas_cli.stages.finetune import finetune
from eftnas_cli.training import QuietTrainer

# A checkpoint after every step: checkpoint_minutes is wall time, and a tiny step takes milliseconds.
EVERY_STEP = "finetune.checkpoint_minutes=1e-6"


def teacher_weights(recipe) -> dict[str, torch.Tensor]:
    return load_file(str(recipe.run_dir / "finetune" / "model" / "model.safetensors"))


def crash_at_step(monkeypatch, step: int) -> None:
    original = QuietTrainer.training_step

    def step_then_crash(self, *args, **kwargs):
        if self.state.global_step == step:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(QuietTrainer, "training_step", step_then_crash)


def record_resumes(monkeypatch) -> list:
    """The checkpoint each later `train()` call continues from (None: from the start)."""
    resumed_from = []
    original_train = QuietTrainer.train

    def record_train(self, *args, resume_from_checkpoint=None, **kwargs):
        resumed_from.append(resume_from_checkpoint)
        return original_train(self, *args, resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    monkeypatch.setattr(QuietTrainer, "train", record_train)
    return resumed_from


def test_interrupted_finetune_continues_where_it_stopped(write_recipe, monkeypatch):
    path = write_recipe()
    uninterrupted = load_recipe(path, ["name=straight", EVERY_STEP])
    finetune(uninterrupted)

    recipe = load_recipe(path, ["name=interrupted", EVERY_STEP])
    checkpoints = recipe.run_dir / "checkpoints" / "finetune"
    crash_at_step(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        finetune(recipe)
    assert (checkpoints / "checkpoint-5").is_dir()
    assert not (recipe.run_dir / "finetune").exists()  # nothing half-written in the stage folder
    monkeypatch.undo()

    resumed_from = record_resumes(monkeypatch)
    finetune(recipe)
    assert resumed_from == [str(checkpoints / "checkpoint-5")]
    assert not (recipe.run_dir / "checkpoints").exists()  # the checkpoints served and are gone
    straight, resumed = teacher_weights(uninterrupted), teacher_weights(recipe)
    # Resuming restores the optimizer, scheduler, data order and RNG: the same teacher up to float noise.
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-5, msg=name)


def test_checkpoints_of_another_recipe_are_not_continued(write_recipe, monkeypatch):
    path = write_recipe()
    recipe = load_recipe(path, [EVERY_STEP])
    checkpoints = recipe.run_dir / "checkpoints" / "finetune"
    crash_at_step(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        finetune(recipe)
    monkeypatch.undo()
    assert (checkpoints / "checkpoint-3").is_dir()

    changed = load_recipe(path, [EVERY_STEP, "finetune.learning_rate=5e-4"])
    resumed_from = record_resumes(monkeypatch)
    finetune(changed)
    assert resumed_from == [None]
    assert (recipe.run_dir / "finetune" / "model" / "model.safetensors").is_file()
