"""`eftnas run`: every stage in order, skipping those already complete with the same inputs."""

from __future__ import annotations

from eftnas_cli.errors import UserError
from eftnas_cli.recipe import Recipe
from eftnas_cli.rundir import RunDir, holds_lock
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


STAGE_NAMES = tuple(name for name, _ in PIPELINE)


@holds_lock("run")
def run_pipeline(recipe: Recipe, until: str | None = None) -> dict:
    """Run the stages of `recipe` in order, through `until` (default: all); returns each stage's
    metrics (None when skipped because it is up to date)."""
    run = RunDir(recipe)
    run.check_same_recipe()
    if until is not None and until not in STAGE_NAMES:
        raise UserError(f"--until {until}: not a stage; choose from {', '.join(STAGE_NAMES)}")
    stages = PIPELINE[: STAGE_NAMES.index(until) + 1] if until else PIPELINE
    results = {}
    for name, stage in stages:
        if run.is_current(name):
            console.rule(f"[bold]{name}[/bold]: up to date, skipped")
            results[name] = None
            continue
        console.rule(f"[bold]{name}")
        results[name] = stage(recipe)
    if "export" in results and results["export"] is None:
        # Nothing was redone, but the user still expects the result: show the last summary.
        from eftnas_cli.stages.export import print_summary
        from eftnas_cli.tasks import get_task

        print_summary(run.record("export")["metrics"], get_task(recipe.task.name))
    return results
