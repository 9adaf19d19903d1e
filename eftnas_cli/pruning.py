"""Subnets at a MACs budget chosen without a search: by one importance threshold over every head
and neuron (gen-space's generator, baselines a and b), by the same width in every layer (baseline c)
or by evenly spaced full layers (baseline d)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from eftnas_cli import elastic
from eftnas_cli.errors import UserError

BISECTION_STEPS = 60


def bisect(passes: Callable[[float], bool], low: float, high: float, steps: int = BISECTION_STEPS) -> float:
    """The point next to the boundary, on its passing side, of a predicate that is monotone on
    [low, high] and holds at exactly one of its ends."""
    low_passes = passes(low)
    for _ in range(steps):
        middle = (low + high) / 2
        if passes(middle) == low_passes:
            low = middle
        else:
            high = middle
    return low if low_passes else high


def _tie_broken(scores: torch.Tensor) -> np.ndarray:
    """Scores with ties split by position, so each threshold step keeps at most one more unit."""
    values = scores.double().numpy()
    return values - 1e-9 * np.arange(values.shape[-1]) / values.shape[-1]


class ThresholdPruner:
    """The subnet kept by an importance threshold, and its MACs.

    Importance is in [0, 1] (threshold 0 keeps every unit, 1 none); FFN widths are rounded to
    `neuron_multiple`; a sub-block kept below `discard_fraction` of its width is dropped to 0.
    """

    def __init__(self, config, heads: torch.Tensor, neurons: torch.Tensor, *, seq_len: int,
                 neuron_multiple: int = 1, discard_fraction: float = 0.0):
        self.config, self.seq_len = config, seq_len
        self.neuron_multiple, self.discard_fraction = neuron_multiple, discard_fraction
        self.dims = elastic.encoder_dims(config)
        expected = (self.dims.num_layers, self.dims.heads), (self.dims.num_layers, self.dims.neurons)
        if (tuple(heads.shape), tuple(neurons.shape)) != expected:
            raise UserError(f"importance scores of shape {tuple(heads.shape)}/{tuple(neurons.shape)} do not fit the model")
        self.heads, self.neurons = _tie_broken(heads), _tie_broken(neurons)

    def subnet(self, threshold: float) -> elastic.Subnet:
        layers = []
        multiple = self.neuron_multiple
        for head_scores, neuron_scores in zip(self.heads, self.neurons):
            heads = int((head_scores > threshold).sum())
            neurons = int((neuron_scores > threshold).sum())
            neurons = min(self.dims.neurons, multiple * round(neurons / multiple))
            if heads < self.discard_fraction * self.dims.heads:
                heads = 0
            if neurons < self.discard_fraction * self.dims.neurons:
                neurons = 0
            layers.append(elastic.LayerWidth(heads, neurons))
        return elastic.Subnet(tuple(layers))

    def macs(self, subnet: elastic.Subnet) -> int:
        return elastic.macs(self.config, subnet, seq_len=self.seq_len).encoder

    def fit(self, target: float) -> tuple[float, elastic.Subnet, int]:
        """(threshold, subnet, MACs) of the threshold whose kept units cost closest to `target`."""
        low, high = 0.0, 1.0
        best = (0.0, self.subnet(0.0))
        best_macs = self.macs(best[1])
        for _ in range(BISECTION_STEPS):
            middle = (low + high) / 2
            subnet = self.subnet(middle)
            cost = self.macs(subnet)
            if abs(cost - target) < abs(best_macs - target):
                best, best_macs = (middle, subnet), cost
            if cost > target:
                low = middle
            else:
                high = middle
        return best[0], best[1], best_macs

    def below(self, target: float, fitted: tuple[float, elastic.Subnet, int]) -> tuple[float, elastic.Subnet, int]:
        """(threshold, subnet, MACs) of the lowest threshold whose MACs do not exceed `target` (a
        ceiling), from `fitted`, `fit(target)`'s result, which may land just above it."""
        threshold, _, cost = fitted
        if cost <= target:
            return fitted
        threshold = bisect(lambda t: self.macs(self.subnet(t)) <= target, threshold, 1.0)
        subnet = self.subnet(threshold)
        return threshold, subnet, self.macs(subnet)

    def within(self, target: float) -> elastic.Subnet:
        """The subnet of the lowest threshold whose MACs do not exceed `target`."""
        return self.below(target, self.fit(target))[1]


def uniform_subnet(config, fits: Callable[[elastic.Subnet], bool]) -> elastic.Subnet:
    """The same fraction of heads and neurons in every layer, the largest whose subnet `fits`.

    Rounding keeps MACs non-decreasing in the fraction, so bisection finds the largest.
    """
    dims = elastic.encoder_dims(config)

    def at(fraction: float) -> elastic.Subnet:
        width = elastic.LayerWidth(round(fraction * dims.heads), round(fraction * dims.neurons))
        return elastic.Subnet((width,) * dims.num_layers)

    if fits(at(1.0)):
        return at(1.0)
    return at(bisect(lambda fraction: fits(at(fraction)), 0.0, 1.0))


def evenly_spaced_layers(num_layers: int, keep: int) -> list[int]:
    """`keep` of `num_layers` layers (0-based), each at the middle of its share of the depth,
    rounded down: 3 of 6 keeps 0, 2, 4 (DistilBERT's every other layer), 2 of 6 keeps 1, 4."""
    share = num_layers / keep
    return [math.floor((index + 0.5) * share - 0.5) for index in range(keep)]


def layer_drop_subnet(config, fits: Callable[[elastic.Subnet], bool]) -> tuple[elastic.Subnet, list[int]] | None:
    """The most evenly spaced full layers that fit; dropped layers keep 0 heads and 0 neurons,
    which the elastic core skips. None when not even one layer fits."""
    dims = elastic.encoder_dims(config)
    for keep in range(dims.num_layers, 0, -1):
        kept = evenly_spaced_layers(dims.num_layers, keep)
        full, dropped = elastic.LayerWidth(dims.heads, dims.neurons), elastic.LayerWidth(0, 0)
        subnet = elastic.Subnet(tuple(full if index in kept else dropped for index in range(dims.num_layers)))
        if fits(subnet):
            return subnet, kept
    return None
