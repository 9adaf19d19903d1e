import json

import pytest

from eftnas_cli.recipe import load_recipe
from eftnas_cli.rundir import RunDir, UpstreamError


def finish(run: RunDir, stage: str, text: str = "weights") -> None:
    with run.stage(stage) as out:
        (out.dir / "model.bin").write_text(text)
        out.metrics = {"score": 1.0}


def test_a_failing_stage_leaves_no_run_directory(write_recipe):
    run = RunDir(load_recipe(write_recipe()))
    with pytest.raises(KeyboardInterrupt):
        with run.stage("finetune") as out:
            (out.dir / "half-written.bin").write_text("x")
            raise KeyboardInterrupt
    assert not run.path.exists()


def test_a_failing_rerun_keeps_the_previous_output(write_recipe):
    run = RunDir(load_recipe(write_recipe()))
    finish(run, "finetune", "first")
    with pytest.raises(RuntimeError):
        with run.stage("finetune") as out:
            (out.dir / "model.bin").write_text("second")
            raise RuntimeError("killed")
    assert (run.stage_dir("finetune") / "model.bin").read_text() == "first"
    assert [p.name for p in run.path.iterdir() if p.name.startswith(".")] == []


def test_manifest_records_outputs_inputs_versions_and_metrics(write_recipe, tmp_path):
    run = RunDir(load_recipe(write_recipe()))
    finish(run, "finetune")
    source = tmp_path / "input.txt"
    source.write_text("data")
    with run.stage("importance") as out:
        out.add_input(source)
        (out.dir / "scores.bin").write_text("s")
    record = json.loads(run.manifest_path.read_text())["stages"]["importance"]
    assert list(record["inputs"]) == [str(source.resolve())]
    assert list(record["outputs"]) == ["importance/scores.bin"]
    assert "transformers" in record["versions"] and record["wall_time_s"] >= 0
    assert (run.path / "recipe.yaml").is_file()


def test_require_names_the_stage_to_run_first_and_detects_changes(write_recipe):
    run = RunDir(load_recipe(write_recipe()))
    with pytest.raises(UpstreamError, match="run `eftnas finetune` first"):
        run.require("finetune", by="importance")
    finish(run, "finetune")
    assert run.require("finetune", by="importance") == run.stage_dir("finetune")
    (run.stage_dir("finetune") / "model.bin").write_text("tampered")
    with pytest.raises(UpstreamError, match="changed since"):
        run.require("finetune", by="importance")


def test_is_current_follows_the_recipe_section_and_inputs(write_recipe, tmp_path):
    path = write_recipe()
    run = RunDir(load_recipe(path))
    source = tmp_path / "input.txt"
    source.write_text("v1")
    with run.stage("finetune") as out:
        out.add_input(source)
        (out.dir / "model.bin").write_text("w")
    assert run.is_current("finetune")
    assert not RunDir(load_recipe(path, ["finetune.epochs=7"])).is_current("finetune")
    assert not RunDir(load_recipe(path, ["seed=123"])).is_current("finetune")
    source.write_text("v2")
    assert not run.is_current("finetune")


def test_a_run_directory_of_another_task_is_refused(write_recipe):
    path = write_recipe()
    finish(RunDir(load_recipe(path)), "finetune")
    with pytest.raises(UpstreamError, match="was made for model"):
        RunDir(load_recipe(path, ["task.name=sst2"])).check_same_recipe()


def test_wall_time_counts_from_when_the_work_started(write_recipe):
    import time

    run = RunDir(load_recipe(write_recipe()))
    with run.stage("search", started=time.perf_counter() - 5):
        pass
    assert run.record("search")["wall_time_s"] >= 5
