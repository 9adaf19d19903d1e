"""Terminal output shared by the CLI and the stages: one rich console, one progress style."""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

REDIRECTED_WIDTH = 160
# Written to a file or a CI log, rich would wrap at 80 columns and cut the numbers of result tables.
console = Console(stderr=True, highlight=False,
                  width=None if sys.stderr.isatty() or "COLUMNS" in os.environ else REDIRECTED_WIDTH)


def progress() -> Progress:
    """A progress display for long work (training steps, search trials, latency runs)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        transient=False,
    )


def percent_of(score: float, reference: float) -> str:
    """`score` as a share of `reference` ("97.3%"), or "-" when the reference is not positive."""
    return f"{100 * score / reference:.1f}%" if reference > 0 else "-"
