"""Devices and precision: what the CPU can check here, and the CUDA path (tests marked `gpu`,
skipped without a GPU: tests/conftest.py)."""

from __future__ import annotations

import json

import pytest
import torch

from eftnas_cli import distributed
from eftnas_cli.data import load_task_data
from eftnas_cli.errors import RecipeError
from eftnas_cli.models import load_model, load_tokenizer
from eftnas_cli.recipe import SupernetSection, load_recipe
from eftnas_cli.training import DistillationTrainer, inference_precision, per_process_batch, training_arguments


def test_batch_size_is_the_global_batch(monkeypatch):
    section = SupernetSection(batch_size=32)
    assert per_process_batch(section) == 32
    monkeypatch.setattr(distributed, "world_size", lambda: 4)
    assert per_process_batch(section) == 8
    with pytest.raises(RecipeError, match=r"supernet.batch_size 30 .* multiple of 4"):
        per_process_batch(SupernetSection(batch_size=30))


def test_cpu_trains_in_fp32_without_pinned_memory(tmp_path):
    args = training_arguments(SupernetSection(), tmp_path, seed=0, device="cpu")
    assert not (args.bf16 or args.fp16) and not args.dataloader_pin_memory and args.use_cpu


def test_search_precision_auto_is_half_only_where_the_hardware_computes_it(monkeypatch):
    from eftnas_cli import training

    cpu = torch.device("cpu")
    monkeypatch.setattr(training, "cpu_computes_bf16", lambda: True)
    assert inference_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(training, "cpu_computes_bf16", lambda: False)  # emulated bf16 is slower than fp32
    assert inference_precision("auto", cpu) == "no"
    assert inference_precision("bf16", cpu) == "bf16" and inference_precision("no", cpu) == "no"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert inference_precision("auto", torch.device("cuda")) == "fp16"


def test_mixed_precision_no_in_yaml_means_no(tmp_path):
    """YAML reads a bare `no` as false; the recipe takes it for "no", in the search and the training sections."""
    path = tmp_path / "recipe.yaml"
    path.write_text("search:\n  mixed_precision: no\nsupernet:\n  mixed_precision: no\n")
    recipe = load_recipe(path, ["finetune.mixed_precision=no"])
    assert recipe.search.mixed_precision == recipe.supernet.mixed_precision == recipe.finetune.mixed_precision == "no"
    with pytest.raises(RecipeError, match="search.mixed_precision"):
        load_recipe(path, ["search.mixed_precision=yes"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_device_cuda_without_a_gpu_is_a_recipe_error(tmp_path):
    with pytest.raises(RecipeError, match="device: cuda"):
        training_arguments(SupernetSection(), tmp_path, seed=0, device="cuda")


def test_teacher_runs_in_the_training_half_precision_and_hands_fp32_logits(tiny_model_dir, tiny_glue_dir, tmp_path):
    data = load_task_data("mrpc", load_tokenizer(str(tiny_model_dir)), data_dir=tiny_glue_dir, max_seq_length=32)
    section = SupernetSection(mixed_precision="bf16")  # bf16 autocast runs on CPU too
    trainer = DistillationTrainer(
        model=load_model(str(tiny_model_dir), data.spec),
        args=training_arguments(section, tmp_path, seed=0, device="cpu"),
        train_dataset=data.train, data_collator=data.collator,
        teacher=load_model(str(tiny_model_dir), data.spec), spec=data.spec,
        distillation_weight=0.9, temperature=2.0, hidden_weight=1.0,
    )
    teacher = trainer.teacher
    assert not teacher.training and all(p.dtype == torch.bfloat16 and not p.requires_grad for p in teacher.parameters())
    batch = data.collator([data.train[i] for i in range(4)])
    batch.pop("labels")
    outputs = trainer.teacher_outputs(dict(batch))
    assert outputs.logits.dtype == torch.float32
    assert all(state.dtype == torch.float32 for state in outputs.hidden_states)


def test_commands_that_do_not_train_refuse_a_launcher(write_recipe, monkeypatch):
    from typer.testing import CliRunner

    from eftnas_cli.cli import app

    monkeypatch.setenv("WORLD_SIZE", "2")
    result = CliRunner().invoke(app, ["search", str(write_recipe())])
    assert result.exit_code == 2
    assert "`search` runs in one process" in " ".join(result.output.split())


# ---- the CUDA path ---------------------------------------------------------------------------------
@pytest.mark.gpu
def test_supernet_trains_in_bf16_and_search_and_export_run_on_cuda(write_recipe, monkeypatch):
    from eftnas_cli.stages.export import export
    from eftnas_cli.stages.finetune import finetune
    from eftnas_cli.stages.gen_space import generate_space
    from eftnas_cli.stages.importance import compute_importance
    from eftnas_cli.stages.search import search
    from eftnas_cli.stages.train_supernet import SandwichTrainer, train_supernet
    from eftnas_cli.supernet import Supernet

    recipe = load_recipe(write_recipe(), ["device=cuda", "supernet.mixed_precision=bf16", "supernet.max_steps=2",
                                          "export.openvino=false", "export.int8=false"])
    finetune(recipe)
    compute_importance(recipe)
    generate_space(recipe)

    seen = {}
    original_step = SandwichTrainer.training_step

    def record_linear(module, args, output):
        seen["autocast"] = torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16
        seen["linear_output"] = output.dtype

    def record_step(self, model, inputs, *args, **kwargs):
        seen.update(student=next(model.parameters()).device.type, teacher=next(self.teacher.parameters()),
                    inputs=inputs["input_ids"].device.type, bf16=self.args.bf16,
                    pinned=self.args.dataloader_pin_memory)
        if "hooked" not in seen:
            # Accelerate puts autocast around the prepared model's forward (the Trainer's own
            # compute_loss_context_manager is empty in transformers 5): look inside the student's forward.
            seen["hooked"] = next(m for m in model.modules() if isinstance(m, torch.nn.Linear)).register_forward_hook(
                record_linear)
        return original_step(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(SandwichTrainer, "training_step", record_step)
    metrics = train_supernet(recipe)
    seen.pop("hooked").remove()
    assert seen["student"] == "cuda" and seen["inputs"] == "cuda" and seen["bf16"] and seen["autocast"]
    assert seen["linear_output"] == torch.bfloat16
    assert seen["teacher"].device.type == "cuda" and seen["teacher"].dtype == torch.bfloat16 and seen["pinned"]
    assert all(0 <= result["score"] <= 1 for result in metrics["final"].values())

    evaluated_on = set()
    original_evaluate = Supernet.evaluate

    def record_evaluate(self, *args, **kwargs):
        evaluated_on.add(next(self.model.parameters()).device.type)
        return original_evaluate(self, *args, **kwargs)

    monkeypatch.setattr(Supernet, "evaluate", record_evaluate)
    search(recipe)
    assert evaluated_on == {"cuda"}
    pareto = json.loads((recipe.run_dir / "search" / "pareto.json").read_text())
    assert pareto["front"]

    # Export evaluates on the GPU; its ONNX file comes from a CPU fp32 copy.
    summary = export(recipe)
    label, = summary["exports"]
    assert (recipe.run_dir / "export" / label / "model.onnx").is_file()
