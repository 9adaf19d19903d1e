"""How many search rows the search needs, and in what precision: the search capped at N rows per
trial, its forward passes in fp32 or half precision, on finished runs.

For each finished run (bench_quality's `runs/bench/<task>-s<seed>`, say) the run's importance, space
and super-network are linked into `<run>/bench/rows-all/` and `<run>/bench/rows-<N>[-<precision>]/`
for each --rows N and --precisions P, and `search` runs there again with `search.max_eval_samples`
null (all search rows; --no-full leaves this search out) and N, `search.mixed_precision` P, every
other setting the run's. Each budget's choice is then scored, in fp32, on the search rows after the
largest N: rows no capped search read. The full search read them and chose on them, so a comparison
with it leans in its favour. Differences are paired with the first search (the full one, else the
first N in the first precision). The validation split is not read: these figures choose the
defaults. Finished searches are kept while the run's super-network is unchanged (a re-run only scores).

    python scripts/bench_search_rows.py --run runs/bench/sst2-s0 --run runs/bench/sst2-s1 [--rows 1000 2000]
        [--precisions no bf16] [--no-full] [--budgets 0.7 0.5 0.35 0.25] [--out docs/benchmarks_search_rows.md]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

import _bench_common as common

from eftnas_cli import artifacts, elastic
from eftnas_cli.data import recipe_task_data
from eftnas_cli.errors import UserError
from eftnas_cli.models import load_tokenizer
from eftnas_cli.recipe import Recipe, load_recipe
from eftnas_cli.rundir import RunDir, write_json
from eftnas_cli.stages.pipeline import run_pipeline
from eftnas_cli.supernet import Supernet

BY = "bench_search_rows"
DEFAULT_OUT = Path("docs/benchmarks_search_rows.md")
# The stages a capped search reads, linked (not copied: the super-network is tens of MB) from the run.
UPSTREAM = ("importance", "gen-space", "train-supernet")


def search_label(rows: int | None, precision: str) -> str:
    return f"{rows or 'all'}" + ("" if precision == "no" else f"-{precision}")


def capped_recipe(path: Path, rows: int | None, precision: str) -> Recipe:
    """The run's recipe with the search reading its first `rows` search rows (None: all of them)
    in `precision`."""
    return load_recipe(path / "recipe.yaml", [f"output_dir={path / 'bench'}", f"name=rows-{search_label(rows, precision)}",
                                              f"search.max_eval_samples={'null' if rows is None else rows}",
                                              f"search.mixed_precision={precision}"])


def upstream_outputs(manifest: dict) -> dict:
    """The files (by sha256) of the stages a capped search reads: a copy must hold the run's."""
    return {stage: (manifest["stages"].get(stage) or {}).get("outputs") for stage in UPSTREAM}


def capped_search(run: RunDir, rows: int | None, precision: str) -> Recipe:
    """The run's search again, reading only its first `rows` search rows, or all of them for None,
    in `precision` (kept while the run's super-network is the one it searched)."""
    recipe = capped_recipe(run.path, rows, precision)
    copy, manifest = RunDir(recipe), run.manifest()
    if upstream_outputs(copy.manifest()) != upstream_outputs(manifest):  # no manifest reads as no stages
        shutil.rmtree(copy.path, ignore_errors=True)  # a copy killed half-way, or of an earlier super-network
        for stage in UPSTREAM:
            shutil.copytree(run.stage_dir(stage), copy.stage_dir(stage), copy_function=os.link)
        # Written last: it marks the copy complete.
        write_json(copy.manifest_path, {**manifest, "stages": {stage: manifest["stages"][stage] for stage in UPSTREAM}})
    run_pipeline(recipe, until="search")
    return recipe


