"""What the training stages share: Trainer arguments from a recipe section, a rich progress
callback, the task's evaluation (also inside the Trainer: `TaskTrainer`), the distillation loss and
the `DistillationTrainer` (the super-network's `SandwichTrainer` and the KD baselines build on it)."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy

from eftnas_cli import distributed
from eftnas_cli.data import TaskData
from eftnas_cli.errors import RecipeError
from eftnas_cli.models import best_device
from eftnas_cli.recipe import Recipe, SupernetSection, TrainingSection
from eftnas_cli.rundir import as_recorded, sha256, shared_settings
from eftnas_cli.tasks import Task
from eftnas_cli.ui import console, progress

# A save step that never comes: a run whose final weights are the result keeps no checkpoints.
NO_CHECKPOINTS = 10**9


def _cuda_half() -> str:
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def _precision(section: TrainingSection, device: str) -> dict[str, bool]:
    choice = section.mixed_precision
    if choice == "auto":
        if device == "cpu" or not torch.cuda.is_available():
            return {}
        choice = _cuda_half()
    return {} if choice == "no" else {choice: True}


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (AVX512-BF16 or AMX): elsewhere torch emulates bf16,
    slower than fp32. The checks are private to torch, hence the fallback."""
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(check() for check in checks if check is not None)


