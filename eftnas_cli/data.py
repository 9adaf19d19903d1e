"""GLUE task registry, data loading (hub or local Parquet files), tokenization and metrics.

Metrics follow the GLUE definitions used by the hub's `evaluate` "glue" metric, but are computed
with scikit-learn/scipy so that evaluation works offline.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from eftnas_cli.errors import DataError, UnknownTaskError

HUB_DATASET = "nyu-mll/glue"
TRAIN_SPLIT = "train"
# The search rows are drawn with this seed, not the recipe's: runs of several seeds share one teacher,
# which must not have trained on any seed's search rows.
SEARCH_ROWS_SEED = 0


@dataclass(frozen=True)
class TaskSpec:
    name: str
    text_keys: tuple[str, ...]
    num_labels: int  # 1 for regression
    is_regression: bool
    eval_splits: tuple[str, ...]
    main_metric: str


def _classification(name, text_keys, main_metric="accuracy", num_labels=2, eval_splits=("validation",)):
    return TaskSpec(name, text_keys, num_labels, False, eval_splits, main_metric)


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        _classification("cola", ("sentence",), main_metric="matthews_correlation"),
        _classification("sst2", ("sentence",)),
        # Accuracy, not F1, drives selection on MRPC/QQP: F1 favours always answering "equivalent"
        # (a constant scores 0.81 F1 on MRPC dev). F1 is still computed and reported.
        _classification("mrpc", ("sentence1", "sentence2")),
        _classification("qqp", ("question1", "question2")),
        TaskSpec("stsb", ("sentence1", "sentence2"), 1, True, ("validation",), "pearson"),
        _classification(
            "mnli",
            ("premise", "hypothesis"),
            num_labels=3,
            eval_splits=("validation_matched", "validation_mismatched"),
        ),
        _classification("qnli", ("question", "sentence")),
        _classification("rte", ("sentence1", "sentence2")),
        _classification("wnli", ("sentence1", "sentence2")),
    )
}


def get_task(name: str) -> TaskSpec:
    """The spec of a GLUE task; a misspelt name gets the closest known name suggested."""
    key = name.strip().lower()
    if key in TASKS:
        return TASKS[key]
    message = f"unknown task {name!r}; choose from {', '.join(TASKS)}"
    close = difflib.get_close_matches(key, TASKS, n=1)
    if close:
        message += f" (did you mean {close[0]!r}?)"
    raise UnknownTaskError(message)


def load_raw(task: str, data_dir: str | Path | None) -> datasets.DatasetDict:
    """The train split and the task's eval splits, untokenized, with the hub's columns and features.

    data_dir=None downloads `nyu-mll/glue` from the hub; otherwise the files are read from
    `<data_dir>/<task>/<split>.parquet` (the layout of the hub's own Parquet export).
    """
    spec = get_task(task)
    datasets.disable_progress_bars()  # the CLI reports progress itself
    splits = (TRAIN_SPLIT, *spec.eval_splits)
    if data_dir is None:
        raw = datasets.load_dataset(HUB_DATASET, spec.name)
        return datasets.DatasetDict({split: raw[split] for split in splits})

    task_dir = Path(data_dir) / spec.name
    hint = (
        f"pass a data_dir holding {spec.name}/<split>.parquet for splits {', '.join(splits)}, "
        f"or no data_dir to download {HUB_DATASET!r} from the Hugging Face hub"
    )
    if not task_dir.is_dir():
        raise DataError(f"no local data for task {spec.name!r}: folder {task_dir} does not exist; {hint}")
    data_files = {split: str(task_dir / f"{split}.parquet") for split in splits}
    for path in data_files.values():
        if not Path(path).is_file():
            raise DataError(f"no local data for task {spec.name!r}: file {path} does not exist; {hint}")
    raw = datasets.DatasetDict()
    for split, path in data_files.items():
        # One file at a time: a file whose columns differ from the others' must be named.
        try:
            rows = pyarrow.parquet.ParquetFile(path).metadata.num_rows
            raw[split] = datasets.load_dataset("parquet", data_files={split: path})[split] if rows else None
        except (ValueError, OSError, datasets.exceptions.DatasetGenerationError) as error:
            raise DataError(f"{path}: not a readable parquet file ({type(error).__name__})") from None
        if not rows:
            raise DataError(f"{path}: the {split} split has no rows")
        missing = [column for column in (*spec.text_keys, "label") if column not in raw[split].column_names]
        if missing:
            raise DataError(f"{path}: no column {', '.join(map(repr, missing))}; task {spec.name!r} needs "
                            f"{', '.join(map(repr, (*spec.text_keys, 'label')))}")
    return raw


@dataclass
class TaskData:
    spec: TaskSpec
    train: datasets.Dataset  # input_ids, attention_mask, (token_type_ids), labels
    eval: dict[str, datasets.Dataset]  # eval split name -> tokenized split
    collator: DataCollatorWithPadding
    # Rows held out of the train split that no stage trains on: what search scores subnets by.
    # None when the recipe holds none out (search then reads the main eval split).
    search_rows: datasets.Dataset | None = None

    @property
    def search(self) -> datasets.Dataset:
        """The rows model choices are made on: the held-out search rows, else the main eval split."""
        return self.search_rows if self.search_rows is not None else self.main_eval

    @property
    def main_split(self) -> str:
        """The eval split that model selection reads (MNLI: matched)."""
        return self.spec.eval_splits[0]

    @property
    def main_eval(self) -> datasets.Dataset:
        return self.eval[self.main_split]


def _tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of what decides the encoded inputs: tokenizer class, vocabulary, special tokens, casing.

    datasets' default hash of a map function that captures a fast tokenizer is not stable: calling
    the tokenizer changes its backend's truncation state, so a repeated request would miss the cache.
    """
    identity = {
        "class": type(tokenizer).__name__,
        "model_input_names": tokenizer.model_input_names,
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special_tokens": tokenizer.special_tokens_map,
        "do_lower_case": getattr(tokenizer, "do_lower_case", None),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def _tokenize(
    split: datasets.Dataset, spec: TaskSpec, tokenizer: PreTrainedTokenizerBase, max_seq_length: int, tokenizer_hash: str
) -> datasets.Dataset:
    def encode(batch):
        # No padding here: the collator pads each batch to its own longest sequence.
        return tokenizer(*(batch[key] for key in spec.text_keys), truncation=True, max_length=max_seq_length)

    # A fingerprint from the parent split and the tokenization settings, so that the same request
    # reuses datasets' cache file instead of tokenizing again.
    fingerprint = hashlib.sha256(
        f"{split._fingerprint}|{tokenizer_hash}|{spec.text_keys}|{max_seq_length}".encode()
    ).hexdigest()[:16]
    tokenized = split.map(
        encode,
        batched=True,
        remove_columns=[column for column in split.column_names if column != "label"],
        new_fingerprint=fingerprint,
    )
    tokenized = tokenized.rename_column("label", "labels")
    if spec.is_regression:
        tokenized = tokenized.cast_column("labels", datasets.Value("float32"))
    return tokenized


def load_task_data(
    task: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    data_dir: str | Path | None = None,
    max_seq_length: int = 128,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    search_fraction: float = 0.0,
    seed: int = 42,
) -> TaskData:
    """Tokenized train, search and eval splits of a GLUE task plus a dynamic-padding collator.

    search_fraction holds that share of the train split out as search rows (the same rows for
    every seed); max_train_samples keeps a seeded random subset of the rest; max_eval_samples
    keeps the first rows of each eval split, so that evaluation numbers are comparable between runs.
    """
    spec = get_task(task)
    raw = load_raw(spec.name, data_dir)
    train = raw[TRAIN_SPLIT]
    search_rows = None
    if search_fraction > 0:
        held_out = train.train_test_split(test_size=search_fraction, seed=SEARCH_ROWS_SEED)
        train, search_rows = held_out["train"], held_out["test"]
    if max_train_samples is not None and max_train_samples < len(train):
        train = train.shuffle(seed=seed).select(range(max_train_samples))
    eval_splits = {}
    for name in spec.eval_splits:
        split = raw[name]
        if max_eval_samples is not None and max_eval_samples < len(split):
            split = split.select(range(max_eval_samples))
        eval_splits[name] = split

    tokenizer_hash = _tokenizer_fingerprint(tokenizer)
    return TaskData(
        spec=spec,
        train=_tokenize(train, spec, tokenizer, max_seq_length, tokenizer_hash),
        eval={name: _tokenize(split, spec, tokenizer, max_seq_length, tokenizer_hash) for name, split in eval_splits.items()},
        collator=DataCollatorWithPadding(tokenizer),
        search_rows=None if search_rows is None else _tokenize(search_rows, spec, tokenizer, max_seq_length, tokenizer_hash),
    )


def compute_metrics(task: str, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """GLUE metrics as fractions (not percentages).

    predictions: logits of shape (N, num_labels), or for regression scores of shape (N,) or (N, 1).
    Already-decided class ids of shape (N,) are accepted for classification too.
    """
    spec = get_task(task)
    predictions = np.asarray(predictions)
    labels = np.asarray(labels)
    if spec.is_regression:
        scores = predictions.reshape(-1).astype(np.float64)
        labels = labels.reshape(-1).astype(np.float64)
        if np.ptp(scores) == 0 or np.ptp(labels) == 0:
            # Correlation is undefined (scipy warns, returns NaN) for constant input, e.g. an untrained
            # head; it carries no signal, and 0.0 keeps model comparisons well defined.
            return {"pearson": 0.0, "spearmanr": 0.0}
        return {
            "pearson": float(pearsonr(scores, labels)[0]),
            "spearmanr": float(spearmanr(scores, labels)[0]),
        }

    predicted_classes = predictions.argmax(axis=-1) if predictions.ndim == 2 else predictions
    if spec.name == "cola":
        return {"matthews_correlation": float(matthews_corrcoef(labels, predicted_classes))}
    metrics = {"accuracy": float(accuracy_score(labels, predicted_classes))}
    if spec.name in ("mrpc", "qqp"):
        metrics["f1"] = float(f1_score(labels, predicted_classes, pos_label=1, average="binary", zero_division=0.0))
    return metrics


def main_metric_value(task: str, metrics: dict[str, float]) -> float:
    """The value of the task's headline metric (the one model selection maximizes)."""
    spec = get_task(task)
    if spec.main_metric not in metrics:
        raise KeyError(f"metrics for task {spec.name!r} lack {spec.main_metric!r}; got {sorted(metrics)}")
    return float(metrics[spec.main_metric])


def recipe_task_data(recipe, tokenizer: PreTrainedTokenizerBase) -> TaskData:
    """The task data a recipe's `task` section describes (every stage loads it this way)."""
    task = recipe.task
    return load_task_data(
        task.name,
        tokenizer,
        data_dir=task.data_dir,
        max_seq_length=task.max_seq_length,
        max_train_samples=task.max_train_samples,
        max_eval_samples=task.max_eval_samples,
        search_fraction=task.search_fraction,
        seed=recipe.seed,
    )
