"""Tiny offline stand-ins for GLUE data and a tokenizer, so that end-to-end tests run in seconds."""

from __future__ import annotations

import random
from pathlib import Path

import datasets
from transformers import BertTokenizer, PreTrainedTokenizerFast

from eftnas_cli.data import TRAIN_SPLIT, get_task

FILLER_WORDS = (
    "the a movie film story plot actor scene music book day night city river house car dog cat "
    "was is very quite rather somewhat really and but with of to in on"
).split()
# One keyword per class: the label of a synthetic example is the class whose keyword it contains,
# which gives even a tiny model a signal it can learn.
CLASS_KEYWORDS = ("bad", "good", "maybe")
# For regression (stsb) the target is the number of times this word occurs.
REGRESSION_KEYWORD = "good"
MAX_REGRESSION_SCORE = 5
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# The hub's ClassLabel names, so that synthetic files carry the same features as the real ones.
GLUE_LABEL_NAMES = {
    "cola": ("unacceptable", "acceptable"),
    "sst2": ("negative", "positive"),
    "mrpc": ("not_equivalent", "equivalent"),
    "qqp": ("not_duplicate", "duplicate"),
    "mnli": ("entailment", "neutral", "contradiction"),
    "qnli": ("entailment", "not_entailment"),
    "rte": ("entailment", "not_entailment"),
    "wnli": ("not_entailment", "entailment"),
}


def _sentence(rng: random.Random, keywords: list[str]) -> str:
    words = rng.choices(FILLER_WORDS, k=rng.randint(4, 10))
    for keyword in keywords:
        words.insert(rng.randint(0, len(words)), keyword)
    return " ".join(words)


def _synthetic_split(task: str, n_rows: int, rng: random.Random) -> datasets.Dataset:
    spec = get_task(task)
    # Cycling through the targets keeps labels balanced; the shuffle mixes their order.
    if spec.is_regression:
        targets = [i % (MAX_REGRESSION_SCORE + 1) for i in range(n_rows)]
    else:
        targets = [i % spec.num_labels for i in range(n_rows)]
    rng.shuffle(targets)

    columns: dict[str, list] = {key: [] for key in spec.text_keys}
    for target in targets:
        keywords = [REGRESSION_KEYWORD] * target if spec.is_regression else [CLASS_KEYWORDS[target]]
        # The signal sits in the first text; any second text is filler, as a pair task's context.
        columns[spec.text_keys[0]].append(_sentence(rng, keywords))
        for key in spec.text_keys[1:]:
            columns[key].append(_sentence(rng, []))

    features = {key: datasets.Value("string") for key in spec.text_keys}
    if spec.is_regression:
        columns["label"] = [float(target) for target in targets]
        features["label"] = datasets.Value("float32")
    else:
        columns["label"] = targets
        features["label"] = datasets.ClassLabel(names=list(GLUE_LABEL_NAMES[spec.name]))
    columns["idx"] = list(range(n_rows))
    features["idx"] = datasets.Value("int32")
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def make_tiny_glue_dir(root: Path, task: str = "mrpc", n_train: int = 64, n_eval: int = 32, seed: int = 0) -> Path:
    """Write `root/<task>/<split>.parquet` for train and the task's eval splits; return root.

    The returned folder is what `load_raw`/`load_task_data` take as data_dir. Columns and features
    follow the hub's `nyu-mll/glue` files.
    """
    spec = get_task(task)
    rng = random.Random(seed)
    task_dir = Path(root) / spec.name
    task_dir.mkdir(parents=True, exist_ok=True)
    for split, n_rows in ((TRAIN_SPLIT, n_train), *((name, n_eval) for name in spec.eval_splits)):
        _synthetic_split(spec.name, n_rows, rng).to_parquet(str(task_dir / f"{split}.parquet"))
    return Path(root)


def make_tiny_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    """Save a BERT WordPiece tokenizer whose vocabulary covers every synthetic word to `path`."""
    words = sorted(set(FILLER_WORDS) | set(CLASS_KEYWORDS) | {REGRESSION_KEYWORD})
    vocab = {token: token_id for token_id, token in enumerate((*SPECIAL_TOKENS, *words))}
    tokenizer = BertTokenizer(vocab=vocab)
    tokenizer.save_pretrained(str(path))
    return tokenizer
