"""How good is a ranking of heads and neurons by itself: the fine-tuned teacher, reordered by each
ranking and pruned to fractions of its encoder MACs WITHOUT retraining, then evaluated.

Rankings: `taylor` and `movement` (eftnas_cli.ranking, with the recipe's `importance` settings),
weight `magnitude` (Σ w² of the unit's weights per MAC), `random` (mean over --random-seeds), and any
`--compare NAME=FILE` importance file (e.g. today's movement scores; `{task}` in FILE is replaced).
Each is cut two ways per budget: gen-space's (one global threshold over heads and neurons of all
layers, `space_pruner(...).within(budget)`) and `uniform` (the same number of heads and neurons in
every layer, each layer keeping its top-ranked units).

Honesty: the curve that chooses is measured on SEARCH ROWS, the `task.search_fraction` of the
train split every stage holds out (at most --max-search-rows of them): neither the teacher nor any
ranking saw them. The validation split is evaluated once, after everything else, and only reported.

    python scripts/bench_ranking.py --teacher runs/ranking/rank-mrpc --teacher runs/ranking/rank-sst2 \
        [--compare "movement (today)=runs/ranking-today/rank-{task}/importance/importance.safetensors"] \
        [--budgets 0.9 0.7 0.5 0.35] [--max-search-rows 1000] [--random-seeds 3] \
        [--recipe configs/quickstart.yaml] [--out docs/benchmarks_ranking.md] [--device cpu] [--smoke] [key=value ...]

--teacher is a run directory (finetune/model/, and the model, task and seed its finetune stage
recorded) or a model folder fine-tuned on the rows --recipe and the overrides describe. Finished cells and computed rankings are cached
(--cache, default runs/ranking/bench_ranking_cache.json): an interrupted run continues where it
stopped. Writes the markdown report and a JSON of every figure next to it.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import time
from pathlib import Path

import _bench_common as common

# Must precede the torch imports below: see hide_gpus_if_cpu_requested.
common.hide_gpus_if_cpu_requested(sys.argv[1:])

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import set_seed  # noqa: E402

from eftnas_cli import elastic, ranking  # noqa: E402
from eftnas_cli.artifacts import MODEL_FOLDER  # noqa: E402
from eftnas_cli.data import recipe_task_data  # noqa: E402
from eftnas_cli.errors import UserError  # noqa: E402
from eftnas_cli.models import best_device, load_model, load_tokenizer  # noqa: E402
from eftnas_cli.pruning import uniform_subnet  # noqa: E402
from eftnas_cli.recipe import Recipe, load_recipe  # noqa: E402
from eftnas_cli.rundir import sha256, write_json  # noqa: E402
from eftnas_cli.stages.gen_space import space_pruner  # noqa: E402
from eftnas_cli.training import evaluate  # noqa: E402
from eftnas_cli.ui import console  # noqa: E402

DEFAULT_RECIPE = common.REPO_ROOT / "configs" / "quickstart.yaml"
DEFAULT_OUT = Path("docs/benchmarks_ranking.md")
DEFAULT_CACHE = Path("runs/ranking/bench_ranking_cache.json")
BUDGETS = (0.9, 0.7, 0.5, 0.35)
CUTS = {"global": "one global threshold (gen-space)", "uniform": "same width in every layer"}
# The curve every other ranking is held against: today's movement scores, when given.
REFERENCE = "movement (today)"


# ---- inputs --------------------------------------------------------------------------------------
def teacher_and_recipe(path: Path, recipe_file: Path, overrides: list[str]) -> tuple[Path, Recipe]:
    """The teacher's model folder and the recipe to rank it with: `recipe_file` and `overrides`, with
    a run directory's model, task and seed as its finetune stage recorded them (they decided the rows
    the teacher saw; the run's recipe.yaml follows the latest stage)."""
    folder = path
    if (path / "manifest.json").is_file():  # a run directory
        record = json.loads((path / "manifest.json").read_text())["stages"].get("finetune")
        if record is None:
            raise UserError(f"{path} has no finetune stage: run `eftnas finetune` first, or pass a model folder")
        shared = record["shared"]
        if shared["task"].get("search_fraction", 0) == 0 and not shared["task"].get("search_split"):
            raise UserError(f"the teacher in {path} was fine-tuned on every training row (no task.search_fraction "
                            "held out, no task.search_split): fine-tune it again with the current eftnas")
        overrides = [f"model={json.dumps(shared['model'])}", f"task={json.dumps(shared['task'])}",
                     f"seed={shared['seed']}", *overrides]
        folder = path / "finetune" / MODEL_FOLDER
    recipe = load_recipe(recipe_file, overrides)
    if recipe.task.search_fraction == 0 and recipe.task.search_split is None:
        raise UserError("task.search_fraction is 0 and no task.search_split: this benchmark chooses on search rows, "
                        "never on validation")
    if not (folder / "model.safetensors").is_file():
        raise UserError(f"no fine-tuned teacher at {folder}: run `eftnas finetune` first, or pass its model folder")
    return folder, recipe


