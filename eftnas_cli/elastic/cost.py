"""Compute and size of a subnet, from dimensions alone (EFTNAS MACs convention)."""

from __future__ import annotations

from dataclasses import dataclass

from .adapters import adapter_for, encoder_dims
from .subnet import Subnet, full_subnet, validate_subnet


@dataclass(frozen=True)
class MacsReport:
    """Multiply-accumulates per sequence of `seq_len` tokens.

    Head figures are those of `head` (see `HEADS`): the sequence-classification head reads one
    token per sequence (BERT's pooler, then a hidden x labels classifier; RoBERTa's and
    DistilBERT's hidden x hidden dense, then their hidden x labels projection); the
    question-answering head projects every token to a start and an end logit, with no pooler.
    """

    seq_len: int
    per_layer: list[int]
    encoder: int
    embeddings: int  # lookups only: 0
    pooler: int
    classifier: int
    total: int


@dataclass(frozen=True)
class ParamsReport:
    """Parameter counts, with the same heads as MacsReport."""

    per_layer: list[int]
    encoder: int
    embeddings: int
    pooler: int
    classifier: int
    total: int


@dataclass(frozen=True)
class HeadCost:
    """MACs per sequence and parameters of a task head on top of the encoder."""

    pooler_macs: int
    classifier_macs: int
    pooler_params: int
    classifier_params: int


def _sequence_classification_head(config, seq_len: int) -> HeadCost:
    adapter, d = adapter_for(config), encoder_dims(config).hidden
    dense = d * d if adapter.classifier_dense else 0
    return HeadCost(
        pooler_macs=d * d if adapter.pooler else 0,
        classifier_macs=dense + d * config.num_labels,
        pooler_params=d * d + d if adapter.pooler else 0,
        classifier_params=(dense + d if dense else 0) + d * config.num_labels + config.num_labels,
    )


def _question_answering_head(config, seq_len: int) -> HeadCost:
    d = encoder_dims(config).hidden
    return HeadCost(pooler_macs=0, classifier_macs=seq_len * d * 2, pooler_params=0, classifier_params=d * 2 + 2)


# Head name (a task kind's `head`) -> its cost.
HEADS = {"sequence-classification": _sequence_classification_head, "question-answering": _question_answering_head}


def _subnet_or_full(config, subnet: Subnet | None) -> Subnet:
    if subnet is None:
        return full_subnet(config)
    validate_subnet(config, subnet)
    return subnet


def macs(config, subnet: Subnet | None = None, seq_len: int = 128, head: str = "sequence-classification") -> MacsReport:
    """MACs per sequence; per layer s*(4*d*h*d_h + 2*d*n) + 2*s^2*h*d_h
    (q/k/v/output projections, FFN, then attention scores and their weighted sum)."""
    dims = encoder_dims(config)
    subnet = _subnet_or_full(config, subnet)
    d, s = dims.hidden, seq_len
    per_layer = []
    for width in subnet.layers:
        attention_width = width.heads * dims.head_dim
        per_layer.append(s * (4 * d * attention_width + 2 * d * width.neurons) + 2 * s * s * attention_width)
    head_cost = HEADS[head](config, seq_len)
    pooler, classifier = head_cost.pooler_macs, head_cost.classifier_macs
    encoder = sum(per_layer)
    return MacsReport(
        seq_len=seq_len,
        per_layer=per_layer,
        encoder=encoder,
        embeddings=0,
        pooler=pooler,
        classifier=classifier,
        total=encoder + pooler + classifier,
    )


def count_params(config, subnet: Subnet | None = None, head: str = "sequence-classification") -> ParamsReport:
    """Parameter counts of the subnet's dense (extracted) model."""
    adapter, dims = adapter_for(config), encoder_dims(config)
    subnet = _subnet_or_full(config, subnet)
    d = dims.hidden
    per_layer = []
    for width in subnet.layers:
        attention_width = width.heads * dims.head_dim
        per_layer.append(
            3 * (d * attention_width + attention_width)  # q, k, v
            + attention_width * d + d  # attention output (its bias stays even with 0 heads)
            + d * width.neurons + width.neurons  # FFN input
            + width.neurons * d + d  # FFN output
            + 2 * 2 * d  # two LayerNorms
        )
    token_types = getattr(config, adapter.token_type_vocab_attr) if adapter.token_type_vocab_attr else 0
    embeddings = (config.vocab_size + config.max_position_embeddings + token_types) * d + 2 * d
    head_cost = HEADS[head](config, 0)
    pooler, classifier = head_cost.pooler_params, head_cost.classifier_params
    encoder = sum(per_layer)
    return ParamsReport(
        per_layer=per_layer,
        encoder=encoder,
        embeddings=embeddings,
        pooler=pooler,
        classifier=classifier,
        total=encoder + embeddings + pooler + classifier,
    )
