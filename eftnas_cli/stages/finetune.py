"""Stage `finetune`: fine-tune the dense model on the task; it becomes the distillation teacher."""

from __future__ import annotations

import shutil

from eftnas_cli.data import recipe_task_data
from eftnas_cli.models import load_model, load_tokenizer, save_model
from eftnas_cli.recipe import Recipe
from eftnas_cli.rundir import RunDir, holds_lock, write_json
from eftnas_cli.training import RichProgress, TaskTrainer, evaluate, training_arguments
from eftnas_cli.ui import console


@holds_lock("finetune")
def finetune(recipe: Recipe) -> dict:
    """Fine-tune `recipe.model` on `recipe.task`; writes `finetune/model` and `finetune/metrics.json`."""
    run = RunDir(recipe)
    run.check_same_recipe()
    if recipe.model.teacher:
        console.print(f"finetune: skipped, the recipe names a fine-tuned teacher ({recipe.model.teacher})")
        return {}
    tokenizer = load_tokenizer(recipe.model.name)
    data = recipe_task_data(recipe, tokenizer)
    model = load_model(recipe.model.name, data.spec)
    section = recipe.finetune
    with run.stage("finetune") as out:
        checkpoints = out.dir / "checkpoints"
        trainer = TaskTrainer(
            model=model,
            args=training_arguments(section, checkpoints, recipe.seed, device=recipe.device, main_metric="score"),
            train_dataset=data.train,
            eval_dataset=data.search,  # the best epoch is chosen on search rows, not validation
            data_collator=data.collator,
            processing_class=tokenizer,
            spec=data.spec,
            callbacks=[RichProgress(f"fine-tuning {recipe.model.name} on {data.spec.name}")],
        )
        trainer.train()
        # The Trainer's checkpoints only served to keep the best epoch; the stage keeps one model.
        shutil.rmtree(checkpoints, ignore_errors=True)
        metrics = {
            split: evaluate(trainer.model, dataset, data.collator, data.spec, section.eval_batch_size)
            for split, dataset in data.eval.items()
        }
        save_model(trainer.model, tokenizer, out.dir / "model")
        write_json(out.dir / "metrics.json", metrics)
        out.metrics = metrics
    console.print(f"finetune: teacher saved to {run.stage_dir('finetune') / 'model'}")
    return metrics
