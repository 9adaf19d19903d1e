"""Inference latency in torch, ONNX Runtime and OpenVINO, measured the same way, and one helper that
compares models across backends and batch sizes (what `export` and `scripts/bench_speed.py` print).

Every backend gets the same features (random token ids, no padding) and runs `warmup` untimed
inferences first (lazy initialization, allocator and cache warm-up), then timed ones with
time.perf_counter; the median is the headline figure, p90 shows the spread.

A speed-up is a ratio of two medians, so `compare_latencies` times the models it compares
interleaved, one inference each in turn, under the same machine conditions; it adds rounds until
every median is stable, and re-measures, then flags, a figure that contradicts itself (a batch-1
latency above the largest batch's, or a torch fp32 speed-up far beyond the MACs ratio).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from eftnas_cli.deploy import model_input_names, onnx_session, openvino_compiled

# A torch fp32 speed-up this many times beyond 1 / MACs ratio is not believable on one machine.
SPEEDUP_BEYOND_MACS_MARGIN = 1.5
# Medians of successive rounds within this share of each other are stable.
STABLE_MEDIAN_TOLERANCE = 0.05


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


# ---- one inference per backend -------------------------------------------------------------------
def torch_runner(model: torch.nn.Module, features: dict[str, np.ndarray], device: str = "cpu") -> Callable[[], None]:
    """One inference of `model` (moved to `device` in place, eval mode) on `features`."""
    model = model.to(device).eval()
    inputs = {name: torch.from_numpy(array).to(device) for name, array in features.items()}
    on_cuda = torch.device(device).type == "cuda"

    def infer_once() -> None:
        with torch.inference_mode():
            model(**inputs)
        if on_cuda:
            # CUDA kernels run asynchronously: without waiting, only the launch would be timed.
            torch.cuda.synchronize()

    return infer_once


def onnx_runner(onnx_path: Path, features: dict[str, np.ndarray]) -> Callable[[], None]:
    """One inference of the ONNX model in ONNX Runtime on CPU (its default threading)."""
    session = onnx_session(onnx_path)
    outputs = [output.name for output in session.get_outputs()]
    return lambda: session.run(outputs, features)


def openvino_runner(xml_path: Path, features: dict[str, np.ndarray], precision: str = "f32") -> Callable[[], None]:
    """One inference of the OpenVINO IR on CPU: compiled once, one request reused.

    precision "f32" forces fp32 arithmetic; "default" lets the CPU pick (bf16 on AMX hardware).
    """
    import openvino as ov

    # LATENCY optimizes a single stream of one request at a time: the case being measured.
    compiled = openvino_compiled(
        xml_path, precision, {ov.properties.hint.performance_mode: ov.properties.hint.PerformanceMode.LATENCY}
    )
    request = compiled.create_infer_request()
    # share_inputs: read the numpy arrays in place, as ONNX Runtime does, instead of copying per run.
    return lambda: request.infer(features, share_inputs=True)


def _timed_ms(infer_once: Callable[[], object]) -> float:
    start = time.perf_counter()
    infer_once()
    return (time.perf_counter() - start) * 1000.0


def _measure(infer_once: Callable[[], object], features: dict[str, np.ndarray], runs: int, warmup: int) -> Latency:
    if runs < 1:
        raise ValueError(f"runs must be at least 1, not {runs}")
    for _ in range(warmup):
        infer_once()
    times_ms = [_timed_ms(infer_once) for _ in range(runs)]
    batch_size, seq_len = features["input_ids"].shape
    return Latency(
        median_ms=float(np.median(times_ms)),
        p90_ms=float(np.percentile(times_ms, 90)),
        runs=runs,
        batch_size=int(batch_size),
        seq_len=int(seq_len),
    )


def torch_latency(model: torch.nn.Module, features: dict[str, np.ndarray], runs: int = 20, warmup: int = 3,
                  threads: int | None = None, device: str = "cpu") -> Latency:
    """Latency of `model` on `features`; moves `model` to `device` in place and sets eval mode.

    `threads` caps torch's CPU threads for the measurement (restored afterwards).
    """
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _measure(torch_runner(model, features, device), features, runs, warmup)
    finally:
        torch.set_num_threads(previous_threads)


def onnx_latency(onnx_path: Path, features: dict[str, np.ndarray], runs: int = 20, warmup: int = 3) -> Latency:
    """Latency of the ONNX model at `onnx_path` in ONNX Runtime on CPU."""
    return _measure(onnx_runner(onnx_path, features), features, runs, warmup)


def openvino_latency(xml_path: Path, features: dict[str, np.ndarray], precision: str = "f32", runs: int = 20,
                     warmup: int = 3) -> Latency:
    """Latency of the OpenVINO IR at `xml_path` on CPU (see `openvino_runner`)."""
    return _measure(openvino_runner(xml_path, features, precision), features, runs, warmup)


# ---- comparing models ------------------------------------------------------------------------------
@dataclass
class TimedModel:
    """A model to compare: its torch module, its encoder MACs over the reference's, and the deploy
    files of each converted backend (a backend whose file is missing is skipped)."""

    model: torch.nn.Module
    macs_ratio: float
    files: dict[str, Path] = field(default_factory=dict)  # backend name -> file


# Backend name -> how one inference is built from a TimedModel (None: the backend's file is missing).
BACKENDS: dict[str, Callable[[TimedModel, dict, str], Callable[[], None] | None]] = {
    "torch": lambda timed, features, device: torch_runner(timed.model, features, device),
    "onnxruntime": lambda timed, features, device: (
        onnx_runner(timed.files["onnxruntime"], features) if "onnxruntime" in timed.files else None),
    "openvino": lambda timed, features, device: (
        openvino_runner(timed.files["openvino"], features, "f32") if "openvino" in timed.files else None),
    "openvino_default": lambda timed, features, device: (
        openvino_runner(timed.files["openvino"], features, "default") if "openvino" in timed.files else None),
    "openvino_int8": lambda timed, features, device: (
        openvino_runner(timed.files["openvino_int8"], features, "default") if "openvino_int8" in timed.files else None),
}


def latency_key(backend: str, batch_size: int) -> str:
    return f"{backend}_batch{batch_size}"


@dataclass
class LatencyReport:
    """Per model label: median ms and p90/median − 1 per `<backend>_batch<b>`, and the figures that
    still contradicted themselves after a re-measure."""

    median_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    spread: dict[str, dict[str, float]] = field(default_factory=dict)
    flags: dict[str, list[str]] = field(default_factory=dict)

    def merge(self, other: LatencyReport) -> None:
        for name in ("median_ms", "spread", "flags"):
            mine, theirs = getattr(self, name), getattr(other, name)
            for label, values in theirs.items():
                if isinstance(values, list):
                    mine.setdefault(label, []).extend(values)
                else:
                    mine.setdefault(label, {}).update(values)


def _interleaved(runners: dict[str, Callable[[], None]], runs: int, warmup: int, max_rounds: int) -> dict[str, list[float]]:
    """Timings (ms) of each runner, one inference of each in turn, in rounds of `runs` // 2 until
    every median moved less than STABLE_MEDIAN_TOLERANCE over a round (at least two rounds)."""
    for infer_once in runners.values():
        for _ in range(warmup):
            infer_once()
    samples: dict[str, list[float]] = {label: [] for label in runners}
    per_round = max(1, runs // 2)
    previous = None
    for _ in range(max(2, max_rounds)):
        for _ in range(per_round):
            for label, infer_once in runners.items():
                samples[label].append(_timed_ms(infer_once))
        medians = {label: statistics.median(times) for label, times in samples.items()}
        if previous and all(abs(medians[k] - previous[k]) <= STABLE_MEDIAN_TOLERANCE * previous[k] for k in medians):
            break
        previous = medians
    return samples


class LatencyComparison:
    """Times `models` (label → TimedModel; `reference` is the dense model speed-ups divide) across
    backends and batch sizes at `seq_len`, interleaved, with the self-consistency checks."""

    def __init__(self, models: dict[str, TimedModel], reference: str, batch_sizes: list[int], seq_len: int, *,
                 runs: int, warmup: int = 3, max_rounds: int = 4, device: str = "cpu"):
        if runs < 1:
            raise ValueError(f"runs must be at least 1, not {runs}")
        self.models, self.reference, self.batch_sizes, self.seq_len = models, reference, sorted(batch_sizes), seq_len
        self.runs, self.warmup, self.max_rounds, self.device = runs, warmup, max_rounds, device

    def _features(self, timed: TimedModel, batch_size: int) -> dict[str, np.ndarray]:
        return dummy_features(model_input_names(timed.model), batch_size, self.seq_len, timed.model.config.vocab_size)

    def _time(self, backend: str, batch_size: int, labels: list[str]) -> dict[str, list[float]]:
        runners = {}
        for label in labels:
            runner = BACKENDS[backend](self.models[label], self._features(self.models[label], batch_size), self.device)
            if runner is not None:
                runners[label] = runner
        return _interleaved(runners, self.runs, self.warmup, self.max_rounds) if runners else {}

    def measure(self, backends: list[str]) -> LatencyReport:
        """Time every model on `backends` (in that order: put torch before any OpenVINO backend,
        whose worker threads linger and slow a torch measurement taken after them)."""
        report = LatencyReport()
        for backend in backends:
            for batch_size in self.batch_sizes:
                self._record(report, backend, batch_size, self._time(backend, batch_size, list(self.models)))
            self._recheck(report, backend)
        return report

    def _record(self, report: LatencyReport, backend: str, batch_size: int, samples: dict[str, list[float]]) -> None:
        key = latency_key(backend, batch_size)
        for label, times in samples.items():
            median = float(np.median(times))
            report.median_ms.setdefault(label, {})[key] = median
            report.spread.setdefault(label, {})[key] = float(np.percentile(times, 90)) / median - 1

    def _contradictions(self, report: LatencyReport, backend: str) -> list[tuple[str, str, int | None]]:
        """(label, what is wrong, batch size to re-measure or None for every one) per suspect figure."""
        found = []
        smallest, largest = self.batch_sizes[0], self.batch_sizes[-1]
        for label, medians in report.median_ms.items():
            small, large = medians.get(latency_key(backend, smallest)), medians.get(latency_key(backend, largest))
            if small is not None and large is not None and largest > smallest and small > large:
                found.append((label, f"{backend}: batch {smallest} slower than batch {largest}", None))
        if backend == "torch" and self.reference in report.median_ms:
            for label, timed in self.models.items():
                if label == self.reference or timed.macs_ratio <= 0:
                    continue
                for batch_size in self.batch_sizes:
                    key = latency_key(backend, batch_size)
                    if key not in report.median_ms.get(label, {}):
                        continue
                    speedup = report.median_ms[self.reference][key] / report.median_ms[label][key]
                    if speedup > SPEEDUP_BEYOND_MACS_MARGIN / timed.macs_ratio:
                        found.append((label, f"torch batch {batch_size}: {speedup:.1f}x speed-up at "
                                             f"{timed.macs_ratio:.0%} of the MACs", batch_size))
        return found

    def _recheck(self, report: LatencyReport, backend: str) -> None:
        """Re-measure each contradicting figure once (with the reference, interleaved); flag it when
        the contradiction remains."""
        for label, _, batch_size in self._contradictions(report, backend):
            labels = [label] if label == self.reference else [self.reference, label]
            for size in [batch_size] if batch_size is not None else self.batch_sizes:
                self._record(report, backend, size, self._time(backend, size, labels))
        for label, problem, _ in self._contradictions(report, backend):
            report.flags.setdefault(label, []).append(problem)
