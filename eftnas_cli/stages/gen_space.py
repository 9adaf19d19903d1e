"""Stage `gen-space`: the search space, generated from importance (EFTNAS's generator).

For N MACs targets evenly spaced between cmin and cmax, bisect one importance threshold until the
units above it (heads and neurons, all layers at once) cost the target's MACs. Each layer's widths
at all targets, merged, are its elastic choices; a sub-block kept below `discard_fraction` of its
width is dropped to 0 (a layer with neither heads nor neurons is skipped: elastic depth).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from eftnas_cli import elastic
from eftnas_cli.errors import UserError
from eftnas_cli.models import resolve_model
from eftnas_cli.plots import space_heatmap
from eftnas_cli.recipe import Recipe, SpaceSection
from eftnas_cli.rundir import RunDir, write_json
from eftnas_cli.stages.importance import IMPORTANCE_FILE
from eftnas_cli.ui import console

SPACE_FILE = "search_space.json"
BISECTION_STEPS = 60


@dataclass(frozen=True)
class SearchSpace:
    """Per-layer width choices (descending) plus what generated them."""

    choices: list[dict[str, list[int]]]
    full_macs: int
    min_macs: int
    seq_len: int
    targets: list[dict]

    def largest(self) -> elastic.Subnet:
        return self._pick(lambda values: values[0])

    def smallest(self) -> elastic.Subnet:
        return self._pick(lambda values: values[-1])

    def sample(self, generator: np.random.Generator) -> elastic.Subnet:
        return self._pick(lambda values: values[generator.integers(len(values))])

    def _pick(self, choose) -> elastic.Subnet:
        return elastic.Subnet(
            tuple(elastic.LayerWidth(int(choose(c["heads"])), int(choose(c["neurons"]))) for c in self.choices)
        )

    def to_dict(self) -> dict:
        return {
            "seq_len": self.seq_len,
            "full_macs": self.full_macs,
            "min_macs": self.min_macs,
            "choices": self.choices,
            "targets": self.targets,
        }

    @classmethod
    def load(cls, path: Path) -> "SearchSpace":
        data = json.loads(Path(path).read_text())
        return cls(data["choices"], data["full_macs"], data["min_macs"], data["seq_len"], data["targets"])


def _tie_broken(scores: torch.Tensor) -> np.ndarray:
    """Scores with ties split by position, so each threshold step keeps at most one more unit."""
    values = scores.double().numpy()
    return values - 1e-9 * np.arange(values.shape[-1]) / values.shape[-1]


class ThresholdPruner:
    """The subnet kept by an importance threshold, and its MACs."""

    def __init__(self, config, heads: torch.Tensor, neurons: torch.Tensor, section: SpaceSection):
        self.config, self.section = config, section
        self.dims = elastic.encoder_dims(config)
        expected = (self.dims.num_layers, self.dims.heads), (self.dims.num_layers, self.dims.neurons)
        if (tuple(heads.shape), tuple(neurons.shape)) != expected:
            raise UserError(f"importance scores of shape {tuple(heads.shape)}/{tuple(neurons.shape)} do not fit the model")
        self.heads, self.neurons = _tie_broken(heads), _tie_broken(neurons)

    def subnet(self, threshold: float) -> elastic.Subnet:
        layers = []
        multiple = self.section.neuron_multiple
        for head_scores, neuron_scores in zip(self.heads, self.neurons):
            heads = int((head_scores > threshold).sum())
            neurons = int((neuron_scores > threshold).sum())
            neurons = min(self.dims.neurons, multiple * round(neurons / multiple))
            if heads < self.section.discard_fraction * self.dims.heads:
                heads = 0
            if neurons < self.section.discard_fraction * self.dims.neurons:
                neurons = 0
            layers.append(elastic.LayerWidth(heads, neurons))
        return elastic.Subnet(tuple(layers))

    def macs(self, subnet: elastic.Subnet) -> int:
        return elastic.macs(self.config, subnet, seq_len=self.section.seq_len).encoder

    def fit(self, target: float) -> tuple[float, elastic.Subnet, int]:
        """Bisect the threshold whose kept units cost closest to `target` MACs."""
        low, high = 0.0, 1.0  # importance is sigmoid(score): 0 keeps every unit, 1 none
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


def _budget(value: float, reference: int) -> float:
    """A recipe budget: a fraction of `reference` when <= 1, else GMACs."""
    return value * reference if value <= 1 else value * 1e9


def build_space(config, heads: torch.Tensor, neurons: torch.Tensor, section: SpaceSection) -> SearchSpace:
    """The search space for `config` from importance scores (the pure part of the stage)."""
    pruner = ThresholdPruner(config, heads, neurons, section)
    full = pruner.macs(elastic.full_subnet(config))
    cmax = full if section.cmax is None else _budget(section.cmax, full)
    cmin = _budget(section.cmin, cmax)
    if cmax > full * (1 + section.tolerance):
        raise UserError(f"space.cmax is {cmax / 1e9:.3f} GMACs, above the full model's {full / 1e9:.3f} GMACs")
    if cmin >= cmax:
        raise UserError(f"space.cmin ({cmin / 1e9:.3f} GMACs) must be below space.cmax ({cmax / 1e9:.3f} GMACs)")
    targets = np.linspace(cmin, cmax, section.num_targets) if section.num_targets > 1 else np.array([cmax])
    records, subnets = [], []
    for target in targets[::-1]:
        threshold, subnet, cost = pruner.fit(float(target))
        error = (cost - target) / target
        if abs(error) > section.tolerance:
            raise UserError(
                f"no importance threshold reaches {target / 1e9:.4g} GMACs within {section.tolerance:.0%} "
                f"(closest: {cost / 1e9:.4g} GMACs); widen space.tolerance or lower space.neuron_multiple"
            )
        subnets.append(subnet)
        records.append({"target_macs": int(target), "macs": cost, "relative_error": error,
                        "threshold": threshold, "subnet": subnet.to_dict()})
    choices = []
    for index in range(pruner.dims.num_layers):
        choices.append({
            "heads": sorted({s.layers[index].heads for s in subnets}, reverse=True),
            "neurons": sorted({s.layers[index].neurons for s in subnets}, reverse=True),
        })
    space = SearchSpace(choices, full, min_macs=0, seq_len=section.seq_len, targets=records)
    return dataclasses.replace(space, min_macs=pruner.macs(space.smallest()))


def generate_space(recipe: Recipe) -> dict:
    """Writes `space/search_space.json`, a per-target heatmap and prints the choices."""
    run = RunDir(recipe)
    importance_file = run.require("importance", by="gen-space") / IMPORTANCE_FILE
    scores = load_file(str(importance_file))
    config = AutoConfig.from_pretrained(resolve_model(recipe.model.name))
    space = build_space(config, scores["heads"], scores["neurons"], recipe.space)
    with run.stage("gen-space") as out:
        out.add_input(importance_file)
        write_json(out.dir / SPACE_FILE, space.to_dict())
        dims = elastic.encoder_dims(config)
        widths = np.array([[(w["heads"], w["neurons"]) for w in t["subnet"]["layers"]] for t in space.targets])
        labels = [f"{t['macs'] / 1e9:.2f}G" for t in space.targets]
        space_heatmap(widths, (dims.heads, dims.neurons), labels, out.dir / "space.png")
        out.metrics = {
            "full_gmacs": space.full_macs / 1e9,
            "min_gmacs": space.min_macs / 1e9,
            "targets": [{"target_gmacs": t["target_macs"] / 1e9, "gmacs": t["macs"] / 1e9,
                         "relative_error": t["relative_error"]} for t in space.targets],
            "choices": space.choices,
        }
    _print_space(space)
    return out.metrics


def _print_space(space: SearchSpace) -> None:
    from rich.table import Table

    table = Table(title=f"search space (full {space.full_macs / 1e9:.3f} GMACs, smallest {space.min_macs / 1e9:.3f})")
    table.add_column("layer", justify="right")
    table.add_column("head choices")
    table.add_column("neuron choices")
    for index, choice in enumerate(space.choices):
        table.add_row(str(index), " ".join(map(str, choice["heads"])), " ".join(map(str, choice["neurons"])))
    console.print(table)
    for target in space.targets:
        console.print(
            f"  target {target['target_macs'] / 1e9:.3f} GMACs → {target['macs'] / 1e9:.3f} "
            f"({target['relative_error']:+.2%}) at threshold {target['threshold']:.4f}"
        )
