"""The benchmark scripts end to end on the tiny model (`--smoke`), as a user runs them."""

from __future__ import annotations

import importlib.util
import json
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
    result = run_script("bench_quality.py", "--smoke", "--out", out)
    assert result.returncode == 0, result.stdout + result.stderr

    table = table_with_header(result.stdout, "method")
    assert table[0] == ["method", "budget", "accuracy (x100)", "% of teacher", "MACs ratio", "training wall time",
                        "architecture (heads/neurons per layer)"]
    assert [row[0] for row in table[1:]] == [
        "teacher (dense)", "eftnas (searched subnet)", "(a) pruned, no retraining", "(b) pruned + KD fine-tune",
        "(c) uniform width (super-network)", "(d) layer drop + KD",
    ]
    assert table[1][3] == "100.0%" and table[1][4] == "1.000"
    for row in table[2:]:
        assert row[1] == "0.6" and float(row[4]) <= 0.6, row  # every method within the budget
    # the budget's checks: retention, beats (a), beats (c), close to (b)
    check_targets(result.stdout, expected_rows=4)

    assert out.read_text() in result.stdout
    results = json.loads((tmp_path / "benchmarks_quality.json").read_text())["tasks"]
    assert list(results) == ["mrpc"] and len(results["mrpc"]["rows"]) == 6
    assert results["mrpc"]["provenance"]["command"].endswith("--smoke --out " + str(out))


def test_bench_speed_smoke(tmp_path):
    out = tmp_path / "speed.md"
    result = run_script("bench_speed.py", "--smoke", "--out", out)
    assert result.returncode == 0, result.stdout + result.stderr

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


def test_bench_speed_without_a_run_says_what_to_do(tmp_path):
    result = run_script("bench_speed.py", "--run", tmp_path / "missing")
    assert result.returncode == 2
    assert "make quickstart" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.fixture
def bench_quality(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    spec = importlib.util.spec_from_file_location("bench_quality", SCRIPTS / "bench_quality.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_quality", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_layer_drop_keeps_evenly_spaced_layers(bench_quality):
    # DistilBERT-style: every other layer of 6 (1-based 1, 3, 5), and 2 of 6 (1-based 2, 5)
    assert bench_quality.evenly_spaced_layers(6, 3) == [0, 2, 4]
    assert bench_quality.evenly_spaced_layers(6, 2) == [1, 4]
    assert bench_quality.evenly_spaced_layers(6, 6) == list(range(6))
    assert bench_quality.evenly_spaced_layers(12, 6) == [0, 2, 4, 6, 8, 10]
