"""Compression quality against baselines, at equal MACs budgets.

For each GLUE task, the eftnas pipeline (configs/quickstart.yaml, one run per task, resumable) and
four baselines cut to the same budgets (fractions of the dense encoder's MACs):

  (a) pruned, no retraining   the teacher reordered by the run's importance and pruned by one
                              importance threshold (gen-space's ThresholdPruner) to the budget
  (b) pruned + KD fine-tune   (a)'s architecture fine-tuned with KD from the teacher for as many
                              epochs as the super-network got (recipe.supernet settings)
  (c) uniform width           the run's super-network keeping the same fraction of heads and
                              neurons in every layer (DynaBERT-style), the largest that fits
  (d) layer drop + KD         k evenly spaced layers of the teacher (DistilBERT-style), the largest
                              k that fits, fine-tuned like (b)

Every model is evaluated with `training.evaluate` on the task's validation set; the eftnas row is
the search's best subnet per budget (the export's metrics when it exported that subnet). Writes a
markdown report (default docs/benchmarks.md) and its raw results (docs/benchmarks_quality.json,
merged per task: run one task at a time and the file accumulates), prints both tables and whether
the targets hold.

    python scripts/bench_quality.py [--tasks mrpc sst2 cola] [--budgets 0.5 0.35] [--device cpu|cuda]
        [--train-samples N] [--out docs/benchmarks.md] [--run-root runs/bench] [--smoke] [key=value ...]

Trailing key=value arguments override the recipe (after the bench's own settings), e.g.
`supernet.epochs=1 search.trials=60`. `--smoke` checks the script end to end in seconds on a tiny
random model and synthetic data in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import _bench_common as common

# Must precede the torch imports below: see hide_gpus_if_cpu_requested.
common.hide_gpus_if_cpu_requested(sys.argv[1:])

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from eftnas_cli import elastic  # noqa: E402
from eftnas_cli.data import TASKS  # noqa: E402
from eftnas_cli.models import load_model, load_tokenizer  # noqa: E402
from eftnas_cli.recipe import Recipe, load_recipe  # noqa: E402
from eftnas_cli.rundir import RunDir, sha256, write_json  # noqa: E402
from eftnas_cli.stages.common import first_eval_split, task_data, teacher_folder  # noqa: E402
from eftnas_cli.stages.gen_space import BISECTION_STEPS, ThresholdPruner  # noqa: E402
from eftnas_cli.stages.importance import IMPORTANCE_FILE  # noqa: E402
from eftnas_cli.stages.pipeline import run_pipeline  # noqa: E402
from eftnas_cli.stages.search import PARETO_FILE, describe  # noqa: E402
from eftnas_cli.stages.train_supernet import supernet_folder  # noqa: E402
from eftnas_cli.training import QuietTrainer, RichProgress, distillation_loss, evaluate, training_arguments  # noqa: E402
from eftnas_cli.ui import console  # noqa: E402

DEFAULT_RECIPE = common.REPO_ROOT / "configs" / "quickstart.yaml"
DEFAULT_OUT = Path("docs/benchmarks.md")
BY = "bench_quality.py"  # how upstream-stage errors name the requester
SMOKE_TASK, SMOKE_BUDGET = "mrpc", 0.6

METHODS = {
    "teacher": "teacher (dense)",
    "eftnas": "eftnas (searched subnet)",
    "pruned": "(a) pruned, no retraining",
    "pruned_kd": "(b) pruned + KD fine-tune",
    "uniform": "(c) uniform width (super-network)",
    "layer_drop_kd": "(d) layer drop + KD",
}
# Stages whose wall time is eftnas's training cost: export only converts and measures.
TRAINING_STAGES = ("finetune", "importance", "gen-space", "train-supernet", "search")
# The best subnet must stay within this many metric points (x100) of baseline (b).
KD_MARGIN_POINTS = 0.5
# A save step that never comes: the KD baselines keep their final weights, no checkpoints.
NEVER = 10**9


def retention_target(task: str, budget: float) -> float:
    """% of the teacher's metric the best subnet must keep at `budget` (the issue's targets).

    Budgets above 0.5 (e.g. the smoke run's) get the 0.5 target: more MACs should not do worse.
    """
    if budget <= 0.35:
        return 97.0
    return 97.0 if task == "cola" else 99.0


# ---- one task's shared inputs ------------------------------------------------------------------
@dataclass
class TaskContext:
    """What every method of one task reads: the run, its data, the teacher and the MACs scale."""

    recipe: Recipe
    run: RunDir
    data: object  # eftnas_cli.data.TaskData
    split: object  # the tokenized validation split every method is evaluated on
    teacher: torch.nn.Module  # reordered by importance (same function), on `device`
    head_scores: torch.Tensor
    neuron_scores: torch.Tensor
    full_macs: int
    device: torch.device

    @property
    def seq_len(self) -> int:
        # The search space's sequence length: the one pareto.json's MACs are counted at.
        return self.recipe.space.seq_len

    @property
    def pipeline_training_wall_s(self) -> float:
        walls = stage_wall_times(self.run)
        return sum(walls.get(stage, 0.0) for stage in TRAINING_STAGES)

    def macs(self, subnet: elastic.Subnet | None) -> int:
        return elastic.macs(self.teacher.config, subnet, self.seq_len).encoder

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        return evaluate(model.to(self.device), self.split, self.data.collator, self.data.spec,
                        self.recipe.search.eval_batch_size)


def load_context(recipe: Recipe, device: torch.device) -> tuple[TaskContext, dict]:
    """The task's context plus the teacher's metrics (evaluated before reordering, to the bit)."""
    run = RunDir(recipe)
    tokenizer = load_tokenizer(recipe.model.name)
    data = task_data(recipe, tokenizer)
    split = data.eval[first_eval_split(data)]
    teacher = load_model(teacher_folder(recipe, run, by=BY), data.spec).to(device).eval()
    teacher_metrics = evaluate(teacher, split, data.collator, data.spec, recipe.search.eval_batch_size)
    scores = load_file(str(run.require("importance", by=BY) / IMPORTANCE_FILE))
    # Most important units first, as in the super-network: every baseline cut keeps the best units.
    elastic.reorder(teacher, list(scores["heads"]), list(scores["neurons"]))
    full_macs = elastic.macs(teacher.config, None, recipe.space.seq_len).encoder
    context = TaskContext(recipe, run, data, split, teacher, scores["heads"], scores["neurons"], full_macs, device)
    return context, teacher_metrics


def result_row(context: TaskContext, method: str, budget: float | None, subnet: elastic.Subnet | None,
               metrics: dict | None, train_wall_s: float | None, **extra) -> dict:
    """One table row; `metrics` None means the method has no model within the budget."""
    return {
        "method": method,
        "budget": budget,
        "score": None if metrics is None else metrics["score"],
        "metrics": metrics,
        "macs_ratio": None if subnet is None else context.macs(subnet) / context.full_macs,
        "train_wall_s": train_wall_s,
        "subnet": None if subnet is None else subnet.to_dict(),
        **extra,
    }


# ---- eftnas (the pipeline) -----------------------------------------------------------------------
def stage_wall_times(run: RunDir) -> dict[str, float]:
    return {stage: record["wall_time_s"] for stage, record in run.manifest()["stages"].items()}


def eftnas_rows(context: TaskContext, budgets: list[float]) -> list[dict]:
    """The search's best subnet per budget; its export's full-validation metrics when exported."""
    pareto = json.loads((context.run.require("search", by=BY) / PARETO_FILE).read_text())
    summary_file = context.run.stage_dir("export") / "summary.json"
    exports = json.loads(summary_file.read_text())["exports"] if summary_file.is_file() else {}
    training_wall = context.pipeline_training_wall_s
    rows = []
    for budget in budgets:
        best = pareto["best_per_budget"].get(f"{budget:g}")
        if best is None:
            rows.append(result_row(context, "eftnas", budget, None, None, training_wall,
                                   note="the search found no subnet within this budget"))
            continue
        exported = exports.get(f"budget-{budget:g}")
        if exported is not None and exported["subnet"] == best["subnet"]:
            metrics, source, rows_seen = exported["metrics"], "export", len(context.split)
        else:
            metrics, source, rows_seen = best["metrics"], "search", pareto["eval_rows"]
        rows.append(result_row(context, "eftnas", budget, elastic.Subnet.from_dict(best["subnet"]), metrics,
                               training_wall, metrics_from=source, eval_rows=rows_seen, trial=best["trial"],
                               stage_wall_s=stage_wall_times(context.run)))
    return rows


# ---- baselines -----------------------------------------------------------------------------------
def prune_within_budget(pruner: ThresholdPruner, target_macs: float) -> elastic.Subnet:
    """The subnet of the lowest importance threshold whose MACs fit `target_macs`.

    `fit` picks the threshold closest to the target, which may land just above it; the budget is
    a ceiling here, so the threshold is then raised (bisection) until the subnet fits.
    """
    threshold, subnet, cost = pruner.fit(target_macs)
    if cost <= target_macs:
        return subnet
    low, high = threshold, 1.0  # importance is a sigmoid: threshold 1 keeps nothing, which fits
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        if pruner.macs(pruner.subnet(middle)) <= target_macs:
            high = middle
        else:
            low = middle
    return pruner.subnet(high)


def uniform_subnet(config, fits) -> elastic.Subnet:
    """The same fraction of heads and neurons in every layer, the largest whose subnet `fits`.

    Rounding keeps MACs non-decreasing in the fraction, so bisection finds the largest.
    """
    dims = elastic.encoder_dims(config)

    def at(fraction: float) -> elastic.Subnet:
        width = elastic.LayerWidth(round(fraction * dims.heads), round(fraction * dims.neurons))
        return elastic.Subnet((width,) * dims.num_layers)

    if fits(at(1.0)):
        return at(1.0)
    low, high = 0.0, 1.0
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        low, high = (middle, high) if fits(at(middle)) else (low, middle)
    return at(low)


def evenly_spaced_layers(num_layers: int, keep: int) -> list[int]:
    """`keep` of `num_layers` layers (0-based), each at the middle of its share of the depth,
    rounded down: 3 of 6 keeps 0, 2, 4 (DistilBERT's every other layer), 2 of 6 keeps 1, 4."""
    share = num_layers / keep
    return [math.floor((index + 0.5) * share - 0.5) for index in range(keep)]


def layer_drop_subnet(config, fits) -> tuple[elastic.Subnet, list[int]] | None:
    """The most evenly spaced full layers that fit; dropped layers keep 0 heads and 0 neurons,
    which the elastic core skips. None when not even one layer fits."""
    dims = elastic.encoder_dims(config)
    for keep in range(dims.num_layers, 0, -1):
        kept = evenly_spaced_layers(dims.num_layers, keep)
        full, dropped = elastic.LayerWidth(dims.heads, dims.neurons), elastic.LayerWidth(0, 0)
        subnet = elastic.Subnet(tuple(full if index in kept else dropped for index in range(dims.num_layers)))
        if fits(subnet):
            return subnet, kept
    return None


class DistillationTrainer(QuietTrainer):
    """Fine-tunes one dense student with the super-network's loss (`training.distillation_loss`:
    KD from the frozen teacher mixed with the hard labels), for the KD baselines."""

    # The loss is a per-batch mean, not normalized by `num_items_in_batch`: let the Trainer divide
    # it by the gradient-accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, *args, teacher, spec, section, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.to(self.args.device).eval().requires_grad_(False)
        self.spec, self.section = spec, section

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        with torch.no_grad():
            teacher_logits = self.teacher(**inputs).logits
        outputs = model(**inputs)
        loss = distillation_loss(outputs.logits, teacher_logits, labels, self.spec,
                                 self.section.distillation_weight, self.section.temperature)
        return (loss, outputs) if return_outputs else loss


def kd_finetune(context: TaskContext, student: torch.nn.Module, description: str) -> tuple[torch.nn.Module, float]:
    """`student` trained like the super-network (recipe.supernet: epochs, lr, batch, KD weight and
    temperature) from the teacher; returns it and the training wall time in seconds."""
    section = context.recipe.supernet
    # Extraction copies requires_grad from its source, and the KD teacher is frozen.
    student.requires_grad_(True)
    with tempfile.TemporaryDirectory(prefix="eftnas-bench-kd-") as scratch:
        trainer = DistillationTrainer(
            model=student,
            args=training_arguments(section, Path(scratch), context.recipe.seed, save_steps=NEVER),
            train_dataset=context.data.train,
            data_collator=context.data.collator,
            callbacks=[RichProgress(description)],
            teacher=context.teacher,
            spec=context.data.spec,
            section=section,
        )
        started = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - started
    return trainer.model.eval(), wall


class KDResultCache:
    """Finished KD baselines of a run (`<run>/bench/kd_baselines.json`), so that a re-run of the
    bench, like the pipeline, does not train them again. An entry is reused only when everything
    that decides it is unchanged: teacher, importance, student architecture, settings."""

    def __init__(self, context: TaskContext):
        self.path = context.run.path / "bench" / "kd_baselines.json"
        self.entries = json.loads(self.path.read_text()) if self.path.is_file() else {}
        recipe = context.recipe
        teacher_weights = Path(teacher_folder(recipe, context.run, by=BY)) / "model.safetensors"
        self.inputs = {
            "teacher": sha256(teacher_weights),
            "importance": sha256(context.run.stage_dir("importance") / IMPORTANCE_FILE),
            "supernet": recipe.supernet.model_dump(mode="json"),
            "task": recipe.task.model_dump(mode="json"),
            "seed": recipe.seed,
            "device": context.device.type,
        }

    def _fingerprint(self, method: str, subnet: elastic.Subnet) -> str:
        return json.dumps({**self.inputs, "method": method, "subnet": subnet.to_dict()}, sort_keys=True)

    def get(self, method: str, budget: float, subnet: elastic.Subnet) -> dict | None:
        entry = self.entries.get(f"{method}@{budget:g}")
        if entry is None or entry["fingerprint"] != self._fingerprint(method, subnet):
            return None
        return {**entry["row"], "cached": True}

    def put(self, method: str, budget: float, subnet: elastic.Subnet, row: dict) -> None:
        self.entries[f"{method}@{budget:g}"] = {"fingerprint": self._fingerprint(method, subnet), "row": row}
        write_json(self.path, self.entries)


def kd_row(context: TaskContext, cache: KDResultCache, method: str, budget: float, subnet: elastic.Subnet,
           **extra) -> dict:
    cached = cache.get(method, budget, subnet)
    if cached is not None:
        console.print(f"{METHODS[method]} @ {budget:g}: reusing the result of an earlier bench run")
        return cached
    student, wall = kd_finetune(context, elastic.extract(context.teacher, subnet),
                                f"{METHODS[method]} @ {budget:g} on {context.data.spec.name}")
    row = result_row(context, method, budget, subnet, context.evaluate(student), wall, **extra)
    cache.put(method, budget, subnet, row)
    return row


def baseline_rows(context: TaskContext, budgets: list[float]) -> list[dict]:
    config = context.teacher.config
    pruner = ThresholdPruner(config, context.head_scores, context.neuron_scores, context.recipe.space)
    supernet = elastic.make_elastic(load_model(str(supernet_folder(context.run, by=BY)), context.data.spec))
    cache = KDResultCache(context)
    rows = []
    for budget in budgets:
        target = budget * context.full_macs

        def fits(subnet: elastic.Subnet) -> bool:
            return context.macs(subnet) <= target

        console.rule(f"[bold]baselines @ {budget:g}[/bold] ({context.data.spec.name})")
        pruned = prune_within_budget(pruner, target)
        rows.append(result_row(context, "pruned", budget, pruned,
                               context.evaluate(elastic.extract(context.teacher, pruned)), 0.0))
        rows.append(kd_row(context, cache, "pruned_kd", budget, pruned))

        uniform = uniform_subnet(config, fits)
        elastic.activate(supernet, uniform)
        # Its weights are the super-network's: it costs the pipeline's training, nothing more.
        rows.append(result_row(context, "uniform", budget, uniform, context.evaluate(supernet),
                               context.pipeline_training_wall_s))

        dropped = layer_drop_subnet(config, fits)
        if dropped is None:
            rows.append(result_row(context, "layer_drop_kd", budget, None, None, None,
                                   note="not even one full layer fits this budget"))
        else:
            subnet, kept = dropped
            rows.append(kd_row(context, cache, "layer_drop_kd", budget, subnet, kept_layers=kept))
    return rows


# ---- targets -------------------------------------------------------------------------------------
def target_checks(task: str, budgets: list[float], rows: list[dict], teacher_score: float) -> list[common.TargetCheck]:
    by_key = {(row["method"], row["budget"]): row for row in rows}
    checks = []
    for budget in budgets:
        scope = f"{task} @ {budget:g}"
        ours = by_key[("eftnas", budget)]["score"]
        need = retention_target(task, budget)
        if ours is None:
            checks.append(common.TargetCheck(scope, f"eftnas keeps >= {need:g}% of the teacher", "no subnet", False))
            continue
        if teacher_score > 0:
            kept = 100 * ours / teacher_score
            checks.append(common.TargetCheck(scope, f"eftnas keeps >= {need:g}% of the teacher", f"{kept:.1f}%",
                                             kept >= need))
        else:
            checks.append(common.TargetCheck(scope, f"eftnas keeps >= {need:g}% of the teacher",
                                             f"teacher scores {teacher_score:.4f}", None))
        for method in ("pruned", "uniform"):
            theirs = by_key[(method, budget)]["score"]
            checks.append(common.TargetCheck(scope, f"eftnas beats {METHODS[method]}",
                                             f"{100 * ours:.2f} vs {100 * theirs:.2f}", ours > theirs))
        kd = by_key[("pruned_kd", budget)]["score"]
        gap = 100 * (ours - kd)
        checks.append(common.TargetCheck(scope, f"eftnas within {KD_MARGIN_POINTS:g} point of {METHODS['pruned_kd']}",
                                         f"{100 * ours:.2f} vs {100 * kd:.2f} ({gap:+.2f})",
                                         gap >= -KD_MARGIN_POINTS - 1e-9))
    return checks


# ---- one task --------------------------------------------------------------------------------------
def bench_task(task: str, recipe_file: Path, overrides: list[str], budgets: list[float], device: torch.device) -> dict:
    recipe = load_recipe(recipe_file, overrides)
    console.rule(f"[bold]eftnas pipeline: {task}[/bold] ({recipe.run_dir})")
    run_pipeline(recipe)
    context, teacher_metrics = load_context(recipe, device)
    walls = stage_wall_times(context.run)
    rows = [result_row(context, "teacher", 1.0, elastic.full_subnet(context.teacher.config), teacher_metrics,
                       walls.get("finetune"))]
    per_budget = eftnas_rows(context, budgets) + baseline_rows(context, budgets)
    # Grouped per budget, methods in METHODS order: the rows to compare sit together.
    method_order = list(METHODS)
    rows += sorted(per_budget, key=lambda row: (budgets.index(row["budget"]), method_order.index(row["method"])))
    return {
        "provenance": common.provenance(device.type),
        "metric": context.data.spec.main_metric,
        "eval_split": first_eval_split(context.data),
        "eval_rows": len(context.split),
        "train_rows": len(context.data.train),
        "macs_seq_len": context.seq_len,
        "full_gmacs": context.full_macs / 1e9,
        "run_dir": str(context.run.path),
        "recipe": recipe.model_dump(mode="json"),
        "rows": rows,
        "targets": [c.as_dict() for c in target_checks(task, budgets, rows, teacher_metrics["score"])],
    }


# ---- report ----------------------------------------------------------------------------------------
def task_table(result: dict) -> str:
    teacher_score = next(row["score"] for row in result["rows"] if row["method"] == "teacher")
    rows = []
    for row in result["rows"]:
        score = row["score"]
        subnet = elastic.Subnet.from_dict(row["subnet"]) if row["subnet"] else None
        rows.append([
            METHODS[row["method"]],
            "-" if row["method"] == "teacher" else f"{row['budget']:g}",
            "-" if score is None else f"{100 * score:.2f}",
            "-" if score is None or teacher_score <= 0 else f"{100 * score / teacher_score:.1f}%",
            "-" if row["macs_ratio"] is None else f"{row['macs_ratio']:.3f}",
            common.format_duration(row["train_wall_s"]),
            row.get("note") or (describe(subnet) if subnet else "-"),
        ])
    headers = ["method", "budget", f"{result['metric']} (x100)", "% of teacher", "MACs ratio",
               "training wall time", "architecture (heads/neurons per layer)"]
    return common.markdown_table(headers, rows, align="lrrrrrl")


def render_report(results: dict[str, dict], header: dict) -> str:
    lines = [
        "# Compression quality against baselines",
        "",
        "Generated by `scripts/bench_quality.py`; the latest run:",
        "",
        *common.provenance_lines(header),
        "",
        "Each task's table: the dense teacher, eftnas's best searched subnet per MACs budget, and four",
        "baselines cut to the same budget: (a) the teacher pruned by one importance threshold, no",
        "retraining; (b) that architecture fine-tuned with KD from the teacher for as many epochs as the",
        "super-network; (c) the super-network at a uniform width in every layer (DynaBERT-style);",
        "(d) evenly spaced full layers of the teacher (DistilBERT-style) fine-tuned with KD like (b).",
        "MACs ratio: encoder MACs over the dense encoder's. Training wall time: eftnas and (c) = the",
        "pipeline's finetune + importance + gen-space + train-supernet + search stages (export",
        "excluded; per-stage times in the JSON); teacher = finetune; (a) = none; (b), (d) = their own",
        "KD fine-tune, which needs the teacher on top.",
    ]
    for task, result in results.items():
        provenance = result["provenance"]
        lines += [
            "",
            f"## {task.upper()}",
            "",
            f"Validation split `{result['eval_split']}` ({result['eval_rows']} rows), {result['train_rows']} train rows, "
            f"MACs at sequence length {result['macs_seq_len']} (dense encoder {result['full_gmacs']:.3g} GMACs); "
            f"run `{result['run_dir']}`; produced by `{provenance['command']}` on {provenance['date']} "
            f"({provenance['device']}).",
            "",
            task_table(result),
            "",
            "Targets:",
            "",
            common.targets_table([common.TargetCheck(**check) for check in result["targets"]]),
        ]
    return "\n".join(lines) + "\n"


def merge_results(json_path: Path, new: dict[str, dict]) -> dict[str, dict]:
    """Earlier tasks of the JSON file plus this run's, which replace their own earlier rows."""
    results = json.loads(json_path.read_text())["tasks"] if json_path.is_file() else {}
    results.update(new)
    write_json(json_path, {"tasks": results})
    return results


# ---- command line --------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--tasks", nargs="+", default=["mrpc", "sst2", "cola"])
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.35],
                        help="MACs fractions of the dense encoder")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--train-samples", type=int, default=None,
                        help="train on a seeded random subset of this many rows (task.max_train_samples)")
    parser.add_argument("--out", type=Path, default=None, help=f"markdown report (default {DEFAULT_OUT})")
    parser.add_argument("--run-root", type=Path, default=Path("runs/bench"), help="where the runs bench-<task> go")
    parser.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE, help="the recipe each task's run derives from")
    parser.add_argument("--smoke", action="store_true",
                        help=f"tiny random model and data in a temp folder, task {SMOKE_TASK}, budget {SMOKE_BUDGET}")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, applied last")
    args = parser.parse_args(argv)
    # `--tasks mrpc key=value` hands the overrides to --tasks (nargs="+"): take them back.
    args.overrides = [task for task in args.tasks if "=" in task] + args.overrides
    args.tasks = [task for task in args.tasks if "=" not in task]
    unknown = [task for task in args.tasks if task not in TASKS]
    if unknown:
        parser.error(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    if any(not 0 < budget <= 1 for budget in args.budgets):
        parser.error("--budgets are fractions of the dense MACs in (0, 1]")
    return args


def bench_overrides(task: str, args: argparse.Namespace) -> list[str]:
    budgets = json.dumps(args.budgets)
    overrides = [f"task.name={task}", f"name=bench-{task}", f"output_dir={args.run_root}",
                 f"search.budgets={budgets}", f"export.budgets={budgets}"]
    if args.train_samples is not None:
        overrides.append(f"task.max_train_samples={args.train_samples}")
    return overrides + args.overrides


def run(args: argparse.Namespace, scratch: Path | None) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        console.print("[red]error:[/red] --device cuda, but torch sees no GPU", soft_wrap=True)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    recipe_file = args.recipe
    if scratch is not None:
        # The deploy formats are bench_speed's business; skipping them keeps the smoke run short.
        recipe_file = common.write_smoke_recipe(
            scratch, {"export.onnx": False, "export.openvino": False, "export.int8": False}, task=SMOKE_TASK)
        args.tasks, args.budgets, args.run_root = [SMOKE_TASK], [SMOKE_BUDGET], scratch / "runs"
        args.out = args.out or scratch / "benchmarks.md"
    out = args.out or DEFAULT_OUT
    json_path = out.with_name(f"{out.stem}_quality.json")

    new_results = {}
    for task in args.tasks:
        new_results[task] = bench_task(task, recipe_file, bench_overrides(task, args), args.budgets, device)
        # Written after every task, so a later task's failure keeps the finished ones.
        report = render_report(merge_results(json_path, {task: new_results[task]}), common.provenance(device.type))
        common.write_report(out, report)
    print(report)
    print(f"written: {out} and {json_path}")
    common.print_target_summary([check for result in new_results.values() for check in result["targets"]])
    return 0


def main(argv: list[str] | None = None) -> int:
    return common.main_with_smoke(parse_args(argv), run, "eftnas-bench-quality-smoke-")


if __name__ == "__main__":
    sys.exit(main())
