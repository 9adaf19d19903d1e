"""The benchmark scripts end to end on the tiny model (`--smoke`), as a user runs them."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = REPO_ROOT / "scripts"
# A smoke run takes well under a minute; the limit only stops a hung one.
TIMEOUT_S = 300


def run_script(name: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS / name), *map(str, args)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=TIMEOUT_S)


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Every markdown table in `text`: rows of stripped cells, header first, the rule dropped."""
    tables, current = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if not all(set(cell) <= set("-:") for cell in cells):
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    return tables


def table_with_header(text: str, first_column: str) -> list[list[str]]:
    matches = [table for table in markdown_tables(text) if table[0][0] == first_column]
    assert len(matches) == 1, f"one table starting with {first_column!r} expected in:\n{text}"
    return matches[0]


def check_targets(text: str, expected_rows: int) -> None:
    targets = table_with_header(text, "scope")
    assert targets[0] == ["scope", "target", "measured", "verdict"]
    assert len(targets) - 1 == expected_rows
    assert {row[3] for row in targets[1:]} <= {"met", "MISSED", "n/a"}


def test_bench_quality_smoke(tmp_path):
    out = tmp_path / "benchmarks.md"
    result = run_script("bench_quality.py", "--smoke", "--out", out, "--run-root", tmp_path / "runs")
    assert result.returncode == 0, result.stdout + result.stderr

    accuracy, f1 = [table for table in markdown_tables(result.stdout) if table[0][0] == "method"]  # MRPC: both
    table = accuracy
    assert table[0] == f1[0] == ["method", "@ 0.8", "@ 0.6"]
    assert [row[0] for row in table[1:]] == [
        "teacher (dense)", "eftnas (searched subnet)", "eftnas + polish (KD fine-tune of the subnet)",
        "(a) pruned, no retraining", "(b) pruned + KD fine-tune", "(c) uniform width (super-network)",
        "(d) layer drop + KD",
    ]
    by_method = {row[0]: row[1:] for row in table[1:]}
    for row in table[2:]:
        assert row[2] != "-", row  # every method at the main budget
    # Methods that train per budget run at the main budget only; the others at the extra one too.
    for method in ("eftnas + polish (KD fine-tune of the subnet)", "(b) pruned + KD fine-tune", "(d) layer drop + KD"):
        assert by_method[method][0] == "-"
    assert "±" in by_method["eftnas (searched subnet)"][0]
    # retention, beats (a), within 0.5 of (b), beats (c) and (d), polish >= (b), at 0.6 and 0.8; training time
    targets = table_with_header(result.stdout, "scope")
    assert {row[3] for row in targets[1:]} <= {"met", "MISSED", "n/a"}
    assert any(row[1].startswith("eftnas training time") for row in targets[1:])
    cost = {row[0]: row[2] for row in table_with_header(result.stdout, "what")[1:]}
    assert re.search(r"the unpolished weights kept in \d of 2 seeds \(\d compared on unread search rows\)",
                     cost["eftnas + polish (KD fine-tune of the subnet) @ 0.6"])

    assert out.read_text() in result.stdout
    results = json.loads((tmp_path / "benchmarks_quality.json").read_text())
    cells = results["tasks"]["mrpc"]["cells"]
    assert sorted({c["seed"] for c in cells}) == [0, 1]
    assert {(c["method"], c["budget"]) for c in cells if c["seed"] == 0} == {
        ("teacher", 1.0), *((m, 0.8) for m in ("eftnas", "a", "c")),
        *((m, 0.6) for m in ("eftnas", "eftnas+polish", "a", "b", "c", "d"))}
    assert all(c["macs_ratio"] <= c["budget"] + 1e-9 for c in cells if c["macs_ratio"] is not None)
    for polished in (c for c in cells if c["method"] == "eftnas+polish"):
        choice = polished["polish"]
        scores = [choice["start_score"] if choice["start_competes"] else float("-inf"), *choice["epoch_scores"]]
        assert scores[choice["kept_epoch"]] == max(scores)
    summary = {(e["method"], e["budget"], e["metric"]): e for e in results["summary"]}
    entry = summary[("eftnas", 0.6, "accuracy")]
    assert entry["seeds"] == [0, 1] and entry["task"] == "mrpc"
    scores = [100 * c["metrics"]["accuracy"] for c in cells if (c["method"], c["budget"]) == ("eftnas", 0.6)]
    assert entry["mean"] == pytest.approx(sum(scores) / 2)
    assert summary[("teacher", 1.0, "accuracy")]["retention_mean"] == pytest.approx(1.0)
    assert ("eftnas", 0.6, "f1") in summary  # MRPC reports F1 beside accuracy

    # The scripts that choose defaults on a finished run's search rows.
    rows = run_script("bench_search_rows.py", "--run", tmp_path / "runs" / "mrpc-s1", "--rows", "4", "--budgets", "0.6",
                      "--precisions", "no", "bf16", "--out", tmp_path / "rows.md")
    assert rows.returncode == 0, rows.stdout + rows.stderr
    header, *table = table_with_header(rows.stdout, "budget")
    assert header[1:] == ["all 8 rows", "all 8 rows bf16", "4 rows", "4 rows bf16", "all-bf16 − all", "4 − all", "4-bf16 − all"]
    assert [row[0] for row in table] == ["0.6", "search wall time"]
    capped = json.loads((tmp_path / "runs" / "mrpc-s1" / "bench" / "rows-4" / "search" / "pareto.json").read_text())
    assert capped["eval_rows"] == 4  # the capped search read 4 rows, the scores the other 4
    assert capped["mixed_precision"] == "no"
    half = json.loads((tmp_path / "runs" / "mrpc-s1" / "bench" / "rows-4-bf16" / "search" / "pareto.json").read_text())
    assert half["eval_rows"] == 4 and half["mixed_precision"] == "bf16"
    # The full search runs in a copy too, with every search row, whatever the run's own search read.
    full = json.loads((tmp_path / "runs" / "mrpc-s1" / "bench" / "rows-all" / "search" / "pareto.json").read_text())
    assert full["eval_rows"] == 8
    assert "each reads 4 search rows of 8 (search.max_eval_samples)" in rows.stdout + rows.stderr
    assert json.loads((tmp_path / "rows.json").read_text())["runs"][0]["unread_rows"] == 4
    # A copy of another super-network than the run's (the run retrained since) is made again.
    copy_manifest = tmp_path / "runs" / "mrpc-s1" / "bench" / "rows-4" / "manifest.json"
    stale = json.loads(copy_manifest.read_text())
    stale["stages"]["train-supernet"]["outputs"]["supernet/model/model.safetensors"] = "0" * 64
    copy_manifest.write_text(json.dumps(stale))
    again = run_script("bench_search_rows.py", "--run", tmp_path / "runs" / "mrpc-s1", "--rows", "4", "--budgets", "0.6",
                       "--out", tmp_path / "rows.md")
    assert again.returncode == 0, again.stdout + again.stderr
    said = again.stdout + again.stderr
    assert "train-supernet: up to date, skipped" in said and "search: starting a study" in said  # copied, not retrained
    assert json.loads(copy_manifest.read_text())["stages"]["train-supernet"]["outputs"] == \
        json.loads((tmp_path / "runs" / "mrpc-s1" / "manifest.json").read_text())["stages"]["train-supernet"]["outputs"]
    polish = run_script("bench_polish.py", "--run", tmp_path / "runs" / "mrpc-s1", "--lr", "1e-3", "1e-4",
                        "--epochs", "1", "2", "--budgets", "0.6", "--out", tmp_path / "polish.md")
    assert polish.returncode == 0, polish.stdout + polish.stderr
    header, *table = table_with_header(polish.stdout, "budget")
    settings = [f"{e} epoch(s), lr {lr}" for e in (1, 2) for lr in ("0.001", "0.0001")]
    assert header[3:] == [f"{s} (− unpolished)" for s in settings] + [f"{s} − {settings[0]}" for s in settings[1:]]
    assert [row[0] for row in table] == ["0.6"]
    polished = json.loads((tmp_path / "runs" / "mrpc-s1" / "bench" / "polish_lr.json").read_text())
    assert sorted(key.split("-", 1)[1] for key in polished) == ["e1-lr0.0001", "e1-lr0.001", "e2-lr0.0001", "e2-lr0.001"]
    assert {e["score"] for e in polished.values()} <= {i / 8 for i in range(9)}

    # Resumable from the cells kept beside the report: a second run, even without the first's run
    # directories, finds every cell finished and runs nothing.
    assert (tmp_path / "benchmarks_quality_cells.json").is_file()
    shutil.rmtree(tmp_path / "runs" / "mrpc-s0")
    again = run_script("bench_quality.py", "--smoke", "--out", out, "--run-root", tmp_path / "runs")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "measuring" not in again.stdout + again.stderr and "eftnas pipeline" not in again.stdout + again.stderr
    assert json.loads((tmp_path / "benchmarks_quality.json").read_text())["summary"] == results["summary"]
    # --remeasure measures the named method's cells again, and only those.
    remeasured = run_script("bench_quality.py", "--smoke", "--out", out, "--run-root", tmp_path / "runs", "--remeasure", "b")
    assert remeasured.returncode == 0, remeasured.stdout + remeasured.stderr
    said = (remeasured.stdout + remeasured.stderr).splitlines()
    measured = {line.split(":")[0] for line in said if line.rstrip().endswith(": measuring")}
    assert measured == {"mrpc/s0/b/0.6", "mrpc/s1/b/0.6"}