def by_length(rows):
    """The rows shortest first: batches of similar lengths pad less, so evaluation runs faster (a
    metric over all rows does not depend on their order)."""
    lengths = torch.tensor([len(ids) for ids in rows["input_ids"]])
    return rows.select(torch.sort(lengths, stable=True).indices.tolist())


# ---- rankings ------------------------------------------------------------------------------------
def magnitude_ranking(model: torch.nn.Module, seq_len: int) -> ranking.UnitRanking:
    """Σ w² over each unit's weights (q/k/v rows and output columns of a head; FFN input row and
    output column of a neuron), per MAC, as MACs-weighted percentiles like taylor's."""
    adapter, dims = elastic.adapter_for(model.config), elastic.encoder_dims(model.config)
    heads = torch.zeros(dims.num_layers, dims.heads)
    neurons = torch.zeros(dims.num_layers, dims.neurons)
    for index, layer in enumerate(elastic.encoder_layers(model)):
        linear = {role: layer.get_submodule(path).weight.detach().float() for role, path in adapter.linear_paths.items()}
        for role in ("query", "key", "value"):
            heads[index] += linear[role].pow(2).sum(1).view(dims.heads, dims.head_dim).sum(1)
        heads[index] += linear["attention_output"].pow(2).sum(0).view(dims.heads, dims.head_dim).sum(1)
        neurons[index] = linear["ffn_input"].pow(2).sum(1) + linear["ffn_output"].pow(2).sum(0)
    head_macs, neuron_macs = ranking.unit_macs(model.config, seq_len)
    return ranking.UnitRanking(*ranking.cost_weighted_percentiles(heads, neurons, head_macs, neuron_macs))


def random_ranking(config, seed: int) -> ranking.UnitRanking:
    dims = elastic.encoder_dims(config)
    generator = torch.Generator().manual_seed(seed)
    return ranking.UnitRanking(torch.rand(dims.num_layers, dims.heads, generator=generator),
                               torch.rand(dims.num_layers, dims.neurons, generator=generator))


class Cache:
    """Finished cells (JSON) and computed rankings (safetensors beside it). A cell is keyed by the
    scores and subnet that decide it; a ranking by its settings, not by the code that computes it:
    delete the cache after changing eftnas_cli/ranking.py."""

    def __init__(self, path: Path):
        self.path = path
        self.cells = json.loads(path.read_text()) if path.is_file() else {}
        self.evaluated = 0  # cells computed by this run, not read from the cache
        self.rankings_dir = path.with_suffix("")
        self.rankings_dir.mkdir(parents=True, exist_ok=True)

    def cell(self, key: str, compute):
        if key not in self.cells:
            self.cells[key] = compute()
            self.evaluated += 1
            write_json(self.path, self.cells)
        return self.cells[key]

    def ranking(self, key: str, compute) -> tuple[ranking.UnitRanking, float]:
        """(ranking, seconds it took to compute when it was computed)."""
        file = self.rankings_dir / (hashlib.sha256(key.encode()).hexdigest()[:20] + ".safetensors")
        if not file.is_file():
            started = time.perf_counter()
            result = compute()
            save_file({"heads": result.heads.float().contiguous(), "neurons": result.neurons.float().contiguous()},
                      str(file), metadata={"key": key, "seconds": f"{time.perf_counter() - started:.1f}",
                                           "summary": json.dumps(result.summary)})
        from safetensors import safe_open

        with safe_open(str(file), "pt") as handle:
            metadata = handle.metadata()
        scores = load_file(str(file))
        return ranking.UnitRanking(scores["heads"], scores["neurons"], json.loads(metadata["summary"])), float(metadata["seconds"])


