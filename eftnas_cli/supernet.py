"""The trained super-network as one object: the reordered elastic model plus its search space.

The shape of NNCF BootstrapNAS's `TrainedSuperNet`: `train-supernet` builds one from importance
and a space, `search`, `export` and the benchmarks load the trained one from a run directory, and
all of them activate, cost, evaluate and extract subnets through it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from eftnas_cli import artifacts, elastic
from eftnas_cli.data import TaskData
from eftnas_cli.models import load_model
from eftnas_cli.rundir import RunDir
from eftnas_cli.tasks import Task
from eftnas_cli.training import evaluate


class Supernet:
    """An elastic, importance-reordered model and the space its subnets come from."""

    def __init__(self, model: nn.Module, space: elastic.SearchSpace):
        self.model = elastic.make_elastic(model)
        self.space = space
        elastic.validate_subnet(model.config, space.largest())

    @classmethod
    def build(cls, source: str, spec: Task, importance: artifacts.UnitImportance,
              space: elastic.SearchSpace) -> Supernet:
        """A super-network to train: `source`'s weights reordered so the most important heads and
        neurons come first, which makes every subnet of the space a leading slice."""
        model = load_model(source, spec)
        elastic.reorder(model, list(importance.heads), list(importance.neurons))
        return cls(model, space)

    @classmethod
    def load(cls, run: RunDir, spec: Task, *, by: str) -> Supernet:
        """The trained super-network of a run (its weights are saved already reordered)."""
        return cls(load_model(str(artifacts.supernet_folder(run, by=by)), spec), artifacts.load_space(run, by=by))

    @staticmethod
    def input_files(run: RunDir, *, by: str) -> list[Path]:
        """The files a stage reading the super-network records as its inputs."""
        return [*artifacts.model_files(artifacts.supernet_folder(run, by=by)), artifacts.supernet_space_file(run, by=by)]

    # ---- subnets ---------------------------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    def largest(self) -> elastic.Subnet:
        return self.space.largest()

    def smallest(self) -> elastic.Subnet:
        return self.space.smallest()

    def sample(self, generator: np.random.Generator) -> elastic.Subnet:
        return self.space.sample(generator)

    def sample_spread(self, generator: np.random.Generator) -> elastic.Subnet:
        return self.space.sample_spread(generator)

    def spread_within(self, generator: np.random.Generator, low_macs: float, high_macs: float, count: int,
                      draws: int, kept: Sequence[elastic.Subnet] = ()) -> list[elastic.Subnet]:
        """`kept`, then distinct `sample_spread` subnets with MACs in (`low_macs`, `high_macs`] until
        `count` in all or `draws` draws are spent (a narrow band of a space may hold fewer)."""
        subnets = list(kept)
        for _ in range(draws):
            if len(subnets) >= count:
                break
            subnet = self.sample_spread(generator)
            if low_macs < self.macs(subnet) <= high_macs and subnet not in subnets:
                subnets.append(subnet)
        return subnets

    def activate(self, subnet: elastic.Subnet) -> None:
        elastic.activate(self.model, subnet)

    @property
    def full_macs(self) -> int:
        return self.macs(None)

    def macs(self, subnet: elastic.Subnet | None) -> int:
        """Encoder MACs per sequence at the space's sequence length (None: the full model)."""
        return elastic.macs(self.config, subnet, self.space.seq_len).encoder

    def params(self, subnet: elastic.Subnet | None) -> int:
        return elastic.count_params(self.config, subnet).encoder

    def to(self, device: torch.device | str) -> Supernet:
        self.model.to(device)
        return self

    def evaluate(self, subnet: elastic.Subnet, rows, data: TaskData, batch_size: int = 64) -> dict[str, float]:
        """Task metrics of `subnet` on `rows`; the largest subnet is active again afterwards."""
        self.activate(subnet)
        try:
            return evaluate(self.model, rows, data.collator, data.spec, batch_size)
        finally:
            self.activate(self.largest())

    def extract(self, subnet: elastic.Subnet) -> nn.Module:
        """A standalone dense model with `subnet`'s smaller layers (the super-network is untouched)."""
        elastic.validate_subnet(self.config, subnet)
        return elastic.extract(self.model, subnet)
