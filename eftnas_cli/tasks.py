"""The task registry: what every stage needs to know about a task, in one place.

A task KIND (text classification — one sentence or a pair —, regression, extractive question
answering) owns everything that differs between kinds: the model class, preprocessing, the
collator, the distillation loss, evaluation, the names of the exported graph's outputs, the rows
INT8 calibration reads and the head counted in MACs. The task TABLE maps each task name to its
kind, hub dataset, columns, metric and validation splits. Stages ask a task, never a kind's details
(the shape of Optimum's `TasksManager`); adding a kind is one class and its table rows here.

GLUE metrics follow the hub's `evaluate` "glue" metric but are computed with scikit-learn/scipy,
and SQuAD's with `eftnas_cli.qa`, so that evaluation works offline.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
from dataclasses import dataclass

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from transformers import (
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    DataCollatorWithPadding,
    PreTrainedTokenizerBase,
)

from eftnas_cli import distributed
from eftnas_cli.errors import UnknownTaskError

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# Logits of padded positions when the windows of differently padded batches are stacked: never chosen.
PADDED_LOGIT = -1e9


@dataclass(frozen=True)
class Preprocessing:
    """The recipe's settings for turning rows into model inputs (the QA ones only matter for QA)."""

    max_seq_length: int = 128
    doc_stride: int = 128
    max_answer_length: int = 30
    n_best: int = 20


@dataclass(frozen=True)
class Task:
    """One row of the table: a task name and what its data and metric are."""

    name: str
    kind: TaskKind
    hub_id: str
    hub_config: str | None
    text_keys: tuple[str, ...]  # the text columns the tokenizer reads, in order
    main_metric: str  # what model selection maximizes, also reported as `score`
    eval_splits: tuple[str, ...]  # the first one is the main split; the others are reported
    num_labels: int = 2  # classification only
    version_2: bool = False  # SQuAD v2.0: questions may have no answer

    @property
    def is_regression(self) -> bool:
        return self.kind is REGRESSION

    @property
    def columns(self) -> tuple[str, ...]:
        """The columns a data file of this task must have."""
        return (*self.text_keys, *self.kind.label_columns)

    @property
    def reported_metrics(self) -> tuple[str, ...]:
        """The metrics result tables show: the main one first."""
        return self.kind.reported_metrics(self)


