import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import TrainerCallback

from eftnas_cli import elastic
from eftnas_cli.artifacts import IMPORTANCE_FILE
from eftnas_cli.data import load_task_data
from eftnas_cli.errors import RecipeError, UpstreamError
from eftnas_cli.models import load_model, load_tokenizer
from eftnas_cli.ranking import (
    MovementScores,
    RankingRun,
    UnitRanking,
    cost_weighted_percentiles,
    cubic_warmup,
    movement_trainer,
    taylor_importance,
    unit_macs,
    unit_projections,
)
from eftnas_cli.recipe import ImportanceSection, load_recipe
from eftnas_cli.stages.finetune import finetune
from eftnas_cli.stages.importance import compute_importance
from eftnas_cli.tasks import get_task


def test_cubic_warmup_shape():
    assert cubic_warmup(0.5, 1, 3) == 0.0
    assert cubic_warmup(3.5, 1, 3) == 1.0
    middle = cubic_warmup(2, 1, 3)
    assert middle == pytest.approx(1 - 0.5**3)
    assert cubic_warmup(1.5, 1, 3) < middle < cubic_warmup(2.5, 1, 3)


def test_masks_zero_exactly_the_units_below_the_threshold(tiny_model_dir):
    model = load_model(str(tiny_model_dir), get_task("mrpc")).eval()
    inputs = {"input_ids": torch.randint(5, 30, (2, 7))}
    scores = MovementScores(model, init_score=3.0)
    with torch.no_grad():
        scores.heads[0, 1] = -5.0  # sigmoid ≈ 0.007: masked at threshold 0.5
        scores.neurons[1, :10] = -5.0
        scores.threshold = 0.5
        masked = model(**inputs).logits
        scores.remove()
        attention_out, _ = unit_projections(model)[0]
        head_dim = attention_out.in_features // 4
        attention_out.weight[:, head_dim : 2 * head_dim] = 0
        unit_projections(model)[1][1].weight[:, :10] = 0
        expected = model(**inputs).logits
    torch.testing.assert_close(masked, expected)


def test_scores_learn_from_training_and_round_trip(write_recipe):
    recipe = load_recipe(write_recipe(), ["importance.method=movement", "importance.start_from=pretrained"])
    metrics = compute_importance(recipe)
    scores = load_file(str(recipe.run_dir / "importance" / IMPORTANCE_FILE))
    assert scores["heads"].shape == (2, 4) and scores["neurons"].shape == (2, 64)
    initial = torch.sigmoid(torch.tensor(3.0))
    # First-order signals differ per unit, so the scores spread out from their common start.
    assert scores["neurons"].std() > 1e-4 and not torch.allclose(scores["heads"], initial)
    assert (recipe.run_dir / "importance" / "heatmap.png").stat().st_size > 1000
    assert set(metrics["rank_correlation_with_weight_magnitude"]) == {"heads", "neurons"}


# ---- movement ------------------------------------------------------------------------------------
def _tiny_data(tiny_model_dir, tiny_glue_dir, rows: int):
    return load_task_data("mrpc", load_tokenizer(str(tiny_model_dir)), data_dir=tiny_glue_dir, max_seq_length=32,
                          max_train_samples=rows)


class _RecordScoreGradients(TrainerCallback):
    """The score gradients the optimizer is about to apply, one per step."""

    def __init__(self, scores: MovementScores):
        self.scores, self.steps = scores, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.steps.append((self.scores.heads.grad.clone(), self.scores.neurons.grad.clone()))


def test_score_gradients_do_not_accumulate_across_steps(tiny_model_dir, tiny_glue_dir, tmp_path):
    data = _tiny_data(tiny_model_dir, tiny_glue_dir, rows=16)
    model = load_model(str(tiny_model_dir), data.spec)
    for module in model.modules():  # both steps see the same function ...
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    # ... and the same batch (all 16 rows); learning rates too small to move anything, and no L1 or
    # threshold yet (warm-up starts after the run): each step's gradient is the same.
    section = ImportanceSection(method="movement", batch_size=16, max_steps=2, epochs=2, warmup=0.0,
                                learning_rate=1e-12, score_learning_rate=1e-12, warmup_start_epoch=2,
                                warmup_end_epoch=2, stop_at_warmup_end=False)
    scores = MovementScores(model, section.init_score)
    recorder = _RecordScoreGradients(scores)
    movement_trainer(model, scores, data, section, RankingRun(0, "cpu", tmp_path), [recorder]).train()
    (first_heads, first_neurons), (second_heads, second_neurons) = recorder.steps
    assert first_heads.abs().sum() > 0 and first_neurons.abs().sum() > 0
    # Accumulated gradients would be the running sum: twice the first step's.
    torch.testing.assert_close(second_heads, first_heads, rtol=1e-3, atol=1e-9)
    torch.testing.assert_close(second_neurons, first_neurons, rtol=1e-3, atol=1e-9)


def test_l1_pull_on_a_unit_is_proportional_to_its_macs(tiny_model_dir):
    model = load_model(str(tiny_model_dir), get_task("mrpc"))
    scores = MovementScores(model, init_score=0.0, seq_len=16)
    head_pull, neuron_pull = torch.autograd.grad(scores.l1(), [scores.heads, scores.neurons])
    head_macs, neuron_macs = unit_macs(model.config, 16)
    assert head_pull[0, 0] / neuron_pull[0, 0] == pytest.approx(head_macs / neuron_macs)
    # The L1 term is the soft share of the encoder's MACs kept: sigmoid(0) = 0.5 of it.
    assert scores.l1().item() == pytest.approx(0.5)
    assert head_macs * 4 * 2 + neuron_macs * 64 * 2 == elastic.macs(model.config, seq_len=16).encoder