def test_bench_speed_smoke(tmp_path):
    out = tmp_path / "speed.md"
    result = run_script("bench_speed.py", "--smoke", "--out", out)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ONNX Runtime and OpenVINO latency" in result.stdout + result.stderr

    table = table_with_header(result.stdout, "model")
    assert table[0] == ["model", "MACs ratio", "backend", "b1 ms", "b1 speed-up", "b32 ms", "b32 speed-up"]
    backends = [row[2] for row in table[1:6]]
    assert backends[0] == "torch fp32 (cpu)" and backends[1:3] == ["ONNX Runtime fp32", "OpenVINO f32"]
    assert backends[3].startswith("OpenVINO default (") and backends[4] == "OpenVINO INT8"
    assert [row[0] for row in table[1:]] == ["dense (teacher)"] * 5 + ["budget 0.6"] * 5
    assert table[1][4] == table[1][6] == "1.00x"  # the reference of every speed-up
    assert float(table[6][1]) <= 0.6

    steps = table_with_header(result.stdout, "super-network subnet")
    assert [row[0] for row in steps[1:]] == ["largest", "smallest"]
    # OpenVINO at both batch sizes, the n/a torch check (no budget <= 0.5), the training step
    check_targets(result.stdout, expected_rows=4)
    assert out.read_text() in result.stdout and out.with_suffix(".json").is_file()