def bench_run(path: Path, args) -> dict:
    recipe = load_recipe(path / "recipe.yaml", [])
    run = RunDir(recipe)
    # The run's own search may be capped itself (search.max_eval_samples has a default): the full
    # search runs in a copy too.
    searches = {}
    for rows in [None, *args.rows] if args.full else args.rows:
        for precision in args.precisions:
            searched = RunDir(capped_search(run, rows, precision))
            pareto = artifacts.load_pareto(searched, by=BY)
            if pareto.mixed_precision != precision:  # --precisions bf16 on a CPU without bf16 arithmetic, say
                raise UserError(f"--precisions {precision}: the search measured in {pareto.mixed_precision}")
            searches[search_label(rows, precision)] = (pareto, searched.record("search")["wall_time_s"])
    data = recipe_task_data(recipe, load_tokenizer(recipe.model.name))
    unread = data.search.select(range(max(args.rows), len(data.search)))
    supernet = Supernet.load(run, data.spec, by=BY)
    scores: dict[str, float] = {}  # subnet (json) -> score on the unread rows

    def unread_score(subnet: dict) -> float:
        key = json.dumps(subnet, sort_keys=True)
        if key not in scores:
            scores[key] = supernet.evaluate(elastic.Subnet.from_dict(subnet), unread, data,
                                            recipe.search.eval_batch_size)["score"]
        return scores[key]

    result = {"run": str(path), "task": data.spec.name, "seed": recipe.seed, "search_rows": len(data.search),
              "unread_rows": len(unread), "searches": {}}
    for label, (pareto, wall) in searches.items():
        by_trial = {t["trial"]: t for t in pareto.trials}
        choices = {}
        for budget in args.budgets:
            chosen = pareto.best(budget)
            if chosen is None:
                continue
            trial = by_trial[chosen["trial"]]
            choices[artifacts.budget_key(budget)] = {"trial": trial["trial"], "macs_ratio": trial["macs"] / pareto.full_macs,
                                                     "unread_score": unread_score(trial["subnet"])}
        result["searches"][label] = {"eval_rows": pareto.eval_rows, "wall_s": wall, "choices": choices}
    return result


def render(results: list[dict], args, provenance: dict) -> str:
    lines = ["# How many search rows the search needs, and in what precision (search rows only)", "",
             *common.provenance_lines(provenance), "",
             "Each run's search again with `search.max_eval_samples` = N (all: every search row) and "
             "`search.mixed_precision` as labelled (no label: fp32) on the same super-network; every choice "
             "scored in fp32 on the search rows after the largest N, which no capped search read (a full search "
             "read and chose on them: a comparison with it leans in its favour). Cells: mean ± sd over seeds of "
             "that score (x100), in brackets the mean MACs ratio chosen; differences are paired with the first "
             "column's choice.", ""]
    for task in sorted({r["task"] for r in results}):
        runs = [r for r in results if r["task"] == task]
        labels = list(runs[0]["searches"])
        lines += [f"## {task}: seeds {', '.join(str(r['seed']) for r in runs)}; {runs[0]['search_rows']} search rows, "
                  f"scored on the last {runs[0]['unread_rows']}", ""]
        reference = labels[0]
        headers = ["budget"] + [header(label, runs[0]["search_rows"]) for label in labels] + \
            [f"{label} − {reference}" for label in labels[1:]]
        table = []
        for budget in [artifacts.budget_key(b) for b in args.budgets]:
            if not all(budget in r["searches"][label]["choices"] for r in runs for label in labels):
                continue
            row = [budget]
            for label in labels:
                choices = [r["searches"][label]["choices"][budget] for r in runs]
                row.append(f"{common.mean_sd([100 * c['unread_score'] for c in choices])} "
                           f"({statistics.fmean(c['macs_ratio'] for c in choices):.3f})")
            for label in labels[1:]:
                row.append(common.mean_sd([100 * (r["searches"][label]["choices"][budget]["unread_score"]
                                           - r["searches"][reference]["choices"][budget]["unread_score"]) for r in runs],
                                   signed=True))
            table.append(row)
        table.append(["search wall time"] + [common.format_duration(statistics.fmean(r["searches"][label]["wall_s"] for r in runs))
                                             for label in labels] + [""] * (len(labels) - 1))
        lines += [common.markdown_table(headers, table, align="l" + "r" * (len(headers) - 1)), ""]
    return "\n".join(lines)


def header(label: str, search_rows: int) -> str:
    rows, _, precision = label.partition("-")
    return f"{'all ' + str(search_rows) if rows == 'all' else rows} rows" + (f" {precision}" if precision else "")


def parse_args(argv=None) -> argparse.Namespace:
    parser = common.runs_parser(__doc__, DEFAULT_OUT)
    parser.add_argument("--rows", nargs="+", type=int, default=[1000, 2000], help="search rows per trial to try")
    parser.add_argument("--precisions", nargs="+", default=["no"], choices=["no", "bf16", "fp16"],
                        help="search.mixed_precision of each capped search (no: fp32)")
    parser.add_argument("--full", action=argparse.BooleanOptionalAction, default=True,
                        help="also search all search rows (in each precision); the first search is the reference")
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.7, 0.5, 0.35, 0.25],
                        help="budgets whose choices are compared")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    return common.report_over_runs(parse_args(argv), bench_run, render)


if __name__ == "__main__":
    sys.exit(main())
