"""How important each attention head and FFN neuron is: the methods the `importance` stage offers.

Every method maps a model, the task data and the recipe's `importance` section to `UnitRanking`:
heads [layers, heads] and neurons [layers, neurons] in [0, 1], higher = keep. gen-space bisects
ONE threshold over the heads and neurons of all layers together, so a head and a neuron must be
comparable on that scale by what they are worth per MAC, not by raw importance (a head costs
~75x a neuron in MiniLM-L6 and ~139x in BERT-base); reordering reads only the order within a layer.

- `movement` (the EFTNAS paper's, after NNCF's movement sparsity): fine-tunes with a learnable
  score per unit that masks the unit's output once sigmoid(score) falls below a threshold rising on a
  cubic warm-up, and an L1 pull on sigmoid(score) proportional to the unit's MACs. sigmoid(score)
  is the importance: the MACs-weighted pull already puts heads and neurons on one cost-aware scale.
- `taylor`: first-order Taylor importance of the fine-tuned teacher, no training. A gate of 1 on
  each unit's output has the gradient sum over the unit's weights of W·∂L/∂W; the importance is
  that gradient, squared per training row and summed (the loss increase its removal costs, to
  second order), as a share of its layer's total, divided by the unit's MACs and turned into a
  MACs-weighted percentile.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback

from eftnas_cli import distributed, elastic
from eftnas_cli.data import TaskData
from eftnas_cli.recipe import ImportanceSection
from eftnas_cli.training import NO_CHECKPOINTS, CheckpointEvery, QuietTrainer, RichProgress, evaluate, training_arguments


@dataclass(frozen=True)
class RankingRun:
    """Where and how a method runs: the recipe's seed and device; for a method that trains, the
    folder of its checkpoints, the one to continue from (None: start afresh) and the stage's clock
    (a time.perf_counter() value, earlier attempts included: ResumableCheckpoints.started)."""

    seed: int
    device: str
    checkpoints: Path
    resume_from: str | None = None
    started: float | None = None


@dataclass(frozen=True)
class UnitRanking:
    """Per-unit importance in [0, 1] (higher = keep) and what the method reports about itself."""

    heads: torch.Tensor
    neurons: torch.Tensor
    summary: dict = field(default_factory=dict)


# ---- cost ----------------------------------------------------------------------------------------
def unit_macs(config, seq_len: int) -> tuple[int, int]:
    """MACs per sequence of one attention head and of one FFN neuron (EFTNAS convention): what a
    layer saves by dropping it. Their sums over all units are the encoder's MACs."""
    dims = elastic.encoder_dims(config)
    full = elastic.LayerWidth(dims.heads, dims.neurons)

    def layer_macs(width: elastic.LayerWidth) -> int:
        subnet = elastic.Subnet((width,) + (full,) * (dims.num_layers - 1))
        return elastic.macs(config, subnet, seq_len).per_layer[0]

    whole = layer_macs(full)
    head = whole - layer_macs(elastic.LayerWidth(dims.heads - 1, dims.neurons))
    neuron = whole - layer_macs(elastic.LayerWidth(dims.heads, dims.neurons - 1))
    return head, neuron