def method_ranking(recipe: Recipe, method: str, teacher_dir: Path, data, cache: Cache, device: str):
    """(UnitRanking, seconds) of an importance method with the recipe's `importance` settings, cached
    by the teacher, the task rows, the seed and those settings."""
    section = recipe.importance.model_copy(update={"method": method})
    key = json.dumps({"teacher": sha256(teacher_dir / "model.safetensors"), "task": recipe.task.model_dump(mode="json"),
                      "seed": recipe.seed, "section": section.model_dump(mode="json")}, sort_keys=True)
    source = str(teacher_dir) if section.source == "teacher" else recipe.model.name

    def compute():
        console.rule(f"[bold]{method}[/bold] ranking ({recipe.task.name}, from {section.source})")
        set_seed(recipe.seed)  # as the importance stage does
        model = load_model(source, data.spec)
        return ranking.METHODS[method](model, data, section, ranking.RankingRun(recipe.seed, device, cache.rankings_dir / "work"))

    return cache.ranking(key, compute)


def compute_rankings(args, recipe: Recipe, teacher_dir: Path, data, cache: Cache, device: str) -> dict:
    """name -> (UnitRanking, seconds); every ranking except the compared files is cached."""
    rankings = {method: method_ranking(recipe, method, teacher_dir, data, cache, device) for method in ("taylor", "movement")}
    teacher = load_model(str(teacher_dir), data.spec)
    rankings["magnitude"] = (magnitude_ranking(teacher, recipe.space.seq_len), 0.0)
    for seed in range(args.random_seeds):
        rankings[f"random #{seed}"] = (random_ranking(teacher.config, seed), 0.0)
    for name, pattern in args.compare:
        file = Path(pattern.replace("{task}", recipe.task.name))
        if not file.is_file():
            raise UserError(f"--compare {name}: no importance file {file}")
        scores = load_file(str(file))
        rankings[name] = (ranking.UnitRanking(scores["heads"], scores["neurons"], {"file": str(file), "sha256": sha256(file)}), None)
    return rankings


# ---- cells ---------------------------------------------------------------------------------------
def cut(config, unit_ranking: ranking.UnitRanking, recipe: Recipe, how: str, budget: float) -> elastic.Subnet:
    pruner = space_pruner(config, unit_ranking.heads, unit_ranking.neurons, recipe.space)
    target = budget * pruner.macs(elastic.full_subnet(config))
    if how == "global":
        return pruner.within(target)
    return uniform_subnet(config, lambda subnet: pruner.macs(subnet) <= target)


def bench_teacher(args, path: Path, cache: Cache, device: torch.device) -> dict:
    started, evaluated_before = time.perf_counter(), cache.evaluated
    teacher_dir, recipe = teacher_and_recipe(path, args.recipe, args.overrides)
    task = recipe.task.name
    console.rule(f"[bold]{task}[/bold]: teacher {teacher_dir}")
    tokenizer = load_tokenizer(recipe.model.name)
    data = recipe_task_data(recipe, tokenizer)
    splits = {"search": by_length(data.search.select(range(min(args.max_search_rows, len(data.search))))),
              "validation": by_length(data.main_eval)}
    rankings = compute_rankings(args, recipe, teacher_dir, data, cache, device.type)
    teacher = load_model(str(teacher_dir), data.spec).to(device).eval()
    full_macs = elastic.macs(teacher.config, None, recipe.space.seq_len).encoder
    base = {"teacher": sha256(teacher_dir / "model.safetensors"), "space": recipe.space.model_dump(mode="json")}

    def score(model, split: str, key: dict) -> dict:
        cell_key = json.dumps({**base, **key, "split": split, "rows": len(splits[split])}, sort_keys=True)
        return cache.cell(cell_key, lambda: evaluate(model.to(device), splits[split], data.collator, data.spec,
                                                     recipe.importance.eval_batch_size))

    cells = []
    # Search rows first, for every cell; the validation split only once that curve is complete.
    for split in ("search", "validation"):
        console.print(f"[bold]{task}[/bold]: evaluating on {split} rows ({len(splits[split])})")
        teacher_metrics = score(teacher, split, {"model": "teacher"})
        cells.append({"ranking": "teacher", "cut": None, "budget": 1.0, "split": split, "macs_ratio": 1.0,
                      "metrics": teacher_metrics})
        for name, (unit_ranking, _) in rankings.items():
            reordered = copy.deepcopy(teacher)
            elastic.reorder(reordered, list(unit_ranking.heads), list(unit_ranking.neurons))
            fingerprint = hashlib.sha256(unit_ranking.heads.numpy().tobytes() + unit_ranking.neurons.numpy().tobytes()).hexdigest()
            for how in CUTS:
                for budget in args.budgets:
                    subnet = cut(teacher.config, unit_ranking, recipe, how, budget)
                    # Keyed by what decides the model: two cuts that agree share one evaluation.
                    metrics = score(elastic.extract(reordered, subnet), split,
                                    {"ranking": fingerprint, "subnet": subnet.to_dict()})
                    cells.append({"ranking": name, "cut": how, "budget": budget, "split": split,
                                  "macs_ratio": elastic.macs(teacher.config, subnet, recipe.space.seq_len).encoder / full_macs,
                                  "subnet": subnet.to_dict(), "metrics": metrics})
    return {
        "task": task,
        "teacher": str(teacher_dir),
        "rows": {"ranking": len(data.train), "search": len(splits["search"]), "validation": len(splits["validation"])},
        "ranking_seconds": {name: seconds for name, (_, seconds) in rankings.items() if not name.startswith("random")},
        "ranking_summaries": {name: r.summary for name, (r, _) in rankings.items() if r.summary},
        "importance_section": recipe.importance.model_dump(mode="json"),
        "cells": cells,
        # This run's share: cells and rankings read from the cache cost nothing here.
        "wall_s": round(time.perf_counter() - started, 1),
        "cells_evaluated": cache.evaluated - evaluated_before,
    }


