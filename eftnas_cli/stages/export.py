"""Stage `export`: cut chosen subnets out of the super-network into smaller dense models.

Each subnet becomes a folder with sliced safetensors weights, a config holding the per-layer widths
and the tokenizer (loadable in one call: `eftnas_cli.load_model(folder)`), plus `model.onnx`,
OpenVINO IR and optionally INT8 IR (NNCF post-training quantization calibrated on train rows). The
exported model is evaluated again; a metric further than `max_metric_drop` from the search's
record is an error, since it would mean extraction changed the function.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from eftnas_cli import elastic
from eftnas_cli.errors import UserError
from eftnas_cli.models import best_device, load_model, load_tokenizer, save_model
from eftnas_cli.recipe import ExportSection, Recipe
from eftnas_cli.rundir import RunDir, write_json
from eftnas_cli.stages.common import first_eval_split, model_files, task_data, teacher_folder
from eftnas_cli.stages.gen_space import SPACE_FILE, SearchSpace
from eftnas_cli.stages.search import PARETO_FILE, TRIALS_FILE, describe, percent_of
from eftnas_cli.stages.train_supernet import supernet_folder
from eftnas_cli.training import evaluate
from eftnas_cli.ui import console


def choose_subnets(run: RunDir, budgets, trial, subnet_file) -> list[tuple[str, elastic.Subnet, dict | None]]:
    """(label, subnet, the search's record of it or None) for each requested export."""
    if subnet_file is not None:
        try:
            subnet = elastic.Subnet.from_dict(json.loads(Path(subnet_file).read_text()))
        except json.JSONDecodeError as error:
            raise UserError(f"{subnet_file}: not valid JSON ({error.msg})") from None
        return [(Path(subnet_file).stem, subnet, None)]
    pareto = json.loads((run.require("search", by="export") / PARETO_FILE).read_text())
    if trial is not None:
        trials = json.loads((run.stage_dir("search") / TRIALS_FILE).read_text())
        record = next((t for t in trials if t["trial"] == trial), None)
        if record is None:
            raise UserError(f"--trial {trial}: no completed search trial with that number")
        return [(f"trial-{trial}", elastic.Subnet.from_dict(record["subnet"]), record)]
    chosen = []
    for budget in budgets:
        candidates = [t for t in pareto["front"] if t["macs"] <= budget * pareto["full_macs"]]
        if not candidates:
            raise UserError(f"no searched subnet within {budget:g} of the full MACs; search with that budget first")
        best = max(candidates, key=lambda t: (t["score"], -t["macs"]))
        chosen.append((f"budget-{budget:g}", elastic.Subnet.from_dict(best["subnet"]), best))
    return chosen


def _latency_features(model, section: ExportSection, batch: int) -> dict:
    from eftnas_cli.deploy import model_input_names
    from eftnas_cli.latency import dummy_features

    return dummy_features(model_input_names(model), batch, section.latency_seq_len, model.config.vocab_size)


def _torch_latencies(model, section: ExportSection) -> dict:
    """Torch latency (median ms) per batch size, where the model is. Taken before any OpenVINO
    work: OpenVINO's worker threads linger after it runs and would slow torch down."""
    from eftnas_cli.latency import torch_latency

    device = str(next(model.parameters()).device)
    return {f"torch_batch{batch}": torch_latency(model, _latency_features(model, section, batch),
                                                 runs=section.latency_runs, device=device).median_ms
            for batch in section.latency_batch_sizes}


def _converted_latencies(model, folder: Path, section: ExportSection) -> dict:
    """ONNX Runtime, OpenVINO f32 and OpenVINO INT8 latency (median ms) of the files in `folder`."""
    from eftnas_cli.latency import onnx_latency, openvino_latency

    files = {"onnxruntime": (folder / "model.onnx", None), "openvino": (folder / "openvino" / "model.xml", "f32"),
             "openvino_int8": (folder / "openvino" / "model_int8.xml", "default")}
    results = {}
    for batch in section.latency_batch_sizes:
        features = _latency_features(model, section, batch)
        for backend, (path, precision) in files.items():
            if not path.exists():
                continue
            latency = (onnx_latency(path, features, runs=section.latency_runs) if precision is None
                       else openvino_latency(path, features, precision=precision, runs=section.latency_runs))
            results[f"{backend}_batch{batch}"] = latency.median_ms
    return results


def _deploy_formats(model, folder: Path, section: ExportSection, data) -> None:
    from eftnas_cli.deploy import calibration_batches, export_onnx, model_input_names, quantize_int8, to_openvino

    if not (section.onnx or section.openvino):
        return
    onnx_path = export_onnx(model, folder / "model.onnx")
    if section.openvino:
        xml = to_openvino(onnx_path, folder / "openvino" / "model.xml")
        if section.int8:
            calibration = calibration_batches(data.train, data.collator, model_input_names(model), section.calibration_samples)
            quantize_int8(xml, calibration, folder / "openvino" / "model_int8.xml")
    if not section.onnx:
        onnx_path.unlink()


def _earlier_exports(folder: Path, replaced: set[str]) -> dict[str, dict]:
    """Label → metrics of exports a previous call made that this call does not redo."""
    summary_file = folder / "summary.json"
    if not summary_file.is_file():
        return {}
    exports = json.loads(summary_file.read_text())["exports"]
    return {label: metrics for label, metrics in exports.items() if label not in replaced and (folder / label).is_dir()}


def export(recipe: Recipe, budgets=None, trial: int | None = None, subnet_file: Path | None = None) -> dict:
    """Exports the chosen subnets under `export/<label>/`; prints the summary table."""
    started = time.perf_counter()
    run = RunDir(recipe)
    section = recipe.export
    supernet_dir = supernet_folder(run, by="export")
    teacher_dir = teacher_folder(recipe, run, by="export")
    chosen = choose_subnets(run, budgets or section.budgets, trial, subnet_file)
    tokenizer = load_tokenizer(recipe.model.name)
    data = task_data(recipe, tokenizer)
    supernet = load_model(str(supernet_dir), data.spec)  # extract slices it; no elastic forward needed
    for _, subnet, _ in chosen:
        elastic.validate_subnet(supernet.config, subnet)
    device = best_device(recipe.device)
    split = data.eval[first_eval_split(data)]
    pareto_file = run.stage_dir("search") / PARETO_FILE
    search_rows = json.loads(pareto_file.read_text())["eval_rows"] if pareto_file.exists() else len(split)
    seq_len = SearchSpace.load(supernet_dir.parent / SPACE_FILE).seq_len  # the search's MACs convention
    full_macs = elastic.macs(supernet.config, None, seq_len).encoder

    teacher = load_model(teacher_dir, data.spec).to(device).eval()
    summary = {"teacher": {
        "metrics": evaluate(teacher, split, data.collator, data.spec),
        "gmacs": full_macs / 1e9,
        "params": elastic.count_params(teacher.config).encoder,
        "latency_ms": _torch_latencies(teacher, section),
    }, "exports": {}}
    previous = run.stage_dir("export")
    kept = _earlier_exports(previous, {label for label, _, _ in chosen})

    with run.stage("export", started) as out:
        for path in [*model_files(supernet_dir), *model_files(teacher_dir)]:
            out.add_input(path)
        # Exports of earlier calls stay beside the new ones (a new label replaces its namesake).
        for label, metrics in kept.items():
            shutil.copytree(previous / label, out.dir / label)
            summary["exports"][label] = metrics
        exported_models = {}
        for label, subnet, record in chosen:
            console.print(f"export {label}: {describe(subnet)}")
            folder = out.dir / label
            save_model(elastic.extract(supernet, subnet), tokenizer, folder)
            exported = exported_models[label] = load_model(str(folder), data.spec).to(device).eval()
            if record is not None:
                rows = split.select(range(min(search_rows, len(split))))
                rechecked = evaluate(exported, rows, data.collator, data.spec)["score"]
                if abs(rechecked - record["score"]) > section.max_metric_drop:
                    raise RuntimeError(
                        f"{label}: exported model scores {rechecked:.4f}, the search recorded {record['score']:.4f}"
                    )
            macs = elastic.macs(supernet.config, subnet, seq_len).encoder
            summary["exports"][label] = {
                "subnet": subnet.to_dict(),
                "metrics": evaluate(exported, split, data.collator, data.spec),
                "gmacs": macs / 1e9,
                "macs_ratio": macs / full_macs,
                "params": elastic.count_params(supernet.config, subnet).encoder,
                "latency_ms": _torch_latencies(exported, section),
            }
        # ONNX/OpenVINO conversion and timing only after every torch timing (see _torch_latencies).
        for label, exported in exported_models.items():
            folder = out.dir / label
            _deploy_formats(exported, folder, section, data)
            summary["exports"][label]["latency_ms"].update(_converted_latencies(exported, folder, section))
            write_json(folder / "metrics.json", summary["exports"][label])
        write_json(out.dir / "summary.json", summary)
        out.metrics = summary
    print_summary(summary, data.spec.main_metric)
    return summary


def print_summary(summary: dict, metric: str) -> None:
    """The closing table: teacher vs each export — metric, % of teacher, MACs ratio, speed-ups
    over the dense teacher in torch (each batch size) and in OpenVINO (OV) f32 / INT8 (smallest batch)."""
    from rich import box
    from rich.table import Table

    teacher = summary["teacher"]
    base_score, base_latency = teacher["metrics"]["score"], teacher["latency_ms"]
    batches = sorted(int(key.removeprefix("torch_batch")) for key in base_latency if key.startswith("torch_batch"))
    speedups = [(f"torch b{b}", f"torch_batch{b}", f"torch_batch{b}") for b in batches]
    speedups += [(f"OV b{batches[0]}", f"openvino_batch{batches[0]}", f"torch_batch{batches[0]}"),
                 (f"INT8 b{batches[0]}", f"openvino_int8_batch{batches[0]}", f"torch_batch{batches[0]}")]
    table = Table(title=f"eftnas result: {metric}, MACs and speed-up over the dense teacher in torch",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("model", metric, "% teacher", "GMACs", *(name for name, _, _ in speedups)):
        table.add_column(column, justify="right", no_wrap=column in ("model", "GMACs"))
    table.add_row("teacher", f"{base_score:.4f}", "100.0%", f"{teacher['gmacs']:.2f}",
                  *("1.00×" if key.startswith("torch") else "" for _, key, _ in speedups))
    for label, export in summary["exports"].items():
        latency = export["latency_ms"]
        table.add_row(
            label, f"{export['metrics']['score']:.4f}", percent_of(export["metrics"]["score"], base_score),
            f"{export['gmacs']:.2f} ({export['macs_ratio']:.0%})",
            *(f"{base_latency[reference] / latency[key]:.2f}×" if key in latency else "-" for _, key, reference in speedups),
        )
    console.print(table)