def test_bench_speed_torch_only_builds_no_deploy_files(tmp_path):
    result = run_script("bench_speed.py", "--smoke", "--torch-only", "--out", tmp_path / "speed.md")
    assert result.returncode == 0, result.stdout + result.stderr
    table = table_with_header(result.stdout, "model")
    assert [(row[0], row[2]) for row in table[1:]] == [("dense (teacher)", "torch fp32 (cpu)"), ("budget 0.6", "torch fp32 (cpu)")]
    assert "ONNX Runtime and OpenVINO latency" not in result.stdout + result.stderr
    check_targets(result.stdout, expected_rows=2)  # the n/a torch check and the training step


def test_bench_speed_without_a_run_says_what_to_do(tmp_path):
    result = run_script("bench_speed.py", "--run", tmp_path / "missing")
    assert result.returncode == 2
    assert "make quickstart" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_bench_ranking_smoke():
    result = run_script("bench_ranking.py", "--smoke")
    assert result.returncode == 0, result.stdout + result.stderr
    curve = markdown_tables(result.stderr)[0]  # the report is printed on the console (stderr)
    rankings = {row[0] for row in curve[1:]}
    assert {"teacher (dense)", "taylor", "movement", "magnitude", "random"} <= rankings
    assert {row[1] for row in curve[1:]} == {"-", "global", "uniform"}
    assert "default by the search-row curve:" in result.stderr


