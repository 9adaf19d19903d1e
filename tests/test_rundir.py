import json
import os
import shutil
import stat

import pytest

from eftnas_cli.errors import Interrupted
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


def test_the_lock_is_reentrant_within_a_process_and_gone_at_rest(write_recipe):
    path = write_recipe()
    run = RunDir(load_recipe(path))
    with run.lock("run"):
        owner = json.loads((run.path / ".lock.owner").read_text())
        assert owner["pid"] == os.getpid() and owner["command"] == "run"
        # Each stage takes the lock again, through another RunDir of the same recipe.
        finish(RunDir(load_recipe(path)), "finetune")
        assert json.loads((run.path / ".lock.owner").read_text())["command"] == "run"
    assert run.record("finetune") is not None
    assert [p.name for p in run.path.iterdir() if p.name.startswith(".")] == []


def test_an_interrupted_stage_names_itself_and_keeps_finished_stages(write_recipe):
    run = RunDir(load_recipe(write_recipe()))
    finish(run, "finetune", "teacher")
    manifest = run.manifest_path.read_bytes()
    with pytest.raises(Interrupted) as interrupted:
        with run.lock("run"):
            with run.stage("importance") as out:
                (out.dir / "scores.bin").write_text("half")
                raise KeyboardInterrupt
    assert interrupted.value.command == "importance"
    assert (run.stage_dir("finetune") / "model.bin").read_text() == "teacher"
    assert run.manifest_path.read_bytes() == manifest
    assert sorted(p.name for p in run.path.iterdir()) == ["finetune", "manifest.json", "recipe.yaml"]


def test_leftovers_of_killed_stages_are_cleared_at_the_next_start(write_recipe):
    run = RunDir(load_recipe(write_recipe()))
    finish(run, "finetune", "teacher")
    killed_stage = run.path / ".importance.tmp-k1ll3d"
    (killed_stage / "sub").mkdir(parents=True)
    (killed_stage / "sub" / "scores.bin").write_text("half")
    (run.path / ".manifest.json.tmp-k1ll3d").write_text("{")
    # Killed between the two renames that replace a finished stage: the old folder goes back.
    os.replace(run.stage_dir("finetune"), run.path / ".finetune.replaced-k1ll3d")
    finish(run, "gen-space")
    assert sorted(p.name for p in run.path.iterdir()) == ["finetune", "manifest.json", "recipe.yaml", "space"]
    assert run.require("finetune", by="test") == run.stage_dir("finetune")


def test_a_replaced_stage_folder_aside_is_dropped_when_the_new_one_arrived(write_recipe):
    run = RunDir(load_recipe(write_recipe()))
    finish(run, "finetune", "first")
    shutil.copytree(run.stage_dir("finetune"), run.path / ".finetune.replaced-0ld")
    finish(run, "finetune", "second")
    assert (run.stage_dir("finetune") / "model.bin").read_text() == "second"
    assert not list(run.path.glob(".finetune.replaced-*"))


@pytest.mark.parametrize("umask,folder_mode,file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_run_directories_get_ordinary_permissions(write_recipe, umask, folder_mode, file_mode):
    run = RunDir(load_recipe(write_recipe()))
    previous = os.umask(umask)
    try:
        finish(run, "finetune")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(run.stage_dir("finetune").stat().st_mode) == folder_mode
    for name in ("manifest.json", "recipe.yaml", "finetune/model.bin"):
        assert stat.S_IMODE((run.path / name).stat().st_mode) == file_mode, name


def test_a_corrupt_manifest_is_one_line_naming_it(write_recipe):
    run = RunDir(load_recipe(write_recipe()))
    finish(run, "finetune")
    run.manifest_path.write_text("[1, 2")
    with pytest.raises(UpstreamError, match=r"manifest.json: not valid JSON \(line 1\)"):
        run.record("finetune")


def test_a_stage_recorded_before_a_recipe_key_existed_stays_current_at_its_default(write_recipe):
    """A key a newer eftnas added (here task.doc_stride, finetune.checkpoint_minutes) does not make
    an older run's finished stage stale while it keeps its default; changed, it does."""
    from eftnas_cli.stages.finetune import finetune

    path = write_recipe()
    recipe = load_recipe(path)
    finetune(recipe)
    run = RunDir(recipe)
    manifest = json.loads(run.manifest_path.read_text())
    record = manifest["stages"]["finetune"]
    del record["shared"]["task"]["doc_stride"], record["recipe"]["checkpoint_minutes"]  # as an older eftnas wrote it
    run.manifest_path.write_text(json.dumps(manifest))
    assert RunDir(load_recipe(path)).is_current("finetune")
    assert not RunDir(load_recipe(path, ["task.doc_stride=64"])).is_current("finetune")
    assert not RunDir(load_recipe(path, ["finetune.checkpoint_minutes=5"])).is_current("finetune")


def test_a_new_key_whose_default_changed_the_training_makes_older_stages_stale(write_recipe):
    """finetune.group_by_length arrived defaulting to on; runs recorded before it trained without:
    they are redone at the default and stay current with the key off."""
    from eftnas_cli.stages.finetune import finetune

    path = write_recipe()
    recipe = load_recipe(path, ["finetune.group_by_length=false"])
    finetune(recipe)
    run = RunDir(recipe)
    manifest = json.loads(run.manifest_path.read_text())
    del manifest["stages"]["finetune"]["recipe"]["group_by_length"]  # as an older eftnas wrote it
    run.manifest_path.write_text(json.dumps(manifest))
    assert RunDir(load_recipe(path, ["finetune.group_by_length=false"])).is_current("finetune")
    assert not RunDir(load_recipe(path)).is_current("finetune")

