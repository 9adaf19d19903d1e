"""How the search chooses each budget's subnet among near-tied ones, measured on search rows only.

Takes finished runs whose search is done (bench_quality's `runs/bench/<task>-s<seed>`, say) and asks
whether `search.tie_standard_errors` = k (the subnet of most MACs among those scoring within k
standard errors of the best within the budget) chooses better subnets than the best score alone:

1. every trial's per-row predictions on the run's search rows (classification tasks), cached in
   `<run>/bench/choice_rows.json`;
2. split-half cross-validation: --splits random halves A/B of the search rows; on half A the
   best-score rule (fewer MACs break ties: eftnas before the key) and each k choose a subnet per
   budget from the search's trials, and the choice is scored on half B;
3. for the runs of the tasks named by --polish, each budget's choice under the best-score rule and
   under k = --polish-k is fine-tuned --polish-epochs with KD from the teacher (as
   `export.finetune_epochs`) and scored on all search rows. The best-score choice was picked on
   these rows, so this comparison favours it.

The validation split is not read: these figures choose the default.

    python scripts/bench_choice.py --run runs/bench/mrpc-s0 --run runs/bench/mrpc-s1 [--k 0 0.5 1 1.5 2]
        [--budgets 0.7 0.5 0.35 0.25] [--splits 1000] [--polish mrpc] [--polish-k 0.5] [--polish-budgets 0.5 0.35]
        [--polish-epochs 1] [--out docs/benchmarks_choice.md]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import _bench_common as common
import numpy as np
import torch

from eftnas_cli import artifacts, elastic
from eftnas_cli.recipe import load_recipe
from eftnas_cli.rundir import RunDir, write_json
from eftnas_cli.supernet import Supernet
from eftnas_cli.tasks import SEQUENCE_CLASSIFICATION, model_outputs
from eftnas_cli.ui import progress

BY = "bench_choice"
CACHE_FILE = "choice_rows.json"
DEFAULT_OUT = Path("docs/benchmarks_choice.md")


def best_score_choice(trials: list[dict], budget: float, full_macs: int) -> dict | None:
    """The rule before `search.tie_standard_errors`: the highest score, fewer MACs breaking ties."""
    within = [t for t in trials if t["macs"] <= budget * full_macs]
    return max(within, key=lambda t: (t["score"], -t["macs"])) if within else None


def row_predictions(run: RunDir, recipe, data, trials: list[dict]) -> dict:
    """Labels and each trial's predicted class on the search rows (cached in the run directory)."""
    cache = run.path / "bench" / CACHE_FILE
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached["trials"] == [t["trial"] for t in trials]:
            return cached
    supernet = Supernet.load(run, data.spec, by=BY)
    predictions = []
    with progress() as bar:
        task = bar.add_task(f"search-row predictions of {run.path.name}", total=len(trials), status="")
        for trial in trials:
            supernet.activate(elastic.Subnet.from_dict(trial["subnet"]))
            outputs, labels = model_outputs(supernet.model, data.search, data.collator, ("logits",),
                                            recipe.search.eval_batch_size, with_labels=True)
            predicted = outputs["logits"].argmax(-1)
            # The search measured the same rows: a mismatch means these are not the search's rows.
            accuracy = float((predicted == labels).mean())
            if "accuracy" in trial["metrics"] and abs(accuracy - trial["metrics"]["accuracy"]) > 1e-6:
                raise SystemExit(f"{run.path}: trial {trial['trial']} scores {accuracy:.4f} on the search rows, "
                                 f"its record {trial['metrics']['accuracy']:.4f}")
            predictions.append(predicted.tolist())
            bar.update(task, advance=1)
    supernet.activate(supernet.largest())
    result = {"trials": [t["trial"] for t in trials], "labels": np.asarray(labels).tolist(), "predictions": predictions}
    cache.parent.mkdir(exist_ok=True)
    write_json(cache, result)
    return result


