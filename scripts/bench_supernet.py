"""Super-network ablation: which training settings give the best subnets, judged on search rows.

Every variant is the recipe (default configs/quickstart.yaml) plus a few overrides of the
`supernet` section; each runs the pipeline through `search` in its own run directory
(`<run-root>/<task>-<variant>-s<seed>`; the recipe's own: `<task>-s<seed>`, as bench_quality names
it, so an ablation with its settings and run root reuses its runs), all sharing one fine-tuned
teacher. A variant is scored by the search's choice per budget on the search rows (held out of
the train split: no stage trains on them, and the validation split is never read here), mean ± sd
over seeds, with the super-network's training wall time beside it. Where the search reads only the first
`search.max_eval_samples` search rows (SST-2), a second table scores the same choices on the rows it
did not read, free of the selection's optimism, with each variant's paired difference from the first.
A last table reads each super-network without the search's selection noise: the mean score of a
fixed panel of random subnets in each budget's MACs band (the same subnets for every variant of a
seed, whose spaces are identical). Finished runs are kept, so a re-run only does what is missing
(the bench can be spread over several sittings). Writes a markdown report and its JSON.

    python scripts/bench_supernet.py [--task mrpc] [--seeds 0 1] [--variants ...] [--budgets 0.5 0.35]
        [--recipe configs/quickstart.yaml] [--run-root runs/ablation] [--out docs/benchmarks_supernet.md]
        [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import _bench_common as common
import numpy as np

from eftnas_cli import artifacts, elastic
from eftnas_cli.data import recipe_task_data
from eftnas_cli.models import best_device, load_tokenizer
from eftnas_cli.recipe import load_recipe
from eftnas_cli.rundir import RunDir, write_json
from eftnas_cli.stages.pipeline import run_pipeline
from eftnas_cli.supernet import Supernet
from eftnas_cli.ui import console

DEFAULT_RECIPE = common.REPO_ROOT / "configs" / "quickstart.yaml"
DEFAULT_OUT = Path("docs/benchmarks_supernet.md")
BY = "bench_supernet.py"
PANEL_SIZE = 8  # random subnets per budget band
PANEL_SEED = 1234
PANEL_ROWS = 2000  # the first search rows each panel subnet reads (SST-2 has 6,735)
PANEL_FILE = "bench_panel.json"  # in the run directory, kept while its super-network is unchanged
UNREAD_FILE = "bench_unread.json"  # in the run directory, kept while its super-network and search are unchanged

# Variant name -> recipe overrides (on top of the recipe and the command line's).
VARIANTS = {
    "recipe": [],
    "hidden-kd": ["supernet.hidden_distillation_weight=1.0"],
    "pretrained": ["supernet.start_from=pretrained"],
    "cosine": ["supernet.lr_scheduler=cosine", "supernet.warmup=0"],
    "lr-3e-5": ["supernet.learning_rate=3.0e-5"],
    "lr-5e-5": ["supernet.learning_rate=5.0e-5"],  # the quickstart's before docs/benchmarks_supernet_lr.md
    "lr-1e-4": ["supernet.learning_rate=1.0e-4"],
    "lr-2e-4": ["supernet.learning_rate=2.0e-4"],
    "random-0": ["supernet.num_random_subnets=0"],
    "random-2": ["supernet.num_random_subnets=2"],
    "spread": ["supernet.random_subnets=spread"],
    "epochs-x2": [],  # filled in from the recipe's epochs
}


def variant_overrides(name: str, recipe_epochs: float) -> list[str]:
    if name == "epochs-x2":
        return [f"supernet.epochs={2 * recipe_epochs:g}"]
    return VARIANTS[name]


def teacher_run(args) -> str:
    """The shared teacher's folder (fine-tuned once, in `<run-root>/<task>-teacher`)."""
    recipe = load_recipe(args.recipe, [f"task.name={args.task}", f"name={args.task}-teacher",
                                       f"output_dir={args.run_root}", *args.overrides])
    run_pipeline(recipe, until="finetune")
    return artifacts.teacher_folder(recipe, RunDir(recipe), by=BY)


def budget_bands(budgets: list[float]) -> list[tuple[float, float]]:
    """(next smaller budget, budget] for every budget; the smallest reaches down to 0."""
    ascending = sorted(budgets)
    return list(zip([0.0, *ascending[:-1]], ascending))


class LoadedRun:
    """A finished run's search rows and super-network, loaded once and only when a score is missing."""

    def __init__(self, recipe, run: RunDir):
        self.recipe, self.run = recipe, run
        self._loaded = None

    def load(self):
        if self._loaded is None:
            data = recipe_task_data(self.recipe, load_tokenizer(self.recipe.model.name))
            supernet = Supernet.load(self.run, data.spec, by=BY).to(best_device(self.recipe.device))
            self._loaded = data, supernet
        return self._loaded

    def score(self, subnet: elastic.Subnet, rows) -> float:
        data, supernet = self.load()
        return supernet.evaluate(subnet, rows, data, self.recipe.search.eval_batch_size)["score"]


