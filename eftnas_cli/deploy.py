"""Deployment of a (compressed) model of any task kind: ONNX, OpenVINO IR, INT8.

The path is torch -> ONNX (dynamic batch and sequence axes, outputs named as the task kind says:
`logits`, or `start_logits`/`end_logits` for QA) -> OpenVINO IR (fp32 weights) -> INT8 IR via
NNCF post-training quantization. `onnx_outputs` and `openvino_outputs` run the exported files so
callers can check them against torch.
"""

from __future__ import annotations

import copy
import inspect
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

# The ONNX files hold the weights inline below this size; protobuf cannot hold 2 GB or more.
INLINE_WEIGHTS_LIMIT_BYTES = 1_800_000_000
# NNCF's own default; calibration statistics stop improving well before it.
MAX_CALIBRATION_BATCHES = 300


def model_input_names(model) -> list[str]:
    """Inputs the exported graph takes, in the order of the model's forward signature.

    `token_type_ids` only when the model accepts it and has more than one segment embedding:
    DistilBERT has none, and RoBERTa-style models (type_vocab_size 1) only ever see zeros,
    which their tokenizers do not produce.
    """
    accepted = inspect.signature(model.forward).parameters
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in accepted and getattr(model.config, "type_vocab_size", 1) > 1:
        names.append("token_type_ids")
    return [name for name in accepted if name in names]


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silences the exporter's warnings and log lines (e.g. 'torchvision is not installed')."""
    onnx_logger = logging.getLogger("torch.onnx")
    previous_level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        onnx_logger.setLevel(previous_level)


def _on_cpu_in_fp32(model: torch.nn.Module) -> torch.nn.Module:
    """`model` itself when it already is on CPU in fp32, else a converted copy (the caller's stays put)."""
    if all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters()):
        return model
    return copy.deepcopy(model).to("cpu", torch.float32)


def export_onnx(model, path: Path, input_names: list[str] | None = None, opset: int = 18,
                output_names: tuple[str, ...] = ("logits",)) -> Path:
    """Writes `model` to the single ONNX file `path`, with inputs `input_names` and outputs
    `output_names` (the task kind's: the model's output fields in order).

    Uses the torch.export-based exporter (dynamo=True): it yields a graph about half the size
    of the legacy TorchScript tracer's, with symbolic batch/sequence dimensions instead of
    traced shape arithmetic, and the tracer is deprecated. Opset 18 is that exporter's native
    opset; lower ones go through ONNX's version converter.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    input_names = input_names or model_input_names(model)
    export_model = _on_cpu_in_fp32(model)
    was_training = export_model.training
    export_model.eval()

    # Batch 2, sequence 8: torch.export specializes dimensions of size 0 or 1, so the example
    # must be larger than that on both axes to keep them symbolic.
    example = {name: torch.ones(2, 8, dtype=torch.long) for name in input_names}
    if "token_type_ids" in example:
        example["token_type_ids"].zero_()
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    dynamic_shapes = {name: {0: batch, 1: sequence} for name in input_names}
    weight_bytes = sum(p.numel() * p.element_size() for p in export_model.parameters())
    try:
        with _quiet_exporter():
            torch.onnx.export(
                export_model,
                (),
                str(path),
                kwargs=example,
                input_names=input_names,
                output_names=list(output_names),
                dynamic_shapes=dynamic_shapes,
                opset_version=opset,
                dynamo=True,
                external_data=weight_bytes > INLINE_WEIGHTS_LIMIT_BYTES,
                verbose=False,
            )
    finally:
        export_model.train(was_training)
    return path


def to_openvino(onnx_path: Path, xml_path: Path) -> Path:
    """Converts an ONNX file to OpenVINO IR (`xml_path` plus its .bin), keeping fp32 weights."""
    import openvino as ov

    xml_path = Path(xml_path)
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    # fp16 weight compression would blur fp32 equality checks and INT8 calibration.
    ov.save_model(ov.convert_model(str(onnx_path)), str(xml_path), compress_to_fp16=False)
    return xml_path


def calibration_batches(dataset, collator, input_names: list[str], samples: int, batch_size: int = 8) -> list[dict[str, np.ndarray]]:
    """INT8 calibration data: the first `samples` tokenized rows, padded in batches, as numpy."""
    rows = dataset.select(range(min(samples, len(dataset))))
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        count = len(chunk[input_names[0]])
        features = collator([{name: chunk[name][i] for name in input_names} for i in range(count)])
        batches.append({name: features[name].numpy().astype(np.int64) for name in input_names})
    return batches


def quantize_int8(xml_path: Path, calibration: list[dict[str, np.ndarray]], out_xml: Path) -> Path:
    """Post-training INT8 quantization of an OpenVINO IR with NNCF, calibrated on `calibration`.

    Each calibration item is one batch of features keyed by input name, as OpenVINO takes them.
    """
    import nncf
    import openvino as ov

    if not calibration:
        raise ValueError("INT8 quantization needs at least one calibration batch")
    out_xml = Path(out_xml)
    out_xml.parent.mkdir(parents=True, exist_ok=True)
    quantized = nncf.quantize(
        ov.Core().read_model(str(xml_path)),
        nncf.Dataset(calibration),
        # TRANSFORMER keeps softmax, layer norm and the like in floating point.
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=min(len(calibration), MAX_CALIBRATION_BATCHES),
    )
    ov.save_model(quantized, str(out_xml), compress_to_fp16=False)
    return out_xml


def onnx_session(onnx_path: Path):
    """An ONNX Runtime CPU session for `onnx_path`."""
    import onnxruntime as ort

    return ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])


def onnx_outputs(onnx_path: Path, features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every output of the ONNX model at `onnx_path` by name, for one batch of features (ONNX Runtime, CPU)."""
    session = onnx_session(onnx_path)
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, features)))


def onnx_logits(onnx_path: Path, features: dict[str, np.ndarray]) -> np.ndarray:
    """The `logits` output of a classification model's ONNX file (see `onnx_outputs`)."""
    return onnx_outputs(onnx_path, features)["logits"]


def openvino_compiled(xml_path: Path, precision: str = "f32", extra_config: dict | None = None):
    """The IR at `xml_path` compiled for CPU.

    precision "f32" forces fp32 arithmetic (the CPU default may be bf16 on AMX hardware, which
    is faster but differs from torch beyond 1e-4); "default" leaves the device's choice.
    """
    import openvino as ov

    if precision not in ("f32", "default"):
        raise ValueError(f"precision must be 'f32' or 'default', not {precision!r}")
    config = dict(extra_config or {})
    if precision == "f32":
        config[ov.properties.hint.inference_precision] = ov.Type.f32
    return ov.Core().compile_model(str(xml_path), "CPU", config)


def openvino_outputs(xml_path: Path, features: dict[str, np.ndarray], precision: str = "f32") -> dict[str, np.ndarray]:
    """Every output of the OpenVINO IR at `xml_path` by name, for one batch of features (CPU)."""
    compiled = openvino_compiled(xml_path, precision)
    results = compiled(features)
    return {output.get_any_name(): results[output] for output in compiled.outputs}


def openvino_logits(xml_path: Path, features: dict[str, np.ndarray], precision: str = "f32") -> np.ndarray:
    """The `logits` output of a classification model's IR (see `openvino_outputs`)."""
    return openvino_outputs(xml_path, features, precision)["logits"]
