"""Every stage on a tiny model through the command line, then the export checked against the
super-network it was cut from, in torch, ONNX Runtime and OpenVINO."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from eftnas_cli.cli import app
from eftnas_cli.data import recipe_task_data
from eftnas_cli.deploy import onnx_logits, openvino_logits
from eftnas_cli.models import load_model, load_tokenizer
from eftnas_cli.recipe import load_recipe
from eftnas_cli.tasks import get_task
from eftnas_cli.testing import (export_beside_its_subnet, make_tiny_glue_dir, make_tiny_model, random_features,
                                write_tiny_recipe)
from eftnas_cli.training import evaluate


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir, tiny_glue_dir):
    """One full `eftnas run` shared by the tests of this module."""
    root = tmp_path_factory.mktemp("e2e")
    path = write_tiny_recipe(root / "recipe.yaml", root / "runs", tiny_model_dir, tiny_glue_dir)
    result = invoke("run", path)
    return path, root / "runs" / "tiny", result.output


def test_run_writes_every_stage(finished_run):
    _, run_dir, output = finished_run
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert list(manifest["stages"]) == ["finetune", "importance", "gen-space", "train-supernet", "search", "export"]
    for stage, record in manifest["stages"].items():
        assert record["outputs"], stage
        assert record["wall_time_s"] >= 0 and "torch" in record["versions"]
    for name in ("finetune/model/model.safetensors", "importance/importance.safetensors", "importance/heatmap.png",
                 "space/search_space.json", "space/space.png", "supernet/model/model.safetensors",
                 "search/trials.csv", "search/pareto.json", "search/pareto.png", "export/summary.json"):
        assert (run_dir / name).is_file(), name
    assert not list(run_dir.glob(".*tmp*")), "no temporary folders left"
    assert "result" in output and "teacher" in output


def test_second_run_skips_completed_stages(finished_run):
    path, run_dir, _ = finished_run
    before = (run_dir / "manifest.json").read_text()
    output = " ".join(invoke("run", path).output.split())
    for stage in ("finetune", "importance", "gen-space", "train-supernet", "search", "export"):
        assert f"{stage}: up to date, skipped" in output
    assert (run_dir / "manifest.json").read_text() == before


def test_export_matches_supernet_subnet_in_torch_onnx_openvino(finished_run):
    _, run_dir, _ = finished_run
    folder, exported, supernet = export_beside_its_subnet(run_dir, "mrpc")
    features = random_features(exported.config.vocab_size, 3, 12, pad_row_1_from=8)
    with torch.no_grad():
        expected = supernet(**features).logits.numpy()
        got = exported(**features).logits.numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert sum(p.numel() for p in exported.parameters()) < sum(p.numel() for p in supernet.parameters())

    arrays = {k: v.numpy() for k, v in features.items()}
    np.testing.assert_allclose(onnx_logits(folder / "model.onnx", arrays), expected, atol=1e-4)
    np.testing.assert_allclose(openvino_logits(folder / "openvino" / "model.xml", arrays, precision="f32"), expected, atol=1e-4)
    assert (folder / "openvino" / "model_int8.xml").is_file()

    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["macs_ratio"] <= 0.6 + 1e-9
    assert {"torch_batch1", "onnxruntime_batch1", "openvino_batch1", "openvino_int8_batch1"} <= set(metrics["latency_ms"])


def test_search_outputs_are_consistent(finished_run):
    _, run_dir, _ = finished_run
    pareto = json.loads((run_dir / "search" / "pareto.json").read_text())
    trials = json.loads((run_dir / "search" / "trials.json").read_text())
    assert len(trials) >= 1 and pareto["front"]
    chosen = pareto["best_per_budget"]["0.6"]
    within = [t for t in trials if t["macs"] <= 0.6 * pareto["full_macs"]]
    best = max(t["score"] for t in within)
    margin = pareto["tie_standard_errors"] * (best * (1 - best) / pareto["eval_rows"]) ** 0.5
    near_tied = [t for t in within if t["score"] >= best - margin]
    assert chosen in near_tied and chosen["macs"] == max(t["macs"] for t in near_tied)


def test_export_of_a_subnet_file_and_profile(finished_run, tmp_path):
    path, run_dir, _ = finished_run
    space = json.loads((run_dir / "space" / "search_space.json").read_text())
    subnet_file = tmp_path / "smallest.json"
    subnet_file.write_text(json.dumps(space["targets"][-1]["subnet"]))
    invoke("export", path, "--subnet", subnet_file, "export.int8=false", "export.openvino=false", "name=tiny")
    folder = run_dir / "export" / "smallest"
    assert (folder / "model.safetensors").is_file() and (folder / "model.onnx").is_file()
    output = " ".join(invoke("profile", folder, "--seq-len", "16").output.split())
    assert "encoder:" in output and "of the full model" in output


def test_search_scores_subnets_on_a_named_split(tmp_path, tiny_model_dir):
    """task.search_split: the search rows are that split's (e.g. a dev set shaped like the deployment data)."""
    glue_dir = make_tiny_glue_dir(tmp_path / "glue", "mrpc", n_train=64, n_eval=32, extra_splits={"dev": 24})
    path = write_tiny_recipe(tmp_path / "recipe.yaml", tmp_path / "runs", tiny_model_dir, glue_dir, {"task.search_split": "dev"})
    invoke("run", path, "--until", "search")
    pareto = json.loads((tmp_path / "runs" / "tiny" / "search" / "pareto.json").read_text())
    assert (pareto["eval_split"], pareto["eval_rows"]) == ("search rows (the dev split)", 24)


