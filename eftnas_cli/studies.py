"""The Optuna study a search keeps its trials in, and how several workers share one.

Storages (`eftnas search --storage`):
- none given: an SQLite file of the run directory, `<run>/studies/search.db` (workers on one machine);
- an SQLAlchemy URL, e.g. `postgresql://user:password@host:5432/db` (workers on several machines);
- `journal:PATH`: Optuna's journal file, for workers that share a file system but no database server.

Every storage has a heartbeat: a running trial beats every `HEARTBEAT_S`; one whose process died
stops, and the next worker that looks fails it (`optuna.storages.fail_stale_trials`), which ends
its claim. Optuna's RDB storage has heartbeats built in; `HeartbeatJournalStorage` adds them to
the journal.

Claims. Workers never evaluate a subnet twice nor beyond the study's budget of distinct subnets:
a trial first writes its claim (the user attribute `claim`: its subnet's key) to the storage, then
reads the study (`StudyState.read`) and decides (`StudyState.decide`):
- a complete trial measured the subnet already: a repeat, which copies its values (`REPEAT_ATTR`);
- another trial in progress claims the subnet: withdraw (the trial ends pruned, unmeasured);
- the distinct subnets complete or claimed in progress, this one included, exceed the budget: withdraw;
- otherwise: evaluate.
Why that is safe: each trial writes before it reads, and the storage shows a committed write to
every later read (one transaction per write in an RDB, serialized in SQLite, one append-only log
for the journal). Of two trials that claim the same subnet, the one that reads second therefore
sees the other's claim; likewise the last of budget+1 trials claiming distinct subnets sees them
all. A claim stays visible while its trial runs and after it completes. The price of the rule: two
trials that claim the same subnet at the same instant may both see each other and both withdraw;
the sampler then proposes again.
"""

from __future__ import annotations

import json
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages._heartbeat import BaseHeartbeat  # the documented way to give a storage heartbeats
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from eftnas_cli.errors import UserError

HEARTBEAT_S = 30  # a running trial's heartbeat: a trial silent for two is stale
GRACE_S = 2 * HEARTBEAT_S
JOURNAL_PREFIX = "journal:"
CLAIM_ATTR = "claim"
# A trial that found its subnet measured copies the measuring trial's values and names it here.
# Repeats are never a subnet's record: a repeat can carry a lower number than the trial it copied
# (an enqueued trial waits while another worker's sampler proposes and measures the same subnet).
REPEAT_ATTR = "repeat_of"
BEAT_ATTR = "eftnas:heartbeat"
# How often a worker whose budget is all claimed looks again whether the trials in progress ended.
POLL_S = 2.0
# SQLite: how long a writer waits for another process's write lock before failing.
SQLITE_BUSY_TIMEOUT_S = 60


def default_storage_url(run_path: Path) -> str:
    """The run directory's own study file, outside the atomically replaced `search/` folder."""
    (run_path / "studies").mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(run_path / 'studies' / 'search.db').resolve()}"


