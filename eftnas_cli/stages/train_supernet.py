"""Stage `train-supernet`: the weight-reordered, elastic super-network, trained with the sandwich rule.

Weights are permuted so the most important heads and neurons come first (importance stage), which
makes every subnet of the search space a leading slice. Each optimizer step accumulates gradients
from the largest subnet, `num_random_subnets` random ones and the smallest, each distilled from the
fine-tuned teacher (the task kind's KD loss: KL on temperature-scaled class logits, MSE on a regression
score, KL on QA start/end logits) plus the hard labels.
"""

from __future__ import annotations

import contextlib
import shutil

import numpy as np
import torch
from transformers import TrainerCallback

from eftnas_cli import artifacts, distributed, elastic
from eftnas_cli.data import recipe_task_data
from eftnas_cli.errors import UserError
from eftnas_cli.models import load_model, load_tokenizer, save_model
from eftnas_cli.recipe import Recipe
from eftnas_cli.rundir import RunDir, holds_lock, write_json
from eftnas_cli.supernet import Supernet
from eftnas_cli.training import (
    DistillationTrainer,
    ResumableCheckpoints,
    RichProgress,
    pop_labels,
    training_arguments,
)
from eftnas_cli.ui import console

BY = "train-supernet"


def probe_subnets(space: elastic.SearchSpace) -> dict[str, elastic.Subnet]:
    """The subnets evaluated each epoch: largest, the middle MACs target, smallest."""
    middle = space.targets[len(space.targets) // 2]["subnet"]
    return {"largest": space.largest(), "middle": elastic.Subnet.from_dict(middle), "smallest": space.smallest()}


class SandwichTrainer(DistillationTrainer):
    """A DistillationTrainer whose step backpropagates largest + random + smallest subnets.

    In a multi-process (DDP) run every rank trains the same subnets (sampled from the seed and the
    step) on its share of the batch, and the gradients are all-reduced once per optimizer step: the
    backward passes before the last run under `no_sync` and only accumulate locally.
    """

    def __init__(self, *args, supernet: Supernet, num_random_subnets: int, random_subnets: str, seed: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.supernet, self.num_random_subnets, self.random_subnets, self.seed = supernet, num_random_subnets, random_subnets, seed

    def step_subnets(self) -> list[elastic.Subnet]:
        # Seeded by the step, so a resumed run samples the same subnets as an uninterrupted one.
        generator = np.random.default_rng([self.seed, self.state.global_step])
        sample = self.supernet.sample_spread if self.random_subnets == "spread" else self.supernet.sample
        randoms = [sample(generator) for _ in range(self.num_random_subnets)]
        return [self.supernet.largest(), *randoms, self.supernet.smallest()]

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        inputs = self._prepare_inputs(inputs)
        labels = pop_labels(inputs, self.spec)
        teacher_outputs = self.teacher_outputs(inputs)
        subnets = self.step_subnets()
        scale = len(subnets) * self.current_gradient_accumulation_steps
        total = torch.zeros((), device=self.args.device)
        for index, subnet in enumerate(subnets):
            self.supernet.activate(subnet)
            # DDP decides in the forward whether the backward all-reduces: both go under no_sync.
            last = index == len(subnets) - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                with self.compute_loss_context_manager():
                    loss, _ = self.student_loss(model, inputs, labels, teacher_outputs)
                self.accelerator.backward(loss / scale)
            total += loss.detach() / scale
        self.supernet.activate(self.supernet.largest())
        return total


# Rows of the search split each probe reads: the probes show how training goes (one standard error
# of an accuracy is 1 to 1.6 points on 1,000 rows), they choose nothing. Reading all 6,735 of
# SST-2's, and again at the end, made its super-network's stage 7m20s instead of 6m04s.
PROBE_ROWS = 1000


class ProbeEvaluation(TrainerCallback):
    """Each epoch, evaluate the largest, a middle and the smallest subnet on the first `PROBE_ROWS`
    search rows (not the validation split, which is read once per final model); keep the history."""

    def __init__(self, supernet: Supernet, data, batch_size: int):
        self.supernet, self.data, self.batch_size = supernet, data, batch_size
        self.rows = data.search.select(range(min(len(data.search), PROBE_ROWS)))
        self.probes = probe_subnets(supernet.space)
        self.history: list[dict] = []
        self.last: tuple[int, dict[str, dict]] | None = None  # (global step, results) of the last evaluation

    def evaluate_probes(self) -> dict[str, dict]:
        return {name: self.supernet.evaluate(subnet, self.rows, self.data, self.batch_size)
                for name, subnet in self.probes.items()}

    def final(self, global_step: int) -> dict[str, dict]:
        """The probes at the end of training: the last epoch's results when training ended there."""
        if self.last is not None and self.last[0] == global_step:
            return self.last[1]
        return self.evaluate_probes()

    def on_epoch_end(self, args, state, control, **kwargs):
        results = self.evaluate_probes()  # every rank: each evaluates its share of the rows
        self.last = (state.global_step, results)
        self.history.append({"epoch": round(state.epoch, 2), **{k: v["score"] for k, v in results.items()}})
        console.print(f"  epoch {state.epoch:.2f}: " + ", ".join(f"{k} {v['score']:.4f}" for k, v in results.items()))


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
    checkpoints = ResumableCheckpoints(run.path, "supernet", recipe, "supernet", inputs)
    # The main process decides which checkpoint every rank continues from (and clears stale ones).
    last_checkpoint = distributed.on_main(checkpoints.open)
    if resume and last_checkpoint is None:
        raise UserError(f"--resume: no checkpoint of this recipe in {checkpoints.folder}; start without --resume")
    console.print(f"train-supernet: continuing from {last_checkpoint}" if last_checkpoint else
                  "train-supernet: starting (no checkpoint of this recipe yet)", soft_wrap=True)

    tokenizer = load_tokenizer(recipe.model.name)
    with distributed.main_first():  # the main process fills the tokenization cache
        data = recipe_task_data(recipe, tokenizer)
    supernet = Supernet.build(source, data.spec, importance, elastic.SearchSpace.load(space_file))
    teacher = load_model(teacher_dir, data.spec)
    probes = ProbeEvaluation(supernet, data, section.eval_batch_size)
    with run.stage("train-supernet", started=checkpoints.started) as out:
        for path in inputs:
            out.add_input(path)
        trainer = SandwichTrainer(
            model=supernet.model,
            args=training_arguments(section, checkpoints.folder, recipe.seed, device=recipe.device,
                                    save_steps=section.save_steps),
            train_dataset=data.train,
            data_collator=data.collator,
            processing_class=tokenizer,
            callbacks=[RichProgress(f"super-network on {data.spec.name} (sandwich of {section.num_random_subnets + 2})"),
                       probes, checkpoints.every(section.checkpoint_minutes)],
            teacher=teacher,
            spec=data.spec,
            distillation_weight=section.distillation_weight,
            temperature=section.temperature,
            hidden_weight=section.hidden_distillation_weight,
            supernet=supernet,
            num_random_subnets=section.num_random_subnets,
            random_subnets=section.random_subnets,
            seed=recipe.seed,
        )
        trainer.train(resume_from_checkpoint=last_checkpoint)
        final = probes.final(trainer.state.global_step)  # the largest subnet is active: the one saved
        out.metrics = {
            "final": final,
            "history": probes.history,
            "probe_gmacs": {name: supernet.macs(subnet) / 1e9 for name, subnet in probes.probes.items()},
        }
        if out.writes:
            save_model(supernet.model, tokenizer, out.dir / artifacts.MODEL_FOLDER)
            shutil.copy(space_file, out.dir / artifacts.SPACE_FILE)
            write_json(out.dir / "metrics.json", out.metrics)
    if distributed.is_main():
        checkpoints.remove()  # the finished super-network is saved
    console.print("super-network: " + ", ".join(f"{k} {v['score']:.4f}" for k, v in final.items()))
    return out.metrics
