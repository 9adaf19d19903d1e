"""Bad input, a second writer and interruptions never cost finished work.

The catalogue runs each bad input through the real command line against a run directory that holds
a finished tiny `finetune`: exit code 2, exactly one line, no traceback, and not one byte (or folder)
changed under the test's folder. Then: a second process is refused while a first holds the run
directory; a killed holder neither blocks nor leaves its temporary folder for long; a failing or
interrupted (SIGTERM) stage leaves the finished stages and the manifest as they were.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml
from typer.testing import CliRunner

from eftnas_cli.cli import app
from eftnas_cli.recipe import MAX_RECIPE_BYTES, load_recipe
from eftnas_cli.rundir import RunDir, sha256
from eftnas_cli.testing import make_tiny_task_dir, write_tiny_recipe

# An error line quotes a short excerpt of a value at most; paths make up the rest.
MAX_LINE_CHARS = 500


def tree_bytes(root: Path) -> dict[str, str]:
    """The sha256 of every file and the name of every folder under `root` (hidden ones included)."""
    return {str(p.relative_to(root)): sha256(p) if p.is_file() else "folder" for p in sorted(root.rglob("*"))}


def output_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def finished_run_template(tmp_path_factory, tiny_model_dir, tiny_glue_dir) -> Path:
    """A run directory holding one real finished tiny stage (`finetune`), copied by each test."""
    root = tmp_path_factory.mktemp("finished")
    recipe = write_tiny_recipe(root / "recipe.yaml", root / "runs", tiny_model_dir, tiny_glue_dir, {"finetune.max_steps": 2})
    result = CliRunner().invoke(app, ["finetune", str(recipe)])
    assert result.exit_code == 0, result.output
    return root / "runs" / "tiny"


@dataclass
class Workspace:
    """Everything a case may touch lives under `root`, whose bytes the test compares."""

    root: Path
    recipe: Path
    run_dir: Path
    model_dir: Path

    def write(self, name: str, content: str | bytes) -> Path:
        path = self.root / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path


@pytest.fixture
def workspace(tmp_path, write_recipe, finished_run_template, tiny_model_dir, monkeypatch) -> Workspace:
    # No case may wait on the network; the hub's own retries take half a minute offline.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = write_recipe()
    run_dir = load_recipe(recipe).run_dir
    shutil.copytree(finished_run_template, run_dir)
    return Workspace(tmp_path, recipe, run_dir, tiny_model_dir)


def finetune(*overrides: str) -> Callable[[Workspace], list[str]]:
    return lambda ws: ["finetune", str(ws.recipe), *overrides]


def recipe_text(text: str | bytes) -> Callable[[Workspace], list[str]]:
    return lambda ws: ["finetune", str(ws.write("written.yaml", text))]


def recipe_changes(changes: dict) -> Callable[[Workspace], list[str]]:
    def argv(ws: Workspace) -> list[str]:
        data = yaml.safe_load(ws.recipe.read_text())
        for key, value in changes.items():
            section, _, leaf = key.rpartition(".")
            (data.setdefault(section, {}) if section else data)[leaf] = value
        return ["finetune", str(ws.write("changed.yaml", yaml.safe_dump(data)))]

    return argv


def alias_bomb(key_line: str) -> str:
    """Six levels of ten aliases: a million leaves once expanded, from a few hundred bytes."""
    levels = ["l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    for level in range(1, 6):
        previous = f"*l{level - 1}"
        levels.append(f"l{level}: &l{level} [{', '.join([previous] * 10)}]")
    return "\n".join(levels) + f"\n{key_line}\n"


def corrupt_manifest(content: str) -> Callable[[Workspace], list[str]]:
    def argv(ws: Workspace) -> list[str]:
        (ws.run_dir / "manifest.json").write_text(content)
        return ["finetune", str(ws.recipe)]

    return argv


def model_with_config(content: str, command: str) -> Callable[[Workspace], list[str]]:
    def argv(ws: Workspace) -> list[str]:
        folder = ws.root / "broken-model"
        shutil.copytree(ws.model_dir, folder)
        (folder / "config.json").write_text(content)
        if command == "profile":
            return ["profile", str(folder)]
        return ["finetune", str(ws.recipe), f"model.name={folder}"]

    return argv


def output_dir_file(ws: Workspace) -> list[str]:
    return ["finetune", str(ws.recipe), f"output_dir={ws.write('a-file', 'not a folder')}"]


def output_dir_read_only(ws: Workspace) -> list[str]:
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders; the /sys case covers a read-only output_dir")
    folder = ws.root / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return ["finetune", str(ws.recipe), f"output_dir={folder}"]


def glue_with(change: Callable[[Path], None]) -> Callable[[Workspace], list[str]]:
    """The tiny GLUE folder, copied into the workspace and changed by `change(task folder)`."""

    def argv(ws: Workspace) -> list[str]:
        data_dir = yaml.safe_load(ws.recipe.read_text())["task"]["data_dir"]
        copy = ws.root / "glue"
        shutil.copytree(data_dir, copy)
        change(copy / "mrpc")
        return ["finetune", str(ws.recipe), f"task.data_dir={copy}", "name=fresh"]

    return argv


def rewrite_split(split_file: Path, change) -> None:
    """Replace a parquet split with `change(its rows)`."""
    import datasets

    changed = change(datasets.Dataset.from_parquet(str(split_file)))
    changed.to_parquet(str(split_file) + ".new")
    os.replace(str(split_file) + ".new", split_file)


def without_label(task_dir: Path) -> None:
    rewrite_split(task_dir / "train.parquet", lambda rows: rows.remove_columns("label"))


def empty_validation(task_dir: Path) -> None:
    rewrite_split(task_dir / "validation.parquet", lambda rows: rows.select([]))


def squad_with(change: Callable[[Path], None]) -> Callable[[Workspace], list[str]]:
    """Tiny SQuAD files written into the workspace and changed by `change(task folder)`."""

    def argv(ws: Workspace) -> list[str]:
        data_dir = make_tiny_task_dir(ws.root / "squad-data", "squad", n_train=16, n_eval=8)
        change(data_dir / "squad")
        return ["finetune", str(ws.recipe), "task.name=squad", f"task.data_dir={data_dir}", "task.doc_stride=8",
                "name=fresh"]

    return argv


def without_answers(task_dir: Path) -> None:
    rewrite_split(task_dir / "validation.parquet", lambda rows: rows.remove_columns("answers"))


def answer_moved(task_dir: Path) -> None:
    def shift_third_answer(row, index):
        if index != 2:
            return {"answers": row["answers"]}
        answers = row["answers"]
        return {"answers": {**answers, "answer_start": [start + 1 for start in answers["answer_start"]]}}

    rewrite_split(task_dir / "train.parquet", lambda rows: rows.map(shift_third_answer, with_indices=True))


@dataclass
class Case:
    label: str
    argv: Callable[[Workspace], list[str]]
    expected: str  # a phrase of the one-line error


CATALOGUE = [
    # The recipe file itself.
    Case("missing recipe file", lambda ws: ["finetune", str(ws.root / "nope.yaml")], "recipe file not found"),
    Case("invalid YAML", recipe_text("finetune: [unclosed\n"), "not valid YAML (line 2)"),
    Case("binary recipe", recipe_text(bytes(range(256)) * 4), "not a text file"),
    Case("recipe over 1 MB", recipe_text("# " + "x" * MAX_RECIPE_BYTES + "\n"), "larger than 1 MB"),
    Case("alias bomb on seed", recipe_text(alias_bomb("seed: *l5")), "anchors and aliases"),
    Case("alias bomb on search.budgets", recipe_text(alias_bomb("search: {budgets: *l5}")), "anchors and aliases"),
    Case("long bad value is quoted short", recipe_text("seed: [" + ", ".join(["123456789"] * 5_000) + "]\n"),
         "seed: Input should be a valid integer (got [123456789, 123456789"),
    Case("anchor in an override", finetune("seed=&s 3"), "seed: Input should be a valid integer, unable to parse string "
         "as an integer (got '&s 3')"),
    # Keys and values.
    Case("unknown key", finetune("finetune.learning_rat=1e-4"), "did you mean 'finetune.learning_rate'"),
    Case("override without =", finetune("finetune.epochs"), "is not key=value"),
    Case("wrong type", finetune("finetune.batch_size=big"), "finetune.batch_size"),
    Case("epochs: true", recipe_changes({"finetune.epochs": True}), "finetune.epochs: a number is expected, not a boolean"),
    Case("batch_size=true", finetune("finetune.batch_size=true"), "finetune.batch_size: a number is expected, not a boolean"),
    Case("budgets with a boolean", finetune("search.budgets=[true]"), "search.budgets: a number is expected"),
    Case("epochs=.inf", finetune("finetune.epochs=.inf"), "finetune.epochs: Input should be a finite number"),
    Case("learning_rate=.nan", finetune("finetune.learning_rate=.nan"), "finetune.learning_rate: Input should be a finite number"),
    Case("NaN export budget", finetune("export.budgets=[.nan]"), "export.budgets.0: Input should be a finite number"),
    Case("trials below population", finetune("search.trials=3", "search.population=4"),
         "search.trials: 3 trials is fewer than search.population (4)"),
    Case("population above default trials", recipe_text("search:\n  population: 500\n"), "search.trials: 200 trials is fewer"),
    Case("export budget above 1", finetune("export.budgets=[1.5]"),
         "export.budgets: budgets are fractions of the full MACs in (0, 1]"),
    Case("export budget 0", finetune("export.budgets=[0]"), "export.budgets: budgets are fractions"),
    Case("search budget above 1", finetune("search.budgets=[1.5]"), "search.budgets: budgets are fractions"),
    Case("run name ..", finetune("name=.."), "name: '.' and '..' are not run names"),
    Case("max_seq_length beyond the positions", finetune("task.max_seq_length=1024"),
         "task.max_seq_length: 1024 is more than the 64 positions"),
    Case("unknown task", finetune("task.name=mrcp", "name=fresh"), "unknown task 'mrcp'"),
    Case("unknown task lists the known ones", finetune("task.name=squad3", "name=fresh"),
         "task.name: unknown task 'squad3'; choose from cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli, squad, squad_v2"),
    Case("doc_stride = max_seq_length", finetune("task.name=squad", "task.doc_stride=32", "name=fresh"),
         "task: doc_stride (32) must be positive and smaller than max_seq_length (32)"),
    Case("doc_stride above max_seq_length", finetune("task.name=squad_v2", "task.doc_stride=128", "name=fresh"),
         "doc_stride (128) must be positive and smaller"),
    Case("export --budget 1.5", lambda ws: ["export", str(ws.recipe), "--budget", "1.5"],
         "--budget 1.5: a budget is a fraction of the full MACs in (0, 1]"),
    # Data.
    Case("train file without the label column", glue_with(without_label), "train.parquet: no column 'label'"),
    Case("empty validation file", glue_with(empty_validation), "validation.parquet: the validation split has no rows"),
    Case("QA file without answers", squad_with(without_answers), "validation.parquet: no column 'answers'"),
    Case("QA answer not in its context", squad_with(answer_moved),
         "train.parquet: the answer of 'train-2' is not in its context at its answer_start"),
    # Models.
    Case("missing model folder", finetune("model.name=./no/such/model", "name=fresh"), "no config.json"),
    Case("unknown alias, offline", finetune("model.name=minilm-l12", "name=fresh"), "did you mean 'minilm-l6'?"),
    Case("profile of an unknown alias, offline", lambda ws: ["profile", "minilm-l12"], "HF_HUB_OFFLINE is set"),
    Case("config.json not JSON", model_with_config("{not json", "finetune"), "config.json: not valid JSON (line 1)"),
    Case("config.json without model_type", model_with_config("{}", "profile"), "config.json: not a usable model config"),
    Case("profile --seq-len 0", lambda ws: ["profile", "bert-base", "--seq-len", "0"], "--seq-len 0"),
    Case("profile --seq-len -5", lambda ws: ["profile", "bert-base", "--seq-len", "-5"], "--seq-len -5"),
    # The run directory.
    Case("output_dir in /proc", finetune("output_dir=/proc/x"), "output_dir '/proc/x': cannot create"),
    Case("output_dir read-only (/sys)", finetune("output_dir=/sys/eftnas"), "output_dir '/sys/eftnas': cannot create"),
    Case("output_dir read-only (chmod)", output_dir_read_only, "output_dir"),
    Case("output_dir is a file", output_dir_file, "output_dir"),
    Case("manifest not JSON", corrupt_manifest("{\"stages\": "), "manifest.json: not valid JSON"),
    Case("manifest without stages", corrupt_manifest("{\"identity\": {}}"), "manifest.json: no \"stages\" mapping"),
]


@pytest.mark.parametrize("case", CATALOGUE, ids=[case.label for case in CATALOGUE])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(workspace, case):
    argv = case.argv(workspace)
    before = tree_bytes(workspace.root)
    result = CliRunner().invoke(app, argv)
    lines = output_lines(result.output)
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert case.expected in lines[0], lines[0]
    assert len(lines[0]) < MAX_LINE_CHARS, lines[0]
    assert "Traceback" not in result.output
    assert tree_bytes(workspace.root) == before


# A second process holds the run directory while writing `importance`, until its stdin closes.
HOLDER = """
import sys
from pathlib import Path

