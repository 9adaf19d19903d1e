import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
import yaml

from eftnas_cli.data import get_task
from eftnas_cli.elastic import SearchSpace
from eftnas_cli.errors import UserError
from eftnas_cli.recipe import load_recipe
from eftnas_cli.stages.finetune import finetune
from eftnas_cli.stages.gen_space import generate_space
from eftnas_cli.stages.importance import compute_importance
from eftnas_cli.stages.train_supernet import SandwichTrainer, train_supernet
from eftnas_cli.testing import write_tiny_recipe
from eftnas_cli.training import distillation_loss


@pytest.fixture(scope="module")
def recipe_with_space(tmp_path_factory, tiny_model_dir, tiny_glue_dir):
    """A tiny run up to gen-space, shared by this module's tests."""
    root = tmp_path_factory.mktemp("supernet")
    path = write_tiny_recipe(root / "recipe.yaml", root / "runs", tiny_model_dir, tiny_glue_dir)
    recipe = load_recipe(path, ["supernet.max_steps=4", "supernet.save_steps=2"])
    finetune(recipe)
    compute_importance(recipe)
    generate_space(recipe)
    return recipe


def test_interrupted_training_resumes_from_its_checkpoint(recipe_with_space, monkeypatch):
    recipe = recipe_with_space
    original_step = SandwichTrainer.training_step

    def step_then_crash(self, *args, **kwargs):
        if self.state.global_step == 3:
            raise KeyboardInterrupt
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(SandwichTrainer, "training_step", step_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train_supernet(recipe)
    assert (recipe.run_dir / "checkpoints" / "supernet" / "checkpoint-2").is_dir()
    assert not (recipe.run_dir / "supernet").exists()

    monkeypatch.setattr(SandwichTrainer, "training_step", original_step)
    resumed_from = []
    original_train = SandwichTrainer.train

    def record_train(self, *args, resume_from_checkpoint=None, **kwargs):
        resumed_from.append(resume_from_checkpoint)
        return original_train(self, *args, resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    monkeypatch.setattr(SandwichTrainer, "train", record_train)
    metrics = train_supernet(recipe, resume=True)
    assert resumed_from[0].endswith("checkpoint-2")
    assert set(metrics["final"]) == {"largest", "middle", "smallest"}
    assert metrics["probe_gmacs"]["smallest"] < metrics["probe_gmacs"]["largest"]
    assert (recipe.run_dir / "supernet" / "model" / "model.safetensors").is_file()
    assert not (recipe.run_dir / "checkpoints").exists()


def test_resume_without_checkpoint_is_a_user_error(recipe_with_space):
    with pytest.raises(UserError, match="no checkpoint"):
        train_supernet(recipe_with_space, resume=True)


def test_sandwich_is_largest_random_smallest(recipe_with_space):
    space = SearchSpace.load(recipe_with_space.run_dir / "space" / "search_space.json")

    # Just what step_subnets reads of the trainer.
    trainer = SimpleNamespace(seed=0, state=SimpleNamespace(global_step=5), supernet=space, num_random_subnets=2)
    subnets = SandwichTrainer.step_subnets(trainer)
    assert len(subnets) == 4
    assert subnets[0] == space.largest() and subnets[-1] == space.smallest()
    for subnet in subnets[1:-1]:
        for layer, choice in zip(subnet.layers, space.choices):
            assert layer.heads in choice["heads"] and layer.neurons in choice["neurons"]
    assert SandwichTrainer.step_subnets(trainer) == subnets  # seeded by the step: resumable


def test_distillation_loss():
    spec = get_task("mrpc")
    teacher = torch.tensor([[2.0, -1.0], [0.5, 0.3]])
    labels = torch.tensor([0, 1])
    assert distillation_loss(teacher, teacher, labels, spec, weight=1.0, temperature=2.0).item() == pytest.approx(0, abs=1e-6)
    hard = distillation_loss(teacher, teacher, labels, spec, weight=0.0, temperature=2.0)
    assert hard.item() == pytest.approx(torch.nn.functional.cross_entropy(teacher, labels).item())
    regression = get_task("stsb")
    loss = distillation_loss(torch.tensor([[1.0]]), torch.tensor([[3.0]]), torch.tensor([2.0]), regression, 0.5, 2.0)
    assert loss.item() == pytest.approx(0.5 * 4 + 0.5 * 1)


def test_killed_training_continues_from_its_last_checkpoint_without_a_flag(recipe_with_space, tmp_path):
    """kill -9 in the middle, run the same command again: it continues, losing at most one
    checkpoint interval, and finishes the stage."""
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe_with_space.model_dump(mode="json")))
    command = [sys.executable, "-m", "eftnas_cli.cli", "train-supernet", str(recipe_file),
               "supernet.max_steps=60", "supernet.save_steps=5"]
    checkpoints = recipe_with_space.run_dir / "checkpoints" / "supernet"
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (checkpoints / "checkpoint-10").is_dir() and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    # The kill may land while checkpoint-10 is being written: the run continues from the last
    # complete checkpoint (its trainer_state.json is written last).
    killed_at = max(int(p.name.removeprefix("checkpoint-")) for p in checkpoints.glob("checkpoint-*")
                    if (p / "trainer_state.json").is_file())

    second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"continuing from {checkpoints / f'checkpoint-{killed_at}'}" in " ".join(second.stderr.split())
    assert (recipe_with_space.run_dir / "supernet" / "model" / "model.safetensors").is_file()
    assert not checkpoints.exists()
