"""Tests for eftnas_cli.elastic on tiny randomly initialised BERT, RoBERTa and DistilBERT."""

import copy
import functools
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, AutoModelForSequenceClassification, BertConfig, GPT2Config

from eftnas_cli.elastic import (
    ADAPTERS,
    BiasOnly,
    ElasticLinear,
    LayerWidth,
    SkippedAttention,
    Subnet,
    activate,
    active_subnet,
    adapter_for,
    count_params,
    encoder_dims,
    encoder_layers,
    extract,
    full_subnet,
    macs,
    make_elastic,
    reorder,
    restructure,
    validate_subnet,
)
from eftnas_cli.testing import TINY_ARCHITECTURES, tiny_config

TOLERANCE = 1e-5
SEQ_LEN = 12
# Every family of the adapter table, as a 3-layer tiny model (eftnas_cli.testing.TINY_ARCHITECTURES).
CONFIGS = {
    family: functools.partial(tiny_config, family, num_layers=3, num_labels=3, attn_implementation="eager")
    for family in ADAPTERS
}

# (heads, neurons) per layer of the 3-layer tiny models (4 heads, 64 neurons).
SUBNETS = {
    "partial": [(2, 40), (4, 64), (1, 7)],
    "zero heads": [(0, 30), (3, 64), (4, 1)],
    "zero neurons": [(4, 0), (2, 10), (1, 64)],
    "zero both": [(0, 0), (2, 0), (0, 5)],
}


def subnet_of(widths) -> Subnet:
    return Subnet(tuple(LayerWidth(heads, neurons) for heads, neurons in widths))


@pytest.fixture(params=sorted(CONFIGS))
def model(request):
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(CONFIGS[request.param]())
    # Default init zeroes biases and sets LayerNorm to identity; perturb everything so
    # bias-only paths and head/neuron permutations are actually exercised.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.2)
    return model.eval()


@pytest.fixture
def input_ids():
    return torch.randint(2, 100, (2, SEQ_LEN), generator=torch.Generator().manual_seed(1))


def logits(model, input_ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def layer_linears(model, layer_index: int) -> dict[str, nn.Module]:
    adapter = adapter_for(model.config)
    layer = encoder_layers(model)[layer_index]
    return {role: layer.get_submodule(path) for role, path in adapter.linear_paths.items()}


def random_scores(model):
    dims = encoder_dims(model.config)
    head_scores = [torch.randn(dims.heads) for _ in range(dims.num_layers)]
    neuron_scores = [torch.randn(dims.neurons) for _ in range(dims.num_layers)]
    return head_scores, neuron_scores


def test_reorder_preserves_outputs_and_sorts_units(model, input_ids):
    dims = encoder_dims(model.config)
    before = logits(model, input_ids)
    original_query = layer_linears(model, 0)["query"].weight.detach().clone()
    original_ffn_input = layer_linears(model, 0)["ffn_input"].weight.detach().clone()
    head_scores, neuron_scores = random_scores(model)

    reorder(model, head_scores, neuron_scores)

    torch.testing.assert_close(logits(model, input_ids), before, atol=TOLERANCE, rtol=0)
    best_head = int(head_scores[0].argmax())
    first_head_rows = slice(0, dims.head_dim)
    best_head_rows = slice(best_head * dims.head_dim, (best_head + 1) * dims.head_dim)
    assert torch.equal(layer_linears(model, 0)["query"].weight[first_head_rows], original_query[best_head_rows])
    assert torch.equal(
        layer_linears(model, 0)["ffn_input"].weight[0], original_ffn_input[int(neuron_scores[0].argmax())]
    )


def test_reorder_works_on_elastic_model(model, input_ids):
    before = logits(model, input_ids)
    make_elastic(model)
    reorder(model, *random_scores(model))
    torch.testing.assert_close(logits(model, input_ids), before, atol=TOLERANCE, rtol=0)


def test_make_elastic_shares_parameters_and_is_idempotent(model, input_ids):
    before = logits(model, input_ids)
    parameters = dict(model.named_parameters())
    state = {key: value.clone() for key, value in model.state_dict().items()}

    make_elastic(model)
    make_elastic(model)

    assert all(isinstance(linear, ElasticLinear) for linear in layer_linears(model, 1).values())
    assert all(parameters[name] is parameter for name, parameter in model.named_parameters())
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[key], value) for key, value in model.state_dict().items())
    assert active_subnet(model) == full_subnet(model.config)
    torch.testing.assert_close(logits(model, input_ids), before, atol=TOLERANCE, rtol=0)


def test_activate_requires_elastic_model(model):
    with pytest.raises(ValueError, match="make_elastic"):
        activate(model, full_subnet(model.config))


