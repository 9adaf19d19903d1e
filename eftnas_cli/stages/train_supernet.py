"""Stage `train-supernet`: the weight-reordered, elastic super-network, trained with the sandwich rule.

Weights are permuted so the most important heads and neurons come first (importance stage), which
makes every subnet of the search space a leading slice. Each optimizer step accumulates gradients
from the largest subnet, `num_random_subnets` random ones and the smallest, each distilled from the
fine-tuned teacher (KL on temperature-scaled logits, MSE for regression) plus the hard labels.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from eftnas_cli import elastic
from eftnas_cli.errors import UserError
from eftnas_cli.models import load_model, load_tokenizer, save_model
from eftnas_cli.recipe import Recipe
from eftnas_cli.rundir import RunDir, write_json
from eftnas_cli.stages.common import first_eval_split, model_files, start_weights, task_data, teacher_folder
from eftnas_cli.stages.gen_space import SPACE_FILE, SearchSpace
from eftnas_cli.stages.importance import IMPORTANCE_FILE
from eftnas_cli.training import QuietTrainer, RichProgress, distillation_loss, evaluate, training_arguments
from eftnas_cli.ui import console

SUPERNET_FOLDER = "model"


def probe_subnets(space: SearchSpace) -> dict[str, elastic.Subnet]:
    """The subnets evaluated each epoch: largest, the middle MACs target, smallest."""
    middle = space.targets[len(space.targets) // 2]["subnet"]
    return {"largest": space.largest(), "middle": elastic.Subnet.from_dict(middle), "smallest": space.smallest()}


class SandwichTrainer(QuietTrainer):
    """A Trainer whose step backpropagates largest + random + smallest subnets, distilled."""

    def __init__(self, *args, teacher, space: SearchSpace, spec, section, seed: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.to(self.args.device).eval().requires_grad_(False)
        self.space, self.spec, self.section, self.seed = space, spec, section, seed

    def step_subnets(self) -> list[elastic.Subnet]:
        # Seeded by the step, so a resumed run samples the same subnets as an uninterrupted one.
        generator = np.random.default_rng([self.seed, self.state.global_step])
        randoms = [self.space.sample(generator) for _ in range(self.section.num_random_subnets)]
        return [self.space.largest(), *randoms, self.space.smallest()]

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        inputs = self._prepare_inputs(inputs)
        labels = inputs.pop("labels")
        with torch.no_grad():
            teacher_logits = self.teacher(**inputs).logits
        subnets = self.step_subnets()
        scale = len(subnets) * self.current_gradient_accumulation_steps
        total = torch.zeros((), device=self.args.device)
        for subnet in subnets:
            elastic.activate(model, subnet)
            with self.compute_loss_context_manager():
                logits = model(**inputs).logits
                loss = distillation_loss(
                    logits, teacher_logits, labels, self.spec, self.section.distillation_weight, self.section.temperature
                )
            self.accelerator.backward(loss / scale)
            total += loss.detach() / scale
        elastic.activate(model, self.space.largest())
        return total


class ProbeEvaluation(TrainerCallback):
    """Each epoch, evaluate the largest, a middle and the smallest subnet; keep the history."""

    def __init__(self, model, probes: dict[str, elastic.Subnet], data, batch_size: int):
        self.model, self.probes, self.data, self.batch_size = model, probes, data, batch_size
        self.history: list[dict] = []

    def evaluate_probes(self) -> dict[str, dict]:
        split = self.data.eval[first_eval_split(self.data)]
        results = {}
        for name, subnet in self.probes.items():
            elastic.activate(self.model, subnet)
            results[name] = evaluate(self.model, split, self.data.collator, self.data.spec, self.batch_size)
        elastic.activate(self.model, self.probes["largest"])
        return results

    def on_epoch_end(self, args, state, control, **kwargs):
        results = self.evaluate_probes()
        self.history.append({"epoch": round(state.epoch, 2), **{k: v["score"] for k, v in results.items()}})
        console.print(f"  epoch {state.epoch:.2f}: " + ", ".join(f"{k} {v['score']:.4f}" for k, v in results.items()))


def train_supernet(recipe: Recipe, resume: bool = False) -> dict:
    """Writes `supernet/model` (reordered full-size weights) with its `search_space.json`."""
    run = RunDir(recipe)
    section = recipe.supernet
    importance_file = run.require("importance", by="train-supernet") / IMPORTANCE_FILE
    space_file = run.require("gen-space", by="train-supernet") / SPACE_FILE
    teacher_dir = teacher_folder(recipe, run, by="train-supernet")
    source = start_weights(recipe, run, section.start_from, by="train-supernet")
    checkpoints = run.path / "checkpoints" / "supernet"
    last_checkpoint = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    if resume and last_checkpoint is None:
        raise UserError(f"--resume: no checkpoint in {checkpoints}; start without --resume")

    tokenizer = load_tokenizer(recipe.model.name)
    data = task_data(recipe, tokenizer)
    model = load_model(source, data.spec)
    teacher = load_model(teacher_dir, data.spec)
    scores = load_file(str(importance_file))
    elastic.reorder(model, list(scores["heads"]), list(scores["neurons"]))
    elastic.make_elastic(model)
    space = SearchSpace.load(space_file)
    elastic.validate_subnet(model.config, space.largest())

    probes = ProbeEvaluation(model, probe_subnets(space), data, section.eval_batch_size)
    with run.stage("train-supernet") as out:
        for path in [importance_file, space_file, *model_files(teacher_dir), *model_files(source)]:
            out.add_input(path)
        trainer = SandwichTrainer(
            model=model,
            args=training_arguments(section, checkpoints, recipe.seed, device=recipe.device,
                                    save_steps=section.save_steps),
            train_dataset=data.train,
            data_collator=data.collator,
            processing_class=tokenizer,
            callbacks=[RichProgress(f"super-network on {data.spec.name} (sandwich of {section.num_random_subnets + 2})"), probes],
            teacher=teacher,
            space=space,
            spec=data.spec,
            section=section,
            seed=recipe.seed,
        )
        trainer.train(resume_from_checkpoint=last_checkpoint if resume else None)
        final = probes.evaluate_probes()  # leaves the largest subnet active, the one saved
        save_model(model, tokenizer, out.dir / SUPERNET_FOLDER)
        shutil.copy(space_file, out.dir / SPACE_FILE)
        out.metrics = {
            "final": final,
            "history": probes.history,
            "probe_gmacs": {name: elastic.macs(model.config, subnet, space.seq_len).encoder / 1e9
                            for name, subnet in probes.probes.items()},
        }
        write_json(out.dir / "metrics.json", out.metrics)
    # The finished super-network is saved; the resumable checkpoints are no longer needed.
    shutil.rmtree(checkpoints, ignore_errors=True)
    if not any(checkpoints.parent.iterdir()):
        checkpoints.parent.rmdir()
    console.print("super-network: " + ", ".join(f"{k} {v['score']:.4f}" for k, v in final.items()))
    return out.metrics


def supernet_folder(run: RunDir, *, by: str) -> Path:
    return run.require("train-supernet", by=by) / SUPERNET_FOLDER