def cross_validate(trials: list[dict], rows: dict, full_macs: int, budgets: list[float], ks: list[float],
                   splits: int, seed: int) -> dict:
    """Mean gain (points, on half B) of each k's choice over the best-score rule's, per budget,
    and the mean MACs ratio each chooses."""
    labels = np.asarray(rows["labels"])
    correct = np.asarray([np.asarray(p) == labels for p in rows["predictions"]], dtype=float)
    generator = np.random.default_rng(seed)
    half = len(labels) // 2
    gains = {(b, k): [] for b in budgets for k in ks}
    ratios = {(b, k): [] for b in budgets for k in ks}
    for _ in range(splits):
        order = generator.permutation(len(labels))
        score_a, score_b = correct[:, order[:half]].mean(1), correct[:, order[half:]].mean(1)
        on_a = [{**t, "score": float(s), "index": i} for i, (t, s) in enumerate(zip(trials, score_a))]
        for budget in budgets:
            before = best_score_choice(on_a, budget, full_macs)
            if before is None:
                continue
            for k in ks:
                chosen = artifacts.choose_within_budget(on_a, budget, full_macs, half, k)
                gains[(budget, k)].append(100 * (score_b[chosen["index"]] - score_b[before["index"]]))
                ratios[(budget, k)].append(chosen["macs"] / full_macs)
    return {artifacts.budget_key(b): {f"{k:g}": {"gain": statistics.fmean(gains[(b, k)]),
                                                 "macs_ratio": statistics.fmean(ratios[(b, k)])}
                                      for k in ks}
            for b in budgets if gains[(b, ks[0])]}


def polish(run: RunDir, recipe, data, trials: list[dict], full_macs: int, budgets: list[float], k: float,
           epochs: float) -> dict:
    """Both rules' choices (on all search rows), fine-tuned with KD and scored on the search rows."""
    import bench_quality

    context = bench_quality.load_context(recipe, torch.device("cpu"))
    rows = len(data.search)
    cache = run.path / "bench" / "choice_polish.json"
    done = json.loads(cache.read_text()) if cache.is_file() else {}
    result = {}
    for budget in budgets:
        picks = {"best score": best_score_choice(trials, budget, full_macs),
                 f"k={k:g}": artifacts.choose_within_budget(trials, budget, full_macs, rows, k)}
        result[artifacts.budget_key(budget)] = entry = {}
        for rule, trial in picks.items():
            key = f"t{trial['trial']}-e{epochs:g}"
            if key not in done:
                trained, wall = bench_quality.kd_train(context, context.supernet.extract(elastic.Subnet.from_dict(trial["subnet"])),
                                                       f"polish t{trial['trial']}", epochs)
                done[key] = {"polished": context.evaluate_on_search_rows(trained)["score"], "wall_s": wall}
                write_json(cache, done)
            entry[rule] = {"trial": trial["trial"], "macs_ratio": trial["macs"] / full_macs,
                           "search_score": trial["score"], "polished_search_score": done[key]["polished"]}
    return result


def bench_run(path: Path, args) -> dict:
    from eftnas_cli.data import recipe_task_data
    from eftnas_cli.models import load_tokenizer

    recipe = load_recipe(path / "recipe.yaml", [])
    run = RunDir(recipe)
    data = recipe_task_data(recipe, load_tokenizer(recipe.model.name))
    if data.spec.kind is not SEQUENCE_CLASSIFICATION:
        raise SystemExit(f"{path}: bench_choice reads per-row classes; task {data.spec.name} is not a classification")
    pareto = artifacts.load_pareto(run, by=BY)
    trials = pareto.trials
    rows = row_predictions(run, recipe, data, trials)
    result = {"run": str(path), "task": data.spec.name, "seed": recipe.seed, "search_rows": len(rows["labels"]),
              "trials": len(trials),
              "cross_validation": cross_validate(trials, rows, pareto.full_macs, args.budgets, args.k, args.splits,
                                                 recipe.seed)}
    if data.spec.name in args.polish:
        result["polish"] = polish(run, recipe, data, trials, pareto.full_macs, args.polish_budgets, args.polish_k,
                                  args.polish_epochs)
    return result


