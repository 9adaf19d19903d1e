import math
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from eftnas_cli.data import recipe_task_data
from eftnas_cli.elastic import SearchSpace
from eftnas_cli.errors import UserError
from eftnas_cli.models import load_tokenizer
from eftnas_cli.recipe import load_recipe
from eftnas_cli.stages import train_supernet as train_supernet_stage
from eftnas_cli.stages.finetune import finetune
from eftnas_cli.stages.gen_space import generate_space
from eftnas_cli.stages.importance import compute_importance
from eftnas_cli.stages.train_supernet import SandwichTrainer, train_supernet
from eftnas_cli.supernet import Supernet
from eftnas_cli.tasks import get_task
from eftnas_cli.testing import crash_at_step, record_resumes, write_tiny_recipe
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
    crash_at_step(monkeypatch, 3, SandwichTrainer)
    with pytest.raises(KeyboardInterrupt):
        train_supernet(recipe)
    assert (recipe.run_dir / "checkpoints" / "supernet" / "checkpoint-2").is_dir()
    assert not (recipe.run_dir / "supernet").exists()

    monkeypatch.setattr(SandwichTrainer, "training_step", original_step)
    resumed_from = record_resumes(monkeypatch, SandwichTrainer)
    metrics = train_supernet(recipe, resume=True)
    assert resumed_from[0].endswith("checkpoint-2")
    assert set(metrics["final"]) == {"largest", "middle", "smallest"}
    assert metrics["probe_gmacs"]["smallest"] < metrics["probe_gmacs"]["largest"]
    assert (recipe.run_dir / "supernet" / "model" / "model.safetensors").is_file()
    assert not (recipe.run_dir / "checkpoints").exists()


def test_probes_read_probe_rows_once_per_epoch(recipe_with_space, monkeypatch):
    """Each probe reads the first PROBE_ROWS search rows, and the end of training reuses the last
    epoch's probes instead of evaluating them again."""
    monkeypatch.setattr(train_supernet_stage, "PROBE_ROWS", 3)
    rows_read = []
    evaluate = Supernet.evaluate

    def counted(self, subnet, rows, data, batch_size=64):
        rows_read.append(len(rows))
        return evaluate(self, subnet, rows, data, batch_size)

    monkeypatch.setattr(Supernet, "evaluate", counted)
    metrics = train_supernet(recipe_with_space)
    search_rows = len(recipe_task_data(recipe_with_space, load_tokenizer(recipe_with_space.model.name)).search)
    assert search_rows > 3
    assert rows_read == [3] * 3 * len(metrics["history"])
    assert {name: result["score"] for name, result in metrics["final"].items()} == {
        name: score for name, score in metrics["history"][-1].items() if name != "epoch"}


def test_resume_without_checkpoint_is_a_user_error(recipe_with_space):
    with pytest.raises(UserError, match="no checkpoint"):
        train_supernet(recipe_with_space, resume=True)


def test_sandwich_is_largest_random_smallest(recipe_with_space):
    space = SearchSpace.load(recipe_with_space.run_dir / "space" / "search_space.json")

    # Just what step_subnets reads of the trainer.
    trainer = SimpleNamespace(seed=0, state=SimpleNamespace(global_step=5), supernet=space, num_random_subnets=2,
                              random_subnets="uniform")
    subnets = SandwichTrainer.step_subnets(trainer)
    assert len(subnets) == 4
    assert subnets[0] == space.largest() and subnets[-1] == space.smallest()
    for subnet in subnets[1:-1]:
        for layer, choice in zip(subnet.layers, space.choices):
            assert layer.heads in choice["heads"] and layer.neurons in choice["neurons"]
    assert SandwichTrainer.step_subnets(trainer) == subnets  # seeded by the step: resumable
    generator = np.random.default_rng([0, 5])
    assert subnets[1:-1] == [space.sample(generator) for _ in range(2)]
    trainer.random_subnets = "spread"
    generator = np.random.default_rng([0, 5])
    assert SandwichTrainer.step_subnets(trainer)[1:-1] == [space.sample_spread(generator) for _ in range(2)]


def test_distillation_loss_of_each_task_kind():
    spec = get_task("mrpc")
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.3]])
    teacher = SimpleNamespace(logits=logits)
    labels = {"labels": torch.tensor([0, 1])}
    assert distillation_loss(teacher, teacher, labels, spec, weight=1.0, temperature=2.0).item() == pytest.approx(0, abs=1e-6)
    hard = distillation_loss(teacher, teacher, labels, spec, weight=0.0, temperature=2.0)
    assert hard.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, labels["labels"]).item())
    regression = get_task("stsb")
    loss = distillation_loss(SimpleNamespace(logits=torch.tensor([[1.0]])), SimpleNamespace(logits=torch.tensor([[3.0]])),
                             {"labels": torch.tensor([2.0])}, regression, 0.5, 2.0)
    assert loss.item() == pytest.approx(0.5 * 4 + 0.5 * 1)

    # QA: KD on the start and the end distributions, hard loss on the gold positions, averaged.
    squad = get_task("squad")
    start, end = torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([[0.0, 0.0, 2.0]])
    student = SimpleNamespace(start_logits=start, end_logits=end)
    positions = {"start_positions": torch.tensor([1]), "end_positions": torch.tensor([0])}
    assert distillation_loss(student, student, positions, squad, weight=1.0, temperature=2.0).item() == pytest.approx(0, abs=1e-6)
    hard = distillation_loss(student, student, positions, squad, weight=0.0, temperature=2.0).item()
    expected = (math.log(2 + math.e) - 1 + math.log(2 + math.e**2)) / 2  # CE at start 1, at end 0, averaged
    assert hard == pytest.approx(expected, rel=1e-5)
    uniform = SimpleNamespace(start_logits=torch.zeros(1, 3), end_logits=torch.zeros(1, 3))
    soft = distillation_loss(uniform, student, positions, squad, weight=1.0, temperature=1.0).item()
    # KL(teacher || uniform student) = log 3 - H(teacher), once for start and once for end, averaged.
    entropy = lambda logits: -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum().item()  # noqa: E731
    assert soft == pytest.approx((2 * math.log(3) - entropy(start) - entropy(end)) / 2, rel=1e-5)


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
    # The latest checkpoint written to its end: the kill may have cut the next one short.
    killed_at = max(int(p.parent.name.removeprefix("checkpoint-")) for p in checkpoints.glob("checkpoint-*/trainer_state.json"))

    second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"continuing from {checkpoints / f'checkpoint-{killed_at}'}" in " ".join(second.stderr.split())
    assert (recipe_with_space.run_dir / "supernet" / "model" / "model.safetensors").is_file()
    assert not checkpoints.exists()
