import json

from typer.testing import CliRunner

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
