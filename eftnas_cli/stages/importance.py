"""Stage `importance`: how much each attention head and FFN neuron is worth, per MAC.

Runs the recipe's `importance.method` (eftnas_cli/ranking.py: `taylor` on the fine-tuned teacher,
or the paper's `movement` pruning) and writes `importance/importance.safetensors`: heads [L, H] and
neurons [L, N] in [0, 1], higher = keep, on one scale for heads and neurons, which reordering and
gen-space's single threshold read. The summary adds what the method reports (movement: the units
masked per layer at the final threshold and the masked model's score) and how far the ranking is
from plain weight magnitude.
"""

from __future__ import annotations

from safetensors.torch import save_file
from transformers import set_seed

from eftnas_cli import distributed, ranking
from eftnas_cli.artifacts import IMPORTANCE_FILE, model_files, start_weights
from eftnas_cli.data import recipe_task_data
from eftnas_cli.models import load_model, load_tokenizer
from eftnas_cli.plots import importance_heatmap
from eftnas_cli.pruning import ThresholdPruner
from eftnas_cli.recipe import Recipe
from eftnas_cli.rundir import RunDir, holds_lock, write_json
from eftnas_cli.training import ResumableCheckpoints
from eftnas_cli.ui import console

# The heatmap shades each unit by how many of these MACs budgets (fractions of the encoder) keep it.
HEATMAP_BUDGETS = (0.75, 0.5, 0.35)


@holds_lock("importance")
def compute_importance(recipe: Recipe) -> dict:
    """Rank heads and neurons; writes `importance/importance.safetensors`, heatmap and summary."""
    run = RunDir(recipe)
    section = recipe.importance
    # Taylor reads the teacher; the reason goes into the "run `eftnas finetune` first" error.
    by = "importance" if section.source == "pretrained" else f"importance (method {section.method} starts from the teacher)"
    source = start_weights(recipe, run, section.source, by=by)
    tokenizer = load_tokenizer(recipe.model.name)
    with distributed.main_first():  # the main process fills the tokenization cache
        data = recipe_task_data(recipe, tokenizer)
    set_seed(recipe.seed)  # a pretrained start gets a fresh classifier head: the same one every run
    model = load_model(source, data.spec)
    inputs = model_files(source) if section.source == "teacher" else []
    checkpoints = ResumableCheckpoints(run.path, "importance", recipe, "importance", inputs)
    resume_from = None
    if section.method in ranking.TRAINING_METHODS:  # the main process decides for every rank
        resume_from = distributed.on_main(checkpoints.open)
        console.print(f"importance: continuing from {resume_from}" if resume_from else
                      "importance: starting (no checkpoint of this recipe yet)", soft_wrap=True)
    with run.stage("importance", started=checkpoints.started) as out:
        for path in inputs:
            out.add_input(path)
        result = ranking.METHODS[section.method](
            model, data, section, ranking.RankingRun(recipe.seed, recipe.device, checkpoints.folder, resume_from,
                                                         checkpoints.started))
        heads, neurons = result.heads.float().contiguous(), result.neurons.float().contiguous()
        pruner = ThresholdPruner(model.config, heads, neurons, seq_len=section.seq_len)
        full = pruner.macs(pruner.subnet(0.0))
        thresholds = [pruner.fit(budget * full)[0] for budget in HEATMAP_BUDGETS]
        out.metrics = {
            "method": section.method,
            **result.summary,
            "kept_per_budget": {f"{budget:g}": pruner.subnet(threshold).to_dict()
                                for budget, threshold in zip(HEATMAP_BUDGETS, thresholds)},
            "rank_correlation_with_weight_magnitude": ranking.magnitude_rank_correlation(model, heads, neurons),
        }
        if out.writes:
            save_file({"heads": heads, "neurons": neurons}, str(out.dir / IMPORTANCE_FILE))
            importance_heatmap(heads, neurons, thresholds, out.dir / "heatmap.png")
            write_json(out.dir / "summary.json", out.metrics)
    if distributed.is_main():
        checkpoints.remove()
    _print_summary(out.metrics)
    return out.metrics


def _print_summary(metrics: dict) -> None:
    from rich.table import Table

    budgets = metrics["kept_per_budget"]
    masked = metrics.get("masked_at_final_threshold")
    table = Table(title=f"{metrics['method']} importance: heads/neurons kept per layer at each MACs budget")
    table.add_column("layer", justify="right")
    for budget in budgets:
        table.add_column(f"{budget} MACs", justify="right")
    if masked:
        table.add_column("masked by movement", justify="right")
    for index in range(len(next(iter(budgets.values()))["layers"])):
        cells = [f"{b['layers'][index]['heads']}/{b['layers'][index]['neurons']}" for b in budgets.values()]
        if masked:
            cells.append(f"{masked['heads_per_layer'][index]}/{masked['neurons_per_layer'][index]}")
        table.add_row(str(index), *cells)
    console.print(table)
    if masked:
        console.print(f"movement masked {masked['macs_fraction']:.1%} of the encoder MACs; masked model score "
                      f"{metrics['masked_model_eval']['score']:.4f}")
    correlation = metrics["rank_correlation_with_weight_magnitude"]
    console.print(f"Spearman ρ of importance vs weight magnitude: heads {correlation['heads']:.2f}, "
                  f"neurons {correlation['neurons']:.2f}")

