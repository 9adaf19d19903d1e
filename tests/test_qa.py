"""Extractive QA: windows, best span over windows, and the official SQuAD metrics on hand-computed cases."""

import copy
from pathlib import Path

import datasets
import numpy as np
import pytest

from eftnas_cli import qa
from eftnas_cli.errors import DataError, RecipeError
from eftnas_cli.models import load_tokenizer

SHARED_SQUAD_DIR = Path(__file__).parents[2] / "shared" / "data" / "squad"

# 20 words, each one WordPiece token of the MiniLM vocabulary: token j of the context is WORDS[j].
WORDS = (
    "alpha bravo charlie delta echo golf hotel india juliet lima mike november oscar papa quebec romeo sierra tango uniform victor"
).split()
CONTEXT = " ".join(WORDS)
# "which one?" is 3 tokens; at max_seq_length 16 a window holds 16 - 3 - 3 special = 10 context
# tokens and shares doc_stride = 4 with the previous one: context tokens 0-9, 6-15, 12-19.
MAX_SEQ_LENGTH, DOC_STRIDE = 16, 4
QUESTION_TOKENS = 3
FIRST_CONTEXT_POSITION = 1 + QUESTION_TOKENS + 1  # after [CLS] question [SEP]
WINDOW_FIRST_WORD = (0, 6, 12)


def position(window: int, word: int) -> int:
    """Token position of WORDS[word] in `window`."""
    return FIRST_CONTEXT_POSITION + word - WINDOW_FIRST_WORD[window]


def answer(text: str) -> dict:
    return {"text": [text], "answer_start": [CONTEXT.index(text)]}


def rows(*answers, ids=None) -> dict[str, list]:
    ids = ids or [f"q{i}" for i in range(len(answers))]
    return {"id": ids, "question": ["which one?"] * len(answers), "context": [CONTEXT] * len(answers), "answers": list(answers)}


NO_ANSWER = {"text": [], "answer_start": []}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("minilm-l6")


# --- Windows ------------------------------------------------------------------------------------


def test_train_windows_point_at_the_answer_only_where_it_lies(tokenizer):
    # "mike november" = context tokens 10-11: only the second window (tokens 6-15) holds both.
    features = qa.prepare_train_features(rows(answer("mike november")), tokenizer, MAX_SEQ_LENGTH, DOC_STRIDE)
    assert len(features["input_ids"]) == 3
    assert [len(ids) for ids in features["input_ids"]] == [16, 16, 14]
    assert {"attention_mask", "token_type_ids"} <= set(features)
    assert features["start_positions"] == [0, position(1, 10), 0]
    assert features["end_positions"] == [0, position(1, 11), 0]
    assert (position(1, 10), position(1, 11)) == (9, 10)
    window = features["input_ids"][1]
    assert tokenizer.decode(window[9:11]) == "mike november"
    assert all(features["input_ids"][w][0] == tokenizer.cls_token_id for w in range(3))


def test_train_windows_of_an_answer_split_by_a_window_end(tokenizer):
    # "lima mike" = tokens 9-10: the first window ends at token 9, so only the second one has it.
    features = qa.prepare_train_features(rows(answer("lima mike")), tokenizer, MAX_SEQ_LENGTH, DOC_STRIDE)
    assert features["start_positions"] == [0, position(1, 9), 0]
    assert features["end_positions"] == [0, position(1, 10), 0]
    # "oscar papa" = tokens 12-13 lies in the second and the third window.
    features = qa.prepare_train_features(rows(answer("oscar papa")), tokenizer, MAX_SEQ_LENGTH, DOC_STRIDE)
    assert features["start_positions"] == [0, position(1, 12), position(2, 12)]
    for window in (1, 2):
        start, end = features["start_positions"][window], features["end_positions"][window]
        assert tokenizer.decode(features["input_ids"][window][start : end + 1]) == "oscar papa"


def test_answer_edges_inside_tokens_widen_to_whole_tokens(tokenizer):
    # "ike novem" starts inside "mike" and ends inside "november": the span covers both tokens.
    inside = {"text": ["ike novem"], "answer_start": [CONTEXT.index("mike") + 1]}
    features = qa.prepare_train_features(rows(inside), tokenizer, MAX_SEQ_LENGTH, DOC_STRIDE)
    assert features["start_positions"] == [0, position(1, 10), 0]
    assert features["end_positions"] == [0, position(1, 11), 0]