def shown_url(url: str) -> str:
    """`url` without its password, for messages."""
    if url.startswith(JOURNAL_PREFIX):
        return url
    import sqlalchemy

    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return url


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """Optuna's journal storage with the heartbeat its RDB storage has. A beat is a trial system
    attribute holding the wall-clock time, so machines sharing a journal need synchronised clocks
    (within the grace period)."""

    def record_heartbeat(self, trial_id: int) -> None:
        self.set_trial_system_attr(trial_id, BEAT_ATTR, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        # Like the RDB storage: a trial that never beat is not stale.
        return [trial._trial_id for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
                if now - trial.system_attrs.get(BEAT_ATTR, now) > GRACE_S]

    def get_heartbeat_interval(self) -> int:
        return HEARTBEAT_S

    def get_heartbeat_stale_trial_callback(self) -> None:
        return None


def _write_ahead_log(storage: RDBStorage) -> None:
    """Puts an SQLite study file in write-ahead-log mode (kept in the file, for every process that
    opens it). A trial commits some 30 times; in SQLite's default rollback journal each commit
    waits for the disk (15 ms here, 40 s of an 80-trial search), in WAL mode 0.25 ms. Committed
    writes stay visible to every later read, which the claims rely on, and survive a killed process."""
    with storage.engine.connect() as connection:
        connection.exec_driver_sql("PRAGMA journal_mode=WAL")


def _serialized_transactions(storage: RDBStorage) -> None:
    """Makes every SQLite transaction of `storage` take the file's write lock when it begins, so
    that a transaction's reads and writes are one step for the other workers. Python's sqlite3
    begins a transaction only at its first write, so Optuna's read-then-write steps were not: two
    workers popping the same enqueued trial both read it waiting and both set it running (19 of
    300 trials, two processes popping a queue), and the slower one failed when the other finished
    it. Writers that find the lock held wait for it (`SQLITE_BUSY_TIMEOUT_S`); reads are short.
    The recipe is SQLAlchemy's for pysqlite transactions."""
    import sqlalchemy

    @sqlalchemy.event.listens_for(storage.engine, "connect")
    def _no_implicit_begin(dbapi_connection, connection_record) -> None:
        dbapi_connection.isolation_level = None

    @sqlalchemy.event.listens_for(storage.engine, "begin")
    def _begin_with_the_write_lock(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    storage.engine.dispose()  # the connections Optuna opened so far began transactions the old way


def open_storage(url: str) -> BaseStorage:
    """The storage at `url` (see the module doc), with heartbeats; a URL that cannot be used is a
    one-line `UserError` naming it (without its password)."""
    if url.startswith(JOURNAL_PREFIX):
        path = Path(url[len(JOURNAL_PREFIX):].removeprefix("//"))
        if not path.parent.is_dir():
            raise UserError(f"--storage {url}: folder {path.parent} does not exist")
        return HeartbeatJournalStorage(JournalFileBackend(str(path)))
    import sqlalchemy

    engine_kwargs = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}} if url.startswith("sqlite") else {}
    # Workers started together on an empty database race to create Optuna's tables; the losers retry.
    for attempt in range(4):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: stable since Optuna 2.9
                storage = RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)
            if url.startswith("sqlite"):
                _write_ahead_log(storage)
                _serialized_transactions(storage)
            return storage
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as error:
            if attempt == 3:
                raise UserError(f"--storage {shown_url(url)}: cannot set up Optuna's tables ({_first_line(error)})") from None
            time.sleep(0.5 + random.random())
        except (sqlalchemy.exc.ArgumentError, ValueError) as error:
            raise UserError(f"--storage {shown_url(url)}: not a storage URL ({error}); see `eftnas search --help`") from None
        except ImportError:
            raise UserError(f"--storage {shown_url(url)}: the database driver is not installed; for PostgreSQL: "
                            "pip install 'eftnas[postgres]'") from None
        except sqlalchemy.exc.OperationalError as error:
            raise UserError(f"--storage {shown_url(url)}: cannot open the database ({_first_line(error)})") from None
    raise AssertionError("unreachable")


def _first_line(error: Exception) -> str:
    return str(getattr(error, "orig", None) or error).strip().splitlines()[0]


def subnet_key(params: dict) -> str:
    """One string per subnet proposal: its parameters in name order."""
    return json.dumps(sorted(params.items()))


class Claim(Enum):
    EVALUATE = "evaluate"
    REPEAT = "repeat"  # a complete trial measured this subnet: copy its values
    TAKEN = "taken"  # another trial in progress measures this subnet
    FULL = "full"  # the budget of distinct subnets is used up by complete and running trials


@dataclass
class StudyState:
    """What a study holds, by subnet: the complete trial that measured it (not a repeat), and the
    claims of trials in progress."""

    complete: dict[str, FrozenTrial] = field(default_factory=dict)
    claims: dict[int, str] = field(default_factory=dict)  # running trial number -> its subnet key

    @classmethod
    def read(cls, study: optuna.Study) -> StudyState:
        state = cls()
        for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)):
            if trial.state == TrialState.COMPLETE:
                if REPEAT_ATTR not in trial.user_attrs:
                    state.complete.setdefault(subnet_key(trial.params), trial)
            elif CLAIM_ATTR in trial.user_attrs:
                state.claims[trial.number] = trial.user_attrs[CLAIM_ATTR]
        return state

    @property
    def claimed(self) -> set[str]:
        """The distinct subnets measured or being measured."""
        return set(self.complete) | set(self.claims.values())

    def done(self, wanted: int) -> bool:
        return len(self.complete) >= wanted

    def budget_taken(self, wanted: int) -> bool:
        """Trials in progress hold the rest of the budget: a new subnet may start only if one of them fails."""
        return not self.done(wanted) and len(self.claimed) >= wanted

    def decide(self, number: int, key: str, wanted: int) -> Claim:
        """What trial `number`, whose claim of `key` is in this state, does (see the module doc)."""
        if key in self.complete:
            return Claim.REPEAT
        if any(other == key for n, other in self.claims.items() if n != number):
            return Claim.TAKEN
        if len(self.claimed) > wanted:
            return Claim.FULL
        return Claim.EVALUATE


def fail_stale_trials(study: optuna.Study) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def wait_for_budget(study: optuna.Study, wanted: int, show: Callable[[StudyState], None]) -> StudyState:
    """The study's state once the budget is no longer all held by trials in progress: either the
    study is done, or a trial in progress failed (or its worker died) and left room."""
    state = StudyState.read(study)
    while state.budget_taken(wanted):
        show(state)
        time.sleep(POLL_S)
        fail_stale_trials(study)
        state = StudyState.read(study)
    return state
