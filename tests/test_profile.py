import json
import shutil
import time

import pytest
from typer.testing import CliRunner

from eftnas_cli import models
from eftnas_cli.cli import app


def test_profile_bert_base_is_11_17_gmacs_at_128():
    result = CliRunner().invoke(app, ["profile", "bert-base", "--seq-len", "128"])
    assert result.exit_code == 0, result.output
    assert "encoder: 11.17 GMACs" in " ".join(result.output.split())


def test_profile_of_a_subnet(tmp_path, tiny_model_dir):
    subnet = tmp_path / "subnet.json"
    subnet.write_text(json.dumps({"layers": [{"heads": 2, "neurons": 32}, {"heads": 0, "neurons": 0}]}))
    result = CliRunner().invoke(app, ["profile", str(tiny_model_dir), "--subnet", str(subnet), "--seq-len", "16"])
    assert result.exit_code == 0, result.output
    # Layer 0 at half width and layer 1 skipped: a quarter of the full encoder.
    assert "(25.0% of the full model)" in " ".join(result.output.split())


def test_profile_rejects_a_subnet_of_another_shape(tmp_path, tiny_model_dir):
    subnet = tmp_path / "subnet.json"
    subnet.write_text(json.dumps({"layers": [{"heads": 2, "neurons": 32}]}))
    result = CliRunner().invoke(app, ["profile", str(tiny_model_dir), "--subnet", str(subnet)])
    assert result.exit_code == 2 and result.output.startswith("error:")


@pytest.fixture
def hub_without_answer(monkeypatch):
    """A hub endpoint nothing listens on, offline mode off, and no remembered probe result."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    models._hub_reachable.cache_clear()
    yield
    models._hub_reachable.cache_clear()


def test_an_unknown_model_fails_fast_when_the_hub_does_not_answer(hub_without_answer):
    started = time.perf_counter()
    result = CliRunner().invoke(app, ["profile", "minilm-l12"])
    elapsed = time.perf_counter() - started
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and "the Hugging Face hub does not answer" in result.output
    assert "did you mean 'minilm-l6'?" in result.output
    assert elapsed < models.HUB_PROBE_TIMEOUT_S + 5, elapsed


def test_a_hub_model_downloaded_before_loads_offline(monkeypatch, tmp_path, tiny_model_dir):
    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / "models--someone--tiny-bert" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_model_dir, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert models.resolve_model("someone/tiny-bert") == str(snapshot)
    result = CliRunner().invoke(app, ["profile", "someone/tiny-bert", "--seq-len", "16"])
    assert result.exit_code == 0 and "encoder:" in result.output, result.output
