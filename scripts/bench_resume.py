"""What a kill -9 costs: each long stage killed at random points, restarted, and finished (#11).

Per long stage (finetune, train-supernet, search; importance and gen-space take seconds with the
default taylor ranking and run uninterrupted between them), on the recipe (default
configs/quickstart.yaml):

  reference   the stage run once, uninterrupted, in run `<name>-resume-ref`;
  killed      the same stage in run `<name>-resume-kill`, killed with SIGKILL --kills times (search
              at points drawn uniformly over the reference's wall time; finetune and
              train-supernet at a random point of their second checkpoint interval, so that
              each kill has progress to lose), the same command started again after every kill,
              the last attempt running to the end.

Per kill it reports how long the attempt had run, the work lost (how long before the kill the
stage last saved progress: its latest Trainer checkpoint for finetune and train-supernet, its
latest finished trial for search; the whole attempt when it had saved nothing yet) and whether the
next attempt continued (the stage says "continuing from <checkpoint>"; search finds the study's
finished trials). Per stage: reference and total wall time, and how close the result is to the
reference's (the largest weight difference; search: trial counts and the best score per budget).
Each finished stage is kept in the JSON beside the report, so an interrupted bench continues.

    python scripts/bench_resume.py [--recipe configs/quickstart.yaml] [--stages finetune train-supernet search]
        [--kills 5] [--seed 0] [--run-root runs/resume] [--out docs/benchmarks_resume.md] [--smoke] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import _bench_common as common

DEFAULT_RECIPE = common.REPO_ROOT / "configs" / "quickstart.yaml"
DEFAULT_OUT = Path("docs/benchmarks_resume.md")
LONG_STAGES = ("finetune", "train-supernet", "search")
# What a stage needs first; importance and gen-space run uninterrupted in between.
UPSTREAM = {"finetune": None, "train-supernet": "gen-space", "search": "train-supernet"}
CHECKPOINTS = {"finetune": "finetune", "train-supernet": "supernet"}
WEIGHTS = {"finetune": "finetune/model/model.safetensors", "train-supernet": "supernet/model/model.safetensors"}


def run_overrides(args, run_name: str) -> list[str]:
    """The recipe overrides of run `run_name`: every command and check of it uses these."""
    return [f"name={run_name}", f"output_dir={args.run_root}", f"seed={args.seed}", *args.overrides]


def stage_command(args, run_name: str, stage: str) -> list[str]:
    return [sys.executable, "-m", "eftnas_cli.cli", stage, str(args.recipe), *run_overrides(args, run_name)]


def run_stage(args, run_name: str, stage: str) -> tuple[float, str]:
    """The stage to its end; its wall time and output."""
    started = time.monotonic()
    result = subprocess.run(stage_command(args, run_name, stage), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    if result.returncode != 0:
        raise SystemExit(f"{stage} in {run_name} failed:\n{result.stdout[-3000:]}")
    return time.monotonic() - started, result.stdout


def continues(output: str) -> bool | None:
    """Whether an attempt says it continued saved progress (a checkpoint, a study's trials) or
    started afresh; None if it was killed before it said either."""
    text = " ".join(output.split())
    return True if "continuing" in text else (False if "starting" in text else None)


def prepare(args, run_name: str, stage: str) -> None:
    """The run's stages before `stage`, uninterrupted (finished ones are skipped by `eftnas run`)."""
    until = UPSTREAM[stage]
    if until is not None:
        command = [sys.executable, "-m", "eftnas_cli.cli", "run", str(args.recipe), "--until", until,
                   *run_overrides(args, run_name)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"preparing {run_name} up to {until} failed:\n{result.stderr[-2000:]}")


def finished(args, run_name: str, stage: str) -> bool:
    """`stage` finished in the run with today's recipe and code defaults (an earlier result of other
    settings is measured again)."""
    from eftnas_cli.recipe import load_recipe
    from eftnas_cli.rundir import RunDir

    return RunDir(load_recipe(args.recipe, run_overrides(args, run_name))).is_current(stage)


def last_saved_progress(run: Path, stage: str) -> float | None:
    """When the stage last saved progress (epoch seconds), None if never in this run."""
    if stage == "search":
        trials = finished_trials(run)
        return max((t["completed"] for t in trials), default=None)
    folder = run / "checkpoints" / CHECKPOINTS[stage]
    states = list(folder.glob("checkpoint-*/trainer_state.json"))
    return max((p.stat().st_mtime for p in states), default=None)


def finished_trials(run: Path) -> list[dict]:
    """The search study's finished trials: their subnet parameters and completion times."""
    import optuna

    database = run / "studies" / "search.db"
    if not database.is_file():
        return []
    storage = f"sqlite:///{database}"
    trials = []
    for name in optuna.study.get_all_study_names(storage):
        for trial in optuna.load_study(study_name=name, storage=storage).get_trials(
                deepcopy=False, states=[optuna.trial.TrialState.COMPLETE]):
            trials.append({"params": trial.params, "completed": trial.datetime_complete.timestamp()})
    return trials


def killed_attempts(args, run_name: str, stage: str, reference_s: float, rng: random.Random) -> dict:
    """Kill the stage --kills times, restarting after each.

    Search saves every finished trial, so its kills fall at points drawn over the reference's
    timeline. A stage that saves a checkpoint every `checkpoint_minutes` is killed at a random
    point of its second interval (after --min-attempt of start-up): killed sooner, an attempt
    would have saved nothing and every attempt would start afresh, which measures nothing.
    """
    run = args.run_root / run_name
    interval_s = 60 * args.checkpoint_minutes[stage] if stage in args.checkpoint_minutes else None
    if interval_s is None:
        points = sorted(rng.uniform(args.min_attempt, reference_s) for _ in range(args.kills))
        durations = [max(args.min_attempt, b - a) for a, b in zip([0.0, *points], points)]
    else:
        durations = [args.min_attempt + interval_s * (1 + rng.random()) for _ in range(args.kills)]
    kills, total, continued = [], 0.0, []  # continued[i]: attempt i said it continued saved progress
    for planned in durations:
        started = time.monotonic()
        process = subprocess.Popen(stage_command(args, run_name, stage), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        try:
            process.wait(timeout=planned)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
        output = process.communicate()[0]
        ran = time.monotonic() - started
        total += ran
        continued.append(continues(output))
        if process.returncode != -signal.SIGKILL:  # it finished (or failed) before its kill point
            if process.returncode != 0:
                raise SystemExit(f"{stage} in {run_name} failed:\n{output[-2000:]}")
            return {"kills": kills, "total_s": total, "continued": continued}
        saved = last_saved_progress(run, stage)
        attempt_start = time.time() - ran
        lost = ran if saved is None or saved < attempt_start else time.time() - saved
        kills.append({"after_s": round(ran, 1), "lost_s": round(lost, 1), "progress_saved": saved is not None,
                      "trials_kept": len(finished_trials(run)) if stage == "search" else None})
    last_s, output = run_stage(args, run_name, stage)
    continued.append(continues(output))
    return {"kills": kills, "total_s": total + last_s, "continued": continued}


def compare(args, stage: str) -> dict:
    """How close the killed run's result is to the reference's."""
    reference, killed = args.run_root / f"{args.name}-resume-ref", args.run_root / f"{args.name}-resume-kill"
    if stage in WEIGHTS:
        from safetensors.torch import load_file

        a, b = load_file(str(reference / WEIGHTS[stage])), load_file(str(killed / WEIGHTS[stage]))
        return {"max_weight_difference": max((a[k].float() - b[k].float()).abs().max().item() for k in a)}
    records = [json.loads((run / "search" / "pareto.json").read_text()) for run in (reference, killed)]
    return {"trials": [len(finished_trials(run)) for run in (reference, killed)],
            "best": [{budget: (best or {}).get("score") for budget, best in r.get("best", {}).items()} for r in records]}


def bench_stage(args, stage: str, rng: random.Random) -> dict:
    reference, killed = f"{args.name}-resume-ref", f"{args.name}-resume-kill"
    prepare(args, reference, stage)
    reference_s = run_stage(args, reference, stage)[0] if not finished(args, reference, stage) else None
    if reference_s is None:  # finished by an interrupted earlier bench: its wall time is in the manifest
        reference_s = json.loads((args.run_root / reference / "manifest.json").read_text())["stages"][stage]["wall_time_s"]
    if finished(args, killed, stage):  # an interrupted bench finished it: measure afresh
        shutil.rmtree(args.run_root / killed)
    prepare(args, killed, stage)
    print(f"{stage}: reference {common.format_duration(reference_s)}; killing {args.kills} times", flush=True)
    attempts = killed_attempts(args, killed, stage, reference_s, rng)
    # After a kill with saved progress, the next attempt that got as far as saying so must continue it
    # (one killed before saying anything did not touch the progress); None: nothing was saved yet.
    decided = attempts["continued"]
    resumed = [next((c for c in decided[index + 1:] if c is not None), None) if kill["progress_saved"] else None
               for index, kill in enumerate(attempts["kills"])]
    return {"stage": stage, "reference_s": reference_s, **attempts, "resumed": resumed,
            "checkpoint_minutes": args.checkpoint_minutes.get(stage), **compare(args, stage)}


def render(results: list[dict], header: dict, kills: int) -> tuple[str, list[common.TargetCheck]]:
    rows, checks = [], []
    for r in results:
        lost = [k["lost_s"] for k in r["kills"]]
        judged = [x for x in r["resumed"] if x is not None]
        interval = r["checkpoint_minutes"]
        closeness = (f"max weight diff {r['max_weight_difference']:.1e}" if "max_weight_difference" in r
                     else f"trials {r['trials'][0]} / {r['trials'][1]}")
        rows.append([r["stage"], common.format_duration(r["reference_s"]), common.format_duration(r["total_s"]),
                     str(len(r["kills"])), f"{sum(judged)}/{len(judged)}",
                     ", ".join(common.format_duration(x) for x in lost) or "-",
                     common.format_duration(max(lost, default=None)), closeness])
        checks.append(common.TargetCheck(f"{r['stage']}: resumed after a kill with saved progress", "all",
                                         f"{sum(judged)}/{len(judged)}", all(judged) if judged else None))
        if interval is not None and lost:
            checks.append(common.TargetCheck(f"{r['stage']}: work lost per kill", f"<= {interval:g} min + start-up",
                                             common.format_duration(max(lost)), max(lost) <= 60 * interval + 60))
    table = common.markdown_table(["stage", "uninterrupted", "killed, total", "kills", "resumed", "lost per kill",
                                   "max lost", "result vs uninterrupted"], rows, align="lrrrrlrl")
    text = "\n".join([
        "# kill -9 during the long stages",
        "",
        *common.provenance_lines(header),
        "",
        "Each stage killed with SIGKILL and started again after every kill: search at random points of its "
        "uninterrupted wall time, finetune and train-supernet at a random point of their second checkpoint interval; "
        "`lost` is how long before the kill the stage had last saved progress (a Trainer checkpoint, a "
        "finished search trial), or the whole attempt when it had saved none; `resumed` counts the kills after "
        "which progress had been saved, and how many of them the next attempt continued.",
        "",
        table,
        "",
        common.targets_table(checks),
    ])
    return text, checks


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE)
    parser.add_argument("--stages", nargs="+", choices=LONG_STAGES, default=list(LONG_STAGES))
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="the runs' seed and the kill points'")
    parser.add_argument("--min-attempt", type=float, default=20.0, help=(
        "seconds an attempt runs at least before its kill: long enough to load and say whether it continues"))
    parser.add_argument("--run-root", type=Path, default=Path("runs/resume"))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--smoke", action="store_true", help="tiny random model and data in a temp folder")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides for every run")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, scratch: Path | None) -> int:
    from eftnas_cli.recipe import load_recipe

    if scratch is not None:
        args.recipe = common.write_smoke_recipe(scratch, {"finetune.epochs": 3, "supernet.epochs": 3,
                                                            "finetune.checkpoint_minutes": 0.05,
                                                            "supernet.checkpoint_minutes": 0.05})
        args.run_root, args.out = scratch / "runs", scratch / "report.md"
        args.kills, args.min_attempt = min(args.kills, 2), 8.0
    recipe = load_recipe(args.recipe, args.overrides)
    args.name = recipe.name
    args.checkpoint_minutes = {"finetune": recipe.finetune.checkpoint_minutes,
                               "train-supernet": recipe.supernet.checkpoint_minutes}
    store = args.out.with_suffix(".json")
    header = common.provenance("cpu", {"kills per stage": str(args.kills)})
    # Finished stages are kept only for the same command: other settings measure something else.
    kept = json.loads(store.read_text()) if store.is_file() and scratch is None else None
    same = kept is not None and kept["header"]["command"] == header["command"]
    done = {r["stage"]: r for r in kept["results"]} if same else {}
    rng = random.Random(args.seed)
    results, text, checks = [], "", []
    for stage in args.stages:
        result = done.get(stage) or bench_stage(args, stage, rng)
        results.append(result)
        text, checks = render(results, header, args.kills)
        common.write_report(args.out, text)
        store.write_text(json.dumps({"header": header, "results": results,
                                     "targets": [c.as_dict() for c in checks]}, indent=2))
    print(text)
    common.print_target_summary([c.as_dict() for c in checks])
    return 0


def main(argv=None) -> int:
    return common.main_with_smoke(parse_args(argv), run, "eftnas-bench-resume-smoke-")


if __name__ == "__main__":
    sys.exit(main())
