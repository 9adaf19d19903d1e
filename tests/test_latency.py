"""LatencyComparison: interleaved timing, stable medians, and the re-measure of figures that
contradict themselves; with fake backends whose latency the test sets."""

import time
from types import SimpleNamespace

import pytest

from eftnas_cli import latency
from eftnas_cli.latency import LatencyComparison, TimedModel, latency_key


class FakeModel:
    """Stands in for a torch model: the fake backend sleeps `ms[batch]` per inference, and the
    sleeps of each call are listed in `calls` so the order of inferences can be checked."""

    config = SimpleNamespace(vocab_size=10)

    def __init__(self, name, ms, calls):
        self.name, self.ms, self.calls = name, ms, calls

    def forward(self, input_ids, attention_mask):  # the signature model_input_names reads
        raise NotImplementedError


@pytest.fixture
def fake_backend(monkeypatch):
    calls = []

    def runner(timed, features, device):
        batch = features["input_ids"].shape[0]

        def infer_once():
            calls.append(timed.model.name)
            delay = timed.model.ms[batch]
            time.sleep(delay() if callable(delay) else delay / 1000)

        return infer_once

    monkeypatch.setitem(latency.BACKENDS, "torch", runner)
    return calls


def test_models_are_timed_interleaved_and_medians_recorded(fake_backend):
    models = {"dense": TimedModel(FakeModel("dense", {1: 4, 4: 8}, fake_backend), 1.0),
              "half": TimedModel(FakeModel("half", {1: 2, 4: 4}, fake_backend), 0.5)}
    report = LatencyComparison(models, "dense", [1, 4], seq_len=4, runs=4, warmup=1).measure(["torch"])
    assert report.median_ms["dense"][latency_key("torch", 1)] == pytest.approx(4, rel=0.5)
    assert report.median_ms["half"][latency_key("torch", 4)] == pytest.approx(4, rel=0.5)
    timed_calls = fake_backend[2:]  # after one warm-up inference each
    assert timed_calls[:6] == ["dense", "half"] * 3  # one inference each in turn
    assert report.flags == {}


def test_a_hiccup_that_persists_is_flagged_and_one_that_passes_is_remeasured(fake_backend):
    state = {"slow": True}
    # The half-size model seems 10x faster in the first measure only: re-measured, then believable.
    dense_b1 = FakeModel("dense", {1: lambda: 0.02 if state["slow"] else 0.004, 4: 30}, fake_backend)
    models = {"dense": TimedModel(dense_b1, 1.0), "half": TimedModel(FakeModel("half", {1: 2, 4: 15}, fake_backend), 0.5)}
    comparison = LatencyComparison(models, "dense", [1, 4], seq_len=4, runs=4, warmup=0)
    original = comparison._contradictions

    def calm_down_after_first_check(report, backend):
        found = original(report, backend)
        state["slow"] = False
        return found

    comparison._contradictions = calm_down_after_first_check
    report = comparison.measure(["torch"])
    assert report.median_ms["dense"][latency_key("torch", 1)] == pytest.approx(4, rel=0.5)
    assert report.flags == {}

    # A batch-1 latency above the batch-4 one that persists is flagged, not hidden.
    models = {"dense": TimedModel(FakeModel("dense", {1: 12, 4: 4}, fake_backend), 1.0)}
    report = LatencyComparison(models, "dense", [1, 4], seq_len=4, runs=2, warmup=0).measure(["torch"])
    assert report.flags == {"dense": ["torch: batch 1 slower than batch 4"]}
