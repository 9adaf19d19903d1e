"""Extractive question answering (SQuAD v1.1 and v2.0): input checks, window features, the best span
over all windows, and the official SQuAD metrics. Pure functions over `datasets` rows, numpy arrays
and a Hugging Face fast tokenizer; the task registry and the stages put them to work.

Preprocessing and post-processing follow the Hugging Face `run_qa.py` example (`utils_qa.py`):
question + context, long contexts split into overlapping windows (`doc_stride` tokens shared by
consecutive windows), character offsets to map tokens back to the context, the best span over all
windows of an example, and for v2.0 the no-answer score (CLS) against the best span. The metrics
are the official SQuAD v2.0 evaluation script's (v1.1 is the same without the no-answer parts),
as fractions in [0, 1].
"""

from __future__ import annotations

import collections
import re
import string

import numpy as np
import pyarrow as pa
import pyarrow.compute

from eftnas_cli.errors import DataError, RecipeError

QA_COLUMNS = ("id", "question", "context", "answers")
# Rows named in an error message: enough to find the problem, short enough for one line.
MAX_NAMED_ROWS = 3


def _table(dataset) -> pa.Table:
    """The Arrow table behind a `datasets.Dataset` (or a plain Arrow table / dict of columns)."""
    if isinstance(dataset, pa.Table):
        return dataset
    if isinstance(dataset, dict):
        return pa.table(dataset)
    # A Dataset's `.data` is its (possibly memory-mapped) table; indices come from select/shuffle.
    if getattr(dataset, "_indices", None) is not None:
        dataset = dataset.flatten_indices()
    return dataset.data.table


def _named(ids: list[str], count: int) -> str:
    shown = ", ".join(repr(i) for i in ids[:MAX_NAMED_ROWS])
    return shown + (f" and {count - MAX_NAMED_ROWS} more" if count > MAX_NAMED_ROWS else "")


def check_examples(dataset, source: str, *, version_2: bool = False) -> None:
    """Raise a one-line DataError naming `source` if `dataset` is not usable SQuAD data.

    Checks the columns, one answer start per answer text, every answer text found at its start in
    the context, unique ids, and (for v1.1, `version_2=False`) at least one answer per question.
    """
    table = _table(dataset)
    missing = [column for column in QA_COLUMNS if column not in table.column_names]
    if missing:
        raise DataError(
            f"{source}: no column {', '.join(map(repr, missing))}; question answering needs "
            f"{', '.join(QA_COLUMNS)} (answers = {{text: [...], answer_start: [...]}})"
        )
    answers_type = table.schema.field("answers").type
    if not (pa.types.is_struct(answers_type) and {"text", "answer_start"} <= {f.name for f in answers_type}):
        raise DataError(f"{source}: column 'answers' must hold {{text: [...], answer_start: [...]}}, not {answers_type}")

    ids = table.column("id").to_pylist()
    for column in ("id", "question", "context"):
        nulls = table.column(column).null_count
        if nulls:
            raise DataError(f"{source}: {nulls} rows have no {column!r}")
    if len(set(ids)) != len(ids):
        seen, repeated = set(), []
        for example_id in ids:
            if example_id in seen:
                repeated.append(example_id)
            seen.add(example_id)
        raise DataError(f"{source}: ids must be unique; {_named(repeated, len(repeated))} repeated")

    answers = table.column("answers").combine_chunks()
    # flatten(), unlike field(), honours the slice offset of a selected or sharded table.
    texts, starts = (answers.flatten()[answers.type.get_field_index(name)] for name in ("text", "answer_start"))
    uneven = np.flatnonzero(
        texts.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
        != starts.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
    )
    if len(uneven):
        raise DataError(f"{source}: answers of {_named([ids[i] for i in uneven], len(uneven))} have not one answer_start per text")
    answer_counts = texts.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
    if not version_2:
        unanswered = np.flatnonzero(answer_counts == 0)
        if len(unanswered):
            raise DataError(
                f"{source}: {len(unanswered)} questions have no answer ({_named([ids[i] for i in unanswered], len(unanswered))}); "
                "SQuAD v1.1 needs one per question (unanswerable questions are squad_v2)"
            )

    # One answer per entry of the flattened lists; slicing a Python string counts characters
    # (code points), the unit of `answer_start` and of the tokenizer's offsets.
    contexts = table.column("context").to_pylist()
    rows = pyarrow.compute.list_parent_indices(texts).to_numpy(zero_copy_only=False)
    mismatched = []
    for row, text, start in zip(rows, texts.flatten().to_pylist(), starts.flatten().to_pylist()):
        if text is None or start is None or start < 0 or contexts[row][start : start + len(text)] != text:
            mismatched.append(ids[row])
    if mismatched:
        mismatched = list(dict.fromkeys(mismatched))
        raise DataError(
            f"{source}: the answer of {_named(mismatched, len(mismatched))} is not in its context at its "
            "answer_start (context[answer_start : answer_start + len(text)] != text)"
        )


