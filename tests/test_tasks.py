"""The task registry: every task name validates in a recipe and fine-tunes and evaluates on tiny
synthetic data with the hub's columns; one full pipeline per task kind beyond classification
(test_end_to_end.py runs MRPC): STS-B (regression) and SQuAD (extractive QA), the QA export
checked against torch in ONNX Runtime and OpenVINO f32."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from eftnas_cli import elastic
from eftnas_cli.cli import app
from eftnas_cli.data import load_task_data
from eftnas_cli.deploy import onnx_outputs, openvino_outputs
from eftnas_cli.models import load_model, load_tokenizer
from eftnas_cli.recipe import load_recipe
from eftnas_cli.tasks import EXTRACTIVE_QA, REGRESSION, TASKS, get_task
from eftnas_cli.testing import QA_KEYWORD, export_beside_its_subnet, make_tiny_task_dir, random_features, write_tiny_recipe
from eftnas_cli.training import evaluate

# Short windows: the synthetic contexts of 40 words span several of them.
QA_CHANGES = {"task.max_seq_length": 24, "task.doc_stride": 8}


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def tiny_recipe(root, model_dir, task: str, changes: dict | None = None):
    data_dir = make_tiny_task_dir(root / "data", task, n_train=32, n_eval=16)
    qa = get_task(task).kind is EXTRACTIVE_QA
    return write_tiny_recipe(root / f"{task}.yaml", root / "runs", model_dir, data_dir,
                             {"task.name": task, "name": task, **(QA_CHANGES if qa else {}), **(changes or {})})


def test_the_table_covers_glue_and_squad():
    assert set(TASKS) == {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli", "squad", "squad_v2"}
    assert TASKS["stsb"].kind is REGRESSION and TASKS["squad"].kind is EXTRACTIVE_QA
    assert (TASKS["squad"].hub_id, TASKS["squad_v2"].hub_id) == ("rajpurkar/squad", "rajpurkar/squad_v2")
    assert TASKS["mnli"].eval_splits == ("validation_matched", "validation_mismatched")


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_task_validates_fine_tunes_and_evaluates(task, tmp_path, tiny_model_dir):
    recipe = tiny_recipe(tmp_path, tiny_model_dir, task, {"finetune.max_steps": 2, "finetune.epochs": 1})
    assert load_recipe(recipe).task.name == task
    invoke("finetune", recipe)
    metrics = json.loads((tmp_path / "runs" / task / "finetune" / "metrics.json").read_text())
    spec = get_task(task)
    assert list(metrics) == list(spec.eval_splits)  # MNLI: matched and mismatched
    for split_metrics in metrics.values():
        assert split_metrics["score"] == split_metrics[spec.main_metric]
        assert set(spec.reported_metrics) <= set(split_metrics)
    if spec.version_2:
        assert {"has_ans_f1", "no_ans_f1", "best_f1", "best_f1_threshold"} <= set(metrics["validation"])
    saved = load_model(str(tmp_path / "runs" / task / "finetune" / "model"))  # the kind comes back from the config
    head = "ForQuestionAnswering" if spec.kind is EXTRACTIVE_QA else "ForSequenceClassification"
    assert type(saved).__name__.endswith(head)


@pytest.mark.parametrize("task", ["mrpc", "squad"])
def test_model_outputs_come_back_in_the_rows_order(task, tiny_model_dir):
    """Batches are formed from rows of similar length; every output must still be its own row's."""
    import datasets

    from eftnas_cli.tasks import model_outputs

    spec = get_task(task)
    model = load_model(str(tiny_model_dir), spec).eval()
    lengths = [9, 3, 12, 5, 7, 3, 11]
    ids = [[2, *[7 + i + j for j in range(n - 2)], 3] for i, n in enumerate(lengths)]
    rows = datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * n for n in lengths],
                                       "token_type_ids": [[0] * n for n in lengths], "labels": list(range(len(ids)))})
    names = spec.kind.output_names
    with torch.no_grad():
        outputs, labels = model_outputs(model, rows, spec.kind.collator(load_tokenizer(str(tiny_model_dir))), names,
                                        batch_size=3, with_labels=True)
        alone = [model(input_ids=torch.tensor([row])) for row in ids]
    assert labels.tolist() == list(range(len(ids)))
    for name in names:
        for index, n in enumerate(lengths):
            expected = alone[index][name][0].numpy()
            got = outputs[name][index]
            if expected.ndim:  # per token: this row's tokens come first, padding after
                got = got[:n]
            np.testing.assert_allclose(got, expected, atol=1e-5)