def cached(loaded: LoadedRun, file: str, settings: dict, compute):
    """`compute()`'s value, kept in the run directory's `file` while `settings` (what decides the
    value: the super-network's and the search's output hashes, budgets...) are unchanged."""
    cache = loaded.run.path / file
    if cache.is_file():
        kept = json.loads(cache.read_text())
        if {key: kept.get(key) for key in settings} == settings and "value" in kept:
            return kept["value"]
    value = compute()
    write_json(cache, {**settings, "value": value})
    return value


def panel_scores(loaded: LoadedRun, budgets: list[float]) -> dict[str, float | None]:
    """Mean score of PANEL_SIZE random subnets (`sample_spread`, a fixed seed) on the first PANEL_ROWS
    search rows in each budget's MACs band; None where the space has no subnet in a band."""

    def compute() -> dict[str, float | None]:
        data, supernet = loaded.load()
        rows = data.search.select(range(min(len(data.search), PANEL_ROWS)))
        generator, full, scores = np.random.default_rng(PANEL_SEED), supernet.full_macs, {}
        for low, high in budget_bands(budgets):
            panel = supernet.spread_within(generator, low * full, high * full, PANEL_SIZE, 200 * PANEL_SIZE)
            values = [loaded.score(subnet, rows) for subnet in panel]
            scores[f"{high:g}"] = statistics.mean(values) if values else None
        return scores

    settings = {"supernet": loaded.run.record("train-supernet")["outputs"], "budgets": budgets,
                "size": PANEL_SIZE, "rows": PANEL_ROWS}
    return cached(loaded, PANEL_FILE, settings, compute)


def unread_scores(loaded: LoadedRun, pareto: artifacts.ParetoRecord, budgets: list[float]) -> dict:
    """{"rows", "scores"}: each budget's choice scored on the search rows the search did not read
    (`search.max_eval_samples`), a score its own selection did not inflate; no rows where it read them all."""

    def compute() -> dict:
        data, _ = loaded.load()
        if pareto.eval_rows >= len(data.search):
            return {"rows": 0, "scores": {}}
        unread = data.search.select(range(pareto.eval_rows, len(data.search)))
        by_trial = {trial["trial"]: trial for trial in pareto.trials}
        scores = {f"{budget:g}": loaded.score(elastic.Subnet.from_dict(by_trial[chosen["trial"]]["subnet"]), unread)
                  for budget in budgets if (chosen := pareto.best(budget)) is not None}
        return {"rows": len(unread), "scores": scores}

    settings = {"supernet": loaded.run.record("train-supernet")["outputs"],
                "search": loaded.run.record("search")["outputs"], "budgets": budgets}
    return cached(loaded, UNREAD_FILE, settings, compute)


def run_name(task: str, variant: str, seed: int) -> str:
    """The recipe variant's run has bench_quality's name for its seed, so that an ablation with the
    quality bench's settings and run root reuses its runs instead of training them again."""
    return f"{task}-s{seed}" if variant == "recipe" else f"{task}-{variant}-s{seed}"


def run_variant(args, variant: str, seed: int, teacher: str) -> dict:
    base = load_recipe(args.recipe, args.overrides)
    overrides = [f"task.name={args.task}", f"name={run_name(args.task, variant, seed)}", f"output_dir={args.run_root}",
                 f"seed={seed}", f"model.teacher={teacher}", f"search.budgets={args.budgets}",
                 *args.overrides, *variant_overrides(variant, base.supernet.epochs)]
    recipe = load_recipe(args.recipe, overrides)
    console.rule(f"[bold]{variant}[/bold], seed {seed}")
    run_pipeline(recipe, until="search")
    run = RunDir(recipe)
    pareto = artifacts.load_pareto(run, by=BY)
    walls = {stage: record["wall_time_s"] for stage, record in run.manifest()["stages"].items()}
    loaded = LoadedRun(recipe, run)
    unread = unread_scores(loaded, pareto, args.budgets)
    return {
        "variant": variant, "seed": seed, "overrides": variant_overrides(variant, base.supernet.epochs),
        "search_rows": pareto.eval_rows, "teacher_score": pareto.teacher["score"],
        "best": {f"{b:g}": (pareto.best(b) or {}).get("score") for b in args.budgets},
        "unread_rows": unread["rows"], "unread": unread["scores"],
        "panel": panel_scores(loaded, args.budgets),
        "supernet_wall_s": walls.get("train-supernet"), "search_wall_s": walls.get("search"),
    }


def percent_mean_sd(fractions: list[float | None]) -> str:
    """`mean ± sd` of the scores present, in points (x100); "-" when none is."""
    points = [100 * value for value in fractions if value is not None]
    return common.mean_sd(points) if points else "-"


def paired_cell(results: list[dict], variant: str, reference: str, value) -> str:
    """`mean ± sd` over `variant`'s seeds of `value(result)` (a fraction, or None where absent), in points;
    for a variant other than `reference`, its paired difference from it (same seeds) in brackets."""
    by_seed = {r["seed"]: r for r in results if r["variant"] == reference}
    cells = [r for r in results if r["variant"] == variant and value(r) is not None]
    if not cells:
        return "-"
    text = percent_mean_sd([value(c) for c in cells])
    paired = [100 * (value(c) - value(base)) for c in cells
              if (base := by_seed.get(c["seed"])) is not None and value(base) is not None]
    if variant != reference and paired:
        text += f" ({common.mean_sd(paired, signed=True)})"
    return text