def test_cell_fingerprints_follow_what_each_method_reads(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import bench_quality

    from eftnas_cli.recipe import load_recipe

    def recipe(*overrides):
        return load_recipe(REPO_ROOT / "configs" / "quickstart.yaml", list(overrides))

    base = recipe()

    def fingerprint(changed, method):
        return bench_quality.fingerprint(changed, base, method, 0.5, 1.0)

    sandwich, search, kd = recipe("supernet.random_subnets=spread"), recipe("search.trials=40"), recipe("supernet.epochs=3")
    for method in ("a", "b", "d"):  # one fixed subnet each: the sandwich and the search do not touch them
        assert fingerprint(sandwich, method) == fingerprint(search, method) == fingerprint(base, method)
    assert fingerprint(search, "c") == fingerprint(base, "c")  # (c) reads the super-network, not the search
    assert fingerprint(kd, "b") != fingerprint(base, "b")  # (b) trains with the super-network's settings
    for method in ("eftnas", "eftnas+polish", "c"):
        assert fingerprint(sandwich, method) != fingerprint(base, method)
    assert fingerprint(search, "eftnas") != fingerprint(base, "eftnas")
    choice = recipe("search.tie_standard_errors=0")  # how the result is read: only eftnas's cells change
    for method in ("a", "b", "c", "d", "teacher"):
        assert fingerprint(choice, method) == fingerprint(base, method)
    for method in ("eftnas", "eftnas+polish"):
        assert fingerprint(choice, method) != fingerprint(base, method)
    export = recipe("export.calibration_samples=64")  # only the polish reads the export section
    for method in ("teacher", "a", "b", "c", "d", "eftnas"):
        assert fingerprint(export, method) == fingerprint(base, method)
    assert fingerprint(export, "eftnas+polish") != fingerprint(base, "eftnas+polish")
    # The polish's own lr moves its cells only; null (the super-network's) keeps the cells measured before the key.
    polish_lr = recipe("export.finetune_learning_rate=3e-5")
    for method in ("teacher", "a", "b", "c", "d", "eftnas"):
        assert fingerprint(polish_lr, method) == fingerprint(base, method)
    assert fingerprint(polish_lr, "eftnas+polish") != fingerprint(base, "eftnas+polish")
    # Other search rows change what every run trains on (and what the search reads): every cell moves.
    search_split = recipe("task.search_split=dev")
    for method in ("teacher", "a", "b", "c", "d", "eftnas", "eftnas+polish"):
        assert fingerprint(search_split, method) != fingerprint(base, method)
        assert bench_quality.fingerprint(base, search_split, method, 0.5, 1.0) != fingerprint(base, method)
    # The shared teacher is decided by its fine-tune: a later stage's setting in its recipe moves no cell.
    for later in ("search.trials=40", "supernet.epochs=3", "export.calibration_samples=64"):
        assert bench_quality.fingerprint(base, recipe(later), "b", 0.5, 1.0) == fingerprint(base, "b")
    assert bench_quality.fingerprint(base, recipe("finetune.epochs=1"), "b", 0.5, 1.0) != fingerprint(base, "b")


def test_bench_polish_refuses_a_setting_that_is_not_positive():
    for bad in (["--epochs", "0"], ["--lr=-1e-5"]):
        result = run_script("bench_polish.py", "--run", "runs/none", *bad)
        assert result.returncode == 2 and "--epochs and --lr take positive numbers" in result.stderr


def test_seeds_default_per_task_and_one_list_for_every_task_when_given(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import bench_quality

    default = bench_quality.parse_args([])
    assert bench_quality.task_seeds("mrpc", default) == [0, 1, 2, 3, 4]  # 408 validation rows: more seeds
    assert bench_quality.task_seeds("sst2", default) == [0, 1, 2]
    given = bench_quality.parse_args(["--seeds", "7", "8"])
    assert bench_quality.task_seeds("mrpc", given) == bench_quality.task_seeds("sst2", given) == [7, 8]


def test_the_polish_runs_at_the_trained_budgets_and_where_a_retention_target_is_set(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import bench_quality

    def polished(argv):
        return sorted(budget for method, budget in bench_quality.cell_plan(bench_quality.parse_args(argv))
                      if method == "eftnas+polish")

    assert polished([]) == [0.25, 0.35, 0.5]  # not 0.7: no target there
    assert polished(["--polish-budgets", "0.7"]) == [0.7]
    assert polished(["--polish-epochs", "0"]) == []
    result = run_script("bench_quality.py", "--polish-budgets", "0.6")
    assert result.returncode == 2 and "--polish-budgets must be among --budgets and --extra-budgets" in result.stderr


def test_bench_choice_cross_validation_prefers_more_macs_only_among_near_ties(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import bench_choice

    full = 1000
    labels = [1] * 200
    good = [1] * 160 + [0] * 40
    trials = [{"trial": 0, "macs": 400, "score": 0.8}, {"trial": 1, "macs": 480, "score": 0.8},  # the same rows right
              {"trial": 2, "macs": 500, "score": 0.5}]  # far worse
    rows = {"labels": labels, "predictions": [good, good, [1] * 100 + [0] * 100]}
    result = bench_choice.cross_validate(trials, rows, full, [0.5, 0.45], [0, 0.5], splits=20, seed=0)
    for k in ("0", "0.5"):
        assert result["0.5"][k] == {"gain": 0.0, "macs_ratio": 0.48}  # the tie goes to more MACs, never to trial 2
        assert result["0.45"][k] == {"gain": 0.0, "macs_ratio": 0.4}


def test_run_reading_benchmarks_refuse_a_folder_that_is_no_run(tmp_path):
    for script in ("bench_choice.py", "bench_polish.py", "bench_search_rows.py"):
        result = run_script(script, "--run", tmp_path / "no-run", "--out", tmp_path / "report.md")
        said = result.stdout + result.stderr
        assert result.returncode == 2, said
        assert "recipe file not found" in said and "Traceback" not in said, said
        assert not (tmp_path / "report.md").exists()


def test_supernet_ablation_pairs_unread_row_scores_with_the_first_variant(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import bench_supernet

    args = bench_supernet.parse_args(["--variants", "recipe", "random-0", "--budgets", "0.5"])

    def result(variant, seed, score):
        return {"variant": variant, "seed": seed, "unread_rows": 100, "unread": {"0.5": score}, "search_wall_s": 60.0}

    results = [result("recipe", 0, 0.80), result("random-0", 0, 0.83), result("recipe", 1, 0.90), result("random-0", 1, 0.92)]
    table = table_with_header("\n".join(bench_supernet.unread_section(results, args)), "variant")
    assert table[1][:3] == ["recipe", "2", "85.00 ± 7.07"]
    assert table[2][:3] == ["random-0", "2", "87.50 ± 6.36 (+2.50 ± 0.71)"]  # seed by seed: +3 and +2
    # A search that read every search row leaves nothing to score on unread rows: no table.
    assert bench_supernet.unread_section([{**r, "unread": {}, "unread_rows": 0} for r in results], args) == []


def test_supernet_ablation_pairs_search_row_and_panel_scores_with_the_first_variant(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import bench_supernet

    args = bench_supernet.parse_args(["--variants", "recipe", "lr-3e-5", "--budgets", "0.5", "0.35"])

    def result(variant, seed, best, panel):
        return {"variant": variant, "seed": seed, "overrides": [] if variant == "recipe" else ["supernet.learning_rate=3.0e-5"],
                "search_rows": 367, "teacher_score": 0.78, "best": {"0.5": best, "0.35": best - 0.02},
                "panel": {"0.5": panel, "0.35": None}, "unread": {}, "unread_rows": 0, "supernet_wall_s": 60.0,
                "search_wall_s": 30.0}

    results = [result("recipe", 0, 0.76, 0.74), result("lr-3e-5", 0, 0.78, 0.75),
               result("recipe", 1, 0.70, 0.72), result("lr-3e-5", 1, 0.71, 0.74)]
    header = {"command": "c", "date": "d", "device": "cpu", "machine": {"nproc": 2, "cpu": "x"}, "versions": {}}
    report = bench_supernet.render(results, args, header)
    best, panel = [table for table in markdown_tables(report) if table[0][0] == "variant"]
    assert best[1][3] == "73.00 ± 4.24"  # the reference: no difference of its own
    assert best[2][3] == "74.50 ± 4.95 (+1.50 ± 0.71)"  # seed by seed: +2 and +1
    assert panel[2][1:] == ["74.50 ± 0.71 (+1.50 ± 0.71)", "-"]  # a band no panel subnet reached stays "-"


def test_supernet_ablation_bad_recipe_input_is_one_line(tmp_path):
    result = run_script("bench_supernet.py", "--task", "no-such-task", "--out", tmp_path / "report.md")
    said = result.stdout + result.stderr
    assert result.returncode == 2, said
    assert "task.name: unknown task 'no-such-task'" in said and "Traceback" not in said, said
    assert not (tmp_path / "report.md").exists()
