"""What stages hand each other: every file name, locator and loader of a run directory.

Stages import this module, never each other; only `stages/pipeline.py` knows their order. Each
locator takes `by`, the name of whoever asks, so that a missing or changed upstream output is an
`UpstreamError` naming the stage to run first (`RunDir.require`).

    finetune/model/                   teacher_folder          (finetune → importance, train-supernet, search, export)
    importance/importance.safetensors load_importance         (importance → gen-space, train-supernet, benchmarks)
    space/search_space.json           gen_space_file          (gen-space → train-supernet)
    supernet/model/ + search_space.json  supernet_folder, load_space  (train-supernet → search, export, benchmarks)
    search/pareto.json, trials.json   load_pareto, load_trials (search → export, benchmarks)
    export/<label>/, summary.json     export_label, load_export_summary (export → benchmarks)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from eftnas_cli.elastic import SearchSpace
from eftnas_cli.recipe import Recipe
from eftnas_cli.rundir import RunDir

MODEL_FOLDER = "model"  # the teacher's (finetune/) and the super-network's (supernet/) weights
IMPORTANCE_FILE = "importance.safetensors"
SPACE_FILE = "search_space.json"
PARETO_FILE = "pareto.json"
TRIALS_FILE = "trials.json"
EXPORT_SUMMARY_FILE = "summary.json"
EXPORT_LABEL_PREFIX = "budget-"


# ---- models ------------------------------------------------------------------------------------
def teacher_folder(recipe: Recipe, run: RunDir, *, by: str) -> str:
    """The fine-tuned teacher: the recipe's `model.teacher`, else this run's `finetune` output."""
    if recipe.model.teacher:
        return recipe.model.teacher
    return str(run.require("finetune", by=by) / MODEL_FOLDER)


def start_weights(recipe: Recipe, run: RunDir, start_from: str, *, by: str) -> str:
    """Where a training stage starts: the teacher's weights or the pretrained model."""
    return teacher_folder(recipe, run, by=by) if start_from == "teacher" else recipe.model.name


def model_files(folder: str | Path) -> list[Path]:
    """The files of a model folder a stage records as its inputs (none for a hub id)."""
    folder = Path(folder)
    return [p for p in (folder / "model.safetensors", folder / "config.json") if p.is_file()]


# ---- importance --------------------------------------------------------------------------------
@dataclass(frozen=True)
class UnitImportance:
    """Per-unit importance: heads [layers, heads] and FFN neurons [layers, neurons]; higher = keep."""

    heads: torch.Tensor
    neurons: torch.Tensor
    path: Path


def load_importance(run: RunDir, *, by: str) -> UnitImportance:
    from safetensors.torch import load_file

    path = run.require("importance", by=by) / IMPORTANCE_FILE
    scores = load_file(str(path))
    return UnitImportance(scores["heads"], scores["neurons"], path)


# ---- search space and super-network ------------------------------------------------------------
def gen_space_file(run: RunDir, *, by: str) -> Path:
    """The space gen-space generated (train-supernet copies it next to the weights it trains)."""
    return run.require("gen-space", by=by) / SPACE_FILE


def supernet_folder(run: RunDir, *, by: str) -> Path:
    """The trained super-network's weights: reordered, full size, loadable as a plain model."""
    return run.require("train-supernet", by=by) / MODEL_FOLDER


def supernet_space_file(run: RunDir, *, by: str) -> Path:
    """The space the super-network was trained on: the one search, export and benchmarks use."""
    return run.require("train-supernet", by=by) / SPACE_FILE


def load_space(run: RunDir, *, by: str) -> SearchSpace:
    return SearchSpace.load(supernet_space_file(run, by=by))


# ---- search ------------------------------------------------------------------------------------
def budget_key(budget: float) -> str:
    """How a MACs budget (fraction of the full model) is spelled in files and labels: 0.5 → "0.5"."""
    return f"{budget:g}"


def score_standard_error(score: float, rows: int) -> float:
    """The binomial standard error of a score measured on `rows` rows, sqrt(s(1 - s) / n): exact for
    accuracy, of the right size for the other metrics in [0, 1] (F1, exact match)."""
    return math.sqrt(max(score * (1 - score), 0.0) / rows)


def choose_within_budget(trials: list[dict], budget: float, full_macs: int, eval_rows: int,
                         tie_standard_errors: float) -> dict | None:
    """The search's choice for `budget`: among the trials whose MACs fit `budget` × `full_macs`,
    the one of most MACs whose score lies within `tie_standard_errors` standard errors of the best
    score among them (`score_standard_error` on the `eval_rows` search rows): the rows do not tell
    scores that close apart, and on held-out halves of the search rows the larger of such subnets
    scored higher (docs/benchmarks_choice.md)."""
    within = [t for t in trials if t["macs"] <= budget * full_macs]
    if not within:
        return None
    best = max(t["score"] for t in within)
    margin = tie_standard_errors * score_standard_error(best, eval_rows)
    return max((t for t in within if t["score"] >= best - margin), key=lambda t: (t["macs"], t["score"]))


@dataclass(frozen=True)
class ParetoRecord:
    """`search/pareto.json` (the teacher, the front and the choice per budget) and the trials it was
    chosen from (`search/trials.json`)."""

    data: dict
    trials: list[dict]

    @property
    def full_macs(self) -> int:
        return self.data["full_macs"]

    @property
    def eval_rows(self) -> int:
        return self.data["eval_rows"]

    @property
    def front(self) -> list[dict]:
        return self.data["front"]

    @property
    def teacher(self) -> dict:
        return self.data["teacher"]

    @property
    def mixed_precision(self) -> str:
        """The precision the trials were measured in (a pareto.json written before the key: fp32)."""
        return self.data.get("mixed_precision", "no")

    def best(self, budget: float) -> dict | None:
        """The search's choice for `budget`; a budget the search was not asked for gets the same
        rule (`choose_within_budget`) applied to the trials."""
        recorded = self.data["best_per_budget"]
        key = budget_key(budget)
        if key in recorded:
            return recorded[key]
        # A pareto.json written before the key chose the best score.
        tie_standard_errors = self.data.get("tie_standard_errors", 0.0)
        return choose_within_budget(self.trials, budget, self.full_macs, self.eval_rows, tie_standard_errors)


def load_pareto(run: RunDir, *, by: str) -> ParetoRecord:
    folder = run.require("search", by=by)
    return ParetoRecord(json.loads((folder / PARETO_FILE).read_text()), json.loads((folder / TRIALS_FILE).read_text()))


def load_trials(run: RunDir, *, by: str) -> list[dict]:
    return json.loads((run.require("search", by=by) / TRIALS_FILE).read_text())


# ---- export ------------------------------------------------------------------------------------
def export_label(budget: float) -> str:
    """The folder name of a budget's export under `export/`."""
    return EXPORT_LABEL_PREFIX + budget_key(budget)


def export_budget(label: str) -> float | None:
    """The budget of an export label, None for exports of a trial or a subnet file."""
    if not label.startswith(EXPORT_LABEL_PREFIX):
        return None
    try:
        return float(label.removeprefix(EXPORT_LABEL_PREFIX))
    except ValueError:
        return None


def load_export_summary(run: RunDir) -> dict:
    """`export/summary.json`: the teacher and every export's metrics, MACs and latencies ({} before
    any export). Exports accumulate: a later call keeps the earlier labels it does not redo."""
    path = run.stage_dir("export") / EXPORT_SUMMARY_FILE
    return json.loads(path.read_text()) if path.is_file() else {}

