"""Extraction of a dense, standalone subnet from a (super-)network."""

from __future__ import annotations

import copy

from torch import nn

from .adapters import adapter_for, encoder_dims, encoder_layers
from .core import full_size_linears
from .modules import BiasOnly, SkippedAttention
from .subnet import Subnet, validate_subnet


def _leading_block(linear: nn.Linear, out_features: int, in_features: int) -> nn.Module:
    """A plain module computing `linear` restricted to its leading rows/columns.

    Never a zero-width nn.Linear (ONNX Runtime and OpenVINO reject those).
    """
    if in_features == 0:
        return BiasOnly(linear.bias[:out_features])
    if out_features == 0:
        # The next layer has in-width 0 and ignores this output.
        return nn.Identity()
    # Built on the meta device, then given real Parameters: skips a pointless random init.
    block = nn.Linear(in_features, out_features, bias=linear.bias is not None, device="meta")
    weight = linear.weight[:out_features, :in_features]
    block.weight = nn.Parameter(weight.detach().clone(), requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        bias = linear.bias[:out_features]
        block.bias = nn.Parameter(bias.detach().clone(), requires_grad=linear.bias.requires_grad)
    block.train(linear.training)
    return block


def restructure(model: nn.Module, subnet: Subnet) -> None:
    """Shrink, in place, a full-size (plain or elastic) model to `subnet`'s shapes,
    keeping the leading heads/neurons, and record the subnet as `config.eftnas_subnet`.

    On a freshly built model this gives the layout of an extracted checkpoint, so its
    state_dict loads with strict=True.
    """
    adapter, dims = adapter_for(model.config), encoder_dims(model.config)
    validate_subnet(model.config, subnet)
    paths = adapter.linear_paths
    for layer, width in zip(encoder_layers(model), subnet.layers):
        linears = full_size_linears(layer, adapter, dims)
        attention_width = width.heads * dims.head_dim
        if width.heads == 0:
            # No heads: skip the whole attention core rather than attend over nothing.
            output_bias = BiasOnly(linears["attention_output"].bias)
            inner_name = adapter.attention_output_in_core
            if inner_name is None:
                layer.set_submodule(adapter.attention_core, SkippedAttention())
                layer.set_submodule(paths["attention_output"], output_bias)
            else:
                layer.set_submodule(adapter.attention_core, SkippedAttention((inner_name, output_bias)))
        else:
            for role in ("query", "key", "value"):
                layer.set_submodule(paths[role], _leading_block(linears[role], attention_width, dims.hidden))
            layer.set_submodule(
                paths["attention_output"],
                _leading_block(linears["attention_output"], dims.hidden, attention_width),
            )
        layer.set_submodule(paths["ffn_input"], _leading_block(linears["ffn_input"], width.neurons, dims.hidden))
        layer.set_submodule(paths["ffn_output"], _leading_block(linears["ffn_output"], dims.hidden, width.neurons))
    model.config.eftnas_subnet = subnet.to_dict()


def extract(model: nn.Module, subnet: Subnet) -> nn.Module:
    """A standalone copy of `model` (plain or elastic, left untouched) reduced to `subnet`,
    with plain smaller layers; same outputs as the elastic model with `subnet` active."""
    extracted = copy.deepcopy(model)
    restructure(extracted, subnet)
    return extracted
