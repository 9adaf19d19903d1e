"""Per-family layout of BERT-like encoders: where the prunable linears live and
what the config calls each dimension. Adding a family is one table entry."""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from eftnas_cli.errors import UnsupportedModelError

# The six linears of an encoder layer that elastic widths slice.
LINEAR_ROLES = ("query", "key", "value", "attention_output", "ffn_input", "ffn_output")


@dataclass(frozen=True)
class FamilyAdapter:
    """Module paths (relative to an encoder layer) and config attribute names of one family."""

    layers: str  # the encoder's layer list, relative to `model.base_model`
    attention_core: str  # replaced by SkippedAttention when a layer keeps no heads
    query: str
    key: str
    value: str
    attention_output: str
    ffn_input: str
    ffn_output: str
    num_layers_attr: str
    hidden_attr: str
    heads_attr: str
    neurons_attr: str
    token_type_vocab_attr: str | None  # None: the family has no token-type embeddings
    pooler: bool  # the classifier reads a hidden x hidden pooler on [CLS] (BERT)
    classifier_dense: bool  # the classification head has its own hidden x hidden dense first

    @property
    def linear_paths(self) -> dict[str, str]:
        return {role: getattr(self, role) for role in LINEAR_ROLES}

    @property
    def attention_output_in_core(self) -> str | None:
        """Name of the output projection inside the attention core (DistilBERT), else None."""
        prefix = self.attention_core + "."
        if self.attention_output.startswith(prefix):
            return self.attention_output[len(prefix):]
        return None


_BERT = FamilyAdapter(
    layers="encoder.layer",
    attention_core="attention.self",
    query="attention.self.query",
    key="attention.self.key",
    value="attention.self.value",
    attention_output="attention.output.dense",
    ffn_input="intermediate.dense",
    ffn_output="output.dense",
    num_layers_attr="num_hidden_layers",
    hidden_attr="hidden_size",
    heads_attr="num_attention_heads",
    neurons_attr="intermediate_size",
    token_type_vocab_attr="type_vocab_size",
    pooler=True,
    classifier_dense=False,
)

ADAPTERS: dict[str, FamilyAdapter] = {
    "bert": _BERT,
    # Same encoder as BERT; its classification head skips the pooler for a dense of its own.
    "roberta": replace(_BERT, pooler=False, classifier_dense=True),
    "distilbert": FamilyAdapter(
        layers="transformer.layer",
        attention_core="attention",
        query="attention.q_lin",
        key="attention.k_lin",
        value="attention.v_lin",
        attention_output="attention.out_lin",
        ffn_input="ffn.lin1",
        ffn_output="ffn.lin2",
        num_layers_attr="n_layers",
        hidden_attr="dim",
        heads_attr="n_heads",
        neurons_attr="hidden_dim",
        token_type_vocab_attr=None,
        pooler=False,
        classifier_dense=True,
    ),
}


@dataclass(frozen=True)
class EncoderDims:
    """Full-size dimensions of an encoder."""

    num_layers: int
    hidden: int
    heads: int
    head_dim: int
    neurons: int


def adapter_for(config) -> FamilyAdapter:
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise UnsupportedModelError(
            f"Unsupported model_type {model_type!r}; supported families: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[model_type]


def encoder_dims(config) -> EncoderDims:
    adapter = adapter_for(config)
    hidden = getattr(config, adapter.hidden_attr)
    heads = getattr(config, adapter.heads_attr)
    if hidden % heads:
        raise UnsupportedModelError(f"hidden size {hidden} is not a multiple of the {heads} attention heads")
    return EncoderDims(
        num_layers=getattr(config, adapter.num_layers_attr),
        hidden=hidden,
        heads=heads,
        head_dim=hidden // heads,
        neurons=getattr(config, adapter.neurons_attr),
    )


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The encoder layers of a (possibly task-headed) model of a supported family."""
    return model.base_model.get_submodule(adapter_for(model.config).layers)
