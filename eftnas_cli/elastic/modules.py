"""Modules that stand in for slimmed linears and attention cores."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _broadcast_bias(bias: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`bias` at every position of `x`: what a linear layer with no inputs outputs."""
    # expand, not a zero-width matmul: ONNX Runtime and OpenVINO reject empty tensors.
    # clone: a view of a Parameter made under no_grad claims requires_grad without a
    # grad_fn, which breaks autograd hooks such as FlopCounterMode's module tracker.
    return bias.expand(*x.shape[:-1], -1).clone()


class ElasticLinear(nn.Linear):
    """nn.Linear whose forward uses only the leading `active_out_features` rows and
    `active_in_features` columns of its weight.

    It adopts the Parameters of the linear it replaces, so state_dict keys and values,
    and optimizer references, stay those of the original layer.

    Zero widths keep the layer cheap and well-defined: with no inputs the output is the
    bias (what an empty matmul gives); with no outputs the input passes through unchanged
    for the following in-width-0 layer to ignore (keeps the attention reshape valid).
    """

    def __init__(self, linear: nn.Linear):
        # Build on the meta device: the real storage is the adopted Parameters.
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight = linear.weight
        self.bias = linear.bias
        self.active_in_features = linear.in_features
        self.active_out_features = linear.out_features
        self.train(linear.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, in_ = self.active_out_features, self.active_in_features
        if in_ == 0:
            return _broadcast_bias(self.bias[:out], x)
        if out == 0:
            return x
        bias = None if self.bias is None else self.bias[:out]
        return F.linear(x, self.weight[:out, :in_], bias)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, "
            f"active_in_features={self.active_in_features}, active_out_features={self.active_out_features}"
        )


class BiasOnly(nn.Module):
    """A linear layer left with no inputs: outputs its bias at every position."""

    def __init__(self, bias: torch.Tensor):
        super().__init__()
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _broadcast_bias(self.bias, x)


class SkippedAttention(nn.Module):
    """Attention core of a layer that keeps no heads: computes no scores, has no q/k/v.

    When the output projection follows the core (BERT's `attention.output.dense`, a
    BiasOnly after extraction), the hidden states pass through for it to ignore. When
    the projection lives inside the core (DistilBERT's `out_lin`), pass it as
    `inner_output=(name, BiasOnly)`; it keeps that name so state_dict keys are unchanged.
    """

    def __init__(self, inner_output: tuple[str, BiasOnly] | None = None):
        super().__init__()
        self.inner_output_name = None
        if inner_output is not None:
            self.inner_output_name, projection = inner_output
            self.add_module(self.inner_output_name, projection)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        # (output, attention weights), as the attention modules it replaces return.
        if self.inner_output_name is None:
            return hidden_states, None
        return getattr(self, self.inner_output_name)(hidden_states), None
