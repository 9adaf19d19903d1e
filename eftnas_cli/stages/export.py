"""Stage `export`: cut chosen subnets out of the super-network into smaller dense models.

Each subnet becomes a folder with sliced safetensors weights, a config holding the per-layer widths
and the tokenizer (loadable in one call: `eftnas_cli.load_model(folder)`), plus `model.onnx`,
OpenVINO IR and optionally INT8 IR (NNCF post-training quantization calibrated on train rows). The
exported model is evaluated again; a metric further than `max_metric_drop` from the search's
record is an error, since it would mean extraction changed the function. With
`export.finetune_epochs`, each extracted subnet is then polished: fine-tuned with KD from the
teacher, keeping the weights (before the polish or after one of its epochs) that score best on
search rows the search did not read (`training.polish_selection_rows`), its unpolished metrics kept
beside. Latencies of the teacher and the exports are measured
side by side (`latency.LatencyComparison`).
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

from eftnas_cli import artifacts, elastic
from eftnas_cli.data import TaskData, recipe_task_data
from eftnas_cli.errors import UserError
from eftnas_cli.latency import LatencyComparison, TimedModel
from eftnas_cli.models import best_device, load_model, load_tokenizer, save_model
from eftnas_cli.recipe import ExportSection, Recipe
from eftnas_cli.rundir import RunDir, holds_lock, write_json
from eftnas_cli.supernet import Supernet
from eftnas_cli.tasks import Task
from eftnas_cli.training import Polished, autocast, evaluate, polish
from eftnas_cli.ui import console, percent_of

BY = "export"
# Column titles of the closing table, short enough for an 80-column terminal.
METRIC_TITLES = {"exact_match": "EM", "f1": "F1", "accuracy": "acc", "matthews_correlation": "MCC", "spearmanr": "spearman"}
TEACHER = "teacher"
CONVERTED_BACKENDS = ["onnxruntime", "openvino", "openvino_int8"]
# An export label becomes a folder name under export/.
SAFE_LABEL = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def _subnet_file_label(subnet_file: Path) -> str:
    label = Path(subnet_file).stem
    if not SAFE_LABEL.fullmatch(label) or label == artifacts.EXPORT_SUMMARY_FILE.removesuffix(".json"):
        raise UserError(f"--subnet {subnet_file}: the file name '{label}' becomes the export's folder name; "
                        "rename the file to letters, digits, '_', '-' or '.' (not starting with '.' or '-')")
    return label


def choose_subnets(run: RunDir, supernet: Supernet, budgets, trial, subnet_file) -> list[tuple[str, elastic.Subnet, dict | None]]:
    """(label, subnet, the search's record of it or None) for each requested export."""
    if subnet_file is not None:
        label = _subnet_file_label(subnet_file)
        subnet = elastic.Subnet.from_json(subnet_file)
        elastic.validate_subnet(supernet.config, subnet)
        return [(label, subnet, None)]
    if trial is not None:
        record = next((t for t in artifacts.load_trials(run, by=BY) if t["trial"] == trial), None)
        if record is None:
            raise UserError(f"--trial {trial}: no completed search trial with that number")
        return [(f"trial-{trial}", elastic.Subnet.from_dict(record["subnet"]), record)]
    pareto = artifacts.load_pareto(run, by=BY)
    smallest = supernet.space.min_macs / pareto.full_macs
    chosen = []
    for budget in budgets:
        if budget < smallest:
            raise UserError(f"export budget {budget:g} is below the search space's smallest subnet ({smallest:.3f} of "
                            "the full MACs, set by space.cmin): lower space.cmin and run gen-space onwards again")
        best = pareto.best(budget)
        if best is None:
            raise UserError(f"the search found no subnet within {budget:g} of the full MACs: add {budget:g} to "
                            "search.budgets (or raise search.trials) and run search again")
        chosen.append((artifacts.export_label(budget), elastic.Subnet.from_dict(best["subnet"]), best))
    return chosen


def _deploy_formats(model, folder: Path, section: ExportSection, data: TaskData) -> dict[str, Path]:
    """Writes the converted formats the recipe asks for; returns backend name → file."""
    from eftnas_cli.deploy import calibration_batches, export_onnx, model_input_names, quantize_int8, to_openvino

    if not (section.onnx or section.openvino):
        return {}
    files = {"onnxruntime": export_onnx(model, folder / "model.onnx", output_names=data.spec.kind.output_names)}
    if section.openvino:
        files["openvino"] = to_openvino(files["onnxruntime"], folder / "openvino" / "model.xml")
        if section.int8:
            calibration = calibration_batches(data.calibration, data.collator, model_input_names(model),
                                              section.calibration_samples)
            files["openvino_int8"] = quantize_int8(files["openvino"], calibration, folder / "openvino" / "model_int8.xml")
    if not section.onnx:
        files.pop("onnxruntime").unlink()
    return files


def _earlier_exports(run: RunDir, replaced: set[str]) -> dict[str, dict]:
    """Label → metrics of exports a previous call made that this call does not redo."""
    exports = artifacts.load_export_summary(run).get("exports", {})
    folder = run.stage_dir("export")
    return {label: metrics for label, metrics in exports.items() if label not in replaced and (folder / label).is_dir()}


@holds_lock("export")
def export(recipe: Recipe, budgets=None, trial: int | None = None, subnet_file: Path | None = None) -> dict:
    """Exports the chosen subnets under `export/<label>/`; prints the summary table."""
    started = time.perf_counter()
    run = RunDir(recipe)
    section = recipe.export
    for budget in budgets or []:
        if not 0 < budget <= 1:  # NaN fails this too
            raise UserError(f"--budget {budget:g}: a budget is a fraction of the full MACs in (0, 1]")
    inputs = Supernet.input_files(run, by=BY)  # first: the upstream stage a user most likely lacks
    teacher_dir = artifacts.teacher_folder(recipe, run, by=BY)
    tokenizer = load_tokenizer(recipe.model.name)
    data = recipe_task_data(recipe, tokenizer)
    supernet = Supernet.load(run, data.spec, by=BY)  # the search's MACs convention comes with its space
    chosen = choose_subnets(run, supernet, budgets or section.budgets, trial, subnet_file)
    device = best_device(recipe.device)
    split = data.main_eval
    # The re-check measures as the search did: its rows, its precision.
    pareto = artifacts.load_pareto(run, by=BY) if run.record("search") else None
    rows_read, search_precision = (pareto.eval_rows, pareto.mixed_precision) if pareto else (len(data.search), "no")
    recheck_rows = data.search.select(range(min(rows_read, len(data.search))))

    teacher = load_model(teacher_dir, data.spec).to(device).eval()
    summary = {"teacher": {
        "metrics": evaluate(teacher, split, data.collator, data.spec),
        "gmacs": supernet.full_macs / 1e9,
        "params": supernet.params(None),
    }, "exports": {}}
    previous = run.stage_dir("export")
    kept = _earlier_exports(run, {label for label, _, _ in chosen})

    with run.stage("export", started) as out:
        for path in [*inputs, *artifacts.model_files(teacher_dir)]:
            out.add_input(path)
        # Exports of earlier calls stay beside the new ones (a new label replaces its namesake).
        for label, metrics in kept.items():
            shutil.copytree(previous / label, out.dir / label)
            summary["exports"][label] = metrics
        timed = {TEACHER: TimedModel(teacher, 1.0)}
        for label, subnet, record in chosen:
            console.print(f"export {label}: {subnet.describe()}")
            folder = out.dir / label
            save_model(supernet.extract(subnet), tokenizer, folder)
            exported = load_model(str(folder), data.spec).to(device).eval()
            if record is not None:
                with autocast(search_precision, device):
                    rechecked = evaluate(exported, recheck_rows, data.collator, data.spec)["score"]
                if abs(rechecked - record["score"]) > section.max_metric_drop:
                    raise RuntimeError(
                        f"{label}: exported model scores {rechecked:.4f}, the search recorded {record['score']:.4f}"
                    )
            macs = supernet.macs(subnet)
            entry = summary["exports"][label] = {
                "subnet": subnet.to_dict(),
                "metrics": evaluate(exported, split, data.collator, data.spec),
                "gmacs": macs / 1e9,
                "macs_ratio": macs / supernet.full_macs,
                "params": supernet.params(subnet),
            }
            if section.finetune_epochs > 0:
                polished = polish(exported, teacher, data, recipe, search_rows_read=rows_read,
                                  description=f"polishing {label} (KD from the teacher)")
                entry["polish"] = polished.to_dict()
                entry["polish_wall_s"] = polished.wall_s
                entry["unpolished_metrics"] = entry["metrics"]
                console.print(_polish_line(label, polished), soft_wrap=True)
                if polished.kept_epoch:
                    save_model(polished.model, tokenizer, folder)
                    exported = load_model(str(folder), data.spec).to(device).eval()
                    entry["metrics"] = evaluate(exported, split, data.collator, data.spec)
            timed[label] = TimedModel(exported, macs / supernet.full_macs)
        comparison = LatencyComparison(timed, TEACHER, section.latency_batch_sizes, section.latency_seq_len,
                                       runs=section.latency_runs, device=str(device))
        # Torch first: OpenVINO's worker threads linger after conversion and slow torch down.
        latencies = comparison.measure(["torch"])
        for label, exported in timed.items():
            if label != TEACHER:
                exported.files = _deploy_formats(exported.model, out.dir / label, section, data)
        latencies.merge(comparison.measure(CONVERTED_BACKENDS))
        summary["teacher"]["latency_ms"] = latencies.median_ms[TEACHER]
        for label in [label for label in timed if label != TEACHER]:
            summary["exports"][label]["latency_ms"] = latencies.median_ms[label]
            summary["exports"][label]["latency_spread"] = latencies.spread[label]
            summary["exports"][label]["latency_flags"] = latencies.flags.get(label, [])
            write_json(out.dir / label / "metrics.json", summary["exports"][label])
        summary["teacher"]["latency_flags"] = latencies.flags.get(TEACHER, [])
        write_json(out.dir / artifacts.EXPORT_SUMMARY_FILE, summary)
        out.metrics = summary
    print_summary(summary, data.spec)
    return summary


def _polish_line(label: str, polished: Polished) -> str:
    epochs = ", ".join(f"{score:.4f}" for score in polished.epoch_scores)
    kept = (f"kept epoch {polished.kept_epoch}" if polished.kept_epoch else
            "kept the unpolished weights: the polish lowered their score")
    rows_said = (f"{polished.rows} search rows the search did not read" if polished.start_competes else
                 f"the {polished.rows} search rows the search read (none left unread: only the polish's epochs compete)")
    return f"polish {label} on {rows_said}: {polished.start_score:.4f} before, {epochs} after each epoch; {kept}"


def print_summary(summary: dict, task: Task) -> None:
    """The closing table: teacher vs each export — the task's reported metrics (main one first;
    QA: EM and F1), % of teacher, MACs ratio, speed-ups over the dense teacher in torch (each batch
    size) and in OpenVINO (OV) f32 / INT8 (smallest batch)."""
    from rich import box
    from rich.table import Table

    teacher = summary["teacher"]
    base_score, base_latency = teacher["metrics"]["score"], teacher["latency_ms"]
    batches = sorted(int(key.removeprefix("torch_batch")) for key in base_latency if key.startswith("torch_batch"))
    speedups = [(f"torch b{b}", f"torch_batch{b}", f"torch_batch{b}") for b in batches]
    speedups += [(f"OV b{batches[0]}", f"openvino_batch{batches[0]}", f"torch_batch{batches[0]}"),
                 (f"INT8 b{batches[0]}", f"openvino_int8_batch{batches[0]}", f"torch_batch{batches[0]}")]
    polished = any("unpolished_metrics" in export for export in summary["exports"].values())
    metrics = task.reported_metrics
    table = Table(title=f"eftnas result: {', '.join(metrics)}, MACs and speed-up over the dense teacher in torch",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("model", *(METRIC_TITLES.get(m, m) for m in metrics), *(["unpolished"] if polished else []), "% teacher", "GMACs",
                   *(name for name, _, _ in speedups)):
        table.add_column(column, justify="right", no_wrap=column in ("model", "GMACs"))
    table.add_row("teacher", *(f"{teacher['metrics'][m]:.4f}" for m in metrics), *([""] if polished else []), "100.0%",
                  f"{teacher['gmacs']:.2f}",
                  *("1.00×" if key.startswith("torch") else "" for _, key, _ in speedups))
    flagged = []
    for label, export in summary["exports"].items():
        latency = export["latency_ms"]
        unpolished = export.get("unpolished_metrics")
        table.add_row(
            label, *(f"{export['metrics'][m]:.4f}" for m in metrics),
            *([f"{unpolished['score']:.4f}" if unpolished else "-"] if polished else []),
            percent_of(export["metrics"]["score"], base_score),
            f"{export['gmacs']:.2f} ({export['macs_ratio']:.0%})",
            *(f"{base_latency[reference] / latency[key]:.2f}×" if key in latency else "-" for _, key, reference in speedups),
        )
        flagged += [f"{label}: {flag}" for flag in export.get("latency_flags", [])]
    console.print(table)
    flagged += [f"teacher: {flag}" for flag in teacher.get("latency_flags", [])]
    if flagged:
        console.print("[yellow]timings that stayed inconsistent after a re-measure (a busy machine?):[/yellow] "
                      + "; ".join(flagged), soft_wrap=True)
