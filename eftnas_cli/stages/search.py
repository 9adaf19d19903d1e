"""Stage `search`: NSGA-II over the super-network's subnets, task metric vs MACs (and latency).

The study lives in an SQLite file of the run directory (`<run>/studies/`), outside the stage's
atomically replaced folder, so a re-run — or a crashed one — continues it; `--storage` points
several workers at one shared study instead. Outputs: every trial (`trials.csv`), the Pareto front
and the best subnet per MACs budget (`pareto.json`), and `pareto.png`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import time
from pathlib import Path

import optuna

from eftnas_cli import elastic
from eftnas_cli.models import best_device, load_model, load_tokenizer
from eftnas_cli.plots import pareto_plot
from eftnas_cli.recipe import Recipe, SearchSection
from eftnas_cli.rundir import RunDir, write_json
from eftnas_cli.stages.common import first_eval_split, model_files, task_data, teacher_folder
from eftnas_cli.stages.gen_space import SPACE_FILE, SearchSpace
from eftnas_cli.stages.train_supernet import supernet_folder
from eftnas_cli.training import evaluate
from eftnas_cli.ui import console, progress

PARETO_FILE = "pareto.json"
TRIALS_FILE = "trials.json"


def subnet_params(space: SearchSpace) -> list[tuple[str, str, list[int]]]:
    """(parameter name, unit, choices) for every elastic width: what a trial suggests."""
    return [(f"layer{index}.{unit}", unit, choice[unit]) for index, choice in enumerate(space.choices)
            for unit in ("heads", "neurons")]


def subnet_from_params(space: SearchSpace, params: dict) -> elastic.Subnet:
    return elastic.Subnet(tuple(
        elastic.LayerWidth(int(params[f"layer{i}.heads"]), int(params[f"layer{i}.neurons"]))
        for i in range(len(space.choices))
    ))


def describe(subnet: elastic.Subnet) -> str:
    """Compact widths: `heads/neurons` per layer."""
    return " ".join(f"{layer.heads}/{layer.neurons}" for layer in subnet.layers)


class SubnetObjective:
    """Evaluates one trial's subnet on the validation rows; identical subnets are scored once."""

    def __init__(self, model, space: SearchSpace, data, section: SearchSection, full_macs: int):
        self.model, self.space, self.data, self.section, self.full_macs = model, space, data, section, full_macs
        split = data.eval[first_eval_split(data)]
        self.rows = split.select(range(min(len(split), section.max_eval_samples or len(split))))
        self.seen: dict[tuple, optuna.trial.FrozenTrial] = {}

    def __call__(self, trial: optuna.Trial) -> tuple[float, ...]:
        params = {name: trial.suggest_categorical(name, choices) for name, _, choices in subnet_params(self.space)}
        subnet = subnet_from_params(self.space, params)
        macs = elastic.macs(self.model.config, subnet, self.space.seq_len).encoder
        # NSGA-II prefers feasible subnets: those within the largest MACs budget (value <= 0).
        trial.set_constraint("macs_budget", macs / self.full_macs - max(self.section.budgets))
        key = tuple(sorted(params.items()))
        if key in self.seen:
            for name, value in self.seen[key].user_attrs.items():
                trial.set_user_attr(name, value)
            return tuple(self.seen[key].values)
        elastic.activate(self.model, subnet)
        metrics = evaluate(self.model, self.rows, self.data.collator, self.data.spec, self.section.eval_batch_size)
        attrs = {
            "subnet": subnet.to_dict(),
            "macs": macs,
            "params": elastic.count_params(self.model.config, subnet).encoder,
            "metrics": metrics,
        }
        values = [metrics["score"], macs / 1e9]
        if self.section.latency:
            attrs["latency_ms"] = self._latency_ms()
            values.append(attrs["latency_ms"])
        for name, value in attrs.items():
            trial.set_user_attr(name, value)
        return tuple(values)

    def _latency_ms(self) -> float:
        from eftnas_cli.deploy import model_input_names
        from eftnas_cli.latency import dummy_features, torch_latency

        features = dummy_features(
            model_input_names(self.model), self.section.latency_batch_size, self.section.latency_seq_len,
            self.model.config.vocab_size,
        )
        device = str(next(self.model.parameters()).device)
        return torch_latency(self.model, features, runs=5, warmup=1, device=device).median_ms

    def remember(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state == optuna.trial.TrialState.COMPLETE:
            self.seen[tuple(sorted(trial.params.items()))] = trial


def best_per_budget(trials: list[dict], budgets: list[float], full_macs: int) -> dict[str, dict | None]:
    """For each budget, the trial of highest score within it (fewer MACs breaks ties)."""
    best = {}
    for budget in budgets:
        within = [t for t in trials if t["macs"] <= budget * full_macs]
        best[f"{budget:g}"] = max(within, key=lambda t: (t["score"], -t["macs"])) if within else None
    return best


def pareto_front(trials: list[dict]) -> list[dict]:
    """Trials no other trial beats on both score (higher) and MACs (lower)."""
    return [t for t in trials if not any(
        o["score"] >= t["score"] and o["macs"] <= t["macs"] and (o["score"] > t["score"] or o["macs"] < t["macs"])
        for o in trials
    )]


def _trial_records(study: optuna.Study) -> list[dict]:
    records = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        attrs = trial.user_attrs
        records.append({
            "trial": trial.number,
            "score": attrs["metrics"]["score"],
            "macs": attrs["macs"],
            "gmacs": attrs["macs"] / 1e9,
            "params": attrs["params"],
            "latency_ms": attrs.get("latency_ms"),
            "metrics": attrs["metrics"],
            "subnet": attrs["subnet"],
        })
    return records


def _write_trials_csv(records: list[dict], full_macs: int, path: Path) -> None:
    metric_names = sorted({name for r in records for name in r["metrics"]})
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["trial", "score", *metric_names, "gmacs", "macs_ratio", "params", "latency_ms", "widths"])
        for r in records:
            writer.writerow([
                r["trial"], f"{r['score']:.6f}", *(f"{r['metrics'].get(m, float('nan')):.6f}" for m in metric_names),
                f"{r['gmacs']:.6f}", f"{r['macs'] / full_macs:.4f}", r["params"],
                "" if r["latency_ms"] is None else f"{r['latency_ms']:.3f}",
                describe(elastic.Subnet.from_dict(r["subnet"])),
            ])


