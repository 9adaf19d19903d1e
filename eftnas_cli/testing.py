"""Tiny offline stand-ins for GLUE and SQuAD data and a tokenizer, so that end-to-end tests run in seconds."""

from __future__ import annotations

import random
from pathlib import Path

import datasets
from transformers import BertTokenizer, PreTrainedTokenizerFast

from eftnas_cli.data import TRAIN_SPLIT
from eftnas_cli.tasks import EXTRACTIVE_QA, get_task

FILLER_WORDS = (
    "the a movie film story plot actor scene music book day night city river house car dog cat "
    "was is very quite rather somewhat really and but with of to in on"
).split()
# One keyword per class: the label of a synthetic example is the class whose keyword it contains,
# which gives even a tiny model a signal it can learn.
CLASS_KEYWORDS = ("bad", "good", "maybe")
# For regression (stsb) the target is the number of times this word occurs.
REGRESSION_KEYWORD = "good"
# For question answering the answer is this word and the one after it.
QA_KEYWORD = "here"
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


def make_tiny_glue_dir(root: Path, task: str = "mrpc", n_train: int = 64, n_eval: int = 32, seed: int = 0,
                       extra_splits: dict[str, int] | None = None) -> Path:
    """Write `root/<task>/<split>.parquet` for train, the task's eval splits and `extra_splits` (name:
    rows); return root.

    The returned folder is what `load_raw`/`load_task_data` take as data_dir. Columns and features
    follow the hub's `nyu-mll/glue` files.
    """
    spec = get_task(task)
    rng = random.Random(seed)
    task_dir = Path(root) / spec.name
    task_dir.mkdir(parents=True, exist_ok=True)
    for split, n_rows in ((TRAIN_SPLIT, n_train), *((name, n_eval) for name in spec.eval_splits),
                          *(extra_splits or {}).items()):
        _synthetic_split(spec.name, n_rows, rng).to_parquet(str(task_dir / f"{split}.parquet"))
    return Path(root)


def _synthetic_squad_split(task: str, n_rows: int, rng: random.Random, split: str) -> datasets.Dataset:
    """Questions whose answer is the QA_KEYWORD and the word after it in the context; some contexts
    are long (several windows at a short max_seq_length); for v2.0 every third has no answer."""
    spec = get_task(task)
    rows = {"id": [], "title": [], "context": [], "question": [], "answers": []}
    for index in range(n_rows):
        words = rng.choices(FILLER_WORDS, k=rng.choice((6, 12, 40)))
        answerable = not (spec.version_2 and index % 3 == 0)
        answer = ""
        if answerable:
            at = rng.randint(0, len(words) - 1)
            answer = f"{QA_KEYWORD} {words[at]}"
            words.insert(at, QA_KEYWORD)
        context = " ".join(words)
        start = context.index(answer) if answerable else None
        rows["id"].append(f"{split}-{index}")
        rows["title"].append("synthetic")
        rows["context"].append(context)
        rows["question"].append(" ".join(rng.choices(FILLER_WORDS, k=4)))
        # Training rows carry one answer, evaluation rows two (the same span twice), as SQuAD's do.
        copies = 1 if split == TRAIN_SPLIT else 2
        rows["answers"].append({"text": [answer] * copies if answerable else [],
                                "answer_start": [start] * copies if answerable else []})
    features = datasets.Features({
        "id": datasets.Value("string"), "title": datasets.Value("string"), "context": datasets.Value("string"),
        "question": datasets.Value("string"),
        "answers": {"text": datasets.List(datasets.Value("string")), "answer_start": datasets.List(datasets.Value("int32"))},
    })
    return datasets.Dataset.from_dict(rows, features=features)


def make_tiny_task_dir(root: Path, task: str, n_train: int = 64, n_eval: int = 32, seed: int = 0) -> Path:
    """Write `root/<task>/<split>.parquet` for train and the task's eval splits, with the columns
    and features of the task's hub files (GLUE or SQuAD); return root, a `task.data_dir`."""
    spec = get_task(task)
    if spec.kind is not EXTRACTIVE_QA:
        return make_tiny_glue_dir(root, task, n_train, n_eval, seed)
    rng = random.Random(seed)
    task_dir = Path(root) / spec.name
    task_dir.mkdir(parents=True, exist_ok=True)
    for split, n_rows in ((TRAIN_SPLIT, n_train), *((name, n_eval) for name in spec.eval_splits)):
        _synthetic_squad_split(spec.name, n_rows, rng, split).to_parquet(str(task_dir / f"{split}.parquet"))
    return Path(root)


def make_tiny_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    """Save a BERT WordPiece tokenizer whose vocabulary covers every synthetic word to `path`."""
    words = sorted(set(FILLER_WORDS) | set(CLASS_KEYWORDS) | {REGRESSION_KEYWORD, QA_KEYWORD})
    vocab = {token: token_id for token_id, token in enumerate((*SPECIAL_TOKENS, *words))}
    tokenizer = BertTokenizer(vocab=vocab)
    tokenizer.save_pretrained(str(path))
    return tokenizer