def inference_precision(choice: str, device: torch.device) -> str:
    """What `mixed_precision: auto` (or an explicit choice) means for forward passes on `device`:
    "bf16", "fp16" or "no"."""
    if choice != "auto":
        return choice
    if device.type == "cuda":
        return _cuda_half()
    return "bf16" if device.type == "cpu" and cpu_computes_bf16() else "no"


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Forward passes in `precision` ("no": as the weights are, fp32)."""
    if precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision])


def per_process_batch(section: TrainingSection) -> int:
    """The rows each process trains on per micro-batch: the recipe's `batch_size` is the global
    batch, split over the processes of a multi-process run, so that one recipe trains the same way
    (steps, learning-rate schedule, rows per optimizer step) on one process or on N."""
    processes = distributed.world_size()
    if section.batch_size % processes:
        name = type(section).__name__.removesuffix("Section").lower()
        raise RecipeError(f"{name}.batch_size {section.batch_size} is the global batch and must divide among "
                          f"the {processes} processes: make it a multiple of {processes}")
    return section.batch_size // processes


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
    on_cpu = best_device(device).type == "cpu"
    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=section.epochs,
        max_steps=section.max_steps or -1,
        learning_rate=section.learning_rate,
        per_device_train_batch_size=per_process_batch(section),
        per_device_eval_batch_size=section.eval_batch_size,
        gradient_accumulation_steps=section.gradient_accumulation_steps,
        weight_decay=section.weight_decay,
        warmup_steps=section.warmup,  # a float below 1 is a fraction of all steps in transformers 5
        lr_scheduler_type=section.lr_scheduler,
        train_sampling_strategy="group_by_length" if section.group_by_length else "random",
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
        # Also without a GPU: accelerate runs a multi-process CPU run (gloo) only when told "cpu".
        use_cpu=on_cpu,
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=not on_cpu,  # page-locked rows copy to the GPU faster
        remove_unused_columns=False,
        **_precision(section, device),
    )


class CheckpointEvery(TrainerCallback, ExportableState):
    """Asks the Trainer for a checkpoint after every `minutes` of training, so that a killed run
    loses at most that much work whatever its length (a fixed step interval suits no run size).
    The main process's clock decides for all ranks: each saves its part of the same checkpoint.

    Each checkpoint's trainer state also records the stage's wall time so far (`elapsed_s`, from
    `started`, a time.perf_counter() value that ResumableCheckpoints moves back by the earlier
    attempts' time), so that a resumed stage reports all its work, not its last attempt's."""

    def __init__(self, minutes: float, started: float | None = None):
        self.seconds = minutes * 60
        self.started = time.perf_counter() if started is None else started
        self.last = time.monotonic()

    def state(self) -> dict:
        return {"args": {"minutes": self.seconds / 60},
                "attributes": {"elapsed_s": round(time.perf_counter() - self.started, 2)}}

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = time.monotonic()
        # A checkpoint written before this callback recorded its state lacks the entry the Trainer updates.
        state.stateful_callbacks.setdefault(type(self).__name__, self.state())

    def on_step_end(self, args, state, control, **kwargs):
        # An epoch's last step gets the epoch's own checkpoint right after: saving it here as well
        # would rewrite a complete checkpoint in place, and a kill during the rewrite would leave a
        # checkpoint whose trainer state reads as complete beside a truncated config or weights.
        epoch_saves_next = args.save_strategy == SaveStrategy.EPOCH and float(state.epoch).is_integer()
        if distributed.broadcast(time.monotonic() - self.last >= self.seconds and not epoch_saves_next):
            control.should_save = True

    def on_save(self, args, state, control, **kwargs):
        self.last = time.monotonic()  # any checkpoint, the epoch's too, restarts the interval


class ResumableCheckpoints:
    """A training stage's Trainer checkpoints, kept in `<run>/checkpoints/<folder>/` rather than in
    the stage's temporary folder so that they outlive a killed process. A fingerprint beside them
    (the recipe's `section`, the shared settings and the hashes of the stage's input files) decides
    whether a new run may continue them: checkpoints of any other run are removed, never resumed.

    `started` dates the stage's work as a time.perf_counter() value: now, moved back by the wall
    time recorded in the checkpoint it continues (`CheckpointEvery`), for the stage's manifest."""

    FINGERPRINT = "fingerprint.json"

    def __init__(self, run_path: Path, folder: str, recipe: Recipe, section: str, inputs: list[Path]):
        self.folder = Path(run_path) / "checkpoints" / folder
        self.recipe, self.section = recipe, section
        # Hashed once: open() compares and then records the fingerprint, and inputs include model weights.
        self.input_hashes = {str(path): sha256(path) for path in inputs}
        self.started = time.perf_counter()

    def fingerprint(self, like: dict | None = None) -> dict:
        """What a checkpoint must have been trained with to be continued; `like` a recorded one, as
        that one would hold it (a recipe key added since, at its default, is left out)."""
        like = like or {}
        return {self.section: as_recorded(getattr(self.recipe, self.section), like.get(self.section)),
                **shared_settings(self.recipe, like), "inputs": self.input_hashes}

    def open(self) -> str | None:
        """The latest checkpoint to continue from (None: start afresh); readies the folder."""
        last = None
        if self.folder.is_dir():
            recorded_file = self.folder / self.FINGERPRINT
            recorded = json.loads(recorded_file.read_text()) if recorded_file.is_file() else None
            if recorded is not None and recorded == self.fingerprint(recorded):
                last = self._last_complete()
                if last is not None:
                    self.started = time.perf_counter() - self._elapsed(last)
            else:
                shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / self.FINGERPRINT).write_text(json.dumps(self.fingerprint(), indent=2, sort_keys=True))
        return last

    def _last_complete(self) -> str | None:
        """The latest checkpoint written to its end; removes any a kill cut short. The Trainer
        writes `trainer_state.json` last, so a checkpoint without a readable one is incomplete."""
        complete = []
        for checkpoint in self.folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
            try:
                json.loads((checkpoint / TRAINER_STATE_NAME).read_text())
                complete.append(checkpoint)
            except (OSError, ValueError):
                shutil.rmtree(checkpoint)
        return str(max(complete, key=lambda c: int(c.name.rpartition("-")[2]))) if complete else None

    @staticmethod
    def _elapsed(checkpoint: str) -> float:
        """The stage's wall time up to `checkpoint` (0 for one saved without `CheckpointEvery`)."""
        callbacks = json.loads((Path(checkpoint) / TRAINER_STATE_NAME).read_text()).get("stateful_callbacks", {})
        return callbacks.get(CheckpointEvery.__name__, {"attributes": {}})["attributes"].get("elapsed_s", 0.0)

    def every(self, minutes: float) -> CheckpointEvery:
        """The callback that saves these checkpoints every `minutes`, on this stage's clock."""
        return CheckpointEvery(minutes, self.started)

    def remove(self) -> None:
        """Once the stage's result is saved, the checkpoints have served."""
        shutil.rmtree(self.folder, ignore_errors=True)
        if self.folder.parent.is_dir() and not any(self.folder.parent.iterdir()):
            self.folder.parent.rmdir()