def test_unanswerable_question_points_every_window_at_cls(tokenizer):
    features = qa.prepare_train_features(rows(NO_ANSWER, answer("alpha")), tokenizer, MAX_SEQ_LENGTH, DOC_STRIDE)
    assert features["start_positions"] == [0, 0, 0, position(0, 0), 0, 0]
    assert features["end_positions"] == [0, 0, 0, position(0, 0), 0, 0]


def test_left_padding_tokenizer_puts_the_context_first(tokenizer):
    left = copy.deepcopy(tokenizer)
    left.padding_side = "left"
    features = qa.prepare_train_features(rows(answer("mike november")), left, MAX_SEQ_LENGTH, DOC_STRIDE)
    assert all(len(ids) == MAX_SEQ_LENGTH for ids in features["input_ids"])
    answered = [w for w, start in enumerate(features["start_positions"]) if features["input_ids"][w][start] != left.cls_token_id]
    assert answered == [1]
    start, end = features["start_positions"][1], features["end_positions"][1]
    assert left.decode(features["input_ids"][1][start : end + 1]) == "mike november"
    assert left.decode(features["input_ids"][1]).startswith("[CLS] hotel india")


def test_eval_windows_keep_ids_and_context_offsets_only(tokenizer):
    features = qa.prepare_eval_features(rows(answer("alpha"), ids=["x"]), tokenizer, MAX_SEQ_LENGTH, DOC_STRIDE)
    assert features["example_id"] == ["x", "x", "x"]
    assert "start_positions" not in features
    second = features["offset_mapping"][1]
    assert second[:FIRST_CONTEXT_POSITION] == [None] * FIRST_CONTEXT_POSITION and second[-1] is None
    start, end = second[position(1, 10)]
    assert CONTEXT[start:end] == "mike"
    assert [CONTEXT[s:e] for s, e in second[FIRST_CONTEXT_POSITION:-1]] == WORDS[6:16]


def test_question_longer_than_the_window_room_is_a_data_error(tokenizer):
    long_question = rows(answer("alpha"))
    long_question["question"] = ["which one of all of these words is it?"]  # 10 tokens: 3 context tokens left
    with pytest.raises(DataError, match="question 'q0' has 10 tokens.*doc_stride"):
        qa.prepare_train_features(long_question, tokenizer, MAX_SEQ_LENGTH, DOC_STRIDE)


def test_windows_run_as_a_batched_dataset_map(tokenizer):
    dataset = datasets.Dataset.from_dict(rows(answer("mike november"), NO_ANSWER))
    features = dataset.map(
        qa.prepare_eval_features,
        batched=True,
        remove_columns=dataset.column_names,
        fn_kwargs={"tokenizer": tokenizer, "max_seq_length": MAX_SEQ_LENGTH, "doc_stride": DOC_STRIDE},
    )
    assert features["example_id"] == ["q0"] * 3 + ["q1"] * 3
    assert features[0]["offset_mapping"][0] is None


# --- Checks -------------------------------------------------------------------------------------


def test_check_windows():
    qa.check_windows(384, 128, "recipe.yaml")
    for stride in (384, 500, 0):
        with pytest.raises(RecipeError, match=rf"^recipe.yaml: doc_stride \({stride}\) must be positive and smaller"):
            qa.check_windows(384, stride, "recipe.yaml")


def test_check_examples_accepts_good_rows():
    qa.check_examples(datasets.Dataset.from_dict(rows(answer("alpha"), answer("victor"))), "train.parquet")
    qa.check_examples(datasets.Dataset.from_dict(rows(answer("alpha"), NO_ANSWER)), "train.parquet", version_2=True)


def one_line_error(dataset, **kwargs) -> str:
    with pytest.raises(DataError) as error:
        qa.check_examples(dataset, "dev.parquet", **kwargs)
    message = str(error.value)
    assert "\n" not in message and message.startswith("dev.parquet: ")
    return message