@pytest.mark.parametrize("widths", SUBNETS.values(), ids=SUBNETS.keys())
def test_slicing_equals_masking_dropped_units(model, input_ids, widths):
    subnet = subnet_of(widths)
    dims = encoder_dims(model.config)
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for index, width in enumerate(subnet.layers):
            linears = layer_linears(masked, index)
            linears["attention_output"].weight[:, width.heads * dims.head_dim :] = 0
            linears["ffn_input"].weight[width.neurons :] = 0
            linears["ffn_input"].bias[width.neurons :] = 0
            linears["ffn_output"].weight[:, width.neurons :] = 0

    make_elastic(model)
    activate(model, subnet)

    assert active_subnet(model) == subnet
    torch.testing.assert_close(logits(model, input_ids), logits(masked, input_ids), atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("widths", SUBNETS.values(), ids=SUBNETS.keys())
def test_extract_equals_active_subnet(model, input_ids, widths):
    subnet = subnet_of(widths)
    dims = encoder_dims(model.config)
    full_logits = logits(model, input_ids)
    make_elastic(model)
    activate(model, subnet)

    extracted = extract(model, subnet)

    torch.testing.assert_close(logits(extracted, input_ids), logits(model, input_ids), atol=TOLERANCE, rtol=0)
    assert not torch.allclose(logits(extracted, input_ids), full_logits, atol=1e-3)
    assert active_subnet(model) == subnet, "extract must leave the source model untouched"
    assert extracted.config.eftnas_subnet == subnet.to_dict()
    assert not any(isinstance(module, ElasticLinear) for module in extracted.modules())
    for module in extracted.modules():
        if isinstance(module, nn.Linear):
            assert module.in_features > 0 and module.out_features > 0
    for index, width in enumerate(subnet.layers):
        layer = encoder_layers(extracted)[index]
        adapter = adapter_for(extracted.config)
        attention_output = layer.get_submodule(adapter.attention_output)
        ffn_output = layer.get_submodule(adapter.ffn_output)
        if width.heads == 0:
            assert isinstance(layer.get_submodule(adapter.attention_core), SkippedAttention)
            assert isinstance(attention_output, BiasOnly)
        else:
            assert layer.get_submodule(adapter.query).weight.shape == (width.heads * dims.head_dim, dims.hidden)
            assert attention_output.weight.shape == (dims.hidden, width.heads * dims.head_dim)
        if width.neurons == 0:
            assert isinstance(layer.get_submodule(adapter.ffn_input), nn.Identity)
            assert isinstance(ffn_output, BiasOnly)
        else:
            assert ffn_output.weight.shape == (dims.hidden, width.neurons)


def test_sdpa_attention_matches_eager(model, input_ids):
    subnet = subnet_of(SUBNETS["zero both"])
    eager_logits = logits(extract(model, subnet), input_ids)
    model.set_attn_implementation("sdpa")
    sdpa_extracted = extract(model, subnet)
    make_elastic(model)
    activate(model, subnet)
    torch.testing.assert_close(logits(model, input_ids), eager_logits, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(logits(sdpa_extracted, input_ids), eager_logits, atol=TOLERANCE, rtol=0)


def test_extract_from_plain_model_after_reorder(model, input_ids):
    subnet = subnet_of(SUBNETS["partial"])
    reorder(model, *random_scores(model))
    extracted = extract(model, subnet)
    make_elastic(model)
    activate(model, subnet)
    torch.testing.assert_close(logits(extracted, input_ids), logits(model, input_ids), atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("widths", [SUBNETS["partial"], SUBNETS["zero both"]], ids=["partial", "zero both"])
def test_restructure_rejects_extracted_model(model, widths):
    extracted = extract(model, subnet_of(widths))
    with pytest.raises(ValueError, match="full-size"):
        restructure(extracted, subnet_of(widths))
    with pytest.raises(ValueError, match="full-size"):
        make_elastic(extracted)


@pytest.mark.parametrize("widths", [SUBNETS["partial"], SUBNETS["zero both"]], ids=["partial", "zero both"])
def test_saved_extracted_model_reloads_with_restructure(model, input_ids, widths, tmp_path):
    extracted = extract(model, subnet_of(widths))
    extracted.save_pretrained(tmp_path)

    config = AutoConfig.from_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_config(config)
    restructure(reloaded, Subnet.from_dict(config.eftnas_subnet))
    reloaded.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True)

    torch.testing.assert_close(logits(reloaded.eval(), input_ids), logits(extracted, input_ids), atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("widths", [*SUBNETS.values(), None], ids=[*SUBNETS.keys(), "full"])
def test_macs_and_params_match_extracted_model(model, widths):
    subnet = full_subnet(model.config) if widths is None else subnet_of(widths)
    extracted = extract(model, subnet)
    single_sequence = torch.randint(2, 100, (1, SEQ_LEN))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        extracted(input_ids=single_sequence)

    report = macs(model.config, subnet, seq_len=SEQ_LEN)

    # The flop counter sees every matmul (encoder and head, none in embeddings); 1 MAC = 2 flops.
    assert counter.get_total_flops() == 2 * report.total
    assert report.encoder == sum(report.per_layer)
    assert report.total == report.encoder + report.pooler + report.classifier
    assert count_params(model.config, subnet).total == sum(p.numel() for p in extracted.parameters())


def test_head_macs_are_counted_apart(model):
    report = macs(model.config, seq_len=SEQ_LEN)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.base_model(input_ids=torch.randint(2, 100, (1, SEQ_LEN)))
    # The base model runs the encoder and, for BERT, the pooler.
    assert counter.get_total_flops() == 2 * (report.encoder + report.pooler)


def test_bert_base_macs_match_paper():
    report = macs(BertConfig(), seq_len=128)
    assert round(report.encoder / 1e9, 2) == 11.17
    assert count_params(BertConfig()).encoder == 85_054_464


def untouched(parameter: nn.Parameter, index) -> bool:
    """No gradient reached parameter[index]."""
    return parameter.grad is None or not parameter.grad[index].any()


def test_gradients_flow_only_into_active_slices(model, input_ids):
    subnet = subnet_of([(2, 40), (0, 0), (4, 7)])
    dims = encoder_dims(model.config)
    make_elastic(model)
    activate(model, subnet)

    model(input_ids=input_ids).logits.sum().backward()

    for index, width in enumerate(subnet.layers):
        linears = layer_linears(model, index)
        kept_rows = width.heads * dims.head_dim
        dropped_rows, dropped_neurons = slice(kept_rows, None), slice(width.neurons, None)
        for role in ("query", "key", "value"):
            assert untouched(linears[role].weight, dropped_rows)
            assert untouched(linears[role].bias, dropped_rows)
        assert untouched(linears["attention_output"].weight, (slice(None), dropped_rows))
        assert untouched(linears["ffn_input"].weight, dropped_neurons)
        assert untouched(linears["ffn_input"].bias, dropped_neurons)
        assert untouched(linears["ffn_output"].weight, (slice(None), dropped_neurons))
        # The active slices do learn.
        assert not untouched(linears["attention_output"].bias, slice(None))
        if width.heads:
            assert not untouched(linears["query"].weight, slice(0, kept_rows))
        if width.neurons:
            assert not untouched(linears["ffn_input"].weight, slice(0, width.neurons))


def test_subnet_round_trips_through_dict_and_json(tmp_path):
    subnet = subnet_of(SUBNETS["zero both"])
    assert subnet.to_dict() == {
        "layers": [{"heads": 0, "neurons": 0}, {"heads": 2, "neurons": 0}, {"heads": 0, "neurons": 5}]
    }
    assert Subnet.from_dict(json.loads(json.dumps(subnet.to_dict()))) == subnet
    subnet.to_json(tmp_path / "subnet.json")
    assert Subnet.from_json(tmp_path / "subnet.json") == subnet


@pytest.mark.parametrize(
    "data",
    [
        [],
        {},
        {"layers": {"heads": 1, "neurons": 2}},
        {"layers": [{"heads": 1}]},
        {"layers": [{"heads": 1, "neurons": 2, "extra": 0}]},
        {"layers": [{"heads": -1, "neurons": 2}]},
        {"layers": [{"heads": 1.5, "neurons": 2}]},
        {"layers": [{"heads": True, "neurons": 2}]},
    ],
)
def test_subnet_from_dict_rejects_malformed_input(data):
    with pytest.raises(ValueError):
        Subnet.from_dict(data)


def test_full_and_validate_subnet():
    config = CONFIGS["distilbert"]()
    assert full_subnet(config) == subnet_of([(4, 64)] * 3)
    validate_subnet(config, subnet_of(SUBNETS["zero both"]))
    with pytest.raises(ValueError, match="layers"):
        validate_subnet(config, subnet_of([(4, 64)] * 2))
    with pytest.raises(ValueError, match="heads=5"):
        validate_subnet(config, subnet_of([(5, 64), (4, 64), (4, 64)]))
    with pytest.raises(ValueError, match="neurons=65"):
        validate_subnet(config, subnet_of([(4, 65), (4, 64), (4, 64)]))
    with pytest.raises(ValueError, match="model_type"):
        full_subnet(GPT2Config())


def test_every_adapter_family_has_a_tiny_architecture():
    assert set(TINY_ARCHITECTURES) == set(ADAPTERS)
