"""Inference latency of a model in torch, ONNX Runtime and OpenVINO, measured the same way.

Every backend gets the same features, runs `warmup` untimed inferences first (lazy
initialization, allocator and cache warm-up), then `runs` timed ones with time.perf_counter;
the median is the headline figure, p90 shows the spread.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from eftnas_cli.deploy import onnx_session, openvino_compiled


@dataclass
class Latency:
    median_ms: float
    p90_ms: float
    runs: int
    batch_size: int
    seq_len: int


def dummy_features(
    input_names: list[str], batch_size: int, seq_len: int, vocab_size: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """Random token ids with a full attention mask (no padding) and all-zero token types."""
    rng = np.random.default_rng(seed)
    shape = (batch_size, seq_len)
    makers = {
        "input_ids": lambda: rng.integers(0, vocab_size, size=shape, dtype=np.int64),
        "attention_mask": lambda: np.ones(shape, dtype=np.int64),
        "token_type_ids": lambda: np.zeros(shape, dtype=np.int64),
    }
    return {name: makers[name]() for name in input_names}


def _measure(infer_once: Callable[[], object], features: dict[str, np.ndarray], runs: int, warmup: int) -> Latency:
    if runs < 1:
        raise ValueError(f"runs must be at least 1, not {runs}")
    for _ in range(warmup):
        infer_once()
    times_ms = []
    for _ in range(runs):
        start = time.perf_counter()
        infer_once()
        times_ms.append((time.perf_counter() - start) * 1000.0)
    batch_size, seq_len = features["input_ids"].shape
    return Latency(
        median_ms=float(np.median(times_ms)),
        p90_ms=float(np.percentile(times_ms, 90)),
        runs=runs,
        batch_size=int(batch_size),
        seq_len=int(seq_len),
    )


def torch_latency(
    model: torch.nn.Module,
    features: dict[str, np.ndarray],
    runs: int = 20,
    warmup: int = 3,
    threads: int | None = None,
    device: str = "cpu",
) -> Latency:
    """Latency of `model` on `features`; moves `model` to `device` in place and sets eval mode.

    `threads` caps torch's CPU threads for the measurement (restored afterwards).
    """
    model = model.to(device).eval()
    inputs = {name: torch.from_numpy(array).to(device) for name, array in features.items()}
    on_cuda = torch.device(device).type == "cuda"

    def infer_once() -> None:
        model(**inputs)
        if on_cuda:
            # CUDA kernels run asynchronously: without waiting, only the launch would be timed.
            torch.cuda.synchronize()

    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            return _measure(infer_once, features, runs, warmup)
    finally:
        torch.set_num_threads(previous_threads)


def onnx_latency(onnx_path: Path, features: dict[str, np.ndarray], runs: int = 20, warmup: int = 3) -> Latency:
    """Latency of the ONNX model at `onnx_path` in ONNX Runtime on CPU (its default threading)."""
    session = onnx_session(onnx_path)
    return _measure(lambda: session.run(["logits"], features), features, runs, warmup)


def openvino_latency(
    xml_path: Path, features: dict[str, np.ndarray], precision: str = "f32", runs: int = 20, warmup: int = 3
) -> Latency:
    """Latency of the OpenVINO IR at `xml_path` on CPU: compiled once, one request reused.

    precision "f32" forces fp32 arithmetic; "default" lets the CPU pick (bf16 on AMX hardware).
    """
    import openvino as ov

    # LATENCY optimizes a single stream of one request at a time: the case being measured.
    compiled = openvino_compiled(
        xml_path, precision, {ov.properties.hint.performance_mode: ov.properties.hint.PerformanceMode.LATENCY}
    )
    request = compiled.create_infer_request()
    # share_inputs: read the numpy arrays in place, as ONNX Runtime does, instead of copying per run.
    return _measure(lambda: request.infer(features, share_inputs=True), features, runs, warmup)
