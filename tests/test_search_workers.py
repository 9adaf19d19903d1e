"""Search workers sharing one study: the claim rule on its own, then two real workers on a tiny
run against a throwaway PostgreSQL server, SQLite (`--workers 2`) and a journal file. Each checks
that the study measured exactly its budget of trials, all workers together, that no subnet was
measured twice, and that pareto.json does not depend on which worker wrote it."""

import json
import os
import pwd
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from typer.testing import CliRunner

from eftnas_cli import studies
from eftnas_cli.cli import app
from eftnas_cli.stages.search import WORKER_ATTR
from eftnas_cli.studies import Claim, StudyState
from eftnas_cli.testing import write_tiny_recipe

BUDGET = 12
SEARCH = [f"search.trials={BUDGET}", "search.population=4"]


# ---- the claim rule -------------------------------------------------------------------------------
def complete_trial(number: int, heads: int, repeat_of: int | None = None) -> optuna.trial.FrozenTrial:
    trial = optuna.trial.create_trial(params={"layer0.heads": heads},
                                      distributions={"layer0.heads": optuna.distributions.CategoricalDistribution([1, 2, 3, 4])},
                                      values=[0.5, 1.0], user_attrs={} if repeat_of is None else {studies.REPEAT_ATTR: repeat_of})
    trial.number = number
    return trial


def key(heads: int) -> str:
    return studies.subnet_key({"layer0.heads": heads})


def test_a_sqlite_study_file_keeps_a_write_ahead_log(tmp_path):
    url = studies.default_storage_url(tmp_path)
    studies.open_storage(url)
    with sqlite3.connect(tmp_path / "studies" / "search.db") as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_sqlite_study_transaction_holds_the_write_lock_from_its_first_read(tmp_path):
    """Optuna pops an enqueued trial by reading it waiting, then setting it running, in one
    transaction: the read must already keep other workers from writing, or two pop the same trial."""
    storage = studies.open_storage(studies.default_storage_url(tmp_path))
    with storage.engine.connect() as connection:
        connection.exec_driver_sql("SELECT count(*) FROM trials")
        other = sqlite3.connect(tmp_path / "studies" / "search.db", timeout=0.1, isolation_level=None)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("UPDATE trials SET state = state")
        connection.rollback()
        other.execute("UPDATE trials SET state = state")  # the lock ends with the transaction
        other.close()


def test_claim_rule():
    state = StudyState(complete={key(1): complete_trial(0, 1)}, claims={3: key(2), 4: key(3)})
    assert state.decide(4, key(3), wanted=3) is Claim.EVALUATE  # 3 distinct subnets: within the budget
    assert state.decide(4, key(3), wanted=2) is Claim.FULL
    assert state.decide(4, key(1), wanted=3) is Claim.REPEAT
    state.claims[5] = key(3)  # two trials claim one subnet: each sees the other and withdraws
    assert state.decide(4, key(3), wanted=9) is Claim.TAKEN and state.decide(5, key(3), wanted=9) is Claim.TAKEN
    assert state.budget_taken(wanted=3) and not state.done(wanted=3)
    assert not StudyState(claims={1: key(1)}).budget_taken(wanted=2)


def test_study_state_reads_complete_trials_and_claims_of_running_ones():
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.add_trial(complete_trial(0, 1))
    study.add_trial(complete_trial(1, 1))  # measured twice (a study from before claims): the first is the record
    # A repeat numbered before the trial it copied (it waited in the queue while another worker
    # measured its subnet) is never the record: it carries no measures of its own.
    study.add_trial(complete_trial(2, 3, repeat_of=3))
    study.add_trial(complete_trial(3, 3))
    running = study.ask()
    running.set_user_attr(studies.CLAIM_ATTR, key(2))
    study.ask()  # running, not yet claimed: no subnet of its own yet
    state = StudyState.read(study)
    assert {k: t.number for k, t in state.complete.items()} == {key(1): 0, key(3): 3}
    assert state.claims == {running.number: key(2)}


def test_search_records_come_from_measuring_trials_not_repeats():
    from eftnas_cli.stages.search import OBJECTIVES, trial_records

    study = optuna.create_study(directions=["maximize", "minimize"])
    study.add_trial(complete_trial(0, 2, repeat_of=1))  # enqueued first, popped after trial 1 measured it
    measured = complete_trial(1, 2)
    measured.user_attrs = {"macs": 7, "params": 3, "metrics": {"score": 0.5}, "subnet": {"heads": [2]}}
    study.add_trial(measured)
    assert trial_records(study, list(OBJECTIVES[:2])) == [
        {"trial": 1, "score": 0.5, "gmacs": 1.0, "macs": 7, "params": 3, "metrics": {"score": 0.5}, "subnet": {"heads": [2]}}]


