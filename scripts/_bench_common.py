"""What the benchmark scripts share: provenance (command, date, machine, versions), markdown
tables, target checks and the tiny offline inputs of `--smoke` runs.

Only the standard library is imported at module level: `bench_quality.py` must be able to hide
GPUs (`--device cpu`) before anything imports torch.
"""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import sys
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


# ---- device ------------------------------------------------------------------------------------
def hide_gpus_if_cpu_requested(argv: list[str]) -> None:
    """`--device cpu` hides the GPUs from this process (CUDA_VISIBLE_DEVICES="").

    The Hugging Face Trainers inside the pipeline pick a GPU whenever torch sees one, and torch
    reads CUDA_VISIBLE_DEVICES only once, when it first looks for devices: so this must run
    before torch is imported, which is why it reads the raw arguments instead of parsed ones.
    """
    for index, argument in enumerate(argv):
        value = argument.split("=", 1)[1] if argument.startswith("--device=") else None
        if argument == "--device" and index + 1 < len(argv):
            value = argv[index + 1]
        if value == "cpu":
            os.environ["CUDA_VISIBLE_DEVICES"] = ""


# ---- provenance --------------------------------------------------------------------------------
def command_line() -> str:
    """The command as the user typed it (relative script path, arguments quoted)."""
    return "python " + shlex.join(sys.argv)


def cpu_model() -> str:
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def cpu_count() -> int:
    """Cores this process may use: what `nproc` prints (affinity, not the host's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def library_versions() -> dict[str, str]:
    from eftnas_cli.rundir import library_versions as packages

    return {"python": platform.python_version(), **packages()}


def provenance(device: str, extra: dict[str, str] | None = None) -> dict:
    """Everything a reader needs to reproduce a result, as stored in the JSON and the header."""
    machine = {"nproc": cpu_count(), "cpu": cpu_model()}
    if device.startswith("cuda"):
        import torch

        machine["gpu"] = torch.cuda.get_device_name()
    return {
        "command": command_line(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device": device,
        "machine": machine,
        "versions": library_versions(),
        **(extra or {}),
    }


def provenance_lines(record: dict) -> list[str]:
    """Markdown bullet lines describing `provenance(...)`."""
    machine = record["machine"]
    machine_text = f"{machine['nproc']} CPU cores available (nproc), {machine['cpu']}"
    if "gpu" in machine:
        machine_text += f", GPU {machine['gpu']}"
    lines = [
        f"- command: `{record['command']}`",
        f"- date: {record['date']}",
        f"- machine: {machine_text}; torch device: {record['device']}",
        "- versions: " + ", ".join(f"{name} {version}" for name, version in record["versions"].items()),
    ]
    for key, value in record.items():
        if key not in ("command", "date", "device", "machine", "versions"):
            lines.append(f"- {key}: {value}")
    return lines


# ---- formatting --------------------------------------------------------------------------------
def markdown_table(headers: list[str], rows: list[list[str]], align: str | None = None) -> str:
    """A GitHub markdown table; `align` has one letter per column, "l" or "r" (default: the first
    column left, the others right)."""
    align = align or "l" + "r" * (len(headers) - 1)
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]

    def line(cells) -> str:
        padded = [str(c).ljust(w) if a == "l" else str(c).rjust(w) for c, w, a in zip(cells, widths, align)]
        return "| " + " | ".join(padded) + " |"

    rule = "| " + " | ".join("-" * w if a == "l" else "-" * (w - 1) + ":" for w, a in zip(widths, align)) + " |"
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def write_report(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text.endswith("\n") else text + "\n")


# ---- scripts that read finished runs (--run) ---------------------------------------------------
def runs_parser(doc: str, default_out: Path):
    """An argument parser with --run (repeatable, required) and --out, described by `doc`'s first paragraph."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--run", type=Path, action="append", required=True, help="a run whose search is done (repeat)")
    parser.add_argument("--out", type=Path, default=default_out)
    return parser


