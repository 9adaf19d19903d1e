"""Stage `importance`: first-order (movement) importance of attention heads and FFN neurons.

Structured soft movement pruning (Sanh et al., 2020): every head and every FFN neuron gets a
learnable score S. The forward multiplies the unit's output by the hard mask sigmoid(S) > τ; the
backward passes the mask's gradient straight through to S, so S accumulates the first-order signal
W·∂L/∂W of its unit. τ rises from 0 to `final_threshold` on a cubic schedule between the warm-up
epochs, and an L1 term on sigmoid(S), warmed up alike, pushes unneeded units down. The learned
sigmoid(S) per unit is the importance that reordering and the search space are built from.
"""

from __future__ import annotations

import shutil

import numpy as np
import torch
from safetensors.torch import save_file
from scipy.stats import spearmanr
from torch import nn
from transformers import TrainerCallback

from eftnas_cli import elastic
from eftnas_cli.models import load_model, load_tokenizer
from eftnas_cli.plots import importance_heatmap
from eftnas_cli.recipe import ImportanceSection, Recipe
from eftnas_cli.rundir import RunDir, write_json
from eftnas_cli.stages.common import first_eval_split, model_files, start_weights, task_data
from eftnas_cli.training import QuietTrainer, RichProgress, evaluate, training_arguments
from eftnas_cli.ui import console

IMPORTANCE_FILE = "importance.safetensors"


def unit_projections(model: nn.Module) -> list[tuple[nn.Linear, nn.Linear]]:
    """Per layer, the projections that read the heads' and the neurons' outputs."""
    adapter = elastic.adapter_for(model.config)
    return [
        (layer.get_submodule(adapter.attention_output), layer.get_submodule(adapter.ffn_output))
        for layer in elastic.encoder_layers(model)
    ]


class MovementScores(nn.Module):
    """Scores of every head and neuron, and the hooks that mask the units' outputs with them."""

    def __init__(self, model: nn.Module, init_score: float):
        super().__init__()
        dims = elastic.encoder_dims(model.config)
        self.head_dim = dims.head_dim
        self.heads = nn.Parameter(torch.full((dims.num_layers, dims.heads), init_score))
        self.neurons = nn.Parameter(torch.full((dims.num_layers, dims.neurons), init_score))
        self.threshold = 0.0
        self.handles = []
        for index, (attention_out, ffn_out) in enumerate(unit_projections(model)):
            # The attention output projection reads the heads' outputs side by side, and the FFN
            # output projection reads the neurons: masking their inputs masks the units.
            self.handles.append(attention_out.register_forward_pre_hook(self._mask_heads(index)))
            self.handles.append(ffn_out.register_forward_pre_hook(self._mask_neurons(index)))

    def _mask(self, scores: torch.Tensor) -> torch.Tensor:
        hard = (torch.sigmoid(scores) > self.threshold).to(scores.dtype)
        return hard + scores - scores.detach()  # straight-through: ∂L/∂S = ∂L/∂mask

    def _mask_heads(self, index: int):
        def hook(module, args):
            mask = self._mask(self.heads[index]).repeat_interleave(self.head_dim)
            return (args[0] * mask.to(args[0].dtype),)

        return hook

    def _mask_neurons(self, index: int):
        def hook(module, args):
            return (args[0] * self._mask(self.neurons[index]).to(args[0].dtype),)

        return hook

    def l1(self) -> torch.Tensor:
        return torch.cat([torch.sigmoid(self.heads).flatten(), torch.sigmoid(self.neurons).flatten()]).mean()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def cubic_warmup(epoch: float, start: float, end: float) -> float:
    """0 before `start`, 1 after `end`, cubic in between (Zhu & Gupta's sparsity schedule)."""
    if epoch <= start:
        return 0.0
    if epoch >= end or end == start:
        return 1.0
    return 1.0 - (1.0 - (epoch - start) / (end - start)) ** 3


class _Schedule(TrainerCallback):
    """Moves the threshold (and the regularisation factor) along the cubic warm-up each step."""

    def __init__(self, scores: MovementScores, section: ImportanceSection, trainer: "MovementTrainer"):
        self.scores, self.section, self.trainer = scores, section, trainer

    def on_step_begin(self, args, state, control, **kwargs):
        # Warm-up epochs are read as shares of the whole run, so a `max_steps` cap keeps the shape.
        epoch = state.global_step / max(state.max_steps, 1) * self.section.epochs
        progress = cubic_warmup(epoch, self.section.warmup_start_epoch, self.section.warmup_end_epoch)
        self.scores.threshold = progress * self.section.final_threshold
        self.trainer.regularization = progress * self.section.regularization