# ---- text classification and regression -------------------------------------------------------
class SequenceClassification:
    """One sentence or a sentence pair → class logits (`num_labels`). KD: KL of the temperature-
    softened class distributions (× T²) mixed with cross-entropy on the labels."""

    name = "sequence-classification"
    model_class = AutoModelForSequenceClassification
    output_names = ("logits",)
    label_names = ("labels",)  # in a batch
    label_columns = ("label",)  # in a data file
    head = "sequence-classification"  # elastic.cost's head of this kind

    def config_overrides(self, task: Task) -> dict:
        return {"num_labels": task.num_labels, "problem_type": "single_label_classification"}

    def check_split(self, split: datasets.Dataset, task: Task, source: str) -> None:
        """Nothing beyond the columns, which `load_raw` checks for every kind."""

    def _tokenize(self, split: datasets.Dataset, task: Task, tokenizer: PreTrainedTokenizerBase,
                  settings: Preprocessing, fingerprint: str) -> datasets.Dataset:
        def encode(batch):
            # No padding here: the collator pads each batch to its own longest sequence.
            return tokenizer(*(batch[key] for key in task.text_keys), truncation=True, max_length=settings.max_seq_length)

        tokenized = split.map(encode, batched=True, new_fingerprint=fingerprint,
                              remove_columns=[column for column in split.column_names if column != "label"])
        return tokenized.rename_column("label", "labels")

    def prepare_train(self, split, task, tokenizer, settings, fingerprint) -> datasets.Dataset:
        return self._tokenize(split, task, tokenizer, settings, fingerprint)

    def prepare_eval(self, split, task, tokenizer, settings, fingerprint) -> datasets.Dataset:
        return self._tokenize(split, task, tokenizer, settings, fingerprint)

    def collator(self, tokenizer: PreTrainedTokenizerBase):
        return DataCollatorWithPadding(tokenizer)

    def distillation_loss(self, student, teacher, labels: dict, weight: float, temperature: float) -> torch.Tensor:
        soft = F.kl_div(
            F.log_softmax(student.logits / temperature, dim=-1),
            F.softmax(teacher.logits / temperature, dim=-1),
            reduction="batchmean",
        ) * temperature**2
        hard = F.cross_entropy(student.logits, labels["labels"])
        return weight * soft + (1 - weight) * hard

    def evaluate(self, model, rows: datasets.Dataset, collator, task: Task, batch_size: int = 64) -> dict[str, float]:
        outputs, labels = model_outputs(model, rows, collator, self.output_names, batch_size, with_labels=True)
        metrics = self.metrics(task, outputs["logits"], labels)
        return {**metrics, "score": main_metric_value(task, metrics)}

    def metrics(self, task: Task, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """GLUE metrics as fractions: logits (N, num_labels) or already-decided class ids (N,)."""
        predicted = predictions.argmax(axis=-1) if predictions.ndim == 2 else predictions
        if task.name == "cola":
            return {"matthews_correlation": float(matthews_corrcoef(labels, predicted))}
        metrics = {"accuracy": float(accuracy_score(labels, predicted))}
        if task.name in ("mrpc", "qqp"):
            metrics["f1"] = float(f1_score(labels, predicted, pos_label=1, average="binary", zero_division=0.0))
        return metrics

    def reported_metrics(self, task: Task) -> tuple[str, ...]:
        return (task.main_metric, *(["f1"] if task.name in ("mrpc", "qqp") else []))

    def calibration_rows(self, train: datasets.Dataset) -> datasets.Dataset:
        """The rows INT8 calibration reads (their model inputs only): training rows."""
        return train


class Regression(SequenceClassification):
    """A sentence pair → one score (STS-B). KD: MSE between the student's and the teacher's score,
    mixed with MSE to the label. Selection on Pearson's r (Spearman's ρ reported beside)."""

    name = "regression"

    def config_overrides(self, task: Task) -> dict:
        return {"num_labels": 1, "problem_type": "regression"}

    def _tokenize(self, split, task, tokenizer, settings, fingerprint) -> datasets.Dataset:
        tokenized = super()._tokenize(split, task, tokenizer, settings, fingerprint)
        return tokenized.cast_column("labels", datasets.Value("float32"))

    def distillation_loss(self, student, teacher, labels: dict, weight: float, temperature: float) -> torch.Tensor:
        score = student.logits.squeeze(-1)
        soft = F.mse_loss(score, teacher.logits.squeeze(-1))
        hard = F.mse_loss(score, labels["labels"].float())
        return weight * soft + (1 - weight) * hard

    def metrics(self, task: Task, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        scores = np.asarray(predictions).reshape(-1).astype(np.float64)
        labels = np.asarray(labels).reshape(-1).astype(np.float64)
        if np.ptp(scores) == 0 or np.ptp(labels) == 0:
            # Correlation is undefined (scipy warns, returns NaN) for constant input, e.g. an untrained
            # head; it carries no signal, and 0.0 keeps model comparisons well defined.
            return {"pearson": 0.0, "spearmanr": 0.0}
        return {"pearson": float(pearsonr(scores, labels)[0]), "spearmanr": float(spearmanr(scores, labels)[0])}

    def reported_metrics(self, task: Task) -> tuple[str, ...]:
        return ("pearson", "spearmanr")


# ---- extractive question answering --------------------------------------------------------------
@dataclass
class QAEvalSplit:
    """QA rows to evaluate on: the examples (questions with their contexts and gold answers) and
    their features (the overlapping windows the model reads, with `example_id` and `offset_mapping`).

    Reads like the parts of a `datasets.Dataset` that the stages use: `len` and `select` count
    examples (a selected example keeps all its windows), `_fingerprint` identifies the rows.
    """

    examples: datasets.Dataset
    features: datasets.Dataset
    settings: Preprocessing

    def __len__(self) -> int:
        return len(self.examples)

    def select(self, indices) -> QAEvalSplit:
        examples = self.examples.select(indices)
        kept = set(examples["id"])
        windows = [index for index, example_id in enumerate(self.features["example_id"]) if example_id in kept]
        # Flattened once here, not at every evaluation (postprocessing reads the Arrow table).
        return QAEvalSplit(examples.flatten_indices(), self.features.select(windows).flatten_indices(), self.settings)

    @property
    def _fingerprint(self) -> str:
        return hashlib.sha256(f"{self.examples._fingerprint}|{self.features._fingerprint}".encode()).hexdigest()[:16]


class ExtractiveQA:
    """Question + context → start and end logits per token (SQuAD v1.1 / v2.0).

    Contexts longer than `max_seq_length` become overlapping windows (`doc_stride` tokens apart),
    never truncated; the answer is the best span over all windows of an example, at most
    `max_answer_length` tokens; for v2.0 the no-answer score competes. KD: the KL of the softened
    start and of the end distributions (× T², averaged) mixed with cross-entropy on the gold positions.
    """

    name = "question-answering"
    model_class = AutoModelForQuestionAnswering
    output_names = ("start_logits", "end_logits")
    label_names = ("start_positions", "end_positions")
    label_columns = ("id", "answers")
    head = "question-answering"

    def config_overrides(self, task: Task) -> dict:
        return {"num_labels": 2}  # the span head's two outputs per token: start and end

    def check_split(self, split: datasets.Dataset, task: Task, source: str) -> None:
        from eftnas_cli import qa

        qa.check_examples(split, source, version_2=task.version_2)

    def prepare_train(self, split, task, tokenizer, settings, fingerprint) -> datasets.Dataset:
        from eftnas_cli import qa

        prepare = functools.partial(qa.prepare_train_features, tokenizer=tokenizer,
                                    max_seq_length=settings.max_seq_length, doc_stride=settings.doc_stride)
        return split.map(prepare, batched=True, remove_columns=split.column_names, new_fingerprint=fingerprint)

    def prepare_eval(self, split, task, tokenizer, settings, fingerprint) -> QAEvalSplit:
        from eftnas_cli import qa

        prepare = functools.partial(qa.prepare_eval_features, tokenizer=tokenizer,
                                    max_seq_length=settings.max_seq_length, doc_stride=settings.doc_stride)
        features = split.map(prepare, batched=True, remove_columns=split.column_names, new_fingerprint=fingerprint)
        return QAEvalSplit(split, features, settings)

    def collator(self, tokenizer: PreTrainedTokenizerBase):
        return DataCollatorWithPadding(tokenizer)

    def distillation_loss(self, student, teacher, labels: dict, weight: float, temperature: float) -> torch.Tensor:
        soft = hard = 0.0
        for output, positions in (("start_logits", "start_positions"), ("end_logits", "end_positions")):
            student_logits, teacher_logits = getattr(student, output), getattr(teacher, output)
            soft = soft + F.kl_div(
                F.log_softmax(student_logits / temperature, dim=-1),
                F.softmax(teacher_logits / temperature, dim=-1),
                reduction="batchmean",
            ) * temperature**2
            hard = hard + F.cross_entropy(student_logits, labels[positions])
        return (weight * soft + (1 - weight) * hard) / 2

    def evaluate(self, model, rows: QAEvalSplit, collator, task: Task, batch_size: int = 64) -> dict[str, float]:
        from eftnas_cli import qa

        outputs, _ = model_outputs(model, rows.features, collator, self.output_names, batch_size, with_labels=False)
        predictions, null_scores = qa.postprocess(
            rows.examples, rows.features, outputs["start_logits"], outputs["end_logits"], version_2=task.version_2,
            n_best=rows.settings.n_best, max_answer_length=rows.settings.max_answer_length)
        references = {example["id"]: example["answers"]["text"] for example in rows.examples}
        metrics = qa.squad_metrics(predictions, references, null_scores=null_scores if task.version_2 else None,
                                   version_2=task.version_2)
        return {**metrics, "score": main_metric_value(task, metrics)}

    def reported_metrics(self, task: Task) -> tuple[str, ...]:
        return ("exact_match", "f1")

    def calibration_rows(self, train: datasets.Dataset) -> datasets.Dataset:
        """Training windows: question + context inputs as the deployed model sees them."""
        return train


SEQUENCE_CLASSIFICATION, REGRESSION, EXTRACTIVE_QA = SequenceClassification(), Regression(), ExtractiveQA()
TaskKind = SequenceClassification | ExtractiveQA


def _glue(name, text_keys, main_metric="accuracy", num_labels=2, eval_splits=("validation",), kind=SEQUENCE_CLASSIFICATION):
    return Task(name, kind, "nyu-mll/glue", name, text_keys, main_metric, eval_splits, num_labels)


def _squad(name, hub_id, version_2):
    return Task(name, EXTRACTIVE_QA, hub_id, None, ("question", "context"), "f1", ("validation",), version_2=version_2)


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        _glue("cola", ("sentence",), main_metric="matthews_correlation"),
        _glue("sst2", ("sentence",)),
        # Accuracy, not F1, drives selection on MRPC/QQP: F1 favours always answering "equivalent"
        # (a constant scores 0.81 F1 on MRPC dev). F1 is still computed and reported.
        _glue("mrpc", ("sentence1", "sentence2")),
        _glue("qqp", ("question1", "question2")),
        _glue("stsb", ("sentence1", "sentence2"), main_metric="pearson", num_labels=1, kind=REGRESSION),
        # Matched selects (after the search rows); mismatched is reported beside it.
        _glue("mnli", ("premise", "hypothesis"), num_labels=3,
              eval_splits=("validation_matched", "validation_mismatched")),
        _glue("qnli", ("question", "sentence")),
        _glue("rte", ("sentence1", "sentence2")),
        _glue("wnli", ("sentence1", "sentence2")),
        _squad("squad", "rajpurkar/squad", version_2=False),
        _squad("squad_v2", "rajpurkar/squad_v2", version_2=True),
    )
}


