"""Real speed-ups, side by side: the dense teacher and eftnas's exported subnets in every backend.

Takes a finished run (`eftnas run configs/quickstart.yaml`, i.e. `make quickstart`) and measures
the median latency after warm-up (`eftnas_cli.latency`) of the dense teacher (finetune/model) and
of each budget's export (export/budget-<b>/; exported from the super-network first when missing)
in torch fp32, ONNX Runtime, OpenVINO f32, OpenVINO at the CPU's default precision (bf16 where
the CPU has it) and OpenVINO INT8, at each batch size. Every latency gets its speed-up over the
dense teacher in torch fp32 measured in the same run. Then one training step (forward, backward,
optimizer step) of the super-network's smallest and largest subnet. Prints the table and the
targets, and writes them with the command, date, machine and versions to --out (raw numbers in the
JSON beside it).

    python scripts/bench_speed.py [--run runs/quickstart] [--budgets 0.5 0.35] [--batch-sizes 1 32]
        [--seq-len 128] [--runs 30] [--device cpu|cuda] [--torch-only] [--out docs/benchmarks_speed.md] [--smoke]

`--device cuda` runs the torch models (and the training steps) on the GPU; ONNX Runtime and
OpenVINO always run on the CPU (`--torch-only` leaves them out). Torch keeps its default thread
count. `--smoke` runs the tiny pipeline in a temporary folder and benches it with 2 runs, in well
under a minute.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import _bench_common as common
import numpy as np
import torch

from eftnas_cli import artifacts, elastic
from eftnas_cli.data import recipe_task_data
from eftnas_cli.deploy import (
    calibration_batches,
    export_onnx,
    model_input_names,
    openvino_compiled,
    quantize_int8,
    to_openvino,
)
from eftnas_cli.latency import LatencyComparison, TimedModel, dummy_features, latency_key
from eftnas_cli.models import load_model, load_tokenizer
from eftnas_cli.recipe import Recipe, load_recipe
from eftnas_cli.rundir import RunDir, sha256, write_json
from eftnas_cli.stages.export import export
from eftnas_cli.supernet import Supernet
from eftnas_cli.tasks import get_task
from eftnas_cli.ui import console

DEFAULT_RUN = Path("runs/quickstart")
DEFAULT_OUT = Path("docs/benchmarks_speed.md")
BY = "bench_speed.py"  # how upstream-stage errors name the requester
CACHE_FOLDER = "bench-speed-cache"  # inside the run: deploy files of models the run did not export
TRAIN_BATCH_SIZE = 32
TRAIN_WARMUP_STEPS = 2
# The tiny smoke model has 64 positions; its recipe measures latency at 16 tokens.
SMOKE_SEQ_LEN, SMOKE_RUNS = 16, 2

# Targets of the issue.
TORCH_SPEEDUP_TARGET, TORCH_TARGET_BUDGET = 1.9, 0.5
OPENVINO_SPEEDUP_TARGET = 7.0
TRAIN_STEP_RATIO_TARGET = 0.5


# Backend name (eftnas_cli.latency) -> how the report names it.
BACKEND_NAMES = {
    "torch": "torch fp32",
    "onnxruntime": "ONNX Runtime fp32",
    "openvino": "OpenVINO f32",
    "openvino_default": "OpenVINO default",
    "openvino_int8": "OpenVINO INT8",
}


# ---- the run ---------------------------------------------------------------------------------------
def load_run_recipe(run_dir: Path) -> Recipe:
    """The run's own recipe, pointed at wherever the run folder is now."""
    return load_recipe(run_dir / "recipe.yaml", [f"output_dir={run_dir.parent}", f"name={run_dir.name}"])


def exported_budgets(run: RunDir) -> set[float]:
    folder = run.stage_dir("export")
    budgets = {artifacts.export_budget(path.name) for path in folder.iterdir()} if folder.is_dir() else set()
    return {b for b in budgets if b is not None and (folder / artifacts.export_label(b) / "model.safetensors").is_file()}


