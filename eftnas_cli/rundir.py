"""The run directory: one folder per recipe, one subfolder per stage, and a manifest tying them.

Stages pass nothing to each other but files. Each stage writes into a temporary folder that is
renamed into place only when it finished, then appends its record to `manifest.json`: the files it
read (path + sha256), the files it wrote, its recipe section, library versions, wall time and
metrics. A killed stage therefore never leaves files that look complete.

One process writes a run directory at a time: every stage (and `eftnas run` around them) holds the
exclusive lock `<run>/.lock`; another process is refused at once with the holder's PID and command.
A multi-process training run (torchrun, accelerate launch) is one writer: its main process.
A failing or interrupted stage removes only its own temporary folder, never finished work; the
temporary folders of killed stages are removed by the next command that takes the lock.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

from filelock import FileLock, Timeout
from pydantic import BaseModel

from eftnas_cli import distributed
from eftnas_cli.errors import Interrupted, RecipeError, UpstreamError
from eftnas_cli.recipe import Recipe, dump_recipe
from eftnas_cli.ui import console

# Stage name -> the recipe section it is configured by (and the folder it writes).
STAGE_SECTIONS = {
    "finetune": "finetune",
    "importance": "importance",
    "gen-space": "space",
    "train-supernet": "supernet",
    "search": "search",
    "export": "export",
}

LOCK_FILE = ".lock"
# Who holds the lock, for the message that refuses a second writer.
LOCK_OWNER_FILE = ".lock.owner"
# Part of every temporary name in a run directory (stage folders, atomic writes): once the lock is
# taken, a name with it at the top of the run directory was left by a killed writer.
TMP_MARKER = ".tmp-"
# A finished stage folder renamed aside while its replacement is renamed in (`.<folder><marker>...`).
REPLACED_MARKER = ".replaced-"

__all__ = ["RunDir", "StageOutput", "UpstreamError", "sha256", "value_before_it_existed", "write_json"]


BEFORE_IT_EXISTED = "before_it_existed"


def value_before_it_existed(field) -> Any:
    """How older eftnas versions behaved on a key added since: the field's `before_it_existed`
    (json_schema_extra) where its default changed that behaviour, else its default."""
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    return extra.get(BEFORE_IT_EXISTED, field.default)


def as_recorded(section: BaseModel, recorded: dict | None) -> dict[str, Any]:
    """`section` as a stage record holds it. Compared with a record an older eftnas wrote, a key
    added since is left out while it asks for what that eftnas did: such a run should not be redone
    because the schema grew (but should be when the new key's default changed the behaviour)."""
    dumped = section.model_dump(mode="json")
    if recorded is None:
        return dumped
    fields = type(section).model_fields
    return {key: value for key, value in dumped.items()
            if key in recorded or key not in fields or value != value_before_it_existed(fields[key])}


def shared_settings(recipe: Recipe, like: dict[str, Any] | None = None) -> dict[str, Any]:
    """The settings every stage depends on (seed, model, task); `like` a record, as that record
    would hold them (`as_recorded`)."""
    like = like or {}
    return {
        "seed": recipe.seed,
        "model": as_recorded(recipe.model, like.get("model")),
        "task": as_recorded(recipe.task, like.get("task")),
    }


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_text_atomic(path: Path, text: str) -> None:
    """Write via a temp file + rename, so a reader never sees half a file.

    mkstemp creates 0600; the file gets the mode an ordinary write would (0644 under umask 022), so
    others of the group can read a shared run.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{TMP_MARKER}")
    try:
        with os.fdopen(fd, "w") as handle:
            os.fchmod(handle.fileno(), 0o666 & ~_umask())
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    """Atomic JSON write (temp file + rename)."""
    _write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def library_versions() -> dict[str, str]:
    versions = {}
    for package in ("eftnas", "torch", "transformers", "datasets", "optuna", "nncf", "openvino"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return versions


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _remove_empty_folders(folders: list[Path]) -> None:
    """rmdir `folders` (deepest first) up to the first that is not empty: nothing written is removed."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


@dataclass
class StageOutput:
    """What a running stage fills in: files go under `dir`, numbers into `metrics`."""

    dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    inputs: list[Path] = field(default_factory=list)
    # Whether this process writes the stage's files: the main process of a multi-process run
    # (eftnas_cli.distributed); the other ranks compute the same results and leave the files to it.
    writes: bool = True

    def add_input(self, path: Path) -> None:
        """Record a file (or every file of a folder) the stage read."""
        path = Path(path)
        self.inputs.extend(_files_under(path) if path.is_dir() else [path])


class RunDir:
    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.path = recipe.run_dir
        self.manifest_path = self.path / "manifest.json"

    # ---- reading -------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        if not self.manifest_path.is_file():
            return {"stages": {}}
        advice = "restore it, or remove it to redo every stage"
        try:
            manifest = json.loads(self.manifest_path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            where = f" (line {error.lineno})" if isinstance(error, json.JSONDecodeError) else ""
            raise UpstreamError(f"{self.manifest_path}: not valid JSON{where}; {advice}") from None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("stages"), dict):
            raise UpstreamError(f"{self.manifest_path}: no \"stages\" mapping, not an eftnas manifest; {advice}")
        return manifest

    def record(self, stage: str) -> dict[str, Any] | None:
        return self.manifest()["stages"].get(stage)

    def stage_dir(self, stage: str) -> Path:
        return self.path / STAGE_SECTIONS[stage]

    def _identity(self) -> dict[str, str]:
        return {"model": self.recipe.model.name, "task": self.recipe.task.name}

    def check_same_recipe(self) -> None:
        """Refuse a run directory that another model/task made (the name was reused)."""
        saved = self.manifest().get("identity")
        if saved and saved != self._identity():
            raise UpstreamError(
                f"run directory {self.path} was made for model '{saved['model']}' and task "
                f"'{saved['task']}', not '{self.recipe.model.name}'/'{self.recipe.task.name}': "
                "pick another `name=` or `output_dir=`"
            )

    def require(self, stage: str, *, by: str) -> Path:
        """The folder of a finished upstream stage, or an error naming the stage to run first."""
        self.check_same_recipe()
        record = self.record(stage)
        folder = self.stage_dir(stage)
        if record is None or not folder.is_dir():
            raise UpstreamError(f"`{by}` needs the output of `{stage}` in {self.path}: run `eftnas {stage}` first")
        for relative, digest in record["outputs"].items():
            path = self.path / relative
            if not path.is_file() or sha256(path) != digest:
                raise UpstreamError(
                    f"`{by}` needs {path}, which is missing or changed since `{stage}` wrote it: "
                    f"run `eftnas {stage}` again"
                )
        return folder

    def is_current(self, stage: str) -> bool:
        """True when `stage` finished with the same recipe section and unchanged inputs/outputs."""
        record = self.record(stage)
        if record is None or not self.stage_dir(stage).is_dir():
            return False
        section = getattr(self.recipe, STAGE_SECTIONS[stage])
        recorded_shared = record.get("shared") or {}
        if (record["recipe"] != as_recorded(section, record["recipe"])
                or recorded_shared != shared_settings(self.recipe, recorded_shared)):
            return False
        for files in (record["inputs"], record["outputs"]):
            for name, digest in files.items():
                path = Path(name) if Path(name).is_absolute() else self.path / name
                if not path.is_file() or sha256(path) != digest:
                    return False
        return True

    # ---- the writer lock ----------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, command: str, wait_s: float = 0) -> Iterator[None]:
        """Hold the run directory's writer lock while `command` (a stage, `run`...) writes to it.

        Re-entrant within a process: `eftnas run` holds it while each stage takes it again. Another
        process is refused at once, or after waiting `wait_s` seconds for the holder. The lock is a
        flock, which dies with its process: a killed holder never blocks. The outermost holder
        creates the run directory and removes what killed writers left; on release it removes the
        lock files, and the folders it created if they are empty (the command wrote nothing). An
        interruption comes out as `Interrupted`, naming the innermost command that was running. In
        a multi-process run (`eftnas_cli.distributed`) the main process holds it for all ranks, and
        its refusal is every rank's.
        """
        lock = None
        if distributed.is_main():
            lock = FileLock(self.path.resolve() / LOCK_FILE, timeout=0, thread_local=False, is_singleton=True,
                            fallback_to_soft=False)
        outermost = lock is not None and not lock.is_locked
        created = distributed.on_main(lambda: self._acquire(lock, wait_s))
        try:
            if outermost:
                self._remove_leftovers()
                write_json(self.path / LOCK_OWNER_FILE, {"pid": os.getpid(), "command": command,
                                                          "since": time.strftime("%Y-%m-%d %H:%M:%S")})
            yield
        except KeyboardInterrupt as interrupt:
            if isinstance(interrupt, Interrupted):
                raise
            raise Interrupted(command) from interrupt
        finally:
            if lock is not None:
                try:
                    if outermost:
                        # Unlinked while still held: a process that opened the lock file meanwhile gets
                        # its flock on an unlinked file, which filelock does not count as holding it.
                        (self.path / LOCK_OWNER_FILE).unlink(missing_ok=True)
                        (self.path / LOCK_FILE).unlink(missing_ok=True)
                        _remove_empty_folders(created)
                finally:
                    lock.release()

    def _acquire(self, lock: FileLock, wait_s: float) -> list[Path]:
        """Create the run directory and take `lock`, waiting up to `wait_s` seconds for another
        holder; returns the folders made (deepest first)."""
        created = self._create()
        try:
            lock.acquire()
        except Timeout:
            if wait_s > 0:
                console.print(f"waiting up to {wait_s:.0f} s for run directory {self.path}, in use by {self._holder()}")
            try:
                lock.acquire(timeout=wait_s)
            except Timeout:
                raise UpstreamError(
                    f"run directory {self.path} is in use by {self._holder()}: wait for it to finish or stop it, "
                    "or pick another `name=`"
                ) from None
        return created

    def _create(self) -> list[Path]:
        """Make the run directory; returns the folders this made (deepest first).

        A path that cannot hold it (a file, read-only, /proc) is the recipe's `output_dir` to fix.
        """
        try:
            missing = []
            for folder in (self.path, *self.path.parents):
                if folder.exists():
                    break
                missing.append(folder)
            self.path.mkdir(parents=True, exist_ok=True)
            if not os.access(self.path, os.W_OK | os.X_OK):
                raise PermissionError(f"{self.path} is not writable")
        except OSError as error:
            reason = error.strerror or str(error)
            raise RecipeError(
                f"output_dir '{self.recipe.output_dir}': cannot create or write the run directory {self.path} ({reason})"
            ) from None
        return missing

    def _holder(self) -> str:
        try:
            owner = json.loads((self.path / LOCK_OWNER_FILE).read_text())
            return f"PID {owner['pid']} running `{owner['command']}` (since {owner['since']})"
        except (OSError, ValueError, KeyError, TypeError):
            # The holder has the lock but has not written (or failed to write) who it is.
            return "another process"

    def _remove_leftovers(self) -> None:
        """Clear what killed writers left: temp files and folders; a finished stage folder renamed
        aside goes back into place if its replacement never arrived, and is removed otherwise."""
        for entry in sorted(self.path.iterdir()):
            if not entry.name.startswith("."):
                continue
            if TMP_MARKER in entry.name:
                _remove(entry)
            elif REPLACED_MARKER in entry.name:
                final = self.path / entry.name[1:].split(REPLACED_MARKER)[0]
                if final.exists():
                    _remove(entry)
                else:
                    os.replace(entry, final)

    # ---- writing -------------------------------------------------------------------------
    def _relative(self, path: Path) -> str:
        path = Path(path).resolve()
        try:
            return str(path.relative_to(self.path.resolve()))
        except ValueError:
            return str(path)

    @contextlib.contextmanager
    def stage(self, stage: str, started: float | None = None) -> Iterator[StageOutput]:
        """Run a stage into a temp folder; on success move it into place and record it.

        Holds the lock (re-entrantly) throughout, so nothing writes a run directory unlocked. On
        failure or interruption only the temp folder is removed. `started` (a time.perf_counter()
        value) dates the stage's work when it began before its files are written (a search, say);
        the manifest's wall time counts from there.
        """
        with self.lock(stage):
            self.check_same_recipe()
            section = STAGE_SECTIONS[stage]
            # Every rank of a multi-process run works in the main process's folder (a Trainer's
            # checkpoints are shared); only the main process writes the stage's files into it.
            tmp = distributed.on_main(lambda: self._temporary_folder(section))
            output = StageOutput(dir=tmp, writes=distributed.is_main())
            started = time.perf_counter() if started is None else started
            try:
                yield output
            except BaseException:
                if output.writes:
                    shutil.rmtree(tmp, ignore_errors=True)
                raise
            # The other ranks wait here until the stage is in place and recorded.
            distributed.on_main(lambda: self._finish(stage, tmp, output, started))

    def _temporary_folder(self, section: str) -> Path:
        tmp = Path(tempfile.mkdtemp(dir=self.path, prefix=f".{section}{TMP_MARKER}"))
        # mkdtemp creates 0700: give the folder an ordinary mode (0755 under umask 022).
        tmp.chmod(0o777 & ~_umask())
        return tmp

    def _finish(self, stage: str, tmp: Path, output: StageOutput, started: float) -> None:
        """Move a stage's finished folder into place and add its manifest record."""
        section = STAGE_SECTIONS[stage]
        final = self.stage_dir(stage)
        self._move_into_place(tmp, final)
        manifest = self.manifest()
        manifest["identity"] = self._identity()
        manifest["stages"][stage] = {
            "recipe": getattr(self.recipe, section).model_dump(mode="json"),
            "shared": shared_settings(self.recipe),
            "inputs": {self._relative(p): sha256(p) for p in sorted(set(output.inputs))},
            "outputs": {self._relative(p): sha256(p) for p in _files_under(final)},
            "versions": library_versions(),
            "wall_time_s": round(time.perf_counter() - started, 2),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "metrics": output.metrics,
        }
        _write_text_atomic(self.path / "recipe.yaml", dump_recipe(self.recipe))
        write_json(self.manifest_path, manifest)

    def _move_into_place(self, tmp: Path, final: Path) -> None:
        """Replace `final` by `tmp` with two renames.

        The previous output is renamed aside before it is deleted: a kill at any point leaves the
        old or the new folder in place, or the old one aside, which the next lock holder puts back.
        """
        if final.exists():
            aside = final.with_name(f".{final.name}{REPLACED_MARKER}{os.urandom(4).hex()}")
            os.replace(final, aside)
            os.replace(tmp, final)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, final)


def holds_lock(command: str) -> Callable:
    """Decorates a stage function `stage(recipe, ...)`: all of its work, from the first read to the
    manifest record, runs under the run directory's writer lock (`RunDir.lock`)."""

    def decorate(stage: Callable) -> Callable:
        @functools.wraps(stage)
        def locked(recipe: Recipe, *args, **kwargs):
            distributed.init(recipe.device)  # a launcher's processes: the main one takes the lock
            with RunDir(recipe).lock(command):
                return stage(recipe, *args, **kwargs)

        return locked

    return decorate
