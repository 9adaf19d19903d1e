"""What the training stages share: Trainer arguments from a recipe section, a rich progress
callback, the task's evaluation (also inside the Trainer: `TaskTrainer`), the distillation loss and
the `DistillationTrainer` (the super-network's `SandwichTrainer` and the KD baselines build on it)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from eftnas_cli.data import TaskData
from eftnas_cli.recipe import SupernetSection, TrainingSection
from eftnas_cli.tasks import Task
from eftnas_cli.ui import console, progress

# A save step that never comes: a run whose final weights are the result keeps no checkpoints.
NO_CHECKPOINTS = 10**9


def _precision(section: TrainingSection, device: str) -> dict[str, bool]:
    choice = section.mixed_precision
    if choice == "auto":
        if device == "cpu" or not torch.cuda.is_available():
            return {}
        choice = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return {} if choice == "no" else {choice: True}


def training_arguments(
    section: TrainingSection,
    output_dir: Path,
    seed: int,
    *,
    device: str = "auto",
    main_metric: str | None = None,
    save_steps: int | None = None,
) -> TrainingArguments:
    """Trainer settings from a recipe section.

    With `main_metric`, evaluate and checkpoint each epoch and keep the best model; with
    `save_steps`, checkpoint every N steps (resumable) and evaluate through callbacks instead.
    """
    keep_best = main_metric is not None
    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=section.epochs,
        max_steps=section.max_steps or -1,
        learning_rate=section.learning_rate,
        per_device_train_batch_size=section.batch_size,
        per_device_eval_batch_size=section.eval_batch_size,
        gradient_accumulation_steps=section.gradient_accumulation_steps,
        weight_decay=section.weight_decay,
        warmup_steps=section.warmup,  # a float below 1 is a fraction of all steps in transformers 5
        lr_scheduler_type=section.lr_scheduler,
        eval_strategy="epoch" if keep_best else "no",
        save_strategy="epoch" if keep_best else "steps",
        save_steps=save_steps or NO_CHECKPOINTS,
        save_total_limit=1 if keep_best else 2,
        load_best_model_at_end=keep_best,
        metric_for_best_model=main_metric,
        greater_is_better=True if keep_best else None,
        logging_strategy="steps",
        logging_steps=10,
        seed=seed,
        report_to="none",
        use_cpu=device == "cpu",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False,
        **_precision(section, device),
    )


class CheckpointEvery(TrainerCallback):
    """Asks the Trainer for a checkpoint after every `minutes` of training, so that a killed run
    loses at most that much work whatever its length (a fixed step interval suits no run size)."""

    def __init__(self, minutes: float):
        self.seconds = minutes * 60
        self.last = time.monotonic()

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if time.monotonic() - self.last >= self.seconds:
            control.should_save = True
            self.last = time.monotonic()


class QuietTrainer(Trainer):
    """A Trainer that reports through `RichProgress` only (no raw log dicts on the terminal)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.remove_callback(PrinterCallback)


