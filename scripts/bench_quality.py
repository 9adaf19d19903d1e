"""Compression quality against baselines, at equal MACs budgets, over several seeds.

Per task, one teacher is fine-tuned (run `<task>-teacher`) and shared; each seed then varies
everything after it: the eftnas pipeline through `search` (run `<task>-s<seed>`, the recipe's
settings, default configs/quickstart.yaml, with the search space reaching down to the smallest
budget) and four baselines cut to the same budgets (fractions of the dense encoder's MACs):

  (a) pruned, no retraining   the teacher reordered by the run's importance and pruned by one
                              importance threshold (gen-space's pruner) to the budget
  (b) pruned + KD fine-tune   (a)'s architecture fine-tuned with KD from the teacher like the
                              super-network (recipe.supernet: epochs, lr, KD settings)
  (c) uniform width           the run's super-network keeping the same fraction of heads and
                              neurons in every layer (DynaBERT-style), the largest that fits
  (d) layer drop + KD         k evenly spaced layers of the teacher (DistilBERT-style), the largest
                              k that fits, fine-tuned like (b)

and eftnas + polish: eftnas's subnet fine-tuned --polish-epochs with KD as `export.finetune_epochs`
does it, keeping the weights (before the polish or after one of its epochs) that score best on
search rows the search did not read (`training.polish_selection_rows`).

eftnas is the search's choice per budget (`search.tie_standard_errors`), made on the search rows
(held out of the train split); every model is evaluated once on the task's validation split. (b) and (d) train
per budget, so they run at --budgets only; eftnas, (a) and (c) need no extra training and run at
--extra-budgets too. The polish also trains per budget; it runs at --polish-budgets (default: --budgets and
the extra budgets with a retention target, 0.25). Each finished (task, seed, method, budget) cell is kept in
`docs/benchmarks_quality_cells.json` (beside the report, committed with it), so the bench can be
spread over several sittings, on other machines too: a re-run does only what is missing. Writes a
markdown report (default docs/benchmarks.md) rendered from its JSON (docs/benchmarks_quality.json,
with a top-level `summary` list), and prints the targets.

    python scripts/bench_quality.py [--tasks mrpc sst2] [--seeds 0 1 2 ...] [--budgets 0.5 0.35]
        [--extra-budgets 0.7 0.25] [--polish-budgets 0.5 0.35 0.25] [--train-samples TASK=N ...]
        [--remeasure METHOD ...] [--device cpu|cuda] [--recipe FILE]
        [--run-root runs/bench] [--out docs/benchmarks.md] [--smoke] [key=value ...]

Trailing key=value arguments override the recipe (after the bench's own settings). `--smoke`
checks the script end to end on a tiny random model and synthetic data in a temporary folder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import _bench_common as common

# Must precede the torch imports below: see hide_gpus_if_cpu_requested.
common.hide_gpus_if_cpu_requested(sys.argv[1:])

import torch  # noqa: E402

from eftnas_cli import artifacts, elastic  # noqa: E402
from eftnas_cli.data import TaskData, recipe_task_data  # noqa: E402
from eftnas_cli.models import load_model, load_tokenizer  # noqa: E402
from eftnas_cli.pruning import layer_drop_subnet, uniform_subnet  # noqa: E402
from eftnas_cli.recipe import Recipe, load_recipe  # noqa: E402
from eftnas_cli.rundir import RunDir, value_before_it_existed, write_json  # noqa: E402
from eftnas_cli.stages.gen_space import space_pruner  # noqa: E402
from eftnas_cli.stages.pipeline import run_pipeline  # noqa: E402
from eftnas_cli.supernet import Supernet  # noqa: E402
from eftnas_cli.tasks import TASKS  # noqa: E402
from eftnas_cli.training import distill, evaluate, polish  # noqa: E402
from eftnas_cli.ui import console  # noqa: E402

DEFAULT_RECIPE = common.REPO_ROOT / "configs" / "quickstart.yaml"
DEFAULT_OUT = Path("docs/benchmarks.md")
BY = "bench_quality.py"  # how upstream-stage errors name the requester
# Train rows per task unless --train-samples says otherwise (None: the whole train split).
DEFAULT_TRAIN_SAMPLES = {"mrpc": None, "sst2": 8000}
# Seeds per task unless --seeds says otherwise. MRPC has 408 validation rows (one standard error
# about 2.2 points per seed), too few for 3 seeds to tell apart methods a point apart: it runs 5.
DEFAULT_SEEDS = {"mrpc": [0, 1, 2, 3, 4]}
OTHER_TASKS_SEEDS = [0, 1, 2]
SMOKE_TASK, SMOKE_BUDGETS, SMOKE_EXTRA_BUDGETS, SMOKE_SEEDS = "mrpc", [0.6], [0.8], [0, 1]

METHODS = {
    "teacher": "teacher (dense)",
    "eftnas": "eftnas (searched subnet)",
    "eftnas+polish": "eftnas + polish (KD fine-tune of the subnet)",
    "a": "(a) pruned, no retraining",
    "b": "(b) pruned + KD fine-tune",
    "c": "(c) uniform width (super-network)",
    "d": "(d) layer drop + KD",
}
TRAINED_PER_BUDGET = ("b", "d")  # a fine-tune per budget: --budgets only
BASELINES = ("a", "b", "c", "d")
# eftnas's training cost after the teacher: the stages that train, score or search.
EFTNAS_STAGES = ("importance", "gen-space", "train-supernet", "search")
KD_MARGIN_POINTS = 0.5  # eftnas must stay within this many points (x100) of (b)


def retention_target(budget: float) -> float | None:
    """% of the teacher eftnas must keep at `budget` (the issue's targets), None where none is set."""
    if budget <= 0.35:
        return 97.0
    return 99.0 if budget <= 0.5 else None


# ---- one seed's shared inputs ------------------------------------------------------------------
@dataclass
class SeedContext:
    """What every method of one (task, seed) reads: the run, its data, the teacher, the super-network."""

    recipe: Recipe
    run: RunDir
    data: TaskData
    teacher: torch.nn.Module  # reordered by importance (same function), on `device`
    supernet: Supernet
    importance: artifacts.UnitImportance
    device: torch.device

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Validation metrics: read once per final model."""
        return evaluate(model.to(self.device), self.data.main_eval, self.data.collator, self.data.spec,
                        self.recipe.search.eval_batch_size)

    def evaluate_on_search_rows(self, model: torch.nn.Module) -> dict[str, float]:
        """Metrics on the search rows, for the scripts that choose defaults there."""
        return evaluate(model.to(self.device), self.data.search, self.data.collator, self.data.spec,
                        self.recipe.search.eval_batch_size)

    def macs_ratio(self, subnet: elastic.Subnet) -> float:
        return self.supernet.macs(subnet) / self.supernet.full_macs

    def stage_walls(self) -> dict[str, float]:
        return {stage: record["wall_time_s"] for stage, record in self.run.manifest()["stages"].items()}


def load_context(recipe: Recipe, device: torch.device) -> SeedContext:
    run = RunDir(recipe)
    data = recipe_task_data(recipe, load_tokenizer(recipe.model.name))
    teacher = load_model(artifacts.teacher_folder(recipe, run, by=BY), data.spec).to(device).eval()
    importance = artifacts.load_importance(run, by=BY)
    # Most important units first, as in the super-network: every baseline cut keeps the best units.
    elastic.reorder(teacher, list(importance.heads), list(importance.neurons))
    supernet = Supernet.load(run, data.spec, by=BY).to(device)
    return SeedContext(recipe, run, data, teacher, supernet, importance, device)


# ---- cells -------------------------------------------------------------------------------------
# Bump when a method's code changes what it measures: cells of another version are measured again.
CELL_VERSION = 2
# Bump when the search's code changes which subnet it returns (3: its first generation spread over
# the MACs range, then a climb per budget; 4: each budget's choice among near-tied subnets,
# `search.tie_standard_errors`); cells of the methods that read its choice are measured again.
SEARCH_VERSION = 4
# Bump when the polish's code changes what it returns (2: the weights, before the polish or after
# one of its epochs, that score best on the search rows the search read; 3: on search rows it did
# not read, where the unpolished subnet's score is not the maximum the search selected).
POLISH_VERSION = 3
# The methods that read the search: the others leave the search section out of their fingerprints,
# so trying another search keeps their cells ((c) reads the super-network, not the search).
READ_THE_SEARCH = ("eftnas", "eftnas+polish")
# What only the super-network's sandwich reads: the teacher and the baselines that cut one fixed
# subnet ((a), (b), (d)) leave these settings out of their fingerprints.
READ_THE_SUPERNET = ("eftnas", "eftnas+polish", "c")
SANDWICH_KEYS = ("num_random_subnets", "random_subnets")
# How the search's result is read, not what it measures: only the cells that read its choice see it
# (the choice moves no super-network and no trial, so (c) keeps its cells).
CHOICE_KEYS = ("tie_standard_errors",)
# What decides the shared teacher: its run's fine-tune, not the sections of the stages after it.
TEACHER_SECTIONS = {"seed", "device", "model", "task", "finetune"}
# Recipe keys added after cells were measured, (section, key). A fingerprint leaves such a key out
# while it holds the value that does what eftnas did before it existed (`value_before_it_existed`,
# as run records do), so the cells measured before it stand.
ADDED_SINCE_CELLS = (("export", "finetune_learning_rate"), ("task", "search_split"))


class CellStore:
    """Finished cells, kept beside the report (`<out stem>_quality_cells.json`, committed with it), so the
    bench resumes in a later sitting, on another machine too: a cell is reused while the settings
    that decide it are unchanged, and a seed whose cells are all finished is not run again."""

    def __init__(self, path: Path):
        self.path = path
        self.cells = json.loads(path.read_text()) if path.is_file() else {}

    @staticmethod
    def key(task: str, seed: int, method: str, budget: float) -> str:
        return f"{task}/s{seed}/{method}/{budget:g}"

    def get(self, key: str, fingerprint: str) -> dict | None:
        entry = self.cells.get(key)
        return entry["cell"] if entry and entry["fingerprint"] == fingerprint else None

    def put(self, key: str, fingerprint: str, cell: dict) -> None:
        self.cells[key] = {"fingerprint": fingerprint, "cell": cell}
        write_json(self.path, self.cells)


def fingerprint(recipe: Recipe, teacher_recipe: Recipe, method: str, budget: float, polish_epochs: float) -> str:
    """What decides a cell: the settings of the seed's run that the method reads and the teacher's
    (paths and run names aside), the method, the budget and the code version. A setting a method
    does not read stays out, so adding or changing one keeps that method's cells."""
    run = recipe.model_dump(mode="json", exclude={"name", "output_dir"})
    run["model"].pop("teacher", None)
    for key in CHOICE_KEYS:
        run["search"].pop(key)
    if method not in READ_THE_SEARCH:
        del run["search"]
    if method not in READ_THE_SUPERNET:
        for key in SANDWICH_KEYS:
            del run["supernet"][key]
    if method != "eftnas+polish":
        del run["export"]  # only the polish reads it (export.finetune_*)
    teacher = teacher_recipe.model_dump(mode="json", include=TEACHER_SECTIONS)
    for section, key in ADDED_SINCE_CELLS:
        earlier = value_before_it_existed(type(getattr(recipe, section)).model_fields[key])
        for settings in (run, teacher):
            if section in settings and settings[section][key] == earlier:
                del settings[section][key]
    decided = {"version": CELL_VERSION, "method": method, "budget": budget, "run": run, "teacher": teacher,
               "polish_epochs": polish_epochs if method == "eftnas+polish" else None}
    if method == "eftnas+polish":
        decided["polish_version"] = POLISH_VERSION
    if method in READ_THE_SEARCH:
        decided["search_version"] = SEARCH_VERSION
        decided["choice"] = {key: getattr(recipe.search, key) for key in CHOICE_KEYS}
    return hashlib.sha256(json.dumps(decided, sort_keys=True).encode()).hexdigest()


def cell(context: SeedContext, method: str, budget: float, subnet: elastic.Subnet | None, metrics: dict | None,
         train_wall_s: float | None, **extra) -> dict:
    return {"method": method, "budget": budget, "metrics": metrics,
            "macs_ratio": None if subnet is None else context.macs_ratio(subnet),
            "subnet": None if subnet is None else subnet.to_dict(), "train_wall_s": train_wall_s,
            "device": context.device.type, **extra}  # cells of one report may come from several machines


def kd_train(context: SeedContext, student: torch.nn.Module, description: str, epochs: float | None = None,
             learning_rate: float | None = None) -> tuple[torch.nn.Module, float]:
    """`student` trained like the super-network (recipe.supernet) with KD from the teacher, for
    `epochs` and at `learning_rate` (default the super-network's); returns it and the training wall time."""
    section = context.recipe.supernet
    if epochs is not None:
        section = section.model_copy(update={"epochs": epochs, "max_steps": None})
    if learning_rate is not None:
        section = section.model_copy(update={"learning_rate": learning_rate})
    return distill(student, context.teacher, context.data, section, seed=context.recipe.seed,
                   device=context.recipe.device, description=description)


def kd_finetune(context: SeedContext, student: torch.nn.Module, description: str):
    """`kd_train`, then the validation metrics and the training wall time."""
    trained, wall = kd_train(context, student, description)
    return context.evaluate(trained), wall


def measure(context: SeedContext, method: str, budget: float, polish_epochs: float) -> dict:
    """One cell: `method` cut to `budget`, evaluated on the validation split (eftnas + polish: its
    subnet polished `polish_epochs`)."""
    supernet = context.supernet
    target = budget * supernet.full_macs

    def fits(subnet: elastic.Subnet) -> bool:
        return supernet.macs(subnet) <= target

    if method == "teacher":
        return cell(context, method, 1.0, elastic.full_subnet(context.teacher.config), context.evaluate(context.teacher), None)
    if method in ("eftnas", "eftnas+polish"):
        pareto = artifacts.load_pareto(context.run, by=BY)
        best = pareto.best(budget)
        if best is None:
            return cell(context, method, budget, None, None, None, note="the search found no subnet within this budget")
        subnet = elastic.Subnet.from_dict(best["subnet"])
        walls = context.stage_walls()
        pipeline_wall = sum(walls.get(s, 0.0) for s in EFTNAS_STAGES)
        if method == "eftnas+polish":
            polished = polish(supernet.extract(subnet), context.teacher, context.data, context.recipe,
                              search_rows_read=pareto.eval_rows, description=f"polish @ {budget:g}", epochs=polish_epochs)
            return cell(context, method, budget, subnet, context.evaluate(polished.model), pipeline_wall + polished.wall_s,
                        polish_wall_s=polished.wall_s, polish=polished.to_dict())
        metrics = supernet.evaluate(subnet, context.data.main_eval, context.data, context.recipe.search.eval_batch_size)
        return cell(context, method, budget, subnet, metrics, pipeline_wall, search_score=best["score"],
                    search_rows_read=pareto.eval_rows, stage_walls=walls)
    if method == "c":
        subnet = uniform_subnet(supernet.config, fits)
        metrics = supernet.evaluate(subnet, context.data.main_eval, context.data, context.recipe.search.eval_batch_size)
        return cell(context, method, budget, subnet, metrics, None)  # the super-network's training, nothing more
    if method in ("a", "b"):
        pruner = space_pruner(supernet.config, context.importance.heads, context.importance.neurons,
                              context.recipe.space)
        subnet = pruner.within(target)
        if method == "a":
            return cell(context, method, budget, subnet, context.evaluate(elastic.extract(context.teacher, subnet)), 0.0)
        metrics, wall = kd_finetune(context, elastic.extract(context.teacher, subnet), f"{METHODS[method]} @ {budget:g}")
        return cell(context, method, budget, subnet, metrics, wall)
    dropped = layer_drop_subnet(supernet.config, fits)
    if dropped is None:
        return cell(context, method, budget, None, None, None, note="not even one full layer fits this budget")
    subnet, kept = dropped
    metrics, wall = kd_finetune(context, elastic.extract(context.teacher, subnet), f"{METHODS[method]} @ {budget:g}")
    return cell(context, method, budget, subnet, metrics, wall, kept_layers=kept)


# ---- one task ----------------------------------------------------------------------------------
def task_overrides(task: str, args: argparse.Namespace) -> list[str]:
    samples = args.train_samples.get(task, DEFAULT_TRAIN_SAMPLES.get(task))
    budgets = sorted({*args.budgets, *args.extra_budgets}, reverse=True)
    # The space reaches down to the smallest budget, so that eftnas has a subnet at every one.
    return [f"task.name={task}", f"output_dir={args.run_root}", f"search.budgets={json.dumps(budgets)}",
            f"space.cmin={min(budgets)}", f"task.max_train_samples={'null' if samples is None else samples}",
            *args.overrides]


def cell_plan(args: argparse.Namespace) -> list[tuple[str, float]]:
    """(method, budget) of every cell of one seed."""
    plan = [("teacher", 1.0)]
    for budget in sorted({*args.budgets, *args.extra_budgets}, reverse=True):
        plan += [(method, budget) for method in METHODS if method != "teacher"
                 and (method not in TRAINED_PER_BUDGET or budget in args.budgets)
                 and (method != "eftnas+polish" or (args.polish_epochs > 0 and budget in args.polish_budgets))]
    return plan


def bench_task(task: str, args: argparse.Namespace, store: CellStore, device: torch.device) -> dict:
    base = task_overrides(task, args)
    teacher_recipe = load_recipe(args.recipe, [*base, f"name={task}-teacher"])
    teacher_run = RunDir(teacher_recipe)
    teacher_dir = str(teacher_run.stage_dir("finetune") / artifacts.MODEL_FOLDER)
    facts_key = (f"{task}/facts", fingerprint(teacher_recipe, teacher_recipe, "facts", 1.0, 0.0))
    cells, facts = [], store.get(*facts_key)
    seeds = task_seeds(task, args)
    for seed in seeds:
        recipe = load_recipe(args.recipe, [*base, f"name={task}-s{seed}", f"seed={seed}", f"model.teacher={teacher_dir}"])
        wanted = {(method, budget): (CellStore.key(task, seed, method, budget),
                                     fingerprint(recipe, teacher_recipe, method, budget, args.polish_epochs))
                  for method, budget in cell_plan(args)}
        # --remeasure: the cells of those methods are measured again in this sitting, whatever is kept.
        found = {cell_key: None if cell_key[0] in args.remeasure else store.get(*wanted[cell_key]) for cell_key in wanted}
        if any(value is None for value in found.values()) or facts is None:
            if not teacher_run.is_current("finetune"):
                console.rule(f"[bold]teacher[/bold] ({task})")
                run_pipeline(teacher_recipe, until="finetune")
            console.rule(f"[bold]eftnas pipeline[/bold] ({task}, seed {seed})")
            run_pipeline(recipe, until="search")
            context = load_context(recipe, device)
            if facts is None:
                facts = task_facts(context, teacher_run)
                store.put(*facts_key, facts)
            for (method, budget), value in found.items():
                if value is None:
                    key, decided = wanted[(method, budget)]
                    console.print(f"{key}: measuring")
                    found[(method, budget)] = measure(context, method, budget, args.polish_epochs)
                    store.put(key, decided, found[(method, budget)])
        cells += [{**value, "seed": seed} for value in found.values()]
    return {**facts, "seeds": seeds, "cells": cells}


def task_seeds(task: str, args: argparse.Namespace) -> list[int]:
    return args.seeds if args.seeds is not None else DEFAULT_SEEDS.get(task, OTHER_TASKS_SEEDS)


def search_rows_read(result: dict) -> str:
    """How many of the search rows each trial read, where the search did not read them all."""
    read = {c["search_rows_read"] for c in result["cells"] if "search_rows_read" in c}
    return f" (the search reads the first {', '.join(map(str, sorted(read)))})" if read and max(read) < result["search_rows"] else ""


def task_facts(context: SeedContext, teacher_run: RunDir) -> dict:
    """What the report says of a task besides its cells: split sizes, MACs scale, teacher cost."""
    return {
        "metric": context.data.spec.main_metric,
        "eval_split": context.data.main_split,
        "eval_rows": len(context.data.main_eval),
        "search_rows": len(context.data.search),
        "train_rows": len(context.data.train),
        "macs_seq_len": context.supernet.space.seq_len,
        "full_gmacs": context.supernet.full_macs / 1e9,
        "teacher_wall_s": teacher_run.record("finetune")["wall_time_s"],
        "recipe": context.recipe.model_dump(mode="json"),
    }


# ---- statistics --------------------------------------------------------------------------------
def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def scores(result: dict, method: str, budget: float, metric: str) -> dict[int, float]:
    """Seed → score (x100) of one method at one budget."""
    return {c["seed"]: 100 * c["metrics"][metric] for c in result["cells"]
            if c["method"] == method and c["budget"] == budget and c["metrics"] is not None}


def teacher_scores(result: dict, metric: str) -> dict[int, float]:
    return scores(result, "teacher", 1.0, metric)


def metric_names(result: dict) -> list[str]:
    """The main metric first, then the task's others (MRPC: F1)."""
    teacher = next(c for c in result["cells"] if c["method"] == "teacher")
    return [result["metric"], *sorted(set(teacher["metrics"]) - {result["metric"], "score"})]


def summary_entries(task: str, result: dict) -> list[dict]:
    """One entry per (budget, method, metric): mean, sd, seeds and the mean retention."""
    entries = []
    budgets = sorted({c["budget"] for c in result["cells"]}, reverse=True)
    for metric in metric_names(result):
        teacher = teacher_scores(result, metric)
        for budget in budgets:
            for method in METHODS:
                by_seed = scores(result, method, budget, metric)
                if not by_seed:
                    continue
                mean, sd = mean_sd(list(by_seed.values()))
                retention = [by_seed[s] / teacher[s] for s in by_seed if teacher.get(s, 0) > 0]
                entries.append({"task": task, "budget": budget, "method": method, "metric": metric,
                                "mean": mean, "sd": sd, "seeds": sorted(by_seed),
                                "retention_mean": statistics.mean(retention) if retention else None})
    return entries


def paired_difference(result: dict, method: str, budget: float, metric: str,
                      ours: str = "eftnas") -> tuple[float, float] | None:
    """Mean and sd over seeds of `ours` − `method` (same seeds), in points (x100)."""
    ours, theirs = scores(result, ours, budget, metric), scores(result, method, budget, metric)
    common_seeds = sorted(set(ours) & set(theirs))
    return mean_sd([ours[s] - theirs[s] for s in common_seeds]) if common_seeds else None


# ---- targets -------------------------------------------------------------------------------------
def retention_check(scope: str, method: str, entry: dict | None, need: float) -> common.TargetCheck:
    """`method` (its summary entry, None if unmeasured) keeps `need` % of the teacher."""
    kept = None if entry is None or entry["retention_mean"] is None else 100 * entry["retention_mean"]
    return common.TargetCheck(scope, f"{method} keeps >= {need:g}% of the teacher (mean)",
                              "-" if kept is None else f"{kept:.1f}%", None if kept is None else kept >= need)


def target_checks(task: str, result: dict, budgets: list[float]) -> list[common.TargetCheck]:
    metric = result["metric"]
    summary = {(e["method"], e["budget"]): e for e in summary_entries(task, result) if e["metric"] == metric}
    checks = []
    for budget in sorted({c["budget"] for c in result["cells"] if c["method"] == "eftnas"}, reverse=True):
        scope = f"{task} @ {budget:g}"
        ours = summary.get(("eftnas", budget))
        need = retention_target(budget)
        if need is not None:
            checks.append(retention_check(scope, "eftnas", ours, need))
        for method in BASELINES:
            difference = paired_difference(result, method, budget, metric)
            if difference is None:
                continue
            mean, sd = difference
            if method == "b":
                checks.append(common.TargetCheck(scope, f"eftnas >= (b) - {KD_MARGIN_POINTS:g} point (mean)",
                                                 f"{mean:+.2f} ± {sd:.2f}", mean >= -KD_MARGIN_POINTS))
            else:
                checks.append(common.TargetCheck(scope, f"eftnas beats ({method}) by more than the paired sd",
                                                 f"{mean:+.2f} ± {sd:.2f}", mean > sd))
        polished_kept = summary.get(("eftnas+polish", budget))
        if need is not None and polished_kept is not None and polished_kept["retention_mean"] is not None:
            checks.append(retention_check(scope, "eftnas + polish", polished_kept, need))
        polished = paired_difference(result, "b", budget, metric, ours="eftnas+polish")
        if polished is not None:
            checks.append(common.TargetCheck(scope, "eftnas + polish >= (b) (mean)",
                                             f"{polished[0]:+.2f} ± {polished[1]:.2f}", polished[0] >= 0))
    b_walls = [c["train_wall_s"] for c in result["cells"] if c["method"] == "b" and c["train_wall_s"]]
    e_walls = {c["seed"]: c["train_wall_s"] for c in result["cells"] if c["method"] == "eftnas" and c["train_wall_s"]}
    if b_walls and e_walls:
        ours, theirs = statistics.mean(e_walls.values()), 4 * statistics.mean(b_walls)
        checks.append(common.TargetCheck(task, "eftnas training time <= 4 x (b)'s (four budgets)",
                                         f"{common.format_duration(ours)} vs {common.format_duration(theirs)}",
                                         ours <= theirs))
    return checks


# ---- report ----------------------------------------------------------------------------------------
def score_table(task: str, result: dict, metric: str) -> str:
    entries = {(e["method"], e["budget"]): e for e in summary_entries(task, result) if e["metric"] == metric}
    budgets = sorted({budget for _, budget in entries if budget < 1}, reverse=True)
    rows = []
    for method, label in METHODS.items():
        cells = []
        for budget in [1.0] if method == "teacher" else budgets:
            entry = entries.get((method, budget))
            text = "-" if entry is None else f"{entry['mean']:.2f} ± {entry['sd']:.2f}"
            if entry is not None and method != "teacher" and entry["retention_mean"] is not None:
                text += f" ({100 * entry['retention_mean']:.1f}%)"
            cells.append(text)
        if method == "teacher":
            cells += [""] * (len(budgets) - 1)
        rows.append([label, *cells])
    headers = ["method", *(f"@ {b:g}" for b in budgets)]
    return common.markdown_table(headers, rows)


def difference_table(result: dict, metric: str) -> str:
    budgets = sorted({c["budget"] for c in result["cells"] if c["method"] == "eftnas"}, reverse=True)
    rows = []
    for method in BASELINES:
        row = [f"eftnas − {METHODS[method]}"]
        for budget in budgets:
            difference = paired_difference(result, method, budget, metric)
            row.append("-" if difference is None else f"{difference[0]:+.2f} ± {difference[1]:.2f}")
        rows.append(row)
    return common.markdown_table(["paired difference (points)", *(f"@ {b:g}" for b in budgets)], rows)


def compute_table(result: dict) -> str:
    rows = []
    eftnas = [c for c in result["cells"] if c["method"] == "eftnas" and c["train_wall_s"] is not None]
    if eftnas:
        per_seed = {c["seed"]: c for c in eftnas}
        walls = [c["train_wall_s"] for c in per_seed.values()]
        stages = {s: statistics.mean(c["stage_walls"].get(s, 0.0) for c in per_seed.values()) for s in EFTNAS_STAGES}
        rows.append(["eftnas (every budget at once)", common.format_duration(statistics.mean(walls)),
                     ", ".join(f"{s} {common.format_duration(w)}" for s, w in stages.items())])
    for method in ("eftnas+polish", *TRAINED_PER_BUDGET):
        # The polish's own fine-tune; its cells' train_wall_s include the eftnas pipeline too.
        polish = method == "eftnas+polish"
        wall_key, note = ("polish_wall_s", "one budget, on top of eftnas") if polish else ("train_wall_s", "one budget")
        for budget in sorted({c["budget"] for c in result["cells"] if c["method"] == method}, reverse=True):
            cells = [c for c in result["cells"] if c["method"] == method and c["budget"] == budget
                     and c.get(wall_key) is not None]
            if cells:
                choices = [c["polish"] for c in cells if "polish" in c]
                choice = ""
                if choices:
                    epochs = "/".join(map(str, sorted({len(c["epoch_scores"]) for c in choices})))
                    kept = sum(c["kept_epoch"] == 0 for c in choices)
                    unread = sum(c.get("start_competes", False) for c in choices)
                    choice = (f", {epochs} epoch(s); the unpolished weights kept in {kept} of {len(choices)} seeds "
                              f"({unread} compared on unread search rows)")
                rows.append([f"{METHODS[method]} @ {budget:g}", common.format_duration(statistics.mean(c[wall_key] for c in cells)),
                             note + choice])
    rows.append(["teacher (shared, once)", common.format_duration(result["teacher_wall_s"]), "finetune"])
    table = common.markdown_table(["what", "training wall time (mean over seeds)", "of which"], rows, align="lrl")
    devices = {}
    for c in result["cells"]:
        devices.setdefault(c.get("device", "unrecorded"), set()).add(c["seed"])
    if len(devices) > 1:  # wall times of different machines do not compare
        table += "\n\nCells measured on several devices: " + "; ".join(
            f"{device}: seeds {', '.join(map(str, sorted(seeds)))}" for device, seeds in sorted(devices.items())) + "."
    return table


def render_report(results: dict[str, dict], header: dict) -> str:
    lines = [
        "# Compression quality against baselines",
        "",
        "Generated by `scripts/bench_quality.py` from `docs/benchmarks_quality.json`; the latest run:",
        "",
        *common.provenance_lines(header),
        "",
        "Per task: one fine-tuned teacher, shared; per seed, everything after it (importance, space,",
        "super-network, search, and every baseline) runs again. Cells are mean ± sd over seeds of the",
        "validation score (x100) and, in brackets, the mean share of the teacher's. eftnas's subnet is",
        "chosen on search rows held out of the train split; the validation split is read once per final",
        "model. (a) the teacher pruned by one importance threshold, no retraining; (b) that architecture",
        "fine-tuned with KD like the super-network; (c) the super-network at a uniform width;",
        "(d) evenly spaced full layers of the teacher fine-tuned with KD like (b). (b) and (d) train",
        "once per budget, so they run at the main budgets only. eftnas + polish, eftnas's subnet fine-tuned",
        "with KD (`export.finetune_epochs`), trains per budget too: at the main budgets and at the",
        "extra budgets with a retention target.",
    ]
    for task, result in results.items():
        lines += [
            "",
            f"## {task.upper()}",
            "",
            f"Validation split `{result['eval_split']}` ({result['eval_rows']} rows); {result['train_rows']} train rows, "
            f"{result['search_rows']} search rows held out of train{search_rows_read(result)}; "
            f"seeds {', '.join(map(str, result['seeds']))}; "
            f"MACs at sequence length {result['macs_seq_len']} (dense encoder {result['full_gmacs']:.3g} GMACs).",
        ]
        for metric in metric_names(result):
            lines += ["", f"{metric}:", "", score_table(task, result, metric)]
        lines += ["", f"Paired differences ({result['metric']}, same seeds):", "", difference_table(result, result["metric"]),
                  "", "Training cost:", "", compute_table(result),
                  "", "Targets:", "", common.targets_table([common.TargetCheck(**c) for c in result["targets"]])]
    return "\n".join(lines) + "\n"


def merge_results(json_path: Path, new: dict[str, dict]) -> dict[str, dict]:
    """Earlier tasks of the JSON file plus this run's (which replace their own), with the summary."""
    results = json.loads(json_path.read_text()).get("tasks", {}) if json_path.is_file() else {}
    results.update(new)
    summary = [entry for task, result in results.items() if "cells" in result for entry in summary_entries(task, result)]
    write_json(json_path, {"summary": summary, "tasks": results})
    return {task: result for task, result in results.items() if "cells" in result}


# ---- command line --------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--tasks", nargs="+", default=["mrpc", "sst2"])
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help=f"seeds of every task (default {DEFAULT_SEEDS}, else {OTHER_TASKS_SEEDS})")
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.35],
                        help="MACs fractions of the dense encoder, for every method")
    parser.add_argument("--extra-budgets", nargs="*", type=float, default=[0.7, 0.25],
                        help="budgets for the methods that need no training of their own (eftnas, a, c)")
    parser.add_argument("--train-samples", nargs="*", default=[], metavar="TASK=N",
                        help=f"train rows per task (default {DEFAULT_TRAIN_SAMPLES}; N=all for the whole split)")
    # 2, as many as (b) trains: on search rows it scored +0.18 points over 1 epoch, mean of 2 tasks x 2
    # budgets x 3 seeds (docs/benchmarks_polish_epochs.md).
    parser.add_argument("--polish-epochs", type=float, default=2.0,
                        help="KD fine-tune epochs of eftnas's subnets (eftnas + polish); 0 skips that method")
    parser.add_argument("--polish-budgets", nargs="+", type=float, default=None,
                        help="budgets of eftnas + polish, among --budgets and --extra-budgets (default: --budgets "
                        "and the extra budgets with a retention target)")
    parser.add_argument("--remeasure", nargs="+", default=[], choices=[m for m in METHODS if m != "teacher"],
                        metavar="METHOD", help="measure these methods' cells again even where a kept cell is current, "
                        "e.g. `--remeasure b` to compare training wall times taken in one sitting on one machine")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--out", type=Path, default=None, help=f"markdown report (default {DEFAULT_OUT})")
    parser.add_argument("--run-root", type=Path, default=None,
                        help="where the runs go (default runs/bench; with --smoke a temporary folder)")
    parser.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE, help="the recipe every run derives from")
    parser.add_argument("--smoke", action="store_true", help="tiny random model and data in a temp folder")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, applied last")
    args = parser.parse_args(argv)
    # `--tasks mrpc key=value` hands the overrides to --tasks (nargs="+"): take them back.
    args.overrides = [task for task in args.tasks if "=" in task] + args.overrides
    args.tasks = [task for task in args.tasks if "=" not in task]
    unknown = [task for task in args.tasks if task not in TASKS]
    if unknown:
        parser.error(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    if any(not 0 < budget <= 1 for budget in [*args.budgets, *args.extra_budgets]):
        parser.error("budgets are fractions of the dense MACs in (0, 1]")
    if args.polish_budgets is None:
        args.polish_budgets = [*args.budgets, *(b for b in args.extra_budgets if retention_target(b) is not None)]
    elif not set(args.polish_budgets) <= {*args.budgets, *args.extra_budgets}:
        parser.error("--polish-budgets must be among --budgets and --extra-budgets")
    try:
        args.train_samples = {task: None if n == "all" else int(n)
                              for task, n in (item.split("=", 1) for item in args.train_samples)}
    except ValueError:
        parser.error("--train-samples takes TASK=N (N a number or 'all')")
    return args


def run(args: argparse.Namespace, scratch: Path | None) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        console.print("[red]error:[/red] --device cuda, but torch sees no GPU", soft_wrap=True)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if scratch is not None:
        # A given --run-root keeps the smoke run (inputs included) for a re-run to resume.
        root = args.run_root or scratch / "runs"
        recipe = root / "inputs" / "recipe.yaml"
        args.recipe = recipe if recipe.is_file() else common.write_smoke_recipe(
            root / "inputs", {"task.search_fraction": 0.25}, task=SMOKE_TASK)
        args.tasks, args.seeds, args.run_root = [SMOKE_TASK], SMOKE_SEEDS, root
        args.budgets, args.extra_budgets, args.train_samples = SMOKE_BUDGETS, SMOKE_EXTRA_BUDGETS, {SMOKE_TASK: None}
        args.polish_budgets = SMOKE_BUDGETS
        args.out = args.out or scratch / "benchmarks.md"
    args.run_root = args.run_root or Path("runs/bench")
    out = args.out or DEFAULT_OUT
    json_path = out.with_name(f"{out.stem}_quality.json")
    store = CellStore(out.with_name(f"{out.stem}_quality_cells.json"))

    checks = []
    for task in args.tasks:
        result = bench_task(task, args, store, device)
        result["provenance"] = common.provenance(device.type)
        result["targets"] = [c.as_dict() for c in target_checks(task, result, args.budgets)]
        checks += result["targets"]
        # Written after every task, so a later task's failure keeps the finished ones.
        report = render_report(merge_results(json_path, {task: result}), common.provenance(device.type))
        common.write_report(out, report)
    print(report)
    print(f"written: {out} and {json_path}")
    common.print_target_summary(checks)
    return 0


def main(argv: list[str] | None = None) -> int:
    return common.main_with_smoke(parse_args(argv), run, "eftnas-bench-quality-smoke-")


if __name__ == "__main__":
    sys.exit(main())