class QuietTrainer(Trainer):
    """A Trainer that reports through `RichProgress` only (no raw log dicts on the terminal).

    The models' losses are per-batch means: a sequence-classification head takes the Trainer's
    `num_items_in_batch` in its `**kwargs` but does not divide by it. Left to believe it does, the
    Trainer would skip the division by the gradient-accumulation steps and, with N processes,
    multiply every rank's loss by N (doubling the task gradient against movement's L1 pull on 2).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.remove_callback(PrinterCallback)
        self.model_accepts_loss_kwargs = False


class RichProgress(TrainerCallback):
    """Training progress as one rich bar with the latest loss; evaluation results as lines. In a
    multi-process run only the main process shows them."""

    def __init__(self, description: str):
        self.description = description
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.bar = progress()
        self.bar.start()
        self.task = self.bar.add_task(self.description, total=state.max_steps, status="", completed=state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            self.bar.update(self.task, status=f"loss {logs['loss']:.4f}")

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not state.is_world_process_zero:
            return
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
    The teacher sits on the student's device, in eval mode without gradients, and in the training's
    half precision when it has one (`mixed_precision`); its outputs reach the losses in fp32.
    """

    def __init__(self, *args, teacher, distillation_weight: float, temperature: float,
                 hidden_weight: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        half = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None
        self.teacher = teacher.to(self.args.device, half).eval().requires_grad_(False)
        self.distillation_weight, self.temperature = distillation_weight, temperature
        self.hidden_weight = hidden_weight

    @torch.no_grad()
    def teacher_outputs(self, inputs: dict):
        outputs = self.teacher(**inputs, output_hidden_states=self.hidden_weight > 0)
        # A half-precision teacher hands its outputs (class logits, QA start/end logits) over in fp32.
        for name, value in outputs.items():
            if isinstance(value, torch.Tensor):
                outputs[name] = value.float()
            elif name == "hidden_states":
                outputs[name] = tuple(state.float() for state in value)
        return outputs

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


def _kd_trainer(student, teacher, data: TaskData, section: SupernetSection, scratch: Path, *, seed: int, device: str,
                description: str, select_on=None) -> DistillationTrainer:
    """A `DistillationTrainer` of `student` on the train rows, checkpointing into `scratch`; with
    `select_on` rows it scores each epoch on them and ends on the best epoch's weights."""
    student.requires_grad_(True)  # an extract copies the frozen flags of a frozen source
    keep_best = {"main_metric": "score"} if select_on is not None else {"save_steps": NO_CHECKPOINTS}
    return DistillationTrainer(
        model=student,
        args=training_arguments(section, scratch, seed, device=device, **keep_best),
        train_dataset=data.train,
        eval_dataset=select_on,
        data_collator=data.collator,
        callbacks=[RichProgress(description)],
        teacher=teacher,
        spec=data.spec,
        distillation_weight=section.distillation_weight,
        temperature=section.temperature,
        hidden_weight=section.hidden_distillation_weight,
    )


def distill(student, teacher, data: TaskData, section: SupernetSection, *, seed: int, device: str,
            description: str) -> tuple[torch.nn.Module, float]:
    """`student` trained on the task's train rows with KD from `teacher` as `section` says (the
    super-network's settings: epochs, lr, batch, KD weights); returns it in eval mode and the
    training wall time in seconds. No checkpoints: the final weights are the result."""
    with tempfile.TemporaryDirectory(prefix="eftnas-distill-") as scratch:
        trainer = _kd_trainer(student, teacher, data, section, Path(scratch), seed=seed, device=device,
                              description=description)
        started = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - started
    return trainer.model.eval(), wall


@dataclass
class Polished:
    """What `polish` returns: the model it kept and how it chose."""

    model: torch.nn.Module
    wall_s: float
    rows: int  # how many search rows it chose on (`polish_selection_rows`)
    start_score: float  # the student before the polish, on those rows
    epoch_scores: list[float]  # after each epoch, on the same rows
    start_competes: bool = True  # whether the student's own weights may be kept

    @property
    def kept_epoch(self) -> int:
        """The epoch whose weights were kept; 0: the student's own, the polish having lowered its score."""
        best = max(self.epoch_scores, default=float("-inf"))
        return 0 if self.start_competes and self.start_score > best else 1 + self.epoch_scores.index(best)

    def to_dict(self) -> dict:
        return {"rows": self.rows, "start_score": self.start_score, "epoch_scores": self.epoch_scores,
                "start_competes": self.start_competes, "kept_epoch": self.kept_epoch}


def polish_selection_rows(search_rows, read: int, cap: int | None):
    """(rows, start_competes): what the polish chooses on. The search picked the student as the best
    of many subnets on the `read` search rows it read, so the student's score there is a maximum over
    noisy scores, above what it scores on fresh rows, and it would beat a polish that helps. Hence:
    the search rows after those (up to `cap`), where the student competes fairly; without such rows,
    the rows it read, with only the polish's epochs competing."""
    if read < len(search_rows):
        return search_rows.select(range(read, min(len(search_rows), read + (cap or len(search_rows))))), True
    return search_rows, False


def polish(student, teacher, data: TaskData, recipe: Recipe, *, search_rows_read: int, description: str,
           epochs: float | None = None) -> Polished:
    """`distill` for `epochs` (default the recipe's `export.finetune_epochs`), trained as
    `ExportSection.polish_training` says, scoring the student on search rows (held out of training,
    not validation) before it and after each epoch, and keeping the best of those weights:
    `polish_selection_rows` says which rows, given the `search_rows_read` first ones the search read
    and the recipe's `search.max_eval_samples`, and whether the student's own weights compete. A
    short KD fine-tune of a subnet the super-network already trained can lower its score; the polish
    then hands back the student as it came. Ties go to the polished weights."""
    epochs = recipe.export.finetune_epochs if epochs is None else epochs
    section = recipe.export.polish_training(recipe.supernet).model_copy(update={"epochs": epochs, "max_steps": None})
    rows, start_competes = polish_selection_rows(data.search, search_rows_read, recipe.search.max_eval_samples)
    student = student.to(best_device(recipe.device)).eval()
    start_score = evaluate(student, rows, data.collator, data.spec, section.eval_batch_size)["score"]
    start = {name: tensor.detach().clone() for name, tensor in student.state_dict().items()}
    with tempfile.TemporaryDirectory(prefix="eftnas-polish-") as scratch:
        trainer = _kd_trainer(student, teacher, data, section, Path(scratch), seed=recipe.seed, device=recipe.device,
                              description=description, select_on=rows)
        started = time.perf_counter()
        trainer.train()  # ends on the best epoch's weights (load_best_model_at_end)
        wall = time.perf_counter() - started
    result = Polished(trainer.model.eval(), wall, len(rows), start_score,
                      [entry["eval_score"] for entry in trainer.state.log_history if "eval_score" in entry],
                      start_competes)
    if result.kept_epoch == 0:
        result.model.load_state_dict(start)
    return result
