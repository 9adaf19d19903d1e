"""Stage `search`: NSGA-II over the super-network's subnets, task metric vs MACs (and latency).

The objectives are a table (`OBJECTIVES`): the study's directions and name, the columns of
`trials.csv` and the N-dimensional Pareto front all derive from it, so adding one is one entry.
The study lives in an Optuna storage (`studies`): by default an SQLite file of the run directory
(`<run>/studies/`), outside the stage's atomically replaced folder, so a re-run — or a crashed
one — continues it; `--storage` (PostgreSQL, a journal file) lets workers on several machines
share one study, and `--workers N` starts N local workers. Workers claim each subnet in the study
before measuring it, so none is measured twice and the budget of trials counts for the whole
study. Outputs, written from the study's content alone by a worker that finds the study done:
every trial (`trials.csv`, `trials.json`), the Pareto front and the subnet chosen per MACs budget
(`pareto.json`, which export and the benchmarks read), and `pareto.png`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna

from eftnas_cli import artifacts, elastic, studies
from eftnas_cli.data import TaskData, recipe_task_data
from eftnas_cli.errors import UpstreamError, UserError
from eftnas_cli.models import best_device, load_model, load_tokenizer
from eftnas_cli.plots import pareto_plot
from eftnas_cli.recipe import Recipe, SearchSection
from eftnas_cli.rundir import RunDir, write_json
from eftnas_cli.supernet import Supernet
from eftnas_cli.training import autocast, evaluate, inference_precision
from eftnas_cli.ui import console, percent_of, progress
from eftnas_cli.workers import run_workers

BY = "search"
# Proposals per distinct subnet at most (per worker), before a search that keeps re-proposing seen subnets ends.
MAX_PROPOSALS_PER_TRIAL = 10
# Neighbours measured per step of a climb, before it starts again from the best subnet so far.
CLIMB_BATCH = 4
# Draws of spread-out random subnets per slot of the first generation, before the rest is left to NSGA-II.
DRAWS_PER_SLOT = 50
# gen-space's targets may land this much above a budget (space.tolerance's default).
TARGET_TOLERANCE = 1.02
# A trial's user attribute besides its measures: which worker measured it.
WORKER_ATTR = "worker"
WORKER = f"{socket.gethostname()}:{os.getpid()}"
# How long a worker whose study is done waits for another holder of the run directory's lock
# (another worker writing the same result, say) before it leaves the writing to a re-run.
WRITE_LOCK_WAIT_S = 120


class SubnetEvaluator:
    """Measures subnets of the super-network on the search rows (held out of the train split, see
    `task.search_fraction`, or `task.search_split`'s), in the section's precision
    (`search.mixed_precision`, resolved for the super-network's device); the first measure of a
    subnet's task metric is kept, so an objective that needs it again does not evaluate twice."""

    def __init__(self, supernet: Supernet, data: TaskData, section: SearchSection):
        self.supernet, self.data, self.section = supernet, data, section
        split = data.search
        self.rows = split.select(range(min(len(split), section.max_eval_samples or len(split))))
        self.device = next(supernet.model.parameters()).device
        self.precision = inference_precision(section.mixed_precision, self.device)
        self.metrics: dict[elastic.Subnet, dict[str, float]] = {}

    def task_metrics(self, subnet: elastic.Subnet) -> dict[str, float]:
        if subnet not in self.metrics:
            with autocast(self.precision, self.device):
                self.metrics[subnet] = self.supernet.evaluate(subnet, self.rows, self.data, self.section.eval_batch_size)
        return self.metrics[subnet]

    def model_metrics(self, model) -> dict[str, float]:
        """A dense model's task metrics measured like the trials' (the teacher's record)."""
        with autocast(self.precision, self.device):
            return evaluate(model.to(self.device), self.rows, self.data.collator, self.data.spec, self.section.eval_batch_size)

    def latency_ms(self, subnet: elastic.Subnet) -> float:
        from eftnas_cli.deploy import model_input_names
        from eftnas_cli.latency import dummy_features, torch_latency

        model = self.supernet.model
        features = dummy_features(model_input_names(model), self.section.latency_batch_size,
                                  self.section.latency_seq_len, model.config.vocab_size)
        self.supernet.activate(subnet)
        try:
            return torch_latency(model, features, runs=5, warmup=1, device=str(self.device)).median_ms
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
    """The Optuna objective: one trial's subnet, measured on every objective. The trial claims its
    subnet in the study before it measures (`studies`): a subnet some trial measured is a repeat
    (its values are copied), one that another worker is measuring or that would exceed the
    budget of `wanted` distinct subnets is withdrawn (the trial ends pruned)."""

    def __init__(self, evaluator: SubnetEvaluator, objectives: list[Objective], max_budget: float, wanted: int):
        self.evaluator, self.objectives, self.max_budget, self.wanted = evaluator, objectives, max_budget, wanted

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
        key = studies.subnet_key(params)
        trial.set_user_attr(studies.CLAIM_ATTR, key)  # written before the study is read: see `studies`
        state = studies.StudyState.read(trial.study)
        claim = state.decide(trial.number, key, self.wanted)
        if claim is studies.Claim.REPEAT:
            # The values tell the sampler; the records (`trial_records`) come from the measuring trial.
            measured = state.complete[key]
            trial.set_user_attr(studies.REPEAT_ATTR, measured.number)
            return tuple(measured.values)
        if claim is not studies.Claim.EVALUATE:
            raise optuna.TrialPruned(f"withdrawn: {claim.value}")
        values = {objective.name: objective.measure(self.evaluator, subnet) for objective in self.objectives}
        attrs = {"subnet": subnet.to_dict(), "macs": macs, "params": supernet.params(subnet),
                 "metrics": self.evaluator.task_metrics(subnet), WORKER_ATTR: WORKER}
        for name, value in attrs.items():
            trial.set_user_attr(name, value)
        return tuple(values.values())


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


def choose_per_budget(records: list[dict], budgets: list[float], full_macs: int, eval_rows: int,
                      tie_standard_errors: float) -> dict[str, dict | None]:
    """For each budget, the choice export and reports read (`artifacts.choose_within_budget`)."""
    return {artifacts.budget_key(b): artifacts.choose_within_budget(records, b, full_macs, eval_rows, tie_standard_errors)
            for b in budgets}


def trial_records(study: optuna.Study, objectives: list[Objective]) -> list[dict]:
    """One record per distinct subnet, from the trial that measured it (`StudyState`), in trial order."""
    return [{
        "trial": trial.number,
        **{objective.name: value for objective, value in zip(objectives, trial.values)},
        **{name: trial.user_attrs[name] for name in ("macs", "params", "metrics", "subnet")},
    } for trial in studies.StudyState.read(study).complete.values()]


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


def first_generation(supernet: Supernet, section: SearchSection, seed: int) -> list[elastic.Subnet]:
    """The subnets the study starts from, up to one population: gen-space's targets within the
    largest budget, then random subnets spread over the MACs range below it
    (`SearchSpace.sample_spread`). NSGA-II's own first generation draws each width uniformly,
    which piles subnets near the middle of the range, and its children stay near their parents:
    on MRPC none of 80 subnets lay between 25% and 35% of the MACs, and the 0.35 budget got
    the space's smallest subnet."""
    cap = max(section.budgets) * supernet.full_macs * TARGET_TOLERANCE
    targets = [subnet for macs, subnet in supernet.space.target_subnets() if macs <= cap]
    return supernet.spread_within(np.random.default_rng(seed), 0, cap, section.population,
                                  DRAWS_PER_SLOT * section.population, kept=targets)


def earlier_measuring_s(study: optuna.Study) -> float:
    """The wall time the study's complete trials took to measure, so that a search continuing a study
    (after a kill, or with another `search.tie_standard_errors`) records the work of every attempt:
    per worker, the sum of its trials' durations; workers measure side by side, so the longest."""
    per_worker: dict[str | None, float] = {}
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        worker = trial.user_attrs.get(WORKER_ATTR)
        per_worker[worker] = per_worker.get(worker, 0.0) + (trial.datetime_complete - trial.datetime_start).total_seconds()
    return max(per_worker.values(), default=0.0)


@dataclass
class Searcher:
    """What every worker of a search loads (the super-network, the search rows, the objectives),
    and what one study of them does: open, evaluate, write the result."""

    recipe: Recipe
    run: RunDir
    data: TaskData
    evaluator: SubnetEvaluator
    objectives: list[Objective]

    @classmethod
    def load(cls, recipe: Recipe) -> Searcher:
        run = RunDir(recipe)
        Supernet.input_files(run, by=BY)  # first: the upstream stage a user most likely lacks
        artifacts.teacher_folder(recipe, run, by=BY)
        data = recipe_task_data(recipe, load_tokenizer(recipe.model.name))
        supernet = Supernet.load(run, data.spec, by=BY).to(best_device(recipe.device))
        return cls(recipe, run, data, SubnetEvaluator(supernet, data, recipe.search), objectives_for(recipe.search))

    @property
    def supernet(self) -> Supernet:
        return self.evaluator.supernet

    @property
    def wanted(self) -> int:
        """The study's budget of trials, all workers together. Trials count distinct subnets: NSGA-II
        re-proposes subnets it has seen, which cost no evaluation and do not use up the budget."""
        return min(self.recipe.search.trials, self.supernet.space.size())

    def study_name(self) -> str:
        """Trials are only comparable for one super-network, set of evaluation rows, objectives and precision."""
        rows = self.evaluator.rows
        supernet_outputs = json.dumps(self.run.record("train-supernet")["outputs"], sort_keys=True)
        space_id = hashlib.sha256(f"{supernet_outputs}{rows._fingerprint}{len(rows)}".encode()).hexdigest()[:12]
        extra = "".join(f"-{o.name}" for o in self.objectives[2:])  # beyond the two every search has
        if self.evaluator.precision != "no":  # fp32 studies keep the names they had before the setting
            extra += f"-{self.evaluator.precision}"
        return f"{self.recipe.name}-{space_id}{extra}"

    def open_study(self, storage_url: str, shared: bool) -> optuna.Study:
        """Create or load the study. A lone worker's sampler is seeded by the recipe; workers that
        share a study (`shared`, or trials of another worker in progress) each seed theirs at
        random: a shared study's order depends on timing anyway, and equal seeds would have the
        workers propose the same subnets in lockstep."""
        optuna.logging.set_verbosity(logging.WARNING)
        section = self.recipe.search
        study = optuna.create_study(study_name=self.study_name(), storage=studies.open_storage(storage_url),
                                    directions=[o.direction for o in self.objectives], load_if_exists=True)
        studies.fail_stale_trials(study)
        shared = shared or bool(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)))
        study.sampler = optuna.samplers.NSGAIISampler(population_size=section.population,
                                                      seed=None if shared else self.recipe.seed)
        if not study.trials:
            for subnet in first_generation(self.supernet, section, self.recipe.seed):
                study.enqueue_trial(self.supernet.space.params_of(subnet))
        return study

    @staticmethod
    def status(state: studies.StudyState) -> str:
        best = max((trial.values[0] for trial in state.complete.values()), default=float("nan"))
        return f"best {best:.4f}"

    def phases(self) -> list[tuple[float | None, int]]:
        """(budget, distinct subnets the study holds at the phase's end): NSGA-II's exploration
        (budget None), then a climb per budget, smallest first, each `search.refine` × trials /
        budgets long. NSGA-II keeps at least one generation more than its first; a study too small
        for that only explores."""
        section, wanted = self.recipe.search, self.wanted
        budgets = sorted(section.budgets)
        per_budget = min(int(section.refine * wanted), max(0, wanted - 2 * section.population)) // len(budgets)
        explored = wanted - per_budget * len(budgets)
        return [(None, explored), *((budget, explored + per_budget * (k + 1)) for k, budget in enumerate(budgets))] \
            if per_budget else [(None, wanted)]

    def evaluate(self, study: optuna.Study, show: Callable[[studies.StudyState], None]) -> None:
        """Propose and measure subnets until the study holds `wanted` distinct ones (whoever measured
        them): NSGA-II first, then a climb around each budget's best subnet (`phases`)."""
        wanted = self.wanted
        objective = SubnetObjective(self.evaluator, self.objectives, max(self.recipe.search.budgets), wanted)
        state = studies.wait_for_budget(study, wanted, show)
        rows, held_out = len(self.evaluator.rows), len(self.data.search)
        reading = f"; each reads {rows} search rows" + (f" of {held_out} (search.max_eval_samples)" if rows < held_out else "")
        if self.evaluator.precision != "no":
            reading += f" in {self.evaluator.precision} (search.mixed_precision)"
        console.print((f"search: continuing the study, {len(state.complete)} of {wanted} subnets already evaluated"
                       if state.complete else f"search: starting a study of {wanted} subnets") + reading, soft_wrap=True)
        for budget, held in self.phases():
            objective.wanted = held
            if budget is None:
                self._optimize(study, objective, held, show, MAX_PROPOSALS_PER_TRIAL * held)
            else:
                self._climb(study, objective, budget, held, show)
        # A climb that ran out of neighbours left its trials unspent: NSGA-II spends them.
        objective.wanted = wanted
        self._optimize(study, objective, wanted, show, MAX_PROPOSALS_PER_TRIAL * wanted)

    def _optimize(self, study: optuna.Study, objective: SubnetObjective, held: int,
                  show: Callable[[studies.StudyState], None], proposals: int) -> None:
        """Run trials (enqueued ones first, then NSGA-II's) until the study holds `held` subnets."""
        def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            # A worker whose budget is all claimed by trials in progress waits for them instead of proposing.
            state = studies.wait_for_budget(study, held, show)
            show(state)
            if state.done(held):
                study.stop()

        state = studies.wait_for_budget(study, held, show)
        show(state)
        if not state.done(held):
            study.optimize(objective, n_trials=proposals, callbacks=[after_trial])

    def _climb(self, study: optuna.Study, objective: SubnetObjective, budget: float, held: int,
               show: Callable[[studies.StudyState], None]) -> None:
        """Measure unmeasured neighbours (`SearchSpace.neighbours`) within `budget` of the best
        subnets within it, best first, a few at a time so each batch starts from the best so far,
        until the study holds `held` subnets. NSGA-II's children mix parents from the whole front
        and land mid-range: on MRPC, after a spread first generation, 3 of 80 subnets (mean of 3 seeds)
        lay between 25% and 35% of the MACs."""
        space, supernet = self.supernet.space, self.supernet
        cap = budget * supernet.full_macs
        generator = np.random.default_rng([self.recipe.seed, round(budget * 1e6)])
        while not (state := studies.wait_for_budget(study, held, show)).done(held):
            within = sorted((trial for trial in state.complete.values() if trial.user_attrs["macs"] <= cap),
                            key=lambda trial: trial.values[0], reverse=True)
            batch = []
            for trial in within:
                fitting = [neighbour for neighbour in space.neighbours(space.subnet_from_params(trial.params))
                           if supernet.macs(neighbour) <= cap]
                batch = [params for params in map(space.params_of, fitting) if studies.subnet_key(params) not in state.claimed]
                if batch:
                    break
            if not batch:
                return  # every subnet within the budget and next to a measured one is measured
            order = generator.permutation(len(batch))[:min(CLIMB_BATCH, held - len(state.complete))]
            for index in order:
                study.enqueue_trial(batch[index])
            self._optimize(study, objective, held, show, len(order))

    def teacher(self, study: optuna.Study) -> dict:
        """The teacher's record, measured by the first writer and kept in the study, so every
        writer's pareto.json reads the same figures."""
        if "teacher" not in study.user_attrs:
            teacher_dir = artifacts.teacher_folder(self.recipe, self.run, by=BY)
            metrics = self.evaluator.model_metrics(load_model(teacher_dir, self.data.spec))
            full_macs = self.supernet.full_macs
            study.set_user_attr("teacher", {"score": metrics["score"], "metrics": metrics, "macs": full_macs,
                                            "gmacs": full_macs / 1e9})
        return study.user_attrs["teacher"]

    def write(self, study: optuna.Study, started: float) -> dict:
        """Write trials.csv, trials.json, pareto.json and pareto.png from the study's content alone,
        under the run directory's writer lock; any worker writing a done study writes the same files."""
        run, section, objectives = self.run, self.recipe.search, self.objectives
        with run.lock("search", wait_s=WRITE_LOCK_WAIT_S):
            inputs = Supernet.input_files(run, by=BY)
            if self.study_name() != study.study_name:
                raise UpstreamError(f"the super-network of {run.path} changed while the search ran: run `eftnas search` again")
            teacher_dir = artifacts.teacher_folder(self.recipe, run, by=BY)
            teacher = self.teacher(study)
            records = trial_records(study, objectives)
            front = pareto_front(records, objectives)
            full_macs = self.supernet.full_macs
            result = {
                "metric": self.data.spec.main_metric,
                "objectives": {o.name: o.direction for o in objectives},
                "eval_rows": len(self.evaluator.rows),
                "eval_split": self.data.search_source,
                "mixed_precision": self.evaluator.precision,
                "full_macs": full_macs,
                "teacher": teacher,
                "front": sorted(front, key=lambda t: t["macs"]),
                "tie_standard_errors": section.tie_standard_errors,
                # Each budget's choice; the key keeps its name, which earlier runs' readers know.
                "best_per_budget": choose_per_budget(records, section.budgets, full_macs, len(self.evaluator.rows),
                                                   section.tie_standard_errors),
            }
            if self._written_already(records, result):
                console.print(f"search: {run.stage_dir('search')} already holds this study's result")
                metrics = run.record("search")["metrics"]
            else:
                with run.stage("search", started) as out:
                    for path in [*inputs, *artifacts.model_files(teacher_dir)]:
                        out.add_input(path)
                    _write_trials_csv(records, objectives, full_macs, out.dir / "trials.csv")
                    write_json(out.dir / artifacts.TRIALS_FILE, records)
                    write_json(out.dir / artifacts.PARETO_FILE, result)
                    pareto_plot(records, front, teacher, self.data.spec.main_metric, out.dir / "pareto.png")
                    out.metrics = {"trials": len(records), "front_size": len(front), "teacher_score": teacher["score"],
                                   "best_per_budget": {b: (t and {"score": t["score"], "gmacs": t["gmacs"], "trial": t["trial"]})
                                                       for b, t in result["best_per_budget"].items()}}
                metrics = out.metrics
        _print_best(result)
        return metrics

    def _written_already(self, records: list[dict], result: dict) -> bool:
        """Another worker of the same study wrote these files (same recipe, inputs and content)."""
        folder = self.run.stage_dir("search")
        if not self.run.is_current("search"):
            return False
        written = [json.loads((folder / name).read_text()) for name in (artifacts.TRIALS_FILE, artifacts.PARETO_FILE)]
        return written == json.loads(json.dumps([records, result], default=str))