def render(results: list[dict], args, header: dict) -> str:
    budgets = [f"{b:g}" for b in args.budgets]
    variants = [v for v in args.variants if any(r["variant"] == v for r in results)]
    reference = variants[0]
    rows = []
    for variant in variants:
        cells = [r for r in results if r["variant"] == variant]
        rows.append([variant, " ".join(cells[0]["overrides"]) or "(the recipe)", str(len(cells)),
                     *(paired_cell(results, variant, reference, lambda r, b=b: r["best"][b]) for b in budgets),
                     common.format_duration(statistics.mean(c["supernet_wall_s"] for c in cells))])
    teacher = percent_mean_sd([r["teacher_score"] for r in results])
    table = common.markdown_table(["variant", "overrides", "seeds", *(f"best @ {b} (search rows)" for b in budgets),
                                   "super-network wall time"], rows, align="llr" + "r" * len(budgets) + "r")
    lower = {f"{high:g}": f"{low:g}" for low, high in budget_bands(args.budgets)}
    panel_rows = [[variant, *(paired_cell(results, variant, reference, lambda r, b=b: r["panel"][b]) for b in budgets)]
                  for variant in variants]
    panel = common.markdown_table(["variant", *(f"panel in ({lower[b]}, {b}] of the MACs" for b in budgets)], panel_rows,
                                  align="l" + "r" * len(budgets))
    return "\n".join([
        f"# Super-network ablation ({args.task.upper()})",
        "",
        *common.provenance_lines(header),
        "",
        f"Score = the search's best subnet within each MACs budget, on the {results[0]['search_rows']} search rows "
        f"it read (held out of the train split; the teacher scores {teacher} there), mean ± sd over seeds; in "
        f"brackets, the paired difference from `{reference}` (same seeds), in points. The validation split is not "
        "read: these figures choose the defaults, `docs/benchmarks.md` reports the chosen ones.",
        "",
        table,
        *unread_section(results, args),
        "",
        f"Mean score of a fixed panel of {PANEL_SIZE} random subnets (`sample_spread`) per MACs band, on the first "
        f"{PANEL_ROWS} search rows at most, mean ± sd over seeds (paired difference in brackets): the "
        "super-network's quality in each band without the search's choice.",
        "",
        panel,
    ]) + "\n"


def unread_section(results: list[dict], args) -> list[str]:
    """The choices scored on the search rows the search did not read, each variant also as its paired
    difference from the first variant (same seeds); nothing where the search read every row."""
    if not any(r.get("unread") for r in results):
        return []
    budgets = [f"{b:g}" for b in args.budgets]
    variants = [v for v in args.variants if any(r["variant"] == v and r.get("unread") for r in results)]
    reference = variants[0]
    rows = []
    for variant in variants:
        cells = [r for r in results if r["variant"] == variant and r.get("unread")]
        rows.append([variant, str(len(cells)),
                     *(paired_cell(results, variant, reference, lambda r, b=b: (r.get("unread") or {}).get(b)) for b in budgets),
                     common.format_duration(statistics.mean(c["search_wall_s"] for c in cells))])
    return [
        "",
        f"The same choices scored on the {results[0]['unread_rows']} search rows the search did not read "
        f"(`search.max_eval_samples`): no selection inflates these. In brackets, the paired difference from "
        f"`{reference}` (same seeds), in points.",
        "",
        common.markdown_table(["variant", "seeds", *(f"choice @ {b} (unread rows)" for b in budgets), "search wall time"],
                              rows, align="lr" + "r" * len(budgets) + "r"),
    ]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--task", default="mrpc", help="the GLUE task every variant trains and searches")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="one run per variant and seed")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="super-network settings to compare (the first is the reference of the paired differences): "
                        + "; ".join(f"{name}: {' '.join(changes) or 'the recipe'}" for name, changes in VARIANTS.items()
                                    if name != "epochs-x2") + "; epochs-x2: twice the recipe's supernet.epochs")
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.35],
                        help="MACs budgets (fractions of the dense encoder) whose choices are compared")
    parser.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE, help="the recipe every variant derives from")
    parser.add_argument("--run-root", type=Path, default=Path("runs/ablation"),
                        help="where the runs go (<task>-<variant>-s<seed>, and the shared <task>-teacher)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown report; its JSON goes beside it")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides for every variant")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    return common.user_errors_in_one_line(lambda: run(args))


def run(args) -> int:
    json_path = args.out.with_suffix(".json")
    teacher = teacher_run(args)
    device = best_device(load_recipe(args.recipe, args.overrides).device).type  # what the stages train on
    results = []
    for seed in args.seeds:
        for variant in args.variants:
            results.append({**run_variant(args, variant, seed, teacher), "device": device})
            write_json(json_path, {"task": args.task, "results": results})
            common.write_report(args.out, render(results, args, common.provenance(device)))
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