# One tiny architecture per family of the adapter table (eftnas_cli.elastic.ADAPTERS).
TINY_ARCHITECTURES = {
    "bert": ("BertConfig", {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}),
    "roberta": ("RobertaConfig", {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                                  "intermediate_size": 64, "type_vocab_size": 1}),
    "distilbert": ("DistilBertConfig", {"dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 64}),
}


def tiny_config(family: str, num_layers: int = 2, **changes):
    """The tiny config of one family (hidden 32, 4 heads, 64 FFN neurons, 64 positions)."""
    import transformers

    from eftnas_cli.elastic import ADAPTERS

    config_class, sizes = TINY_ARCHITECTURES[family]
    settings = {"vocab_size": 100, "max_position_embeddings": 64, **sizes, ADAPTERS[family].num_layers_attr: num_layers}
    return getattr(transformers, config_class)(**{**settings, **changes})


def make_tiny_model(path: Path, family: str = "bert", seed: int = 0, **config_changes) -> Path:
    """A randomly initialised tiny encoder with the tiny tokenizer, saved as a Hugging Face folder;
    `config_changes` go into its config (dropout 0 for runs that must compare exactly, say)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    tokenizer = make_tiny_tokenizer(path)
    config = tiny_config(family, vocab_size=len(tokenizer), **config_changes)
    transformers.AutoModel.from_config(config).save_pretrained(path)
    return path


# Small enough that every stage runs in seconds on 2 CPU cores.
TINY_RECIPE = {
    "name": "tiny",
    "seed": 0,
    "task": {"name": "mrpc", "max_seq_length": 32},
    "finetune": {"epochs": 2, "learning_rate": 1e-3, "batch_size": 16},
    "importance": {"epochs": 2, "learning_rate": 1e-3, "batch_size": 16, "warmup_start_epoch": 0.2,
                   "warmup_end_epoch": 1.0, "final_threshold": 0.3},
    # The tiny model's heads are coarse MACs steps at long sequences: count at 16 tokens.
    "space": {"num_targets": 3, "cmin": 0.4, "tolerance": 0.1, "seq_len": 16},
    "supernet": {"epochs": 1, "learning_rate": 1e-3, "batch_size": 16, "save_steps": 2},
    "search": {"population": 4, "trials": 8, "budgets": [0.6]},
    "export": {"budgets": [0.6], "latency_runs": 2, "calibration_samples": 16, "latency_batch_sizes": [1],
               "latency_seq_len": 16},
}


def write_tiny_recipe(path: Path, output_dir: Path, model_dir: Path, glue_dir: Path, changes: dict | None = None) -> Path:
    """TINY_RECIPE for `model_dir` and `glue_dir`, with dotted `changes`, written to `path`."""
    import copy

    import yaml

    recipe = copy.deepcopy(TINY_RECIPE)
    recipe["output_dir"] = str(output_dir)
    recipe["model"] = {"name": str(model_dir)}
    recipe["task"]["data_dir"] = str(glue_dir)
    for key, value in (changes or {}).items():
        section, _, leaf = key.rpartition(".")
        (recipe.setdefault(section, {}) if section else recipe)[leaf] = value
    path.write_text(yaml.safe_dump(recipe))
    return path


def export_beside_its_subnet(run_dir: Path, task: str, budget_folder: str = "budget-0.6"):
    """An export of a finished run and, in eval mode beside it, the super-network with the exported
    subnet active: what equality checks of an export compare. Returns (folder, exported, supernet)."""
    from eftnas_cli import elastic
    from eftnas_cli.models import load_model

    spec = get_task(task)
    folder = run_dir / "export" / budget_folder
    exported = load_model(str(folder), spec).eval()
    supernet = elastic.make_elastic(load_model(str(run_dir / "supernet" / "model"), spec)).eval()
    elastic.activate(supernet, elastic.Subnet.from_dict(exported.config.eftnas_subnet))
    return folder, exported, supernet


def random_features(vocab_size: int, batch: int, length: int, pad_row_1_from: int, second_segment_from: int | None = None):
    """Random token ids (seed 0, none of the special ids below 5), row 1 padded from a position, and
    token types that switch to the second segment from a position (pairs, QA)."""
    import torch

    input_ids = torch.randint(5, vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, pad_row_1_from:] = 0
    token_type_ids = torch.zeros_like(input_ids)
    if second_segment_from is not None:
        token_type_ids[:, second_segment_from:] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}


def crash_at_step(monkeypatch, step: int, trainer=None) -> None:
    """Make `trainer` (a Trainer class; default QuietTrainer) raise KeyboardInterrupt when it reaches
    global step `step`, as a Ctrl-C there would."""
    from eftnas_cli.training import QuietTrainer

    trainer = trainer or QuietTrainer
    original = trainer.training_step

    def step_then_crash(self, *args, **kwargs):
        if self.state.global_step == step:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(trainer, "training_step", step_then_crash)


def record_resumes(monkeypatch, trainer=None) -> list:
    """The checkpoint each later `train()` of `trainer` (default QuietTrainer) continues from (None: the start)."""
    from eftnas_cli.training import QuietTrainer

    trainer = trainer or QuietTrainer
    resumed_from = []
    original_train = trainer.train

    def record_train(self, *args, resume_from_checkpoint=None, **kwargs):
        resumed_from.append(resume_from_checkpoint)
        return original_train(self, *args, resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    monkeypatch.setattr(trainer, "train", record_train)
    return resumed_from
