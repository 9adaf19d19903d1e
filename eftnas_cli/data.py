"""Task data: the hub or local Parquet files of a task (`eftnas_cli.tasks`), split, preprocessed
by the task's kind (cached) and collated."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import datasets
import pyarrow.parquet
from transformers import PreTrainedTokenizerBase

from eftnas_cli.errors import DataError
from eftnas_cli.rundir import sha256
from eftnas_cli.tasks import Preprocessing, QAEvalSplit, Task, get_task

TRAIN_SPLIT = "train"
# The search rows are drawn with this seed, not the recipe's: runs of several seeds share one teacher,
# which must not have trained on any seed's search rows.
SEARCH_ROWS_SEED = 0


def load_raw(task: str, data_dir: str | Path | None, extra_splits: tuple[str, ...] = ()) -> datasets.DatasetDict:
    """The train split, the task's eval splits and `extra_splits`, unprocessed, with the hub's columns
    and features.

    data_dir=None downloads the task's hub dataset (e.g. `nyu-mll/glue`, `rajpurkar/squad`);
    otherwise the files are read from `<data_dir>/<task>/<split>.parquet` (the layout of the hub's
    own Parquet export).
    """
    spec = get_task(task)
    datasets.disable_progress_bars()  # the CLI reports progress itself
    splits = (TRAIN_SPLIT, *spec.eval_splits, *extra_splits)
    if data_dir is None:
        raw = datasets.load_dataset(spec.hub_id, spec.hub_config)
        missing = [split for split in splits if split not in raw]
        if missing:
            raise DataError(f"{spec.hub_id}: no split {', '.join(map(repr, missing))}; it has {', '.join(raw)}")
        return datasets.DatasetDict({split: raw[split] for split in splits})

    task_dir = Path(data_dir) / spec.name
    hint = (
        f"pass a data_dir holding {spec.name}/<split>.parquet for splits {', '.join(splits)}, "
        f"or no data_dir to download {spec.hub_id!r} from the Hugging Face hub"
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
            # Fingerprinted by content: datasets' own fingerprint of a local file follows its modification
            # time, and a copied or re-extracted data folder would then start every cache and search study anew.
            raw[split] = datasets.load_dataset("parquet", data_files={split: path})[split].select(
                range(rows), new_fingerprint=sha256(Path(path))[:16]) if rows else None
        except (ValueError, OSError, datasets.exceptions.DatasetGenerationError) as error:
            raise DataError(f"{path}: not a readable parquet file ({type(error).__name__})") from None
        if not rows:
            raise DataError(f"{path}: the {split} split has no rows")
        missing = [column for column in spec.columns if column not in raw[split].column_names]
        if missing:
            raise DataError(f"{path}: no column {', '.join(map(repr, missing))}; task {spec.name!r} needs "
                            f"{', '.join(map(repr, spec.columns))}")
        spec.kind.check_split(raw[split], spec, path)
    return raw


@dataclass
class TaskData:
    spec: Task
    train: datasets.Dataset  # model inputs and the kind's labels (`labels`; QA: start/end positions)
    eval: dict[str, datasets.Dataset | QAEvalSplit]  # eval split name -> preprocessed split
    collator: object  # pads a list of rows into a batch
    # Rows no stage trains on, held out of the train split or a split of their own: what search scores
    # subnets by. None when the recipe names none (search then reads the main eval split).
    search_rows: datasets.Dataset | QAEvalSplit | None = None
    search_split: str | None = None  # the split the search rows are, where not held out of train

    @property
    def search_source(self) -> str:
        """Where the rows model choices are made on come from, in words for reports."""
        if self.search_rows is None:
            return self.main_split
        return "search rows (held out of train)" if self.search_split is None else f"search rows (the {self.search_split} split)"

    @property
    def search(self) -> datasets.Dataset | QAEvalSplit:
        """The rows model choices are made on: the held-out search rows, else the main eval split."""
        return self.search_rows if self.search_rows is not None else self.main_eval

    @property
    def main_split(self) -> str:
        """The eval split that model selection reads (MNLI: matched)."""
        return self.spec.eval_splits[0]

    @property
    def main_eval(self) -> datasets.Dataset | QAEvalSplit:
        return self.eval[self.main_split]

    @property
    def calibration(self) -> datasets.Dataset:
        """The rows INT8 calibration reads, as the task's kind chooses them."""
        return self.spec.kind.calibration_rows(self.train)


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


def load_task_data(
    task: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    data_dir: str | Path | None = None,
    max_seq_length: int = 128,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    search_fraction: float = 0.0,
    search_split: str | None = None,
    seed: int = 42,
    doc_stride: int = 128,
    max_answer_length: int = 30,
    n_best: int = 20,
) -> TaskData:
    """Preprocessed train, search and eval splits of a task plus a dynamic-padding collator.

    search_fraction holds that share of the train split out as search rows (the same rows for
    every seed), unless search_split names a split to be the search rows; max_train_samples keeps a
    seeded random subset of the rest; max_eval_samples keeps the first rows of each eval split, so
    that evaluation numbers are comparable between runs.
    Rows are examples (a QA question with its context), before any windowing.
    """
    spec = get_task(task)
    settings = Preprocessing(max_seq_length, doc_stride, max_answer_length, n_best)
    raw = load_raw(spec.name, data_dir, () if search_split is None else (search_split,))
    train = raw[TRAIN_SPLIT]
    search_rows = None
    if search_split is not None:
        # Shuffled as held-out rows are: search reads the first search.max_eval_samples, and a file
        # sorted by label or source would hand it a lopsided sample.
        search_rows = raw[search_split].shuffle(seed=SEARCH_ROWS_SEED)
    elif search_fraction > 0:
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

    def fingerprint(split: datasets.Dataset, purpose: str) -> str:
        # From the parent split and the preprocessing settings, so that the same request reuses
        # datasets' cache file instead of preprocessing again.
        key = f"{split._fingerprint}|{tokenizer_hash}|{spec.name}|{spec.text_keys}|{settings}|{purpose}"
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def for_eval(split):
        return spec.kind.prepare_eval(split, spec, tokenizer, settings, fingerprint(split, "eval"))

    return TaskData(
        spec=spec,
        train=spec.kind.prepare_train(train, spec, tokenizer, settings, fingerprint(train, "train")),
        eval={name: for_eval(split) for name, split in eval_splits.items()},
        collator=spec.kind.collator(tokenizer),
        search_rows=None if search_rows is None else for_eval(search_rows),
        search_split=search_split,
    )


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
        search_split=task.search_split,
        seed=recipe.seed,
        doc_stride=task.doc_stride,
        max_answer_length=task.max_answer_length,
        n_best=task.n_best,
    )
