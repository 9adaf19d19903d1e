"""Subnets at a budget without search: bisection, importance threshold, uniform width, layer drop."""

import torch
from transformers import BertConfig

from eftnas_cli import elastic
from eftnas_cli.pruning import ThresholdPruner, bisect, evenly_spaced_layers, layer_drop_subnet, uniform_subnet

CONFIG = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)


def test_bisect_finds_the_boundary_on_the_passing_side():
    assert abs(bisect(lambda x: x <= 0.3, 0.0, 1.0) - 0.3) < 1e-9
    assert bisect(lambda x: x <= 0.3, 0.0, 1.0) <= 0.3
    assert bisect(lambda x: x >= 0.7, 0.0, 1.0) >= 0.7


def test_threshold_pruner_within_never_exceeds_the_budget():
    torch.manual_seed(0)
    pruner = ThresholdPruner(CONFIG, torch.rand(6, 12), torch.rand(6, 1536), seq_len=128, neuron_multiple=64)
    full = pruner.macs(elastic.full_subnet(CONFIG))
    for fraction in (0.9, 0.5, 0.33, 0.1):
        subnet = pruner.within(fraction * full)
        assert pruner.macs(subnet) <= fraction * full
        assert pruner.macs(subnet) > 0.9 * fraction * full  # and not far below it


def test_uniform_subnet_is_the_largest_that_fits():
    full = elastic.macs(CONFIG).encoder

    def fits(subnet):
        return elastic.macs(CONFIG, subnet).encoder <= 0.5 * full

    subnet = uniform_subnet(CONFIG, fits)
    assert len({layer for layer in subnet.layers}) == 1 and fits(subnet)
    wider = elastic.LayerWidth(subnet.layers[0].heads + 1, subnet.layers[0].neurons + 16)
    assert not fits(elastic.Subnet((wider,) * 6))


def test_layer_drop_keeps_evenly_spaced_layers():
    # DistilBERT-style: every other layer of 6 (1-based 1, 3, 5), and 2 of 6 (1-based 2, 5)
    assert evenly_spaced_layers(6, 3) == [0, 2, 4]
    assert evenly_spaced_layers(6, 2) == [1, 4]
    assert evenly_spaced_layers(6, 6) == list(range(6))
    assert evenly_spaced_layers(12, 6) == [0, 2, 4, 6, 8, 10]
    subnet, kept = layer_drop_subnet(CONFIG, lambda s: elastic.macs(CONFIG, s).encoder <= 0.5 * elastic.macs(CONFIG).encoder)
    assert kept == [0, 2, 4] and [layer.heads for layer in subnet.layers] == [12, 0, 12, 0, 12, 0]