def get_task(name: str) -> Task:
    """The task called `name`; a misspelt name gets the closest known name suggested."""
    key = name.strip().lower()
    if key in TASKS:
        return TASKS[key]
    message = f"unknown task {name!r}; choose from {', '.join(TASKS)}"
    close = difflib.get_close_matches(key, TASKS, n=1)
    if close:
        message += f" (did you mean {close[0]!r}?)"
    raise UnknownTaskError(message)


def kind_of_model(config) -> TaskKind:
    """The kind a saved model was trained for, from its config's architecture name (classification
    when it names none, e.g. a pretrained encoder)."""
    architectures = getattr(config, "architectures", None) or []
    if any(name.endswith("ForQuestionAnswering") for name in architectures):
        return EXTRACTIVE_QA
    if getattr(config, "problem_type", None) == "regression":
        return REGRESSION
    return SEQUENCE_CLASSIFICATION


def compute_metrics(task: str | Task, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """A classification or regression task's metrics of predictions against labels (fractions)."""
    task = get_task(task) if isinstance(task, str) else task
    return task.kind.metrics(task, np.asarray(predictions), np.asarray(labels))


def main_metric_value(task: str | Task, metrics: dict[str, float]) -> float:
    """The value of the task's headline metric (the one model selection maximizes)."""
    task = get_task(task) if isinstance(task, str) else task
    if task.main_metric not in metrics:
        raise KeyError(f"metrics for task {task.name!r} lack {task.main_metric!r}; got {sorted(metrics)}")
    return float(metrics[task.main_metric])


@torch.no_grad()
def model_outputs(model, rows: datasets.Dataset, collator, output_names, batch_size: int = 64, *,
                  with_labels: bool) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """The named outputs of `model` over `rows` in their order (a plain loop over batches of similar
    length: cheap enough for search trials), and the rows' labels when asked. Per-token outputs of
    batches padded to different lengths are stacked padded with PADDED_LOGIT."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    if distributed.active():  # each rank computes its share of the rows; every rank gets them all
        rows = rows.select(distributed.shard(len(rows)))
    inputs = [name for name in MODEL_INPUTS if name in rows.column_names]
    keys = [*inputs, *(["labels"] if with_labels else [])]
    rows = rows.select_columns(keys)  # QA windows also hold offsets, which slicing would read for nothing
    # Batches of rows of similar length pad less (MRPC at batch 64: 54 tokens a row instead of 83);
    # the outputs are put back in the rows' order below.
    order = np.argsort([len(ids) for ids in rows["input_ids"]], kind="stable")
    rows = rows.select(order)
    collected: dict[str, list[np.ndarray]] = {name: [] for name in output_names}
    labels = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start: start + batch_size]
        batch = collator([{key: chunk[key][i] for key in keys} for i in range(len(chunk[inputs[0]]))])
        if with_labels:
            labels.append(batch.pop("labels").numpy())
        outputs = model(**{key: value.to(device) for key, value in batch.items()})
        for name in output_names:
            collected[name].append(outputs[name].float().cpu().numpy())
    model.train(was_training)
    if len(order):  # a rank's shard can be empty
        restore = np.argsort(order)
        collected = {name: [_stack(parts)[restore]] for name, parts in collected.items()}
        labels = [np.concatenate(labels)[restore]] if with_labels else labels
    collected, labels = distributed.gather_lists(collected, labels)
    stacked = {name: _stack(parts) for name, parts in collected.items()}
    return stacked, np.concatenate(labels) if with_labels else None


def _stack(parts: list[np.ndarray]) -> np.ndarray:
    if parts[0].ndim < 2 or all(part.shape[1:] == parts[0].shape[1:] for part in parts):
        return np.concatenate(parts)
    width = max(part.shape[1] for part in parts)
    return np.concatenate([np.pad(part, ((0, 0), (0, width - part.shape[1])), constant_values=PADDED_LOGIT)
                           for part in parts])
