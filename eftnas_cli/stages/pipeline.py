"""`eftnas run`: every stage in order, skipping those already complete with the same inputs."""

from __future__ import annotations

from eftnas_cli.recipe import Recipe
from eftnas_cli.rundir import RunDir
from eftnas_cli.stages.export import export
from eftnas_cli.stages.finetune import finetune
from eftnas_cli.stages.gen_space import generate_space
from eftnas_cli.stages.importance import compute_importance
from eftnas_cli.stages.search import search
from eftnas_cli.stages.train_supernet import train_supernet
from eftnas_cli.ui import console

PIPELINE = (
    ("finetune", finetune),
    ("importance", compute_importance),
    ("gen-space", generate_space),
    ("train-supernet", train_supernet),
    ("search", search),
    ("export", export),
)


def run_pipeline(recipe: Recipe) -> dict:
    """Run the stages of `recipe` in order; returns each stage's metrics (None when skipped)."""
    run = RunDir(recipe)
    run.check_same_recipe()
    results = {}
    for name, stage in PIPELINE:
        if run.is_current(name):
            console.rule(f"[bold]{name}[/bold]: up to date, skipped")
            results[name] = None
            continue
        console.rule(f"[bold]{name}")
        results[name] = stage(recipe)
    if results["export"] is None:
        # Nothing was redone, but the user still expects the result: show the last summary.
        from eftnas_cli.data import get_task
        from eftnas_cli.stages.export import print_summary

        print_summary(run.record("export")["metrics"], get_task(recipe.task.name).main_metric)
    return results