def test_check_examples_names_missing_columns():
    data = rows(answer("alpha"))
    del data["answers"]
    assert "no column 'answers'" in one_line_error(datasets.Dataset.from_dict(data))


def test_check_examples_names_mismatching_answers():
    wrong = [{"text": ["alpha"], "answer_start": [3]}] * 5
    message = one_line_error(datasets.Dataset.from_dict(rows(answer("bravo"), *wrong)))
    assert "'q1', 'q2', 'q3' and 2 more" in message and "'q0'" not in message
    assert "not in its context" in message
    # Only the rows kept by a selection count; a contiguous selection is a slice of the table.
    dataset = datasets.Dataset.from_dict(rows(*wrong, answer("bravo"), answer("golf")))
    qa.check_examples(dataset.select(range(5, 7)), "dev.parquet")
    qa.check_examples(dataset.select([6, 5]), "dev.parquet")
    assert "'q4'" in one_line_error(dataset.select(range(4, 7)))


def test_check_examples_refuses_unanswerable_questions_in_v1_and_repeated_ids():
    dataset = datasets.Dataset.from_dict(rows(answer("alpha"), NO_ANSWER))
    assert "1 questions have no answer ('q1')" in one_line_error(dataset)
    assert "repeated" in one_line_error(datasets.Dataset.from_dict(rows(answer("alpha"), answer("alpha"), ids=["a", "a"])))
    uneven = {"text": ["alpha", "alpha"], "answer_start": [0]}
    assert "one answer_start per text" in one_line_error(datasets.Dataset.from_dict(rows(uneven)))


# --- Best span over windows ---------------------------------------------------------------------


def eval_features(tokenizer, data):
    return qa.prepare_eval_features(data, tokenizer, MAX_SEQ_LENGTH, DOC_STRIDE)


def flat_logits(features, width=MAX_SEQ_LENGTH):
    return np.zeros((len(features["example_id"]), width)), np.zeros((len(features["example_id"]), width))


def test_postprocess_finds_the_span_in_the_right_window(tokenizer):
    examples = rows(answer("alpha"), answer("alpha"), ids=["first", "second"])
    features = eval_features(tokenizer, examples)
    start, end = flat_logits(features)
    # Example "second" (windows 3-5): its answer peaks in its second window.
    start[4, position(1, 10)] = 5.0
    end[4, position(1, 11)] = 5.0
    # Question tokens score higher but are not context; a smaller peak elsewhere loses.
    start[4, 1] = end[4, 2] = 50.0
    start[5, position(2, 16)] = end[5, position(2, 17)] = 4.0
    # Example "first": its best pair is in the third window.
    start[2, position(2, 18)] = end[2, position(2, 19)] = 1.0
    predictions, null_differences = qa.postprocess(examples, features, start, end, version_2=False)
    assert predictions == {"first": "uniform victor", "second": "mike november"}
    assert null_differences == {}


def test_postprocess_respects_order_and_max_answer_length(tokenizer):
    features = eval_features(tokenizer, rows(answer("alpha")))
    start, end = flat_logits(features)
    start[0, position(0, 0)] = 10.0  # alpha
    end[0, position(0, 8)] = 10.0  # juliet: a 9-token span
    end[0, position(0, 2)] = 6.0  # charlie: 3 tokens
    start[0, position(0, 4)] = 1.0  # echo, after charlie: end before start
    end[0, position(0, 3)] = 9.0  # delta, before echo
    predictions, _ = qa.postprocess(rows(answer("alpha")), features, start, end, version_2=False, max_answer_length=9)
    assert predictions == {"q0": "alpha bravo charlie delta echo golf hotel india juliet"}
    predictions, _ = qa.postprocess(rows(answer("alpha")), features, start, end, version_2=False, max_answer_length=4)
    assert predictions == {"q0": "alpha bravo charlie delta"}
    # Padded logits (wider than the windows) change nothing.
    wide_start, wide_end = (np.pad(logits, ((0, 0), (0, 8)), constant_values=-100.0) for logits in (start, end))
    wide_start[0, -1] = wide_end[0, -1] = 99.0
    predictions, _ = qa.postprocess(rows(answer("alpha")), features, wide_start, wide_end, version_2=False, max_answer_length=4)
    assert predictions == {"q0": "alpha bravo charlie delta"}