def render(results: list[dict], args, provenance: dict) -> str:
    ks = [f"{k:g}" for k in args.k]
    lines = ["# Choosing each budget's subnet among near-tied ones (search rows only)", "",
             *common.provenance_lines(provenance), "",
             "Split-half cross-validation on the search rows: each rule chooses on a random half and is scored on "
             f"the other ({args.splits} splits per run). Gain: points of the task's score over the best-score rule's "
             "choice (fewer MACs breaking ties), mean ± sd over runs (the `all budgets` row: over runs × budgets); in "
             "brackets the mean MACs ratio chosen. The chosen default's validation figures, read once per final model "
             "after it was set, are in docs/benchmarks.md.", ""]
    for task in sorted({r["task"] for r in results}):
        runs = [r for r in results if r["task"] == task]
        lines += [f"## {task}: {len(runs)} run{'s' * (len(runs) > 1)} (seed {', '.join(str(r['seed']) for r in runs)}), "
                  f"{runs[0]['search_rows']} search rows, {runs[0]['trials']} trials", ""]
        rows, overall = [], {k: [] for k in ks}
        for budget in [artifacts.budget_key(b) for b in args.budgets]:
            cells = []
            for k in ks:
                gains = [r["cross_validation"][budget][k]["gain"] for r in runs if budget in r["cross_validation"]]
                ratio = statistics.fmean(r["cross_validation"][budget][k]["macs_ratio"] for r in runs
                                         if budget in r["cross_validation"])
                overall[k] += gains
                cells.append(f"{common.mean_sd(gains, signed=True)} ({ratio:.3f})")
            rows.append([budget, *cells])
        rows.append(["all budgets", *(common.mean_sd(overall[k], signed=True) for k in ks)])
        lines += [common.markdown_table(["budget", *(f"k = {k}" for k in ks)], rows, align="l" + "r" * len(ks)), ""]
        polished = [r for r in runs if "polish" in r]
        if polished:
            lines += [f"Polished ({args.polish_epochs:g} epoch of KD) and scored on all search rows, best score vs "
                      f"k = {args.polish_k:g} (the best-score choice was picked on these rows: the comparison favours it):", ""]
            table = []
            for r in polished:
                for budget, entry in r["polish"].items():
                    before, after = entry["best score"], entry[f"k={args.polish_k:g}"]
                    table.append([f"s{r['seed']}", budget,
                                  f"t{before['trial']} @ {before['macs_ratio']:.3f}: {100 * before['polished_search_score']:.2f}",
                                  f"t{after['trial']} @ {after['macs_ratio']:.3f}: {100 * after['polished_search_score']:.2f}",
                                  f"{100 * (after['polished_search_score'] - before['polished_search_score']):+.2f}"])
            lines += [common.markdown_table(["seed", "budget", "best score: trial @ MACs: polished",
                                             f"k = {args.polish_k:g}", "difference"], table, align="llrrr"), ""]
            for budget in [artifacts.budget_key(b) for b in args.polish_budgets]:
                differences = [100 * (r["polish"][budget][f"k={args.polish_k:g}"]["polished_search_score"]
                                      - r["polish"][budget]["best score"]["polished_search_score"]) for r in polished]
                lines.append(f"- {budget}: mean difference {common.mean_sd(differences, signed=True)} over {len(differences)} seeds")
            lines.append("")
    gains = {k: statistics.fmean(r["cross_validation"][b][k]["gain"] for r in results for b in r["cross_validation"])
             for k in ks}
    best = max(gains, key=gains.get)
    lines += [f"Highest mean gain over every run and budget: k = {best} ({gains[best]:+.2f} points; "
              + ", ".join(f"k = {k}: {gain:+.2f}" for k, gain in gains.items()) + ").", ""]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = common.runs_parser(__doc__, DEFAULT_OUT)
    parser.add_argument("--k", nargs="+", type=float, default=[0, 0.5, 1, 1.5, 2])
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.7, 0.5, 0.35, 0.25])
    parser.add_argument("--splits", type=int, default=1000)
    parser.add_argument("--polish", nargs="*", default=[], metavar="TASK", help="polish the choices of these tasks' runs")
    parser.add_argument("--polish-k", type=float, default=0.5)
    parser.add_argument("--polish-budgets", nargs="+", type=float, default=[0.5, 0.35])
    parser.add_argument("--polish-epochs", type=float, default=1.0)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    return common.report_over_runs(parse_args(argv), bench_run, render)


if __name__ == "__main__":
    sys.exit(main())