# ---- report --------------------------------------------------------------------------------------
def curves(result: dict, split: str) -> dict[tuple[str, str], dict[float, float]]:
    """(ranking, cut) -> budget -> score; the random seeds averaged into one `random` curve."""
    collected: dict[tuple[str, str], dict[float, list[float]]] = {}
    for cell in result["cells"]:
        if cell["split"] != split or cell["cut"] is None:
            continue
        name = "random" if cell["ranking"].startswith("random #") else cell["ranking"]
        collected.setdefault((name, cell["cut"]), {}).setdefault(cell["budget"], []).append(cell["metrics"]["score"])
    return {key: {budget: sum(v) / len(v) for budget, v in values.items()} for key, values in collected.items()}


def teacher_score(result: dict, split: str) -> float:
    return next(c["metrics"]["score"] for c in result["cells"] if c["split"] == split and c["ranking"] == "teacher")


def curve_table(result: dict, split: str, budgets: list[float]) -> str:
    table = curves(result, split)
    headers = ["ranking", "cut", *(f"{b:.0%} MACs" for b in budgets)]
    rows = [["teacher (dense)", "-", *([f"{100 * teacher_score(result, split):.2f}"] * len(budgets))]]
    for (name, how), by_budget in sorted(table.items(), key=lambda item: (item[0][1] != "global", item[0][0])):
        rows.append([name, how, *(f"{100 * by_budget[b]:.2f}" for b in budgets)])
    return common.markdown_table(headers, rows, align="ll" + "r" * len(budgets))


def winner(results: list[dict], budgets: list[float]) -> str | None:
    """The method (taylor or movement) whose global-threshold curve on search rows is higher on
    average over budgets and tasks: how the default was chosen, without the validation split."""
    means = {}
    for method in ("taylor", "movement"):
        values = [curves(r, "search")[(method, "global")][b] for r in results for b in budgets]
        means[method] = sum(values) / len(values)
    return max(means, key=means.get)


def target_checks(results: list[dict], budgets: list[float], default: str) -> list[common.TargetCheck]:
    checks = []
    for result in results:
        for split in ("search", "validation"):
            table = curves(result, split)
            for how in CUTS:
                if (REFERENCE, how) not in table:
                    continue
                ours, reference = table[(default, how)], table[(REFERENCE, how)]
                above = [b for b in budgets if ours[b] > reference[b]]
                measured = ", ".join(f"{b:.0%}: {100 * ours[b]:.2f} vs {100 * reference[b]:.2f}" for b in budgets)
                checks.append(common.TargetCheck(f"{result['task']} {split} rows, {how} cut",
                                                 f"{default} above {REFERENCE} at every budget", measured,
                                                 len(above) == len(budgets)))
    return checks


