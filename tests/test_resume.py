"""Killed or interrupted stages continue where they stopped (#11): finetune from its checkpoints,
search from its study (train-supernet's own tests are in test_train_supernet.py)."""

import json
import signal
import subprocess
import sys
import time

import optuna
import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer

from eftnas_cli.recipe import load_recipe
from eftnas_cli.stages.finetune import finetune
from eftnas_cli.stages.pipeline import run_pipeline
from eftnas_cli.testing import crash_at_step, record_resumes
from eftnas_cli.training import QuietTrainer

# A checkpoint after every step: checkpoint_minutes is wall time, and a tiny step takes milliseconds.
EVERY_STEP = "finetune.checkpoint_minutes=1e-6"


def teacher_weights(recipe) -> dict[str, torch.Tensor]:
    return load_file(str(recipe.run_dir / "finetune" / "model" / "model.safetensors"))


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


def test_each_step_is_checkpointed_once(write_recipe, monkeypatch):
    """Saving an epoch's last step for the time and again for the epoch rewrote a complete checkpoint
    in place: its trainer state read as complete while a kill left its config truncated."""
    saved_at = []
    save = Trainer._save_checkpoint

    def recording_save(self, model, trial):
        saved_at.append(self.state.global_step)
        return save(self, model, trial)

    monkeypatch.setattr(Trainer, "_save_checkpoint", recording_save)
    finetune(load_recipe(write_recipe({"finetune.epochs": 2}), [EVERY_STEP]))
    assert len(saved_at) > 4  # the run crosses an epoch's end (the tiny task has 4 steps an epoch)
    assert saved_at == list(range(1, saved_at[-1] + 1))


def test_a_resumed_stage_reports_the_wall_time_of_every_attempt(write_recipe, monkeypatch):
    """The manifest's wall time counts the work the interrupted attempt saved, not only the last attempt's."""
    recipe = load_recipe(write_recipe(), ["name=slow-start", EVERY_STEP])
    crash_at_step(monkeypatch, 3)
    crashing_step = QuietTrainer.training_step

    def slow_step(self, *args, **kwargs):
        time.sleep(0.5)
        return crashing_step(self, *args, **kwargs)

    monkeypatch.setattr(QuietTrainer, "training_step", slow_step)
    with pytest.raises(KeyboardInterrupt):
        finetune(recipe)
    monkeypatch.undo()
    state = json.loads((recipe.run_dir / "checkpoints" / "finetune" / "checkpoint-3" / "trainer_state.json").read_text())
    earlier = state["stateful_callbacks"]["CheckpointEvery"]["attributes"]["elapsed_s"]
    assert earlier >= 1.5  # three slowed steps

    started = time.perf_counter()
    finetune(recipe)
    last_attempt = time.perf_counter() - started
    wall = json.loads((recipe.run_dir / "manifest.json").read_text())["stages"]["finetune"]["wall_time_s"]
    assert earlier <= wall <= earlier + last_attempt + 0.01