def test_long_contexts_become_windows_that_cover_every_answer(tmp_path, tiny_model_dir):
    data_dir = make_tiny_task_dir(tmp_path, "squad", n_train=24, n_eval=24)
    data = load_task_data("squad", load_tokenizer(str(tiny_model_dir)), data_dir=data_dir, max_seq_length=24,
                          doc_stride=8)
    validation = data.main_eval
    assert len(validation.features) > len(validation)  # long contexts: several windows, never truncated
    assert max(len(ids) for ids in data.train["input_ids"]) <= 24
    # A training window holding the answer points at it; the other windows of its example at CLS (0).
    tokenizer = load_tokenizer(str(tiny_model_dir))
    starts, ends = data.train["start_positions"], data.train["end_positions"]
    assert 0 < sum(start > 0 for start in starts) < len(starts)
    for ids, start, end in zip(data.train["input_ids"], starts, ends):
        if start > 0:
            assert tokenizer.decode(ids[start: end + 1]).split()[0] == QA_KEYWORD
    # Selecting examples keeps all their windows.
    first = validation.select(range(3))
    assert len(first) == 3 and set(first.features["example_id"]) == set(validation.examples["id"][:3])
    assert len(first.features) == sum(i in set(first.examples["id"]) for i in validation.features["example_id"])
    # Batches padded to different lengths give the same answers as one batch.
    model = load_model(str(tiny_model_dir), data.spec)
    assert evaluate(model, validation, data.collator, data.spec, batch_size=3) == evaluate(
        model, validation, data.collator, data.spec, batch_size=64)


@pytest.fixture(scope="module")
def squad_run(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("squad")
    recipe = tiny_recipe(root, tiny_model_dir, "squad", {"export.latency_seq_len": 24})
    return recipe, root / "runs" / "squad", invoke("run", recipe).output


def test_squad_runs_through_every_stage(squad_run):
    _, run_dir, output = squad_run
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert list(manifest["stages"]) == ["finetune", "importance", "gen-space", "train-supernet", "search", "export"]
    assert manifest["stages"]["importance"]["metrics"]["method"] == "taylor"  # the QA loss's gradients
    pareto = json.loads((run_dir / "search" / "pareto.json").read_text())
    assert pareto["metric"] == "f1" and {"exact_match", "f1"} <= set(pareto["teacher"]["metrics"])
    summary = json.loads((run_dir / "export" / "summary.json").read_text())
    for model in (summary["teacher"], *summary["exports"].values()):
        assert 0 <= model["metrics"]["exact_match"] <= model["metrics"]["f1"] <= 1
    flat = " ".join(output.split())
    assert "EM" in flat and "F1" in flat and "budget-0.6" in flat


def test_squad_export_matches_torch_in_onnx_runtime_and_openvino(squad_run):
    _, run_dir, _ = squad_run
    folder, exported, supernet = export_beside_its_subnet(run_dir, "squad")
    features = random_features(exported.config.vocab_size, 3, 20, pad_row_1_from=14, second_segment_from=6)
    with torch.no_grad():
        expected = supernet(**features)
        got = exported(**features)
    arrays = {k: v.numpy() for k, v in features.items()}
    onnx = onnx_outputs(folder / "model.onnx", arrays)
    openvino = openvino_outputs(folder / "openvino" / "model.xml", arrays, precision="f32")
    for name in ("start_logits", "end_logits"):
        np.testing.assert_allclose(got[name].numpy(), expected[name].numpy(), atol=1e-5)
        np.testing.assert_allclose(onnx[name], expected[name].numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(openvino[name], expected[name].numpy(), atol=1e-4, rtol=0)
    assert (folder / "openvino" / "model_int8.xml").is_file()


def test_profile_counts_the_span_head_of_a_qa_export(squad_run):
    _, run_dir, _ = squad_run
    folder = run_dir / "export" / "budget-0.6"
    config = load_model(str(folder)).config
    macs = elastic.macs(config, elastic.Subnet.from_dict(config.eftnas_subnet), seq_len=24, head="question-answering")
    assert (macs.pooler, macs.classifier) == (0, 24 * config.hidden_size * 2)
    output = " ".join(invoke("profile", folder, "--seq-len", "24").output.split())
    assert f"question-answering head: {macs.classifier:,} MACs" in output


def test_stsb_runs_through_every_stage(tmp_path, tiny_model_dir):
    recipe = tiny_recipe(tmp_path, tiny_model_dir, "stsb", {"export.openvino": False})
    invoke("run", recipe)
    summary = json.loads((tmp_path / "runs" / "stsb" / "export" / "summary.json").read_text())
    export = summary["exports"]["budget-0.6"]
    assert {"pearson", "spearmanr"} <= set(export["metrics"]) and export["metrics"]["score"] == export["metrics"]["pearson"]
    config = load_model(str(tmp_path / "runs" / "stsb" / "export" / "budget-0.6")).config
    assert config.num_labels == 1 and config.problem_type == "regression"