def search(recipe: Recipe, storage: str | None = None) -> dict:
    """Runs (or continues) the NSGA-II study; writes trials.csv, pareto.json and pareto.png."""
    started = time.perf_counter()
    run = RunDir(recipe)
    section = recipe.search
    supernet_dir = supernet_folder(run, by="search")
    space_file = run.stage_dir("train-supernet") / SPACE_FILE
    space = SearchSpace.load(space_file)
    teacher_dir = teacher_folder(recipe, run, by="search")
    tokenizer = load_tokenizer(recipe.model.name)
    data = task_data(recipe, tokenizer)
    device = best_device(recipe.device)
    model = elastic.make_elastic(load_model(str(supernet_dir), data.spec)).to(device)
    full_macs = elastic.macs(model.config, None, space.seq_len).encoder
    objective = SubnetObjective(model, space, data, section, full_macs)
    teacher_metrics = evaluate(load_model(teacher_dir, data.spec).to(device), objective.rows, data.collator, data.spec,
                               section.eval_batch_size)

    optuna.logging.set_verbosity(logging.WARNING)
    # Trials are only comparable for one super-network, space and set of evaluation rows.
    supernet_outputs = json.dumps(run.record("train-supernet")["outputs"], sort_keys=True)
    space_id = hashlib.sha256(f"{supernet_outputs}{len(objective.rows)}".encode()).hexdigest()[:12]
    if storage is None:
        (run.path / "studies").mkdir(parents=True, exist_ok=True)
        storage = f"sqlite:///{(run.path / 'studies' / 'search.db').resolve()}"
    directions = ["maximize", "minimize"] + (["minimize"] if section.latency else [])
    study = optuna.create_study(
        study_name=f"{recipe.name}-{space_id}{'-latency' if section.latency else ''}",
        storage=storage,
        directions=directions,
        sampler=optuna.samplers.NSGAIISampler(population_size=section.population, seed=recipe.seed),
        load_if_exists=True,
    )
    for trial in study.get_trials(deepcopy=False):
        objective.remember(study, trial)
    if not study.trials:
        # Seed the first generation with the boundary subnets gen-space found within the budgets.
        for target in space.targets:
            if target["macs"] <= max(section.budgets) * full_macs * 1.02:
                layers = target["subnet"]["layers"]
                study.enqueue_trial({f"layer{i}.{u}": w[u] for i, w in enumerate(layers) for u in ("heads", "neurons")})
    done = len([t for t in study.trials if t.state.is_finished()])
    remaining = max(section.trials - done, 0)
    with progress() as bar:
        task = bar.add_task("NSGA-II search", total=section.trials, completed=done, status="")

        def report(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            objective.remember(study, trial)
            best = max((t.values[0] for t in study.best_trials), default=float("nan"))
            bar.update(task, advance=1, status=f"front {len(study.best_trials)} · best {best:.4f}")

        study.optimize(objective, n_trials=remaining, callbacks=[report])

    records = _trial_records(study)
    front = pareto_front(records)
    teacher = {"score": teacher_metrics["score"], "metrics": teacher_metrics, "macs": full_macs, "gmacs": full_macs / 1e9}
    result = {
        "metric": data.spec.main_metric,
        "eval_rows": len(objective.rows),
        "full_macs": full_macs,
        "teacher": teacher,
        "front": sorted(front, key=lambda t: t["macs"]),
        "best_per_budget": best_per_budget(records, section.budgets, full_macs),
    }
    with run.stage("search", started) as out:
        for path in [*model_files(supernet_dir), space_file, *model_files(teacher_dir)]:
            out.add_input(path)
        _write_trials_csv(records, full_macs, out.dir / "trials.csv")
        write_json(out.dir / TRIALS_FILE, records)
        write_json(out.dir / PARETO_FILE, result)
        pareto_plot(records, front, teacher, data.spec.main_metric, out.dir / "pareto.png")
        out.metrics = {"trials": len(records), "front_size": len(front), "teacher_score": teacher["score"],
                       "best_per_budget": {b: (t and {"score": t["score"], "gmacs": t["gmacs"], "trial": t["trial"]})
                                           for b, t in result["best_per_budget"].items()}}
    _print_best(result)
    return out.metrics


def percent_of(score: float, reference: float) -> str:
    return f"{100 * score / reference:.1f}%" if reference > 0 else "-"


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
                      describe(elastic.Subnet.from_dict(best["subnet"])))
    console.print(table)