def ensure_exports(recipe: Recipe, budgets: list[float]) -> dict[float, Path]:
    """Each budget's export folder; budgets the run has not exported are exported now (earlier
    exports stay beside them)."""
    run = RunDir(recipe)
    missing = [budget for budget in budgets if budget not in exported_budgets(run)]
    if missing:
        console.rule(f"[bold]export[/bold] of budget(s) {', '.join(f'{b:g}' for b in missing)} (missing in the run)")
        export(recipe, budgets=missing)
    return {budget: run.stage_dir("export") / artifacts.export_label(budget) for budget in budgets}


def macs_ratio(config, seq_len: int) -> float:
    """Encoder MACs of a model over its dense parent's: 1 for a dense model."""
    return elastic.macs(config, elastic.exported_subnet(config), seq_len).encoder / elastic.macs(config, None, seq_len).encoder


# ---- deploy formats --------------------------------------------------------------------------------
class Calibration:
    """INT8 calibration batches, built on first use: train rows of the run's task, as `export`
    calibrates, or dummy token ids when the task's data cannot be read here."""

    def __init__(self, recipe: Recipe, input_names: list[str], vocab_size: int):
        self.recipe, self.input_names, self.vocab_size = recipe, input_names, vocab_size
        self._batches = None

    def batches(self) -> list[dict[str, np.ndarray]]:
        if self._batches is None:
            samples = self.recipe.export.calibration_samples
            try:
                data = recipe_task_data(self.recipe, load_tokenizer(self.recipe.model.name))
                self._batches = calibration_batches(data.calibration, data.collator, self.input_names, samples)
            except FileNotFoundError as error:
                console.print(f"INT8 calibration on dummy token ids: {error}")
                self._batches = [dummy_features(self.input_names, 8, 64, self.vocab_size, seed=seed)
                                 for seed in range(max(1, samples // 8))]
        return self._batches


def deploy_files(model, folder: Path, cache_root: Path, calibration: Calibration) -> dict[str, Path]:
    """Backend → ONNX, OpenVINO and INT8 file of `model`: those `eftnas export` wrote beside its
    weights, or converted (once) into a cache folder named after the weights' hash."""
    cache = cache_root / f"{folder.name}-{sha256(folder / 'model.safetensors')[:12]}"

    def existing_or_cached(relative: str) -> Path:
        return folder / relative if (folder / relative).is_file() else cache / relative

    files = {"onnxruntime": existing_or_cached("model.onnx"), "openvino": existing_or_cached("openvino/model.xml"),
             "openvino_int8": existing_or_cached("openvino/model_int8.xml")}
    if not files["onnxruntime"].is_file():
        console.print(f"converting {folder} to ONNX")
        export_onnx(model, files["onnxruntime"])
    if not files["openvino"].is_file():
        to_openvino(files["onnxruntime"], files["openvino"])
    if not files["openvino_int8"].is_file():
        console.print(f"quantizing {folder} to INT8")
        quantize_int8(files["openvino"], calibration.batches(), files["openvino_int8"])
    return files


def openvino_default_precision(xml: Path) -> str:
    """The precision OpenVINO picks on this CPU when not forced to f32 (bf16 where supported)."""
    import openvino as ov

    return openvino_compiled(xml, "default").get_property(ov.properties.hint.inference_precision()).get_type_name()


# ---- measurements ----------------------------------------------------------------------------------
def training_step_ms(model, subnet: elastic.Subnet, batch: dict[str, torch.Tensor], steps: int) -> float:
    """Median wall time of forward + backward + AdamW step of `subnet` on one fixed batch.

    The optimizer updates every parameter, as in super-network training: the slices' gradients
    are full-size tensors.
    """
    elastic.activate(model, subnet)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    on_cuda = batch["input_ids"].device.type == "cuda"
    times_ms = []
    for step in range(TRAIN_WARMUP_STEPS + steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        optimizer.step()
        if on_cuda:
            torch.cuda.synchronize()  # kernels run asynchronously: wait before reading the clock
        if step >= TRAIN_WARMUP_STEPS:
            times_ms.append((time.perf_counter() - start) * 1000)
    return statistics.median(times_ms)


def training_steps(run: RunDir, spec, args: argparse.Namespace) -> dict:
    supernet = Supernet.load(run, spec, by=BY).to(args.device)
    model, space = supernet.model, supernet.space
    features = dummy_features(model_input_names(model), TRAIN_BATCH_SIZE, args.seq_len, model.config.vocab_size)
    batch = {name: torch.from_numpy(array).to(args.device) for name, array in features.items()}
    label_dtype = torch.float32 if spec.is_regression else torch.long
    for name in spec.kind.label_names:  # labels; QA: start and end positions
        batch[name] = torch.zeros(TRAIN_BATCH_SIZE, dtype=label_dtype, device=args.device)
    results = {}
    for name, subnet in (("largest", space.largest()), ("smallest", space.smallest())):
        console.print(f"training step of the {name} subnet: {args.train_steps} steps")
        results[name] = {
            "ms": training_step_ms(model, subnet, batch, args.train_steps),
            "macs_ratio": elastic.macs(model.config, subnet, args.seq_len).encoder
            / elastic.macs(model.config, None, args.seq_len).encoder,
            "subnet": subnet.to_dict(),
        }
    return results


# ---- report ----------------------------------------------------------------------------------------
def reference_latency(results: dict, backend: str, batch_size: int) -> float:
    """Torch fp32 latency of the dense teacher: the 1.00x of every speed-up."""
    return results["models"][0]["latency_ms"][latency_key("torch", batch_size)]


def latency_table(results: dict) -> str:
    batch_sizes = results["batch_sizes"]
    headers = ["model", "MACs ratio", "backend"]
    for batch_size in batch_sizes:
        headers += [f"b{batch_size} ms", f"b{batch_size} speed-up"]
    rows = []
    for model in results["models"]:
        for backend, name in results["backends"].items():
            if latency_key(backend, batch_sizes[0]) not in model["latency_ms"]:
                continue
            row = [model["label"], f"{model['macs_ratio']:.3f}", name]
            for batch_size in batch_sizes:
                key = latency_key(backend, batch_size)
                latency = model["latency_ms"][key]
                row += [f"{latency:.2f}", f"{reference_latency(results, backend, batch_size) / latency:.2f}x"]
            rows.append(row)
    return common.markdown_table(headers, rows, align="lrl" + "r" * 2 * len(batch_sizes))


def max_spread(results: dict) -> float:
    return max(spread for model in results["models"] for spread in model["latency_spread"].values())


def training_table(results: dict) -> str:
    steps = results["training_step"]
    rows = [[name, f"{step['macs_ratio']:.3f}", f"{step['ms']:.1f}", f"{step['ms'] / steps['largest']['ms']:.2f}"]
            for name, step in steps.items()]
    return common.markdown_table(["super-network subnet", "MACs ratio", "step ms (median)", "vs largest"], rows)


def target_checks(results: dict) -> list[common.TargetCheck]:
    checks = []
    subnets = results["models"][1:]
    torch_targeted = [m for m in subnets if m["budget"] <= TORCH_TARGET_BUDGET]
    for batch_size in results["batch_sizes"]:
        reference = reference_latency(results, "torch", batch_size)
        for model in torch_targeted:
            speedup = reference / model["latency_ms"][latency_key("torch", batch_size)]
            checks.append(common.TargetCheck(
                f"{model['label']}, batch {batch_size}", f"torch >= {TORCH_SPEEDUP_TARGET:g}x faster than dense",
                f"{speedup:.2f}x", speedup >= TORCH_SPEEDUP_TARGET))
        for model in subnets if any(b.startswith("openvino") for b in results["backends"]) else []:
            openvino = {results["backends"][b]: model["latency_ms"][latency_key(b, batch_size)]
                        for b in results["backends"] if b.startswith("openvino")}
            fastest = min(openvino, key=openvino.get)
            speedup = reference / openvino[fastest]
            checks.append(common.TargetCheck(
                f"{model['label']}, batch {batch_size}",
                f"OpenVINO >= {OPENVINO_SPEEDUP_TARGET:g}x faster than dense torch fp32",
                f"{speedup:.2f}x ({fastest})", speedup >= OPENVINO_SPEEDUP_TARGET))
    if not torch_targeted:
        checks.append(common.TargetCheck(f"budget <= {TORCH_TARGET_BUDGET:g}",
                                         f"torch >= {TORCH_SPEEDUP_TARGET:g}x faster than dense",
                                         "no such budget benched", None))
    steps = results["training_step"]
    ratio = steps["smallest"]["ms"] / steps["largest"]["ms"]
    checks.append(common.TargetCheck("super-network training step", f"smallest <= {TRAIN_STEP_RATIO_TARGET:g}x largest",
                                     f"{ratio:.2f}x", ratio <= TRAIN_STEP_RATIO_TARGET))
    return checks


def render_report(results: dict) -> str:
    lines = [
        "# Real speed-ups, side by side",
        "",
        *common.provenance_lines(results["provenance"]),
        "",
        f"Median latency of at least {results['runs']} timed inferences after {results['warmup']} warm-up ones, "
        f"sequence length {results['seq_len']}, random token ids, no padding; the models of one backend and batch "
        "size are timed interleaved, one inference each in turn, in rounds until every median is stable (5%). "
        f"The widest spread (p90 / median - 1) of any figure: {max_spread(results):.0%}. "
        "Speed-up = latency of the dense teacher in torch fp32 at the same batch size / this latency. "
        "Threads: every backend at its default.",
        "",
        latency_table(results),
        "",
        *(["Figures that stayed inconsistent after a re-measure: " + "; ".join(
            f"{model['label']}: {flag}" for model in results["models"] for flag in model["latency_flags"]), ""]
          if any(model["latency_flags"] for model in results["models"]) else []),
        f"Super-network training step (forward + backward + AdamW step), batch {TRAIN_BATCH_SIZE}, sequence length "
        f"{results['seq_len']}, median of {results['train_steps']} steps after {TRAIN_WARMUP_STEPS} warm-up ones:",
        "",
        training_table(results),
        "",
        "Targets:",
        "",
        common.targets_table([common.TargetCheck(**check) for check in results["targets"]]),
    ]
    return "\n".join(lines) + "\n"


# ---- command line --------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--run", type=Path, default=DEFAULT_RUN, help="a finished run directory")
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.35])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--seq-len", type=int, default=None, help="default 128 (16 with --smoke)")
    parser.add_argument("--runs", type=int, default=None, help="timed inferences per latency (default 30, 2 with --smoke)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed inferences before each latency")
    parser.add_argument("--train-steps", type=int, default=None, help="timed training steps (default 10, 2 with --smoke)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the torch models run")
    parser.add_argument("--torch-only", action="store_true",
                        help="torch alone: no ONNX Runtime or OpenVINO files or figures (a GPU machine, say)")
    parser.add_argument("--out", type=Path, default=None, help=f"markdown report (default {DEFAULT_OUT})")
    parser.add_argument("--smoke", action="store_true", help="bench the tiny pipeline, run in a temporary folder")
    args = parser.parse_args(argv)
    args.seq_len = args.seq_len or (SMOKE_SEQ_LEN if args.smoke else 128)
    args.runs = args.runs or (SMOKE_RUNS if args.smoke else 30)
    args.train_steps = args.train_steps or (SMOKE_RUNS if args.smoke else 10)
    return args


def prepare_smoke_run(scratch: Path) -> tuple[Path, list[float]]:
    """The tiny pipeline, run without exports, so that the bench exports its budget itself."""
    from eftnas_cli.stages.pipeline import run_pipeline
    from eftnas_cli.testing import TINY_RECIPE

    run_pipeline(load_recipe(common.write_smoke_recipe(scratch, {"export.budgets": []})))
    return scratch / "runs" / TINY_RECIPE["name"], TINY_RECIPE["search"]["budgets"]


def bench(args: argparse.Namespace) -> dict:
    recipe = load_run_recipe(args.run)
    run = RunDir(recipe)
    spec = get_task(recipe.task.name)
    # (label, folder, budget): the dense teacher first, the reference of every speed-up.
    models = [("dense (teacher)", Path(artifacts.teacher_folder(recipe, run, by=BY)), None)]
    models += [(f"budget {budget:g}", folder, budget) for budget, folder in ensure_exports(recipe, args.budgets).items()]

    loaded = {label: (folder, budget, load_model(str(folder), spec).eval()) for label, folder, budget in models}
    timed = {label: TimedModel(model, macs_ratio(model.config, args.seq_len)) for label, (_, _, model) in loaded.items()}
    comparison = LatencyComparison(timed, models[0][0], args.batch_sizes, args.seq_len, runs=args.runs,
                                   warmup=args.warmup, device=args.device)
    # Torch first, for every model, before any OpenVINO work: OpenVINO's worker threads linger
    # after it runs (quantization included) and slow a torch measurement taken right after.
    console.print(f"torch latency of {len(timed)} models, interleaved: {len(args.batch_sizes)} batch size(s)")
    report = comparison.measure(["torch"])
    backends = {"torch": f"torch fp32 ({args.device})"}
    if not args.torch_only:
        teacher_model = loaded[models[0][0]][2]
        calibration = Calibration(recipe, model_input_names(teacher_model), teacher_model.config.vocab_size)
        for label, (folder, _, model) in loaded.items():
            timed[label].files = deploy_files(model, folder, run.path / CACHE_FOLDER, calibration)
        console.print(f"ONNX Runtime and OpenVINO latency: {len(args.batch_sizes)} batch size(s) x 4 backends")
        report.merge(comparison.measure([b for b in BACKEND_NAMES if b != "torch"]))
        default_precision = openvino_default_precision(timed[models[0][0]].files["openvino"])
        backends = {**BACKEND_NAMES, "openvino_default": f"OpenVINO default ({default_precision})", **backends}
    measured = [{"label": label, "folder": str(folder), "budget": budget, "macs_ratio": timed[label].macs_ratio,
                 "latency_ms": report.median_ms[label], "latency_spread": report.spread[label],
                 "latency_flags": report.flags.get(label, [])}
                for label, (folder, budget, _) in loaded.items()]

    results = {
        "provenance": common.provenance(args.device, {
            "threads": f"torch {torch.get_num_threads()} (default), ONNX Runtime and OpenVINO (LATENCY hint) default",
            "run": str(args.run),
        }),
        "seq_len": args.seq_len, "runs": args.runs, "warmup": args.warmup, "train_steps": args.train_steps,
        "batch_sizes": args.batch_sizes,
        "backends": backends,
        "models": measured,
        "training_step": training_steps(run, spec, args),
    }
    results["targets"] = [check.as_dict() for check in target_checks(results)]
    return results


def run(args: argparse.Namespace, scratch: Path | None) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        console.print("[red]error:[/red] --device cuda, but torch sees no GPU", soft_wrap=True)
        return 2
    if scratch is not None:
        args.run, args.budgets = prepare_smoke_run(scratch)
        args.out = args.out or scratch / "benchmarks_speed.md"
    elif not (args.run / "manifest.json").is_file():
        console.print(f"[red]error:[/red] no finished run at {args.run}: run `make quickstart` first", soft_wrap=True)
        return 2
    out = args.out or DEFAULT_OUT
    results = bench(args)
    report = render_report(results)
    common.write_report(out, report)
    write_json(out.with_suffix(".json"), results)
    print(report)
    print(f"written: {out} and {out.with_suffix('.json')}")
    common.print_target_summary(results["targets"])
    return 0


def main(argv: list[str] | None = None) -> int:
    return common.main_with_smoke(parse_args(argv), run, "eftnas-bench-speed-smoke-")


if __name__ == "__main__":
    sys.exit(main())
