"""Stage `finetune`: fine-tune the dense model on the task; it becomes the distillation teacher."""

from __future__ import annotations

from transformers import set_seed

from eftnas_cli import distributed
from eftnas_cli.artifacts import model_files
from eftnas_cli.data import recipe_task_data
from eftnas_cli.models import load_model, load_tokenizer, resolve_model, save_model
from eftnas_cli.recipe import Recipe
from eftnas_cli.rundir import RunDir, holds_lock, write_json
from eftnas_cli.training import (
    ResumableCheckpoints,
    RichProgress,
    TaskTrainer,
    evaluate,
    training_arguments,
)
from eftnas_cli.ui import console


@holds_lock("finetune")
def finetune(recipe: Recipe) -> dict:
    """Fine-tune `recipe.model` on `recipe.task`; writes `finetune/model` and `finetune/metrics.json`.

    Checkpoints each epoch (the best one on the search rows is kept) and every
    `finetune.checkpoint_minutes`; a killed run continues from its last checkpoint when started
    again with the same recipe."""
    run = RunDir(recipe)
    run.check_same_recipe()
    if recipe.model.teacher:
        console.print(f"finetune: skipped, the recipe names a fine-tuned teacher ({recipe.model.teacher})")
        return {}
    tokenizer = load_tokenizer(recipe.model.name)
    with distributed.main_first():  # the main process fills the tokenization cache
        data = recipe_task_data(recipe, tokenizer)
    set_seed(recipe.seed)  # the fresh classifier head: the same one every run, whatever ran before
    model = load_model(recipe.model.name, data.spec)
    section = recipe.finetune
    checkpoints = ResumableCheckpoints(run.path, "finetune", recipe, "finetune", model_files(resolve_model(recipe.model.name)))
    last_checkpoint = distributed.on_main(checkpoints.open)  # the main process decides for every rank
    console.print(f"finetune: continuing from {last_checkpoint}" if last_checkpoint else
                  "finetune: starting (no checkpoint of this recipe yet)", soft_wrap=True)
    with run.stage("finetune", started=checkpoints.started) as out:
        trainer = TaskTrainer(
            model=model,
            args=training_arguments(section, checkpoints.folder, recipe.seed, device=recipe.device, main_metric="score"),
            train_dataset=data.train,
            eval_dataset=data.search,  # the best epoch is chosen on search rows, not validation
            data_collator=data.collator,
            processing_class=tokenizer,
            spec=data.spec,
            callbacks=[RichProgress(f"fine-tuning {recipe.model.name} on {data.spec.name}"),
                       checkpoints.every(section.checkpoint_minutes)],
        )
        trainer.train(resume_from_checkpoint=last_checkpoint)
        distributed.barrier()  # every rank has loaded the best epoch's checkpoint
        metrics = {
            split: evaluate(trainer.model, dataset, data.collator, data.spec, section.eval_batch_size)
            for split, dataset in data.eval.items()
        }
        out.metrics = metrics
        if out.writes:
            save_model(trainer.model, tokenizer, out.dir / "model")
            write_json(out.dir / "metrics.json", metrics)
    if distributed.is_main():
        checkpoints.remove()  # the stage keeps one model, the best epoch's
    console.print(f"finetune: teacher saved to {run.stage_dir('finetune') / 'model'}")
    return metrics