def test_postprocess_null_score_difference(tokenizer):
    examples = rows(NO_ANSWER, answer("golf"), ids=["none", "golf"])
    features = eval_features(tokenizer, examples)
    start, end = flat_logits(features)
    # "none": CLS scores 3+3 in window 0, 2+1 in window 1 (the minimum, 3); best span 1+1.
    start[0:2, 0] = [3.0, 2.0]
    end[0:2, 0] = [3.0, 1.0]
    end[2, 0] = start[2, 0] = 4.0
    start[1, position(1, 7)] = end[1, position(1, 7)] = 1.0
    # "golf": span 4+4 beats every CLS score (at most 2).
    start[3:6, 0] = end[3:6, 0] = 1.0
    start[3, position(0, 5)] = end[3, position(0, 5)] = 4.0
    predictions, null_differences = qa.postprocess(examples, features, start, end, version_2=True)
    assert predictions == {"none": "india", "golf": "golf"}
    assert null_differences == pytest.approx({"none": 3.0 - 2.0, "golf": 2.0 - 8.0})
    metrics = qa.squad_metrics(predictions, {"none": [], "golf": ["golf"]}, null_scores=null_differences)
    assert metrics["exact_match"] == 1.0 and metrics["no_ans_exact_match"] == 1.0
    metrics = qa.squad_metrics(predictions, {"none": [], "golf": ["golf"]}, null_scores=null_differences, null_threshold=1.5)
    assert metrics["exact_match"] == 0.5 and metrics["no_ans_exact_match"] == 0.0


# --- Metrics ------------------------------------------------------------------------------------


def test_normalize_answer():
    assert qa.normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    assert qa.normalize_answer("An apple a day") == "apple day"
    assert qa.normalize_answer("theory of anthems") == "theory of anthems"
    assert qa.normalize_answer("a-the") == "athe"  # punctuation goes first, then the articles
    assert qa.normalize_answer(" the ") == ""


def test_exact_match_and_f1():
    assert qa.exact_match_score("the Denver Broncos.", "Denver broncos") == 1.0
    assert qa.exact_match_score("Broncos", "Denver Broncos") == 0.0
    # prediction [cat, sat], gold [cat, sat, on, mat]: precision 1, recall 1/2.
    assert qa.f1_score("the cat sat", "cat sat on a mat") == pytest.approx(2 / 3)
    # Repeated tokens count as often as both sides have them: [x, x, y] and [x, y, y] share 2.
    assert qa.f1_score("x x y", "x y y") == pytest.approx(2 / 3)
    assert qa.f1_score("dog", "cat") == 0.0
    assert qa.f1_score("", "") == 1.0 and qa.f1_score("", "cat") == 0.0 and qa.f1_score("the", "") == 1.0


def test_squad_v1_metrics_take_the_best_gold_answer():
    predictions = {"q1": "Denver Broncos", "q2": "the cat"}
    references = {"q1": ["Broncos", "Denver Broncos"], "q2": ["cat sat on mat", "a dog"]}
    metrics = qa.squad_metrics(predictions, references)
    # q1 exact; q2: [cat] against [cat, sat, on, mat] -> precision 1, recall 1/4, F1 0.4.
    assert metrics == pytest.approx({"exact_match": 0.5, "f1": 0.7, "score": 0.7})
    with pytest.raises(ValueError, match="no prediction for 1 of 3"):
        qa.squad_metrics(predictions, {**references, "q3": ["x"]})


V2_REFERENCES = {"a": ["Paris"], "b": [], "c": ["blue whale"], "d": []}
V2_PREDICTIONS = {"a": "Paris", "b": "London", "c": "whale", "d": "x"}
V2_NULL = {"a": -2.0, "b": 1.0, "c": -1.0, "d": -0.5}


