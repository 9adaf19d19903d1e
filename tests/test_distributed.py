"""Two processes (torchrun, gloo on CPU) train what one process trains with the same global batch.

A tiny model without dropout (dropout draws differ between one process and two) runs finetune,
taylor importance and gen-space in this process; copies of that run directory then go through
`train-supernet` and `importance` (movement), once here and once under `torchrun --nproc_per_node 2`
with tests/distributed_worker.py, which runs the eftnas command line unchanged and records, per
rank, every file it changed in the run directory, when DDP all-reduced, and its terminal output.

Tolerance: the two runs compute the same sums in a different order (each rank's half-batch
gradient, then the all-reduce's average, against one gradient over the whole batch), so they
differ by float32 rounding, ~1e-7 relative per step; Adam divides each step by the root of its
running squared gradient, which can amplify a rounding difference for a weight whose gradient is
near zero, up to a share of the learning rate. After 4 steps at learning rate 1e-3 the weights must
agree to TOLERANCE = 1e-5, a hundredth of one step's typical move (measured: a few 1e-7), while the
training moved them by orders of magnitude more (checked too, so that agreement is not trivial).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from eftnas_cli.recipe import load_recipe
from eftnas_cli.stages.finetune import finetune
from eftnas_cli.stages.gen_space import generate_space
from eftnas_cli.stages.importance import compute_importance
from eftnas_cli.stages.train_supernet import train_supernet
from eftnas_cli.testing import make_tiny_glue_dir, make_tiny_model, write_tiny_recipe

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("distributed_worker.py")
PROCESSES = 2
TOLERANCE = 1e-5
# 72 training rows: 8 held out as search rows, 64 left = 4 full global batches of 16 per epoch (a
# partial last batch would be padded differently by one process and by two).
GLOBAL_BATCH = 16
STEPS = 4
SANDWICH = 3  # largest, one random, smallest


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> Path:
    """A recipe file whose run directory holds finetune, importance (taylor) and gen-space."""
    root = tmp_path_factory.mktemp("distributed")
    model = make_tiny_model(root / "model", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    glue = make_tiny_glue_dir(root / "glue", "mrpc", n_train=72, n_eval=32)
    recipe_file = write_tiny_recipe(root / "recipe.yaml", root / "runs", model, glue, {
        "finetune.max_steps": 4, "supernet.batch_size": GLOBAL_BATCH, "supernet.epochs": 1, "supernet.save_steps": 2,
        "importance.batch_size": GLOBAL_BATCH,
    })
    recipe = load_recipe(recipe_file, [])
    finetune(recipe)
    compute_importance(recipe)
    generate_space(recipe)
    return recipe_file


def _copy_run(recipe_file: Path, name: str) -> Path:
    source = load_recipe(recipe_file, []).run_dir
    shutil.copytree(source, source.with_name(name))
    return source.with_name(name)


def _launch(recipe_file: Path, run_dir: Path, log_dir: Path, *arguments: str) -> dict[int, dict]:
    """torchrun of the worker over `arguments`; per rank: its record and its terminal output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={PROCESSES}",
               str(WORKER), str(log_dir), str(run_dir), *arguments[:1], str(recipe_file), *arguments[1:]]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    ranks = {}
    for rank in range(PROCESSES):
        record_file, stderr_file = log_dir / f"rank{rank}.json", log_dir / f"rank{rank}.stderr"
        ranks[rank] = {**(json.loads(record_file.read_text()) if record_file.is_file() else {}),
                       "stderr": stderr_file.read_text() if stderr_file.is_file() else ""}
    assert finished.returncode == 0, finished.stderr[-3000:] + "".join(r["stderr"][-3000:] for r in ranks.values())
    return ranks


def _content_writes(record: dict) -> Counter:
    """How often each file's content was written (opened for writing, by safetensors or renamed
    onto; a copy opens its destination for writing)."""
    return Counter(path for event, path in record["writes"] if event in ("open", "safetensors", "os.rename"))


def _check_one_writer(ranks: dict[int, dict], allowed_on_other_ranks: tuple[str, ...] = ()) -> None:
    """The main process wrote each file once; the other ranks wrote nothing in the run directory
    (but, where allowed, the Trainer's per-rank RNG state inside its checkpoints)."""
    for path, count in _content_writes(ranks[0]).items():
        assert count == 1, f"rank 0 wrote {path} {count} times"
    for rank in range(1, PROCESSES):
        others = [(event, path) for event, path in ranks[rank]["writes"]
                  if not any(Path(path).match(pattern) for pattern in allowed_on_other_ranks)]
        assert others == [], f"rank {rank} changed the run directory: {others}"


def _check_manifest(run_dir: Path, stages: set[str]) -> None:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert set(manifest["stages"]) == stages
    from eftnas_cli.rundir import sha256

    for stage in stages:
        for relative, digest in manifest["stages"][stage]["outputs"].items():
            assert sha256(run_dir / relative) == digest, f"{relative} changed after {stage} recorded it"


