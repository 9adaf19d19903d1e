"""Recipes: one YAML file per run, validated by a typed schema, with dotted command-line overrides.

Every stage reads its own section; `Recipe` is the whole file. Unknown keys, wrong types (a boolean
where a number belongs included), non-finite numbers and out-of-range values become a `RecipeError`
with one line naming the file and the key. Loading is bounded: a recipe is at most
`MAX_RECIPE_BYTES`, YAML anchors and aliases are refused (an alias bomb expands a small file into
gigabytes), and an error quotes at most a short excerpt of the offending value.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from eftnas_cli.errors import RecipeError, UnknownTaskError

__all__ = ["Recipe", "RecipeError", "dump_recipe", "load_recipe"]


# Real recipes are a few kB; the cap keeps a wrong file (a dataset, a binary) from being parsed.
MAX_RECIPE_BYTES = 1_000_000
# Longest excerpt of an offending value an error message quotes.
MAX_EXCERPT_CHARS = 80


def _excerpt(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= MAX_EXCERPT_CHARS else text[: MAX_EXCERPT_CHARS - 3] + "..."


def _expects_number(annotation: Any) -> bool:
    """An int or float field, also inside `| None` or `list[...]` (bool is not int here)."""
    return annotation in (int, float) or any(_expects_number(arg) for arg in get_args(annotation))


class Section(BaseModel):
    # Non-finite floats are refused: `epochs: .inf` would train forever, NaN compares false to every bound.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic takes True for 1: `epochs: true` would silently train one epoch.
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, bool) for v in values) and _expects_number(cls.model_fields[info.field_name].annotation):
            raise ValueError("a number is expected, not a boolean")
        return value


class ModelSection(Section):
    name: str = Field("minilm-l6", description="hub id, local Hugging Face folder, or packaged alias")
    teacher: str | None = Field(None, description="fine-tuned teacher folder; skips `finetune` when set")


class TaskSection(Section):
    name: str = Field("mrpc", description="a GLUE task name, squad or squad_v2 (eftnas_cli.tasks.TASKS)")
    data_dir: str | None = Field(None, description="folder of <task>/<split>.parquet files with the hub's columns; "
                                                   "null reads the hub")
    max_seq_length: int = Field(128, ge=8, le=4096)
    # Question answering only: a longer context becomes windows overlapping by doc_stride tokens.
    doc_stride: int = Field(128, ge=1, description="QA: tokens shared by successive windows of a long context")
    max_answer_length: int = Field(30, ge=1, description="QA: longest answer span, in tokens")
    n_best: int = Field(20, ge=1, description="QA: start and end candidates per window")
    max_train_samples: int | None = Field(None, ge=1)
    max_eval_samples: int | None = Field(None, ge=1)
    # In `task`, not `search`: every stage's training data depends on it.
    search_fraction: float = Field(0.1, ge=0, lt=1, description=(
        "share of the train split held out as search rows: no stage trains on them, search scores "
        "subnets on them, the validation split is read once per final model; 0 = search on validation"))
    search_split: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$", description=(
        "a split of the task's data whose rows are the search rows instead of task.search_fraction's "
        "(e.g. a dev set shaped like the deployment data): <data_dir>/<task>/<split>.parquet, or the hub "
        "dataset's split; search_fraction is then not used and every train row is trained on. Neither "
        "train nor an eval split"))

    @field_validator("search_split")
    @classmethod
    def _not_trained_on(cls, split: str | None) -> str | None:
        if split == "train":
            raise ValueError("the search rows must be rows no stage trains on, not the train split")
        return split


LrScheduler = Literal["linear", "cosine", "constant"]
# YAML reads a bare `no` as false: `mixed_precision: no` means "no" all the same.
MixedPrecision = Annotated[Literal["auto", "no", "fp16", "bf16"], BeforeValidator(lambda value: "no" if value is False else value)]
WARMUP_HELP = "fraction of the steps spent warming the lr up"


class TrainingSection(Section):
    """What every training stage shares; Hugging Face Trainer settings underneath."""

    epochs: float = Field(3.0, gt=0)
    learning_rate: float = Field(2e-5, gt=0, le=1)
    batch_size: int = Field(32, ge=1)
    eval_batch_size: int = Field(64, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    weight_decay: float = Field(0.0, ge=0)
    warmup: float = Field(0.1, ge=0, lt=1, description=WARMUP_HELP)
    max_steps: int | None = Field(None, ge=1, description="caps the steps (tests, smoke runs)")
    lr_scheduler: LrScheduler = Field("linear", description="learning-rate decay")
    mixed_precision: MixedPrecision = "auto"
    group_by_length: bool = Field(True, json_schema_extra={"before_it_existed": False}, description=(
        "batch training rows of similar length together (the Trainer's group_by_length sampling): "
        "less padding, e.g. MRPC pads its batches of 32 to 54 tokens a row instead of 80"))


class ResumableTrainingSection(TrainingSection):
    """A training stage that checkpoints as it goes and continues after a kill."""

    checkpoint_minutes: float = Field(3.0, gt=0, description=(
        "checkpoint after this much training time; a killed run continues from its last checkpoint"))


class FinetuneSection(ResumableTrainingSection):
    pass


class ImportanceSection(ResumableTrainingSection):
    """How the `importance` stage ranks attention heads and FFN neurons (eftnas_cli/ranking.py).

    `method: taylor` (the default) reads the fine-tuned teacher: the squared per-row gradient of a
    gate on each unit's output over `taylor_rows` training rows, per layer and per MAC; no training,
    seconds to minutes on CPU. `method: movement` is the EFTNAS paper's movement pruning (the
    training keys below), fine-tuning from `start_from`.

    Taylor is the default because it ranks better where the ranking is used, the teacher pruned to
    90/70/50/35% of its encoder MACs by gen-space's global threshold without retraining, on
    training rows held out of every run (scripts/bench_ranking.py, docs/benchmarks_ranking.md):
    above the previous movement scores at every budget on MRPC and SST-2 (MRPC 76.4/78.2/74.8/74.1
    vs 73.0/73.4/73.2/73.2, SST-2 90.2/90.2/88.5/86.7 vs 89.8/86.9/74.4/77.7), the best mean over
    both tasks and budgets (82.4 vs corrected movement 80.8, magnitude 77.9, random 76.2), and the
    best curve at every budget but MRPC's 90% (corrected movement 78.0). It also trains nothing:
    seconds where movement takes minutes.
    """

    method: Literal["movement", "taylor"] = "taylor"
    start_from: Literal["teacher", "pretrained"] | None = Field(
        None, description="weights the method starts from; null: its own (taylor: teacher, movement: pretrained)")
    seq_len: int = Field(128, ge=1, description="sequence length of the MACs that weigh a head against a neuron")
    taylor_rows: int = Field(1024, ge=1, description="training rows the taylor method reads")
    # Movement (NNCF's movement sparsity, per head and neuron). By default the scores start at the
    # final threshold's logit (as NNCF: score 0, threshold 0), so a unit ends masked once its net
    # drift, task gradient against the MACs-weighted L1 pull, is negative: the final threshold is
    # within reach in any run length (scores at 3.0 against 0.1 needed ~500 steps to cross it).
    epochs: float = 6.0
    regularization: float = Field(0.1, ge=0, description="L1 factor on the soft share of MACs kept, Σ MACs·sigmoid(S) / Σ MACs")
    warmup_start_epoch: float = Field(1.0, ge=0, description="threshold warm-up starts here")
    warmup_end_epoch: float = Field(3.0, ge=0, description="threshold reaches final_threshold here")
    stop_at_warmup_end: bool = Field(True, description="end training when the warm-up ends, as NNCF does")
    final_threshold: float = Field(0.5, gt=0, lt=1, description="sigmoid(score) at or below it masks the unit")
    score_learning_rate: float = Field(1e-2, gt=0)
    init_score: float = Field(0.0, description="initial score: sigmoid(0) = 0.5")

    @property
    def source(self) -> Literal["teacher", "pretrained"]:
        """The weights the method starts from."""
        if self.start_from is not None:
            return self.start_from
        return "teacher" if self.method == "taylor" else "pretrained"

    @model_validator(mode="after")
    def _consistent(self) -> "ImportanceSection":
        if self.warmup_end_epoch < self.warmup_start_epoch:
            raise ValueError("warmup_end_epoch must not be before warmup_start_epoch")
        if self.method == "taylor" and self.start_from == "pretrained":
            raise ValueError("taylor ranks the fine-tuned teacher's units: leave start_from unset or set it to teacher")
        if self.method == "movement" and self.warmup_end_epoch > self.epochs:
            raise ValueError(f"warmup_end_epoch ({self.warmup_end_epoch:g}) is after the last epoch ({self.epochs:g}): "
                             "the threshold would never reach final_threshold")
        return self


class SpaceSection(Section):
    num_targets: int = Field(5, ge=1, le=64)
    cmin: float = Field(0.3, gt=0, description="smallest target: fraction of cmax if <= 1, else GMACs")
    cmax: float | None = Field(None, gt=0, description="largest target: fraction or GMACs; null = full model")
    tolerance: float = Field(0.02, gt=0, lt=0.5, description="relative MACs tolerance of each target")
    discard_fraction: float = Field(0.02, ge=0, lt=1, description="a layer kept below it is skipped")
    neuron_multiple: int = Field(1, ge=1, description="round FFN widths to a multiple (hardware friendly)")
    seq_len: int = Field(128, ge=1, description="sequence length of the MACs count")


class SupernetSection(ResumableTrainingSection):
    epochs: float = 3.0
    # Cosine decay without warm-up, as the paper trains its super-networks: on MRPC search rows it
    # scored the best mean over the 0.5 and 0.35 budgets with the smallest spread over 3 seeds
    # (docs/benchmarks_supernet.md); the fine-tuned teacher it starts from needs no warm-up.
    lr_scheduler: LrScheduler = Field("cosine", description="learning-rate decay")
    warmup: float = Field(0.0, ge=0, lt=1, description=WARMUP_HELP)
    start_from: Literal["teacher", "pretrained"] = "teacher"
    num_random_subnets: int = Field(1, ge=0, description="random subnets per step between largest and smallest")
    random_subnets: Literal["spread", "uniform"] = Field("uniform", description=(
        "how they are drawn: spread = evenly over the space's MACs range (between neighbouring gen-space "
        "targets); uniform = each layer's widths uniformly among its choices (most land mid-range). On MRPC "
        "spread scored lower in every MACs band (docs/benchmarks_search.md)"))
    distillation_weight: float = Field(0.9, ge=0, le=1, description="KD share of the loss; rest is hard labels")
    temperature: float = Field(2.0, gt=0)
    hidden_distillation_weight: float = Field(0.0, ge=0, description=(
        "weight of the MSE between the subnet's and the teacher's hidden states after each layer"))
    save_steps: int | None = Field(None, ge=1, description="also checkpoint every N steps (tests, smoke runs)")


def _fractions_of_the_full_macs(budgets: list[float]) -> list[float]:
    bad = [b for b in budgets if not 0 < b <= 1]
    if bad:
        raise ValueError(f"budgets are fractions of the full MACs in (0, 1], got {_excerpt(bad)}")
    return budgets


class SearchSection(Section):
    population: int = Field(20, ge=2)
    # Validated when left at its default too: a larger population alone must be refused as well.
    trials: int = Field(200, ge=1, validate_default=True)
    budgets: list[float] = Field(default_factory=lambda: [0.5, 0.35], description="MACs fractions of the full model")
    max_eval_samples: int | None = Field(1000, ge=1, description=(
        "search rows each trial reads (the first of task.search_fraction's); null = all. On SST-2 "
        "all 6,735 took the search 10.4 min, 2,000 took 3.0 and 1,000 1.6, choosing as well on the "
        "rows none read (docs/benchmarks_search_rows.md, docs/benchmarks_search_precision.md)"))
    refine: float = Field(0.5, ge=0, lt=1, description=(
        "share of the trials spent, after NSGA-II, climbing from each budget's best subnet to its "
        "neighbours within the budget (split evenly among the budgets; 0 = NSGA-II only)"))
    tie_standard_errors: float = Field(0.5, ge=0, json_schema_extra={"before_it_existed": 0.0}, description=(
        "each budget's choice: the subnet of most MACs among those scoring within this many standard "
        "errors of the best score within the budget (0 = the best score, ties to more MACs)"))
    mixed_precision: MixedPrecision = Field("auto", json_schema_extra={"before_it_existed": "no"}, description=(
        "precision of the trials' forward passes. auto: half precision where the hardware computes it "
        "natively (bf16, else fp16, on CUDA; bf16 on CPUs with AVX512-BF16 or AMX), fp32 elsewhere; "
        "no: fp32. On SST-2, 2 CPU cores, bf16 took the search from 3.8 to 3.0 min at 2,000 rows and "
        "from 1.9 to 1.4 min at 1,000, choosing as well (docs/benchmarks_search_precision.md). "
        "Export re-checks its models in the same precision"))
    latency: bool = Field(False, description="measure latency on this machine as a third objective")
    latency_batch_size: int = Field(1, ge=1)
    latency_seq_len: int = Field(128, ge=1)
    eval_batch_size: int = Field(64, ge=1)

    _budgets_in_range = field_validator("budgets")(_fractions_of_the_full_macs)

    @field_validator("trials")
    @classmethod
    def _at_least_one_population(cls, trials: int, info: ValidationInfo) -> int:
        # NSGA-II samples a whole first population before it breeds: fewer trials never search.
        population = info.data.get("population")
        if population is not None and trials < population:
            raise ValueError(f"{trials} trials is fewer than search.population ({population}); NSGA-II needs at least one "
                             "generation: raise trials or lower population")
        return trials


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
    finetune_epochs: float = Field(0.0, ge=0, description=(
        "polish: fine-tune each extracted subnet this many epochs with KD from the teacher (the "
        "supernet section's settings), starting from the super-network's weights, and keep the weights "
        "(before the polish or after one of its epochs) that score best on search rows the search did not "
        "read (all read: its epochs only, on those rows); 0 = none. As many as the super-network's "
        "epochs is a good start: on search rows 2 beat 1 by 0.18 points (docs/benchmarks_polish_epochs.md)"))
    finetune_learning_rate: float | None = Field(None, gt=0, le=1, description=(
        "the polish's learning rate; null: the super-network's (supernet.learning_rate)"))

    _budgets_in_range = field_validator("budgets")(_fractions_of_the_full_macs)

    def polish_training(self, supernet: SupernetSection) -> SupernetSection:
        """How the polish trains: like the super-network (KD, schedule, batch), at its own learning rate."""
        if self.finetune_learning_rate is None:
            return supernet
        return supernet.model_copy(update={"learning_rate": self.finetune_learning_rate})


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

    @field_validator("name")
    @classmethod
    def _not_a_parent_folder(cls, name: str) -> str:
        # The run directory is output_dir/name: '..' would write into output_dir's parent.
        if name in {".", ".."}:
            raise ValueError("'.' and '..' are not run names")
        return name

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


class _AnchorError(yaml.MarkedYAMLError):
    """A YAML anchor or alias, which recipes do not accept."""


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader without anchors and aliases: a few lines of `&a [*b, *b, ...]` expand to gigabytes."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise _AnchorError(problem="anchor or alias", problem_mark=event.start_mark)
        return super().compose_node(parent, index)


def _parse_value(text: str) -> Any:
    """Override values are YAML scalars/lists: `3`, `1e-4`, `null`, `[0.5,0.3]`, `bert-base-uncased`."""
    try:
        return yaml.load(text, Loader=_BoundedLoader)
    except yaml.YAMLError:
        return text


def _read_yaml(path: Path, source: str) -> Any:
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_RECIPE_BYTES + 1)
    except OSError as error:
        raise RecipeError(f"{source}: cannot read the recipe ({error.strerror})") from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{source}: larger than {MAX_RECIPE_BYTES // 1_000_000} MB, not a recipe")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RecipeError(f"{source}: not a text file (byte {error.start} is not UTF-8)") from None
    try:
        return yaml.load(text, Loader=_BoundedLoader)
    except _AnchorError as error:
        raise RecipeError(
            f"{source}: YAML anchors and aliases (&name, *name) are not accepted (line {error.problem_mark.line + 1}); "
            "write the values out"
        ) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise RecipeError(f"{source}: not valid YAML{where}") from None


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
    if len(key) > MAX_EXCERPT_CHARS:
        key = key[: MAX_EXCERPT_CHARS - 3] + "..."
    if error["type"] == "extra_forbidden":
        close = difflib.get_close_matches(key, _known_keys(Recipe), n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"{source}: unknown key '{key}'{hint}"
    message = error["msg"].removeprefix("Value error, ")
    return f"{source}: {key}: {message} (got {_excerpt(error.get('input'))})"


def _check_sequence_lengths(recipe: Recipe, source: str) -> None:
    """Lengths the model runs at must fit its position embeddings: refused now, not mid-run.

    Only when the model's config is on disk (a packaged alias or a folder), so that loading a
    recipe never touches the network; a hub id is not checked here.
    """
    # Imported here so that importing recipe.py stays light: the model loader pulls in torch, which
    # whoever loads a recipe to run a stage imports anyway.
    from eftnas_cli.models import local_max_positions

    found = local_max_positions(recipe.model.name)
    if found is None:
        return
    limit, config_file = found
    lengths = {"task.max_seq_length": recipe.task.max_seq_length, "export.latency_seq_len": recipe.export.latency_seq_len}
    if recipe.search.latency:
        lengths["search.latency_seq_len"] = recipe.search.latency_seq_len
    for key, length in lengths.items():
        if length > limit:
            raise RecipeError(f"{source}: {key}: {length} is more than the {limit} positions of model "
                              f"'{recipe.model.name}' ({config_file}); use at most {limit}")


def _check_task(recipe: Recipe, source: str) -> None:
    """The task name is known, a QA task's windows advance (doc_stride below max_seq_length), and the
    search rows' split is not an eval split."""
    from eftnas_cli import tasks

    try:
        task = tasks.get_task(recipe.task.name)
    except UnknownTaskError as error:
        raise RecipeError(f"{source}: task.name: {error}") from None
    if task.kind is tasks.EXTRACTIVE_QA:
        from eftnas_cli import qa

        qa.check_windows(recipe.task.max_seq_length, recipe.task.doc_stride, f"{source}: task")
    if recipe.task.search_split in task.eval_splits:
        raise RecipeError(f"{source}: task.search_split: {recipe.task.search_split!r} is an eval split of {task.name}, "
                          "read once per final model and never to choose; name a split of its own (e.g. dev)")


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe; every problem is one `RecipeError` line."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise RecipeError(f"{source}: recipe file not found")
    data = _read_yaml(path, source) or {}
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a mapping of sections, got {type(data).__name__}")
    for override in overrides:
        if "=" not in override:
            raise RecipeError(f"override {_excerpt(override)} is not key=value (e.g. finetune.epochs=1)")
        key, value = override.split("=", 1)
        _apply_override(data, key.strip(), _parse_value(value), source)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as error:
        raise RecipeError(_describe(error.errors()[0], source)) from None
    _check_task(recipe, source)
    _check_sequence_lengths(recipe, source)
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
