"""The polish (export.finetune_epochs): KD fine-tuning that keeps whichever weights score best on
the search rows, the student's own included."""

import dataclasses

import datasets
import torch

from eftnas_cli.data import recipe_task_data
from eftnas_cli.models import load_model, load_tokenizer
from eftnas_cli.recipe import load_recipe
from eftnas_cli.tasks import model_outputs
from eftnas_cli.training import Polished, evaluate, polish, polish_selection_rows


def test_kept_epoch_is_the_best_and_ties_go_to_the_polish():
    assert Polished(None, 0.0, 10, 0.8, [0.7, 0.75]).kept_epoch == 0
    assert Polished(None, 0.0, 10, 0.8, [0.9, 0.85]).kept_epoch == 1
    assert Polished(None, 0.0, 10, 0.8, [0.7, 0.8]).kept_epoch == 2
    assert Polished(None, 0.0, 10, 0.8, [0.8, 0.8]).kept_epoch == 1
    # Scored on the rows that chose the student, its own weights do not compete.
    assert Polished(None, 0.0, 10, 0.8, [0.7, 0.75], start_competes=False).kept_epoch == 2


def test_the_polish_chooses_on_search_rows_the_search_did_not_read():
    search = datasets.Dataset.from_dict({"row": list(range(10))})
    rows, start_competes = polish_selection_rows(search, read=4, cap=3)
    assert rows["row"] == [4, 5, 6] and start_competes
    rows, start_competes = polish_selection_rows(search, read=4, cap=None)
    assert rows["row"] == list(range(4, 10)) and start_competes
    rows, start_competes = polish_selection_rows(search, read=10, cap=3)
    assert rows["row"] == list(range(10)) and not start_competes


def test_a_polish_that_lowers_the_score_hands_back_the_student_unchanged(write_recipe, tiny_model_dir):
    recipe = load_recipe(write_recipe())
    data = recipe_task_data(recipe, load_tokenizer(recipe.model.name))
    student = load_model(str(tiny_model_dir), data.spec).eval()
    rows = data.search

    def predictions() -> list[int]:
        logits, _ = model_outputs(student, rows, data.collator, ("logits",), 64, with_labels=False)
        return logits["logits"].argmax(-1).tolist()

    # Rows labelled with the student's own predictions: it scores 1.0 there, any change can only lower
    # it. The random head's bias moved to the median margin first, so that both classes occur.
    logits, _ = model_outputs(student, rows, data.collator, ("logits",), 64, with_labels=False)
    margins = torch.as_tensor(logits["logits"][:, 1] - logits["logits"][:, 0])
    with torch.no_grad():
        student.classifier.bias[1] -= margins.median()
    predicted = predictions()
    assert 0 < sum(predicted) < len(predicted), "both classes, so that a collapsed model scores below 1.0"
    rows = rows.remove_columns("labels").add_column("labels", predicted)
    before = {name: tensor.clone() for name, tensor in student.state_dict().items()}
    teacher = load_model(str(tiny_model_dir), data.spec)
    # A learning rate that wrecks the weights, and labels flipped for the KD's hard-label share.
    wrecking = load_recipe(write_recipe(), ["export.finetune_learning_rate=0.5", "supernet.distillation_weight=0.0",
                                            "export.finetune_epochs=2", "seed=0", "device=cpu"])
    train = data.train.map(lambda row: {"labels": 1 - row["labels"]})
    # The search read none of these rows: the student's own weights compete on all of them.
    polished = polish(student, teacher, dataclasses.replace(data, train=train, search_rows=rows), wrecking,
                      search_rows_read=0, description="polish")
    assert polished.rows == len(rows) and polished.start_competes and len(polished.epoch_scores) == 2
    assert polished.start_score == 1.0 and max(polished.epoch_scores) < 1.0 and polished.kept_epoch == 0
    assert all(torch.equal(before[name], tensor) for name, tensor in polished.model.state_dict().items())
    assert evaluate(polished.model, rows, data.collator, data.spec)["score"] == 1.0