def check_windows(max_seq_length: int, doc_stride: int, source: str) -> None:
    """Raise a one-line RecipeError naming `source` unless 0 < doc_stride < max_seq_length."""
    if doc_stride <= 0 or doc_stride >= max_seq_length:
        raise RecipeError(
            f"{source}: doc_stride ({doc_stride}) must be positive and smaller than max_seq_length "
            f"({max_seq_length}); consecutive windows of a long context share doc_stride tokens"
        )


def _tokenize_windows(examples: dict[str, list], tokenizer, max_seq_length: int, doc_stride: int):
    """Tokenize question + context into overlapping windows; returns (encoding, context sequence index)."""
    # Leading white space in questions wastes tokens in the windows (as the HF example notes).
    questions = [question.lstrip() for question in examples["question"]]
    contexts = examples["context"]
    pad_on_right = tokenizer.padding_side == "right"
    # The tokenizer aborts the whole process (a Rust panic) when a question leaves no room for the
    # stride: catch that case first, as a data error.
    context_room = max_seq_length - tokenizer.num_special_tokens_to_add(pair=True)
    question_lengths = [len(ids) for ids in tokenizer(questions, add_special_tokens=False)["input_ids"]]
    longest = int(np.argmax(question_lengths))
    if context_room - question_lengths[longest] <= doc_stride:
        raise DataError(
            f"question {examples['id'][longest]!r} has {question_lengths[longest]} tokens: with max_seq_length "
            f"{max_seq_length} a window keeps {context_room - question_lengths[longest]} context tokens, "
            f"not more than doc_stride ({doc_stride}); raise max_seq_length or lower doc_stride"
        )
    encoding = tokenizer(
        questions if pad_on_right else contexts,
        contexts if pad_on_right else questions,
        truncation="only_second" if pad_on_right else "only_first",
        max_length=max_seq_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        # The collator pads on the right later without moving tokens; padding on the left would
        # shift every position, so a left-padding tokenizer pads here.
        padding=False if pad_on_right else "max_length",
    )
    return encoding, 1 if pad_on_right else 0


def _model_inputs(encoding) -> dict[str, list]:
    return {key: values for key, values in encoding.items() if key not in ("offset_mapping", "overflow_to_sample_mapping")}


def prepare_train_features(examples: dict[str, list], tokenizer, max_seq_length: int, doc_stride: int) -> dict:
    """Batched `Dataset.map` function: windows with the first answer's start/end token positions.

    A window that does not contain the whole answer, and an unanswerable (v2.0) question, points
    both positions at the CLS token: the model learns "no answer here".
    """
    encoding, context_index = _tokenize_windows(examples, tokenizer, max_seq_length, doc_stride)
    start_positions, end_positions = [], []
    for window, example_index in enumerate(encoding["overflow_to_sample_mapping"]):
        input_ids = encoding["input_ids"][window]
        cls_index = input_ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in input_ids else 0
        answers = examples["answers"][example_index]
        if not answers["answer_start"]:
            start_positions.append(cls_index)
            end_positions.append(cls_index)
            continue
        start_char = answers["answer_start"][0]
        end_char = start_char + len(answers["text"][0])
        sequence_ids = encoding.sequence_ids(window)
        context_tokens = np.array([k for k, s in enumerate(sequence_ids) if s == context_index])
        offsets = np.asarray(encoding["offset_mapping"][window])[context_tokens]
        if not (offsets[0, 0] <= start_char and offsets[-1, 1] >= end_char):
            start_positions.append(cls_index)
            end_positions.append(cls_index)
            continue
        # Context offsets never decrease: the start token is the last one starting at or before the
        # answer's first character, the end token the first one ending at or after its last.
        start_positions.append(int(context_tokens[np.searchsorted(offsets[:, 0], start_char, side="right") - 1]))
        end_positions.append(int(context_tokens[np.searchsorted(offsets[:, 1], end_char, side="left")]))
    features = _model_inputs(encoding)
    features["start_positions"] = start_positions
    features["end_positions"] = end_positions
    return features


def prepare_eval_features(examples: dict[str, list], tokenizer, max_seq_length: int, doc_stride: int) -> dict:
    """Batched `Dataset.map` function: the training windows plus `example_id` (the row's id) and
    `offset_mapping` with None for every token outside the context (question, special, padding).

    Remove both columns before the model sees the features; `postprocess` reads them.
    """
    encoding, context_index = _tokenize_windows(examples, tokenizer, max_seq_length, doc_stride)
    example_ids, offset_mapping = [], []
    for window, example_index in enumerate(encoding["overflow_to_sample_mapping"]):
        sequence_ids = encoding.sequence_ids(window)
        example_ids.append(examples["id"][example_index])
        offset_mapping.append(
            [list(offset) if sequence_ids[k] == context_index else None for k, offset in enumerate(encoding["offset_mapping"][window])]
        )
    features = _model_inputs(encoding)
    features["example_id"] = example_ids
    features["offset_mapping"] = offset_mapping
    return features