def render(results: list[dict], header: dict, budgets: list[float]) -> tuple[str, dict]:
    default = winner(results, budgets)
    checks = target_checks(results, budgets, default)
    lines = ["# Ranking quality: the teacher pruned without retraining", "",
             "Each ranking reorders the fine-tuned teacher's heads and FFN neurons; the teacher is then cut to a "
             "fraction of its encoder MACs and evaluated as is. `global`: one importance threshold over all "
             "heads and neurons (what gen-space does); `uniform`: the same number of heads and neurons in every "
             "layer, each layer keeping its best-ranked units. `random` is the mean of "
             f"{header['random_seeds']} random rankings. Scores are the task's main metric x100.", "",
             "The choice of the default ranking reads only the search rows (held out of the training split, "
             "seen by neither the teacher nor any ranking); the validation split was evaluated once, after that, "
             "and is only reported.", "", *common.provenance_lines(header), "",
             f"Default chosen on search rows (mean over tasks and budgets of the global-threshold curve): **{default}**.",
             ""]
    for result in results:
        rows = result["rows"]
        lines += [f"## {result['task']}", "",
                  f"Teacher `{result['teacher']}`; rankings computed on {rows['ranking']} training rows; "
                  f"{rows['search']} search rows; {rows['validation']} validation rows. Time to compute each ranking: "
                  + ", ".join(f"{name} {common.format_duration(s)}" for name, s in result["ranking_seconds"].items()
                              if s is not None) + f". This run: {common.format_duration(result['wall_s'])}, "
                  f"{result['cells_evaluated']} of {len(result['cells'])} cells evaluated (the rest from the cache).", ""]
        masked = result["ranking_summaries"].get("movement", {}).get("masked_at_final_threshold")
        if masked:
            lines += [f"Movement masked {masked['macs_fraction']:.1%} of the encoder MACs by the end of its run "
                      f"(heads per layer {masked['heads_per_layer']}, neurons per layer {masked['neurons_per_layer']}).", ""]
        lines += ["### Search rows (held out of training)", "", curve_table(result, "search", budgets), "",
                  "### Validation split (reported once)", "", curve_table(result, "validation", budgets), ""]
    lines += ["## Targets", "", common.targets_table(checks), ""]
    record = {"header": header, "default": default, "results": results, "targets": [c.as_dict() for c in checks]}
    return "\n".join(lines), record


# ---- entry -----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", action="append", type=Path, default=[],
                        help="a run directory (with finetune/) or a teacher model folder; repeat for several tasks")
    parser.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE, help="the recipe of a plain teacher folder")
    parser.add_argument("--compare", action="append", default=[], metavar="NAME=FILE",
                        help="another importance file to rank with; {task} in FILE is replaced by the task name")
    parser.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    parser.add_argument("--max-search-rows", type=int, default=1000)
    parser.add_argument("--random-seeds", type=int, default=3)
    parser.add_argument("--note", action="append", default=[], help="a line for the report (e.g. where a --compare file comes from)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--smoke", action="store_true", help="tiny random teacher and synthetic data, in seconds")
    parser.add_argument("overrides", nargs="*", help="recipe key=value overrides (applied to every teacher's recipe)")
    args = parser.parse_args(argv)
    parsed = []
    for item in args.compare:
        name, separator, file = item.partition("=")
        if not separator or not name or not file:
            parser.error(f"--compare expects NAME=FILE, got {item!r}")
        parsed.append((name, file))
    args.compare = parsed
    if not args.teacher and not args.smoke:
        parser.error("give at least one --teacher (a run directory or a model folder), or --smoke")
    return args


def run(args: argparse.Namespace, scratch: Path | None) -> int:
    if scratch is not None:  # a tiny teacher, fine-tuned here; a short budget list
        from eftnas_cli.stages.finetune import finetune

        recipe_file = common.write_smoke_recipe(scratch, {"task.max_train_samples": 24, "space.seq_len": 16})
        finetune(load_recipe(recipe_file))
        args.teacher, args.recipe = [scratch / "runs" / "tiny"], recipe_file
        args.cache, args.out = scratch / "cache.json", scratch / "report.md"
        args.budgets, args.random_seeds, args.max_search_rows = [0.7], 1, 8
        args.overrides = ["importance.taylor_rows=16", *args.overrides]
    device = best_device(args.device)
    header = common.provenance(device.type, {"budgets": ", ".join(f"{b:g}" for b in args.budgets),
                                             "random_seeds": args.random_seeds,
                                             **{f"note {index + 1}": note for index, note in enumerate(args.note)}})
    cache = Cache(args.cache)
    results = [bench_teacher(args, path, cache, device) for path in args.teacher]
    text, record = render(results, header, args.budgets)
    common.write_report(args.out, text)
    write_json(args.out.with_suffix(".json"), record)
    for result in results:
        console.print(f"\n[bold]{result['task']}[/bold], search rows")
        console.print(curve_table(result, "search", args.budgets))
        console.print(f"[bold]{result['task']}[/bold], validation (reported once)")
        console.print(curve_table(result, "validation", args.budgets))
    console.print(f"default by the search-row curve: {record['default']}; report: {args.out}")
    common.print_target_summary(record["targets"])
    return 0


def main(argv: list[str] | None = None) -> int:
    return common.main_with_smoke(parse_args(argv), run, "bench-ranking-")


if __name__ == "__main__":
    sys.exit(main())