import yaml

from eftnas_cli.recipe import Recipe
from eftnas_cli.rundir import RunDir

run = RunDir(Recipe.model_validate(yaml.safe_load(Path(sys.argv[1]).read_text())))
with run.stage("importance") as out:
    (out.dir / "scores.bin").write_text("first writer")
    print("holding", flush=True)
    sys.stdin.read()
"""


def start_holder(recipe: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(recipe)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "holding", "the holder did not take the lock"
    return holder


def test_a_second_writer_is_refused_and_the_first_finishes_intact(workspace):
    holder = start_holder(workspace.recipe)
    try:
        before = tree_bytes(workspace.root)
        result = CliRunner().invoke(app, ["finetune", str(workspace.recipe)])
        lines = output_lines(result.output)
        assert result.exit_code == 2 and len(lines) == 1, result.output
        assert f"is in use by PID {holder.pid} running `importance`" in lines[0]
        assert tree_bytes(workspace.root) == before
    finally:
        holder.communicate("", timeout=60)
    assert holder.returncode == 0
    run = RunDir(load_recipe(workspace.recipe))
    assert (run.stage_dir("importance") / "scores.bin").read_text() == "first writer"
    assert set(run.manifest()["stages"]) == {"finetune", "importance"}
    assert run.require("finetune", by="test") == run.stage_dir("finetune")
    assert [p.name for p in run.path.iterdir() if p.name.startswith(".")] == []


def test_a_killed_writer_neither_blocks_nor_leaves_its_temporary_folder(workspace):
    holder = start_holder(workspace.recipe)
    holder.kill()
    holder.wait(timeout=60)
    assert list(workspace.run_dir.glob(".importance.tmp-*")), "the killed writer left its temporary folder"
    finished = tree_bytes(workspace.run_dir / "finetune")
    run = RunDir(load_recipe(workspace.recipe))
    with run.stage("gen-space") as out:
        (out.dir / "search_space.json").write_text("{}")
    assert not list(workspace.run_dir.glob(".*.tmp-*"))
    assert tree_bytes(workspace.run_dir / "finetune") == finished
    assert set(run.manifest()["stages"]) == {"finetune", "gen-space"}


def test_a_failing_stage_leaves_finished_stages_and_the_manifest_untouched(workspace, monkeypatch):
    def failing_stage(recipe):
        with RunDir(recipe).stage("finetune") as out:
            (out.dir / "model.bin").write_text("half")
            raise RuntimeError("disk on fire")

    monkeypatch.setattr("eftnas_cli.stages.finetune.finetune", failing_stage)
    before = tree_bytes(workspace.root)
    result = CliRunner().invoke(app, ["finetune", str(workspace.recipe)])
    assert result.exit_code == 1 and "disk on fire" in result.output
    assert tree_bytes(workspace.root) == before


class SigtermNotHandled(Exception):
    pass


def sigterm_not_handled(signum, frame):
    raise SigtermNotHandled


def test_sigterm_interrupts_like_ctrl_c_naming_the_stage(workspace, monkeypatch):
    def stage_stopped_by_sigterm(recipe):
        with RunDir(recipe).stage("importance") as out:
            (out.dir / "scores.bin").write_text("half")
            os.kill(os.getpid(), signal.SIGTERM)
            raise AssertionError("SIGTERM did not interrupt the stage")

    monkeypatch.setattr("eftnas_cli.stages.importance.compute_importance", stage_stopped_by_sigterm)
    # Were the command line not to handle SIGTERM, this handler (not the default, which would end
    # pytest) fails the test; the command line must also put it back.
    previous = signal.signal(signal.SIGTERM, sigterm_not_handled)
    try:
        before = tree_bytes(workspace.root)
        result = CliRunner().invoke(app, ["importance", str(workspace.recipe)])
        assert signal.getsignal(signal.SIGTERM) is sigterm_not_handled
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result.exit_code == 130, result.output
    assert output_lines(result.output) == ["interrupted during `importance`; run the same command again to continue"]
    assert tree_bytes(workspace.root) == before
