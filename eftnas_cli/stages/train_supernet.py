"""Stage `train-supernet`: the weight-reordered, elastic super-network, trained with the sandwich rule.

Weights are permuted so the most important heads and neurons come first (importance stage), which
makes every subnet of the search space a leading slice. Each optimizer step accumulates gradients
from the largest subnet, `num_random_subnets` random ones and the smallest, each distilled from the
fine-tuned teacher (the task kind's KD loss: KL on temperature-scaled class logits, MSE on a regression
score, KL on QA start/end logits) plus the hard labels.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import torch
from transformers import TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from eftnas_cli import artifacts, elastic
from eftnas_cli.data import recipe_task_data
from eftnas_cli.errors import UserError
from eftnas_cli.models import load_model, load_tokenizer, save_model
from eftnas_cli.recipe import Recipe
from eftnas_cli.rundir import RunDir, holds_lock, sha256, write_json
from eftnas_cli.supernet import Supernet
from eftnas_cli.training import CheckpointEvery, DistillationTrainer, RichProgress, pop_labels, training_arguments
from eftnas_cli.ui import console

BY = "train-supernet"
CHECKPOINT_FINGERPRINT = "fingerprint.json"  # beside the checkpoints: the run they belong to


def probe_subnets(space: elastic.SearchSpace) -> dict[str, elastic.Subnet]:
    """The subnets evaluated each epoch: largest, the middle MACs target, smallest."""
    middle = space.targets[len(space.targets) // 2]["subnet"]
    return {"largest": space.largest(), "middle": elastic.Subnet.from_dict(middle), "smallest": space.smallest()}


class SandwichTrainer(DistillationTrainer):
    """A DistillationTrainer whose step backpropagates largest + random + smallest subnets."""

    def __init__(self, *args, supernet: Supernet, num_random_subnets: int, seed: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.supernet, self.num_random_subnets, self.seed = supernet, num_random_subnets, seed

    def step_subnets(self) -> list[elastic.Subnet]:
        # Seeded by the step, so a resumed run samples the same subnets as an uninterrupted one.
        generator = np.random.default_rng([self.seed, self.state.global_step])
        randoms = [self.supernet.sample(generator) for _ in range(self.num_random_subnets)]
        return [self.supernet.largest(), *randoms, self.supernet.smallest()]

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        inputs = self._prepare_inputs(inputs)
        labels = pop_labels(inputs, self.spec)
        teacher_outputs = self.teacher_outputs(inputs)
        subnets = self.step_subnets()
        scale = len(subnets) * self.current_gradient_accumulation_steps
        total = torch.zeros((), device=self.args.device)
        for subnet in subnets:
            self.supernet.activate(subnet)
            with self.compute_loss_context_manager():
                loss, _ = self.student_loss(model, inputs, labels, teacher_outputs)
            self.accelerator.backward(loss / scale)
            total += loss.detach() / scale
        self.supernet.activate(self.supernet.largest())
        return total


class ProbeEvaluation(TrainerCallback):
    """Each epoch, evaluate the largest, a middle and the smallest subnet on the search rows (not
    the validation split, which is read once per final model); keep the history."""

    def __init__(self, supernet: Supernet, data, batch_size: int):
        self.supernet, self.data, self.batch_size = supernet, data, batch_size
        self.probes = probe_subnets(supernet.space)
        self.history: list[dict] = []

    def evaluate_probes(self) -> dict[str, dict]:
        return {name: self.supernet.evaluate(subnet, self.data.search, self.data, self.batch_size)
                for name, subnet in self.probes.items()}

    def on_epoch_end(self, args, state, control, **kwargs):
        results = self.evaluate_probes()
        self.history.append({"epoch": round(state.epoch, 2), **{k: v["score"] for k, v in results.items()}})
        console.print(f"  epoch {state.epoch:.2f}: " + ", ".join(f"{k} {v['score']:.4f}" for k, v in results.items()))


def _checkpoint_fingerprint(recipe: Recipe, inputs: list) -> dict:
    """What a checkpoint must have been trained with to be continued: the recipe (section and
    shared settings) and the hashes of the files the stage reads."""
    return {"supernet": recipe.supernet.model_dump(mode="json"), "seed": recipe.seed,
            "model": recipe.model.model_dump(mode="json"), "task": recipe.task.model_dump(mode="json"),
            "inputs": {str(path): sha256(path) for path in inputs}}


def _last_checkpoint(checkpoints, fingerprint: dict) -> str | None:
    """The latest complete checkpoint of an interrupted run with the same fingerprint; checkpoints
    of any other run (changed recipe or inputs) are removed."""
    if not checkpoints.is_dir():
        return None
    recorded = checkpoints / CHECKPOINT_FINGERPRINT
    if recorded.is_file() and json.loads(recorded.read_text()) == fingerprint:
        # The Trainer writes its state last: a checkpoint without it was cut short by the kill.
        complete = [path for path in checkpoints.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if (path / TRAINER_STATE_NAME).is_file()]
        return str(max(complete, key=lambda path: int(path.name.rpartition("-")[2]))) if complete else None
    shutil.rmtree(checkpoints)
    return None


@holds_lock("train-supernet")
def train_supernet(recipe: Recipe, resume: bool = False) -> dict:
    """Writes `supernet/model` (reordered full-size weights) with its `search_space.json`.

    Checkpoints every `supernet.checkpoint_minutes` of training; a run that was killed or
    interrupted continues from its last checkpoint when started again with the same recipe and
    inputs. `resume=True` insists on such a checkpoint."""
    run = RunDir(recipe)
    section = recipe.supernet
    importance = artifacts.load_importance(run, by=BY)
    space_file = artifacts.gen_space_file(run, by=BY)
    teacher_dir = artifacts.teacher_folder(recipe, run, by=BY)
    source = artifacts.start_weights(recipe, run, section.start_from, by=BY)
    inputs = [importance.path, space_file, *artifacts.model_files(teacher_dir), *artifacts.model_files(source)]
    checkpoints = run.path / "checkpoints" / "supernet"
    fingerprint = _checkpoint_fingerprint(recipe, inputs)
    last_checkpoint = _last_checkpoint(checkpoints, fingerprint)
    if resume and last_checkpoint is None:
        raise UserError(f"--resume: no checkpoint of this recipe in {checkpoints}; start without --resume")
    if last_checkpoint is not None:
        console.print(f"train-supernet: continuing from {last_checkpoint}", soft_wrap=True)
    checkpoints.mkdir(parents=True, exist_ok=True)
    write_json(checkpoints / CHECKPOINT_FINGERPRINT, fingerprint)

    tokenizer = load_tokenizer(recipe.model.name)
    data = recipe_task_data(recipe, tokenizer)
    supernet = Supernet.build(source, data.spec, importance, elastic.SearchSpace.load(space_file))
    teacher = load_model(teacher_dir, data.spec)
    probes = ProbeEvaluation(supernet, data, section.eval_batch_size)
    with run.stage("train-supernet") as out:
        for path in inputs:
            out.add_input(path)
        trainer = SandwichTrainer(
            model=supernet.model,
            args=training_arguments(section, checkpoints, recipe.seed, device=recipe.device,
                                    save_steps=section.save_steps),
            train_dataset=data.train,
            data_collator=data.collator,
            processing_class=tokenizer,
            callbacks=[RichProgress(f"super-network on {data.spec.name} (sandwich of {section.num_random_subnets + 2})"),
                       probes, CheckpointEvery(section.checkpoint_minutes)],
            teacher=teacher,
            spec=data.spec,
            distillation_weight=section.distillation_weight,
            temperature=section.temperature,
            hidden_weight=section.hidden_distillation_weight,
            supernet=supernet,
            num_random_subnets=section.num_random_subnets,
            seed=recipe.seed,
        )
        trainer.train(resume_from_checkpoint=last_checkpoint)
        final = probes.evaluate_probes()  # leaves the largest subnet active, the one saved
        folder = out.dir / artifacts.MODEL_FOLDER
        save_model(supernet.model, tokenizer, folder)
        shutil.copy(space_file, out.dir / artifacts.SPACE_FILE)
        out.metrics = {
            "final": final,
            "history": probes.history,
            "probe_gmacs": {name: supernet.macs(subnet) / 1e9 for name, subnet in probes.probes.items()},
        }
        write_json(out.dir / "metrics.json", out.metrics)
    # The finished super-network is saved; the resumable checkpoints are no longer needed.
    shutil.rmtree(checkpoints, ignore_errors=True)
    if not any(checkpoints.parent.iterdir()):
        checkpoints.parent.rmdir()
    console.print("super-network: " + ", ".join(f"{k} {v['score']:.4f}" for k, v in final.items()))
    return out.metrics
