"""Stage `search`: NSGA-II over the super-network's subnets, task metric vs MACs (and latency).

The objectives are a table (`OBJECTIVES`): the study's directions and name, the columns of
`trials.csv` and the N-dimensional Pareto front all derive from it, so adding one is one entry.
The study lives in an SQLite file of the run directory (`<run>/studies/`), outside the stage's
atomically replaced folder, so a re-run — or a crashed one — continues it; `--storage` points
several workers at one shared study instead. Outputs: every trial (`trials.csv`, `trials.json`),
the Pareto front and the best subnet per MACs budget (`pareto.json`, which export and the
benchmarks read), and `pareto.png`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna

from eftnas_cli import artifacts, elastic
from eftnas_cli.data import TaskData, recipe_task_data
from eftnas_cli.models import best_device, load_model, load_tokenizer
from eftnas_cli.plots import pareto_plot
from eftnas_cli.recipe import Recipe, SearchSection
from eftnas_cli.rundir import RunDir, holds_lock, write_json
from eftnas_cli.supernet import Supernet
from eftnas_cli.training import evaluate
from eftnas_cli.ui import console, percent_of, progress

BY = "search"
# Proposals per distinct subnet at most, before a search that keeps re-proposing seen subnets ends.
MAX_PROPOSALS_PER_TRIAL = 10
HEARTBEAT_S = 30  # a running trial's heartbeat: a trial silent for two is stale


class SubnetEvaluator:
    """Measures subnets of the super-network on the search rows (held out of the train split, see
    `task.search_fraction`); the first measure of a subnet's task metric is kept, so an objective
    that needs it again does not evaluate twice."""

    def __init__(self, supernet: Supernet, data: TaskData, section: SearchSection):
        self.supernet, self.data, self.section = supernet, data, section
        split = data.search
        self.rows = split.select(range(min(len(split), section.max_eval_samples or len(split))))
        self.metrics: dict[elastic.Subnet, dict[str, float]] = {}

    def task_metrics(self, subnet: elastic.Subnet) -> dict[str, float]:
        if subnet not in self.metrics:
            self.metrics[subnet] = self.supernet.evaluate(subnet, self.rows, self.data, self.section.eval_batch_size)
        return self.metrics[subnet]

    def latency_ms(self, subnet: elastic.Subnet) -> float:
        from eftnas_cli.deploy import model_input_names
        from eftnas_cli.latency import dummy_features, torch_latency

        model = self.supernet.model
        features = dummy_features(model_input_names(model), self.section.latency_batch_size,
                                  self.section.latency_seq_len, model.config.vocab_size)
        self.supernet.activate(subnet)
        try:
            device = str(next(model.parameters()).device)
            return torch_latency(model, features, runs=5, warmup=1, device=device).median_ms
        finally:
            self.supernet.activate(self.supernet.largest())


@dataclass(frozen=True)
class Objective:
    """One axis of the search: a name (its column and record key), a direction, how it is measured
    and when a recipe asks for it."""

    name: str
    direction: str  # "maximize" | "minimize"
    measure: Callable[[SubnetEvaluator, elastic.Subnet], float]
    wanted: Callable[[SearchSection], bool] = lambda section: True


OBJECTIVES = (
    Objective("score", "maximize", lambda evaluator, subnet: evaluator.task_metrics(subnet)["score"]),
    Objective("gmacs", "minimize", lambda evaluator, subnet: evaluator.supernet.macs(subnet) / 1e9),
    Objective("latency_ms", "minimize", SubnetEvaluator.latency_ms, wanted=lambda section: section.latency),
)


def objectives_for(section: SearchSection) -> list[Objective]:
    return [objective for objective in OBJECTIVES if objective.wanted(section)]


class SubnetObjective:
    """The Optuna objective: one trial's subnet, measured on every objective; identical subnets
    are measured once (a repeat copies the first trial's values)."""

    def __init__(self, evaluator: SubnetEvaluator, objectives: list[Objective], max_budget: float):
        self.evaluator, self.objectives, self.max_budget = evaluator, objectives, max_budget
        self.seen: dict[tuple, optuna.trial.FrozenTrial] = {}

    @property
    def space(self) -> elastic.SearchSpace:
        return self.evaluator.supernet.space

    def __call__(self, trial: optuna.Trial) -> tuple[float, ...]:
        params = {name: trial.suggest_categorical(name, choices) for name, choices in self.space.param_choices()}
        subnet = self.space.subnet_from_params(params)
        supernet = self.evaluator.supernet
        macs = supernet.macs(subnet)
        # NSGA-II prefers feasible subnets: those within the largest MACs budget (value <= 0).
        trial.set_constraint("macs_budget", macs / supernet.full_macs - self.max_budget)
        key = tuple(sorted(params.items()))
        if key in self.seen:
            for name, value in self.seen[key].user_attrs.items():
                trial.set_user_attr(name, value)
            return tuple(self.seen[key].values)
        values = {objective.name: objective.measure(self.evaluator, subnet) for objective in self.objectives}
        attrs = {"subnet": subnet.to_dict(), "macs": macs, "params": supernet.params(subnet),
                 "metrics": self.evaluator.task_metrics(subnet)}
        for name, value in attrs.items():
            trial.set_user_attr(name, value)
        return tuple(values.values())

    def remember(self, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state == optuna.trial.TrialState.COMPLETE:
            self.seen.setdefault(tuple(sorted(trial.params.items())), trial)


def dominates(a: dict, b: dict, objectives: list[Objective]) -> bool:
    """`a` is at least as good as `b` on every objective and better on one."""
    better = False
    for objective in objectives:
        sign = 1 if objective.direction == "maximize" else -1
        difference = sign * (a[objective.name] - b[objective.name])
        if difference < 0:
            return False
        better = better or difference > 0
    return better


def pareto_front(records: list[dict], objectives: list[Objective]) -> list[dict]:
    """Records no other record dominates on the objectives."""
    return [r for r in records if not any(dominates(other, r, objectives) for other in records)]


def best_per_budget(records: list[dict], budgets: list[float], full_macs: int) -> dict[str, dict | None]:
    """For each budget, the trial of highest score within it: the choice export and reports read."""
    return {artifacts.budget_key(b): artifacts.best_within_budget(records, b, full_macs) for b in budgets}


def trial_records(study: optuna.Study, objectives: list[Objective]) -> list[dict]:
    """One record per distinct subnet: its first trial (repeats carry the same values)."""
    records, seen = [], set()
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        key = tuple(sorted(trial.params.items()))
        if key in seen:
            continue
        seen.add(key)
        attrs = trial.user_attrs
        records.append({
            "trial": trial.number,
            **{objective.name: value for objective, value in zip(objectives, trial.values)},
            "macs": attrs["macs"],
            "params": attrs["params"],
            "metrics": attrs["metrics"],
            "subnet": attrs["subnet"],
        })
    return records


def _write_trials_csv(records: list[dict], objectives: list[Objective], full_macs: int, path: Path) -> None:
    metric_names = sorted({name for r in records for name in r["metrics"]} - {"score"})
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["trial", *(o.name for o in objectives), *metric_names, "macs_ratio", "params", "widths"])
        for r in records:
            writer.writerow([
                r["trial"], *(f"{r[o.name]:.6f}" for o in objectives),
                *(f"{r['metrics'].get(m, float('nan')):.6f}" for m in metric_names),
                f"{r['macs'] / full_macs:.4f}", r["params"], elastic.Subnet.from_dict(r["subnet"]).describe(),
            ])


def _open_study(recipe: Recipe, run: RunDir, objectives: list[Objective], rows, storage: str | None) -> optuna.Study:
    optuna.logging.set_verbosity(logging.WARNING)
    # Trials are only comparable for one super-network, space, set of evaluation rows and objectives.
    supernet_outputs = json.dumps(run.record("train-supernet")["outputs"], sort_keys=True)
    space_id = hashlib.sha256(f"{supernet_outputs}{rows._fingerprint}{len(rows)}".encode()).hexdigest()[:12]
    if storage is None:
        (run.path / "studies").mkdir(parents=True, exist_ok=True)
        storage = f"sqlite:///{(run.path / 'studies' / 'search.db').resolve()}"
    # A trial whose process was killed stops beating; Optuna then marks it failed (optimize checks
    # for stale trials), and the distinct-subnet count has it redone.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: stable since Optuna 2.9
        storage = optuna.storages.RDBStorage(storage, heartbeat_interval=HEARTBEAT_S, grace_period=2 * HEARTBEAT_S)
    extra = "".join(f"-{o.name}" for o in objectives[2:])  # beyond the two every search has
    return optuna.create_study(
        study_name=f"{recipe.name}-{space_id}{extra}",
        storage=storage,
        directions=[o.direction for o in objectives],
        sampler=optuna.samplers.NSGAIISampler(population_size=recipe.search.population, seed=recipe.seed),
        load_if_exists=True,
    )


@holds_lock("search")
def search(recipe: Recipe, storage: str | None = None) -> dict:
    """Runs (or continues) the NSGA-II study; writes trials.csv, pareto.json and pareto.png."""
    started = time.perf_counter()
    run = RunDir(recipe)
    section = recipe.search
    inputs = Supernet.input_files(run, by=BY)  # first: the upstream stage a user most likely lacks
    teacher_dir = artifacts.teacher_folder(recipe, run, by=BY)
    tokenizer = load_tokenizer(recipe.model.name)
    data = recipe_task_data(recipe, tokenizer)
    device = best_device(recipe.device)
    supernet = Supernet.load(run, data.spec, by=BY).to(device)
    full_macs = supernet.full_macs
    evaluator = SubnetEvaluator(supernet, data, section)
    objectives = objectives_for(section)
    objective = SubnetObjective(evaluator, objectives, max(section.budgets))
    teacher_metrics = evaluate(load_model(teacher_dir, data.spec).to(device), evaluator.rows, data.collator, data.spec,
                               section.eval_batch_size)

    study = _open_study(recipe, run, objectives, evaluator.rows, storage)
    for trial in study.get_trials(deepcopy=False):
        objective.remember(trial)
    if not study.trials:
        # Seed the first generation with the boundary subnets gen-space found within the budgets.
        for macs, subnet in supernet.space.target_subnets():
            if macs <= max(section.budgets) * full_macs * 1.02:
                study.enqueue_trial(supernet.space.params_of(subnet))
    # Trials count distinct subnets: NSGA-II re-proposes subnets it has seen, which cost no
    # evaluation (their first values are copied) and do not use up the budget of trials.
    wanted = min(section.trials, supernet.space.size())
    console.print(f"search: continuing the study, {len(objective.seen)} of {wanted} subnets already evaluated"
                  if objective.seen else f"search: starting a study of {wanted} subnets")
    with progress() as bar:
        task = bar.add_task("NSGA-II search", total=wanted, completed=len(objective.seen), status="")

        def report(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            objective.remember(trial)
            best = max((t.values[0] for t in study.best_trials), default=float("nan"))
            bar.update(task, completed=len(objective.seen), status=f"front {len(study.best_trials)} · best {best:.4f}")
            if len(objective.seen) >= wanted:
                study.stop()

        if len(objective.seen) < wanted:
            study.optimize(objective, n_trials=MAX_PROPOSALS_PER_TRIAL * wanted, callbacks=[report])

    records = trial_records(study, objectives)
    front = pareto_front(records, objectives)
    teacher = {"score": teacher_metrics["score"], "metrics": teacher_metrics, "macs": full_macs, "gmacs": full_macs / 1e9}
    result = {
        "metric": data.spec.main_metric,
        "objectives": {o.name: o.direction for o in objectives},
        "eval_rows": len(evaluator.rows),
        "eval_split": "search rows (held out of train)" if data.search_rows is not None else data.main_split,
        "full_macs": full_macs,
        "teacher": teacher,
        "front": sorted(front, key=lambda t: t["macs"]),
        "best_per_budget": best_per_budget(records, section.budgets, full_macs),
    }
    with run.stage("search", started) as out:
        for path in [*inputs, *artifacts.model_files(teacher_dir)]:
            out.add_input(path)
        _write_trials_csv(records, objectives, full_macs, out.dir / "trials.csv")
        write_json(out.dir / artifacts.TRIALS_FILE, records)
        write_json(out.dir / artifacts.PARETO_FILE, result)
        pareto_plot(records, front, teacher, data.spec.main_metric, out.dir / "pareto.png")
        out.metrics = {"trials": len(records), "front_size": len(front), "teacher_score": teacher["score"],
                       "best_per_budget": {b: (t and {"score": t["score"], "gmacs": t["gmacs"], "trial": t["trial"]})
                                           for b, t in result["best_per_budget"].items()}}
    _print_best(result)
    return out.metrics


def _print_best(result: dict) -> None:
    from rich.table import Table

    teacher = result["teacher"]
    table = Table(title=f"best subnet per budget ({result['metric']}, teacher {teacher['score']:.4f} at {teacher['gmacs']:.3f} GMACs)")
    for column in ("budget", "trial", "score", "% teacher", "GMACs", "MACs ratio", "widths (heads/neurons)"):
        table.add_column(column)
    for budget, best in result["best_per_budget"].items():
        if best is None:
            table.add_row(budget, "-", "no subnet within budget", "", "", "", "")
            continue
        table.add_row(budget, str(best["trial"]), f"{best['score']:.4f}", percent_of(best["score"], teacher["score"]),
                      f"{best['gmacs']:.3f}", f"{best['macs'] / result['full_macs']:.3f}",
                      elastic.Subnet.from_dict(best["subnet"]).describe())
    console.print(table)