# ---- real workers ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir, tiny_glue_dir):
    """A tiny run up to its super-network; each test searches in a copy of it."""
    root = tmp_path_factory.mktemp("trained")
    recipe = write_tiny_recipe(root / "recipe.yaml", root / "runs", tiny_model_dir, tiny_glue_dir)
    result = CliRunner().invoke(app, ["run", str(recipe), "--until", "train-supernet", "finetune.epochs=1", "importance.epochs=1"])
    assert result.exit_code == 0, result.output
    return recipe, root / "runs" / "tiny"


def copy_run(trained_run, output_dir: Path) -> list[str]:
    """The trained run copied under `output_dir`; the overrides that point the recipe at it."""
    _, run_dir = trained_run
    shutil.copytree(run_dir, output_dir / run_dir.name)
    return [f"output_dir={output_dir}", "finetune.epochs=1", "importance.epochs=1"]


def start_worker(recipe: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "eftnas_cli.cli", "search", str(recipe), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(workers: list[subprocess.Popen]) -> list[str]:
    outputs = [worker.communicate(timeout=600)[0] for worker in workers]
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output
    return outputs


def check_study(storage_url: str, run_dir: Path, workers: int) -> None:
    """The study measured its budget, all workers together, each subnet once; search/ holds them."""
    study = optuna.load_study(study_name=None, storage=studies.open_storage(storage_url))
    trials = study.get_trials(deepcopy=False)
    assert not [t.number for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    measured = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE and studies.REPEAT_ATTR not in t.user_attrs]
    subnets = Counter(studies.subnet_key(t.params) for t in measured)
    assert [subnet for subnet, count in subnets.items() if count > 1] == [], "a subnet was measured twice"
    assert len(measured) == BUDGET
    by_worker = Counter(t.user_attrs[WORKER_ATTR] for t in measured)
    # How the budget splits depends on timing (a worker that starts late may find it spent).
    assert 1 <= len(by_worker) <= workers and sum(by_worker.values()) == BUDGET, by_worker
    records = json.loads((run_dir / "search" / "trials.json").read_text())
    assert sorted(r["trial"] for r in records) == sorted(t.number for t in measured)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _postgres_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]))
    return candidates[-1].parent if candidates else None