def _column(rows, name: str) -> list:
    if isinstance(rows, dict):
        return list(rows[name])
    return _table(rows).column(name).to_pylist()


def _context_offsets(features, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Per window and token: first and one-past-last context character, -1 outside the context."""
    if isinstance(features, dict):
        offsets = pa.array(features["offset_mapping"], type=pa.list_(pa.list_(pa.int64())))
    else:
        offsets = _table(features).column("offset_mapping").combine_chunks().cast(pa.list_(pa.list_(pa.int64())))
    lengths = offsets.value_lengths().to_numpy(zero_copy_only=False)
    tokens = offsets.flatten()  # one [start, end] (or null) per token of every window
    char_start = pyarrow.compute.list_element(tokens, 0).fill_null(-1).to_numpy(zero_copy_only=False)
    char_end = pyarrow.compute.list_element(tokens, 1).fill_null(-1).to_numpy(zero_copy_only=False)
    starts = np.full((len(lengths), width), -1, dtype=np.int64)
    ends = np.full((len(lengths), width), -1, dtype=np.int64)
    # Scatter each window's tokens into its row; a window longer than the logits would be a bug.
    rows = np.repeat(np.arange(len(lengths)), lengths)
    columns = np.arange(len(rows)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    starts[rows, columns] = char_start
    ends[rows, columns] = char_end
    return starts, ends


def postprocess(
    examples,
    features,
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    *,
    version_2: bool,
    n_best: int = 20,
    max_answer_length: int = 30,
) -> tuple[dict[str, str], dict[str, float]]:
    """The best answer per example over all its windows, and (v2.0) its null-score difference.

    `examples`: rows with `id` and `context`; `features`: `prepare_eval_features` rows (`example_id`,
    `offset_mapping`) in the order of the logits, [windows, tokens] (tokens may exceed a window's
    length: padding positions are ignored). Per window the `n_best` start and end tokens inside the
    context are paired (start <= end, at most `max_answer_length` tokens); the best pair over all
    windows gives the text. Returns ({id: text}, {id: null score - best span score}) where the null
    score is start+end logit at token 0 (CLS for right-padding tokenizers, as in the HF script),
    minimum over the windows; the second dict is empty for v1.1. The text is the best span even
    when the null score wins: `squad_metrics` applies the no-answer threshold, so that it can also
    search the best one. An example with no valid span gets '' (and a null difference of +inf).
    """
    start_logits = np.asarray(start_logits, dtype=np.float64)
    end_logits = np.asarray(end_logits, dtype=np.float64)
    if start_logits.shape != end_logits.shape or start_logits.ndim != 2:
        raise ValueError(f"start and end logits must be [windows, tokens] alike, not {start_logits.shape} and {end_logits.shape}")
    example_ids = _column(features, "example_id")
    if len(example_ids) != len(start_logits):
        raise ValueError(f"{len(example_ids)} features but {len(start_logits)} rows of logits")
    char_start, char_end = _context_offsets(features, start_logits.shape[1])
    in_context = char_start >= 0

    # Top-k context tokens per window, then every (start, end) pair of them at once.
    k = min(n_best, start_logits.shape[1])
    masked_start = np.where(in_context, start_logits, -np.inf)
    masked_end = np.where(in_context, end_logits, -np.inf)
    top_starts = np.argsort(-masked_start, axis=1, kind="stable")[:, :k]
    top_ends = np.argsort(-masked_end, axis=1, kind="stable")[:, :k]
    start_scores = np.take_along_axis(masked_start, top_starts, axis=1)
    end_scores = np.take_along_axis(masked_end, top_ends, axis=1)
    span_length = top_ends[:, None, :] - top_starts[:, :, None] + 1
    pair_scores = start_scores[:, :, None] + end_scores[:, None, :]
    valid = (span_length >= 1) & (span_length <= max_answer_length) & np.isfinite(pair_scores)
    pair_scores = np.where(valid, pair_scores, -np.inf).reshape(len(pair_scores), -1)
    best_pair = pair_scores.argmax(axis=1)
    window_best = pair_scores[np.arange(len(pair_scores)), best_pair]
    window_start = top_starts[np.arange(len(top_starts)), best_pair // k]
    window_end = top_ends[np.arange(len(top_ends)), best_pair % k]
    window_null = start_logits[:, 0] + end_logits[:, 0]

    windows_of = collections.defaultdict(list)
    for window, example_id in enumerate(example_ids):
        windows_of[example_id].append(window)
    predictions, null_score_diffs = {}, {}
    for example_id, context in zip(_column(examples, "id"), _column(examples, "context")):
        windows = windows_of.get(example_id)
        if not windows:
            raise ValueError(f"example {example_id!r} has no features")
        best = windows[int(np.argmax(window_best[windows]))]
        best_score = window_best[best]
        if np.isfinite(best_score):
            text = context[char_start[best, window_start[best]] : char_end[best, window_end[best]]]
        else:
            text = ""
        predictions[example_id] = text
        if version_2:
            null_score_diffs[example_id] = float(window_null[windows].min() - best_score)
    return predictions, null_score_diffs


# --- The official SQuAD evaluation (v2.0 script; v1.1 is its answerable part) -----------------

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles (a, an, the), single spaces: the official order."""
    text = text.lower()
    text = "".join(character for character in text if character not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    """Token-overlap F1 of the normalised texts; two empty texts agree (1.0), one empty one scores 0."""
    prediction_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not prediction_tokens or not gold_tokens:
        return float(prediction_tokens == gold_tokens)
    common = collections.Counter(prediction_tokens) & collections.Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(prediction_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _best_threshold(
    ids: list[str],
    predictions: dict[str, str],
    raw_scores: dict[str, float],
    null_scores: dict[str, float],
    has_answer: dict[str, bool],
) -> tuple[float, float]:
    """The official `find_best_thresh`: start from "no answer" everywhere, then answer the questions
    in increasing null score difference; the best running score and the difference where it is reached."""
    score = best_score = float(sum(not has_answer[i] for i in ids))
    best_threshold = 0.0
    for example_id in sorted(ids, key=lambda i: null_scores[i]):
        if has_answer[example_id]:
            score += raw_scores[example_id]
        elif predictions[example_id]:
            score -= 1
        if score > best_score:
            best_score = score
            best_threshold = null_scores[example_id]
    return best_score / len(ids), float(best_threshold)


def squad_metrics(
    predictions: dict[str, str],
    references: dict[str, list[str]],
    *,
    null_scores: dict[str, float] | None = None,
    null_threshold: float = 0.0,
    version_2: bool | None = None,
) -> dict[str, float]:
    """Official SQuAD exact match and F1 (max over the gold answers) as fractions in [0, 1].

    `references`: id -> gold answer texts (an empty list: unanswerable, v2.0). With `null_scores`
    (id -> null score difference, from `postprocess`) a prediction whose difference exceeds
    `null_threshold` becomes ''. `version_2` (default: true when null scores are given or a
    question has no answer) adds the HasAns/NoAns splits and, with null scores, the best
    thresholds for exact match and F1 (`best_*`).
    """
    missing = [i for i in references if i not in predictions]
    if missing:
        raise ValueError(f"no prediction for {len(missing)} of {len(references)} questions ({_named(missing, len(missing))})")
    if version_2 is None:
        version_2 = null_scores is not None or any(not golds for golds in references.values())
    ids = list(references)
    # As the official script: gold answers that normalise to nothing do not count; none left = no answer.
    golds = {i: [g for g in references[i] if normalize_answer(g)] for i in ids}
    has_answer = {i: bool(golds[i]) for i in ids}
    raw_exact = {i: max(exact_match_score(predictions[i], g) for g in golds[i] or [""]) for i in ids}
    raw_f1 = {i: max(f1_score(predictions[i], g) for g in golds[i] or [""]) for i in ids}
    exact, f1 = dict(raw_exact), dict(raw_f1)
    if null_scores is not None:
        for i in ids:
            if null_scores[i] > null_threshold:
                exact[i] = f1[i] = float(not has_answer[i])

    def mean(scores: dict[str, float], subset: list[str]) -> float:
        return float(np.mean([scores[i] for i in subset]))

    metrics = {"exact_match": mean(exact, ids), "f1": mean(f1, ids)}
    metrics["score"] = metrics["f1"]
    if not version_2:
        return metrics
    for group, subset in (("has_ans", [i for i in ids if has_answer[i]]), ("no_ans", [i for i in ids if not has_answer[i]])):
        if subset:
            metrics[f"{group}_exact_match"] = mean(exact, subset)
            metrics[f"{group}_f1"] = mean(f1, subset)
    if null_scores is not None:
        metrics["best_exact_match"], metrics["best_exact_match_threshold"] = _best_threshold(
            ids, predictions, raw_exact, null_scores, has_answer
        )
        metrics["best_f1"], metrics["best_f1_threshold"] = _best_threshold(ids, predictions, raw_f1, null_scores, has_answer)
    return metrics