def cost_weighted_percentiles(head_importance: torch.Tensor, neuron_importance: torch.Tensor,
                              head_macs: int, neuron_macs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance per MAC as a score in (0, 1]: the share of the encoder's MACs spent on units
    worth at most as much per MAC as this one.

    Dropping units in ascending order of importance per MAC is the greedy answer to "lose the least
    importance for the MACs saved", and on this scale a threshold t drops about t of the MACs, so
    gen-space's bisection lands near 1 - budget. Ties keep their layer-major order.
    """
    ratio = torch.cat([head_importance.flatten() / head_macs, neuron_importance.flatten() / neuron_macs]).double()
    macs = torch.cat([torch.full((head_importance.numel(),), float(head_macs)),
                      torch.full((neuron_importance.numel(),), float(neuron_macs))]).double()
    order = torch.sort(ratio, stable=True).indices
    scores = torch.empty_like(ratio)
    scores[order] = torch.cumsum(macs[order], 0) / macs.sum()
    heads, neurons = scores.float().split([head_importance.numel(), neuron_importance.numel()])
    return heads.view_as(head_importance), neurons.view_as(neuron_importance)


# ---- where units live --------------------------------------------------------------------------
def unit_projections(model: nn.Module) -> list[tuple[nn.Linear, nn.Linear]]:
    """Per layer, the projections that read the heads' and the neurons' outputs side by side:
    scaling their inputs scales the units' outputs, with no change to the modeling code."""
    adapter = elastic.adapter_for(model.config)
    return [
        (layer.get_submodule(adapter.attention_output), layer.get_submodule(adapter.ffn_output))
        for layer in elastic.encoder_layers(model)
    ]


def _scale_inputs(factor: Callable[[], torch.Tensor]):
    """A forward pre-hook multiplying a projection's input by `factor()` (broadcast on its last dims)."""

    def hook(module, args):
        return (args[0] * factor().to(args[0].dtype),)

    return hook


# ---- movement ----------------------------------------------------------------------------------
SCORES_MODULE = "eftnas_movement_scores"


class _SubmoduleHandle:
    """Removes a submodule again, as a hook handle removes its hook."""

    def __init__(self, parent: nn.Module, name: str):
        self.parent, self.name = parent, name

    def remove(self) -> None:
        delattr(self.parent, self.name)


class MovementScores(nn.Module):
    """A learnable score per head and neuron, and the hooks that mask the units' outputs with them.

    The forward keeps a unit while sigmoid(score) > `threshold`; the backward passes the mask's
    gradient straight through to the score, so the score accumulates its unit's W·∂L/∂W.

    Until `remove()` the scores are a submodule of the model (`SCORES_MODULE`): the Trainer zeroes
    their gradients with the model's, and DDP averages them across processes like any weight's.
    """

    def __init__(self, model: nn.Module, init_score: float, seq_len: int = 128):
        super().__init__()
        dims = elastic.encoder_dims(model.config)
        self.head_dim = dims.head_dim
        self.heads = nn.Parameter(torch.full((dims.num_layers, dims.heads), float(init_score)))
        self.neurons = nn.Parameter(torch.full((dims.num_layers, dims.neurons), float(init_score)))
        head_macs, neuron_macs = unit_macs(model.config, seq_len)
        encoder_macs = dims.num_layers * (dims.heads * head_macs + dims.neurons * neuron_macs)
        self.head_cost, self.neuron_cost = head_macs / encoder_macs, neuron_macs / encoder_macs
        self.threshold = 0.0
        self.handles = []
        for index, (attention_out, ffn_out) in enumerate(unit_projections(model)):
            self.handles.append(attention_out.register_forward_pre_hook(
                _scale_inputs(lambda index=index: self._mask(self.heads[index]).repeat_interleave(self.head_dim))))
            self.handles.append(ffn_out.register_forward_pre_hook(
                _scale_inputs(lambda index=index: self._mask(self.neurons[index]))))
        model.add_module(SCORES_MODULE, self)
        self.handles.append(_SubmoduleHandle(model, SCORES_MODULE))

    def _mask(self, scores: torch.Tensor) -> torch.Tensor:
        hard = (torch.sigmoid(scores) > self.threshold).to(scores.dtype)
        return hard + scores - scores.detach()  # straight-through: ∂L/∂S = ∂L/∂mask

    def l1(self) -> torch.Tensor:
        """The soft share of the encoder's MACs the kept units cost: Σ MACs·sigmoid(S) / Σ MACs.
        Its pull on a unit's score is proportional to the unit's MACs."""
        return (self.head_cost * torch.sigmoid(self.heads).sum()
                + self.neuron_cost * torch.sigmoid(self.neurons).sum())

    def importance(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.sigmoid(self.heads.detach()).float().cpu(), torch.sigmoid(self.neurons.detach()).float().cpu()

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


class MovementTrainer(QuietTrainer):
    """The task loss plus the L1 pull on the scores (a submodule of the model while it trains)."""

    def __init__(self, *args, scores: MovementScores, section: ImportanceSection, **kwargs):
        super().__init__(*args, **kwargs)
        self.scores = scores.to(self.args.device)
        self.regularization = 0.0
        self.add_callback(_MovementSchedule(self, section))

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
        loss = loss + self.regularization * self.scores.l1()
        return (loss, outputs) if return_outputs else loss


class _MovementSchedule(TrainerCallback):
    """Each step: the threshold and the L1 factor along the cubic warm-up; training stopped at
    warm-up end when asked (NNCF)."""

    def __init__(self, trainer: MovementTrainer, section: ImportanceSection):
        self.trainer, self.section = trainer, section

    def _epoch(self, state) -> float:
        # Warm-up epochs are read as shares of the whole run, so a `max_steps` cap keeps the shape.
        return state.global_step / max(state.max_steps, 1) * self.section.epochs

    def on_step_begin(self, args, state, control, **kwargs):
        progress = cubic_warmup(self._epoch(state), self.section.warmup_start_epoch, self.section.warmup_end_epoch)
        self.trainer.scores.threshold = progress * self.section.final_threshold
        self.trainer.regularization = progress * self.section.regularization

    def on_step_end(self, args, state, control, **kwargs):
        if self.section.stop_at_warmup_end and self._epoch(state) >= self.section.warmup_end_epoch:
            control.should_training_stop = True


def movement_trainer(model: nn.Module, scores: MovementScores, data: TaskData, section: ImportanceSection,
                     run: RankingRun, callbacks: list[TrainerCallback] = ()) -> MovementTrainer:
    """The Trainer that fine-tunes `model` and learns `scores` (their own learning rate, no weight decay)."""
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for name, p in model.named_parameters()
                        if p.requires_grad and not name.startswith(f"{SCORES_MODULE}.")],
             "weight_decay": section.weight_decay},
            {"params": list(scores.parameters()), "lr": section.score_learning_rate, "weight_decay": 0.0},
        ],
        lr=section.learning_rate,
    )
    return MovementTrainer(
        model=model,
        args=training_arguments(section, run.checkpoints, run.seed, device=run.device, save_steps=NO_CHECKPOINTS),
        train_dataset=data.train,
        data_collator=data.collator,
        optimizers=(optimizer, None),
        callbacks=[RichProgress(f"movement scores on {data.spec.name}"), CheckpointEvery(section.checkpoint_minutes, run.started),
                   *callbacks],
        scores=scores,
        section=section,
    )


