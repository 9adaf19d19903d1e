"""Tests for eftnas_cli.deploy and eftnas_cli.latency on tiny randomly initialised models."""

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, RobertaConfig

from eftnas_cli.deploy import (
    export_onnx,
    model_input_names,
    onnx_logits,
    openvino_logits,
    quantize_int8,
    to_openvino,
)
from eftnas_cli.latency import Latency, dummy_features, onnx_latency, openvino_latency, torch_latency
from eftnas_cli.testing import tiny_config

TOLERANCE = 1e-4
VOCAB_SIZE = 100
TINY = dict(vocab_size=VOCAB_SIZE, max_position_embeddings=64, num_labels=2)
# (batch, sequence) pairs other than the exporter's example shape: they prove the axes are dynamic.
SHAPES = [(3, 11), (1, 20)]


class BiasOnly(nn.Module):
    """Stand-in for a linear layer left with no inputs (eftnas_cli.elastic.BiasOnly)."""

    def __init__(self, bias: torch.Tensor):
        super().__init__()
        self.bias = nn.Parameter(bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(*x.shape[:-1], -1)


class SkippedAttention(nn.Module):
    """Stand-in for the attention core of a layer that keeps no heads (eftnas_cli.elastic.SkippedAttention)."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        return hidden_states, None


def tiny_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(tiny_config(kind, num_labels=2)).eval()


def with_skipped_parts(model: nn.Module) -> nn.Module:
    """Layer 0 keeps no attention heads, layer 1 no FFN neurons, as an extracted subnet can."""
    attention = model.bert.encoder.layer[0].attention
    attention.self = SkippedAttention()
    attention.output.dense = BiasOnly(attention.output.dense.bias)
    ffn_layer = model.bert.encoder.layer[1]
    ffn_layer.intermediate.dense = nn.Identity()
    ffn_layer.output.dense = BiasOnly(ffn_layer.output.dense.bias)
    return model


def padded_features(input_names: list[str], batch_size: int, seq_len: int, seed: int) -> dict[str, np.ndarray]:
    features = dummy_features(input_names, batch_size, seq_len, VOCAB_SIZE, seed=seed)
    features["attention_mask"][0, seq_len // 2 :] = 0  # the first row is padded
    return features


def torch_logits(model: nn.Module, features: dict[str, np.ndarray]) -> np.ndarray:
    with torch.inference_mode():
        return model(**{name: torch.from_numpy(array) for name, array in features.items()}).logits.numpy()


@pytest.fixture(scope="module", params=["bert", "distilbert", "bert with skipped parts"])
def exported(request, tmp_path_factory):
    """(model, onnx path, OpenVINO xml path) for each tiny model, exported once per module."""
    model = tiny_model(request.param.split()[0])
    if request.param == "bert with skipped parts":
        model = with_skipped_parts(model)
    folder = tmp_path_factory.mktemp(request.param.replace(" ", "_"))
    onnx_path = export_onnx(model, folder / "model.onnx")
    return model, onnx_path, to_openvino(onnx_path, folder / "model.xml")


def test_model_input_names():
    assert model_input_names(tiny_model("bert")) == ["input_ids", "attention_mask", "token_type_ids"]
    assert model_input_names(tiny_model("distilbert")) == ["input_ids", "attention_mask"]
    # RoBERTa checkpoints have a single token type, which their tokenizers never send.
    roberta_config = RobertaConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, type_vocab_size=1, **TINY
    )
    roberta = AutoModelForSequenceClassification.from_config(roberta_config)
    assert model_input_names(roberta) == ["input_ids", "attention_mask"]


@pytest.mark.parametrize("batch_size, seq_len", SHAPES)
def test_onnx_runtime_matches_torch(exported, batch_size, seq_len):
    model, onnx_path, _ = exported
    features = padded_features(model_input_names(model), batch_size, seq_len, seed=seq_len)
    expected = torch_logits(model, features)
    np.testing.assert_allclose(onnx_logits(onnx_path, features), expected, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("batch_size, seq_len", SHAPES)
def test_openvino_f32_matches_torch(exported, batch_size, seq_len):
    model, _, xml_path = exported
    features = padded_features(model_input_names(model), batch_size, seq_len, seed=seq_len)
    expected = torch_logits(model, features)
    np.testing.assert_allclose(openvino_logits(xml_path, features, "f32"), expected, atol=TOLERANCE, rtol=0)


def test_export_leaves_model_where_it_was(tmp_path):
    model = tiny_model("distilbert").train()
    export_onnx(model, tmp_path / "model.onnx")
    assert model.training


def test_int8_quantization_keeps_predictions(tmp_path):
    model = tiny_model("bert")
    names = model_input_names(model)
    xml_path = to_openvino(export_onnx(model, tmp_path / "model.onnx"), tmp_path / "model.xml")
    calibration = [padded_features(names, 4, 16, seed=seed) for seed in range(3)]
    int8_xml = quantize_int8(xml_path, calibration, tmp_path / "int8" / "model.xml")

    ir_text = int8_xml.read_text()
    assert "FakeQuantize" in ir_text or 'element_type="i8"' in ir_text or 'element_type="u8"' in ir_text
    features = padded_features(names, 16, 16, seed=100)
    f32_labels = openvino_logits(xml_path, features).argmax(-1)
    int8_labels = openvino_logits(int8_xml, features).argmax(-1)
    assert (f32_labels == int8_labels).mean() >= 0.75


def test_dummy_features():
    features = dummy_features(["input_ids", "attention_mask", "token_type_ids"], 2, 5, VOCAB_SIZE, seed=1)
    assert all(array.dtype == np.int64 and array.shape == (2, 5) for array in features.values())
    assert features["attention_mask"].all() and not features["token_type_ids"].any()
    assert features["input_ids"].max() < VOCAB_SIZE
    np.testing.assert_array_equal(
        features["input_ids"], dummy_features(["input_ids"], 2, 5, VOCAB_SIZE, seed=1)["input_ids"]
    )


def test_latencies_are_positive(exported):
    model, onnx_path, xml_path = exported
    features = dummy_features(model_input_names(model), 2, 8, VOCAB_SIZE)
    latencies = [
        torch_latency(model, features, runs=2, warmup=1, threads=1),
        onnx_latency(onnx_path, features, runs=2, warmup=1),
        openvino_latency(xml_path, features, runs=2, warmup=1),
        openvino_latency(xml_path, features, precision="default", runs=2, warmup=1),
    ]
    for latency in latencies:
        assert isinstance(latency, Latency)
        assert 0 < latency.median_ms <= latency.p90_ms
        assert (latency.runs, latency.batch_size, latency.seq_len) == (2, 2, 8)