@pytest.fixture
def postgres_url():
    """A throwaway PostgreSQL server on 127.0.0.1, a free port and a temporary data folder, run by
    an unprivileged user (PostgreSQL refuses root), stopped and removed afterwards."""
    bin_dir = _postgres_bin()
    if bin_dir is None or not (bin_dir / "initdb").exists():
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    as_user = {}
    folder = Path(tempfile.mkdtemp(prefix="eftnas-postgres-"))
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(folder, nobody.pw_uid, nobody.pw_gid)
        as_user = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}

    def pg(*args: str) -> None:
        subprocess.run([str(bin_dir / args[0]), *args[1:]], cwd=folder, check=True, capture_output=True, **as_user)

    data, port = folder / "data", _free_port()
    try:
        pg("initdb", "-D", str(data), "-U", "eftnas", "--auth=trust", "--encoding=UTF8", "--no-locale", "--no-sync")
        pg("pg_ctl", "-D", str(data), "-l", str(folder / "server.log"), "-w", "-t", "60", "start",
           "-o", f"-h 127.0.0.1 -p {port} -k {folder} -c fsync=off")
        try:
            yield f"postgresql://eftnas@127.0.0.1:{port}/postgres"
        finally:
            pg("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_two_workers_on_postgresql(trained_run, postgres_url, tmp_path):
    """Two workers, each with its own copy of the run directory (two machines without a shared
    file system): each writes its own search/ when the study is done, and the two are identical."""
    recipe, _ = trained_run
    copies = [copy_run(trained_run, tmp_path / f"machine{i}") for i in range(2)]
    started = time.perf_counter()
    outputs = finish([start_worker(recipe, *SEARCH, *overrides, "--storage", postgres_url) for overrides in copies])
    print(f"2 workers on PostgreSQL, {BUDGET} trials: {time.perf_counter() - started:.1f} s wall")
    runs = [tmp_path / f"machine{i}" / "tiny" / "search" for i in range(2)]
    check_study(postgres_url, runs[0].parent, workers=2)
    for name in ("pareto.json", "trials.json", "trials.csv"):
        assert (runs[0] / name).read_bytes() == (runs[1] / name).read_bytes(), (name, outputs)


def test_local_workers_on_sqlite(trained_run, tmp_path):
    recipe, _ = trained_run
    overrides = copy_run(trained_run, tmp_path)
    result = CliRunner().invoke(app, ["search", str(recipe), *SEARCH, *overrides, "--workers", "2"])
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "tiny"
    check_study(studies.default_storage_url(run_dir), run_dir, workers=2)


def test_two_workers_on_a_journal_file_in_one_run_directory(trained_run, tmp_path):
    """Two workers on one run directory (a shared file system): both write search/ in turn, the
    second finds the first's result identical to its own."""
    recipe, _ = trained_run
    overrides = copy_run(trained_run, tmp_path)
    url = f"journal:{tmp_path / 'study.log'}"
    outputs = finish([start_worker(recipe, *SEARCH, *overrides, "--storage", url) for _ in range(2)])
    assert sum("already holds this study's result" in " ".join(output.split()) for output in outputs) == 1, outputs
    check_study(url, tmp_path / "tiny", workers=2)


def test_after_nsga_ii_the_search_climbs_from_the_best_subnet_within_the_budget(trained_run, tmp_path):
    from eftnas_cli.elastic import SearchSpace

    recipe, run_dir = trained_run
    result = CliRunner().invoke(app, ["search", str(recipe), *copy_run(trained_run, tmp_path), *SEARCH])
    assert result.exit_code == 0, result.output
    run_copy = tmp_path / run_dir.name
    study = optuna.load_study(study_name=None, storage=studies.open_storage(studies.default_storage_url(run_copy)))
    measured = [t for t in study.get_trials(deepcopy=False)
                if t.state == optuna.trial.TrialState.COMPLETE and studies.REPEAT_ATTR not in t.user_attrs]
    assert len(measured) == BUDGET
    space = SearchSpace.load(run_copy / "supernet" / "search_space.json")
    subnets = [space.subnet_from_params(t.params) for t in measured]
    # search.refine 0.5 of 12 trials, at most all but two generations of 4: NSGA-II explores 8, the climb takes 4.
    for index in range(8, BUDGET):
        assert measured[index].user_attrs["macs"] <= 0.6 * space.full_macs
        assert any(neighbour in subnets[:index] for neighbour in space.neighbours(subnets[index])), index


def test_a_half_precision_search_is_a_study_of_its_own_and_export_rechecks_in_its_precision(trained_run, tmp_path,
                                                                                            monkeypatch):
    """Trials measured in bf16 are not comparable with fp32 ones: each precision has its study, the
    fp32 one under the name it had before the setting. Export re-checks an extracted subnet against
    the search's record in the precision the record was measured in."""
    from eftnas_cli.recipe import load_recipe
    from eftnas_cli.stages import export as export_stage

    recipe, run_dir = trained_run
    overrides = [*copy_run(trained_run, tmp_path), *SEARCH]
    run_copy = tmp_path / run_dir.name
    storage = studies.open_storage(studies.default_storage_url(run_copy))
    for precision in ("bf16", "no"):
        result = CliRunner().invoke(app, ["search", str(recipe), *overrides, f"search.mixed_precision={precision}"])
        assert result.exit_code == 0, result.output
        assert json.loads((run_copy / "search" / "pareto.json").read_text())["mixed_precision"] == precision
        assert ("in bf16 (search.mixed_precision)" in " ".join(result.output.split())) == (precision == "bf16")
    names = sorted(summary.study_name for summary in optuna.get_all_study_summaries(storage))
    assert len(names) == 2 and names[1] == names[0] + "-bf16", names

    result = CliRunner().invoke(app, ["search", str(recipe), *overrides, "search.mixed_precision=bf16"])
    assert result.exit_code == 0, result.output  # the bf16 study was done: its result is written again, not re-measured
    rechecked = []
    original = export_stage.autocast
    monkeypatch.setattr(export_stage, "autocast", lambda precision, device: rechecked.append(precision) or original(precision, device))
    export_stage.export(load_recipe(recipe, [*overrides, "export.onnx=false", "export.openvino=false", "export.int8=false",
                                             "export.budgets=[0.6]"]))
    assert rechecked == ["bf16"]
