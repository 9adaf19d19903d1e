"""The run directory: one folder per recipe, one subfolder per stage, and a manifest tying them.

Stages pass nothing to each other but files. Each stage writes into a temporary folder that is
renamed into place only when it finished, then appends its record to `manifest.json`: the files it
read (path + sha256), the files it wrote, its recipe section, library versions, wall time and
metrics. A killed stage therefore never leaves files that look complete, and a bad input never
leaves a half-made run directory behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from eftnas_cli.recipe import Recipe, dump_recipe

# Stage name -> the recipe section it is configured by (and the folder it writes).
STAGE_SECTIONS = {
    "finetune": "finetune",
    "importance": "importance",
    "gen-space": "space",
    "train-supernet": "supernet",
    "search": "search",
    "export": "export",
}
STAGES = tuple(STAGE_SECTIONS)


class UpstreamError(RuntimeError):
    """A stage cannot start: something it reads is missing or belongs to another run."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: Path, data: Any) -> None:
    """Atomic JSON write (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2, default=str)
        handle.write("\n")
    os.replace(tmp, path)


def library_versions() -> dict[str, str]:
    versions = {}
    for package in ("eftnas", "torch", "transformers", "datasets", "optuna", "nncf", "openvino"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return versions


def _files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


@dataclass
class StageOutput:
    """What a running stage fills in: files go under `dir`, numbers into `metrics`."""

    dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    inputs: list[Path] = field(default_factory=list)

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
        return json.loads(self.manifest_path.read_text())

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
        section = getattr(self.recipe, STAGE_SECTIONS[stage]).model_dump(mode="json")
        if record["recipe"] != section or record.get("shared") != self._shared_settings():
            return False
        for files in (record["inputs"], record["outputs"]):
            for name, digest in files.items():
                path = Path(name) if Path(name).is_absolute() else self.path / name
                if not path.is_file() or sha256(path) != digest:
                    return False
        return True

    def _shared_settings(self) -> dict[str, Any]:
        return {
            "seed": self.recipe.seed,
            "model": self.recipe.model.model_dump(mode="json"),
            "task": self.recipe.task.model_dump(mode="json"),
        }

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

        `started` (a time.perf_counter() value) dates the stage's work when it began before its
        files are written (a search, say); the manifest's wall time counts from there.
        """
        self.check_same_recipe()
        created_run_dir = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.path, prefix=f".{STAGE_SECTIONS[stage]}.tmp-"))
        output = StageOutput(dir=tmp)
        started = time.perf_counter() if started is None else started
        try:
            yield output
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if created_run_dir:
                shutil.rmtree(self.path, ignore_errors=True)
            raise
        final = self.stage_dir(stage)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        manifest = self.manifest()
        manifest["identity"] = self._identity()
        manifest["stages"][stage] = {
            "recipe": getattr(self.recipe, STAGE_SECTIONS[stage]).model_dump(mode="json"),
            "shared": self._shared_settings(),
            "inputs": {self._relative(p): sha256(p) for p in sorted(set(output.inputs))},
            "outputs": {self._relative(p): sha256(p) for p in _files_under(final)},
            "versions": library_versions(),
            "wall_time_s": round(time.perf_counter() - started, 2),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "metrics": output.metrics,
        }
        (self.path / "recipe.yaml").write_text(dump_recipe(self.recipe))
        write_json(self.manifest_path, manifest)