def test_movement_masks_units_once_the_threshold_is_reached(write_recipe):
    # A strong pull and fast scores: the cubic warm-up reaches the final threshold mid-run, and
    # training stops there (NNCF), with the masked units' share reported.
    recipe = load_recipe(write_recipe(), ["importance.method=movement", "importance.regularization=50",
                                          "importance.score_learning_rate=0.2", "importance.final_threshold=0.5",
                                          "importance.warmup_start_epoch=0.2", "importance.warmup_end_epoch=1.5"])
    metrics = compute_importance(recipe)
    scores = load_file(str(recipe.run_dir / "importance" / IMPORTANCE_FILE))
    masked = metrics["masked_at_final_threshold"]
    final = recipe.importance.final_threshold
    assert masked["heads_per_layer"] == (scores["heads"] <= final).sum(dim=1).tolist()
    assert masked["neurons_per_layer"] == (scores["neurons"] <= final).sum(dim=1).tolist()
    assert sum(masked["heads_per_layer"]) + sum(masked["neurons_per_layer"]) > 0 and masked["macs_fraction"] > 0.05
    assert 0 <= metrics["masked_model_eval"]["score"] <= 1
    manifest = json.loads((recipe.run_dir / "manifest.json").read_text())
    assert manifest["stages"]["importance"]["metrics"]["method"] == "movement"


# ---- taylor --------------------------------------------------------------------------------------
def test_taylor_scores_are_cost_weighted_percentiles_and_deterministic(tiny_model_dir, tiny_glue_dir, tmp_path):
    data = _tiny_data(tiny_model_dir, tiny_glue_dir, rows=48)
    section = ImportanceSection(method="taylor", taylor_rows=40, batch_size=16, seq_len=16)
    run = RankingRun(0, "cpu", tmp_path)

    def rank() -> UnitRanking:
        torch.manual_seed(0)  # the tiny encoder's classifier head is random: the same one both times
        return taylor_importance(load_model(str(tiny_model_dir), data.spec), data, section, run)

    first, second = rank(), rank()
    assert first.heads.shape == (2, 4) and first.neurons.shape == (2, 64)
    assert first.heads.dtype == torch.float32
    both = torch.cat([first.heads.flatten(), first.neurons.flatten()])
    assert both.min() > 0 and both.max() == pytest.approx(1.0) and len(both.unique()) == len(both)
    torch.testing.assert_close(first.heads, second.heads, rtol=0, atol=0)
    torch.testing.assert_close(first.neurons, second.neurons, rtol=0, atol=0)
    assert first.summary["rows"] == 40


def test_cost_weighted_percentiles_rank_per_mac_and_track_the_macs_dropped():
    # Two heads (10 MACs each) and four neurons (1 MAC each), 24 MACs in all.
    heads, neurons = cost_weighted_percentiles(torch.tensor([[5.0, 30.0]]), torch.tensor([[1.0, 0.2, 4.0, 0.1]]), 10, 1)
    # Per MAC: neurons 0.1, 0.2 < head 0.5 < neuron 1 < head 3 < neuron 4.
    assert neurons[0, 3] == pytest.approx(1 / 24) and neurons[0, 1] == pytest.approx(2 / 24)
    assert heads[0, 0] == pytest.approx(12 / 24) and neurons[0, 0] == pytest.approx(13 / 24)
    assert heads[0, 1] == pytest.approx(23 / 24) and neurons[0, 2] == pytest.approx(1.0)


def test_taylor_stage_ranks_the_teacher_end_to_end(write_recipe):
    recipe = load_recipe(write_recipe(), ["importance.method=taylor", "importance.taylor_rows=32"])
    with pytest.raises(UpstreamError, match="run `eftnas finetune` first"):
        compute_importance(recipe)
    finetune(recipe)
    metrics = compute_importance(recipe)
    scores = load_file(str(recipe.run_dir / "importance" / IMPORTANCE_FILE))
    assert scores["heads"].shape == (2, 4) and scores["neurons"].shape == (2, 64)
    assert ((scores["heads"] > 0) & (scores["heads"] <= 1)).all() and ((scores["neurons"] > 0) & (scores["neurons"] <= 1)).all()
    assert metrics["method"] == "taylor" and metrics["rows"] == 32
    manifest = json.loads((recipe.run_dir / "manifest.json").read_text())
    assert any(name.endswith("finetune/model/model.safetensors") for name in manifest["stages"]["importance"]["inputs"])


@pytest.mark.parametrize(("overrides", "message"), [
    (["importance.method=taylor", "importance.start_from=pretrained"], "taylor ranks the fine-tuned teacher"),
    (["importance.method=movement", "importance.epochs=2", "importance.warmup_end_epoch=3"], "never reach final_threshold"),
])
def test_importance_recipe_mistakes_are_one_line(write_recipe, overrides, message):
    with pytest.raises(RecipeError, match=message) as error:
        load_recipe(write_recipe(), overrides)
    assert "\n" not in str(error.value)
