import numpy as np
import pytest
import torch
from transformers import BertConfig

from eftnas_cli import elastic
from eftnas_cli.elastic import SearchSpace
from eftnas_cli.errors import UserError
from eftnas_cli.recipe import SpaceSection
from eftnas_cli.stages.gen_space import build_space, space_pruner

# MiniLM-L6's shape: fine-grained enough that every target is reachable.
CONFIG = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)


def scores(seed=0):
    generator = torch.Generator().manual_seed(seed)
    # Later layers matter less, as movement pruning usually finds.
    decay = torch.linspace(1.0, 0.4, 6)[:, None]
    return (torch.rand(6, 12, generator=generator) * decay, torch.rand(6, 1536, generator=generator) * decay)


def test_every_target_is_hit_within_tolerance_from_below():
    heads, neurons = scores()
    section = SpaceSection(num_targets=5, cmin=0.3, tolerance=0.02)
    space = build_space(CONFIG, heads, neurons, section)
    full = elastic.macs(CONFIG).encoder
    assert space.full_macs == full
    targets = [t["target_macs"] for t in space.targets]
    np.testing.assert_allclose(sorted(targets), np.linspace(0.3 * full, full, 5), atol=1)
    for target in space.targets:
        # A ceiling: a search budget equal to a target (cmin, say) has that target's subnet.
        assert (1 - 0.02) * target["target_macs"] <= target["macs"] <= target["target_macs"]
        assert target["macs"] == elastic.macs(CONFIG, elastic.Subnet.from_dict(target["subnet"])).encoder


def test_choices_merge_the_targets_and_bound_the_space():
    heads, neurons = scores()
    space = build_space(CONFIG, heads, neurons, SpaceSection(num_targets=4, cmin=0.4))
    for index, choice in enumerate(space.choices):
        widths = {(t["subnet"]["layers"][index]["heads"], t["subnet"]["layers"][index]["neurons"]) for t in space.targets}
        assert set(choice["heads"]) == {h for h, _ in widths}
        assert set(choice["neurons"]) == {n for _, n in widths}
        assert choice["heads"] == sorted(choice["heads"], reverse=True)
    assert space.largest() == elastic.full_subnet(CONFIG)
    assert space.min_macs == elastic.macs(CONFIG, space.smallest()).encoder < space.full_macs
    sampled = space.sample(np.random.default_rng(0))
    for layer, choice in zip(sampled.layers, space.choices):
        assert layer.heads in choice["heads"] and layer.neurons in choice["neurons"]


def test_space_round_trips_through_json(tmp_path):
    import json

    heads, neurons = scores()
    space = build_space(CONFIG, heads, neurons, SpaceSection(num_targets=3))
    path = tmp_path / "space.json"
    path.write_text(json.dumps(space.to_dict()))
    assert SearchSpace.load(path) == space


def test_units_below_the_discard_fraction_skip_the_sub_block():
    heads, neurons = scores()
    neurons[5] = 0.0  # the last layer's FFN is never important
    neurons[5, :10] = 0.99  # ... but for 10 neurons, under 2% of 1536
    pruner = space_pruner(CONFIG, heads, neurons, SpaceSection(discard_fraction=0.02))
    assert pruner.subnet(0.5).layers[5].neurons == 0


def test_neuron_multiple_rounds_widths():
    heads, neurons = scores()
    pruner = space_pruner(CONFIG, heads, neurons, SpaceSection(neuron_multiple=64))
    assert all(layer.neurons % 64 == 0 for layer in pruner.subnet(0.3).layers)


def test_cmin_not_below_cmax_is_an_error():
    heads, neurons = scores()
    with pytest.raises(UserError, match="cmin"):
        build_space(CONFIG, heads, neurons, SpaceSection(cmin=1.2, cmax=0.5))  # 1.2 GMACs vs half of 1.43 GMACs
    with pytest.raises(UserError, match="cmax"):
        build_space(CONFIG, heads, neurons, SpaceSection(cmax=2.0))


def test_unreachable_target_is_an_error():
    # Two layers, one head each: MACs move in big steps no threshold can split.
    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=1, intermediate_size=2)
    with pytest.raises(UserError, match="no importance threshold reaches"):
        build_space(config, torch.rand(2, 1), torch.rand(2, 2), SpaceSection(num_targets=3, cmin=0.3, tolerance=0.01))


def test_scores_of_the_wrong_shape_are_an_error():
    with pytest.raises(UserError, match="do not fit the model"):
        space_pruner(CONFIG, torch.rand(6, 8), torch.rand(6, 1536), SpaceSection())


def test_spread_samples_cover_the_low_end_of_the_space():
    heads, neurons = scores()
    space = build_space(CONFIG, heads, neurons, SpaceSection(num_targets=5, cmin=0.25))
    ladder = sorted({space.min_macs, *(t["macs"] for t in space.targets), space.full_macs})
    generator = np.random.default_rng(0)

    def fractions(sample) -> np.ndarray:
        return np.array([elastic.macs(CONFIG, sample(generator)).encoder for _ in range(400)]) / space.full_macs

    spread, uniform = fractions(space.sample_spread), fractions(space.sample)
    # The ladder's lowest rung (cmin to the next target) holds its share of the MACs range.
    lowest = (ladder[1] - ladder[0]) / (ladder[-1] - ladder[0])
    low_end = ladder[1] / space.full_macs
    assert np.mean(spread <= low_end) > 0.6 * lowest > np.mean(uniform <= low_end)
    assert spread.min() >= space.min_macs / space.full_macs
    sampled = space.sample_spread(generator)
    for layer, choice in zip(sampled.layers, space.choices):
        assert layer.heads in choice["heads"] and layer.neurons in choice["neurons"]


def test_neighbours_move_one_width_one_choice():
    space = SearchSpace([{"heads": [4, 2], "neurons": [8, 4, 2]}, {"heads": [4], "neurons": [8, 2]}],
                        full_macs=100, min_macs=10, seq_len=8, targets=[])
    middle = elastic.Subnet((elastic.LayerWidth(4, 4), elastic.LayerWidth(4, 8)))
    assert set(space.neighbours(middle)) == {
        elastic.Subnet((elastic.LayerWidth(2, 4), elastic.LayerWidth(4, 8))),
        elastic.Subnet((elastic.LayerWidth(4, 8), elastic.LayerWidth(4, 8))),
        elastic.Subnet((elastic.LayerWidth(4, 2), elastic.LayerWidth(4, 8))),
        elastic.Subnet((elastic.LayerWidth(4, 4), elastic.LayerWidth(4, 2))),
    }