def search(recipe: Recipe, storage: str | None = None, workers: int = 1) -> dict:
    """Runs (or continues) the NSGA-II study in `workers` local processes, with the workers of
    other machines when `storage` is shared, then writes trials.csv, pareto.json and pareto.png.

    Workers measure subnets without the run directory's writer lock (they read the run directory
    and write only the study, whose storage orders its writers); the lock is taken to write
    `search/`, once the study holds its budget of trials."""
    if workers < 1:
        raise UserError(f"--workers {workers}: at least 1")
    started = time.perf_counter()
    searcher = Searcher.load(recipe)
    storage_url = storage or studies.default_storage_url(searcher.run.path)
    study = searcher.open_study(storage_url, shared=storage is not None or workers > 1)
    started -= earlier_measuring_s(study)
    if workers > 1 and studies.StudyState.read(study).done(searcher.wanted):
        console.print("search: the study holds its budget of trials already; no worker started")
    elif workers == 1:
        with progress() as bar:
            task = bar.add_task("NSGA-II search", total=searcher.wanted, status="")
            searcher.evaluate(study, lambda state: bar.update(task, completed=len(state.complete),
                                                              status=searcher.status(state)))
    else:
        def poll() -> tuple[int, str]:
            state = studies.StudyState.read(study)
            return len(state.complete), searcher.status(state)

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cores // workers)
        run_workers(_search_worker, (recipe, storage_url, threads), workers, "NSGA-II search", searcher.wanted, poll)
    return searcher.write(study, started)


def _search_worker(recipe: Recipe, storage_url: str, threads: int) -> None:
    """One of `--workers`' processes: measures subnets until the study is done; the parent writes."""
    import torch

    torch.set_num_threads(threads)  # the workers share the machine's cores
    searcher = Searcher.load(recipe)
    searcher.evaluate(searcher.open_study(storage_url, shared=True), show=lambda state: None)


def _print_best(result: dict) -> None:
    from rich.table import Table

    teacher = result["teacher"]
    table = Table(title=f"chosen subnet per budget ({result['metric']}, teacher {teacher['score']:.4f} at "
                        f"{teacher['gmacs']:.3f} GMACs)")
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
