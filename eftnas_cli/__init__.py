"""eftnas: compress BERT-family encoders for a compute budget (EFTNAS).

The Python API behind the `eftnas` command; every stage takes a `Recipe`:

    from eftnas_cli import load_recipe, run_pipeline, load_model
    recipe = load_recipe("configs/quickstart.yaml", ["search.trials=50"])
    run_pipeline(recipe)
    model = load_model("runs/quickstart/export/budget-0.5")   # a smaller, ordinary transformers model

Stage functions live in `eftnas_cli.stages` (finetune, compute_importance, generate_space,
train_supernet, search, export); the elastic-model core in `eftnas_cli.elastic`. Imports are lazy so
that the command line starts fast.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "load_recipe": "eftnas_cli.recipe",
    "Recipe": "eftnas_cli.recipe",
    "load_model": "eftnas_cli.models",
    "load_tokenizer": "eftnas_cli.models",
    "finetune": "eftnas_cli.stages.finetune",
    "compute_importance": "eftnas_cli.stages.importance",
    "generate_space": "eftnas_cli.stages.gen_space",
    "train_supernet": "eftnas_cli.stages.train_supernet",
    "search": "eftnas_cli.stages.search",
    "export": "eftnas_cli.stages.export",
    "run_pipeline": "eftnas_cli.stages.pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'eftnas_cli' has no attribute {name!r}")