def test_squad_v2_metrics_with_null_threshold():
    metrics = qa.squad_metrics(V2_PREDICTIONS, V2_REFERENCES, null_scores=V2_NULL)
    # Threshold 0: b (1.0 > 0) becomes '' (right); a, c, d answer: a right, c F1 2/3, d wrong.
    expected = {
        "exact_match": 2 / 4,
        "f1": (1 + 1 + 2 / 3) / 4,
        "has_ans_exact_match": 1 / 2,
        "has_ans_f1": (1 + 2 / 3) / 2,
        "no_ans_exact_match": 1 / 2,
        "no_ans_f1": 1 / 2,
        # From "no answer" everywhere (2 right), answering in order a (-2), c (-1), d, b:
        # exact match 3, 3, 2, 1 -> best 3/4 at -2; F1 3, 3 2/3, 2 2/3, 1 2/3 -> best 3 2/3 / 4 at -1.
        "best_exact_match": 3 / 4,
        "best_exact_match_threshold": -2.0,
        "best_f1": (3 + 2 / 3) / 4,
        "best_f1_threshold": -1.0,
    }
    expected["score"] = expected["f1"]
    assert metrics == pytest.approx(expected)
    # Threshold -1.5: only a answers; c loses its partial answer, d is now right.
    metrics = qa.squad_metrics(V2_PREDICTIONS, V2_REFERENCES, null_scores=V2_NULL, null_threshold=-1.5)
    assert (metrics["exact_match"], metrics["f1"], metrics["has_ans_f1"]) == pytest.approx((3 / 4, 3 / 4, 1 / 2))


def test_squad_v2_metrics_without_null_scores_and_groups():
    metrics = qa.squad_metrics(V2_PREDICTIONS, V2_REFERENCES)
    assert metrics["exact_match"] == 1 / 4 and metrics["no_ans_exact_match"] == 0.0
    assert "best_f1" not in metrics
    # The empty prediction is right exactly for the unanswerable; a gold that normalises to
    # nothing ("the") counts as no answer, as in the official script.
    metrics = qa.squad_metrics({"a": "", "b": "", "c": ""}, {"a": [], "b": ["the"], "c": ["cat"]})
    assert metrics["exact_match"] == pytest.approx(2 / 3) and metrics["no_ans_f1"] == 1.0 and metrics["has_ans_f1"] == 0.0
    only_answerable = qa.squad_metrics({"a": "Paris"}, {"a": ["Paris"]}, null_scores={"a": -1.0})
    assert "no_ans_f1" not in only_answerable and only_answerable["has_ans_f1"] == 1.0
    assert only_answerable["best_f1"] == 1.0 and only_answerable["best_f1_threshold"] == -1.0


# --- Real SQuAD rows ----------------------------------------------------------------------------


@pytest.mark.skipif(not (SHARED_SQUAD_DIR / "validation.parquet").exists(), reason="no shared SQuAD validation file")
def test_oracle_logits_on_real_squad_rows(tokenizer):
    """Logits peaked on the training positions of the first gold answer recover the answers."""
    validation = datasets.load_dataset("parquet", data_files={"validation": str(SHARED_SQUAD_DIR / "validation.parquet")})
    examples = validation["validation"].select(range(60))
    qa.check_examples(examples, "squad/validation.parquet")
    windows = {"tokenizer": tokenizer, "max_seq_length": 128, "doc_stride": 48}
    train = examples.map(qa.prepare_train_features, batched=True, remove_columns=examples.column_names, fn_kwargs=windows)
    features = examples.map(qa.prepare_eval_features, batched=True, remove_columns=examples.column_names, fn_kwargs=windows)
    assert len(features) == len(train) > len(examples)  # some contexts need several windows
    start, end = np.zeros((len(features), 128)), np.zeros((len(features), 128))
    rows_ = np.arange(len(features))
    start[rows_, train["start_positions"]] = end[rows_, train["end_positions"]] = 10.0
    predictions, _ = qa.postprocess(examples, features, start, end, version_2=False)
    references = {row["id"]: row["answers"]["text"] for row in examples}
    metrics = qa.squad_metrics(predictions, references)
    # The prediction is the first gold answer, or the whole tokens around one that starts or ends
    # inside a token (the "8" of "18").
    assert all(references[i][0] in predictions[i] for i in references)
    assert metrics["exact_match"] >= 0.9 and metrics["f1"] >= 0.9
