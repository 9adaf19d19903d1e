"""How the polish should fine-tune each budget's subnet: epochs and learning rates compared on search rows.

For each finished run (bench_quality's `runs/bench/<task>-s<seed>`, say) and each --budgets, the
search's choice is extracted from the super-network and fine-tuned with KD from the teacher for
each of --epochs (`export.finetune_epochs`) at each --lr (`export.finetune_learning_rate`; the
super-network's other settings, as the polish does), then scored on the search rows. The subnet was
chosen on those rows, the same one for every setting, so the settings are compared fairly; its
unpolished search score is beside. Each setting's score is its last epoch's: no epoch is chosen.
Polished scores are cached in `<run>/bench/polish_lr.json`. The validation split is not read:
these figures choose the default.

    python scripts/bench_polish.py --run runs/bench/mrpc-s0 --run runs/bench/mrpc-s1 [--lr 5e-5 1.5e-5]
        [--budgets 0.5 0.35] [--epochs 1 2] [--out docs/benchmarks_polish.md]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import _bench_common as common
import bench_quality
import torch

from eftnas_cli import artifacts, elastic
from eftnas_cli.recipe import load_recipe
from eftnas_cli.rundir import write_json

BY = "bench_polish"
CACHE_FILE = "polish_lr.json"
DEFAULT_OUT = Path("docs/benchmarks_polish.md")


def bench_run(path: Path, args) -> dict:
    recipe = load_recipe(path / "recipe.yaml", [])
    context = bench_quality.load_context(recipe, torch.device("cpu"))
    data = context.data
    pareto = artifacts.load_pareto(context.run, by=BY)
    cache = path / "bench" / CACHE_FILE
    done = json.loads(cache.read_text()) if cache.is_file() else {}
    result = {"run": str(path), "task": data.spec.name, "seed": recipe.seed, "search_rows": len(data.search),
              "supernet_lr": recipe.supernet.learning_rate, "budgets": {}}
    for budget in args.budgets:
        chosen = pareto.best(budget)
        if chosen is None:
            continue
        subnet = elastic.Subnet.from_dict(chosen["subnet"])
        entry = {"trial": chosen["trial"], "macs_ratio": context.macs_ratio(subnet), "search_score": chosen["score"],
                 "polished": {}}
        for epochs, lr in settings(args):
            key = f"t{chosen['trial']}-e{epochs:g}-lr{lr:g}"
            if key not in done:
                trained, wall = bench_quality.kd_train(context, context.supernet.extract(subnet), f"polish {key}",
                                                       epochs, lr)
                done[key] = {"score": context.evaluate_on_search_rows(trained)["score"], "wall_s": wall}
                cache.parent.mkdir(exist_ok=True)
                write_json(cache, done)
            entry["polished"][setting_label(epochs, lr)] = done[key]
        result["budgets"][artifacts.budget_key(budget)] = entry
    return result


def settings(args) -> list[tuple[float, float]]:
    return [(epochs, lr) for epochs in args.epochs for lr in args.lr]


def setting_label(epochs: float, lr: float) -> str:
    return f"{epochs:g} epoch(s), lr {lr:g}"


def render(results: list[dict], args, provenance: dict) -> str:
    first, *others = labels = [setting_label(epochs, lr) for epochs, lr in settings(args)]
    lines = ["# The polish's epochs and learning rate (search rows only)", "", *common.provenance_lines(provenance), "",
             "Each budget's chosen subnet, fine-tuned with KD from the teacher in each setting and scored on the "
             "search rows after its last epoch (x100, mean ± sd over seeds); `− unpolished` is the paired "
             "difference with the subnet before the polish, the last columns each setting's paired difference with "
             "the first. The subnet was chosen on these rows, the same one for every setting.", ""]
    for task in sorted({r["task"] for r in results}):
        runs = [r for r in results if r["task"] == task]
        lines += [f"## {task}: seeds {', '.join(str(r['seed']) for r in runs)}, {runs[0]['search_rows']} search rows "
                  f"(the super-network trained at lr {runs[0]['supernet_lr']:g})", ""]
        table = []
        for budget in [artifacts.budget_key(b) for b in args.budgets]:
            entries = [r["budgets"][budget] for r in runs if budget in r["budgets"]]
            if not entries:
                continue
            row = [budget, f"{statistics.fmean(e['macs_ratio'] for e in entries):.3f}",
                   common.mean_sd([100 * e["search_score"] for e in entries])]
            for label in labels:
                row.append(f"{common.mean_sd([100 * e['polished'][label]['score'] for e in entries])} "
                           f"({common.mean_sd([100 * (e['polished'][label]['score'] - e['search_score']) for e in entries], True)})")
            for label in others:  # the settings compared seed by seed: what the choice rests on
                row.append(common.mean_sd([100 * (e["polished"][label]["score"] - e["polished"][first]["score"])
                                           for e in entries], True))
            table.append(row)
        lines += [common.markdown_table(["budget", "MACs ratio", "unpolished",
                                         *(f"{label} (− unpolished)" for label in labels),
                                         *(f"{label} − {first}" for label in others)], table,
                                        align="lrr" + "r" * (2 * len(labels) - 1)), ""]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = common.runs_parser(__doc__, DEFAULT_OUT)
    parser.add_argument("--lr", nargs="+", type=float, default=[5e-5, 1.5e-5], help="polish learning rates to compare")
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.35], help="budgets whose choice is polished")
    parser.add_argument("--epochs", nargs="+", type=float, default=[1.0], help="polish epochs to compare (export.finetune_epochs)")
    args = parser.parse_args(argv)
    if any(value <= 0 for value in [*args.epochs, *args.lr]):
        parser.error("--epochs and --lr take positive numbers")
    return args


def main(argv=None) -> int:
    return common.report_over_runs(parse_args(argv), bench_run, render)


if __name__ == "__main__":
    sys.exit(main())
