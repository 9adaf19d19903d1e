"""Shared fixtures: a tiny random model and tiny synthetic GLUE data, made once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from eftnas_cli.testing import make_tiny_glue_dir, make_tiny_model, write_tiny_recipe


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_glue_dir(tmp_path_factory) -> Path:
    return make_tiny_glue_dir(tmp_path_factory.mktemp("tiny-glue"), "mrpc", n_train=64, n_eval=32)


@pytest.fixture
def write_recipe(tmp_path, tiny_model_dir, tiny_glue_dir):
    """Write a tiny recipe (plus changes) to a file and return its path; runs go under tmp_path."""

    def write(changes: dict | None = None, name: str = "recipe.yaml") -> Path:
        return write_tiny_recipe(tmp_path / name, tmp_path / "runs", tiny_model_dir, tiny_glue_dir, changes)

    return write


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run only where CUDA is available."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