class MovementTrainer(QuietTrainer):
    """The task loss plus the L1 pull on sigmoid(scores)."""

    def __init__(self, *args, scores: MovementScores, **kwargs):
        super().__init__(*args, **kwargs)
        self.scores = scores
        self.regularization = 0.0

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
        loss = loss + self.regularization * self.scores.l1()
        return (loss, outputs) if return_outputs else loss


def _magnitude_rank_correlation(model: nn.Module, head_scores: torch.Tensor, neuron_scores: torch.Tensor) -> dict:
    """Mean Spearman correlation, over layers, of importance with the units' weight norms."""
    heads, neurons = [], []
    dims = elastic.encoder_dims(model.config)
    for index, (attention_out, ffn_out) in enumerate(unit_projections(model)):
        head_norm = attention_out.weight.detach().view(dims.hidden, dims.heads, dims.head_dim).norm(dim=(0, 2))
        neuron_norm = ffn_out.weight.detach().norm(dim=0)
        heads.append(spearmanr(head_scores[index].numpy(), head_norm.numpy()).statistic)
        neurons.append(spearmanr(neuron_scores[index].numpy(), neuron_norm.numpy()).statistic)
    return {"heads": float(np.nanmean(heads)), "neurons": float(np.nanmean(neurons))}


def compute_importance(recipe: Recipe) -> dict:
    """Train movement scores on the task; writes `importance/importance.safetensors` + heatmap."""
    run = RunDir(recipe)
    section = recipe.importance
    source = start_weights(recipe, run, section.start_from, by="importance")
    tokenizer = load_tokenizer(recipe.model.name)
    data = task_data(recipe, tokenizer)
    model = load_model(source, data.spec)
    scores = MovementScores(model, section.init_score)
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": section.weight_decay},
            {"params": list(scores.parameters()), "lr": section.score_learning_rate, "weight_decay": 0.0},
        ],
        lr=section.learning_rate,
    )
    with run.stage("importance") as out:
        for path in model_files(source) if section.start_from == "teacher" else []:
            out.add_input(path)
        trainer = MovementTrainer(
            model=model,
            args=training_arguments(section, out.dir / "checkpoints", recipe.seed, device=recipe.device, save_steps=10**9),
            train_dataset=data.train,
            data_collator=data.collator,
            processing_class=tokenizer,
            optimizers=(optimizer, None),
            callbacks=[RichProgress(f"movement scores on {data.spec.name}")],
            scores=scores,
        )
        trainer.add_callback(_Schedule(scores, section, trainer))
        trainer.train()
        scores.threshold = section.final_threshold
        masked_metrics = evaluate(model, data.eval[first_eval_split(data)], data.collator, data.spec, section.eval_batch_size)
        scores.remove()

        head_importance = torch.sigmoid(scores.heads.detach()).float()
        neuron_importance = torch.sigmoid(scores.neurons.detach()).float()
        save_file({"heads": head_importance, "neurons": neuron_importance}, str(out.dir / IMPORTANCE_FILE))
        thresholds = [0.25 * section.final_threshold, 0.5 * section.final_threshold, section.final_threshold]
        importance_heatmap(head_importance, neuron_importance, thresholds, out.dir / "heatmap.png")
        kept = {
            "heads_per_layer": (head_importance > section.final_threshold).sum(dim=1).tolist(),
            "neurons_per_layer": (neuron_importance > section.final_threshold).sum(dim=1).tolist(),
        }
        out.metrics = {
            "masked_eval_at_final_threshold": masked_metrics,
            "kept_at_final_threshold": kept,
            "rank_correlation_with_weight_magnitude": _magnitude_rank_correlation(model, head_importance, neuron_importance),
        }
        write_json(out.dir / "summary.json", out.metrics)
        shutil.rmtree(out.dir / "checkpoints", ignore_errors=True)
    _print_summary(kept, masked_metrics, out.metrics["rank_correlation_with_weight_magnitude"])
    return out.metrics


def _print_summary(kept: dict, metrics: dict, correlation: dict) -> None:
    from rich.table import Table

    table = Table(title="units kept at the final threshold")
    table.add_column("layer", justify="right")
    table.add_column("heads", justify="right")
    table.add_column("neurons", justify="right")
    for index, (heads, neurons) in enumerate(zip(kept["heads_per_layer"], kept["neurons_per_layer"])):
        table.add_row(str(index), str(heads), str(neurons))
    console.print(table)
    console.print(
        f"masked model score {metrics['score']:.4f}; Spearman ρ of importance vs weight magnitude: "
        f"heads {correlation['heads']:.2f}, neurons {correlation['neurons']:.2f}"
    )
