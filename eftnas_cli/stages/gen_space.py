"""Stage `gen-space`: the search space, generated from importance (EFTNAS's generator).

For N MACs targets evenly spaced between cmin and cmax, bisect one importance threshold until the
units above it (heads and neurons, all layers at once) cost the target's MACs, not more where
the model's units allow it within `tolerance` (a search budget equal to a target, cmin say, then
has that target's subnet). Each layer's widths
at all targets, merged, are its elastic choices; a sub-block kept below `discard_fraction` of its
width is dropped to 0 (a layer with neither heads nor neurons is skipped: elastic depth).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from transformers import AutoConfig

from eftnas_cli import artifacts, elastic
from eftnas_cli.errors import UserError
from eftnas_cli.models import resolve_model
from eftnas_cli.plots import space_heatmap
from eftnas_cli.pruning import ThresholdPruner
from eftnas_cli.recipe import Recipe, SpaceSection
from eftnas_cli.rundir import RunDir, holds_lock, write_json
from eftnas_cli.ui import console


def space_pruner(config, heads: torch.Tensor, neurons: torch.Tensor, section: SpaceSection) -> ThresholdPruner:
    """The threshold pruner a `space` recipe section describes."""
    return ThresholdPruner(config, heads, neurons, seq_len=section.seq_len,
                           neuron_multiple=section.neuron_multiple, discard_fraction=section.discard_fraction)


def _budget(value: float, reference: int) -> float:
    """A recipe budget: a fraction of `reference` when <= 1, else GMACs."""
    return value * reference if value <= 1 else value * 1e9


def build_space(config, heads: torch.Tensor, neurons: torch.Tensor, section: SpaceSection) -> elastic.SearchSpace:
    """The search space for `config` from importance scores (the pure part of the stage)."""
    pruner = space_pruner(config, heads, neurons, section)
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
        # A ceiling where one is within tolerance (the space's smallest subnet then fits a budget
        # equal to cmin); a model too coarse for that gets the closest subnet.
        closest = pruner.fit(float(target))
        below = pruner.below(float(target), closest)
        threshold, subnet, cost = below if (target - below[2]) / target <= section.tolerance else closest
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
    space = elastic.SearchSpace(choices, full, min_macs=0, seq_len=section.seq_len, targets=records)
    return dataclasses.replace(space, min_macs=pruner.macs(space.smallest()))


@holds_lock("gen-space")
def generate_space(recipe: Recipe) -> dict:
    """Writes `space/search_space.json`, a per-target heatmap and prints the choices."""
    run = RunDir(recipe)
    importance = artifacts.load_importance(run, by="gen-space")
    config = AutoConfig.from_pretrained(resolve_model(recipe.model.name))
    space = build_space(config, importance.heads, importance.neurons, recipe.space)
    with run.stage("gen-space") as out:
        out.add_input(importance.path)
        write_json(out.dir / artifacts.SPACE_FILE, space.to_dict())
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


def _print_space(space: elastic.SearchSpace) -> None:
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
