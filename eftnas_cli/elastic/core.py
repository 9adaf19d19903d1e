"""Elastic super-network operations: make layers elastic, pick the active subnet,
and reorder heads/neurons by importance so that every subnet keeps the best units."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .adapters import EncoderDims, FamilyAdapter, adapter_for, encoder_dims, encoder_layers
from .modules import ElasticLinear
from .subnet import LayerWidth, Subnet, validate_subnet


def full_size_linears(layer: nn.Module, adapter: FamilyAdapter, dims: EncoderDims) -> dict[str, nn.Linear]:
    """The six prunable linears of `layer` by role; ValueError unless all are full size."""
    attention_width = dims.heads * dims.head_dim
    expected_shapes = {  # (out_features, in_features)
        "query": (attention_width, dims.hidden),
        "key": (attention_width, dims.hidden),
        "value": (attention_width, dims.hidden),
        "attention_output": (dims.hidden, attention_width),
        "ffn_input": (dims.neurons, dims.hidden),
        "ffn_output": (dims.hidden, dims.neurons),
    }
    linears = {}
    for role, path in adapter.linear_paths.items():
        try:
            module = layer.get_submodule(path)
        except AttributeError:  # gone with a SkippedAttention
            module = None
        if not isinstance(module, nn.Linear) or tuple(module.weight.shape) != expected_shapes[role]:
            raise ValueError(
                f"expected a full-size nn.Linear {expected_shapes[role]} at {path!r}, got {module}; "
                "was this model already extracted?"
            )
        linears[role] = module
    return linears


def make_elastic(model: nn.Module) -> nn.Module:
    """Swap, in place, the six linears of every encoder layer for ElasticLinear sharing
    the same Parameters. Idempotent. Returns `model`."""
    adapter, dims = adapter_for(model.config), encoder_dims(model.config)
    for layer in encoder_layers(model):
        for role, linear in full_size_linears(layer, adapter, dims).items():
            if not isinstance(linear, ElasticLinear):
                layer.set_submodule(adapter.linear_paths[role], ElasticLinear(linear))
    return model


def _elastic_linears(layer: nn.Module, adapter: FamilyAdapter) -> dict[str, ElasticLinear]:
    linears = {role: layer.get_submodule(path) for role, path in adapter.linear_paths.items()}
    if not all(isinstance(linear, ElasticLinear) for linear in linears.values()):
        raise ValueError("the model is not elastic; call make_elastic(model) first")
    return linears


def activate(model: nn.Module, subnet: Subnet) -> None:
    """Make `subnet` the active widths of an elastic model (the leading heads/neurons)."""
    adapter, dims = adapter_for(model.config), encoder_dims(model.config)
    validate_subnet(model.config, subnet)
    for layer, width in zip(encoder_layers(model), subnet.layers):
        linears = _elastic_linears(layer, adapter)
        attention_width = width.heads * dims.head_dim
        for role in ("query", "key", "value"):
            linears[role].active_out_features = attention_width
        linears["attention_output"].active_in_features = attention_width
        linears["ffn_input"].active_out_features = width.neurons
        linears["ffn_output"].active_in_features = width.neurons


def active_subnet(model: nn.Module) -> Subnet:
    """The subnet an elastic model currently runs."""
    adapter, dims = adapter_for(model.config), encoder_dims(model.config)
    widths = []
    for layer in encoder_layers(model):
        linears = _elastic_linears(layer, adapter)
        heads = linears["attention_output"].active_in_features // dims.head_dim
        widths.append(LayerWidth(heads=heads, neurons=linears["ffn_output"].active_in_features))
    return Subnet(tuple(widths))


def _descending_order(scores: torch.Tensor, expected: int, what: str) -> torch.Tensor:
    scores = torch.as_tensor(scores).detach().flatten()
    if scores.numel() != expected:
        raise ValueError(f"expected {expected} {what} scores, got {scores.numel()}")
    return torch.sort(scores.float(), descending=True, stable=True).indices


# copy_ keeps the Parameter objects, which ElasticLinear and optimizers share.
@torch.no_grad()
def _permute_rows(linear: nn.Linear, index: torch.Tensor) -> None:
    index = index.to(linear.weight.device)
    linear.weight.copy_(linear.weight[index])
    if linear.bias is not None:
        linear.bias.copy_(linear.bias[index])


@torch.no_grad()
def _permute_columns(linear: nn.Linear, index: torch.Tensor) -> None:
    linear.weight.copy_(linear.weight[:, index.to(linear.weight.device)])


def reorder(
    model: nn.Module, head_scores: Sequence[torch.Tensor], neuron_scores: Sequence[torch.Tensor]
) -> None:
    """Permute, in place, each layer's heads and FFN neurons so the highest-scoring come
    first (descending, stable). The model computes the same function afterwards.

    Works on plain or elastic full-size models; `head_scores[i]` has one score per head
    of layer i, `neuron_scores[i]` one per FFN neuron.
    """
    adapter, dims = adapter_for(model.config), encoder_dims(model.config)
    layers = encoder_layers(model)
    if not len(head_scores) == len(neuron_scores) == dims.num_layers:
        raise ValueError(
            f"expected scores for {dims.num_layers} layers, "
            f"got {len(head_scores)} head and {len(neuron_scores)} neuron score lists"
        )
    for layer, layer_head_scores, layer_neuron_scores in zip(layers, head_scores, neuron_scores):
        linears = full_size_linears(layer, adapter, dims)
        head_order = _descending_order(layer_head_scores, dims.heads, "head")
        # A head is a block of head_dim consecutive rows of q/k/v (columns of the output projection).
        head_rows = (head_order[:, None] * dims.head_dim + torch.arange(dims.head_dim)).flatten()
        for role in ("query", "key", "value"):
            _permute_rows(linears[role], head_rows)
        _permute_columns(linears["attention_output"], head_rows)

        neuron_order = _descending_order(layer_neuron_scores, dims.neurons, "neuron")
        _permute_rows(linears["ffn_input"], neuron_order)
        _permute_columns(linears["ffn_output"], neuron_order)