def movement_importance(model: nn.Module, data: TaskData, section: ImportanceSection, run: RankingRun) -> UnitRanking:
    """Movement pruning of heads and neurons; reports the units masked at the final threshold per
    layer and the masked model's score."""
    scores = MovementScores(model, section.init_score, section.seq_len)
    # The scores are a submodule of the model: a checkpoint holds them, resuming restores them.
    movement_trainer(model, scores, data, section, run).train(resume_from_checkpoint=run.resume_from)
    scores.threshold = section.final_threshold
    # On the search rows: the validation split is read once per final model, and this is none.
    masked_metrics = evaluate(model, data.search, data.collator, data.spec, section.eval_batch_size)
    scores.remove()
    heads, neurons = scores.importance()
    masked_heads, masked_neurons = heads <= section.final_threshold, neurons <= section.final_threshold
    head_macs, neuron_macs = unit_macs(model.config, section.seq_len)
    encoder_macs = head_macs * heads.numel() + neuron_macs * neurons.numel()
    return UnitRanking(heads, neurons, {
        "masked_at_final_threshold": {
            "heads_per_layer": masked_heads.sum(dim=1).tolist(),
            "neurons_per_layer": masked_neurons.sum(dim=1).tolist(),
            "macs_fraction": float(head_macs * masked_heads.sum() + neuron_macs * masked_neurons.sum()) / encoder_macs,
        },
        "masked_model_eval": masked_metrics,
    })


