import pytest
import torch
from safetensors.torch import load_file

from eftnas_cli.data import get_task
from eftnas_cli.models import load_model
from eftnas_cli.recipe import load_recipe
from eftnas_cli.stages.importance import (
    IMPORTANCE_FILE,
    MovementScores,
    compute_importance,
    cubic_warmup,
    unit_projections,
)


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
    recipe = load_recipe(write_recipe(), ["importance.start_from=pretrained"])
    metrics = compute_importance(recipe)
    scores = load_file(str(recipe.run_dir / "importance" / IMPORTANCE_FILE))
    assert scores["heads"].shape == (2, 4) and scores["neurons"].shape == (2, 64)
    initial = torch.sigmoid(torch.tensor(3.0))
    # First-order signals differ per unit, so the scores spread out from their common start.
    assert scores["neurons"].std() > 1e-4 and not torch.allclose(scores["heads"], initial)
    assert (recipe.run_dir / "importance" / "heatmap.png").stat().st_size > 1000
    assert set(metrics["rank_correlation_with_weight_magnitude"]) == {"heads", "neurons"}