def test_a_checkpoint_from_before_wall_times_were_recorded_is_continued(write_recipe, monkeypatch):
    recipe = load_recipe(write_recipe(), ["name=older-checkpoint", EVERY_STEP])
    crash_at_step(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        finetune(recipe)
    monkeypatch.undo()
    state_file = recipe.run_dir / "checkpoints" / "finetune" / "checkpoint-3" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["stateful_callbacks"]["CheckpointEvery"]
    state_file.write_text(json.dumps(state))

    resumed_from = record_resumes(monkeypatch)
    finetune(recipe)  # the Trainer would fail at its next checkpoint on the missing entry
    assert resumed_from == [str(state_file.parent)]
    assert (recipe.run_dir / "finetune" / "model" / "model.safetensors").is_file()


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


def last_complete_step(checkpoints) -> int:
    """The step of the latest checkpoint written to its end (the kill may cut the next one short)."""
    steps = []
    for state in checkpoints.glob("checkpoint-*/trainer_state.json"):
        try:
            steps.append(json.loads(state.read_text())["global_step"])
        except ValueError:  # the kill cut this one short while writing its state
            pass
    return max(steps)


def cli(stage: str, recipe_file, *overrides) -> list[str]:
    return [sys.executable, "-m", "eftnas_cli.cli", stage, str(recipe_file), *overrides]


def kill_when(command: list[str], ready, timeout_s: float = 300) -> None:
    """Start `command`, SIGKILL it as soon as `ready()` holds; fail if it ended before."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    while not ready() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the stage finished before it could be killed"


def test_finetune_killed_with_sigkill_continues_on_the_same_command(write_recipe):
    path = write_recipe({"finetune.epochs": 6})
    recipe = load_recipe(path)
    checkpoints = recipe.run_dir / "checkpoints" / "finetune"
    command = cli("finetune", path, EVERY_STEP)
    kill_when(command, lambda: (checkpoints / "checkpoint-4").is_dir())
    killed_at = last_complete_step(checkpoints)

    second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"continuing from {checkpoints / f'checkpoint-{killed_at}'}" in " ".join(second.stderr.split())
    assert (recipe.run_dir / "finetune" / "model" / "model.safetensors").is_file()
    assert not checkpoints.exists()


def finished_trials(database) -> int:
    storage = f"sqlite:///{database}"
    try:
        names = optuna.study.get_all_study_names(storage)
        return sum(len(optuna.load_study(study_name=n, storage=storage).get_trials(
            deepcopy=False, states=[optuna.trial.TrialState.COMPLETE])) for n in names)
    except Exception:  # the killed writer's database may be mid-creation
        return 0


def test_search_killed_with_sigkill_continues_its_study(write_recipe):
    path = write_recipe({"search.population": 4, "search.trials": 40})
    recipe = load_recipe(path)
    run_pipeline(recipe, until="train-supernet")
    database = recipe.run_dir / "studies" / "search.db"
    command = cli("search", path)
    kill_when(command, lambda: database.is_file() and finished_trials(database) >= 3)
    kept = finished_trials(database)

    second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    said = " ".join(second.stderr.split())
    assert "search: continuing the study," in said
    assert int(said.split("search: continuing the study, ")[1].split(" of ")[0]) >= kept
    assert (recipe.run_dir / "search" / "pareto.json").is_file()


def test_a_search_continuing_a_done_study_records_the_study_s_measuring_time(write_recipe, monkeypatch):
    """Another choice rule re-reads the measured study: the stage's wall time is still the search's work."""
    from eftnas_cli.stages.search import SubnetEvaluator, search

    path = write_recipe({"search.population": 4, "search.trials": 8})
    run_pipeline(load_recipe(path), until="train-supernet")
    measure = SubnetEvaluator.task_metrics

    def slow_measure(self, subnet):
        if subnet not in self.metrics:
            time.sleep(0.25)
        return measure(self, subnet)

    monkeypatch.setattr(SubnetEvaluator, "task_metrics", slow_measure)
    search(load_recipe(path))
    monkeypatch.undo()
    recipe = load_recipe(path, ["search.tie_standard_errors=0"])
    started = time.perf_counter()
    search(recipe)
    last_attempt = time.perf_counter() - started
    record = json.loads((recipe.run_dir / "manifest.json").read_text())["stages"]["search"]
    assert record["recipe"]["tie_standard_errors"] == 0
    assert 8 * 0.25 <= record["wall_time_s"] <= 8 * 0.25 + 2 + last_attempt  # the 8 slowed subnets, and little else


def test_a_checkpoint_cut_short_by_a_kill_is_skipped_and_removed(write_recipe, tmp_path):
    from eftnas_cli.training import ResumableCheckpoints

    recipe = load_recipe(write_recipe())
    checkpoints = ResumableCheckpoints(tmp_path, "finetune", recipe, "finetune", [])
    checkpoints.open()
    for step, state in [(4, '{"global_step": 4}'), (8, '{"global_st'), (12, None)]:
        (checkpoints.folder / f"checkpoint-{step}").mkdir()
        if state is not None:  # 8: killed while writing its state; 12: killed before
            (checkpoints.folder / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    assert checkpoints.open() == str(checkpoints.folder / "checkpoint-4")
    assert sorted(p.name for p in checkpoints.folder.glob("checkpoint-*")) == ["checkpoint-4"]

    # Written by an eftnas whose recipes lacked task.doc_stride: still this run's, at the default.
    recorded = json.loads((checkpoints.folder / "fingerprint.json").read_text())
    del recorded["task"]["doc_stride"]
    (checkpoints.folder / "fingerprint.json").write_text(json.dumps(recorded))
    assert checkpoints.open() == str(checkpoints.folder / "checkpoint-4")

    another = load_recipe(write_recipe(), ["finetune.learning_rate=1e-4"])
    assert ResumableCheckpoints(tmp_path, "finetune", another, "finetune", []).open() is None
    assert not list(checkpoints.folder.glob("checkpoint-*"))


def test_interrupted_movement_importance_continues_with_its_scores(write_recipe, monkeypatch):
    from eftnas_cli.ranking import MovementTrainer
    from eftnas_cli.stages.importance import compute_importance

    path = write_recipe({"importance.method": "movement", "importance.start_from": "pretrained"})
    every_step = "importance.checkpoint_minutes=1e-6"
    uninterrupted = load_recipe(path, ["name=straight", every_step])
    compute_importance(uninterrupted)

    recipe = load_recipe(path, ["name=interrupted", every_step])
    crash_at_step(monkeypatch, 2, MovementTrainer)
    with pytest.raises(KeyboardInterrupt):
        compute_importance(recipe)
    monkeypatch.undo()
    checkpoints = recipe.run_dir / "checkpoints" / "importance"
    assert (checkpoints / "checkpoint-2").is_dir() and not (recipe.run_dir / "importance").exists()

    resumed_from = record_resumes(monkeypatch)
    compute_importance(recipe)
    assert resumed_from == [str(checkpoints / "checkpoint-2")]
    assert not (recipe.run_dir / "checkpoints").exists()
    straight, resumed = (load_file(str(r.run_dir / "importance" / "importance.safetensors")) for r in (uninterrupted, recipe))
    # The scores were restored from the checkpoint with the weights and the optimizer: the same ranking.
    for name in ("heads", "neurons"):
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=1e-6, msg=name)
