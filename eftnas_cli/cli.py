"""`eftnas`: a thin command line over the Python API (`eftnas_cli.stages`).

Each command parses its arguments, loads the recipe and calls one stage function. Heavy libraries
are imported inside the commands so that `eftnas --help` answers at once. Mistakes the user can fix
(a recipe key, a missing file, a run directory made by another recipe: the project's own error
types, `eftnas_cli.errors`) print one line and exit 2; anything else is a bug and exits 1; set
EFTNAS_DEBUG=1 to see the traceback instead. Ctrl-C and SIGTERM (a scheduler's stop, `kill`) both
interrupt: one line naming the stage and how to continue, exit code 130.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path
from typing import Callable, List, Optional

import click
import typer

app = typer.Typer(
    help="Compress BERT-family encoders for a compute budget (EFTNAS): "
    "finetune → importance → gen-space → train-supernet → search → export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

RECIPE = typer.Argument(..., help="recipe YAML file, e.g. configs/quickstart.yaml", show_default=False)
OVERRIDES = typer.Argument(None, help="dotted overrides such as finetune.epochs=1 seed=3", show_default=False)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM raises KeyboardInterrupt like Ctrl-C, so a stopped stage cleans up the same way."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _errors_reported():
    """The project's own errors (mistakes the user can fix) become one red line and exit code 2;
    an interruption one line naming the stage, exit code 130; anything else is a bug: a short
    message, exit code 1, and the traceback with EFTNAS_DEBUG=1. Under a multi-process launcher
    the main process reports the first two for all ranks, and every rank reports its own bug."""
    from rich.markup import escape

    from eftnas_cli.errors import EftnasError
    from eftnas_cli.ui import console

    rank = int(os.environ.get("RANK", "0"))
    with _sigterm_interrupts():
        if os.environ.get("EFTNAS_DEBUG"):
            yield
            return
        try:
            yield
        except EftnasError as error:
            if rank == 0:
                # escape: a message may hold brackets (`pip install 'eftnas[postgres]'`), not markup
                console.print(f"[red]error:[/red] {escape(str(error))}", soft_wrap=True)
            raise typer.Exit(2) from None
        except typer.Exit:
            raise
        except KeyboardInterrupt as interrupt:
            # A run directory's lock names the stage it was in (`Interrupted`); before that, the command.
            command = getattr(interrupt, "command", None) or click.get_current_context().info_name
            if rank == 0:
                console.print(f"[yellow]interrupted[/yellow] during `{command}`; run the same command again to continue",
                              soft_wrap=True)
            raise typer.Exit(130) from None
        except Exception as error:  # noqa: BLE001 - the last resort of the command line
            console.quiet = False
            where = f"rank {rank}: " if "RANK" in os.environ else ""
            console.print(f"[red]internal error:[/red] {where}{type(error).__name__}: {escape(str(error))}", soft_wrap=True)
            console.print("this is a bug in eftnas or a library under it; run again with EFTNAS_DEBUG=1 for the traceback",
                          soft_wrap=True)
            raise typer.Exit(1) from None


# The commands that train: under `torchrun` / `accelerate launch` their processes share the work
# (eftnas_cli/distributed.py). The others run in one process.
MULTI_PROCESS_COMMANDS = ("finetune", "importance", "train-supernet")


def _run(command: str, stage: Callable[..., object], recipe_path: Path, overrides: Optional[List[str]],
         **options) -> object:
    with _errors_reported():
        from eftnas_cli import distributed
        from eftnas_cli.errors import UserError
        from eftnas_cli.recipe import load_recipe

        if distributed.launched() and command not in MULTI_PROCESS_COMMANDS:
            raise UserError(f"`{command}` runs in one process; start it without torchrun / accelerate launch "
                            f"(those share the work of {', '.join(MULTI_PROCESS_COMMANDS)})")
        recipe = load_recipe(recipe_path, overrides or [])
        try:
            return stage(recipe, **options)
        finally:
            distributed.shutdown()


@app.command()
def finetune(recipe: Path = RECIPE, overrides: Optional[List[str]] = OVERRIDES) -> None:
    """Fine-tune the dense model on the task: the distillation teacher of the later stages."""
    from eftnas_cli.stages.finetune import finetune as stage

    _run("finetune", stage, recipe, overrides)


@app.command()
def importance(recipe: Path = RECIPE, overrides: Optional[List[str]] = OVERRIDES) -> None:
    """First-order importance of every attention head and FFN neuron (Taylor on the teacher, or movement pruning)."""
    from eftnas_cli.stages.importance import compute_importance as stage

    _run("importance", stage, recipe, overrides)


@app.command("gen-space")
def gen_space(recipe: Path = RECIPE, overrides: Optional[List[str]] = OVERRIDES) -> None:
    """Search space from importance: per-layer width choices for N MACs targets."""
    from eftnas_cli.stages.gen_space import generate_space as stage

    _run("gen-space", stage, recipe, overrides)


@app.command("train-supernet")
def train_supernet(
    recipe: Path = RECIPE,
    overrides: Optional[List[str]] = OVERRIDES,
    resume: bool = typer.Option(False, "--resume", help="continue from the last checkpoint"),
) -> None:
    """Reorder weights by importance and train the elastic super-network (sandwich rule + KD)."""
    from eftnas_cli.stages.train_supernet import train_supernet as stage

    _run("train-supernet", stage, recipe, overrides, resume=resume)


@app.command()
def search(
    recipe: Path = RECIPE,
    overrides: Optional[List[str]] = OVERRIDES,
    storage: Optional[str] = typer.Option(
        None, help="study shared by workers on several machines: postgresql://user:password@host/db "
        "(any SQLAlchemy URL Optuna takes), or journal:PATH (a file on a shared file system); "
        "default: the run directory's SQLite file"),
    workers: int = typer.Option(1, "--workers", min=1, help="local worker processes sharing the study"),
) -> None:
    """NSGA-II search of subnets: task metric vs MACs (and latency); writes the Pareto front."""
    from eftnas_cli.stages.search import search as stage

    _run("search", stage, recipe, overrides, storage=storage, workers=workers)


@app.command()
def export(
    recipe: Path = RECIPE,
    overrides: Optional[List[str]] = OVERRIDES,
    budget: Optional[List[float]] = typer.Option(None, help="MACs fraction(s) of the full model; repeatable"),
    trial: Optional[int] = typer.Option(None, help="export this search trial number instead"),
    subnet: Optional[Path] = typer.Option(None, help="export the subnet in this JSON file instead"),
) -> None:
    """Cut subnets into smaller dense models: safetensors, ONNX, OpenVINO IR (+ INT8), metrics."""
    from eftnas_cli.stages.export import export as stage

    _run("export", stage, recipe, overrides, budgets=budget or None, trial=trial, subnet_file=subnet)


@app.command("run")
def run_all(
    recipe: Path = RECIPE,
    overrides: Optional[List[str]] = OVERRIDES,
    until: Optional[str] = typer.Option(None, help="stop after this stage (e.g. search)"),
) -> None:
    """Every stage in order; stages already complete with the same inputs are skipped."""
    from eftnas_cli.stages.pipeline import run_pipeline as stage

    _run("run", stage, recipe, overrides, until=until)


@app.command()
def profile(
    model: str = typer.Argument(..., help="hub id, model folder, alias (minilm-l6) or bert-base"),
    seq_len: int = typer.Option(128, "--seq-len", help="sequence length of the count"),
    subnet: Optional[Path] = typer.Option(None, help="count this subnet JSON instead of the full model"),
) -> None:
    """Parameters and MACs of a model (or a subnet of it) per sequence."""
    from eftnas_cli.profile import profile as profile_model

    with _errors_reported():
        profile_model(model, seq_len=seq_len, subnet_file=subnet)

if __name__ == "__main__":
    app()
