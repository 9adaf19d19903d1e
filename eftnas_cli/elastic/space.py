"""The search space: per-layer width choices of a super-network, and the names a search gives them."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .subnet import LayerWidth, Subnet

UNITS = ("heads", "neurons")


@dataclass(frozen=True)
class SearchSpace:
    """Per-layer width choices (descending) plus what generated them.

    `targets` are gen-space's MACs targets, each with the boundary subnet its threshold kept;
    MACs figures are per sequence of `seq_len` tokens.
    """

    choices: list[dict[str, list[int]]]
    full_macs: int
    min_macs: int
    seq_len: int
    targets: list[dict]

    @property
    def num_layers(self) -> int:
        return len(self.choices)

    def largest(self) -> Subnet:
        return self._pick(lambda values: values[0])

    def smallest(self) -> Subnet:
        return self._pick(lambda values: values[-1])

    def sample(self, generator: np.random.Generator) -> Subnet:
        """Each layer's widths drawn uniformly among its choices."""
        return self._pick(lambda values: values[generator.integers(len(values))])

    def sample_spread(self, generator: np.random.Generator) -> Subnet:
        """A random subnet spread over the space's MACs range: two neighbours on the ladder of
        gen-space targets (from the smallest subnet to the largest) drawn with probability
        proportional to the MACs between them, then each layer's widths drawn among its choices
        between the two neighbours'. `sample`'s per-layer draws pile up near the middle of the
        range (on MRPC's space 0.8% of them fell below 40% of the MACs, none below 30%), so
        subnets near a space's smallest budgets were hardly ever trained or searched."""
        ladder = sorted({macs: subnet for macs, subnet in
                         [(self.min_macs, self.smallest()), *self.target_subnets(), (self.full_macs, self.largest())]}.items())
        gaps = np.diff([macs for macs, _ in ladder]).astype(float)
        if len(ladder) < 2 or gaps.sum() <= 0:
            return self.sample(generator)
        lower = int(generator.choice(len(gaps), p=gaps / gaps.sum()))
        low, high = ladder[lower][1], ladder[lower + 1][1]

        def between(choices: list[int], a: int, b: int) -> int:
            values = [value for value in choices if min(a, b) <= value <= max(a, b)]
            return int(values[generator.integers(len(values))])

        return Subnet(tuple(LayerWidth(between(c["heads"], small.heads, large.heads),
                                       between(c["neurons"], small.neurons, large.neurons))
                            for c, small, large in zip(self.choices, low.layers, high.layers)))

    def neighbours(self, subnet: Subnet) -> list[Subnet]:
        """The subnets one choice away from `subnet` in one layer's heads or neurons."""
        found = []
        for index, (choice, width) in enumerate(zip(self.choices, subnet.layers)):
            for unit in UNITS:
                values = choice[unit]
                at = values.index(getattr(width, unit))
                for step in (-1, 1):
                    if 0 <= at + step < len(values):
                        layers = list(subnet.layers)
                        layers[index] = dataclasses.replace(width, **{unit: values[at + step]})
                        found.append(Subnet(tuple(layers)))
        return found

    def _pick(self, choose) -> Subnet:
        return Subnet(tuple(LayerWidth(int(choose(c["heads"])), int(choose(c["neurons"]))) for c in self.choices))

    def size(self) -> int:
        """How many distinct subnets the space holds."""
        return int(np.prod([len(c["heads"]) * len(c["neurons"]) for c in self.choices], dtype=object))

    def target_subnets(self) -> list[tuple[int, Subnet]]:
        """(MACs, subnet) of every gen-space target, largest first."""
        return [(t["macs"], Subnet.from_dict(t["subnet"])) for t in self.targets]

    # ---- the names a search gives the widths (Optuna parameters) --------------------------------
    @staticmethod
    def param_name(layer: int, unit: str) -> str:
        return f"layer{layer}.{unit}"

    def param_choices(self) -> list[tuple[str, list[int]]]:
        """(parameter name, choices) for every elastic width: what a search trial suggests."""
        return [(self.param_name(index, unit), choice[unit]) for index, choice in enumerate(self.choices) for unit in UNITS]

    def subnet_from_params(self, params: dict) -> Subnet:
        return Subnet(tuple(
            LayerWidth(int(params[self.param_name(i, "heads")]), int(params[self.param_name(i, "neurons")]))
            for i in range(self.num_layers)
        ))

    def params_of(self, subnet: Subnet) -> dict[str, int]:
        return {self.param_name(i, unit): getattr(width, unit) for i, width in enumerate(subnet.layers) for unit in UNITS}

    # ---- file ------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "seq_len": self.seq_len,
            "full_macs": self.full_macs,
            "min_macs": self.min_macs,
            "choices": self.choices,
            "targets": self.targets,
        }

    @classmethod
    def load(cls, path: str | Path) -> SearchSpace:
        data = json.loads(Path(path).read_text())
        return cls(data["choices"], data["full_macs"], data["min_macs"], data["seq_len"], data["targets"])