class RichProgress(TrainerCallback):
    """Training progress as one rich bar with the latest loss; evaluation results as lines."""

    def __init__(self, description: str):
        self.description = description
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = progress()
        self.bar.start()
        self.task = self.bar.add_task(self.description, total=state.max_steps, status="", completed=state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            self.bar.update(self.task, status=f"loss {logs['loss']:.4f}")

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        shown = ", ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in (metrics or {}).items()
                          if isinstance(v, float) and not k.endswith(("runtime", "per_second")))
        console.print(f"  epoch {state.epoch:.2f}: {shown}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.stop()


def evaluate(model, dataset, collator, spec: Task, batch_size: int = 64) -> dict[str, float]:
    """The task's metrics of `model` on `dataset` (its kind's evaluation: for QA the best span
    over each example's windows), with the main metric also as `score`."""
    return spec.kind.evaluate(model, dataset, collator, spec, batch_size)


def pop_labels(inputs: dict, spec: Task) -> dict[str, torch.Tensor]:
    """Takes the task kind's labels out of a batch (`labels`; QA: start and end positions)."""
    return {name: inputs.pop(name) for name in spec.kind.label_names}


def distillation_loss(student_outputs, teacher_outputs, labels: dict, spec: Task, weight: float, temperature: float):
    """The task kind's KD loss (class logits: KL at `temperature`; regression: MSE on the score;
    QA: KL on start and end logits) mixed with the hard-label loss, KD's share being `weight`."""
    return spec.kind.distillation_loss(student_outputs, teacher_outputs, labels, weight, temperature)


class TaskTrainer(QuietTrainer):
    """A QuietTrainer whose evaluation is the task's own (`evaluate`): the same numbers the stages
    report, for every task kind (QA needs its examples, not only the model's windows)."""

    def __init__(self, *args, spec: Task, **kwargs):
        super().__init__(*args, **kwargs)
        self.spec = spec

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        rows = self.eval_dataset if eval_dataset is None else eval_dataset
        metrics = evaluate(self.model, rows, self.data_collator, self.spec, self.args.per_device_eval_batch_size)
        metrics = {f"{metric_key_prefix}_{name}": value for name, value in metrics.items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def hidden_state_loss(student_states, teacher_states, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over layers of the MSE between the student's and the teacher's hidden states after each
    layer, over real (unpadded) tokens. Width-only subnets keep the hidden size: no projection."""
    mask = attention_mask.unsqueeze(-1).to(student_states[-1].dtype)
    per_element = mask.sum() * student_states[-1].shape[-1]
    layers = list(zip(student_states[1:], teacher_states[1:]))  # [0] is the embeddings' output
    return sum(((student - teacher) ** 2 * mask).sum() / per_element for student, teacher in layers) / len(layers)


class DistillationTrainer(TaskTrainer):
    """Trains a student on KD from a frozen teacher mixed with the hard labels (`distillation_loss`),
    plus, with `hidden_weight` > 0, the MSE of the hidden states after each layer.

    `distillation_weight` is KD's share of the logits loss and `temperature` softens both distributions.
    """

    # The loss is a per-batch mean, not normalized by `num_items_in_batch`: let the Trainer divide
    # it by the gradient-accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, *args, teacher, distillation_weight: float, temperature: float,
                 hidden_weight: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.to(self.args.device).eval().requires_grad_(False)
        self.distillation_weight, self.temperature = distillation_weight, temperature
        self.hidden_weight = hidden_weight

    @torch.no_grad()
    def teacher_outputs(self, inputs: dict):
        return self.teacher(**inputs, output_hidden_states=self.hidden_weight > 0)

    def student_loss(self, model, inputs: dict, labels: dict[str, torch.Tensor], teacher_outputs):
        """(loss, outputs) of the student on `inputs` (labels already popped)."""
        outputs = model(**inputs, output_hidden_states=self.hidden_weight > 0)
        loss = distillation_loss(outputs, teacher_outputs, labels, self.spec, self.distillation_weight, self.temperature)
        if self.hidden_weight > 0:
            loss = loss + self.hidden_weight * hidden_state_loss(
                outputs.hidden_states, teacher_outputs.hidden_states, inputs["attention_mask"])
        return loss, outputs

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = pop_labels(inputs, self.spec)
        loss, outputs = self.student_loss(model, inputs, labels, self.teacher_outputs(inputs))
        return (loss, outputs) if return_outputs else loss


def distill(student, teacher, data: TaskData, section: SupernetSection, *, seed: int, device: str,
            description: str) -> tuple[torch.nn.Module, float]:
    """`student` trained on the task's train rows with KD from `teacher` as `section` says (the
    super-network's settings: epochs, lr, batch, KD weights); returns it in eval mode and the
    training wall time in seconds. No checkpoints: the final weights are the result."""
    student.requires_grad_(True)  # an extract copies the frozen flags of a frozen source
    with tempfile.TemporaryDirectory(prefix="eftnas-distill-") as scratch:
        trainer = DistillationTrainer(
            model=student,
            args=training_arguments(section, Path(scratch), seed, device=device, save_steps=NO_CHECKPOINTS),
            train_dataset=data.train,
            data_collator=data.collator,
            callbacks=[RichProgress(description)],
            teacher=teacher,
            spec=data.spec,
            distillation_weight=section.distillation_weight,
            temperature=section.temperature,
            hidden_weight=section.hidden_distillation_weight,
        )
        started = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - started
    return trainer.model.eval(), wall