def _max_difference(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> float:
    assert first.keys() == second.keys()
    return max((first[name].float() - second[name].float()).abs().max().item() for name in first)


def test_train_supernet_on_two_processes_matches_one(upstream, tmp_path):
    single = _copy_run(upstream, "single")
    train_supernet(load_recipe(upstream, ["name=single"]))
    distributed = _copy_run(upstream, "two")
    ranks = _launch(upstream, distributed, tmp_path / "logs", "train-supernet", "name=two")

    two = load_file(str(distributed / "supernet" / "model" / "model.safetensors"))
    one = load_file(str(single / "supernet" / "model" / "model.safetensors"))
    teacher = load_file(str(single / "finetune" / "model" / "model.safetensors"))
    difference = _max_difference(two, one)
    print(f"largest difference between one and two processes: {difference:.2e}")
    assert difference < TOLERANCE
    # Not trivially equal: training moved the (not reordered) classifier far beyond the tolerance.
    assert (one["classifier.weight"] - teacher["classifier.weight"]).abs().max() > 10 * TOLERANCE
    # Evaluation gathered over both ranks: the probes score all search rows as one process does.
    metrics = [json.loads((run / "supernet" / "metrics.json").read_text()) for run in (distributed, single)]
    assert metrics[0]["final"] == metrics[1]["final"]

    # Every rank trained the same sandwich; DDP all-reduced once per step, after its last backward.
    for rank in range(PROCESSES):
        assert ranks[rank]["backward_passes"] == STEPS * SANDWICH
        assert set(ranks[rank]["allreduce_at"]) == {SANDWICH * (step + 1) for step in range(STEPS)}

    # Each rank saves its own RNG state into the main process's checkpoint folder, for a resume.
    _check_one_writer(ranks, allowed_on_other_ranks=("checkpoints/supernet/checkpoint-*",
                                                     "checkpoints/supernet/checkpoint-*/rng_state_1.pth"))
    _check_manifest(distributed, {"finetune", "importance", "gen-space", "train-supernet"})
    assert not (distributed / "checkpoints").exists()
    # One progress display: the main process's.
    assert ranks[0]["stderr"].count("super-network on mrpc") == 1
    assert "super-network" not in ranks[1]["stderr"]


def test_movement_importance_on_two_processes_matches_one(upstream, tmp_path):
    movement = ["importance.method=movement"]
    single = _copy_run(upstream, "single-movement")
    compute_importance(load_recipe(upstream, ["name=single-movement", *movement]))
    distributed = _copy_run(upstream, "two-movement")
    ranks = _launch(upstream, distributed, tmp_path / "logs", "importance", "name=two-movement", *movement)

    two = load_file(str(distributed / "importance" / "importance.safetensors"))
    one = load_file(str(single / "importance" / "importance.safetensors"))
    # The scores moved from sigmoid(init_score) = 0.5 (DDP averaged their gradients: without that
    # each rank would learn from half the rows and the main process's scores would differ).
    assert (one["neurons"] - 0.5).abs().max() > 100 * TOLERANCE
    difference = _max_difference(two, one)
    print(f"largest difference between one and two processes: {difference:.2e}")
    assert difference < TOLERANCE

    _check_one_writer(ranks)
    _check_manifest(distributed, {"finetune", "importance", "gen-space"})
    assert ranks[0]["stderr"].count("movement scores on mrpc") == 1
    assert "movement" not in ranks[1]["stderr"]


def test_taylor_splits_the_rows_over_ranks_and_sums_them(tiny_model_dir, tiny_glue_dir, monkeypatch):
    """Each rank's share of the batches, summed as the all-reduce sums them, is the one-process Σ g²
    (here in one process, with the rank faked: the all-reduce itself is torch's)."""
    from eftnas_cli import distributed
    from eftnas_cli.data import load_task_data
    from eftnas_cli.models import load_model, load_tokenizer
    from eftnas_cli.ranking import taylor_sensitivity
    from eftnas_cli.recipe import ImportanceSection

    data = load_task_data("mrpc", load_tokenizer(str(tiny_model_dir)), data_dir=tiny_glue_dir, max_seq_length=32)
    model = load_model(str(tiny_model_dir), data.spec)
    section = ImportanceSection(taylor_rows=40, batch_size=8)  # 5 batches: ranks take 2 and 3
    whole = taylor_sensitivity(model, data, section, torch.device("cpu"))
    shares = []
    for rank in range(PROCESSES):
        monkeypatch.setattr(distributed, "world_size", lambda: PROCESSES)
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        shares.append(taylor_sensitivity(model, data, section, torch.device("cpu")))
    for share in shares:  # each rank saw part of the rows only
        assert not torch.allclose(share[0], whole[0])
    torch.testing.assert_close(shares[0][0] + shares[1][0], whole[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(shares[0][1] + shares[1][1], whole[1], rtol=1e-5, atol=0)