def report_over_runs(args, bench_run, render) -> int:
    """`bench_run(path, args)` for each --run; `render(results, args, provenance)` written to --out and
    printed, the results in JSON beside it. A run that is not one (no recipe, no search) is one red
    line and exit code 2."""
    from eftnas_cli.rundir import write_json

    def report() -> int:
        results = [bench_run(path, args) for path in args.run]
        record = provenance("cpu", {"runs": ", ".join(str(path) for path in args.run)})
        text = render(results, args, record)
        write_report(args.out, text)
        write_json(args.out.with_suffix(".json"), {"provenance": record, "runs": results})
        print(text)
        return 0

    return user_errors_in_one_line(report)


def user_errors_in_one_line(call) -> int:
    """`call()`'s exit code; a user error (a recipe, input or upstream stage to fix) is one red line
    and exit code 2 instead of a traceback."""
    from eftnas_cli.errors import EftnasError
    from eftnas_cli.ui import console

    try:
        return call()
    except EftnasError as error:
        console.print(f"[red]error:[/red] {error}", soft_wrap=True)
        return 2


def mean_sd(values: list[float], signed: bool = False) -> str:
    """`mean ± sd` with 2 decimals (the mean alone for one value); `signed` puts + on positive means."""
    mean = f"{statistics.fmean(values):{'+' if signed else ''}.2f}"
    return f"{mean} ± {statistics.stdev(values):.2f}" if len(values) > 1 else mean


# ---- targets -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TargetCheck:
    """One target of a benchmark and what was measured; a miss is shown, never hidden."""

    scope: str  # what is checked, e.g. "mrpc @ 0.5"
    target: str
    measured: str
    met: bool | None  # None: could not be measured

    @property
    def verdict(self) -> str:
        return "n/a" if self.met is None else ("met" if self.met else "MISSED")

    def as_dict(self) -> dict:
        return {"scope": self.scope, "target": self.target, "measured": self.measured, "met": self.met}


def targets_table(checks: list[TargetCheck]) -> str:
    rows = [[c.scope, c.target, c.measured, c.verdict] for c in checks]
    return markdown_table(["scope", "target", "measured", "verdict"], rows, align="llrl")


# ---- smoke runs --------------------------------------------------------------------------------
# On top of testing.TINY_RECIPE: fewer training steps, since a smoke run only checks the plumbing.
SMOKE_RECIPE_CHANGES = {"finetune.epochs": 1, "importance.epochs": 1}


def write_smoke_recipe(root: Path, changes: dict | None = None, task: str = "mrpc") -> Path:
    """A tiny random model, tiny synthetic GLUE data and the tiny recipe for them, all under `root`
    (runs go to `root/runs`); returns the recipe file."""
    from eftnas_cli.testing import make_tiny_glue_dir, make_tiny_model, write_tiny_recipe

    model_dir = make_tiny_model(root / "tiny-model")
    glue_dir = make_tiny_glue_dir(root / "tiny-glue", task, n_train=32, n_eval=16)
    return write_tiny_recipe(root / "recipe.yaml", root / "runs", model_dir, glue_dir,
                             {**SMOKE_RECIPE_CHANGES, **(changes or {})})


def print_target_summary(checks: list[dict]) -> None:
    """One closing line: how many targets were missed, and which."""
    missed = [check for check in checks if check["met"] is False]
    listed = ": " + "; ".join(f"{c['scope']}: {c['target']}" for c in missed) if missed else ""
    print(f"targets: {len(missed)} missed{listed}")


def main_with_smoke(args, run, smoke_prefix: str) -> int:
    """Run `run(args, scratch)`: scratch is a temporary folder under --smoke, else None.
    A user error is one red line and exit code 2."""
    import tempfile

    def call() -> int:
        if not args.smoke:
            return run(args, None)
        with tempfile.TemporaryDirectory(prefix=smoke_prefix) as scratch:
            return run(args, Path(scratch))

    return user_errors_in_one_line(call)