def test_stage_refuses_to_start_without_upstream(write_recipe):
    result = CliRunner().invoke(app, ["search", str(write_recipe())])
    assert result.exit_code == 2
    assert "run `eftnas train-supernet` first" in " ".join(result.output.split())


def test_run_directory_of_another_model_is_refused(finished_run, tmp_path, tiny_glue_dir):
    path, run_dir, _ = finished_run
    other = tmp_path / "other-model"
    make_tiny_model(other, seed=1)
    result = CliRunner().invoke(app, ["importance", str(path), f"model.name={other}"])
    assert result.exit_code == 2
    assert "was made for model" in " ".join(result.output.split())


def test_export_by_trial_number(finished_run):
    path, run_dir, _ = finished_run
    trial = json.loads((run_dir / "search" / "pareto.json").read_text())["front"][0]["trial"]
    invoke("export", path, "--trial", trial, "export.onnx=false", "export.openvino=false")
    exported = load_model(str(run_dir / "export" / f"trial-{trial}"), get_task("mrpc"))
    # Earlier exports stay beside the new one.
    assert (run_dir / "export" / "budget-0.6" / "model.safetensors").is_file()
    summary = json.loads((run_dir / "export" / "summary.json").read_text())
    assert {"budget-0.6", "smallest", f"trial-{trial}"} <= set(summary["exports"])
    front = json.loads((run_dir / "search" / "pareto.json").read_text())["front"][0]
    assert exported.config.eftnas_subnet == front["subnet"]


def test_search_with_latency_as_third_objective(finished_run):
    path, run_dir, _ = finished_run
    invoke("search", path, "search.latency=true", "search.trials=3", "search.population=3", "search.latency_seq_len=8")
    trials = json.loads((run_dir / "search" / "trials.json").read_text())
    assert len(trials) == 3 and all(t["latency_ms"] > 0 for t in trials)
    header = (run_dir / "search" / "trials.csv").read_text().splitlines()[0].split(",")
    assert "latency_ms" in header and "macs_ratio" in header


def test_unknown_trial_is_a_user_error(finished_run):
    path, _, _ = finished_run
    result = CliRunner().invoke(app, ["export", str(path), "--trial", "999"])
    assert result.exit_code == 2 and "no completed search trial" in result.output


def test_polish_keeps_the_weights_that_score_best_on_the_search_rows(finished_run, tmp_path):
    path, run_dir, _ = finished_run
    space = json.loads((run_dir / "space" / "search_space.json").read_text())
    subnet_file = tmp_path / "polished.json"
    subnet_file.write_text(json.dumps(space["targets"][0]["subnet"]))
    invoke("export", path, "--subnet", subnet_file, "export.finetune_epochs=2", "export.onnx=false",
           "export.openvino=false")
    entry = json.loads((run_dir / "export" / "summary.json").read_text())["exports"]["polished"]
    polish = entry["polish"]
    assert len(polish["epoch_scores"]) == 2 and polish["rows"] > 0
    recipe = load_recipe(path)
    data = recipe_task_data(recipe, load_tokenizer(recipe.model.name))
    # The search read every search row of the tiny run: the polish chose among its epochs on them.
    assert not polish["start_competes"] and polish["rows"] == len(data.search) and polish["kept_epoch"] >= 1
    exported = load_model(str(run_dir / "export" / "polished"), data.spec).eval()
    kept = polish["epoch_scores"][polish["kept_epoch"] - 1]
    assert kept == max(polish["epoch_scores"])
    assert evaluate(exported, data.search, data.collator, data.spec)["score"] == kept