# ---- taylor --------------------------------------------------------------------------------------
class UnitGates:
    """A gate of 1 on every head's and neuron's output, one per row of the current batch, whose
    gradient is the row's Σ W·∂L/∂W over the unit's weights (the first-order effect of removing it)."""

    def __init__(self, model: nn.Module):
        dims = elastic.encoder_dims(model.config)
        self.dims = dims
        self.heads = self.neurons = None
        self.handles = []
        for index, (attention_out, ffn_out) in enumerate(unit_projections(model)):
            # [rows, 1, units]: broadcast over the tokens of each row.
            self.handles.append(attention_out.register_forward_pre_hook(
                _scale_inputs(lambda index=index: self.heads[:, index, None].repeat_interleave(dims.head_dim, -1))))
            self.handles.append(ffn_out.register_forward_pre_hook(
                _scale_inputs(lambda index=index: self.neurons[:, index, None])))

    def open(self, rows: int, device: torch.device) -> list[torch.Tensor]:
        """Fresh gates of 1 for a batch of `rows` rows; returns them for autograd."""
        self.heads = torch.ones(rows, self.dims.num_layers, self.dims.heads, device=device, requires_grad=True)
        self.neurons = torch.ones(rows, self.dims.num_layers, self.dims.neurons, device=device, requires_grad=True)
        return [self.heads, self.neurons]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def taylor_sensitivity(model: nn.Module, data: TaskData, section: ImportanceSection,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ over the first `taylor_rows` training rows of (∂L_row/∂gate)², per head and per neuron.

    Squared per row, not summed first: at a fine-tuned teacher the training loss sits near a
    minimum, so the rows' gradients cancel in a sum (|Σ g| measures noise), while Σ g² (the
    empirical Fisher) estimates the loss increase of removing the unit to second order. Measured on
    held-out MRPC training rows, it also ranked best of |Σ g|, Σ per batch |Σ g| and Σ per row |g|.
    """
    model.to(device).eval()  # the teacher's function as deployed: no dropout
    gates = UnitGates(model)
    rows = data.train.select(range(min(section.taylor_rows, len(data.train))))
    dims = elastic.encoder_dims(model.config)
    heads = torch.zeros(dims.num_layers, dims.heads, dtype=torch.float64)
    neurons = torch.zeros(dims.num_layers, dims.neurons, dtype=torch.float64)
    # A multi-process run splits the batches over the ranks and sums their squares: the same Σ g².
    starts = range(0, len(rows), section.batch_size)
    try:
        for start in (starts[index] for index in distributed.shard(len(starts))):
            chunk = rows[start: start + section.batch_size]
            features = [{key: chunk[key][i] for key in chunk} for i in range(len(chunk["input_ids"]))]
            batch = {key: value.to(device) for key, value in data.collator(features).items()}
            row_gates = gates.open(len(features), device)
            loss = model(**batch).loss
            # The loss is a mean over rows: scaled back by the row count, each row's own gradient.
            head_grads, neuron_grads = (g.double().cpu() * len(features) for g in torch.autograd.grad(loss, row_gates))
            heads += head_grads.pow(2).sum(0)
            neurons += neuron_grads.pow(2).sum(0)
    finally:
        gates.remove()
    return distributed.sum_over_ranks(heads).float(), distributed.sum_over_ranks(neurons).float()


def taylor_importance(model: nn.Module, data: TaskData, section: ImportanceSection, run: RankingRun) -> UnitRanking:
    """Taylor importance of the teacher's heads and neurons per MAC, as MACs-weighted percentiles."""
    from eftnas_cli.models import best_device

    head_sensitivity, neuron_sensitivity = taylor_sensitivity(model, data, section, best_device(run.device))
    # Each unit's share of its layer's sensitivity (Molchanov et al. 2017 normalize per layer). The
    # per-unit estimates add up only for small removals, and the last layers of a fine-tuned model
    # show tiny gradients: raw, one global threshold empties them (MRPC at 35% of the MACs kept
    # 1 head in each of the last two layers and no neuron, and fell to the majority class; per
    # layer, 74.1 on held-out training rows). Heads and neurons of a layer keep their relation.
    layer_total = (head_sensitivity.sum(1, keepdim=True) + neuron_sensitivity.sum(1, keepdim=True)).clamp_min(1e-30)
    head_macs, neuron_macs = unit_macs(model.config, section.seq_len)
    heads, neurons = cost_weighted_percentiles(head_sensitivity / layer_total, neuron_sensitivity / layer_total,
                                               head_macs, neuron_macs)
    return UnitRanking(heads, neurons, {"rows": min(section.taylor_rows, len(data.train))})


ImportanceMethod = Callable[[nn.Module, TaskData, ImportanceSection, RankingRun], UnitRanking]

METHODS: dict[str, ImportanceMethod] = {
    "movement": movement_importance,
    "taylor": taylor_importance,
}
# The methods that train, and so checkpoint and continue after a kill.
TRAINING_METHODS = ("movement",)


def magnitude_rank_correlation(model: nn.Module, heads: torch.Tensor, neurons: torch.Tensor) -> dict:
    """Mean Spearman correlation, over layers, of importance with the units' output weight norms
    (how far a ranking is from plain weight magnitude)."""
    import numpy as np
    from scipy.stats import spearmanr

    dims = elastic.encoder_dims(model.config)
    head_rho, neuron_rho = [], []
    for index, (attention_out, ffn_out) in enumerate(unit_projections(model)):
        head_norm = attention_out.weight.detach().float().cpu().view(dims.hidden, dims.heads, dims.head_dim).norm(dim=(0, 2))
        neuron_norm = ffn_out.weight.detach().float().cpu().norm(dim=0)
        head_rho.append(spearmanr(heads[index].numpy(), head_norm.numpy()).statistic)
        neuron_rho.append(spearmanr(neurons[index].numpy(), neuron_norm.numpy()).statistic)
    return {"heads": float(np.nanmean(head_rho)), "neurons": float(np.nanmean(neuron_rho))}
