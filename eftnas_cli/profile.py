"""`eftnas profile`: parameters and MACs of a model, or of a subnet of it, per sequence."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table
from transformers import BertConfig

from eftnas_cli import elastic
from eftnas_cli.errors import UserError
from eftnas_cli.models import load_config as load_model_config
from eftnas_cli.tasks import kind_of_model
from eftnas_cli.ui import console

# Architectures countable without downloading weights (a count needs only the config).
CONFIG_ALIASES = {"bert-base": BertConfig}


def load_config(name: str):
    if name in CONFIG_ALIASES:
        return CONFIG_ALIASES[name]()
    return load_model_config(name)


def profile(name: str, seq_len: int = 128, subnet_file: Path | None = None) -> tuple[elastic.MacsReport, elastic.ParamsReport]:
    """Print and return the MACs and parameter reports; an exported model counts its own subnet.

    An export's config keeps its parent's full dimensions, so subnets are always read against those.
    The head counted is the one the model was trained for (its config's architecture: a QA model's
    span head, else a classification head).
    """
    if seq_len < 1:
        raise UserError(f"--seq-len {seq_len}: a sequence length is a positive number of tokens")
    config = load_config(name)
    exported = getattr(config, "eftnas_subnet", None)
    subnet = elastic.Subnet.from_json(subnet_file) if subnet_file else None
    if subnet is None and exported is not None:
        subnet = elastic.Subnet.from_dict(exported)
    head = kind_of_model(config).head
    macs = elastic.macs(config, subnet, seq_len=seq_len, head=head)
    params = elastic.count_params(config, subnet, head=head)
    full = elastic.macs(config, None, seq_len=seq_len)

    layers = subnet.layers if subnet else elastic.full_subnet(config).layers
    table = Table(title=f"{name} at sequence length {seq_len}")
    for column in ("layer", "heads", "neurons", "MMACs", "params"):
        table.add_column(column, justify="right")
    for index, (width, layer_macs, layer_params) in enumerate(zip(layers, macs.per_layer, params.per_layer)):
        table.add_row(str(index), str(width.heads), str(width.neurons), f"{layer_macs / 1e6:.1f}", f"{layer_params:,}")
    console.print(table)
    console.print(f"encoder: {macs.encoder / 1e9:.2f} GMACs ({macs.encoder / full.encoder:.1%} of the full model), "
                  f"{params.encoder:,} params")
    console.print(f"embeddings: 0 MACs, {params.embeddings:,} params · pooler: {macs.pooler:,} MACs, "
                  f"{params.pooler:,} params · {head} head: {macs.classifier:,} MACs, {params.classifier:,} params")
    console.print(f"total: {macs.total / 1e9:.2f} GMACs, {params.total:,} params")
    return macs, params
