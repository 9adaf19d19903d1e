"""Recipes: one YAML file per run, validated by a typed schema, with dotted command-line overrides.

Every stage reads its own section; `Recipe` is the whole file. Unknown keys, wrong types and
out-of-range values become a `RecipeError` with one line naming the file and the key.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class RecipeError(ValueError):
    """A recipe the user must fix; the message is one readable line."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    name: str = Field("minilm-l6", description="hub id, local Hugging Face folder, or packaged alias")
    teacher: str | None = Field(None, description="fine-tuned teacher folder; skips `finetune` when set")


class TaskSection(Section):
    name: str = "mrpc"
    data_dir: str | None = Field(None, description="folder of GLUE parquet files; null reads the hub")
    max_seq_length: int = Field(128, ge=8, le=4096)
    max_train_samples: int | None = Field(None, ge=1)
    max_eval_samples: int | None = Field(None, ge=1)


class TrainingSection(Section):
    """What every training stage shares; Hugging Face Trainer settings underneath."""

    epochs: float = Field(3.0, gt=0)
    learning_rate: float = Field(2e-5, gt=0, le=1)
    batch_size: int = Field(32, ge=1)
    eval_batch_size: int = Field(64, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    weight_decay: float = Field(0.0, ge=0)
    warmup: float = Field(0.1, ge=0, lt=1, description="fraction of the steps spent warming the lr up")
    max_steps: int | None = Field(None, ge=1, description="caps the steps (tests, smoke runs)")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"


class FinetuneSection(TrainingSection):
    pass


class ImportanceSection(TrainingSection):
    epochs: float = 6.0
    # Movement scores learn from how weights move while fine-tuning; at a converged teacher the
    # first-order signal is mostly noise (measured: worse than random ranks on MRPC).
    start_from: Literal["teacher", "pretrained"] = "pretrained"
    regularization: float = Field(0.02, ge=0, description="L1 factor on sigmoid(scores)")
    warmup_start_epoch: float = Field(1.0, ge=0, description="threshold warm-up starts here")
    warmup_end_epoch: float = Field(3.0, ge=0, description="threshold reaches final_threshold here")
    final_threshold: float = Field(0.1, gt=0, lt=1, description="sigmoid(score) below it masks the unit")
    score_learning_rate: float = Field(1e-2, gt=0)
    init_score: float = Field(3.0, description="initial score; sigmoid(3) = 0.95 keeps all units")

    @model_validator(mode="after")
    def _warmup_order(self) -> "ImportanceSection":
        if self.warmup_end_epoch < self.warmup_start_epoch:
            raise ValueError("warmup_end_epoch must not be before warmup_start_epoch")
        return self


class SpaceSection(Section):
    num_targets: int = Field(5, ge=1, le=64)
    cmin: float = Field(0.3, gt=0, description="smallest target: fraction of cmax if <= 1, else GMACs")
    cmax: float | None = Field(None, gt=0, description="largest target: fraction or GMACs; null = full model")
    tolerance: float = Field(0.02, gt=0, lt=0.5, description="relative MACs tolerance of each target")
    discard_fraction: float = Field(0.02, ge=0, lt=1, description="a layer kept below it is skipped")
    neuron_multiple: int = Field(1, ge=1, description="round FFN widths to a multiple (hardware friendly)")
    seq_len: int = Field(128, ge=1, description="sequence length of the MACs count")


class SupernetSection(TrainingSection):
    epochs: float = 3.0
    start_from: Literal["teacher", "pretrained"] = "teacher"
    num_random_subnets: int = Field(1, ge=0, description="random subnets per step between largest and smallest")
    distillation_weight: float = Field(0.9, ge=0, le=1, description="KD share of the loss; rest is hard labels")
    temperature: float = Field(2.0, gt=0)
    save_steps: int = Field(500, ge=1)


class SearchSection(Section):
    population: int = Field(20, ge=2)
    trials: int = Field(200, ge=1)
    budgets: list[float] = Field(default_factory=lambda: [0.5, 0.35], description="MACs fractions of the full model")
    max_eval_samples: int | None = Field(None, ge=1, description="validation rows per trial; null = all")
    latency: bool = Field(False, description="measure latency on this machine as a third objective")
    latency_batch_size: int = Field(1, ge=1)
    latency_seq_len: int = Field(128, ge=1)
    eval_batch_size: int = Field(64, ge=1)

    @model_validator(mode="after")
    def _budgets_in_range(self) -> "SearchSection":
        bad = [b for b in self.budgets if not 0 < b <= 1]
        if bad:
            raise ValueError(f"budgets are fractions of the full MACs in (0, 1], got {bad}")
        return self


class ExportSection(Section):
    budgets: list[float] = Field(default_factory=lambda: [0.5, 0.35])
    onnx: bool = True
    openvino: bool = True
    int8: bool = True
    calibration_samples: int = Field(300, ge=1)
    max_metric_drop: float = Field(0.005, ge=0, description="allowed gap to the search's record")
    latency_runs: int = Field(20, ge=1)
    latency_batch_sizes: list[int] = Field(default_factory=lambda: [1, 32])
    latency_seq_len: int = Field(128, ge=1)


class Recipe(Section):
    name: str = Field("run", pattern=r"^[A-Za-z0-9_.-]+$")
    output_dir: str = "runs"
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available")
    model: ModelSection = ModelSection()
    task: TaskSection = TaskSection()
    finetune: FinetuneSection = FinetuneSection()
    importance: ImportanceSection = ImportanceSection()
    space: SpaceSection = SpaceSection()
    supernet: SupernetSection = SupernetSection()
    search: SearchSection = SearchSection()
    export: ExportSection = ExportSection()

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def _parse_value(text: str) -> Any:
    """Override values are YAML scalars/lists: `3`, `1e-4`, `null`, `[0.5,0.3]`, `bert-base-uncased`."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _apply_override(data: dict, dotted: str, value: Any, source: str) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"{source}: override '{dotted}': '{part}' is not a section")
        node = child
    node[leaf] = value


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(_known_keys(annotation, f"{prefix}{name}."))
    return keys


def _describe(error: dict, source: str) -> str:
    key = ".".join(str(p) for p in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        close = difflib.get_close_matches(key, _known_keys(Recipe), n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"{source}: unknown key '{key}'{hint}"
    message = error["msg"].removeprefix("Value error, ")
    return f"{source}: {key}: {message} (got {error.get('input')!r})"


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe; every problem is one `RecipeError` line."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise RecipeError(f"{source}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise RecipeError(f"{source}: not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a mapping of sections, got {type(data).__name__}")
    for override in overrides:
        if "=" not in override:
            raise RecipeError(f"override '{override}' is not key=value (e.g. finetune.epochs=1)")
        key, value = override.split("=", 1)
        _apply_override(data, key.strip(), _parse_value(value), source)
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        raise RecipeError(_describe(error.errors()[0], source)) from None


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
